"""config.json parsing: official defaults applied where the real configs rely on them, everything else strict."""

import copy
import json

import pytest

from edge_vl2.errors import UserError
from edge_vl2.model.checkpoint import check_layout, open_checkpoint, resolve_model_dir
from edge_vl2.model.config import VL2Config
from edge_vl2.model.shapes import checkpoint_shapes

from conftest import TINY_LIKE

RAW = json.loads((TINY_LIKE / "config.json").read_text())


def parse(mutate):
    d = copy.deepcopy(RAW)
    mutate(d)
    return VL2Config.from_dict(d)


def test_fixture_config_reads_as_tiny():
    cfg = VL2Config.from_dict(RAW)
    assert cfg.variant == "tiny" and not cfg.language.use_mla
    assert cfg.vision.heads == 2 and cfg.vision.mlp_hidden == int(144 * 3.7362)
    assert cfg.language.is_moe_layer(1) and not cfg.language.is_moe_layer(0)


def test_small_style_config_takes_official_defaults():
    """Small's language_config omits use_mla, the MLA dims, vocab_size and bos/eos: the official defaults apply."""
    def small(d):
        lc = d["language_config"]
        for key in ("use_mla", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size",
                    "bos_token_id", "eos_token_id"):
            lc.pop(key)
    cfg = parse(small).language
    assert cfg.use_mla and (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == \
        (512, 128, 64, 128)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (100000, 100001)
    assert cfg.vocab_from_checkpoint and cfg.vocab_size == 102400


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["language_config"].pop("hidden_size"), "hidden_size"),
    (lambda d: d["language_config"].pop("n_routed_experts"), "n_routed_experts"),
    (lambda d: d["vision_config"].pop("width"), "width"),
    (lambda d: d.update(model_type="llava"), "model_type"),
    (lambda d: d["language_config"].update(q_lora_rank=1536), "q_lora_rank"),
    (lambda d: d["language_config"].update(rope_scaling={"type": "yarn"}), "rope_scaling"),
    (lambda d: d["language_config"].update(topk_method="random"), "topk_method"),
    (lambda d: d["projector_config"].update(n_embed=256), "n_embed"),
])
def test_strict_errors_name_the_field(mutate, needle):
    with pytest.raises(UserError, match=needle):
        parse(mutate)


def test_layout_matches_the_fixture_checkpoint():
    model_dir, cfg, reader = open_checkpoint(TINY_LIKE)
    assert reader.shapes == checkpoint_shapes(cfg)
    assert "vision.attn_pool.latent" in reader.shapes and "view_seperator" in reader.shapes


def test_layout_check_names_the_tensor():
    cfg = VL2Config.from_dict(RAW)
    shapes = checkpoint_shapes(cfg)
    bad = dict(shapes, **{"language.lm_head.weight": (7, 7)})
    with pytest.raises(UserError, match="lm_head"):
        check_layout(cfg, bad, TINY_LIKE)
    extra = dict(shapes, **{"language.model.layers.0.self_attn.rotary_emb.inv_freq": (16,)})
    with pytest.raises(UserError, match="rotary_emb"):
        check_layout(cfg, extra, TINY_LIKE)


def test_model_argument_forms(tmp_path):
    assert resolve_model_dir(TINY_LIKE) == TINY_LIKE
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_dir(tmp_path / "missing" / "deeper")
    with pytest.raises(UserError, match="expected a checkpoint folder"):
        resolve_model_dir(TINY_LIKE / "config.json")
