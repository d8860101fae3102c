"""qkern (edge_vl2/quant/kernels/qkern.c through its ctypes wrapper): every instruction-set tier this CPU has, every
format the export writes, == the same math written independently in torch (tests/_qkern_reference.py).

Two claims, two tolerances:
1. Exactness of the kernels. On the SIMD tiers (mode 0) qkern multiplies the dequantized weight by the activations
   rounded to int8 per 32 (x_hat); its integer dot products are exact, so it equals x_hat @ W^T up to fp32 summation
   order and the fp32 rounding of block scale products: ~sqrt(K) * 6e-8 relative. Mode 1 and the scalar tier multiply
   the exact activations. Bound: relative Frobenius error <= 1e-5 against the fp64 product (measured ~3e-7).
2. The activation rounding itself (the only approximation qkern adds to the weight quantization): each rounded
   activation moves by at most half its block's step d = max|x_block| / 127, so elementwise
   |y - x W^T| <= |W| (d/2)^T, a rigorous bound (plus the fp32 slack of claim 1). On Gaussian activations the
   relative error is ~5e-3 per product (RMS rounding error d / sqrt(12) against RMS ~ max / 2.5 of a 32-block).
The end-to-end effect on the decoder is measured in tests/test_quantized_model.py and README "Measured".
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from edge_vl2.quant.experts import QuantExperts
from edge_vl2.quant.kernels import qkern
from edge_vl2.quant.linear import QuantLinear, make_op, uses_qkern
from edge_vl2.quant.ops import CpuInt4Op, QkernOp
from edge_vl2.quantize.formats import quantize_rtn_int4, quantize_rtn_int8

from _qkern_reference import round_q8, rounding_bound

OK, WHY = qkern.status()
pytestmark = pytest.mark.skipif(not OK, reason=f"qkern not usable here: {WHY}")
TIERS = list(qkern.ISAS[: qkern.ISAS.index(qkern.best_isa()) + 1]) if OK else []
EXACT = 1e-5

FORMATS = {
    "int8-channel": lambda w: quantize_rtn_int8(w),
    "int8-g64": lambda w: quantize_rtn_int8(w, 64),
    "int8-g128": lambda w: quantize_rtn_int8(w, 128),
    "int4-g32-sym": lambda w: quantize_rtn_int4(w, 32, True),
    "int4-g32-asym": lambda w: quantize_rtn_int4(w, 32, False),
    "int4-g64-sym": lambda w: quantize_rtn_int4(w, 64, True),
    "int4-g128-sym": lambda w: quantize_rtn_int4(w, 128, True),
    "int4-g128-asym": lambda w: quantize_rtn_int4(w, 128, False),
}


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed rows (Tukey-h) and an outlier input column, like trained projections."""
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    w = z * torch.exp(0.075 * z * z) / shape[-1] ** 0.5
    w[..., 7] *= 8.0
    return w


def _x(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 20.0  # an outlier channel: its block's step is 20x coarser
    return x


@pytest.fixture(params=TIERS)
def tier(request):
    """Each tier this CPU has, capped for the test and restored after."""
    before = qkern.isa()
    assert qkern.set_isa(request.param) == request.param
    yield request.param
    qkern.set_isa(before)


def _expected(x: torch.Tensor, w: torch.Tensor, tier: str, mode: int) -> torch.Tensor:
    xin = x.float() if tier == "scalar" or mode == 1 else round_q8(x)
    return xin.double() @ w.double().T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
def test_linear_equals_the_rounded_activation_math_on_every_tier(tier, fmt, rows):
    w = FORMATS[fmt](_weight(3, 72, 256))  # stacked, expert 2; N = 72 leaves a partial 4-row block
    m = qkern.QMat.of(w)
    deq = w.dequantize()[2]
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(rows, 256).to(dtype)
        for mode in (0, 1):
            y = qkern.linear(m, x, expert=2, mode=mode)
            assert y.shape == (rows, 72) and y.dtype == torch.float32
            assert _rel(y, _expected(x, deq, tier, mode)) <= EXACT, (dtype, mode)


@pytest.mark.parametrize("rows", [1, 3])
def test_linear_many_equals_one_call_per_weight(tier, rows):
    """q, k, v-like weights of one input (rows that are not multiples of the 64-row chunk) in one call: the same
    numbers, bit for bit, as one call per weight, concatenated."""
    ws = [quantize_rtn_int4(_weight(n, 256, seed=n), 64, True) for n in (200, 72, 72)]
    mats = [qkern.QMat.of(w) for w in ws]
    x = _x(rows, 256).to(torch.bfloat16)
    assert torch.equal(qkern.linear_many(mats, x), torch.cat([qkern.linear(m, x) for m in mats], dim=1))
    with pytest.raises(RuntimeError, match="-3"):  # a weight of another K
        qkern.linear_many(mats + [qkern.QMat.of(quantize_rtn_int4(_weight(8, 128), 64, True))], x)


@pytest.mark.parametrize("n", [200, 5000])  # 64-row chunks; a tall weight's chunks of 128
def test_threads_split_rows_without_changing_the_result(tier, n):
    w = quantize_rtn_int4(_weight(n, 512), 128, False)
    x = _x(3, 512)
    qkern.set_threads(1)
    one = qkern.linear(qkern.QMat.of(w), x)
    qkern.set_threads(2)
    try:
        two = qkern.linear(qkern.QMat.of(w), x)
    finally:
        qkern.set_threads(None)
    assert torch.equal(one, two)  # each output row is computed by one thread, in the same order


def test_threads_split_the_moe_step_without_changing_the_result(tier):
    """Threads take chunks of rows from a shared counter: whichever thread runs a row, it computes it in one order."""
    routed, shared = _moe_weights("int4-g128-sym")
    mats = tuple(qkern.QMat.of(w) for w, _ in routed)
    smats = tuple(qkern.QMat.of(w) for w, _ in shared)
    x = _x(2, 256).to(torch.bfloat16)
    ids, weights = torch.tensor([[0, 5, 2], [5, 0, 7]]), torch.rand(2, 3, generator=torch.Generator().manual_seed(3))
    outs = []
    for n in (1, 2, 3):
        qkern.set_threads(n)
        try:
            outs.append(qkern.moe(*mats, x, ids, weights, smats))
        finally:
            qkern.set_threads(None)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("fmt", ["int8-channel", "int4-g32-asym", "int4-g128-sym"])
def test_activation_rounding_stays_within_its_bound(fmt):
    """Against the exact activations: elementwise within |W| (d/2)^T (claim 2), on the tier in force."""
    w = FORMATS[fmt](_weight(96, 1280))
    deq = w.dequantize()
    x = _x(5, 1280)
    exact = x.double() @ deq.double().T
    err = (qkern.linear(qkern.QMat.of(w), x).double() - exact).abs()
    bound = rounding_bound(deq, x) + EXACT * exact.abs().max()
    assert (err <= bound).all(), float((err / bound).max())
    if qkern.isa() != "scalar":
        assert 1e-3 < _rel(qkern.linear(qkern.QMat.of(w), x), exact) < 2e-2  # it does round, by ~5e-3


@functools.cache
def _moe_weights(fmt: str):
    """(gate, up, down) [8 experts, I 128, H 256] in fmt, shared (gate, up, down) in INT4 g64 / INT8, each with its
    fp64 dequantized values."""
    e, h, i = 8, 256, 128
    routed = [FORMATS[fmt](_weight(*s, seed=n)) for n, s in enumerate([(e, i, h), (e, i, h), (e, h, i)])]
    shared = [quantize_rtn_int4(_weight(2 * i, h, seed=4), 64, True),
              quantize_rtn_int4(_weight(2 * i, h, seed=5), 64, True), quantize_rtn_int8(_weight(h, 2 * i, seed=6))]
    return [(w, w.dequantize().double()) for w in routed], [(w, w.dequantize().double()) for w in shared]


def _moe_reference(x, routed, ids, weights, shared, tier):
    """sum_j w_j down_e(silu(gate_e x) * up_e x) + shared(x), each product fed as qkern feeds it."""
    r = (lambda v: v.float()) if tier == "scalar" else round_q8
    g, u, d = (deq for _, deq in routed)
    out = torch.zeros(x.shape[0], d.shape[-2], dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = r(x[t:t + 1]).double()
        for j, e in enumerate(ids[t].tolist()):
            h = (F.silu(xt @ g[e].T) * (xt @ u[e].T)).float()
            out[t] += weights[t, j] * (r(h).double() @ d[e].T)[0]
        if shared is not None:
            sg, su, sd = (deq for _, deq in shared)
            h = (F.silu(xt @ sg.T) * (xt @ su.T)).float()
            out[t] += (r(h).double() @ sd.T)[0]
    return out


@pytest.mark.parametrize("fmt", ["int8-channel", "int4-g32-asym", "int4-g64-sym", "int4-g128-sym"])
@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize("fused", [False, True], ids=["gate,up", "gate+up"])
def test_moe_step_equals_per_expert_math(tier, fmt, tokens, fused):
    """One call: routed top-3 of 8 (tokens share experts: read once for all of them) + shared experts in another
    format, gate and up given apart or fused into one [E, 2I, H] tensor."""
    routed, shared = _moe_weights(fmt)
    (gate, _), (up, _), (down, _) = routed
    x = _x(tokens, 256).to(torch.bfloat16)
    ids = torch.tensor([[0, 5, 2], [5, 0, 7], [1, 2, 3], [4, 6, 0], [7, 5, 6]])[:tokens]
    weights = torch.rand(tokens, 3, generator=torch.Generator().manual_seed(7))
    if fused:
        from edge_vl2.quant.experts import concat_out

        mats = (qkern.QMat.of(concat_out(gate, up)), None, qkern.QMat.of(down))
    else:
        mats = tuple(qkern.QMat.of(w) for w in (gate, up, down))
    got = qkern.moe(*mats, x, ids, weights, tuple(qkern.QMat.of(w) for w, _ in shared))
    # SiLU's exp is a polynomial (2e-7 relative) and a rounding tie may land on the other side: 10x claim 1
    assert _rel(got, _moe_reference(x, routed, ids, weights, shared, tier)) <= 10 * EXACT
    alone = qkern.moe(*mats, x, ids, weights)
    assert _rel(alone, _moe_reference(x, routed, ids, weights, None, tier)) <= 10 * EXACT


def test_cpu_backend_picks_qkern_reads_in_place_and_falls_back(monkeypatch):
    w = quantize_rtn_int4(_weight(64, 256), 128, True)
    op = make_op(w, "cpu")
    assert isinstance(op, QkernOp) and "qkern" in op.describe()
    assert op.qweight.data_ptr() == w.qweight.data_ptr()  # the canonical tensor itself: no second copy
    assert op.nbytes == op.decode_nbytes == w.nbytes
    assert isinstance(make_op(w, "cpu", kernel="torch"), CpuInt4Op)
    monkeypatch.setenv("EDGE_VL2_CPU_KERNEL", "torch")
    assert isinstance(make_op(w, "cpu"), CpuInt4Op)
    odd = quantize_rtn_int8(_weight(16, 48))  # in_features not a multiple of 32
    monkeypatch.delenv("EDGE_VL2_CPU_KERNEL")
    assert not uses_qkern(odd, "cpu") and not isinstance(make_op(odd, "cpu"), QkernOp)
    with pytest.raises(ValueError, match="multiples of 32"):
        make_op(odd, "cpu", kernel="qkern")
    with pytest.raises(ValueError, match="must be one of"):
        make_op(w, "cpu", kernel="fast")


def test_project_runs_a_layers_qkv_in_one_call_with_the_same_numbers(monkeypatch):
    """edge_vl2.model.layers.project over QuantLinear layers on qkern: one qk_linear_many call for few rows, bit for
    bit the separate layers' outputs; many rows, other formats or other kernels go one layer at a time."""
    from edge_vl2.model.layers import project

    ws = [quantize_rtn_int4(_weight(n, 256, seed=n), 64, True) for n in (128, 64, 64)]
    layers = [QuantLinear(w, "cpu") for w in ws]
    calls, real_many = [], qkern.linear_many
    monkeypatch.setattr(qkern, "linear_many", lambda *a, **k: calls.append(1) or real_many(*a, **k))
    for rows in (1, 3, 64):
        x = _x(rows, 256).to(torch.bfloat16)
        got = project(x, *layers)
        assert all(torch.equal(g, layer(x)) for g, layer in zip(got, layers))
    assert len(calls) == 2  # 1 and 3 rows; 64 rows take the fp32 dequantize path per layer
    mixed = [layers[0], QuantLinear(quantize_rtn_int8(_weight(64, 256)), "cpu")]
    assert layers[0].forward_many(_x(1, 256), mixed[1:]) is None
    torch_ops = [QuantLinear(w, "cpu", kernel="torch") for w in ws]
    assert torch_ops[0].forward_many(_x(1, 256), torch_ops[1:]) is None



def test_quant_experts_on_qkern_are_not_fused_and_run_one_call():
    gate, up, down = (quantize_rtn_int4(_weight(*s, seed=n), 64, True)
                      for n, s in enumerate([(8, 64, 128), (8, 64, 128), (8, 128, 64)]))
    experts = QuantExperts.stacked(gate, up, down, "cpu")
    assert not experts.fused  # a fused copy would double the memory of gate and up
    ref = QuantExperts.stacked(gate, up, down, "reference")
    x = _x(2, 128)
    ids, weights = torch.tensor([[1, 6, 3], [6, 0, 2]]), torch.rand(2, 3)
    step = experts.moe_step(x, ids, weights)
    per_slot = ref.per_chosen_expert(round_q8(x) if qkern.isa() != "scalar" else x, ids)
    assert _rel(step, (per_slot * weights[..., None]).sum(1).double()) < 1e-2  # down's input rounds too (claim 2)
    assert QuantExperts.stacked(gate, up, down, "cpu", kernel="torch").moe_step(x, ids, weights) is None


def test_linear_layer_on_qkern_keeps_the_fp32_path_for_many_rows():
    from edge_vl2.quant.ops import PREFILL_DEQUANT_MIN_ROWS

    w = quantize_rtn_int4(_weight(48, 256), 64, False)
    layer = QuantLinear(w, "cpu", torch.float32)
    x = _x(PREFILL_DEQUANT_MIN_ROWS, 256)
    exact = x.double() @ w.dequantize().double().T
    assert _rel(layer(x), exact) < EXACT  # dequantized per block, exact activations


def _run(env: dict, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    return proc.stdout.strip()


def test_isa_and_threads_come_from_the_environment():
    code = "import torch; from edge_vl2.quant.kernels import qkern; print(qkern.status())"
    assert "qkern scalar" in _run({"EDGE_VL2_CPU_ISA": "scalar"}, code)
    if "avx2" in TIERS:
        out = _run({"EDGE_VL2_CPU_ISA": "avx2", "EDGE_VL2_CPU_THREADS": "2"}, code)
        assert "qkern avx2" in out and "2 thread(s)" in out
    out = _run({"EDGE_VL2_CPU_ISA": "avx512"}, code)
    assert "False" in out and "EDGE_VL2_CPU_ISA='avx512'" in out
