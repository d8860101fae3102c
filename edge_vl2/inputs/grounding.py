"""Grounding boxes in generated text: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`.

Coordinates are integers on a 0..999 grid over the ORIGINAL image (model-facts §6.3). The official demo parser maps them
to pixels as `int(x / 999 * W)`, `int(y / 999 * H)`; that formula is used here, clamped to the image. Parsing is
lenient by design: generated text may be cut off or malformed, so bad boxes are skipped and nothing raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SPAN = re.compile(r"<\|ref\|>(?P<ref>.*?)<\|/ref\|>|<\|det\|>(?P<det>.*?)<\|/det\|>", re.DOTALL)
_BOX = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class GroundingBox:
    """One box: its label (None when no `<|ref|>` came before), the 0..999 box as generated, and the pixel box on
    the original image (None when the image size is unknown)."""

    label: str | None
    box: tuple[float, float, float, float]
    pixel_box: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict:
        """The JSON form the server and `batch` write: label, pixel box (x1, y1, x2, y2) and the 0..999 box."""
        return {"label": self.label, "box": list(self.pixel_box) if self.pixel_box is not None else None,
                "box_999": list(self.box)}


def to_pixels(box, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """0..999 box -> pixel box on a (W, H) image with the official formula, clamped to [0, W] x [0, H]."""
    W, H = image_size
    x1, y1, x2, y2 = box

    def px(v: float, n: int) -> int:
        return min(max(int(v / 999 * n), 0), n)

    return px(x1, W), px(y1, H), px(x2, W), px(y2, H)


def _parse_box(inner: str) -> tuple[float, float, float, float] | None:
    parts = [p.strip() for p in inner.split(",")]
    if len(parts) != 4 or not all(_NUMBER.fullmatch(p) for p in parts):
        return None
    vals = [float(p) for p in parts]
    if not all(math.isfinite(v) for v in vals):
        return None
    vals = [int(v) if v.is_integer() else v for v in vals]
    x1, y1, x2, y2 = vals
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> list[GroundingBox]:
    """All boxes in `text`, in order. A `<|det|>` span takes the label of the latest `<|ref|>` before it (so a
    grounded caption's several ref/det pairs, and box-only spans after a ref, each get their label).
    Malformed boxes and unclosed spans are skipped; never raises."""
    out: list[GroundingBox] = []
    if not isinstance(text, str):
        return out
    label: str | None = None
    for m in _SPAN.finditer(text):
        if m.group("ref") is not None:
            label = m.group("ref").strip()
            continue
        for b in _BOX.finditer(m.group("det")):
            box = _parse_box(b.group(1))
            if box is None:
                continue
            pixel = to_pixels(box, image_size) if image_size is not None else None
            out.append(GroundingBox(label=label, box=box, pixel_box=pixel))
    return out


def strip_grounding(text: str) -> str:
    """Readable text: `<|det|>` spans removed, `<|ref|>` markers dropped (their labels kept)."""
    text = re.sub(r"<\|det\|>.*?<\|/det\|>", "", text, flags=re.DOTALL)
    return re.sub(r"<\|/?ref\|>|<\|grounding\|>", "", text)


def format_boxes(boxes: list[GroundingBox]) -> str:
    """One line per box for the CLI: `label: [x1, y1, x2, y2]/999 -> (x1, y1, x2, y2) px`."""
    lines = []
    for b in boxes:
        norm = "[" + ", ".join(str(v) for v in b.box) + "]/999"
        where = f" -> ({', '.join(str(v) for v in b.pixel_box)}) px" if b.pixel_box is not None else ""
        lines.append(f"{b.label if b.label is not None else '(no label)'}: {norm}{where}")
    return "\n".join(lines)
