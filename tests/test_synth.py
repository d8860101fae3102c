"""Synthetic checkpoints: exact official layout (files, names, shapes, bf16 shards, index), real special-token ids,
the spec's parameter counts, determinism, and weights that look trained (calibrated next-token entropy)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from edge_vl2.errors import UserError
from edge_vl2.model.config import VL2Config
from edge_vl2.model.shapes import checkpoint_shapes, parameter_count
from edge_vl2.tools.synth import (
    build_tokenizer,
    mean_entropy,
    sample_final_hidden,
    shard_plan,
    special_token_ids,
    synth_tensor,
    synthetic_config,
    write_checkpoint,
)
from edge_vl2.tools.synth.weights import generator, outlier_channels

from conftest import TINY_LIKE

FIXTURE = TINY_LIKE
VARIANTS = ("tiny", "small", "base")
SHARDS = {"tiny": 1, "small": 4, "base": 8}
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
REAL_IDS = {
    "tiny": {BOS: 0, EOS: 1, PAD: 2, "<image>": 128815, "<|ref|>": 128816, "<|/ref|>": 128817, "<|det|>": 128818,
             "<|/det|>": 128819, "<|grounding|>": 128820, "<|User|>": 128821, "<|Assistant|>": 128822},
    "small": {BOS: 100000, EOS: 100001, PAD: 100002, "<image>": 100003, "<|ref|>": 100004, "<|/ref|>": 100005,
              "<|det|>": 100006, "<|/det|>": 100007, "<|grounding|>": 100008, "<|User|>": 100009,
              "<|Assistant|>": 100010},
}
REAL_IDS["base"] = REAL_IDS["tiny"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {v: write_checkpoint(root / v, v, "test", seed=0) for v in VARIANTS}


def read_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, read without loading any tensor."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def check_layout(d: Path, variant: str) -> None:
    """Index, shard names and headers agree exactly with `checkpoint_shapes` of the written config."""
    cfg = VL2Config.from_file(d / "config.json")
    expected = checkpoint_shapes(cfg)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert set(index["weight_map"]) == set(expected)
    n = SHARDS[variant]
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{n:06d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in d.glob("*.safetensors")) == files
    seen = {}
    for fname in files:
        n_header, header = read_header(d / fname)
        assert header.pop("__metadata__") == {"format": "pt"}
        end = 0
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            assert index["weight_map"][name] == fname
            assert info["dtype"] == "BF16"
            assert info["data_offsets"] == [end, end + 2 * math.prod(info["shape"])]  # contiguous bf16 data
            end = info["data_offsets"][1]
            seen[name] = tuple(info["shape"])
        assert (d / fname).stat().st_size == 8 + n_header + end
    assert seen == expected
    assert index["metadata"]["total_size"] == 2 * sum(math.prod(s) for s in expected.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_test_checkpoint_matches_layout(ckpts, variant):
    check_layout(ckpts[variant], variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shards_are_what_safetensors_writes(ckpts, variant):
    """Readable by safetensors, and byte-identical to `safetensors.torch.save` of the same tensors."""
    from safetensors.torch import save

    for path in sorted(ckpts[variant].glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            assert f.metadata() == {"format": "pt"}
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        assert save(tensors, metadata={"format": "pt"}) == path.read_bytes()


def test_same_files_as_official_fixture(ckpts):
    names = lambda d: {p.name for p in d.iterdir() if not p.name.endswith(".safetensors")}  # noqa: E731
    assert names(ckpts["tiny"]) == names(FIXTURE)
    for fname in ("processor_config.json", "generation_config.json", "special_tokens_map.json"):
        assert (ckpts["tiny"] / fname).read_text() == (FIXTURE / fname).read_text(), fname
    ours, ref = (json.loads((d / "tokenizer_config.json").read_text()) for d in (ckpts["tiny"], FIXTURE))
    assert list(ours) == list(ref) and ours["tokenizer_class"] == ref["tokenizer_class"]
    assert [v["content"] for v in ours["added_tokens_decoder"].values()] == \
        [v["content"] for v in ref["added_tokens_decoder"].values()]
    ours, ref = (json.loads((d / "tokenizer.json").read_text()) for d in (ckpts["tiny"], FIXTURE))
    for key in ("pre_tokenizer", "decoder", "normalizer"):
        assert ours[key] == ref[key], key
    assert ours["post_processor"]["type"] == "TemplateProcessing"
    assert ours["post_processor"]["single"] == ref["post_processor"]["single"]
    assert ours["model"]["type"] == "BPE" and all(isinstance(m, str) for m in ours["model"]["merges"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trips(ckpts, variant):
    written = json.loads((ckpts[variant] / "config.json").read_text())
    assert written == synthetic_config(variant, "test")
    cfg = VL2Config.from_dict(written)
    assert cfg.variant == variant
    assert cfg.language.vocab_size == (102400 if variant == "small" else 129280)


@pytest.mark.parametrize("variant", VARIANTS)
def test_special_token_ids_are_real(ckpts, variant):
    tok = Tokenizer.from_file(str(ckpts[variant] / "tokenizer.json"))
    ids = REAL_IDS[variant]
    assert {t: tok.token_to_id(t) for t in ids} == ids == special_token_ids(variant)
    enc = tok.encode("<|User|>: hi\n\n<|Assistant|>:", add_special_tokens=False)
    assert enc.ids[0] == ids["<|User|>"] and ids["<|Assistant|>"] in enc.ids and ids[BOS] not in enc.ids
    assert tok.encode("hi").ids[0] == ids[BOS]  # post-processor prepends bos
    text = "Receipt #482: 3 x Greek Yogurt @ 1.25 = $3.75 (tax 6.25%).\nTotal: 27.20 EUR, café — 日本語!"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert not set(tok.encode(text, add_special_tokens=False).ids) & set(ids.values())
    tc = json.loads((ckpts[variant] / "tokenizer_config.json").read_text())
    assert {v["content"]: int(k) for k, v in tc["added_tokens_decoder"].items()} == ids


def test_tokenizer_is_deterministic():
    assert build_tokenizer("small").to_str() == build_tokenizer("small").to_str()


def test_full_configs_are_the_real_ones():
    tiny, small, base = (synthetic_config(v, "full") for v in VARIANTS)
    for c in (tiny, small, base):
        assert "architectures" not in c and c["model_type"] == "deepseek_vl_v2"
        assert c["vision_config"] == {"layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384",
                                      "model_type": "vision", "patch_size": 14, "width": 1152}
        assert len(c["candidate_resolutions"]) == 23 and c["tile_tag"] == "2D" and c["global_view_pos"] == "head"
    assert tiny["language_config"]["use_mla"] is False and tiny["language_config"]["q_lora_rank"] is None
    assert not {"use_mla", "bos_token_id", "eos_token_id"} & set(small["language_config"])
    assert not {"num_hidden_layers", "num_attention_heads"} & set(base["language_config"])
    b = VL2Config.from_dict(base).language
    assert (b.num_hidden_layers, b.num_attention_heads) == (30, 32)
    assert (b.topk_method, b.scoring_func, b.routed_scaling_factor) == ("noaux_tc", "sigmoid", 2.0)


def _count(shapes: dict, pred) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if pred(k))


@pytest.mark.parametrize("variant,total,lm_total,projector,attn_layer", [
    ("tiny", 3_370_501_440, 2_934_734_080, 7_539_200, 6_553_600),
    ("small", 16_148_349_504, 15_706_484_224, 13_635_584, 13_763_072),
    ("base", 27_480_134_248, 27_033_548_328, 18_355_200, 31_883_776),
])
def test_full_parameter_counts_match_spec(variant, total, lm_total, projector, attn_layer):
    cfg = VL2Config.from_dict(synthetic_config(variant, "full"))
    shapes = checkpoint_shapes(cfg)
    assert parameter_count(cfg) == total
    assert _count(shapes, lambda k: k.startswith("language.")) == lm_total
    assert _count(shapes, lambda k: k.startswith("projector.")) == projector
    assert _count(shapes, lambda k: k.startswith("language.model.layers.1.self_attn.")) == attn_layer
    assert _count(shapes, lambda k: k.startswith("vision.") and "attn_pool" not in k) == 412_987_248
    assert _count(shapes, lambda k: k.startswith("vision.attn_pool.")) == 15_238_352


def test_shard_plan_is_contiguous_and_balanced():
    shapes = checkpoint_shapes(VL2Config.from_dict(synthetic_config("small", "full")))
    sizes = [(k, 2 * math.prod(s)) for k, s in shapes.items()]
    plan = shard_plan(sizes, 4)
    assert [x for p in plan for x in p] == list(shapes)
    per_shard = [sum(2 * math.prod(shapes[x]) for x in p) for p in plan]
    assert max(per_shard) / min(per_shard) < 1.05
    assert shard_plan([("a", 100), ("b", 1), ("c", 1)], 3) == [["a"], ["b"], ["c"]]  # a huge first tensor
    assert all(shard_plan(sizes[:10], 8))  # every shard gets at least one tensor


def test_write_is_deterministic(ckpts, tmp_path):
    again = write_checkpoint(tmp_path / "small", "small", "test", seed=0)
    for path in sorted(ckpts["small"].glob("*.safetensors")):
        assert (again / path.name).read_bytes() == path.read_bytes()
    cfg = VL2Config.from_dict(synthetic_config("small", "test"))
    name = "language.model.layers.1.mlp.experts.0.up_proj.weight"
    shape = checkpoint_shapes(cfg)[name]
    assert not torch.equal(synth_tensor(name, shape, cfg, 0), synth_tensor(name, shape, cfg, 1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_head_entropy_is_realistic(ckpts, variant):
    d = ckpts[variant]
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]

    def load(name):
        with safe_open(str(d / index[name]), "pt") as f:
            return f.get_tensor(name).float()

    w, g = load("language.lm_head.weight"), load("language.model.norm.weight")
    h = sample_final_hidden(g, 256, generator(12345, "fresh hidden vectors"))  # not the calibration batch
    assert 0.5 <= mean_entropy(h @ w.T) <= 3.0


def test_weights_look_trained():
    cfg = VL2Config.from_dict(synthetic_config("tiny", "full"))  # real widths; single small tensors only
    shapes = checkpoint_shapes(cfg)
    t = lambda name: synth_tensor(name, shapes[name], cfg, 0).float()  # noqa: E731
    router = t("language.model.layers.3.mlp.gate.weight").norm(dim=1)
    assert router.max() / router.min() > 2  # hot and cold experts
    w = t("language.model.layers.2.mlp.experts.5.down_proj.weight")
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis > 4 and abs(w.std() * math.sqrt(w.shape[1]) - 1) < 0.1  # heavy tails, std 1/sqrt(fan_in)
    idx = outlier_channels(0, 1280)
    norm = t("language.model.layers.4.input_layernorm.weight")
    rest = torch.ones(1280, dtype=torch.bool)
    rest[idx] = False
    assert (norm[idx] > 1.8).all() and (norm[rest] - 1).abs().max() < 0.3
    cols = [t(f"language.model.layers.{i}.self_attn.q_proj.weight").norm(dim=0) for i in range(12)]
    assert any((c[idx] / c[rest].median()).min() > 4 for c in cols)  # outlier input columns in some matrices
    assert not all((c[idx] / c[rest].median()).min() > 4 for c in cols)


def test_refuses_non_empty_target(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(UserError):
        write_checkpoint(tmp_path / "x", "tiny", "test")
    assert (tmp_path / "x" / "keep").read_text() == "mine"


def test_interrupted_write_leaves_nothing(tmp_path):
    def stop(msg: str) -> None:
        if "writing" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "tiny", "tiny", "test", progress=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_size_tiny(tmp_path):
    lines: list[str] = []
    try:
        d = write_checkpoint(tmp_path / "tiny-full", "tiny", "full", progress=lines.append)
        check_layout(d, "tiny")
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == 6_741_002_880
        assert len(lines) > 3  # per-GiB progress inside the 6.7 GB shard
    finally:
        shutil.rmtree(tmp_path / "tiny-full", ignore_errors=True)  # pytest keeps tmp dirs of recent runs
