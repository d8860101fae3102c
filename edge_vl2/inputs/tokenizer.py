"""The DeepSeek-VL2 tokenizer: a byte-level BPE `tokenizer.json` read with `tokenizers` (no transformers).

Special-token ids differ between checkpoints (`<image>` is 128815 in Tiny, 100003 in Small, 1008 in the test
fixture), so every id is looked up by its token string in the loaded tokenizer and never written down here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import checks
from ..errors import UserError, one_line

# Token strings of the DeepSeek-VL2 family (model-facts §6.1). Note the fullwidth bar U+FF5C and U+2581 in bos/eos/pad,
# but the ASCII bar in the role and grounding tokens.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"
REF_TOKEN, REF_END_TOKEN = "<|ref|>", "<|/ref|>"
DET_TOKEN, DET_END_TOKEN = "<|det|>", "<|/det|>"
GROUNDING_TOKEN = "<|grounding|>"
USER_TOKEN, ASSISTANT_TOKEN = "<|User|>", "<|Assistant|>"

MAX_TOKENIZER_BYTES = 1 << 30  # the real ones are 4.6 and 6.3 MB
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode shows for an incomplete multi-byte character


class Tokenizer:
    """`tokenizers.Tokenizer` plus the VL2 special-token ids as attributes.

    Attributes: `bos_id`, `eos_id`, `pad_id`, `image_id`, `ref_id`, `ref_end_id`, `det_id`, `det_end_id`,
    `grounding_id`, `user_id`, `assistant_id`; `special_ids` maps each token string to its id.
    """

    def __init__(self, tokenizer, *, source: str = "tokenizer.json", bos_token: str = BOS_TOKEN,
                 eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN, image_token: str = IMAGE_TOKEN):
        self._tok = tokenizer
        self.source = source
        names = {
            "bos_id": bos_token, "eos_id": eos_token, "pad_id": pad_token, "image_id": image_token,
            "ref_id": REF_TOKEN, "ref_end_id": REF_END_TOKEN, "det_id": DET_TOKEN, "det_end_id": DET_END_TOKEN,
            "grounding_id": GROUNDING_TOKEN, "user_id": USER_TOKEN, "assistant_id": ASSISTANT_TOKEN,
        }
        self.special_ids: dict[str, int] = {}
        by_id: dict[int, str] = {}
        for attr, token in names.items():
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise UserError(f"{source}: the tokenizer has no {token!r} token")
            # It must be an added token that text never splits, or prompts would tokenise differently.
            if tokenizer.encode(token, add_special_tokens=False).ids != [tid]:
                raise UserError(f"{source}: {token!r} is not a single added token in this tokenizer")
            if tid in by_id:  # e.g. a special_tokens_map.json that names <image> as eos: the model would stop on it
                raise UserError(f"{source}: {attr[:-3]} token {token!r} is also the {by_id[tid]} token; each special "
                                "token must be its own")
            by_id[tid] = attr[:-3]
            setattr(self, attr, tid)
            self.special_ids[token] = tid
        self.bos_token, self.eos_token, self.pad_token, self.image_token = bos_token, eos_token, pad_token, image_token
        self._plain = None  # built on first use by encode_plain

    @classmethod
    def from_file(cls, path: str | Path, **tokens: str) -> "Tokenizer":
        """Load a `tokenizer.json`; keyword arguments override the bos/eos/pad/image token strings."""
        from tokenizers import Tokenizer as _HFTokenizer

        path = checks.regular_file(path, "tokenizer file")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise UserError(f"{path}: over the {MAX_TOKENIZER_BYTES >> 20} MiB a tokenizer.json may have")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise UserError(f"{path}: not a valid tokenizer.json ({one_line(e)})") from None
        return cls(tok, source=str(path), **tokens)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, image_token: str = IMAGE_TOKEN) -> "Tokenizer":
        """Load `tokenizer.json` from a checkpoint or bundle folder.

        bos/eos/pad strings come from `special_tokens_map.json` when the folder has one (the official files name
        them there), else the DeepSeek-VL2 strings; `image_token` comes from `processor_config.json`.
        """
        model_dir = Path(model_dir)
        tokens: dict[str, str] = {"image_token": image_token}
        stm = model_dir / "special_tokens_map.json"
        if stm.exists():
            f = checks.Fields(checks.read_json(stm, "special tokens map", 1 << 20), str(stm))
            for key in ("bos_token", "eos_token", "pad_token"):
                v = f.raw(key, None)
                if isinstance(v, dict):  # the official files may write {"content": "...", "lstrip": false, ...}
                    v = checks.Fields(v, str(stm), f"{key}.").str("content", nonempty=True)
                if v is not None:
                    tokens[key] = checks.text(v, f.name(key), nonempty=True)
        return cls.from_file(model_dir / "tokenizer.json", **tokens)

    def __len__(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos/eos added (what the official processor does for every text segment)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` read as plain characters: an added token's string (`<|User|>`, the eos string,
        `<image>`) typed in it becomes ordinary text tokens, never the special id (see inputs/template.py).

        A copy of the tokenizer without its added-token table does the encoding, so the pre-tokenizer and BPE are
        the real ones: text free of special-token strings gets exactly the ids of `encode`.
        """
        if self._plain is None:
            from tokenizers import Tokenizer as _HFTokenizer

            spec = json.loads(self._tok.to_str())
            self.added_ids = frozenset(a["id"] for a in spec.get("added_tokens", []))
            spec["added_tokens"] = []
            self._plain = _HFTokenizer.from_str(json.dumps(spec))
        ids = self._plain.encode(text, add_special_tokens=False).ids
        if self.added_ids.intersection(ids):  # BPE merges re-formed a special string: encode it char by char
            ids = [i for ch in text for i in self._plain.encode(ch, add_special_tokens=False).ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens are kept by default: grounding output (`<|ref|>`, `<|det|>`) needs them."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what the grammar engine reads its vocabulary from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(int(tid))

    def stream(self, skip_special_tokens: bool = False) -> "StreamingDetokenizer":
        """A fresh streaming detokenizer over this tokenizer."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)


class StreamingDetokenizer:
    """Turns token ids, fed one at a time, into text pieces whose concatenation equals `decode(all ids)`.

    Byte-level BPE can split one UTF-8 character over several tokens; until the character is complete the
    decoded text ends in U+FFFD, so that tail is held back. Each step decodes only a short window: from one token
    before the last point where everything was emitted (that token is context, for decoders that treat the first
    token specially), so the cost does not grow with the length of the answer.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._ctx = 0  # decode window start (context token included)
        self._emitted = 0  # characters of decode(ids[_ctx:]) already returned (context text counts as returned)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def _decode_window(self, end: int) -> str:
        return self._tok.decode(self._ids[self._ctx:end], skip_special_tokens=self._skip)

    def _restart(self) -> None:
        start = len(self._ids)
        self._ctx = max(0, start - 1)
        self._emitted = len(self._decode_window(start))

    def add(self, token_id: int) -> str:
        """Feed one id; returns the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        text = self._decode_window(len(self._ids))
        if text.endswith(_REPLACEMENT):
            # The prefix before the trailing replacement run is final; the run may still become a character.
            stable = text.rstrip(_REPLACEMENT)
            if len(stable) <= self._emitted:
                return ""
            out = stable[self._emitted:]
            self._emitted = len(stable)
            return out
        out = text[self._emitted:]
        self._restart()  # everything decoded to a character boundary
        return out

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character shows as U+FFFD) and reset the window."""
        out = self._decode_window(len(self._ids))[self._emitted:]
        self._restart()
        return out
