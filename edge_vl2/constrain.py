"""Constrained decoding: answers that follow a JSON Schema, a regular expression or a list of choices.

The grammar engine is llguidance (README "Constrained decoding" has the comparison with xgrammar and outlines-core
on our tokenizer). It reads the model's own `tokenizer.json` (every added token marked special, so `<image>`,
`<|ref|>`, bos, pad, ... can never appear inside an answer), keeps the grammar state per token id (bytes, not text:
a character split over several byte tokens is just several steps) and writes a bit per vocabulary id of what may
come next. eos is one of those ids only where the grammar is complete.

Per decode step: the sampled token is accepted, and the mask for the next step is computed in a worker thread while
the model runs its next forward pass (llguidance releases the GIL); the sampler then waits for it (usually not at
all) and sets every forbidden logit to -inf. When the grammar cannot go on (the JSON object closed), generation stops
without another model step.

The grammars allow one leading space before the answer: after "<|Assistant|>:" the model's first token normally
starts with a space (model-facts §6.2); forcing "{" instead would push it off its training distribution. The
pipeline drops that space, so a constrained answer's text is exactly the JSON value, the regex match or the choice.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import UserError, one_line

if TYPE_CHECKING:
    from .inputs.tokenizer import Tokenizer

# json.dumps' default separators, no other whitespace: the style models see most, and a grammar that allowed free
# whitespace would let a weak model emit spaces for ever.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LEADING_SPACE = 'start: " "? answer\nanswer: '


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError('constrained decoding needs llguidance: pip install "edge-vl2[structured]"') from None
    return llguidance


def parse_schema(schema) -> dict:
    """A JSON Schema given as a dict or as JSON text -> dict; anything else is a one-line error."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise UserError(f"JSON schema is not valid JSON ({one_line(e)})") from None
    if not isinstance(schema, dict):
        raise UserError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    return schema


def build_grammar(json_schema=None, regex: str | None = None, choices=None) -> str:
    """The llguidance grammar for exactly one of: a JSON Schema, a regex (the whole answer; \\d means [0-9]) or a
    list of choices. Checked here, without a tokenizer, so a bad schema fails before any model work."""
    llg = _llguidance()
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("choices", choices)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of json_schema, regex, choices (got {', '.join(given) or 'none'})")
    if json_schema is not None:
        schema = {**parse_schema(json_schema), "x-guidance": JSON_STYLE}
        body = "%json " + json.dumps(schema, ensure_ascii=False)
        what = "JSON schema"
    elif regex is not None:
        if not isinstance(regex, str) or not regex:
            raise UserError("regex must be a non-empty string")
        body = "/" + llg.regex_to_lark(regex, "d") + "/"
        what = f"regex {regex!r}"
    else:
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise UserError("choices must be a non-empty list of non-empty strings")
        body = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        what = "choices"
    grammar = llg.LLMatcher.grammar_from_lark(_LEADING_SPACE + body)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise UserError(f"{what}: the grammar engine refuses it ({one_line(error)})")
    return grammar


_VOCABS: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def grammar_vocabulary(tokenizer: "Tokenizer", width: int):
    """llguidance's view of the tokenizer (token bytes, a trie; ~2 s for 129k ids): built once per tokenizer and
    logits width, then shared. `width` is the lm_head's row count (Tiny: 129,280 > the tokenizer's 128,823): ids
    past the tokenizer exist in the mask and are never allowed."""
    with _VOCABS_LOCK:
        per_width = _VOCABS.setdefault(tokenizer, {})
        if width not in per_width:
            per_width[width] = _build_vocabulary(tokenizer, width)
        return per_width[width]


def _build_vocabulary(tokenizer: "Tokenizer", width: int):
    llg = _llguidance()
    spec = json.loads(tokenizer.to_json())
    for added in spec.get("added_tokens", []):
        added["special"] = True  # an added token that is not special would be matched as its literal text
    vocab = llg.LLTokenizer(json.dumps(spec, ensure_ascii=False), n_vocab=width, eos_token=tokenizer.eos_id)
    leaked = [t for t, i in tokenizer.special_ids.items() if not vocab.is_special_token(i)]
    if leaked:
        raise UserError(f"{tokenizer.source}: the grammar engine reads {leaked} as text, not as special tokens")
    return vocab


# -inf for each 0 bit of a byte, 0 for each 1: bitmask bytes index it straight into an additive logit mask.
_BYTE_TO_MASK = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0.0, -np.inf).astype(np.float32)  # [256, 8]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` [V] with -inf wherever the int32 bitmask [ceil(V/32)] (bit i%32 of word i//32, i.e.
    little-endian bytes) has a 0. Built in numpy: one table lookup and one add (~0.1 ms for 129k ids) on the calling
    thread; torch would split a vector this size over its OpenMP threads, which stalls for tens of ms whenever a
    core is busy elsewhere (the grammar worker, another process)."""
    n = logits.shape[-1]
    add = _BYTE_TO_MASK.take(bitmask.numpy().view(np.uint8), axis=0).reshape(-1)[:n]  # [n] float32
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy() + add)
    return logits + torch.from_numpy(add).to(logits.device, logits.dtype)


class TokenConstraint:
    """The grammar state of one generation. `mask(logits)` -> masked copy; `accept(token)` after sampling;
    `finished`: nothing but eos can follow. Not shareable between generations or threads; `close()` ends the
    worker thread (generate_tokens does it)."""

    def __init__(self, vocab, grammar: str, eos_id: int, width: int, overlap: bool = True):
        llg = _llguidance()
        self.eos_id, self.width = eos_id, width
        self._matcher = llg.LLMatcher(vocab, grammar, log_level=0)
        self._check()
        self._bitmask = torch.zeros((width + 31) // 32, dtype=torch.int32)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edge-vl2-grammar") if overlap else None
        self._pending: Future | None = None
        self._fresh = False
        self.stats = {"steps": 0, "compute_s": 0.0, "wait_s": 0.0, "apply_s": 0.0, "max_step_s": 0.0}
        self._start_mask()  # the first mask is computed during vision + prefill

    def _check(self) -> None:
        if self._matcher.is_error():
            raise UserError(f"grammar engine: {one_line(self._matcher.get_error())}")

    def _compute(self) -> None:
        t0 = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)  # GIL released
        self.stats["compute_s"] += time.perf_counter() - t0

    def _start_mask(self) -> None:
        self._fresh = False
        if self._pool is not None and not self._matcher.is_stopped():
            self._pending = self._pool.submit(self._compute)

    def _sync(self) -> None:
        """Wait for the mask being computed: the matcher must never be used from two threads at once."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
            self._fresh = True

    def current_mask(self) -> torch.Tensor:
        """int32 [ceil(width / 32)]: bit i % 32 of word i // 32 is set when token i may come next."""
        self._sync()
        if not self._fresh:
            self._compute()
            self._fresh = True
        self._check()
        return self._bitmask

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [width] with every token the grammar forbids at -inf (a copy; the input is left as it was)."""
        t0 = time.perf_counter()
        bitmask = self.current_mask()
        t1 = time.perf_counter()
        out = apply_bitmask(logits, bitmask)
        t2 = time.perf_counter()
        self.stats["steps"] += 1
        self.stats["wait_s"] += t1 - t0
        self.stats["apply_s"] += t2 - t1
        self.stats["max_step_s"] = max(self.stats["max_step_s"], t2 - t0)
        return out

    def allowed(self, token: int) -> bool:
        word, bit = divmod(int(token), 32)
        return 0 <= token < self.width and bool((int(self.current_mask()[word]) >> bit) & 1)

    def accept(self, token: int) -> None:
        """Advance past a sampled token and start computing the next mask (overlapping the next forward pass)."""
        self._sync()
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"sampled token {token} was not allowed by the grammar: {self._matcher.get_error()}")
        self._start_mask()

    @property
    def finished(self) -> bool:
        """Nothing but eos can follow (or eos was accepted): stop without another model step."""
        self._sync()
        return self._matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The answer so far is a whole sentence of the grammar (eos would be allowed now)."""
        self._sync()
        return self._matcher.is_accepting()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def constraint_for(params, tokenizer: "Tokenizer", width: int, overlap: bool = True) -> TokenConstraint | None:
    """The constraint a SamplingParams asks for (json_schema / regex / choices), or None when it asks for none."""
    if params.json_schema is None and params.regex is None and params.choices is None:
        return None
    grammar = build_grammar(params.json_schema, params.regex, params.choices)
    return TokenConstraint(grammar_vocabulary(tokenizer, width), grammar, tokenizer.eos_id, width, overlap=overlap)


def sampling_constraint_from_response_format(response_format) -> dict:
    """OpenAI's chat-completions `response_format` -> SamplingParams keyword arguments.

    {"type": "text"} or None -> {}; {"type": "json_object"} -> any JSON object; {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}} -> that schema (checked by the grammar engine).
    Anything else is a UserError naming the value (the server answers it with a 400)."""
    if response_format is None:
        return {}
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise UserError(f"response_format must be an object with a 'type', got {response_format!r:.80}")
    kind = response_format["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise UserError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        schema = parse_schema(spec["schema"])
        build_grammar(json_schema=schema)  # refuse an unsupported schema now, as a 400, not mid-generation
        return {"json_schema": schema}
    raise UserError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")
