"""QuantLinear (edge_vl2.quant.linear; its kernels in edge_vl2.quant.ops): every backend == its dequantized fp32 reference
within a stated tolerance.

The cpu backend's PyTorch ops are checked here (kernel="torch"); its default kernel where it builds, qkern, rounds
activations to int8 instead and has its own file (tests/test_qkern.py).

Tolerance of the bf16 backends (cpu on PyTorch's ops; cuda on a GPU). The packed ops round, each to 8 significant bits (relative
error <= u = 2^-9): the activations, the scales, PyTorch's INT4 zero offset (8 - z) * s, and the output. The weight
the op multiplies by is (c - 8) * s' + zero', so per output element

    |y - y_ref| <= u * sum_k |x_k| |w_k|            (activation rounding)
                 + u * sum_k |x_k| A_k              (scale / zero rounding; A = |c - 8| s + |8 - z| s for INT4, |w| for
                                                     INT8; A is not bounded by |w|: an asymmetric code equal to its
                                                     zero point still carries both terms)
                 + u * |y_ref|                      (output rounding)
                 + fp32 accumulation (~1e-7 relative, negligible).

We check it with a safety factor of 4 (kernels may also round the dequantized weight to bf16 internally):
|y - y_ref| <= 2^-7 * (|x| @ (|w| + A)^T) + 2^-7 * |y_ref|. On random data the relative Frobenius error is
~2e-3-3e-3; we also require it < 1e-2. The reference backend runs the reference's own fp32 op: 1e-6. bnb
re-quantizes (NF4 / LLM.int8), so it is checked against the weight bitsandbytes actually holds.
"""

from __future__ import annotations

import pytest
import torch

from edge_vl2.quant.kernels import triton_status
from edge_vl2.quant.linear import BACKENDS, QuantLinear, available_backends
from edge_vl2.quant.ops.cpu import CpuInt4Op, int4_scales_and_zeros
from edge_vl2.quantize.formats import Int4Weight, Int8Weight, quantize_rtn_int4, quantize_rtn_int8

U = 2.0 ** -9  # bf16 unit roundoff
REL_FRO = 1e-2

FORMATS = {
    "int8-channel": lambda w: quantize_rtn_int8(w),
    "int8-g64": lambda w: quantize_rtn_int8(w, 64),
    "int4-g32-sym": lambda w: quantize_rtn_int4(w, 32, True),
    "int4-g32-asym": lambda w: quantize_rtn_int4(w, 32, False),
    "int4-g64-sym": lambda w: quantize_rtn_int4(w, 64, True),
    "int4-g64-asym": lambda w: quantize_rtn_int4(w, 64, False),
    "int4-g128-sym": lambda w: quantize_rtn_int4(w, 128, True),
    "int4-g128-asym": lambda w: quantize_rtn_int4(w, 128, False),
}
TRITON_OK, TRITON_WHY = triton_status()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"cuda backend not testable here: {TRITON_WHY}")
needs_bnb = pytest.mark.skipif(not available_backends()["bnb"].available, reason="bitsandbytes is not installed")


def _weight(out: int = 96, inp: int = 256, seed: int = 0) -> torch.Tensor:
    """Heavy tails (Tukey-h, h = 0.15) and one outlier input column, like trained projections."""
    z = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    w = z * torch.exp(0.075 * z * z) / inp ** 0.5
    w[:, 7] *= 8.0
    return w


def _x(rows: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, inp, generator=torch.Generator().manual_seed(seed))


def _magnitude(w: Int4Weight | Int8Weight) -> torch.Tensor:
    """|w| + A (see the module docstring), fp32 [out, in]."""
    deq = w.dequantize()
    if w.bits == 8:
        return 2 * deq.abs()
    g = w.group_size
    codes = torch.stack([w.qweight & 0x0F, w.qweight >> 4], dim=-1).flatten(-2).float()  # [out, in/g, g]
    s = w.scales.float()[..., None]
    a = (codes - 8).abs() * s + (8 - w.zero_points().float()[..., None]).abs() * s
    return deq.abs() + a.flatten(-2)


def assert_bf16_close(y: torch.Tensor, x: torch.Tensor, w: Int4Weight | Int8Weight) -> None:
    ref = x.double() @ w.dequantize().double().T
    bound = 4 * U * (x.abs().double() @ _magnitude(w).double().T) + 4 * U * ref.abs()
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"elementwise bound broken: worst err/bound {float((err / bound).max()):.2f}"
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < REL_FRO, rel


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_cpu_backend_matches_dequantized_reference(fmt, rows):
    w = FORMATS[fmt](_weight())
    layer = QuantLinear(w, "cpu", torch.float32, kernel="torch")
    x = _x(rows, 256)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    assert_bf16_close(y, x, w)


@pytest.mark.parametrize("fmt", ["int8-channel", "int8-g64", "int4-g32-asym", "int4-g128-sym"])
@pytest.mark.parametrize("cache", [True, False])
def test_reference_backend_is_the_fp32_dequantized_matmul(fmt, cache):
    w = FORMATS[fmt](_weight())
    x = _x(17, 256)
    y = QuantLinear(w, "reference", torch.float32, cache=cache)(x)
    torch.testing.assert_close(y, x @ w.dequantize().T, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("fmt", ["int8-channel", "int8-g64", "int4-g32-asym", "int4-g64-sym", "int4-g128-asym"])
@pytest.mark.parametrize("rows", [1, 17])
def test_cuda_backend_triton_kernel_matches_reference(fmt, rows):
    w = FORMATS[fmt](_weight())
    layer = QuantLinear(w, "cuda", torch.float32, kernel="triton")
    assert "triton" in layer.describe()
    x = _x(rows, 256)
    assert_bf16_close(layer(x), x, w)  # fp32 under the interpreter (~1e-7); the bf16 bound covers a GPU


@pytest.mark.parametrize("fmt", ["int8-channel", "int8-g64", "int4-g32-sym", "int4-g64-asym", "int4-g128-asym"])
def test_cpu_ops_read_identity_activations_back_exactly(fmt):
    """x = I reads W^T back; with power-of-two scales every rounding is exact, so this pins the packed layouts and
    the (c - z) * s -> (c - 8) * scale + zero mapping (incl. asymmetric zeros) bit for bit."""
    w = FORMATS[fmt](_weight(out=32, inp=128))
    scales = torch.exp2(torch.randint(-6, 2, w.scales.shape, generator=torch.Generator().manual_seed(3)).float())
    w = type(w)(**{**w.tensors(), "scales": scales.half()})
    y = QuantLinear(w, "cpu", torch.float32, kernel="torch")(torch.eye(128))
    assert torch.equal(y, w.dequantize().T)


def test_int4_scales_and_zeros_layout():
    w = quantize_rtn_int4(_weight(out=32, inp=128), 32, symmetric=False)
    sz = int4_scales_and_zeros(w)
    assert sz.shape == (4, 32, 2) and sz.dtype == torch.bfloat16  # [K/g, N, (scale, zero)]
    s, z = w.scales.float(), w.zero_points().float()
    torch.testing.assert_close(sz[..., 0].float(), s.T.bfloat16().float())
    torch.testing.assert_close(sz[..., 1].float(), ((8 - z) * s).T.bfloat16().float())
    assert (int4_scales_and_zeros(quantize_rtn_int4(_weight(32, 128), 32, True))[..., 1] == 0).all()


def test_leading_dims_dtypes_and_placeholder_weight():
    w = quantize_rtn_int4(_weight(), 64, True)
    layer = QuantLinear(w, "cpu", torch.bfloat16)
    x = _x(6, 256).view(2, 3, 256)
    for dtype in (torch.float32, torch.bfloat16):
        y = layer(x.to(dtype))
        assert y.shape == (2, 3, 96) and y.dtype == dtype
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.numel() == 0 and layer.weight.device == x.device
    assert layer.nbytes < w.dequantize().numel() * 2  # holds the packed weight, not a bf16 copy


def test_construction_does_not_write_the_canonical_tensors():
    w = quantize_rtn_int4(_weight(), 32, False)
    before = {k: v.clone() for k, v in w.tensors().items()}
    for backend in ("reference", "cpu"):
        QuantLinear(w, backend)(_x(3, 256))
    assert all(torch.equal(before[k], v) for k, v in w.tensors().items())


@pytest.mark.parametrize("w", [quantize_rtn_int8(torch.randn(16, 20)),  # K % 8: torch's int8 op would segfault
                               quantize_rtn_int4(torch.randn(24, 64), 32),  # N % 16: the packed int4 op refuses
                               quantize_rtn_int4(torch.randn(32, 48), 16)],  # g16: likewise
                         ids=["int8-k20", "int4-n24", "int4-g16"])
def test_cpu_runs_shapes_its_packed_ops_cannot_take(w):
    """Every weight the export can write runs on the default backend: such shapes take the fp32 dequantize path,
    so they match the reference up to the bf16 rounding of the input (<= 2^-8 relative per element)."""
    x = torch.randn(3, w.shape[1])
    layer = QuantLinear(w, "cpu", torch.float32, kernel="torch")
    assert "dequantize" in layer.describe()
    want = x.to(torch.bfloat16).float() @ w.dequantize(torch.float32).T
    got = layer(x)
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_kernel_limits_are_clear_errors_not_crashes():
    with pytest.raises(ValueError, match="unknown backend"):
        QuantLinear(quantize_rtn_int8(torch.randn(16, 16)), "tpu")
    with pytest.raises(ValueError, match="stacked experts go to QuantExperts"):
        QuantLinear(quantize_rtn_int8(torch.randn(2, 16, 16)), "cpu")


def test_available_backends_lists_every_backend_with_a_reason():
    info = available_backends()
    assert set(info) == set(BACKENDS)
    assert info["reference"].available and info["cpu"].available  # torch >= 2.6 CPU builds have the packed ops
    assert all(b.detail for b in info.values())
    assert "INT4 g128 asym" in QuantLinear(quantize_rtn_int4(_weight(), 128, False), "cpu").describe()
    assert isinstance(QuantLinear(quantize_rtn_int4(_weight(), 128, False), "cpu", kernel="torch").op, CpuInt4Op)


@needs_bnb
@pytest.mark.parametrize("fmt", ["int8-channel", "int4-g64-asym"])
@pytest.mark.parametrize("rows", [1, 17])
def test_bnb_backend(fmt, rows):
    """bitsandbytes re-quantizes: == a matmul with the weight it holds (bf16 tolerance); vs our format: LLM.int8 of an
    INT8 per-channel weight is nearly lossless (< 1e-2), NF4 of an INT4 weight adds NF4's own error (< 0.2)."""
    w = FORMATS[fmt](_weight())
    layer = QuantLinear(w, "bnb", torch.float32)
    x = _x(rows, 256)
    y = layer(x).double()
    own = x.double() @ layer.op.dequantized().double().T
    assert float((y - own).norm() / own.norm()) < REL_FRO
    ref = x.double() @ w.dequantize().double().T
    assert float((y - ref).norm() / ref.norm()) < (REL_FRO if w.bits == 8 else 0.2)


@needs_bnb
def test_bnb_from_float_is_a_usable_baseline():
    w = _weight()
    layer = QuantLinear.bnb_from_float(w, "nf4")
    x = _x(3, 256)
    ref = x @ w.T
    assert float((layer(x) - ref).norm() / ref.norm()) < 0.2
