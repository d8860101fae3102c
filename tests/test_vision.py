"""Vision path (model-facts §2, §4): SigLIP tower == transformers SiglipVisionModel, projector == a float64 transcription of
the spec's words, layout_image == a naive loop over the spec's placement rule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from edge_vl2.model.config import ProjectorConfig, VisionConfig
from edge_vl2.model.vision import Projector, SiglipTower, layout_image

from _random_weights import fill_


def _reference_tower(ours: SiglipTower, cfg: VisionConfig) -> SiglipVisionModel:
    """transformers' SigLIP with our timm-named weights mapped onto its names (fused qkv split into q/k/v)."""
    ref = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False, attn_implementation="eager"))
    sd = ours.state_dict()
    mapped = {
        "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": sd["patch_embed.proj.bias"],
        "embeddings.position_embedding.weight": sd["pos_embed"][0],
        "post_layernorm.weight": sd["norm.weight"], "post_layernorm.bias": sd["norm.bias"],
    }
    for i in range(cfg.layers):
        b, r = f"blocks.{i}.", f"encoder.layers.{i}."
        for ours_name, ref_name in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"),
                                    ("mlp.fc2", "mlp.fc2"), ("attn.proj", "self_attn.out_proj")]:
            for p in ("weight", "bias"):
                mapped[f"{r}{ref_name}.{p}"] = sd[f"{b}{ours_name}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{p}"].chunk(3)  # fused rows laid out [q | k | v]
            mapped.update({f"{r}self_attn.q_proj.{p}": q, f"{r}self_attn.k_proj.{p}": k,
                           f"{r}self_attn.v_proj.{p}": v})
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}, (missing, unexpected)
    return ref.eval()


@pytest.mark.parametrize("width,heads,layers", [(144, 2, 2), (64, 4, 1)])  # head_dim 72 (as the real 1152/16) and 16
@torch.no_grad()
def test_tower_matches_transformers_siglip(width, heads, layers):
    cfg = VisionConfig.from_dict({"patch_size": 14, "width": width, "layers": layers, "heads": heads,
                                  "mlp_ratio": 3.7362})
    ours = fill_(SiglipTower(cfg), seed=1).eval()
    ref = _reference_tower(ours, cfg)
    pixels = torch.rand(3, 3, 384, 384, generator=torch.Generator().manual_seed(2)) * 2 - 1  # 3 normalised tiles
    got = ours(pixels)
    want = ref(pixel_values=pixels).last_hidden_state
    assert got.shape == (3, 729, width)
    # fp32 on both sides; only accumulation order differs (SDPA vs eager, fused vs split qkv): measured max 1.7e-6 on
    # O(1) LayerNorm outputs. 5e-5 leaves margin yet fails on the subtlest wrong choice, erf instead of tanh GELU
    # (measured 8e-4 here); a mapping or layout error is O(1).
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5)


def _reference_projector(feats: torch.Tensor, linears: list[torch.nn.Linear]) -> torch.Tensor:
    """model-facts §4.2 word for word, float64: pad one zero row/col, 2x2 blocks, index c*4 + dy*2 + dx, Linear-GELU-Linear."""
    side = math.isqrt(feats.shape[0])
    c = feats.shape[1]
    grid = feats.view(side, side, c)
    padded_side = side + side % 2
    padded = torch.zeros(padded_side, padded_side, c, dtype=feats.dtype)
    padded[:side, :side] = grid
    half = padded_side // 2
    blocks = torch.empty(half * half, 4 * c, dtype=feats.dtype)
    for by in range(half):
        for bx in range(half):
            for dy in range(2):
                for dx in range(2):
                    blocks[by * half + bx, torch.arange(c) * 4 + dy * 2 + dx] = padded[2 * by + dy, 2 * bx + dx]
    h = blocks @ linears[0].weight.T + linears[0].bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact erf GELU
    return h @ linears[1].weight.T + linears[1].bias


@pytest.mark.parametrize("side", [27, 4])  # odd grid (the real 27x27, padded) and an even one (no padding)
@torch.no_grad()
def test_projector_matches_spec_transcription(side):
    cfg = ProjectorConfig.from_dict({"input_dim": 12, "n_embed": 40})
    proj = fill_(Projector(cfg), seed=3).double()
    feats = torch.randn(2, side * side, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = proj(feats)
    half = (side + 1) // 2
    assert got.shape == (2, half * half, 40)
    linears = [proj.layers[0], proj.layers[2]]
    for n in range(2):
        # float64, same math in a different order: ~1e-15; 1e-12 still catches any layout permutation (O(1) errors).
        torch.testing.assert_close(got[n], _reference_projector(feats[n], linears), rtol=0, atol=1e-12)


def _naive_layout(tiles, tw, th, newline, separator):
    """model-facts §4.3 as loops: global rows + newline, separator, stitched local canvas rows + newline."""
    side = math.isqrt(tiles.shape[1])
    out = []
    for r in range(side):
        out += [tiles[0, r * side + c] for c in range(side)] + [newline]
    out.append(separator)
    for row in range(side * th):
        for col in range(side * tw):
            tile = 1 + (row // side) * tw + col // side  # local tiles in raster order
            out.append(tiles[tile, (row % side) * side + col % side])
        out.append(newline)
    return torch.stack(out)


@pytest.mark.parametrize("tw,th", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_layout_image_matches_naive_loop(tw, th):
    d = 5
    gen = torch.Generator().manual_seed(tw * 10 + th)
    tiles = torch.randn(1 + tw * th, 196, d, generator=gen)
    newline, separator = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    got = layout_image(tiles, tw, th, newline, separator)
    assert got.shape == (211 + 14 * th * (14 * tw + 1), d)  # model-facts §4.4 token count
    assert torch.equal(got, _naive_layout(tiles, tw, th, newline, separator))  # pure data movement: exact
