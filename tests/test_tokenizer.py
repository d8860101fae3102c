"""Tokenizer: special ids read from the tokenizer (never hard-coded), and a streaming detokenizer that reproduces
`decode(all ids)` without ever showing half a UTF-8 character."""

import json
from pathlib import Path

import pytest

from edge_vl2.errors import UserError
from edge_vl2.inputs.tokenizer import Tokenizer

from conftest import OFFICIAL, TINY_LIKE

FIXTURE, CKPT = OFFICIAL, TINY_LIKE

TEXTS = [
    "Ça va? 🐱🐶 猫が好き — naïve café, 😀👍🏽 日本語テキスト",
    "Emoji only: 👨‍👩‍👧‍👦🏳️‍🌈🤖",
    "Mixed <|ref|>Größe<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> 中文 ñandú Ελληνικά русский",
    "plain ascii, numbers 1234567 and punctuation!?",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(CKPT)


def stream_all(tok, ids, **kw):
    s = tok.stream(**kw)
    pieces = [s.add(i) for i in ids]
    pieces.append(s.flush())
    return pieces


def test_special_ids_come_from_the_tokenizer(tok):
    manifest = json.loads((FIXTURE / "MANIFEST.json").read_text())
    want = manifest["models"]["tiny-like"]["special_token_ids"]
    assert tok.special_ids == want
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (0, 1, 2, 1008)
    assert (tok.ref_id, tok.ref_end_id, tok.det_id, tok.det_end_id) == (1009, 1010, 1011, 1012)
    assert (tok.grounding_id, tok.user_id, tok.assistant_id) == (1013, 1014, 1015)
    assert len(tok) == manifest["models"]["tiny-like"]["len_tokenizer"]


def test_encode_has_no_bos_and_decode_keeps_special_tokens(tok):
    text = "<|User|>: hi<|ref|>cat<|/ref|>"
    ids = tok.encode(text)
    assert ids[0] == tok.user_id and tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ": hicat"


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_reproduces_decode_without_replacement_chars(tok, text):
    ids = tok.encode(text)
    full = tok.decode(ids)
    assert full == text
    pieces = stream_all(tok, ids)
    assert "".join(pieces) == full
    assert not any("\ufffd" in p for p in pieces)
    if not text.isascii():  # multi-byte characters really are split across tokens: the hold-back was exercised
        assert any(p == "" for p in pieces[:-1])


def test_streaming_with_skipped_special_tokens(tok):
    ids = tok.encode(TEXTS[2]) + [tok.eos_id]
    pieces = stream_all(tok, ids, skip_special_tokens=True)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_streaming_official_generations_with_invalid_bytes(tok):
    """Random-weight generations contain truly invalid UTF-8: the stream still ends equal to decode()."""
    for case in ("img1_grounding", "text_only"):
        meta = json.loads((FIXTURE / "tiny-like" / f"{case}.json").read_text())
        assert tok.decode(meta["gen_ids"]) == meta["gen_text"]
        assert "".join(stream_all(tok, meta["gen_ids"])) == meta["gen_text"]


def test_flush_returns_an_incomplete_character(tok):
    ids = tok.encode("a🐱")
    s = tok.stream()
    out = "".join(s.add(i) for i in ids[:-1])
    assert out == "a"
    assert s.flush().startswith("\ufffd")


def test_missing_or_invalid_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad)


def test_tokenizer_without_a_special_token_is_a_user_error(tmp_path):
    d = json.loads((CKPT / "tokenizer.json").read_text(encoding="utf-8"))
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<|det|>"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(UserError, match=r"<\|det\|>"):
        Tokenizer.from_file(path)
