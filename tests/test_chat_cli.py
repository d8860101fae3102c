"""`edge-vl2 chat` through a pseudo-terminal, as a user types it: attach an image, two turns (the second one's image
tiles come from the vision cache), Ctrl-C stops an answer but not the session, /save, /reset, /quit."""

import json
import sys

import pexpect
import pytest
from PIL import Image

from conftest import IMAGES, REPO, TINY_LIKE, default_sigint


@pytest.fixture
def chat():
    # 200 tokens an answer: the one the test interrupts must still be running when Ctrl-C lands (the tiny-like model
    # decodes ~600 tok/s on a quiet machine: 12 tokens were over before the ^C arrived)
    child = pexpect.spawn(sys.executable, ["-m", "edge_vl2.cli", "chat", "--model", str(TINY_LIKE), "--dtype", "fp32",
                                           "--max-new-tokens", "200", "--stats"],
                          cwd=str(REPO), encoding="utf-8", timeout=240, dimensions=(50, 200), preexec_fn=default_sigint)
    yield child
    child.close(force=True)


def ask(child, text):
    child.sendline(text)
    child.expect("model> ")
    child.expect(r"prompt (\d+) tokens .*decode [\d.]+ tok/s")
    stats = child.match.group(0)
    child.expect("you> ")
    return stats


def test_a_session(chat, tmp_path):
    photo = tmp_path / "photo.png"  # small: one tile + the global view, so each turn is quick
    Image.open(IMAGES / "visual_grounding_1.jpeg").resize((320, 240)).save(photo)
    chat.expect("you> ")
    chat.sendline(f"/image {photo}")
    chat.expect(r"attached .*photo.png, 320x240")
    chat.expect("you> ")
    first = ask(chat, "What is in the photo?")
    assert "from the vision cache" not in first
    second = ask(chat, "And what colour is it?")
    assert "tiles, " in second and "from the vision cache" in second  # the tower was skipped
    assert int(second.split()[1]) > int(first.split()[1])  # the history grew
    chat.sendline(f"/image {IMAGES / 'monday.jpg'}")  # a new 7-tile photo: seconds of vision before any text
    chat.expect("you> ")
    chat.sendline("Tell me everything, at length.")
    chat.expect("model> ")
    chat.sendintr()
    chat.expect(r"\[stopped\]")
    chat.expect("you> ")
    saved = tmp_path / "chat.json"
    chat.sendline(f"/save {saved}")
    chat.expect(r"saved 6 messages")
    chat.expect("you> ")
    msgs = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 and msgs[-1]["stopped"] is True
    assert msgs[0]["images"] == [str(photo.resolve())] and msgs[4]["images"] == [str(IMAGES / "monday.jpg")]
    chat.sendline("/reset")
    chat.expect(r"conversation cleared")
    chat.expect("you> ")
    third = ask(chat, "Hello?")
    assert int(third.split()[1]) < int(first.split()[1]) and "(0 image)" in third
    chat.sendline("/image /no/such.jpg")
    chat.expect("error: /no/such.jpg: image file not found")
    chat.expect("you> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in chat.before
