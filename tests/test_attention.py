"""Decoder attention (model-facts §7.3, §7.4): parity with transformers' LlamaAttention (Tiny) and DeepseekV2Attention (MLA),
absorbed MLA == expanded MLA, and chunked prefill + cached decode == one full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, LlamaConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from edge_vl2.model import attention
from edge_vl2.model.attention import MLAttention, MultiHeadAttention
from edge_vl2.model.cache import StaticCache

from _random_weights import fill_, language_config

SEQ = 20


def _causal_mask(s: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, S, S] mask as transformers' eager attention expects it."""
    return torch.full((s, s), float("-inf"), dtype=dtype).triu(1)[None, None]


def _inputs(seed: int, s: int = SEQ, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(s, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain MHA (Tiny) and a GQA variant
@torch.no_grad()
def test_mha_matches_transformers_llama_attention(kv_heads):
    cfg = language_config(use_mla=False, num_key_value_heads=kv_heads)
    ours = fill_(MultiHeadAttention(cfg), seed=10)
    ref_cfg = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                          num_key_value_heads=kv_heads, rope_theta=cfg.rope_theta, attention_bias=False,
                          max_position_embeddings=cfg.max_position_embeddings, attn_implementation="eager")
    ref = LlamaAttention(ref_cfg, layer_idx=0).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names: q_proj, k_proj, v_proj, o_proj
    x = _inputs(11)
    pos = torch.arange(SEQ)[None]
    cos_sin = LlamaRotaryEmbedding(ref_cfg)(x[None], pos)
    want, _ = ref(x[None], position_embeddings=cos_sin, attention_mask=_causal_mask(SEQ, x.dtype))
    got = ours(x, 0)
    # fp32 both sides, same ops: measured max 0.0 on outputs of size ~3; 1e-5 allows fp32 accumulation-order noise
    # (another BLAS / thread count) and is far below the effect of a wrong RoPE convention or head grouping (O(0.1)).
    torch.testing.assert_close(got, want[0], rtol=0, atol=1e-5)


def _deepseek_v2_reference(ours: MLAttention, cfg) -> tuple[DeepseekV2Attention, DeepseekV2Config]:
    ref_cfg = DeepseekV2Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads, q_lora_rank=None,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, attention_bias=False, attn_implementation="eager")
    assert ref_cfg.rope_parameters["rope_type"] == "default"  # no YaRN: softmax scale is plain 1/sqrt(d_nope + d_rope)
    ref = DeepseekV2Attention(ref_cfg, layer_idx=0).eval()
    sd = dict(ours.state_dict())
    w_uk, w_uv = sd.pop("w_uk"), sd.pop("w_uv")  # [n, d_nope, c], [n, d_v, c]
    sd["kv_b_proj.weight"] = torch.cat([w_uk, w_uv], dim=1).reshape(-1, cfg.kv_lora_rank)  # per head [k_nope | v]
    ref.load_state_dict(sd, strict=True)
    return ref, ref_cfg


@pytest.mark.parametrize("absorb", [True, False])
@torch.no_grad()
def test_mla_matches_transformers_deepseek_v2_attention(absorb):
    cfg = language_config(use_mla=True)
    ours = fill_(MLAttention(cfg), seed=20)
    ref, ref_cfg = _deepseek_v2_reference(ours, cfg)
    x = _inputs(21)
    # transformers applies interleaved (complex-pair) RoPE and keeps the raw layout; ours keeps the official
    # de-interleaved layout. q and k share the permutation, so scores and outputs must agree.
    freqs_cis = DeepseekV2RotaryEmbedding(ref_cfg)(x[None], torch.arange(SEQ)[None])
    want, _ = ref(x[None], attention_mask=_causal_mask(SEQ, x.dtype), position_embeddings=freqs_cis)
    got = ours(x, 0, absorb=absorb)
    # fp32 both sides, different association of the same products (latent-space vs expanded): measured max 4.8e-7
    # on outputs of size ~2; 1e-5 is far below a RoPE-pairing error (rotate-half on the raw layout: 0.74 measured)
    # or a kv_b_proj split error (O(0.1)).
    torch.testing.assert_close(got, want[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_absorbed_mla_equals_expanded_mla(monkeypatch):
    cfg = language_config(use_mla=True)
    attn = fill_(MLAttention(cfg), seed=30).double()
    x = _inputs(31, dtype=torch.float64)
    # The real path first: probabilities rounded to fp32 bound it at ~1e-7 (measured 9e-16: the two forms' scores
    # rounded to the same fp32 values here); 1e-6 allows a few 1-ulp probability flips.
    torch.testing.assert_close(attn(x, 0, absorb=True), attn(x, 0, absorb=False), rtol=0, atol=1e-6)
    # causal_softmax rounds probabilities to fp32 (as the official softmax(dtype=fp32) does); a float64 softmax here
    # leaves only float64 reassociation, so the identity W_UK^T q . c == q . (W_UK c) can be checked tightly.
    monkeypatch.setattr(attention, "causal_softmax", _causal_softmax_f64)
    absorbed, expanded = attn(x, 0, absorb=True), attn(x, 0, absorb=False)
    # float64 reassociation only: measured max ~1e-15 on outputs of size ~2; 1e-12 leaves margin.
    torch.testing.assert_close(absorbed, expanded, rtol=0, atol=1e-12)


def _causal_softmax_f64(scores: torch.Tensor, start: int) -> torch.Tensor:
    s, t = scores.shape[-2:]
    masked = torch.arange(t)[None, :] > torch.arange(start, start + s)[:, None]
    return scores.masked_fill(masked, float("-inf")).softmax(dim=-1)


CHUNKS = [5, 7, 6]  # uneven prefill chunks, then one-token decode steps to the end of the sequence
TOTAL = 24


def _chunked_then_decode(attn, x: torch.Tensor, cfg, **kw) -> torch.Tensor:
    cache = StaticCache(cfg, TOTAL, x.dtype).layers[0]
    out, start = [], 0
    for n in CHUNKS + [1] * (TOTAL - sum(CHUNKS)):
        out.append(attn(x[start:start + n], start, cache, **kw))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("kind,kw", [("mha", {}), ("mla", {}), ("mla", {"absorb": True}), ("mla", {"absorb": False})])
@torch.no_grad()
def test_chunked_prefill_and_decode_equal_full_forward(kind, kw):
    cfg = language_config(use_mla=kind == "mla")
    attn = fill_(MLAttention(cfg) if kind == "mla" else MultiHeadAttention(cfg), seed=40).double()
    x = _inputs(41, TOTAL, torch.float64)
    full = attn(x, 0, **kw)  # no cache: one causal pass (MLA default: expanded, 24 queries >= EXPAND_MIN_QUERIES)
    cached = _chunked_then_decode(attn, x, cfg, **kw)  # MLA default: chunks < 16 queries use the absorbed form
    # float64, but the real causal_softmax rounds probabilities to fp32, and chunked vs full scores (different
    # matmul shapes) can round to neighbouring fp32 values: measured max 1e-7 on outputs of size ~2.7. 1e-6 covers a
    # few such 1-ulp flips; a wrong cache slot, position offset or mask is O(0.1).
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_ready_tables_is_bit_for_bit_rope_rotate_half(dtype):
    """The decode path's RoPE (tables cast and laid out once per span) gives exactly rope_rotate_half's numbers."""
    from edge_vl2.model.layers import rope_rotate_half, rope_rotate_half_with, rope_span, rope_span_rotate_half

    x = torch.randn(10, 3, 128, generator=torch.Generator().manual_seed(0)).to(dtype) * 30
    for start in (0, 7, 4000):
        cos, sin = rope_span(128, 10000.0, start, 3, x.device)
        ready = rope_span_rotate_half(128, 10000.0, start, 3, x.device, dtype)
        assert torch.equal(rope_rotate_half_with(x, *ready), rope_rotate_half(x, cos, sin))
