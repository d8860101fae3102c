"""Grounding boxes in generated text: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`.

Coordinates are integers on a 0..999 grid over the ORIGINAL image (model-facts §6.3). The official demo parser maps them
to pixels as `int(x / 999 * W)`, `int(y / 999 * H)`; that formula is used here. With several images the boxes are on
the last one (what the official demo draws on). Parsing never raises: generated text may be cut off or malformed
(the model sometimes writes three or five numbers, or 9999), and every box that is not four numbers in 0..999 with
x1 <= x2 and y1 <= y2 is reported as skipped, with the reason, instead of being guessed into a wrong box.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# A span's text runs up to the next grounding tag, so a cut-off `<|det|>` never swallows the next ref/det pair.
_NO_TAG = r"(?:(?!<\|/?(?:ref|det)\|>).)*"
_SPAN = re.compile(rf"<\|ref\|>(?P<ref>{_NO_TAG})<\|/ref\|>|<\|det\|>(?P<det>{_NO_TAG})(?P<close><\|/det\|>)?",
                   re.DOTALL)
_BOX = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
GRID = 999  # the largest coordinate the model writes


@dataclass(frozen=True)
class GroundingBox:
    """One box: its label (None when no `<|ref|>` came before), the 0..999 box as generated, the pixel box on the
    original image and that image's index in the prompt (both None when the prompt had no image)."""

    label: str | None
    box: tuple[float, float, float, float]
    pixel_box: tuple[int, int, int, int] | None = None
    image: int | None = None

    def to_dict(self) -> dict:
        """JSON form (`run --boxes`, the API, the server): label, pixel box [x1, y1, x2, y2], image, 0..999 box."""
        return {"label": self.label, "box": list(self.pixel_box) if self.pixel_box is not None else None,
                "image": self.image, "box_999": list(self.box)}


@dataclass(frozen=True)
class SkippedBox:
    """Box text that could not be read as a box: the label it followed, the text as generated, why."""

    label: str | None
    text: str
    reason: str

    def to_dict(self) -> dict:
        return {"label": self.label, "text": self.text, "reason": self.reason}


@dataclass
class Grounding:
    boxes: list[GroundingBox] = field(default_factory=list)
    skipped: list[SkippedBox] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"boxes": [b.to_dict() for b in self.boxes], "skipped": [s.to_dict() for s in self.skipped]}


def to_pixels(box, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """0..999 box -> pixel box on a (W, H) image with the official formula, clamped to [0, W] x [0, H]."""
    W, H = image_size
    x1, y1, x2, y2 = box

    def px(v: float, n: int) -> int:
        return min(max(int(v / GRID * n), 0), n)

    return px(x1, W), px(y1, H), px(x2, W), px(y2, H)


def _parse_box(inner: str) -> tuple[tuple[float, float, float, float] | None, str]:
    """(box, "") or (None, why not)."""
    parts = [p.strip() for p in inner.split(",")]
    if len(parts) != 4:
        return None, f"expected 4 numbers, got {len(parts)}"
    if not all(_NUMBER.fullmatch(p) for p in parts):
        return None, "not a list of numbers"
    vals = [float(p) for p in parts]
    if not all(math.isfinite(v) and 0 <= v <= GRID for v in vals):
        return None, f"coordinates outside 0..{GRID}"
    x1, y1, x2, y2 = (int(v) if v.is_integer() else v for v in vals)
    if x2 < x1 or y2 < y1:
        return None, "x2 < x1 or y2 < y1"
    return (x1, y1, x2, y2), ""


def find_grounding(text: str, image_sizes=()) -> Grounding:
    """Every box in `text`, in order, on the last of `image_sizes` ((W, H) per prompt image), plus what was skipped.
    A `<|det|>` span takes the label of the latest `<|ref|>` before it (a grounded caption's several ref/det pairs,
    and box-only spans after a ref, each get their label). Never raises."""
    out = Grounding()
    if not isinstance(text, str):
        return out
    image_sizes = list(image_sizes or ())
    image = len(image_sizes) - 1 if image_sizes else None
    label: str | None = None
    for m in _SPAN.finditer(text):
        if m.group("ref") is not None:
            label = m.group("ref").strip()
            continue
        det = m.group("det")
        if m.group("close") is None:
            out.skipped.append(SkippedBox(label, det, "unclosed <|det|> span (answer cut off?)"))
            continue
        found = list(_BOX.finditer(det))
        if not found:
            out.skipped.append(SkippedBox(label, det, "no [x1, y1, x2, y2] in the <|det|> span"))
        for b in found:
            box, why = _parse_box(b.group(1))
            if box is None:
                out.skipped.append(SkippedBox(label, b.group(0), why))
                continue
            pixel = to_pixels(box, image_sizes[-1]) if image_sizes else None
            out.boxes.append(GroundingBox(label=label, box=box, pixel_box=pixel, image=image))
    return out


def parse_grounding(text: str, image_size: tuple[int, int] | None = None) -> list[GroundingBox]:
    """The boxes of `find_grounding` on one image of `image_size` (or with no pixel boxes when None)."""
    return find_grounding(text, [image_size] if image_size is not None else []).boxes


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
