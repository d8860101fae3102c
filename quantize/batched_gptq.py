"""GPTQ batched over many independent weights that share a spec: all routed experts of a layer in a few calls.

The arithmetic is `gptq.gptq_quantize`'s (lazy blocks, dampening, dead inputs, group grids chosen on the fly from
the already-updated weights) without act_order, run on a leading batch axis: one Python loop over the columns
serves B experts at once, ~5x faster on a CPU than a loop over 64 experts calling `gptq_quantize`. gate_proj and
up_proj rows of one expert go in together (same inputs, same Hessian, one factorisation). tests/test_model_gptq.py
checks that it produces exactly `gptq_quantize`'s codes.
"""

from __future__ import annotations

import torch

from .formats import (
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    QuantSpec,
    check_group_size,
    int4_from_codes,
    int4_params,
    int8_params,
    to_codes,
)


def inverse_hessian_factors(hessians: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dampened Hessians [B, n, n] -> upper Cholesky factors U of H^-1 (H^-1 = U^T U) [B, n, n], float64.

    The same factor as `gptq.inverse_hessian_factor` (same dead-input rule and dampening), computed as
    U = J chol(J H J)^-1 J with J the reversal permutation: one Cholesky and one triangular solve instead of
    Cholesky, inverse and Cholesky again (2.7x faster for n = 1280, equal to ~1e-15).
    """
    h = hessians.to(torch.float64).clone()
    n = h.shape[-1]
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0  # [B, n]: inputs the calibration never excited
    h.masked_fill_(dead[:, :, None] | dead[:, None, :], 0.0)
    diag.masked_fill_(dead, 1.0)
    diag += percdamp * diag.mean(dim=-1, keepdim=True)
    flip = torch.arange(n - 1, -1, -1, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h[:, flip][:, :, flip])
    if int(info.max()) > 0:
        raise ValueError(f"Hessian not positive definite after dampening (percdamp={percdamp}): raise percdamp")
    eye = torch.eye(n, dtype=h.dtype, device=h.device).expand_as(h)
    inv = torch.linalg.solve_triangular(lower, eye, upper=False)
    return inv[:, flip][:, :, flip]


def gptq_batched(w: torch.Tensor, hessians: torch.Tensor, spec: QuantSpec, *, block_size: int = 32,
                 percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on B independent weights w [B, out, in] with Hessians [B, in, in] and one spec (no act_order).

    Returns float codes [B, out, in], fp16 scales and uint8 zero points [B, out, in/g] (g = in for per-channel
    INT8), and the GPTQ objective per weight [B] (fp64): the sum of the per-column OBS losses, i.e.
    tr((W - Q) H' (W - Q)^T) / 2 for the dampened H'. `pack` turns the first three into the on-disk format.

    Works on the transposed weights [B, in, out], so a column is contiguous (2x faster per column on a CPU), and
    with lazy blocks of 32 columns by default: the per-column work grows with the block, the per-block update is
    one batched GEMM whatever the block size.
    """
    if w.dim() != 3 or hessians.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"expected w [B, out, in] and Hessians [B, in, in], got {list(w.shape)}, "
                         f"{list(hessians.shape)}")
    n_b, n_out, n_in = w.shape
    gs = spec.group_size or n_in  # INT8 per channel: one group spanning the row
    if spec.group_size is not None:
        check_group_size(gs, n_in)
    hinv = inverse_hessian_factors(hessians, percdamp).to(torch.float32)  # [B, in, in], upper
    W = w.float().transpose(1, 2).contiguous()  # [B, in, out]; never writes to `w`
    n_groups = n_in // gs
    scales = torch.empty(n_b, n_groups, n_out, dtype=torch.float16, device=w.device)
    zeros = torch.zeros(n_b, n_groups, n_out, dtype=torch.uint8, device=w.device)
    codes = torch.empty(n_b, n_in, n_out, dtype=torch.float32, device=w.device)
    losses = torch.zeros(n_b, dtype=torch.float64, device=w.device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # the block [B, bs, out], updated eagerly
        err1 = torch.zeros_like(W1)  # scaled errors (w - q) / d of the block's columns
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if col % gs == 0:  # first column of a group: choose its grid from the current weights
                cur = _current(W, W1, err1, hinv, col, col + gs, i1, i2).transpose(1, 2)  # [B, out, gs]
                if spec.bits == 4:
                    scales[:, g], zeros[:, g] = int4_params(cur, spec.symmetric)
                else:
                    scales[:, g] = int8_params(cur)
            s = scales[:, g].float()
            z = zeros[:, g].float() if spec.bits == 4 else 0
            c = W1[:, i].contiguous()  # [B, out]; a strided column makes the rounding below ~100x slower
            q = to_codes(c, s, z, spec.bits)
            codes[:, col] = q
            e = (c - (q - z) * s) / hinv1[:, i, i][:, None]  # [B, out]
            losses += e.double().square().sum(dim=1) / 2
            W1[:, i:].baddbmm_(hinv1[:, i, i:, None], e[:, None, :], alpha=-1)  # rank-1 update of the rest
            err1[:, i] = e
        if i2 < n_in:
            W[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1)
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731 - back to [B, out, ...]
    return t(codes), t(scales), t(zeros), losses


def _current(W, W1, err1, hinv, c0: int, c1: int, i1: int, i2: int) -> torch.Tensor:
    """Up-to-date values [B, c1 - c0, out] of the not-yet-quantized columns c0..c1 (see gptq._current): inside the
    block W1 carries every update; after it, W still owes this block's pending lazy update hinv^T err1."""
    parts = []
    if c0 < i2:
        parts.append(W1[:, c0 - i1:min(c1, i2) - i1])
    if c1 > i2:
        lo = max(c0, i2)
        parts.append(W[:, lo:c1] - torch.bmm(hinv[:, i1:i2, lo:c1].transpose(1, 2), err1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def pack(spec: QuantSpec, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> QuantizedWeight:
    """gptq_batched's raw output for one weight [out, in] (or any leading axes) -> the spec's on-disk format."""
    if spec.bits == 4:
        return int4_from_codes(codes, scales, zeros, codes.shape[-1] // scales.shape[-1], spec.symmetric)
    return Int8Weight(codes.to(torch.int8), scales[..., 0] if spec.group_size is None else scales)


def stack_weights(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Per-expert weights of one format -> one stacked weight [E, out, ...]."""
    return (Int4Weight if parts[0].bits == 4 else Int8Weight).stack(parts)
