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


# --- skipped box text, several images, the JSON form ----------------------------------------------------------------

from edge_vl2.inputs.grounding import Grounding, SkippedBox, find_grounding  # noqa: E402


@pytest.mark.parametrize("det, reason", [
    ("[[580, 270, 9999, 900]]", "outside 0..999"),
    ("[[-1, 270, 999, 900]]", "outside 0..999"),
    ("[[580, 270, 999]]", "expected 4 numbers, got 3"),
    ("[[1, 2, 3, 4, 5]]", "expected 4 numbers, got 5"),
    ("[[900, 0, 100, 10]]", "x2 < x1"),
    ("[[a, b, c, d]]", "not a list of numbers"),
    ("580, 270, 999, 900", "no [x1, y1, x2, y2]"),
])
def test_bad_box_text_is_reported_as_skipped_never_as_a_box(det, reason):
    g = find_grounding(f"<|ref|>cat<|/ref|><|det|>{det}<|/det|>", [(640, 480)])
    assert g.boxes == []
    (s,) = g.skipped
    assert s.label == "cat" and reason in s.reason


def test_a_cut_off_span_is_skipped_and_does_not_swallow_the_next_pair():
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]<|ref|>b<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|> end <|det|>[[1, 2"
    g = find_grounding(text, [(999, 999)])
    assert [(b.label, b.box) for b in g.boxes] == [("b", (5, 6, 7, 8))]
    assert [(s.label, s.reason.split(" ")[0]) for s in g.skipped] == [("a", "unclosed"), ("b", "unclosed")]


def test_good_and_bad_boxes_in_one_span():
    g = find_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3], [10, 20, 30, 40], [0, 0, 1000, 5]]<|/det|>", [(999, 999)])
    assert [b.pixel_box for b in g.boxes] == [(10, 20, 30, 40)]
    assert [s.text for s in g.skipped] == ["[1, 2, 3]", "[0, 0, 1000, 5]"]


def test_grounded_caption_with_several_refs():
    """A `<|grounding|>` answer: refs inside running text, each with its own boxes."""
    text = ("<|ref|>A man<|/ref|><|det|>[[100, 200, 400, 999]]<|/det|> walks <|ref|>two dogs<|/ref|>"
            "<|det|>[[500, 600, 700, 999], [720, 610, 900, 990]]<|/det|> past <|ref|>a bench<|/ref|>"
            "<|det|>[[0, 700, 90, 800]]<|/det|>.")
    g = find_grounding(text, [(999, 500)])
    assert [b.label for b in g.boxes] == ["A man", "two dogs", "two dogs", "a bench"]
    assert g.boxes[1].pixel_box == (500, int(600 / 999 * 500), 700, 500)
    assert strip_grounding(text) == "A man walks two dogs past a bench."


def test_two_images_boxes_are_on_the_last_one():
    g = find_grounding(README, [(1000, 1000), (640, 480)])
    (b,) = g.boxes
    assert b.image == 1 and b.pixel_box == (371, 129, 640, 432)


def test_json_form():
    g = find_grounding(README + "<|det|>[[1, 2, 3]]<|/det|>", [(640, 480)])
    assert g.to_dict() == {
        "boxes": [{"label": "The giraffe at the back.", "box": [371, 129, 640, 432], "image": 0,
                   "box_999": [580, 270, 999, 900]}],
        "skipped": [{"label": "The giraffe at the back.", "text": "[1, 2, 3]", "reason": "expected 4 numbers, got 3"}],
    }
    assert Grounding().to_dict() == {"boxes": [], "skipped": []}
    assert SkippedBox(None, "[]", "why").to_dict()["label"] is None


def test_pipeline_grounding_uses_the_last_prompt_image():
    """Through the real processor: a two-image prompt's boxes are in pixels of the second image."""
    from PIL import Image

    from edge_vl2.inputs.processor import Processor
    from edge_vl2.pipeline import VL2Pipeline

    from conftest import IMAGES, TINY_LIKE

    first, second = IMAGES / "multi_image_1.jpeg", IMAGES / "visual_grounding_1.jpeg"
    inputs = Processor.from_pretrained(TINY_LIKE).process_prompt(
        "<image>\n<image>\n<|ref|>The giraffe at the back.<|/ref|>.", [first, second])
    g = VL2Pipeline.grounding(README, inputs)
    size = Image.open(second).size
    assert [b.image for b in g.boxes] == [1] and g.boxes[0].pixel_box == to_pixels((580, 270, 999, 900), size)
