"""`edge-vl2 run` end to end in a subprocess: streams text for 0-3 images; bad input gives one line and exit 2."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import IMAGES, TINY_LIKE

PHOTOS = [IMAGES / "monday.jpg", IMAGES / "visual_grounding_1.jpeg", IMAGES / "multi_image_1.jpeg"]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edge_vl2.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module", params=["tiny-like", "tiny-test", "small-test"])
def checkpoint(request, tmp_path_factory):
    """The official-code fixture checkpoint and synthetic test-size Tiny and Small checkpoints."""
    if request.param == "tiny-like":
        return TINY_LIKE
    variant = request.param.split("-")[0]
    out = tmp_path_factory.mktemp("ckpt") / variant
    proc = cli("synth", "--variant", variant, "--size", "test", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_run_streams_text(checkpoint, n_images):
    images = [a for p in PHOTOS[:n_images] for a in ("--image", p)] + (["--image", IMAGES / "monday.jpg"]
                                                                          if n_images == 3 else [])
    proc = cli("run", "--model", checkpoint, *images, "--max-new-tokens", "8", "--stats", "--dtype", "fp32",
               "Describe what you see.")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no text was streamed"
    stats = proc.stderr.strip().splitlines()[-1]
    if n_images >= 3:  # no tiling with three or more images: 421 image tokens each
        assert f"({421 * (n_images + 1)} image)" in stats
    elif n_images == 0:
        assert "(0 image)" in stats


def test_grounding_boxes_are_printed_in_pixels(tmp_path):
    """Boxes in an answer are printed in original-image pixels (here via the API on a known answer)."""
    from edge_vl2.pipeline import VL2Pipeline

    answer = "<|ref|>The cat<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>"
    from edge_vl2.inputs.processor import Processor

    inputs = Processor.from_pretrained(TINY_LIKE).process_prompt("<image>\nFind the cat.", [PHOTOS[0]])
    (box,) = VL2Pipeline.boxes(answer, inputs)
    w, h = inputs.image_sizes[-1]
    assert box.pixel_box == (0, 0, w, h)


def test_missing_image(tmp_path):
    assert_one_line_error(cli("run", "--model", TINY_LIKE, "--image", tmp_path / "nope.jpg", "hi"), "nope.jpg")


def test_corrupt_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    assert_one_line_error(cli("run", "--model", TINY_LIKE, "--image", bad, "hi"), "bad.jpg")


def test_more_image_tags_than_images():
    assert_one_line_error(cli("run", "--model", TINY_LIKE, "--image", PHOTOS[0], "<image>\n<image>\ncompare"),
                          "<image>")


def test_prompt_over_the_context():
    assert_one_line_error(cli("run", "--model", TINY_LIKE, "word " * 5000), "context")


def test_missing_model_folder(tmp_path):
    assert_one_line_error(cli("run", "--model", tmp_path / "nothing-here", "hi"), "nothing-here")


def test_hub_id_without_network():
    proc = cli("run", "--model", "deepseek-ai/deepseek-vl2-tiny", "hi")
    assert_one_line_error(proc, "deepseek-ai/deepseek-vl2-tiny", "local checkpoint folder")


@pytest.fixture
def broken_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY_LIKE, dst)
    return dst


def test_truncated_shard(broken_copy):
    shard = broken_copy / "model-00001-of-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_one_line_error(cli("run", "--model", broken_copy, "hi"), "model-00001-of-000001.safetensors")


def test_missing_tensor(broken_copy):
    from safetensors.torch import load_file, save_file

    shard = broken_copy / "model-00001-of-000001.safetensors"
    tensors = load_file(shard)
    del tensors["language.model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((broken_copy / "model.safetensors.index.json").read_text())
    del index["weight_map"]["language.model.layers.1.mlp.experts.3.up_proj.weight"]
    (broken_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(cli("run", "--model", broken_copy, "hi"), "experts.3.up_proj")


def test_misshaped_config(broken_copy):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["language_config"]["moe_intermediate_size"] = 64
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("run", "--model", broken_copy, "hi"), "shape")


def test_not_json_config(broken_copy):
    (broken_copy / "config.json").write_text("{not json")
    assert_one_line_error(cli("run", "--model", broken_copy, "hi"), "config.json")
