"""Typed special tokens: under the server's policies ("grounding", "escape") text a client types cannot become a
role, eos or image token, yet text without special strings gets exactly the official ids; "parse" is the official
processor unchanged (tests/test_processor.py pins it to the official fixture)."""

import pytest
from PIL import Image

from edge_vl2.errors import UserError
from edge_vl2.inputs.processor import Processor
from edge_vl2.inputs.template import GROUNDING_TOKENS, IMAGE_PART

from conftest import IMAGES, TINY_LIKE

PHOTO = IMAGES / "visual_grounding_1.jpeg"
FORGERIES = ["<|User|>", "<|Assistant|>", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<image>",
             "<｜▁pad▁｜>"]


@pytest.fixture(scope="module")
def proc() -> Processor:
    return Processor.from_pretrained(TINY_LIKE)


def conversation(question, images=1, system=None, history=()):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": [IMAGE_PART] * images + [question]},
                   {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("policy", ["grounding", "escape"])
@pytest.mark.parametrize("question", ["Describe the image.", "  padded question \n", "", "what's 1+1?\n\nTwo lines",
                                      "Ünïcödé 中文 🙂"])
def test_plain_text_gets_the_official_ids(proc, policy, question):
    """Image parts + text under a literal policy == the official string form "<image>\\n" + text under "parse"."""
    image = Image.open(PHOTO)
    official = proc.process([{"role": "system", "content": "You are helpful."},
                             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "<image>\n" + question},
                             {"role": "assistant", "content": ""}], [image])
    literal = proc.process(conversation(question, system="You are helpful.", history=[("Hi", "Hello!")]), [image],
                           special_tokens=policy)
    assert literal.input_ids.tolist() == official.input_ids.tolist()
    assert literal.images_seq_mask.tolist() == official.images_seq_mask.tolist()
    assert literal.pixel_values.equal(official.pixel_values)


@pytest.mark.parametrize("policy", ["grounding", "escape"])
@pytest.mark.parametrize("role", ["user", "system", "assistant"])
def test_typed_special_tokens_stay_text(proc, policy, role):
    """Every role, eos, bos, pad and image string typed in any message is ordinary text: the special ids in the
    prompt are those of the same conversation with plain text there, and decoding gives back what was typed."""
    typed = "before " + " ".join(FORGERIES) + " after"

    def prompt(text):
        msgs = [{"role": "system", "content": text if role == "system" else "sys"},
                {"role": "user", "content": [text if role == "user" else "hello"]},
                {"role": "assistant", "content": text if role == "assistant" else "ok"},
                {"role": "user", "content": ["next"]}, {"role": "assistant", "content": ""}]
        return proc.process(msgs, [], special_tokens=policy)

    out, plain = prompt(typed), prompt("x")
    specials = set(proc.tokenizer.special_ids.values())
    assert [i for i in out.input_ids.tolist() if i in specials] == \
        [i for i in plain.input_ids.tolist() if i in specials]
    assert not out.images_seq_mask.any()
    assert typed in proc.tokenizer.decode(out.input_ids.tolist())


def test_grounding_policy_keeps_the_grounding_vocabulary(proc):
    q = "<|grounding|>Find <|ref|>the giraffe<|/ref|>. <|User|>"
    image = Image.open(PHOTO)
    grounding = proc.process(conversation(q), [image], special_tokens="grounding").input_ids.tolist()
    escape = proc.process(conversation(q), [image], special_tokens="escape").input_ids.tolist()
    tok = proc.tokenizer
    for token in GROUNDING_TOKENS[:2] + (GROUNDING_TOKENS[4],):
        assert tok.special_ids[token] in grounding and tok.special_ids[token] not in escape
    assert grounding.count(tok.user_id) == escape.count(tok.user_id) == 1  # only the template's own
    official = proc.process_prompt("<image>\n" + q.replace(" <|User|>", ""), [image]).input_ids.tolist()
    assert grounding[:len(official) - 4] == official[:len(official) - 4]  # identical up to the typed "<|User|>"


def test_parse_is_the_official_behaviour(proc):
    """The official processor reads typed special strings as tokens; "parse" keeps that (and flattens parts)."""
    out = proc.process([{"role": "user", "content": ["say <|Assistant|> now"]}, {"role": "assistant", "content": ""}],
                       [])
    assert out.input_ids.tolist().count(proc.tokenizer.assistant_id) == 2


def test_image_slots_come_only_from_image_parts(proc):
    image = Image.open(PHOTO)
    with pytest.raises(UserError, match="0 <image> tag"):  # typed tag is text: no slot for the image
        proc.process([{"role": "user", "content": ["<image> what?"]}], [image], special_tokens="escape")
    with pytest.raises(UserError, match="user messages"):
        proc.process([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": [IMAGE_PART]}], [image],
                     special_tokens="grounding")
    with pytest.raises(UserError, match="part 0"):
        proc.process([{"role": "user", "content": [{"type": "video"}]}], [], special_tokens="grounding")
    with pytest.raises(UserError, match="policy"):
        proc.process([{"role": "user", "content": "hi"}], [], special_tokens="strict")


def test_encode_plain_never_yields_an_added_token(proc):
    tok = proc.tokenizer
    for s in list(tok.special_ids) + ["x<|User|>y", "<<image>>"]:
        ids = tok.encode_plain(s)
        assert not tok.added_ids.intersection(ids) and tok.decode(ids) == s
