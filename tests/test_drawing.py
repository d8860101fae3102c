"""Drawing grounding boxes: outlines in one colour per label, labels, line width scaled to the image, written
atomically; the input image is never changed."""

import numpy as np
import pytest
from PIL import Image

from edge_vl2.drawing import PALETTE, draw_boxes, line_width, save_drawing, shrink
from edge_vl2.errors import UserError
from edge_vl2.inputs.grounding import GroundingBox, find_grounding

ANSWER = ("<|ref|>cat<|/ref|><|det|>[[100, 100, 400, 500]]<|/det|> and <|ref|>dog<|/ref|>"
          "<|det|>[[500, 500, 900, 900], [50, 600, 300, 950]]<|/det|> and <|ref|>cat<|/ref|><|det|>[[600, 50, 950, 300]]"
          "<|/det|>")


def rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture
def photo():
    return Image.new("RGB", (800, 600), (128, 128, 128))


def test_each_label_has_its_colour_and_boxes_are_outlined(photo):
    boxes = find_grounding(ANSWER, [photo.size]).boxes
    before = np.asarray(photo).copy()
    out = np.asarray(draw_boxes(photo, boxes))
    assert np.array_equal(np.asarray(photo), before)  # the caller's image is untouched
    colours = {"cat": rgb(PALETTE[0]), "dog": rgb(PALETTE[1])}
    for b in boxes:
        x1, y1, x2, y2 = b.pixel_box
        mid_y = (y1 + y2) // 2
        assert tuple(out[mid_y, x1]) == colours[b.label]  # left edge
        assert tuple(out[mid_y, x2 - 1]) == colours[b.label]  # right edge (inside the stroke)
        assert tuple(out[mid_y, (x1 + x2) // 2]) == (128, 128, 128)  # the inside stays the photo


def test_labels_are_drawn_near_their_box(photo):
    (box,) = find_grounding("<|ref|>cat<|/ref|><|det|>[[300, 300, 600, 600]]<|/det|>", [photo.size]).boxes
    out = np.asarray(draw_boxes(photo, [box]))
    x1, y1 = box.pixel_box[:2]
    band = out[y1 - 12:y1, x1:x1 + 30]  # the label sits above the box's top-left corner
    assert (band == rgb(PALETTE[0])).all(-1).mean() > 0.5  # mostly its background colour, some text
    assert not (band == rgb(PALETTE[0])).all(-1).all()


def test_line_width_follows_the_image_size():
    assert line_width((300, 200)) == 2 and line_width((4000, 3000)) == 16
    small, large = Image.new("RGB", (300, 200)), Image.new("RGB", (4000, 3000))
    for image in (small, large):
        (b,) = find_grounding("<|det|>[[100, 100, 900, 900]]<|/det|>", [image.size]).boxes
        out = np.asarray(draw_boxes(image, [b]))
        row = out[image.height // 2]
        assert (row == rgb(PALETTE[0])).all(-1).sum() == 2 * line_width(image.size)  # left + right strokes


def test_boxes_without_pixels_are_skipped(photo):
    out = draw_boxes(photo, [GroundingBox(label="x", box=(1, 2, 3, 4), pixel_box=None)])
    assert np.array_equal(np.asarray(out), np.asarray(photo))


def test_save_writes_a_readable_png_and_nothing_on_failure(tmp_path, photo):
    boxes = find_grounding(ANSWER, [photo.size]).boxes
    path = save_drawing(photo, boxes, tmp_path / "out.png")
    assert Image.open(path).size == photo.size and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(UserError, match="unknown image file type"):
        save_drawing(photo, boxes, tmp_path / "out.xyz")
    with pytest.raises(UserError, match="does not exist"):
        save_drawing(photo, boxes, tmp_path / "missing" / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_shrink_scales_the_boxes_with_the_image(photo):
    boxes = find_grounding(ANSWER, [photo.size]).boxes
    small, scaled = shrink(photo, boxes, 400)
    assert small.size == (400, 300)
    assert [s.pixel_box for s in scaled] == [tuple(round(v / 2) for v in b.pixel_box) for b in boxes]
    assert [s.box for s in scaled] == [b.box for b in boxes]  # the model's 0..999 boxes are unchanged
