"""Bad input over HTTP: each gets the right 4xx in OpenAI's error JSON with a one-line message that names the field,
the server keeps answering, and its log holds no traceback (only a genuine 500 logs one, and none of these inputs
provokes a 500)."""

import base64
import io

import httpx
import pytest
from PIL import Image

from _serve import API_KEY, data_url, image_part, user
from conftest import IMAGES

MONDAY = data_url(IMAGES / "monday.jpg")


def png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def truncated_jpeg() -> str:
    data = (IMAGES / "monday.jpg").read_bytes()
    return "data:image/jpeg;base64," + base64.b64encode(data[: len(data) // 3]).decode()


def body(**over):
    return {"model": "tiny-test", "messages": user("Describe.", MONDAY), "max_tokens": 4, **over}


# (name, request body or raw bytes, status, words the message must contain)
CASES = [
    ("malformed JSON", b'{"model": "tiny-test", "messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, 400, "nests too deeply"),
    ("no messages", {"model": "tiny-test"}, 400, "messages"),
    ("empty messages", body(messages=[]), 400, "non-empty list"),
    ("messages not a list", body(messages="hi"), 400, "non-empty list"),
    ("message not an object", body(messages=["hi"]), 400, "messages[0]"),
    ("unknown role", body(messages=[{"role": "bot", "content": "hi"}]), 400, "unknown role 'bot'"),
    ("role of the wrong type", body(messages=[{"role": ["user"], "content": "hi"}]), 400, "unknown role"),
    ("tool role", body(messages=[{"role": "tool", "content": "x"}]), 400, "tool calling"),
    ("content missing", body(messages=[{"role": "user"}]), 400, "content is missing"),
    ("content a number", body(messages=[{"role": "user", "content": 5}]), 400, "string or a list"),
    ("part without type", body(messages=[{"role": "user", "content": [{"text": "x"}]}]), 400, "content part type"),
    ("audio part", body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, "input_audio"),
    ("text part of the wrong type", body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), 400,
     "text part"),
    ("image in a system message", body(messages=[{"role": "system", "content": [image_part(MONDAY)]},
                                                 {"role": "user", "content": "x"}]), 400, "only be in user"),
    ("system not first", body(messages=[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]), 400,
     "system message may only come first"),
    ("ends with a system message", body(messages=[{"role": "system", "content": "y"}]), 400, "no user message"),
    ("temperature a string", body(temperature="hot"), 400, "temperature"),
    ("temperature NaN", b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     400, "temperature"),
    ("top_p zero", body(top_p=0), 400, "top_p"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens a float", body(max_tokens=2.5), 400, "max_tokens"),
    ("max_tokens huge", body(max_tokens=10**30), 400, "max_tokens"),
    ("both max_tokens", body(max_completion_tokens=3), 400, "not both"),
    ("seed a string", body(seed="1"), 400, "seed"),
    ("stream a string", body(stream="yes"), 400, "stream"),
    ("stop of numbers", body(stop=[1, 2]), 400, "stop"),
    ("five stops", body(stop=list("abcde")), 400, "stop"),
    ("unknown field", body(temprature=0.5), 400, "unknown field 'temprature'"),
    ("model missing", {"messages": user("x")}, 400, "model"),
    ("model unknown", body(model="gpt-4o"), 404, "not served here"),
    ("n=3", body(n=3), 400, "one choice"),
    ("presence penalty", body(presence_penalty=0.5), 400, "repetition_penalty"),
    ("bad base64", body(messages=user("x", "data:image/png;base64,@@@not-base64@@@")), 400, "not valid base64"),
    ("data URL not an image", body(messages=user("x", "data:text/plain;base64,aGVsbG8=")), 400, "not an image"),
    ("data URL without base64", body(messages=user("x", "data:image/png,abc")), 400, "base64"),
    ("image URL not a string", body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 7}}]}]), 400, "data: URL"),
    ("corrupt image", body(messages=user("x", "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n"
                                                                                            + b"\0" * 64).decode())),
     400, "image"),
    ("truncated image", body(messages=user("x", truncated_jpeg())), 400, "corrupt or truncated"),
    ("zero bytes", body(messages=user("x", "data:image/png;base64,")), 400, "no bytes"),
    ("too many pixels", body(messages=user("x", png(6000, 4100))), 400, "MP"),
    ("too many images", body(messages=user("x", MONDAY, MONDAY, MONDAY)), 400, "at most 2"),
    ("fewer images than tags", body(messages=[{"role": "user", "content": "<image> what?"}]), 200, ""),
    ("ftp URL", body(messages=user("x", "ftp://host/a.png")), 400, "unsupported URL scheme"),
    ("prompt over the context", body(messages=user("word " * 5000)), 400, "context"),
    ("wrong method", None, 405, "not allowed"),
    ("unknown route", None, 404, "no route"),
]


@pytest.fixture(scope="module")
def http(test_server):
    with httpx.Client(base_url=test_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.mark.parametrize("name,payload,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_with_one_line(http, name, payload, status, words):
    if name == "wrong method":
        r = http.get("/v1/chat/completions")
    elif name == "unknown route":
        r = http.post("/v1/completions", json=body())
    elif isinstance(payload, bytes):
        r = http.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text[:300]
    if status == 200:  # a typed "<image>" is text under the default policy: not an error at all
        return
    error = r.json()["error"]
    assert words in error["message"] and "\n" not in error["message"] and len(error["message"]) < 400
    assert set(error) == {"message", "type", "param", "code"} and error["type"]


def test_the_server_keeps_serving_and_logged_no_traceback(http, test_server):
    """Run after the cases above (same module, same server): a good request still works, nothing was a 500, and the
    log holds one line per refusal but no traceback."""
    r = http.post("/v1/chat/completions", json=body())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    log = test_server.log()
    assert "Traceback" not in log and " 500 " not in log and "internal error" not in log
    assert test_server.health()["queue"]["failed"] == 0
