"""Grounding parser: official pixel formula int(x/999*W), several spans and boxes, never raises."""

import pytest

from edge_vl2.inputs.grounding import GroundingBox, format_boxes, parse_grounding, strip_grounding, to_pixels

README = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|><｜end▁of▁sentence｜>"


def test_readme_example_on_640x480():
    (b,) = parse_grounding(README, (640, 480))
    assert b.label == "The giraffe at the back."
    assert b.box == (580, 270, 999, 900)
    want = (int(580 / 999 * 640), int(270 / 999 * 480), int(999 / 999 * 640), int(900 / 999 * 480))
    assert b.pixel_box == want == (371, 129, 640, 432)


def test_several_boxes_and_spans():
    text = ("<|ref|>Watermelon slices<|/ref|><|det|>[[10, 20, 30, 40], [500,500,999,999]]<|/det|> and "
            "<|ref|>a knife<|/ref|><|det|>[[0, 0, 100, 100]]<|/det|><|det|>[[1, 1, 2, 2]]<|/det|>")
    boxes = parse_grounding(text, (1000, 500))
    assert [b.label for b in boxes] == ["Watermelon slices", "Watermelon slices", "a knife", "a knife"]
    assert boxes[1].pixel_box == (500, 250, 1000, 500)
    assert boxes[2].box == (0, 0, 100, 100)
    assert strip_grounding(text) == "Watermelon slices and a knife"


def test_box_without_ref_and_without_image_size():
    (b,) = parse_grounding("<|det|>[[1, 2, 3, 4]]<|/det|>")
    assert b == GroundingBox(label=None, box=(1, 2, 3, 4), pixel_box=None)


def test_out_of_range_values_are_clamped_to_the_image():
    assert to_pixels((0, 0, 1500, 999), (100, 50)) == (0, 0, 100, 50)


@pytest.mark.parametrize("text", [
    "",
    "no grounding at all",
    "<|ref|>cut off<|/ref|><|det|>[[580, 270, 999",
    "<|ref|>x<|/ref|><|det|>[[580, 270, 999]]<|/det|>",
    "<|ref|>x<|/ref|><|det|>[[a, b, c, d]]<|/det|>",
    "<|ref|>x<|/ref|><|det|>[[900, 0, 100, 10]]<|/det|>",
    "<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4, 5]]<|/det|>",
    "<|ref|>x<|/ref|><|det|>[[__import__('os'), 1, 2, 3]]<|/det|>",
    "<|ref|>x<|/ref|><|det|>[[nan, inf, 1, 2]]<|/det|>",
    "<|det|><|/det|><|ref|><|/ref|>",
])
def test_malformed_input_yields_no_boxes(text):
    assert parse_grounding(text, (640, 480)) == []


def test_malformed_box_is_skipped_next_to_a_good_one():
    boxes = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2], [1, 2, 3, 4]]<|/det|>", (999, 999))
    assert [b.pixel_box for b in boxes] == [(1, 2, 3, 4)]


def test_format_boxes():
    out = format_boxes(parse_grounding(README, (640, 480)))
    assert out == "The giraffe at the back.: [580, 270, 999, 900]/999 -> (371, 129, 640, 432) px"
