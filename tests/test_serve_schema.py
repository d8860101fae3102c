"""The server's pieces without HTTP: request validation maps OpenAI messages onto the processor's conversation form,
stop strings never leak (also split over tokens), finish_reason agrees with what generate_tokens really does, and
image URLs are decoded or refused with the field named."""

import base64

import pytest
import torch

from edge_vl2.generate import SamplingParams, finish_reason, generate_tokens
from edge_vl2.inputs.template import IMAGE_PART
from edge_vl2.pipeline import VL2Pipeline
from edge_vl2.serve.config import ServeConfig
from edge_vl2.serve.engine import StopMatcher
from edge_vl2.serve.errors import ApiError
from edge_vl2.serve.media import load_image_url
from edge_vl2.serve.schema import parse_chat_request

from conftest import IMAGES, TINY_LIKE

CONFIG = ServeConfig()


def parse(**body):
    return parse_chat_request({"model": "m", **body}, CONFIG, "m")


def test_messages_map_onto_the_processor_form():
    req = parse(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AA==", "detail": "low"}}, {"type": "text", "text": "b"}], "name": "kim"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "next"}], max_completion_tokens=7, stop="###", seed=-1, top_k=5)
    assert req.messages == [{"role": "system", "content": ["Be brief."]},
                            {"role": "user", "content": ["a", IMAGE_PART, "b"]},
                            {"role": "assistant", "content": ["ok"]}, {"role": "user", "content": ["next"]}]
    assert [i.param for i in req.images] == ["messages[1].content[1].image_url.url"]
    assert req.sampling == SamplingParams(max_new_tokens=7, temperature=0.0, top_k=5, seed=2**63 - 1)
    assert req.stop == ("###",) and not req.stream


def test_defaults_are_greedy_and_the_configured_length():
    req = parse(messages=[{"role": "user", "content": "hi"}])
    assert req.sampling == SamplingParams(max_new_tokens=CONFIG.default_max_tokens)


@pytest.mark.parametrize("body,param", [
    ({"n": 2}, "n"), ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"top_logprobs": 2}, "logprobs"), ({"stream_options": {}}, "stream_options"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_refusals_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse(**{"messages": [{"role": "user", "content": "hi"}], **body})
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("pieces,stops,out", [
    (["Hello", " wor", "ld###", "more"], ("###",), "Hello world"),
    (["a#", "#", "#b"], ("###",), "a"),
    (["ab", "c"], ("bc", "abc"), ""),  # the earliest match wins
    (["x#", "y"], ("##",), "x#y"),  # a held-back prefix that did not become a stop is sent
    (["done"], (), "done"),
])
def test_stop_strings_never_leak(pieces, stops, out):
    m = StopMatcher(stops)
    sent = "".join(m.feed(p) for p in pieces) + m.flush()
    assert sent == out and all(s not in sent for s in stops)


@pytest.fixture(scope="module")
def vl2():
    return VL2Pipeline.from_pretrained(TINY_LIKE, dtype="fp32")


@pytest.mark.parametrize("room", [1, 3])
def test_finish_reason_matches_generation_at_the_context_end(vl2, room):
    """A prompt `room` tokens short of the context: generate_tokens stops when the cache is full, before
    max_new_tokens; finish_reason must call that "length" (and one token fewer "stop", an eos)."""
    lm = vl2.model.language
    context = lm.cfg.max_position_embeddings
    ids = torch.randint(0, 1000, (context - room,), generator=torch.Generator().manual_seed(room))
    embeds = lm.model.embed_tokens(ids)
    params = SamplingParams(max_new_tokens=50, temperature=1.0, seed=1)
    n = sum(1 for _ in generate_tokens(lm, embeds, ids, params, eos_id=-1))  # -1: never an eos
    assert n < 50
    assert finish_reason(n, len(ids), 50, context) == "length"
    assert finish_reason(n - 1, len(ids), 50, context) == "stop"
    assert finish_reason(50, 10, 50, context) == "length" and finish_reason(49, 10, 50, context) == "stop"


def test_image_urls(tmp_path):
    data = (IMAGES / "monday.jpg").read_bytes()
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    image = load_image_url(url, "p", 10**8, None)
    assert image.mode == "RGB"
    with pytest.raises(ApiError, match="^p: .*over the 0 MP limit"):
        load_image_url(url, "p", 1, None)
    (tmp_path / "a.jpg").write_bytes(data)
    assert load_image_url("a.jpg", "p", 10**8, tmp_path).size == image.size
    assert load_image_url(f"file://{tmp_path}/a.jpg", "p", 10**8, tmp_path).size == image.size
    (tmp_path / "link.jpg").symlink_to(IMAGES / "monday.jpg")
    with pytest.raises(ApiError, match="outside"):
        load_image_url("link.jpg", "p", 10**8, tmp_path)
    with pytest.raises(ApiError, match="local file paths are refused"):
        load_image_url("a.jpg", "p", 10**8, None)
