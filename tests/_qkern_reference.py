"""The math qkern does, written independently in torch: the oracle of tests/test_qkern.py and of the qkern cases in
tests/test_quantized_model.py.

On its SIMD tiers qkern rounds each activation row to int8 per block of 32 consecutive values before the dot
products (the Q8_0 scheme llama.cpp and ONNX Runtime's MatMulNBits accuracy level 4 use): d = max|x_block| / 127 in
fp32, q = round-half-even(x * (1 / d)), x_hat = q * d. The integer dot products are exact, so the kernel's result is
the fp32/fp64 product of the dequantized weight with x_hat, up to fp32 summation order. The scalar tier multiplies
the exact fp32 activations (no rounding).
"""

from __future__ import annotations

import torch

from edge_vl2.quant.ops import QKERN_DEQUANT_MIN_ROWS, WeightOp

BLOCK = 32


def round_q8(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K % 32 == 0) as qkern's int8 activations see it, in fp32."""
    xb = x.float().unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))
    d = xb.abs().amax(-1, keepdim=True) / 127.0  # fp32, as the C code divides
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).flatten(-2)  # torch.round: half to even, like lrintf / cvtps_epi32


def block_scales(x: torch.Tensor) -> torch.Tensor:
    """d per element [..., K]: the rounding step of the block each activation sits in."""
    xb = x.float().unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))
    return (xb.abs().amax(-1, keepdim=True) / 127.0).expand_as(xb).flatten(-2)


def rounding_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|x_hat W^T - x W^T| <= |W| (d / 2)^T per output, elementwise: each rounded activation moves by at most half
    its block's step. w [N, K] fp32 dequantized, x [M, K] -> [M, N]."""
    return (block_scales(x).double() / 2) @ w.double().abs().T


class RoundedActivations(WeightOp):
    """A reference op (fp32 dequantize + matmul) fed with the activations qkern would multiply: rounded to int8 per
    32 for the few-row calls qkern runs, exact from QKERN_DEQUANT_MIN_ROWS rows (where qkern dequantizes for the fp32
    GEMM instead). `rounding` False: the scalar tier (exact activations everywhere)."""

    def __init__(self, inner: WeightOp, rounding: bool = True):
        n = inner.n_experts
        super().__init__((inner.out_features, inner.in_features) if n is None else
                         (n, inner.out_features, inner.in_features), inner.format)
        self.inner, self.rounding = inner, rounding

    def _x(self, x: torch.Tensor) -> torch.Tensor:
        few = x.shape[0] < QKERN_DEQUANT_MIN_ROWS
        return round_q8(x) if self.rounding and few else x.float()

    def forward(self, x, expert=None):
        return self.inner(self._x(x), expert)

    def rows(self, x, expert_ids):
        # the MoE's decode rows: qkern takes all of a step's rows in one call; each row is rounded on its own
        return self.inner.rows(round_q8(x) if self.rounding else x.float(), expert_ids)


def with_rounded_activations(model, rounding: bool = True):
    """Wrap, in place, every quantized op of a model swapped in on the reference backend (see RoundedActivations)."""
    from edge_vl2.quant.experts import QuantExperts
    from edge_vl2.quant.linear import QuantLinear
    from edge_vl2.quant.ops import FloatOp

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.op = RoundedActivations(module.op, rounding)
        elif isinstance(module, QuantExperts):
            for group in module.groups:
                for name in ("gate_up", "gate", "up", "down"):
                    op = getattr(group, name)
                    if op is not None and not isinstance(op, FloatOp):
                        setattr(group, name, RoundedActivations(op, rounding))
    return model
