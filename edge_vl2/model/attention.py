"""Decoder self-attention: plain multi-head attention (Tiny) and MLA with a compressed cache (Small, base).

Both take x [S, H] for positions start..start+S-1 of a batch-1 sequence, write their cache slots, and attend causally
over everything written so far. Scores are computed and softmaxed in fp32, as in the official code.

`start` is a Python int (shapes follow the sequence: prefill, eager decode) or a one-element int64 tensor on the
model's device (the static step a CUDA graph captures: slots written with index_copy_, attention over the cache's
whole capacity with the positions after `start` masked, so every step has the same shapes and reads no value back
to the host).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import LayerCache
from .config import LanguageConfig
from .layers import (Linear, RMSNorm, matmul, project, rope_angles, rope_interleaved, rope_rotate_half,
                     rope_rotate_half_with, rope_span_rotate_half)


Start = int | torch.Tensor  # see the module docstring


def positions(start: Start, s: int, device) -> torch.Tensor:
    """Positions start..start+s-1 as an int64 tensor on `device` (from an int or a [1] device tensor, no sync)."""
    return start + torch.arange(s, device=device)


def causal_softmax(scores: torch.Tensor, start: Start) -> torch.Tensor:
    """scores [..., S, T] (query i sits at position start+i, keys at 0..T-1) -> fp32 probabilities."""
    s, t = scores.shape[-2:]
    if isinstance(start, int) and s == 1 and t <= start + 1:  # a decode step: one query after every key, no mask
        return scores.float().softmax(dim=-1)
    q_pos = positions(start, s, scores.device)[:, None]
    masked = torch.arange(t, device=scores.device)[None, :] > q_pos
    return scores.float().masked_fill(masked, float("-inf")).softmax(dim=-1)


def write_cache(cache: LayerCache, values: dict[str, torch.Tensor], start: Start, dim: int) -> list[torch.Tensor]:
    """Write `values` (name -> new entries, positions along `dim`) into the cache at start.. and return the cache
    tensors to attend over: those written so far (int start) or the whole capacity (tensor start, masked later)."""
    s = next(iter(values.values())).shape[dim]
    if isinstance(start, torch.Tensor):
        index = positions(start, s, start.device)
        for name, v in values.items():
            cache.tensors[name].index_copy_(dim, index, v)
        return [cache.tensors[name] for name in values]
    out = []
    for name, v in values.items():
        t = cache.tensors[name]
        t.narrow(dim, start, s).copy_(v)
        out.append(t.narrow(dim, 0, start + s))
    return out


class MultiHeadAttention(nn.Module):
    """Tiny: LlamaAttention-style q/k/v/o projections, rotate-half RoPE, K/V cache of n_kv x head_dim per token."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        h, self.heads, self.kv_heads, self.head_dim = cfg.hidden_size, cfg.num_attention_heads, \
            cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        self.q_proj = Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, start: Start, cache: LayerCache | None = None) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(s, self.heads, self.head_dim).transpose(0, 1)  # [n, S, d]
        k = k.view(s, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(s, self.kv_heads, self.head_dim).transpose(0, 1)
        if isinstance(start, int):  # tables made once per span and shared by every layer
            cos2, sin2 = rope_span_rotate_half(self.head_dim, self.theta, start, s, x.device, q.dtype)
            q, k = rope_rotate_half_with(q, cos2, sin2), rope_rotate_half_with(k, cos2, sin2)
        else:  # a device tensor (a captured decode step): angles on the device, nothing cached by value
            cos, sin = rope_angles(self.head_dim, self.theta, positions(start, s, x.device))
            q, k = rope_rotate_half(q, cos, sin), rope_rotate_half(k, cos, sin)
        if cache is not None:
            k, v = write_cache(cache, {"k": k, "v": v}, start, dim=1)  # [n_kv, T, d]
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=0)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=0)
        if isinstance(start, int) and s == 1 and k.shape[1] == start + 1:
            # a decode step sees every key: one fused kernel instead of ~10 small ops (6-9x faster on CPU at 20-700
            # keys); it keeps scores and probabilities in fp32 where the official bf16 path rounds them to bf16
            out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # [n, 1, d]
        else:
            scores = matmul(q, k.transpose(1, 2)) / math.sqrt(self.head_dim)  # [n, S, T]
            out = matmul(causal_softmax(scores, start).to(v.dtype), v)  # [n, S, d]
        return self.o_proj(out.transpose(0, 1).reshape(s, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (q_lora_rank null, plain RoPE on a 64-d shared key).

    The cache holds only the normalised latent c (kv_lora_rank) and the roped k_pe per token. `kv_b_proj` is kept
    split per head into W_UK [n, d_nope, c] and W_UV [n, d_v, c]: decode absorbs W_UK into the query and W_UV into the
    output (attention runs in the latent space); long prefills expand K/V per head instead, which is cheaper there.
    """

    # Above this many query tokens the expanded form does fewer FLOPs than the absorbed one.
    EXPAND_MIN_QUERIES = 16

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.heads, self.d_nope, self.d_rope, self.d_v, self.rank = n, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
            cfg.v_head_dim, cfg.kv_lora_rank
        self.theta = cfg.rope_theta
        self.scale = 1.0 / math.sqrt(cfg.qk_head_dim)  # no YaRN mscale: rope_scaling is null
        self.q_proj = Linear(h, n * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)  # official: built with the class default, not the config's
        self.w_uk = nn.Parameter(torch.empty(n, self.d_nope, self.rank))  # from kv_b_proj rows 0..127 of each head
        self.w_uv = nn.Parameter(torch.empty(n, self.d_v, self.rank))  # rows 128..255
        self.o_proj = Linear(n * self.d_v, h, bias=False)

    def forward(self, x: torch.Tensor, start: Start, cache: LayerCache | None = None,
                absorb: bool | None = None) -> torch.Tensor:
        s = x.shape[0]
        q, kv = project(x, self.q_proj, self.kv_a_proj_with_mqa)  # kv [S, c + r]
        q = q.view(s, self.heads, self.d_nope + self.d_rope).transpose(0, 1)  # [n, S, 192]
        q_nope, q_pe = q[..., :self.d_nope], q[..., self.d_nope:]
        latent = self.kv_a_layernorm(kv[:, :self.rank])
        cos, sin = rope_angles(self.d_rope, self.theta, positions(start, s, x.device))
        q_pe, k_pe = rope_interleaved(q_pe, cos, sin), rope_interleaved(kv[:, self.rank:], cos, sin)
        if cache is not None:
            latent, k_pe = write_cache(cache, {"latent": latent, "k_pe": k_pe}, start, dim=0)  # [T, c], [T, r]
        if absorb is None:
            absorb = s < self.EXPAND_MIN_QUERIES
        pe_scores = matmul(q_pe, k_pe.T)  # [n, S, T]: the shared rope key serves every head
        if absorb:
            q_lat = matmul(q_nope, self.w_uk)  # [n, S, c]
            probs = causal_softmax((matmul(q_lat, latent.T) + pe_scores) * self.scale, start).to(x.dtype)
            out = matmul(matmul(probs, latent), self.w_uv.transpose(1, 2))  # [n, S, c] -> [n, S, d_v]
        else:
            k_nope = matmul(self.w_uk, latent.T)  # [n, d_nope, T]
            v = matmul(self.w_uv, latent.T).transpose(1, 2)  # [n, T, d_v]
            probs = causal_softmax((matmul(q_nope, k_nope) + pe_scores) * self.scale, start).to(x.dtype)
            out = matmul(probs, v)
        return self.o_proj(out.transpose(0, 1).reshape(s, -1))
