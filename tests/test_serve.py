"""`edge-vl2 serve` driven by the official `openai` Python client over loopback HTTP, against the test-size Tiny INT4
bundle: answers equal the in-process pipeline's, streaming follows OpenAI's chunk shape, limits answer with the
right status, a client that leaves cancels its work, and SIGTERM lets in-flight requests finish and exits 0."""

import concurrent.futures
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from edge_vl2.generate import SamplingParams
from edge_vl2.pipeline import VL2Pipeline

from _serve import API_KEY, ServerProcess, data_url, image_part, user
from conftest import IMAGES

MONDAY, GIRAFFE = data_url(IMAGES / "monday.jpg"), data_url(IMAGES / "visual_grounding_1.jpeg")


@pytest.fixture(scope="module")
def client(test_server):
    return openai.OpenAI(base_url=f"{test_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(test_server):
    """The same bundle in this process: what the server must reproduce."""
    return VL2Pipeline.from_bundle(test_server.bundle)


def test_models_and_health(client, test_server):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    health = test_server.health()
    assert health["status"] == "ready" and health["backend"] == "cpu" and health["model"] == "tiny-test"
    assert health["providers"] == ["CPUExecutionProvider"] and health["bundle"] == str(test_server.bundle)
    with pytest.raises(openai.NotFoundError, match="tiny-test"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_one_image_answer_equals_the_in_process_pipeline(client, local):
    resp = client.chat.completions.create(model="tiny-test", messages=user("Describe the image.", MONDAY),
                                          max_tokens=12)
    inputs = local.prepare("<image>\nDescribe the image.", [IMAGES / "monday.jpg"])
    expected = local.generate(inputs, SamplingParams(max_new_tokens=12))
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == ("length" if len(expected.token_ids) == 12 else "stop")
    assert resp.usage.prompt_tokens == inputs.seq_len and resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    extra = resp.model_extra
    assert extra["boxes"] == [] and extra["timings"]["vision_tiles"] == inputs.pixel_values.shape[0]


def test_streaming_chunks_and_the_vision_cache(client, local):
    """Same photo again, streamed: the text equals the non-streamed answer, the tower is skipped (all tiles from the
    cache), chunks have OpenAI's shape, the last one carries finish_reason, and usage comes when asked for."""
    kwargs = dict(model="tiny-test", messages=user("Describe the image.", MONDAY), max_tokens=12)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    timings = final.model_extra["timings"]
    assert timings["vision_tiles_cached"] == timings["vision_tiles"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)


def test_two_images_and_a_system_turn(client, local):
    messages = [{"role": "system", "content": "You compare photos."},
                {"role": "user", "content": [image_part(MONDAY), image_part(GIRAFFE),
                                             {"type": "text", "text": "What differs?"}]}]
    resp = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=8, temperature=0.7,
                                          top_p=0.9, seed=3)
    inputs = local.prepare("<image>\n<image>\nWhat differs?", [IMAGES / "monday.jpg", IMAGES / "visual_grounding_1.jpeg"],
                           system="You compare photos.")
    assert resp.usage.prompt_tokens == inputs.seq_len
    again = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=8, temperature=0.7,
                                           top_p=0.9, seed=3)
    assert again.choices[0].message.content == resp.choices[0].message.content  # the seed fixes the sample


def test_a_grounding_prompt(client, local):
    """The grounding vocabulary reaches the model as tokens under the default policy; boxes is always a list of
    {label, box (pixels), box_999}."""
    prompt = "<|ref|>The giraffe at the back<|/ref|>."
    resp = client.chat.completions.create(model="tiny-test", messages=user(prompt, GIRAFFE), max_tokens=16)
    parsed = local.prepare("<image>\n" + prompt, [IMAGES / "visual_grounding_1.jpeg"])
    assert resp.usage.prompt_tokens == parsed.seq_len
    assert local.tokenizer.ref_id in parsed.input_ids.tolist()
    boxes = resp.model_extra["boxes"]
    expected = [b.to_dict() for b in local.boxes(resp.choices[0].message.content, parsed)]
    assert boxes == expected


def test_stop_strings_cut_the_answer(client):
    full = client.chat.completions.create(model="tiny-test", messages=user("Describe.", MONDAY), max_tokens=12)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.chat.completions.create(model="tiny-test", messages=user("Describe.", MONDAY), max_tokens=12,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny-test", messages=user("Describe.", MONDAY), max_tokens=12,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.index(stop)]


def test_a_local_path_only_inside_the_allowed_folder(client, local):
    resp = client.chat.completions.create(model="tiny-test", max_tokens=4,
                                          messages=user("Describe.", f"file://{IMAGES / 'monday.jpg'}"))
    assert resp.usage.prompt_tokens == local.prepare("<image>\nDescribe.", [IMAGES / "monday.jpg"]).seq_len
    for url, match in [("/etc/passwd", "outside the allowed media folder"),
                       (f"file://{IMAGES}/../../conftest.py", "outside"),
                       ("https://example.com/cat.jpg", "offline")]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model="tiny-test", messages=user("x", url), max_tokens=4)


# Bounded fields, so that a random-weight model's answer always closes well within max_tokens (a free number or
# string could run on until the token limit cuts it, which is a "length" answer, not a grammar failure).
RECEIPT = {"type": "object", "properties": {"vendor": {"type": "string", "maxLength": 12},
                                           "total": {"type": "integer", "minimum": 0, "maximum": 9999},
                                           "paid": {"type": "boolean"}},
           "required": ["vendor", "total", "paid"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_answers_validate(client, stream):
    """OpenAI's response_format reaches the grammar: a random-weight model's answer still parses and validates
    (this proves the constraint, not the content), streamed or not, and the answer ends when the object closes."""
    jsonschema = pytest.importorskip("jsonschema")
    kwargs = dict(model="tiny-test", messages=user("Read the receipt as JSON.", MONDAY), max_tokens=200,
                  temperature=1.0, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "receipt", "schema": RECEIPT}})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        resp = client.chat.completions.create(**kwargs)
        text, finish = resp.choices[0].message.content, [resp.choices[0].finish_reason]
    assert finish == ["stop"], text
    jsonschema.validate(json.loads(text), RECEIPT)
    resp = client.chat.completions.create(model="tiny-test", messages=user("Any JSON object."), max_tokens=100,
                                          response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason in ("stop", "length")
    if resp.choices[0].finish_reason == "stop":  # an unbounded object may run to the token limit on random weights
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


@pytest.mark.parametrize("case", ["bad image", "n=2", "tools", "logprobs", "response_format", "too many images"])
def test_refusals_through_the_client(client, case):
    kwargs = dict(model="tiny-test", messages=user("Describe.", MONDAY), max_tokens=4)
    match = {"bad image": "not an image", "n=2": "one choice", "tools": "tool", "logprobs": "log probabilities",
             "response_format": "response_format", "too many images": "at most 2"}[case]
    if case == "bad image":
        kwargs["messages"] = user("Describe.", "data:image/png;base64," + "QUJD" * 100)
    elif case == "n=2":
        kwargs["n"] = 2
    elif case == "tools":
        kwargs["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    elif case == "logprobs":
        kwargs["logprobs"] = True
    elif case == "response_format":
        kwargs["response_format"] = {"type": "xml"}
    else:
        kwargs["messages"] = user("Describe.", MONDAY, MONDAY, GIRAFFE)
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"


def test_an_oversized_body_is_413(client):
    huge = "data:image/png;base64," + "A" * (3 * 2**20)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny-test", messages=user("x", huge), max_tokens=4)
    assert e.value.status_code == 413 and "2.0 MB" in e.value.message


def test_the_api_key_guards_every_route_but_health(test_server):
    for path, method in [("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/nowhere", "GET")]:
        r = httpx.request(method, test_server.url + path, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(test_server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{test_server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_a_full_queue_answers_503_at_once(test_server):
    """Queue of 2: of 6 simultaneous long requests one runs, two wait, three are refused at once with Retry-After;
    the accepted ones all finish."""
    body = {"model": "tiny-test", "messages": user("Tell a story.", MONDAY), "max_tokens": 120}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def send(_):
        t0 = time.monotonic()
        r = httpx.post(f"{test_server.url}/v1/chat/completions", json=body, headers=headers, timeout=300)
        return r, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(6)))
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert len(refused) >= 3 and all(r.status_code == 200 for r, _ in results if r.status_code != 503)
    for r, seconds in refused:
        assert r.headers["Retry-After"].isdigit() and "queue is full" in r.json()["error"]["message"]
        assert seconds < 10  # refused, not left hanging behind the running requests
    assert test_server.health()["queue"]["rejected"] >= 3


def test_a_client_that_leaves_cancels_its_request(test_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny-test", "messages": user("Tell a long story.", MONDAY), "max_tokens": 3000}
    before = test_server.health()["queue"]["cancelled"]
    with httpx.stream("POST", f"{test_server.url}/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
        httpx.post(f"{test_server.url}/v1/chat/completions", json=body, headers=headers, timeout=3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = test_server.health()["queue"]
        if queue["cancelled"] == before + 2 and not queue["running"]:
            break
        time.sleep(0.2)
    assert queue["cancelled"] == before + 2 and queue["running"] == 0 and queue["waiting"] == 0


def test_deadline_and_sigterm(tmp_path, test_server):
    """A separate server with a 4 s deadline: a request that cannot finish in time ends with 504 (or, once
    streaming, an error event); on SIGTERM a streaming answer in flight still finishes, and the process exits 0."""
    server = ServerProcess(["--bundle", test_server.bundle, "--request-timeout", "4", "--grace", "30"],
                           tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=model, messages=user("Go on.", MONDAY), max_tokens=100000)
        assert e.value.status_code == 504
        stream = client.chat.completions.create(model=model, messages=user("Hi.", MONDAY), max_tokens=40,
                                                stream=True)
        first = next(iter(stream))
        threading.Timer(0.1, server.proc.send_signal, [signal.SIGTERM]).start()
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason is not None
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log()
