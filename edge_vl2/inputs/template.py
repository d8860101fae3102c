"""The official "deepseek" prompt template, assembled piece by piece, and what typed special tokens may do.

The official processor formats a user turn as `"<|User|>: " + content.strip() + "\\n\\n<|Assistant|>:"`, splits it
at `<image>` and tokenises each piece with the tokenizer's added-token matching: a user who types `<|Assistant|>`,
the eos string or `<image>` gets the real token, so typed text can forge a turn, end the prompt or claim an image
slot. That is policy `parse`, the official behaviour and what the CLI (`run`, `chat`, `batch`) does with its
operator's own prompt. A server reads text from clients that must not control the conversation's structure, so two
stricter policies tokenise message text literally (`Tokenizer.encode_plain`):

- `grounding` (the server's default): the grounding vocabulary (`<|ref|>`, `<|/ref|>`, `<|det|>`, `<|/det|>`,
  `<|grounding|>`) is still read as tokens, because grounding prompts are written with it and it can forge neither
  roles, nor eos, nor images; every other special string is plain text.
- `escape`: every special string in message text is plain text.

Under both, images come only from image parts (`{"type": "image"}`), never from `<image>` typed in text, and the
template's own `<|User|>` / `<|Assistant|>` are the only role tokens. `tokenizers` splits text at added tokens
before BPE and encodes the runs between them independently, so text without special strings gets the same ids
under all three policies (tests/test_template.py checks it on the official fixture's prompts).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from .tokenizer import (ASSISTANT_TOKEN, DET_END_TOKEN, DET_TOKEN, GROUNDING_TOKEN, REF_END_TOKEN, REF_TOKEN,
                        USER_TOKEN, Tokenizer)

SPECIAL_TOKEN_POLICIES = ("parse", "grounding", "escape")
GROUNDING_TOKENS = (REF_TOKEN, REF_END_TOKEN, DET_TOKEN, DET_END_TOKEN, GROUNDING_TOKEN)
IMAGE_PART = {"type": "image"}  # an image slot in list content; the image itself is passed separately


def check_policy(policy: str) -> str:
    if policy not in SPECIAL_TOKEN_POLICIES:
        raise UserError(f"special-token policy {policy!r}: expected one of {', '.join(SPECIAL_TOKEN_POLICIES)}")
    return policy


def content_items(content, policy: str, tag: str, where: str) -> str | list:
    """A message's content in the form its policy tokenises: `parse` -> one string with `tag` where each image goes
    (list content flattened); `grounding` / `escape` -> a list of text strings and IMAGE_PART (a string is one text
    part, any `tag` in it is text)."""
    if isinstance(content, str):
        return content if policy == "parse" else [content]
    if not isinstance(content, (list, tuple)):
        raise UserError(f"{where}: content must be a string or a list of parts")
    items = []
    for k, part in enumerate(content):
        if isinstance(part, str):
            items.append(part)
        elif isinstance(part, dict) and part.get("type") == "image":
            items.append(IMAGE_PART)
        else:
            raise UserError(f"{where}: part {k} must be a string or {{'type': 'image'}}")
    items = _own_lines(items)
    return "".join(tag if p is IMAGE_PART else p for p in items) if policy == "parse" else items


def _own_lines(items: list) -> list:
    """Each image part on a line of its own: a newline after it unless it ends the content or one follows already.
    So `[image, "Describe."]` is the official demo's `"<image>\nDescribe."`, as `run` writes an untagged prompt
    (and as vLLM lays out image parts)."""
    out = []
    for k, p in enumerate(items):
        out.append(p)
        nxt = items[k + 1] if k + 1 < len(items) else None
        if p is IMAGE_PART and nxt is not None and not (isinstance(nxt, str) and nxt.startswith("\n")):
            out.append("\n")
    return out


def count_images(items, tag: str) -> int:
    return items.count(tag) if isinstance(items, str) else sum(p is IMAGE_PART for p in items)


def _strip(items: list) -> list:
    """`content.strip()` of the official template on a parts list: merge adjacent text, strip both ends."""
    merged: list = []
    for p in items:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += p
        else:
            merged.append(p)
    if merged and isinstance(merged[0], str):
        merged[0] = merged[0].lstrip()
    if merged and isinstance(merged[-1], str):
        merged[-1] = merged[-1].rstrip()
    return [p for p in merged if p != ""]


class PromptBuilder:
    """Token ids, image mask, tiles and the readable text of a prompt, appended turn by turn under a policy."""

    def __init__(self, tok: Tokenizer, policy: str = "parse"):
        self.tok, self.policy = tok, check_policy(policy)
        self.ids, self.mask, self.parts = [tok.bos_id], [False], [tok.bos_token]
        self.tiles: list[torch.Tensor] = []
        self.crops: list[list[int]] = []
        self.counts: list[int] = []
        kept = GROUNDING_TOKENS if policy == "grounding" else ()
        self._kept = re.compile("|".join(map(re.escape, kept))) if kept else None

    # ---- turns ------------------------------------------------------------------------------------------------

    def user_turn(self, items, tag: str, add_image) -> None:
        """`<|User|>: content\\n\\n<|Assistant|>:`; `add_image(builder)` appends the next image at each slot."""
        if self.policy == "parse":
            content = items.strip()
            # conv.get_prompt() of the "deepseek" template with an empty assistant message.
            formatted = (f"{USER_TOKEN}: {content}\n\n" if content else f"{USER_TOKEN}:") + f"{ASSISTANT_TOKEN}:"
            segments = formatted.split(tag)
            for k, seg in enumerate(segments):
                self.text(seg)
                if k < len(segments) - 1:
                    add_image(self)
            return
        items = _strip(items)
        pieces: list = [self.tok.user_id, ": " if items else ":"]
        for p in items:
            if p is IMAGE_PART:
                self._flush(pieces)
                add_image(self)
                pieces = []
            else:
                pieces += self._user_text(p)
        self._flush(pieces + (["\n\n"] if items else []) + [self.tok.assistant_id, ":"])

    def answer(self, text) -> None:
        """A past assistant answer: its stripped text and eos."""
        self.plain_turn(text)
        self.eos()

    def plain_turn(self, text) -> None:
        """System text or an answer's text: raw, no template (official)."""
        if self.policy == "parse":
            self.text(text.strip())
        else:
            self._flush(self._user_text("".join(_strip(text))))

    # ---- pieces -----------------------------------------------------------------------------------------------

    def _user_text(self, text: str) -> list:
        """Message text as pieces: plain strings, and ids of the special tokens the policy lets through."""
        if self._kept is None:
            return [text]
        out, pos = [], 0
        for m in self._kept.finditer(text):
            out += [text[pos:m.start()], self.tok.special_ids[m.group()]]
            pos = m.end()
        return out + [text[pos:]]

    def _flush(self, pieces: list) -> None:
        """Encode pieces: adjacent strings joined and read as plain text, ids appended as they are."""
        run: list[str] = []
        for p in pieces + [None]:
            if isinstance(p, str):
                run.append(p)
                continue
            text = "".join(run)
            if text:
                ids = self.tok.encode_plain(text)
                self.ids += ids
                self.mask += [False] * len(ids)
                self.parts.append(text)
            run = []
            if p is not None:
                self.ids.append(p)
                self.mask.append(False)
                self.parts.append(self.tok.id_to_token(p))

    def text(self, s: str) -> None:
        """A text segment, tokenised on its own with every special token parsed (official: the prompt is split at
        each `<image>`)."""
        if s:
            t = self.tok.encode(s)
            self.ids += t
            self.mask += [False] * len(t)
            self.parts.append(s)

    def image(self, tiles: torch.Tensor, tw: int, th: int, n_tokens: int, image_id: int, tag: str) -> None:
        self.tiles.append(tiles)
        self.crops.append([tw, th])
        self.counts.append(n_tokens)
        self.ids += [image_id] * n_tokens
        self.mask += [True] * n_tokens
        self.parts.append(tag)

    def eos(self) -> None:
        self.ids.append(self.tok.eos_id)
        self.mask.append(False)
        self.parts.append(self.tok.eos_token)

    def drop_last(self) -> None:
        self.ids.pop()
        self.mask.pop()
        self.parts.pop()
