"""Grounding boxes drawn on the image they belong to: outlined, labelled, one colour per label.

Line width and label size follow the image's size (a box drawn 2 px wide disappears on a 4,000 px photo and
swamps a 300 px one). Labels use Pillow's built-in font, which has Latin glyphs only.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import UserError, one_line
from .inputs.grounding import GroundingBox

# Ten colours that stay distinguishable from each other and on photos (the "tab10" qualitative palette).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def line_width(size: tuple[int, int]) -> int:
    """~0.4 % of the longer side, at least 2 px."""
    return max(2, round(max(size) / 250))


def _font(size: tuple[int, int]) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(12, round(max(size) / 45)))


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def colour_for_labels(boxes: list[GroundingBox]) -> dict:
    """Label -> colour, in order of first appearance (the same label always gets the same colour)."""
    colours: dict = {}
    for b in boxes:
        if b.label not in colours:
            colours[b.label] = PALETTE[len(colours) % len(PALETTE)]
    return colours


def draw_boxes(image: Image.Image, boxes: list[GroundingBox]) -> Image.Image:
    """A copy of `image` (RGB) with every box that has pixel coordinates outlined and labelled."""
    out = image.convert("RGB")  # convert() always returns a new image
    draw = ImageDraw.Draw(out)
    width, font = line_width(out.size), _font(out.size)
    colours = colour_for_labels(boxes)
    for b in boxes:
        if b.pixel_box is None:
            continue
        x1, y1, x2, y2 = b.pixel_box
        colour = colours[b.label]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        if not b.label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), b.label, font=font)
        tw, th = right - left + 2 * width, bottom - top + 2 * width
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside it at the top edge
        tx = min(max(x1, 0), max(out.width - tw, 0))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        draw.text((tx + width - left, ty + width - top), b.label, fill=_text_colour(colour), font=font)
    return out


def shrink(image: Image.Image, boxes: list[GroundingBox], max_side: int) -> tuple[Image.Image, list[GroundingBox]]:
    """The image scaled so its longer side is at most `max_side`, with the pixel boxes scaled alike (for
    thumbnails; the boxes' data stays in original pixels everywhere else)."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image, boxes
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    scaled = [replace(b, pixel_box=tuple(round(v * scale) for v in b.pixel_box)) if b.pixel_box else b
              for b in boxes]
    return small, scaled


def save_drawing(image: Image.Image, boxes: list[GroundingBox], path: str | Path, max_side: int | None = None) -> Path:
    """Draw (on a copy shrunk to `max_side` when given) and write to `path` (format from its suffix) through a
    temporary file, so a failure leaves nothing."""
    path = Path(path)
    if max_side is not None:
        image, boxes = shrink(image, boxes, max_side)
    drawn = draw_boxes(image, boxes)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown image file type {path.suffix!r} (use .png or .jpg)")
    write_atomically(path, lambda f: drawn.save(f, format=fmt))
    return path


def write_atomically(path: Path, write) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`."""
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; an output file should read like any other
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({one_line(e)})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
