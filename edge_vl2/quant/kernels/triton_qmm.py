"""Triton matmuls straight from the canonical quantized layout (no repacking): y = x @ dequant(W)^T.

Weights are read as stored on disk (see edge_vl2.quant.formats), one expert or a stack [E, ...]:
    INT4  qweight uint8 [N, K/2] (low nibble first), scales fp16 [N, K/g], zeros uint8 [N, ceil(K/g / 2)] or none (8)
    INT8  qweight int8 [N, K], scales fp16 [N] (per channel) or [N, K/g]
and dequantized tile by tile in registers: value = (code - zero) * scale.

Two kernels:
- `qmm`: x [M, K] times one expert's weight, tiled M x N with `tl.dot` (prefill, dense layers).
- `qmm_rows`: row r of x [R, K] times expert `expert_ids[r]`'s weight, a GEMV per row (MoE decode: the k chosen
  experts of a token in ONE launch, no host sync, so the step can be captured in a CUDA graph).

Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (tests); there the dot runs in fp32 because the
interpreter's bf16 `tl.dot` returns garbage (triton 3.x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_interpreting


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, n, k, n_mask, k_mask, K, N_GROUPS, Z_COLS, GROUP,
                  BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """fp32 tile [BLOCK_N, BLOCK_K] of the dequantized weight at rows n, columns k (pointers at one expert)."""
    mask = n_mask[:, None] & k_mask[None, :]
    g = k[None, :] // GROUP
    if BITS == 4:
        byte = tl.load(q_ptr + n[:, None] * (K // 2) + k[None, :] // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((k[None, :] % 2) * 4)) & 0xF
        if HAS_ZEROS:
            zbyte = tl.load(z_ptr + n[:, None] * Z_COLS + g // 2, mask=mask, other=0).to(tl.int32)
            code = code - ((zbyte >> ((g % 2) * 4)) & 0xF)
        else:
            code = code - 8
    else:
        code = tl.load(q_ptr + n[:, None] * K + k[None, :], mask=mask, other=0).to(tl.int32)
    if PER_CHANNEL:
        scale = tl.load(s_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    else:
        scale = tl.load(s_ptr + n[:, None] * N_GROUPS + g, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale


@triton.jit
def _qmm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, N_GROUPS, Z_COLS, GROUP, stride_xm, stride_ym,
                BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_CHANNEL: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, n, k, n_mask, k_mask, K, N_GROUPS, Z_COLS, GROUP,
                          BITS, HAS_ZEROS, PER_CHANNEL)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        else:  # tensor cores: the weight tile in the activation dtype, fp32 accumulation
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _qmm_rows_kernel(x_ptr, e_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, K, N_GROUPS, Z_COLS, GROUP, stride_xm, stride_ym,
                     stride_qe, stride_se, stride_ze,
                     BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    e = tl.load(e_ptr + r).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + r * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
        w = _dequant_tile(q_ptr + e * stride_qe, s_ptr + e * stride_se, z_ptr + e * stride_ze, n, k, n_mask, k_mask,
                          K, N_GROUPS, Z_COLS, GROUP, BITS, HAS_ZEROS, PER_CHANNEL)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + r * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def _layout(qweight: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int | None) -> dict:
    """Kernel size arguments for one weight (qweight already flattened to [..., N, K/2] or [..., N, K])."""
    n = qweight.shape[-2]
    k = qweight.shape[-1] * (2 if bits == 4 else 1)
    per_channel = group is None
    return dict(N=n, K=k, N_GROUPS=1 if per_channel else k // group, Z_COLS=0 if zeros is None else zeros.shape[-1],
                GROUP=k if per_channel else group, BITS=bits, HAS_ZEROS=zeros is not None, PER_CHANNEL=per_channel)


def qmm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
        group: int | None) -> torch.Tensor:
    """x [M, K] @ dequant(W [N, K])^T -> [M, N] in x's dtype. qweight: INT4 uint8 [N, K/2] or INT8 int8 [N, K]."""
    x = x.contiguous()
    lay = _layout(qweight, zeros, bits, group)
    m = x.shape[0]
    y = torch.empty(m, lay["N"], dtype=x.dtype, device=x.device)
    interp = triton_interpreting()
    block_m = 16 if m <= 16 else 64
    block_n, block_k = (128, 128) if interp else (64, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(lay["N"], block_n))
    _qmm_kernel[grid](x, qweight, scales, scales if zeros is None else zeros, y, m, lay["N"], lay["K"],
                      lay["N_GROUPS"], lay["Z_COLS"], lay["GROUP"], x.stride(0), y.stride(0),
                      BITS=bits, HAS_ZEROS=lay["HAS_ZEROS"], PER_CHANNEL=lay["PER_CHANNEL"],
                      DOT_FP32=interp or x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def qmm_rows(x: torch.Tensor, expert_ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             zeros: torch.Tensor | None, bits: int, group: int | None) -> torch.Tensor:
    """Row r of x [R, K] times expert expert_ids[r] of a stacked weight [E, N, ...] -> [R, N] in x's dtype."""
    x = x.contiguous()
    ids = expert_ids.to(torch.int32).contiguous()
    lay = _layout(qweight, zeros, bits, group)
    r = x.shape[0]
    y = torch.empty(r, lay["N"], dtype=x.dtype, device=x.device)
    block_n, block_k = (128, 128) if triton_interpreting() else (64, 128)
    grid = (r, triton.cdiv(lay["N"], block_n))
    _qmm_rows_kernel[grid](x, ids, qweight, scales, scales if zeros is None else zeros, y, lay["N"], lay["K"],
                           lay["N_GROUPS"], lay["Z_COLS"], lay["GROUP"], x.stride(0), y.stride(0),
                           qweight.stride(0), scales.stride(0), 0 if zeros is None else zeros.stride(0),
                           BITS=bits, HAS_ZEROS=lay["HAS_ZEROS"], PER_CHANNEL=lay["PER_CHANNEL"],
                           BLOCK_N=block_n, BLOCK_K=block_k)
    return y
