"""Processor and image loading: the spec's worked numbers, bit-exact parity with the official processor's outputs
(fixture), the official prompt template in every turn shape, and a one-line UserError for every bad input."""

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_vl2.errors import UserError
from edge_vl2.inputs.images import load_image
from edge_vl2.inputs.processor import Processor, ProcessorConfig
from edge_vl2.inputs.tiling import num_image_tokens, select_best_resolution

from conftest import IMAGES, OFFICIAL, TINY_LIKE

FIXTURE, CKPT = OFFICIAL, TINY_LIKE
PHOTOS = IMAGES
PHOTO_FILES = ["visual_grounding_1.jpeg", "visual_grounding_2.jpg", "multi_image_1.jpeg", "multi_image_2.jpeg",
               "multi_image_3.jpeg", "monday.jpg"]


@pytest.fixture(scope="module")
def proc() -> Processor:
    return Processor.from_pretrained(CKPT)


# ---- spec worked numbers ----------------------------------------------------------------------------------------

# model-facts §4.4: (W, H) -> image tokens
TOKEN_TABLE = [
    ((384, 384), 421), ((384, 768), 631), ((768, 384), 617), ((384, 1152), 841), ((1152, 384), 813),
    ((384, 1536), 1051), ((1536, 384), 1009), ((768, 768), 1023), ((384, 1920), 1261), ((1920, 384), 1205),
    ((384, 2304), 1471), ((2304, 384), 1401), ((768, 1152), 1429), ((1152, 768), 1415), ((384, 2688), 1681),
    ((2688, 384), 1597), ((384, 3072), 1891), ((3072, 384), 1793), ((768, 1536), 1835), ((1536, 768), 1807),
    ((384, 3456), 2101), ((3456, 384), 1989), ((1152, 1152), 2017),
]


@pytest.mark.parametrize("res,tokens", TOKEN_TABLE)
def test_image_token_count_table(proc, res, tokens):
    tw, th = res[0] // 384, res[1] // 384
    assert num_image_tokens(tw, th) == tokens
    assert proc.config.num_image_tokens(tw, th) == tokens


def test_candidates_are_all_grids_of_at_most_nine_tiles(proc):
    cands = proc.config.candidate_resolutions
    want = {(384 * m, 384 * n) for m in range(1, 10) for n in range(1, 10) if m * n <= 9}
    assert len(cands) == 23 and set(cands) == want
    assert {r for r, _ in TOKEN_TABLE} == want
    assert proc.config.image_size == 384 and proc.config.pad_color == (127, 127, 127)


def test_a_device_tile_cap_limits_the_grids_and_the_image_tokens(proc):
    """A profile's max_tiles counts the global view: 3 leaves 1x1, 1x2 and 2x1; a 1280x720 photo (4x2 uncapped) is
    then read at 2x1, with the token count of that grid; the official processor itself is unchanged."""
    assert proc.max_tiles() == 10
    kiosk = proc.capped_at(3)
    assert set(kiosk.config.candidate_resolutions) == {(384, 384), (384, 768), (768, 384)}
    assert kiosk.config.image_size == 384 and kiosk.max_tiles() == 3
    photo = Image.open(PHOTOS / "multi_image_3.jpeg")
    assert select_best_resolution(photo.size, proc.config.candidate_resolutions) == (1536, 768)
    out = kiosk.process_prompt("<image>\nWhat is shown?", [photo])
    assert out.pixel_values.shape[0] == 3 and tuple(out.images_spatial_crop[0].tolist()) == (2, 1)
    assert out.num_image_tokens == [num_image_tokens(2, 1)]
    assert proc.process_prompt("<image>\nWhat is shown?", [photo]).pixel_values.shape[0] == 9
    assert proc.capped_at(10).config == proc.config
    with pytest.raises(UserError, match="leaves no candidate grid"):
        proc.capped_at(1)


@pytest.mark.parametrize("size,best", [
    ((384, 384), (384, 384)), ((100, 50), (384, 384)), ((384, 200), (384, 384)), ((1, 1), (384, 384)),
    ((400, 400), (768, 768)), ((640, 480), (768, 768)),
    ((800, 600), (1152, 768)), ((1024, 768), (1152, 768)),
    ((1280, 720), (1536, 768)), ((1920, 1080), (1536, 768)),
    ((500, 2000), (384, 1536)),
    ((1152, 1152), (1152, 1152)), ((2000, 2000), (1152, 1152)), ((4096, 4096), (1152, 1152)),
])
def test_best_resolution_examples(proc, size, best):
    assert select_best_resolution(size, proc.config.candidate_resolutions) == best


# ---- official fixture -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["img1_grounding", "text_only"])
def test_official_fixture_ids_masks_and_tiles(proc, case):
    spec = json.loads((FIXTURE / "cases.json").read_text())[case]
    meta = json.loads((FIXTURE / "tiny-like" / f"{case}.json").read_text())
    ref = np.load(FIXTURE / "tiny-like" / f"{case}.npz")
    out = proc.process(spec["conversation"], [FIXTURE / f for f in spec["image_files"]])

    assert out.input_ids.dtype == torch.long and out.images_seq_mask.dtype == torch.bool
    np.testing.assert_array_equal(out.input_ids.numpy(), ref["input_ids"])
    np.testing.assert_array_equal(out.images_seq_mask.numpy(), ref["images_seq_mask"])
    assert len(out) == out.seq_len == meta["seq_len"]
    assert out.num_image_tokens == meta["num_image_tokens_per_image"]
    n_tiles = meta["num_tiles_used"]
    assert out.pixel_values.shape == (n_tiles, 3, 384, 384) and out.pixel_values.dtype == torch.float32
    if spec["image_files"]:
        np.testing.assert_array_equal(out.images_spatial_crop.numpy(), ref["images_spatial_crop"])
        # Hashes of the uint8 levels, recovered exactly as compare_outputs.py does.
        pv = out.pixel_values.numpy().astype(np.float64)
        u8 = np.clip(np.rint((pv * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)
        assert [hashlib.sha256(t.tobytes()).hexdigest() for t in u8] == meta["tile_u8_sha256"]
        np.testing.assert_allclose(pv.sum(axis=(1, 2, 3)), meta["tile_float_sum"], rtol=0, atol=1e-6)
        assert out.image_sizes == [(451, 300)]
    else:
        # Official emits a dummy [[0, 0]] row and a zero tile for text-only prompts; we emit empty tensors.
        assert out.images_spatial_crop.shape == (0, 2)
        assert not ref["images_spatial_crop"].any()


def test_process_prompt_matches_the_conversation_form(proc):
    spec = json.loads((FIXTURE / "cases.json").read_text())["img1_grounding"]
    ref = np.load(FIXTURE / "tiny-like" / "img1_grounding.npz")
    out = proc.process_prompt("<image>\n<|ref|>The cat in the picture.<|/ref|>.", [FIXTURE / spec["image_files"][0]])
    np.testing.assert_array_equal(out.input_ids.numpy(), ref["input_ids"])
    # The web-demo convention: a missing tag is prepended as "<image>\n" when asked for.
    out2 = proc.process_prompt("<|ref|>The cat in the picture.<|/ref|>.", [FIXTURE / spec["image_files"][0]],
                               auto_image_tags=True)
    np.testing.assert_array_equal(out2.input_ids.numpy(), ref["input_ids"])


# ---- template shapes --------------------------------------------------------------------------------------------

def test_multi_turn_template(proc):
    tok = proc.tokenizer
    out = proc.process_prompt("How are you?", history=[("Hi", "  Hello there.  ")])
    want = ([tok.bos_id] + tok.encode("<|User|>: Hi\n\n<|Assistant|>:") + tok.encode("Hello there.") + [tok.eos_id]
            + tok.encode("<|User|>: How are you?\n\n<|Assistant|>:"))
    assert out.input_ids.tolist() == want
    assert out.input_ids.tolist().count(tok.bos_id) == 1
    # Same thing in the conversation form, with official role names and a trailing empty assistant message.
    conv = [{"role": "<|User|>", "content": "Hi"}, {"role": "<|Assistant|>", "content": "Hello there."},
            {"role": "<|User|>", "content": "How are you?"}, {"role": "<|Assistant|>", "content": ""}]
    assert proc.process(conv).input_ids.tolist() == want
    assert proc.process(conv[:3]).input_ids.tolist() == want  # ending on the user message is the same prompt


def test_system_message_is_raw_text_after_bos(proc):
    tok = proc.tokenizer
    out = proc.process_prompt("Describe.", system="  You are a careful assistant.  ")
    want = ([tok.bos_id] + tok.encode("You are a careful assistant.")
            + tok.encode("<|User|>: Describe.\n\n<|Assistant|>:"))
    assert out.input_ids.tolist() == want
    with pytest.raises(UserError, match="system"):
        proc.process([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_three_images_disable_tiling(proc):
    files = [PHOTOS / f"multi_image_{i}.jpeg" for i in (1, 2, 3)]
    prompt = "This is image_1: <image>\nThis is image_2: <image>\nThis is image_3: <image>\n What are these?"
    out = proc.process_prompt(prompt, files)
    assert out.num_image_tokens == [421, 421, 421]
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3
    assert out.pixel_values.shape == (6, 3, 384, 384)
    assert int(out.images_seq_mask.sum()) == 3 * 421
    # Without tiling the single local tile is the padded global view again.
    assert torch.equal(out.pixel_values[0], out.pixel_values[1])
    assert out.image_sizes == [(1024, 701), (450, 308), (1280, 720)]


def test_two_images_keep_tiling(proc):
    files = [PHOTOS / "visual_grounding_1.jpeg", PHOTOS / "multi_image_3.jpeg"]
    out = proc.process_prompt("<image>\n<image>\n<|grounding|>Compare.", files)
    crops = []
    for f in files:
        w, h = select_best_resolution(Image.open(f).size, proc.config.candidate_resolutions)
        crops.append([w // 384, h // 384])
    assert out.images_spatial_crop.tolist() == crops
    assert crops[1] == [4, 2]  # 1280x720 -> 1536x768
    assert out.num_image_tokens == [num_image_tokens(*c) for c in crops]
    assert out.pixel_values.shape[0] == sum(1 + c[0] * c[1] for c in crops)
    ids = out.input_ids
    assert int((ids == proc.image_id).sum()) == int(out.images_seq_mask.sum()) == sum(out.num_image_tokens)


def test_tag_and_image_count_mismatch(proc):
    img = PHOTOS / "multi_image_2.jpeg"
    with pytest.raises(UserError, match="1 <image> tag"):
        proc.process_prompt("<image>\nwhat?", [img, img])  # fewer tags, no auto
    with pytest.raises(UserError, match="2 <image> tag"):
        proc.process_prompt("<image><image> what?", [img], auto_image_tags=True)  # more tags is never fixed
    with pytest.raises(UserError, match="0 image"):
        proc.process([{"role": "user", "content": "<image> what?"}], [])
    with pytest.raises(UserError, match="user messages"):
        proc.process([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "<image>"}], [img])
    out = proc.process_prompt("what?", [img, img], auto_image_tags=True)
    assert out.text.count("<image>\n") == 2 and len(out.num_image_tokens) == 2


def test_bad_conversations(proc):
    for conv in ([], [{"role": "bot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}],
                 [{"role": "system", "content": "x"}], [{"role": "assistant", "content": "x"}]):
        with pytest.raises(UserError):
            proc.process(conv)


def test_max_tokens(proc):
    out = proc.process_prompt("hello")
    with pytest.raises(UserError, match="over the limit"):
        proc.process_prompt("hello", max_tokens=len(out) - 1)


def test_real_photos_load_and_tile(proc):
    for name in PHOTO_FILES:
        img = load_image(PHOTOS / name)
        assert img.mode == "RGB"
        tiles, (tw, th) = proc.tile_image(img)
        assert (tw * 384, th * 384) == select_best_resolution(img.size, proc.config.candidate_resolutions)
        assert tiles.shape == (1 + tw * th, 3, 384, 384)
        assert tiles.min() >= -1 and tiles.max() <= 1 and tiles.std() > 0.1


# ---- processor config -------------------------------------------------------------------------------------------

def _ckpt_copy(tmp_path, processor_cfg=None, model_cfg=None):
    (tmp_path / "tokenizer.json").symlink_to(CKPT / "tokenizer.json")
    pc = json.loads((CKPT / "processor_config.json").read_text())
    mc = json.loads((CKPT / "config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps(processor_cfg(pc) if processor_cfg else pc))
    (tmp_path / "config.json").write_text(json.dumps(model_cfg(mc) if model_cfg else mc))
    return tmp_path


def test_processor_config_is_strict(tmp_path):
    d = json.loads((CKPT / "processor_config.json").read_text())
    assert ProcessorConfig.from_dict(d).to_dict()["candidate_resolutions"] == d["candidate_resolutions"]
    for key in ("candidate_resolutions", "patch_size", "image_mean", "image_token"):
        with pytest.raises(UserError, match=key):
            ProcessorConfig.from_dict({k: v for k, v in d.items() if k != key})
    with pytest.raises(UserError, match="sft_format"):
        ProcessorConfig.from_dict({**d, "sft_format": "llama"})
    with pytest.raises(UserError, match="multiples"):
        ProcessorConfig.from_dict({**d, "candidate_resolutions": [[384, 384], [500, 384]]})


def test_config_json_must_agree(tmp_path):
    def drop_last(mc):
        return {**mc, "candidate_resolutions": mc["candidate_resolutions"][:-1]}

    with pytest.raises(UserError, match="candidate_resolutions differ"):
        Processor.from_pretrained(_ckpt_copy(tmp_path, model_cfg=drop_last))


def test_missing_processor_config(tmp_path):
    with pytest.raises(UserError, match="processor_config.json"):
        Processor.from_pretrained(tmp_path)


# ---- bad images -------------------------------------------------------------------------------------------------

def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels, with a few bytes of data: a cheap decompression-bomb stand-in."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    good = tmp_path / "good.png"
    noise.save(good)
    files = {
        "missing": tmp_path / "missing.png",
        "directory": tmp_path / "a_directory.png",
        "corrupt": tmp_path / "corrupt.png",
        "truncated": tmp_path / "truncated.png",
        "truncated_jpeg": tmp_path / "truncated.jpg",
        "bomb_pillow": tmp_path / "bomb_huge.png",
        "bomb_limit": tmp_path / "bomb_81mp.png",
        "zero": tmp_path / "zero_width.png",
        "text": tmp_path / "notes.txt",
    }
    files["directory"].mkdir()
    files["corrupt"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = good.read_bytes()
    files["truncated"].write_bytes(data[: len(data) * 6 // 10])
    noise.save(tmp_path / "good.jpg", quality=95)
    jpg = (tmp_path / "good.jpg").read_bytes()
    files["truncated_jpeg"].write_bytes(jpg[: len(jpg) // 2])
    files["bomb_pillow"].write_bytes(_png_header_only(100_000, 100_000))  # over Pillow's own hard limit
    files["bomb_limit"].write_bytes(_png_header_only(9_000, 9_000))  # 81 MP: under Pillow's, over ours
    files["zero"].write_bytes(_png_header_only(0, 10))
    files["text"].write_text("hello")
    return files


@pytest.mark.parametrize("kind,pattern", [
    ("missing", "not found"), ("directory", "directory"), ("corrupt", "not an image"),
    ("truncated", "truncated"), ("truncated_jpeg", "truncated"), ("bomb_pillow", "decompression bomb"),
    ("bomb_limit", "decompression bomb"), ("zero", "not an image"), ("text", "not an image"),
])
def test_bad_image_files(tmp_path, kind, pattern):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(UserError, match=pattern) as e:
        load_image(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


def test_bad_image_through_the_processor_names_the_file(proc, tmp_path):
    path = _bad_files(tmp_path)["truncated"]
    with pytest.raises(UserError, match="truncated.png"):
        proc.process_prompt("<image>\nWhat is it?", [path])


def test_zero_size_pil_image():
    with pytest.raises(UserError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize("mode,fmt", [("P", "png"), ("LA", "png"), ("RGBA", "png"), ("I;16", "png"),
                                      ("CMYK", "jpeg"), ("L", "png"), ("1", "png")])
def test_modes_convert_like_the_official_loader(tmp_path, mode, fmt):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    if mode == "I;16":
        src = Image.fromarray(rng.integers(0, 65536, (40, 60), dtype=np.uint16))
    else:
        src = rgb.convert(mode)
    path = tmp_path / f"img.{fmt}"
    src.save(path)
    got = load_image(path)
    with Image.open(path) as im:
        want = im.convert("RGB")
    assert got.mode == "RGB" and got.size == (60, 40)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_exif_orientation_is_not_applied(tmp_path):
    img = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": the official loader ignores it
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (60, 40)


def test_pil_input_is_not_modified():
    img = Image.new("RGBA", (10, 10), (1, 2, 3, 4))
    out = load_image(img)
    assert img.mode == "RGBA" and out.mode == "RGB" and out is not img
