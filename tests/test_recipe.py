"""Quantization recipes as data: JSON round trip, module kinds on the real checkpoint names, group fitting, byte
counts that match the tensors RTN really makes, and strict rejection of malformed recipes."""

from __future__ import annotations

import json

import pytest
import torch

from edge_vl2.model.config import VL2Config
from edge_vl2.model.shapes import checkpoint_shapes
from edge_vl2.quantize.formats import QuantSpec
from edge_vl2.quantize.recipe import (
    INT8,
    KINDS,
    PRESETS,
    Recipe,
    expert_name,
    fit_spec,
    load_recipe,
    module_kind,
    preset,
    spec_nbytes,
)
from edge_vl2.quantize.rtn import quantize_rtn
from edge_vl2.tools.synth import synthetic_config

MIXED = preset("int4-g128").with_overrides({expert_name(1, 3, p): INT8 for p in ("gate_proj", "up_proj", "down_proj")}
                                      | {expert_name(2, 0, "down_proj"): QuantSpec(4, 32, symmetric=False)},
                                      name="mixed")


@pytest.mark.parametrize("recipe", [preset(n) for n in PRESETS] + [preset("int4-g32"), MIXED],
                         ids=[*PRESETS, "int4-g32", "with-overrides"])
def test_json_round_trip(recipe):
    text = recipe.to_json()
    again = Recipe.from_json(text)
    assert again == recipe
    assert again.to_json() == text  # stable: sorted keys, overrides sorted by name
    assert json.loads(text)["format"] == "edge-vl2-recipe"


def test_load_recipe_from_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(MIXED.to_json())
    assert load_recipe(str(path)) == MIXED
    assert load_recipe("int8") == preset("int8")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="r.json"):
        load_recipe(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        load_recipe(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown recipe preset"):
        load_recipe("int3")


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_module_kinds_on_real_checkpoint_names(variant):
    """Every full-size checkpoint tensor gets the kind its name says; routers, norms, kv_b_proj, vision: none."""
    shapes = checkpoint_shapes(VL2Config.from_dict(synthetic_config(variant, "full")))
    kinds = {}
    for name in shapes:
        kind = module_kind(name)
        kinds.setdefault(kind, []).append(name)
        if name.startswith(("vision.", "projector.", "image_newline", "view_seperator")) or "norm" in name \
                or name.endswith((".mlp.gate.weight", "e_score_correction_bias", "kv_b_proj.weight")):
            assert kind is None, name
        elif ".mlp.experts." in name:
            assert kind == "routed_experts", name
        elif ".shared_experts." in name:
            assert kind == "shared_experts", name
        elif ".self_attn." in name:
            assert kind == "attention", name
        elif ".mlp." in name:
            assert kind == "dense_mlp", name
    assert kinds["lm_head"] == ["language.lm_head.weight"]
    assert kinds["embeddings"] == ["language.model.embed_tokens.weight"]
    assert set(kinds) == set(KINDS) | {None}


def test_spec_for_overrides_and_fitting():
    assert MIXED.spec_for(expert_name(1, 3, "up_proj")) == INT8
    assert MIXED.spec_for(expert_name(1, 4, "up_proj")) == preset("int4-g128").routed_experts  # no override
    assert MIXED.spec_for("language.model.layers.1.mlp.experts.up_proj") == QuantSpec(4, 128)  # the stacked name
    assert MIXED.spec_for("language.model.layers.1.mlp.gate.weight") is None  # the router stays bf16
    # Tiny's dense down_proj has in = 6848 = 64 x 107: g128 becomes g64; test-size experts (in 32) get g32
    assert MIXED.spec_for("language.model.layers.0.mlp.down_proj", 6848).group_size == 64
    assert fit_spec(QuantSpec(4, 128), 32) == QuantSpec(4, 32)
    assert fit_spec(INT8, 6848) == INT8
    with pytest.raises(ValueError, match="no group size"):
        fit_spec(QuantSpec(4, 128), 24)
    assert preset("int4-g32").routed_experts == QuantSpec(4, 32)


@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(4, 64, symmetric=False), QuantSpec(4, 16), INT8,
                                  QuantSpec(8, 64), None], ids=str)
@pytest.mark.parametrize("shape", [(48, 256), (64, 96), (32, 6848 // 4)])
def test_spec_nbytes_matches_real_tensors(spec, shape):
    """The recipe's byte arithmetic equals the bytes of the tensors RTN writes (after group fitting)."""
    w = torch.randn(shape)
    fitted = fit_spec(spec, shape[1])
    real = 2 * w.numel() if spec is None else quantize_rtn(w, fitted).nbytes
    assert spec_nbytes(spec, *shape) == real


def test_check_overrides_against_the_model():
    MIXED.check_overrides({1, 2}, 8)
    with pytest.raises(ValueError, match="names no routed expert"):
        MIXED.check_overrides({2}, 8)  # layer 1 is dense in this imagined model
    with pytest.raises(ValueError, match="names no routed expert"):
        MIXED.check_overrides({1, 2}, 3)  # expert 3 does not exist


def _bad(mutate) -> dict:
    d = json.loads(MIXED.to_json())
    mutate(d)
    return d


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "not an edge-vl2-recipe"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["modules"].pop("lm_head"), "exactly"),
    (lambda d: d["modules"].update(attention={"bits": 3, "group_size": 64, "symmetric": True}), "bits must be"),
    (lambda d: d["modules"].update(attention={"bits": 4, "group_size": None, "symmetric": True}), "group size"),
    (lambda d: d["modules"].update(attention={"bits": 4, "group_size": 48, "symmetric": True}), "power of two"),
    (lambda d: d["modules"].update(attention={"bits": "4", "group_size": 64}), "integers"),
    (lambda d: d["modules"].update(attention={"bits": 4, "group_size": 64, "symmetric": "no"}), "boolean"),
    (lambda d: d["modules"].update(attention={"bits": 4, "group": 64}), "expected null or"),
    (lambda d: d["modules"].update(lm_head={"bits": 8, "group_size": None, "symmetric": False}), "symmetric only"),
    (lambda d: d["expert_overrides"].update({expert_name(1, 0, "up_proj"): None}), "null is not allowed"),
    (lambda d: d["expert_overrides"].update({"language.model.layers.1.mlp.gate": {"bits": 8}}), "override key"),
    (lambda d: d["modules"].update(routed_experts=None), "need a routed_experts spec"),
])
def test_malformed_recipes_are_rejected(mutate, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(_bad(mutate))


def test_default_presets_at_llama_cpp_bytes():
    """Full-size Tiny: the int4 default fits the decoder in llama.cpp Q4_K_M's 1,948,600,032 bytes and int8 in Q8_0's
    3,124,413,152 (the GGUFs of the same decoder, embedding tables included on both sides: README "llama.cpp peer");
    int8 stores Q8_0's 8.5 bits per weight; int4-g128 is the earlier, leaner int4 (1.84 GB, embeddings bf16)."""
    from edge_vl2.export.plan import plan_decoder

    tiny = VL2Config.from_dict(synthetic_config("tiny", "full"))
    plans = plan_decoder(tiny, preset("int8"))
    quantized = [p for p in plans if p.quantized]
    n = sum(torch.Size(p.shape).numel() for p in quantized)
    assert sum(p.nbytes for p in quantized) * 8 / n == 8.5
    assert "language.model.embed_tokens.weight" in {p.name for p in quantized}
    assert 3.11e9 < sum(p.nbytes for p in plans) <= 3_124_413_152
    int4 = sum(p.nbytes for p in plan_decoder(tiny, preset("int4")))
    assert 1.94e9 < int4 <= 1_948_600_032
    assert preset("int4").routed_experts == QuantSpec(4, 32, symmetric=False)
    assert preset("int4").embeddings == preset("int4").attention == QuantSpec(8, 32)
    assert 1.83e9 < sum(p.nbytes for p in plan_decoder(tiny, preset("int4-g128"))) < 1.85e9
    assert preset("int8-channel").routed_experts == INT8 and preset("int8-g64").lm_head == QuantSpec(8, 64)
    with pytest.raises(ValueError, match="power of two"):
        preset("int8-g7")
