"""Property-based tests (hypothesis) of the three parsers of outside input: the processor (any image size, mode and
count, any prompt text), the grounding parser (any text; boxes written the official way come back, also from a
cut-off answer) and the bundle manifest reader (any damage to a valid manifest is refused in one line or read back
exactly, never reinterpreted). Example counts are kept small so the file runs in well under a minute on the 2 shared
cores; `edge-vl2 fuzz` runs the readers for as long as one likes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_LIKE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_vl2.bundle.manifest import MANIFEST, canonical_json, manifest_digest
from edge_vl2.bundle.reader import read_manifest
from edge_vl2.errors import UserError
from edge_vl2.inputs.grounding import parse_grounding, strip_grounding
from edge_vl2.inputs.processor import Processor
from edge_vl2.inputs.tokenizer import ASSISTANT_TOKEN, USER_TOKEN
from edge_vl2.tools.fuzz import json_paths, manifest_seed, mutate_json

# deadline=None: the 2 shared cores make single examples slow at random; function-scoped fixtures are read-only here;
# no example database (nothing written into the repository).
SETTINGS = {"deadline": None, "database": None,
                "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}


def one_line(e: UserError) -> bool:
    return "\n" not in str(e) and str(e).strip() != ""


# --- the processor ---------------------------------------------------------------------------------------------------

PROC = Processor.from_pretrained(TINY_LIKE)
# Every mode Image.new makes; "La" (premultiplied) is the one Pillow cannot convert to RGB: a one-line error.
MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
         "F"]


@st.composite
def images(draw):
    """An image of any mode, of any size up to 1600 px a side (every aspect from 1:1600 to 1600:1), random pixels."""
    w, h = draw(st.integers(1, 1600)), draw(st.integers(1, 1600))
    mode = draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    try:
        return rgb.convert(mode)
    except ValueError:  # no conversion from RGB to this mode: a plain one
        return Image.new(mode, (w, h))


PROMPTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80) | st.sampled_from(
    ["", "  ", "<|User|> fake turn", "<｜end▁of▁sentence｜>", "<|ref|>cat<|/ref|>", "<|grounding|>where?", "\x00\r\n"])


@settings(max_examples=40, **SETTINGS)
@given(ims=st.lists(images(), max_size=3), prompt=PROMPTS.filter(lambda p: "<image>" not in p))
def test_processor_any_images_and_prompt(ims, prompt):
    """The output is consistent with itself and with the official template for any input, or the one mode Pillow
    cannot convert is refused in one line; the caller's images are never modified."""
    before = [(im.mode, im.size, im.tobytes()) for im in ims]
    try:
        out = PROC.process_prompt(prompt, ims, auto_image_tags=True)
    except UserError as e:
        assert one_line(e) and any(im.mode == "La" for im in ims) and "cannot convert mode La" in str(e)
        return
    assert [(im.mode, im.size, im.tobytes()) for im in ims] == before
    cfg, tok, S = PROC.config, PROC.tokenizer, PROC.config.image_size
    ids, mask = out.input_ids, out.images_seq_mask
    # The official "deepseek" template: bos, user turn with one <image> per image in front, the assistant's cue.
    content = ("<image>\n" * len(ims) + prompt).strip()
    body = f"{USER_TOKEN}: {content}\n\n" if content else f"{USER_TOKEN}:"
    assert out.text == f"{tok.bos_token}{body}{ASSISTANT_TOKEN}:"
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert ids[0] == tok.bos_id and torch.equal(ids == PROC.image_id, mask)
    # Each image: a grid from the candidates, no tiling past two images, its official token count, its tiles.
    assert out.image_sizes == [im.size for im in ims] and len(out.num_image_tokens) == len(ims)
    grids = out.images_spatial_crop.tolist()
    for (tw, th), n in zip(grids, out.num_image_tokens):
        assert (tw * S, th * S) in cfg.candidate_resolutions and n == cfg.num_image_tokens(tw, th)
        assert len(ims) <= 2 or (tw, th) == (1, 1)
    assert int(mask.sum()) == sum(out.num_image_tokens)
    assert out.pixel_values.shape == (sum(1 + tw * th for tw, th in grids), 3, S, S)
    # Pixels are normalised [0, 1] values: inside [(0 - mean) / std, (1 - mean) / std] per channel (float32
    # rounding of one subtraction and one division: 1e-5 is ample).
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    px = out.pixel_values
    assert bool(torch.isfinite(px).all())
    assert bool((px >= (0 - mean) / std - 1e-5).all() and (px <= (1 - mean) / std + 1e-5).all())
    # The text round trips: decoding gives the template with each <image> repeated once per image token.
    pieces = out.text.split("<image>")
    expanded = pieces[0] + "".join("<image>" * n + p for n, p in zip(out.num_image_tokens, pieces[1:]))
    assert tok.decode(ids.tolist()) == expanded


@settings(max_examples=30, **SETTINGS)
@given(n_images=st.integers(0, 3), n_tags=st.integers(0, 3), prompt=PROMPTS.filter(lambda p: "<image>" not in p))
def test_processor_tags_must_match_images(n_images, n_tags, prompt):
    """Without auto tags, <image> tags and images must match one to one: else a one-line error naming both counts."""
    ims = [Image.new("RGB", (8, 8))] * n_images
    text = "<image>" * n_tags + prompt
    try:
        out = PROC.process_prompt(text, ims)
    except UserError as e:
        assert n_tags != n_images and one_line(e) and f"{n_tags} <image> tag(s) or image part(s) but {n_images} image(s)" in str(e)
        return
    assert n_tags == n_images and len(out.num_image_tokens) == n_images


def test_typed_special_tokens_are_read_as_tokens():
    """What README says the CLI does with special tokens typed in a prompt (the official processor's behaviour): each
    becomes its token id, not its characters."""
    tok = PROC.tokenizer
    ids = PROC.process_prompt(f"a{USER_TOKEN}b{tok.eos_token}<|ref|>c<|/ref|>").input_ids.tolist()
    assert ids.count(tok.user_id) == 2 and tok.eos_id in ids and tok.ref_id in ids


# --- the grounding parser --------------------------------------------------------------------------------------------

PLAIN = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<|"), max_size=30)


@st.composite
def grounded_answers(draw):
    """An answer written the official way: filler text, then ref/det pairs, each det span with 1-3 boxes on the
    0..999 grid (x1 <= x2, y1 <= y2), and the boxes each should yield."""
    text, want = draw(PLAIN), []
    for _ in range(draw(st.integers(0, 4))):
        label = draw(PLAIN)
        boxes = []
        for _ in range(draw(st.integers(1, 3))):
            x1, x2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
            y1, y2 = sorted(draw(st.lists(st.integers(0, 999), min_size=2, max_size=2)))
            boxes.append((x1, y1, x2, y2))
        det = ", ".join(f"[{a}, {b}, {c}, {d}]" for a, b, c, d in boxes)
        text += f"<|ref|>{label}<|/ref|><|det|>[{det}]<|/det|>" + draw(PLAIN)
        want += [(label.strip(), b) for b in boxes]
    return text, want


@settings(max_examples=200, **SETTINGS)
@given(text=st.text(max_size=200) | st.text(st.sampled_from(list("<|>/refdt[],0123456789. -")), max_size=120),
       size=st.none() | st.tuples(st.integers(1, 10**5), st.integers(1, 10**5)))
def test_grounding_never_raises(text, size):
    """Any text (generated text can be anything) gives a list of well-formed boxes, never an exception."""
    for b in parse_grounding(text, size):
        x1, y1, x2, y2 = b.box
        assert x1 <= x2 and y1 <= y2
        if size is not None:
            W, H = size
            assert 0 <= b.pixel_box[0] <= b.pixel_box[2] <= W and 0 <= b.pixel_box[1] <= b.pixel_box[3] <= H
    strip_grounding(text)


@settings(max_examples=150, **SETTINGS)
@given(answer=grounded_answers(), size=st.tuples(st.integers(1, 8000), st.integers(1, 8000)), cut=st.floats(0, 1))
def test_grounding_reads_back_what_was_written_also_when_cut_off(answer, size, cut):
    """Every written box comes back with its label and the official pixel formula int(v / 999 * side); an answer cut
    off anywhere (max_new_tokens) yields a prefix of those boxes, never a partial box."""
    text, want = answer
    got = parse_grounding(text, size)
    assert [(b.label, b.box) for b in got] == want
    W, H = size
    assert [b.pixel_box for b in got] == [(int(x1 / 999 * W), int(y1 / 999 * H), int(x2 / 999 * W),
                                           int(y2 / 999 * H)) for _, (x1, y1, x2, y2) in want]
    short = parse_grounding(text[:int(cut * len(text))], size)
    assert short == got[:len(short)]
    readable = strip_grounding(text)
    assert "<|ref|>" not in readable and "<|det|>" not in readable and "<|/ref|>" not in readable


# --- the bundle manifest reader --------------------------------------------------------------------------------------

SEED = manifest_seed()
SEED_PATHS = json_paths(SEED)


def _write(folder, text: bytes) -> None:
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST).write_bytes(text)


def test_the_seed_manifest_reads_back_exactly(tmp_path):
    _write(tmp_path / "b", canonical_json(SEED).encode())
    assert same(read_manifest(tmp_path / "b").to_dict(), SEED)


def same(read, written) -> bool:
    """`read` says exactly what `written` says: equal values of the same JSON type (True is not 1, 64.0 is not 64).
    Optional fields: absent from `read` only where `written` has null, absent from `written` only where `read` has
    the field's empty default (a graph's `validation` {})."""
    if isinstance(written, dict):
        return isinstance(read, dict) and all(read[k] in (None, {}) for k in set(read) - set(written)) and all(
            same(read[k], v) if k in read else v is None for k, v in written.items())
    if isinstance(written, list):
        return isinstance(read, list) and len(read) == len(written) and all(map(same, read, written))
    return type(read) is type(written) and read == written


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_manifest_any_resealed_damage_is_refused_or_read_exactly(data, tmp_path_factory):
    """Up to three JSON edits anywhere (values of any type replaced, keys deleted or added), digest recomputed as a
    determined user would: the reader refuses with one line, or returns a manifest whose every field is what the
    file says (nothing converted, defaulted or dropped)."""
    doc = mutate_json(data, SEED, SEED_PATHS)
    if not isinstance(doc, dict):
        doc = {"value": doc}
    doc["digest"] = manifest_digest(doc) if _json_safe(doc) else "0" * 64
    folder = tmp_path_factory.mktemp("m")
    _write(folder, canonical_json(doc).encode() if _json_safe(doc) else json.dumps(doc).encode())
    try:
        m = read_manifest(folder)
    except UserError as e:
        assert one_line(e), str(e)
        return
    assert same(m.to_dict(), doc), f"read back differently: {m.to_dict()} from {doc}"


def _json_safe(doc) -> bool:
    try:
        canonical_json(doc)
        return True
    except (TypeError, ValueError):
        return False


@settings(max_examples=100, **SETTINGS)
@given(pos=st.floats(0, 1, exclude_max=True), delta=st.integers(1, 255))
def test_manifest_any_changed_byte_is_refused(pos, delta, tmp_path_factory):
    """Changing any one byte of a valid manifest, to anything, is refused in one line (digest or canonical form)."""
    text = bytearray(canonical_json(SEED).encode())
    i = int(pos * len(text))
    text[i] = (text[i] + delta) % 256
    folder = tmp_path_factory.mktemp("m")
    _write(folder, bytes(text))
    with pytest.raises(UserError) as e:
        read_manifest(folder)
    assert one_line(e.value)
