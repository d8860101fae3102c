"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize a weight column by column, feeding each column's rounding
error back into the columns not yet quantized through the inverse Hessian of the layer's inputs.

Same grid and same output format as RTN (`formats.py`). Details:
- lazy batches: columns are processed in blocks of `block_size`; inside a block the update is applied eagerly,
  the rest of the matrix receives the whole block's update at once (one matmul per block);
- dampening: H += percdamp * mean(diag H) * I before the Cholesky factorisation (in float64);
- dead inputs (zero diagonal: a channel the calibration never excited) get H_ii = 1, so they are rounded to nearest
  and left out of the error feedback. Unlike the reference code we do not zero their weights: a channel silent in
  calibration may still fire at run time. An all-zero Hessian therefore gives exactly RTN;
- group parameters (scale, zero point) are chosen on the fly, from the already-updated weights of the whole group,
  at the moment the first column of that group is quantized. Groups are always the contiguous on-disk groups;
- act_order: columns are visited in order of decreasing H_ii (most-excited inputs first, while there is the most
  freedom left to compensate). The on-disk groups stay contiguous in the original order (no g_idx), and the codes
  are permuted back before packing, so the result is an ordinary Int4Weight/Int8Weight.
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


def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dampened H [n, n] -> the upper Cholesky factor of H^-1 (float64), which drives GPTQ's updates."""
    h = h.to(torch.float64).clone()
    diag = torch.arange(h.shape[0], device=h.device)
    dead = h[diag, diag] <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[diag[dead], diag[dead]] = 1.0
    h[diag, diag] += percdamp * h[diag, diag].mean()
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"Hessian not positive definite after dampening (percdamp={percdamp}): "
                         "raise percdamp") from err
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """GPTQ-quantize w [out, in] for inputs with Hessian [in, in] -> Int4Weight / Int8Weight in the spec's format."""
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"expected w [out, in] and hessian [in, in], got {list(w.shape)} and {list(hessian.shape)}")
    n_out, n_in = w.shape
    hessian = hessian.to(w.device)
    gs = spec.group_size or n_in  # INT8 per channel: one group spanning the row
    if spec.group_size is not None:
        check_group_size(gs, n_in)
    perm = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order \
        else torch.arange(n_in, device=w.device)
    inv_perm = torch.argsort(perm)  # original column -> position in the visiting order
    hinv = inverse_hessian_factor(hessian[perm][:, perm], percdamp).to(torch.float32)
    W = w.float()[:, perm].clone()  # [out, in], visiting order; never writes to `w`

    n_groups = n_in // gs
    group_of = perm // gs  # position -> group (original, contiguous groups)
    scales = torch.empty(n_out, n_groups, dtype=torch.float16, device=w.device)
    zeros = torch.zeros(n_out, n_groups, dtype=torch.uint8, device=w.device)
    chosen = [False] * n_groups
    codes = torch.empty(n_out, n_in, dtype=torch.float32, device=w.device)

    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # the block, updated eagerly
        err1 = torch.zeros_like(W1)  # scaled errors (w - q) / d of the block's columns
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(group_of[i1 + i])
            if not chosen[g]:
                cols = inv_perm[g * gs:(g + 1) * gs]  # positions of the group's columns, all >= i1 + i
                scales[:, g], zeros[:, g] = _group_params(_current(W, W1, err1, hinv, cols, i1, i2), spec)
                chosen[g] = True
            s, z = scales[:, g].float(), zeros[:, g].float() if spec.bits == 4 else 0
            col = W1[:, i]
            q = to_codes(col, s, z, spec.bits)
            codes[:, i1 + i] = q
            e = (col - (q - z) * s) / hinv1[i, i]
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    codes = codes[:, inv_perm]  # back to the original column order
    if spec.bits == 4:
        return int4_from_codes(codes, scales, zeros, gs, spec.symmetric)
    return Int8Weight(codes.to(torch.int8), scales[:, 0] if spec.group_size is None else scales)


def _current(W, W1, err1, hinv, cols, i1: int, i2: int) -> torch.Tensor:
    """The up-to-date values [out, len(cols)] of not-yet-quantized columns at visiting positions `cols`.

    Columns inside the block already carry every update (W1); columns after it still owe the pending part of this
    block's lazy update, err1 @ hinv[block, col] (err1 is zero for the block's unvisited columns).
    """
    inside = cols < i2
    out = torch.empty(W.shape[0], cols.numel(), dtype=W.dtype, device=W.device)
    out[:, inside] = W1[:, cols[inside] - i1]
    later = cols[~inside]
    if later.numel():
        out[:, ~inside] = W[:, later] - err1 @ hinv[i1:i2][:, later]
    return out


def _group_params(values: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's weights [out, g] -> (fp16 scale [out], uint8 zero [out]) on the shared grid."""
    if spec.bits == 4:
        return int4_params(values, spec.symmetric)
    return int8_params(values), torch.zeros(values.shape[0], dtype=torch.uint8, device=values.device)


def gptq_quantize_stacked(w: torch.Tensor, hessians, spec: QuantSpec, **kwargs) -> QuantizedWeight:
    """Stacked experts w [E, out, in] with one Hessian per expert ([E, in, in] or a sequence) -> stacked weight."""
    if w.dim() != 3 or len(hessians) != w.shape[0]:
        raise ValueError(f"expected w [E, out, in] and E Hessians, got {list(w.shape)} and {len(hessians)}")
    parts = [gptq_quantize(w[e], hessians[e], spec, **kwargs) for e in range(w.shape[0])]
    return (Int4Weight if spec.bits == 4 else Int8Weight).stack(parts)
