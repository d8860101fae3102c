"""Constrained decoding: every answer under a JSON Schema parses and validates, regex and choice answers match,
special tokens never appear inside an answer, eos only where the answer is complete, and the grammar state follows
tokens (bytes), so characters split over byte tokens (CJK, emoji) survive the streaming detokenizer.

Models here have random weights: the outputs prove the constraint, not the content. The 50-schema test runs the
official-code fixture checkpoint (1,016-id vocabulary); the synthetic Tiny checkpoint has the real 129,280-row
vocabulary with the real special-token ids.
"""

import json
import re
from decimal import Decimal

import jsonschema
import pytest
import torch

from edge_vl2 import SamplingParams, VL2Pipeline
from edge_vl2.constrain import (TokenConstraint, apply_bitmask, build_grammar, grammar_vocabulary,
                                sampling_constraint_from_response_format)
from edge_vl2.errors import UserError

import _toolchain
from _schemas import RECEIPT, random_schemas
from conftest import TINY_LIKE


@pytest.fixture(scope="module")
def small_vocab() -> VL2Pipeline:
    return VL2Pipeline.from_pretrained(TINY_LIKE, dtype="fp32")


@pytest.fixture(scope="module")
def real_vocab() -> VL2Pipeline:
    return VL2Pipeline.from_pretrained(_toolchain.checkpoint("tiny"), dtype="fp32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def byte_token(tok, b: int) -> int:
    """The single-byte token of byte `b` in a byte-level BPE (GPT-2's printable stand-ins for bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    stand_in = b if b in printable else 256 + sorted(set(range(256)) - set(printable)).index(b)
    tid = tok.token_to_id(chr(stand_in))
    assert tid is not None
    return tid


def validate(text: str, schema: dict) -> None:
    """jsonschema on the answer, numbers read as decimals (what JSON numbers are): in binary floats 99.3 is not a
    multiple of 0.1 and python-jsonschema would reject a correct answer."""
    jsonschema.validate(json.loads(text, parse_float=Decimal), json.loads(json.dumps(schema), parse_float=Decimal))


def constraint(vl2: VL2Pipeline, **kw) -> TokenConstraint:
    width = vl2.model.language.cfg.vocab_size
    return TokenConstraint(grammar_vocabulary(vl2.tokenizer, width), build_grammar(**kw), vl2.tokenizer.eos_id,
                           width)


def feed(c: TokenConstraint, ids) -> None:
    for t in ids:
        assert c.allowed(t), t
        c.accept(t)


def allowed_ids(c: TokenConstraint) -> torch.Tensor:
    return torch.isfinite(c.mask(torch.zeros(c.width))).nonzero().flatten()


def test_fifty_random_extraction_schemas_always_validate(small_vocab):
    inputs = small_vocab.prepare("Extract the fields as JSON.")
    for i, schema in enumerate(random_schemas(50, seed=12)):
        r = small_vocab.generate(inputs, SamplingParams(max_new_tokens=1500, temperature=1.0, seed=i,
                                                        json_schema=schema))
        assert r.finish_reason == "stop", (i, r.text[-200:])
        validate(r.text, schema)
        assert r.token_ids[-1] != small_vocab.tokenizer.eos_id  # ended when the object closed, not on eos


def test_receipt_on_the_real_vocabulary_streams_the_same_text(real_vocab):
    inputs = real_vocab.prepare("<image>\nExtract the receipt.", ["tests/fixtures/documents/receipt.png"])
    params = SamplingParams(max_new_tokens=600, temperature=1.0, seed=3, json_schema=RECEIPT)
    timings: dict = {}
    pieces = list(real_vocab.stream(inputs, params, timings))
    result = real_vocab.generate(inputs, params)
    assert "".join(pieces) == result.text and result.finish_reason == timings["finish_reason"] == "stop"
    validate(result.text, RECEIPT)
    assert result.text.startswith("{")  # the leading space the grammar allows is not part of the value
    assert timings["mask"]["steps"] == len(result.token_ids)


def test_special_tokens_are_never_allowed_and_eos_only_at_the_end(real_vocab):
    """Inside and around a JSON string no special token (bos, pad, <image>, <|ref|>, <|User|>, ...) nor an lm_head
    row past the tokenizer is ever allowed; the text "<|ref|>" can still be written, as plain characters."""
    tok = real_vocab.tokenizer
    c = constraint(real_vocab, json_schema={"type": "object", "properties": {"s": {"type": "string"}},
                                            "required": ["s"], "additionalProperties": False})
    specials = sorted(set(tok.special_ids.values()) - {tok.eos_id})
    beyond = torch.arange(len(tok), c.width)  # lm_head rows the tokenizer has no token for
    ids = tok.encode('{"s": "东京 😀') + [byte_token(tok, b) for b in b"<|ref|>"] + tok.encode(' ok"}')
    for t in ids[:-1]:
        ok = allowed_ids(c)
        assert not set(ok.tolist()) & set(specials) and not torch.isin(beyond, ok).any()
        assert tok.eos_id not in ok.tolist()
        feed(c, [t])
    feed(c, ids[-1:])
    assert c.finished and c.complete and allowed_ids(c).tolist() == [tok.eos_id]
    assert json.loads(tok.decode(ids)) == {"s": "东京 😀<|ref|> ok"}


def test_characters_split_into_byte_tokens(small_vocab):
    """A free string written one byte token at a time (CJK, emoji, a skin-tone modifier): the grammar accepts every
    byte, the streaming detokenizer never shows half a character, and the whole value decodes and validates.
    (Where the grammar forces the next bytes, a key or the rest of an enum value, it allows only their canonical
    tokens, so those parts are fed as the tokenizer encodes them.)"""
    tok = small_vocab.tokenizer
    schema = {"type": "object", "properties": {"city": {"enum": ["東京", "서울"]}, "mood": {"type": "string"}},
              "required": ["city", "mood"], "additionalProperties": False}
    free = "😀 fine, 猫 👍🏽"
    ids = tok.encode('{"city": "東京", "mood": "') + [byte_token(tok, b) for b in free.encode()] + tok.encode('"}')
    c, stream = constraint(small_vocab, json_schema=schema), tok.stream()
    pieces = []
    for t in ids:
        feed(c, [t])
        pieces.append(stream.add(t))
    pieces.append(stream.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == f'{{"city": "東京", "mood": "{free}"}}' and c.finished
    validate("".join(pieces), schema)


def test_a_lone_continuation_byte_or_a_cut_character_is_refused(small_vocab):
    tok = small_vocab.tokenizer
    c = constraint(small_vocab, json_schema={"type": "string"})
    feed(c, [byte_token(tok, b) for b in b'"'])
    assert not c.allowed(byte_token(tok, 0x80))  # a continuation byte cannot start a character
    feed(c, [byte_token(tok, "東".encode()[0])])
    assert not c.allowed(byte_token(tok, ord('"')))  # nor can the string close in the middle of one


@pytest.mark.parametrize("choices", [["yes", "no", "no way"], ["東京", "😀 ok", "大阪"]])
def test_choices_are_answered_exactly(small_vocab, choices):
    inputs = small_vocab.prepare("Pick one.")
    for seed in range(6):
        params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed, choices=choices)
        r = small_vocab.generate(inputs, params)
        assert r.text in choices and "".join(small_vocab.stream(inputs, params)) == r.text
    for choice in choices:  # every option can be written (with or without the leading space); it ends there
        for text in (choice, " " + choice):  # unless a longer option goes on from it ("no" / "no way")
            c = constraint(small_vocab, choices=choices)
            feed(c, small_vocab.tokenizer.encode(text))
            assert c.complete and c.finished == (not any(o != choice and o.startswith(choice) for o in choices))


def test_regex_digits_are_ascii(real_vocab):
    """\\d means [0-9] (a JSON Schema reading): the real vocabulary has Arabic-Indic and fullwidth digit tokens."""
    inputs = real_vocab.prepare("Date?")
    for seed in range(4):
        r = real_vocab.generate(inputs, SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed,
                                                       regex=r"\d{4}-\d{2}-\d{2}"))
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.text), r.text


def test_overlapped_masks_give_the_same_tokens(small_vocab):
    """The next mask computed in a worker thread during the forward pass is the mask computed inline."""
    tok, schema = small_vocab.tokenizer, random_schemas(1, seed=5)[0]
    gen = torch.Generator().manual_seed(0)
    runs = []
    for overlap in (True, False):
        width = small_vocab.model.language.cfg.vocab_size
        c = TokenConstraint(grammar_vocabulary(tok, width), build_grammar(json_schema=schema), tok.eos_id, width,
                            overlap=overlap)
        gen.manual_seed(0)
        ids = []
        while not c.finished and len(ids) < 400:
            logits = c.mask(torch.randn(width, generator=gen))
            ids.append(int(logits.argmax()))
            c.accept(ids[-1])
        c.close()
        runs.append(ids)
    assert runs[0] == runs[1] and len(runs[0]) < 400


def test_bitmask_applied_matches_a_bit_by_bit_reference():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2 ** 31, 2 ** 31, (37,), dtype=torch.int64, generator=gen).to(torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(37 * 32 - 5, generator=gen).to(dtype)  # a width that is not a multiple of 32
        got = apply_bitmask(logits, bitmask)
        words = [int(w) & 0xFFFFFFFF for w in bitmask.tolist()]
        for i in range(logits.numel()):
            bit = (words[i // 32] >> (i % 32)) & 1
            assert (got[i] == logits[i]) if bit else (got[i] == float("-inf")), i
        assert got.dtype == dtype and torch.isfinite(logits).all()  # the input is left as it was


def test_cut_answer_reports_length(small_vocab):
    inputs = small_vocab.prepare("Extract.")
    r = small_vocab.generate(inputs, SamplingParams(max_new_tokens=3, json_schema=RECEIPT))
    assert r.finish_reason == "length" and len(r.token_ids) == 3


def test_unbounded_numbers_cut_by_the_budget_are_a_valid_prefix(small_vocab):
    """Without bounds a random model may write digits until max_new_tokens: the answer is then reported as cut
    ("length"), and what it wrote is still a prefix the grammar accepts."""
    schema = {"type": "object", "properties": {"n": {"type": "number"}, "i": {"type": "integer"}},
              "required": ["n", "i"], "additionalProperties": False}
    inputs = small_vocab.prepare("Numbers.")
    for seed in range(3):
        r = small_vocab.generate(inputs, SamplingParams(max_new_tokens=120, temperature=1.0, seed=seed,
                                                        json_schema=schema))
        c = constraint(small_vocab, json_schema=schema)
        feed(c, r.token_ids)
        if r.finish_reason == "stop":
            validate(r.text, schema)
            assert c.finished
        else:
            assert len(r.token_ids) == 120 and not c.complete


@pytest.mark.parametrize("kwargs, needle", [
    ({"json_schema": {"type": "strng"}}, "strng"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": [1, 2]}, "JSON object"),
    ({"regex": "[0-9]+("}, "regex"),
    ({"choices": []}, "choices"),
    ({"choices": "yes"}, "choices"),
    ({"choices": ["yes", ""]}, "choices"),
])
def test_bad_constraints_are_one_line_errors(kwargs, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        build_grammar(**kwargs)
    assert "\n" not in str(e.value)


def test_sampling_params_take_one_constraint():
    assert SamplingParams(choices=["a", "b"]).choices == ("a", "b")
    with pytest.raises(UserError, match="at most one"):
        SamplingParams(json_schema={"type": "object"}, regex="a+")


def test_response_format_to_sampling_kwargs():
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    assert sampling_constraint_from_response_format(None) == {}
    assert sampling_constraint_from_response_format({"type": "text"}) == {}
    assert sampling_constraint_from_response_format({"type": "json_object"}) == {"json_schema": {"type": "object"}}
    got = sampling_constraint_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "receipt", "schema": schema, "strict": True}})
    assert got == {"json_schema": schema}
    SamplingParams(**got)
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}, "json", {"kind": "text"}):
        with pytest.raises(UserError):
            sampling_constraint_from_response_format(bad)


def test_json_object_answers_parse(small_vocab):
    inputs = small_vocab.prepare("Any JSON object.")
    kwargs = sampling_constraint_from_response_format({"type": "json_object"})
    r = small_vocab.generate(inputs, SamplingParams(max_new_tokens=800, temperature=1.0, seed=2, **kwargs))
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:  # an unbounded object may outlast the budget with random weights: then it is a prefix of one
        assert r.text.startswith("{")
