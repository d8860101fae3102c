"""Conversation: each turn is the official template over the whole history, later turns reuse the image's encoded
tiles, history is trimmed oldest-first to fit, a stopped answer stays, and /save writes it as JSON. Reference mode on
the official fixture checkpoint."""

import json

import pytest

from edge_vl2.conversation import Conversation
from edge_vl2.errors import UserError
from edge_vl2.generate import SamplingParams
from edge_vl2.pipeline import VL2Pipeline

from conftest import IMAGES, TINY_LIKE

A, B = IMAGES / "monday.jpg", IMAGES / "visual_grounding_1.jpeg"
SHORT = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def vl2():
    return VL2Pipeline.from_pretrained(TINY_LIKE, dtype="fp32")


@pytest.fixture
def conv(vl2):
    vl2.vision_cache = None
    return Conversation(vl2, system="Be brief.")


def test_turns_follow_the_official_template(conv, vl2):
    conv.attach(A)
    first = conv.ask_all("What is this?", SHORT)
    second = conv.ask_all("Why?", SHORT)
    expected = vl2.processor.process([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": ""}], [A])
    assert second.inputs.input_ids.tolist() == expected.input_ids.tolist()
    assert second.inputs.pixel_values.equal(expected.pixel_values)
    assert first.completion_tokens == 6 and second.prompt_tokens == expected.seq_len


def test_the_second_turn_skips_the_vision_tower(conv):
    conv.attach(A)
    first = conv.ask_all("What is this?", SHORT)
    second = conv.ask_all("And the colour?", SHORT)
    assert first.timings["vision_tiles_cached"] == 0
    assert second.timings["vision_tiles_cached"] == second.timings["vision_tiles"] == first.timings["vision_tiles"]


def test_oldest_turns_are_dropped_to_fit(vl2):
    """A 2,000-token budget holds one tiled photo (1,429 tokens for monday.jpg) but not two: asking about B drops the
    turn about A, and the line count says so."""
    conv = Conversation(vl2, max_context=2000, reserve_tokens=64)
    conv.attach(A)
    conv.ask_all("What is this?", SHORT)
    conv.attach(B)
    result = conv.ask_all("And this one?", SHORT)
    assert result.dropped_turns == 1 and conv.dropped_turns == 1
    assert [t.question for t in conv.turns] == ["And this one?"] and len(result.inputs.num_image_tokens) == 1
    assert result.prompt_tokens <= 2000 - 64
    conv.reset()
    conv.ask_all("Hello?", SHORT)
    conv.attach(A)
    conv.attach(A)  # two tiled copies, 2 x 1,415 image tokens, do not fit even alone
    with pytest.raises(UserError, match="context is 2000"):
        conv.ask("Both?", SHORT)
    assert len(conv.pending) == 2 and [t.question for t in conv.turns] == ["Hello?"]  # nothing changed


def test_a_stopped_answer_stays_in_the_history_and_the_save(conv, tmp_path):
    stream = conv.ask("Tell me a long story.", SamplingParams(max_new_tokens=50))
    shown = next(stream) + next(stream)
    stream.close()
    assert conv.turns[-1].answer == shown and not conv.turns[-1].complete
    conv.attach(B)
    conv.ask_all("<image>\nAnd this?", SHORT)
    saved = json.loads(conv.save(tmp_path / "chat.json").read_text())
    msgs = saved["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2] == {"role": "assistant", "content": shown, "stopped": True}
    assert msgs[3]["images"] == [str(B.resolve())] and msgs[4]["content"] == conv.turns[-1].answer
    conv.reset()
    assert conv.to_dict()["messages"] == [{"role": "system", "content": "Be brief."}]


def test_a_bad_image_fails_when_attached(conv, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="bad.jpg"):
        conv.attach(bad)
    assert conv.pending == []
