"""Small building blocks shared by the decoder: RMSNorm, SwiGLU MLP and rotary position embeddings."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# On CPUs without native bf16 matmul units (AVX2), a bf16 GEMM with many rows runs ~4x slower than upcasting both
# operands and multiplying in fp32 (measured: 512x1280 @ 1280x896 takes 142 ms bf16 vs 34 ms upcast), while a bf16
# matrix-vector product is ~2x faster than fp32 (half the bytes). So: few rows stay bf16, many rows go through fp32.
# Both accumulate in fp32; only the rounding of the output differs from a bf16 kernel.
CPU_BF16_MAX_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T in x's dtype, choosing the faster CPU path for bf16 (see above)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > CPU_BF16_MAX_ROWS * x.shape[-1]:
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in a's dtype with the same CPU bf16 rule as `linear` (attention's batched products)."""
    if a.dtype == torch.bfloat16 and a.device.type == "cpu" and a.shape[-2] > CPU_BF16_MAX_ROWS:
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


class Linear(nn.Linear):
    """nn.Linear (no bias in the decoder) that multiplies through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        return out if self.bias is None else out + self.bias


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """x through several linear layers that share it as input (q, k, v) -> their outputs. Quantized layers that can
    multiply them in one kernel call (`forward_many`, the cpu backend's decode path) do; others run one by one."""
    many = getattr(layers[0], "forward_many", None)
    out = many(x, layers[1:]) if many is not None else None
    return tuple(layer(x) for layer in layers) if out is None else out


class RMSNorm(nn.Module):
    """Official DeepSeek RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: the dense layer-0 MLP and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


@functools.lru_cache(maxsize=8)
def rope_span(dim: int, theta: float, start: int, length: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_angles for positions start..start+length-1, made once per span: every layer of a decode step asks for the
    same one (12-27 layers x ~10 small ops saved per token)."""
    return rope_angles(dim, theta, torch.arange(start, start + length, device=device))


def rope_angles(dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, dim/2] in fp32 for rotation pair j at angle pos * theta^(-2j/dim)."""
    # built on the positions' device: a host-to-device copy here could not be captured in a CUDA graph
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX / rotate-half RoPE on x [..., S, d]: pairs (j, j + d/2). Tiny's LlamaAttention convention.

    The tables are cast to x's dtype first, as the official code does (bf16 runs round them).
    """
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@functools.lru_cache(maxsize=8)
def rope_span_rotate_half(dim: int, theta: float, start: int, length: int, device: torch.device,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_span's tables made ready for `rope_rotate_half_with` once per span: cast to dtype (as rope_rotate_half
    casts them), cos as [cos, cos] and sin as [-sin, sin], both [S, dim]."""
    cos, sin = (t.to(dtype) for t in rope_span(dim, theta, start, length, device))
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rope_rotate_half_with(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """rope_rotate_half with rope_span_rotate_half's tables: x * [cos, cos] + [x2, x1] * [-sin, sin], bit for bit
    rope_rotate_half's [x1 cos - x2 sin, x2 cos + x1 sin] (negating a product is exact and a - b is a + (-b)) in
    6 tensor operations instead of 11."""
    half = x.shape[-1] // 2
    return x * cos2 + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin2


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE on x [..., S, d]: pairs (2j, 2j+1), MLA's convention.

    The official code de-interleaves (evens, then odds) and applies rotate-half; we return that same permuted layout
    so cached k_pe matches the official cache. Scores are unchanged by the permutation (q and k share it).
    """
    evens, odds = x[..., 0::2], x[..., 1::2]
    return rope_rotate_half(torch.cat([evens, odds], dim=-1), cos, sin)
