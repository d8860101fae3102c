"""GPTQ and its calibration statistics.

What is proved: GPTQ's layer error ||W X - Q(W) X||^2 beats RTN's on held-out inputs at the same bits/group; with a
diagonal Hessian GPTQ *is* RTN (same codes, act-order permutation undone); lazy batching changes nothing; the
Hessian accumulators compute the documented weighted means; and for a rarely routed expert (2 calibration tokens)
the all-tokens, affinity-weighted Hessian gives a far better GPTQ than the 2-token routed one.

Synthetic data: Student-t (3 dof) weights; inputs x = (z + f B) * s with z ~ N(0, I), an 8-factor shared component
f B (correlated channels, shared variance 2 vs 1 of noise) and 4-8 outlier channels scaled 10x.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_vl2.quantize.formats import Int4Weight, Int8Weight, QuantSpec
from edge_vl2.quantize.gptq import gptq_quantize, gptq_quantize_stacked
from edge_vl2.quantize.hessian import ExpertHessians, HessianAccumulator, expert_intermediate, weighted_error
from edge_vl2.quantize.rtn import quantize_rtn


def student_t(*shape: int, gen: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn(*shape, 3, generator=gen, dtype=torch.float64) ** 2).sum(-1) / 3
    return (scale * z / chi2.sqrt()).float()


class Inputs:
    """A stream of correlated activations with outlier channels (fixed structure, fresh samples per call)."""

    def __init__(self, dim: int, seed: int, factors: int = 8, outliers: int = 8):
        self.gen = torch.Generator().manual_seed(seed)
        self.mix = 0.5 * torch.randn(factors, dim, generator=self.gen)
        self.scale = torch.ones(dim)
        self.scale[torch.randperm(dim, generator=self.gen)[:outliers]] = 10.0

    def __call__(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.mix.shape[1], generator=self.gen)
        f = torch.randn(n, self.mix.shape[0], generator=self.gen)
        return (z + f @ self.mix) * self.scale  # [n, dim]


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over tokens of ||(W - W_hat) x||^2."""
    return float(((x @ (w - w_hat).T) ** 2).sum(-1).mean())


@pytest.fixture(scope="module")
def dense_case():
    gen = torch.Generator().manual_seed(100)
    w = student_t(64, 256, gen=gen)  # [out, in]
    inputs = Inputs(256, seed=0)
    calib, held_out = inputs(2048), inputs(2048)
    return w, hessian_of(calib), held_out


# --- GPTQ vs RTN ----------------------------------------------------------------------------------------------------

# Measured held-out error ratios GPTQ / RTN on this data over seeds 0-2: INT4 g128 0.36-0.40, g64 0.35-0.44,
# INT4 g128 asym 0.34-0.40, INT8 per channel 0.41-0.42 (act-order: 0.31-0.43). Asserted: <= 0.6.
@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(4, 64), QuantSpec(4, 128, symmetric=False),
                                  QuantSpec(8, None)], ids=["int4-g128", "int4-g64", "int4-g128-asym", "int8"])
def test_gptq_beats_rtn_on_held_out_inputs(dense_case, spec):
    w, h, held_out = dense_case
    rtn = quantize_rtn(w, spec)
    gptq = gptq_quantize(w, h, spec)
    assert type(gptq) is type(rtn) and gptq.shape == rtn.shape and gptq.group_size == rtn.group_size
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(gptq.tensors().values(),
                                                                          rtn.tensors().values()))
    ratio = layer_error(w, gptq.dequantize(), held_out) / layer_error(w, rtn.dequantize(), held_out)
    print(f"GPTQ/RTN held-out error {spec}: {ratio:.3f}")
    assert ratio <= 0.6
    # the calibration objective agrees: GPTQ lowers tr(dW H dW^T)
    assert weighted_error(w, gptq.dequantize(), h) < 0.6 * weighted_error(w, rtn.dequantize(), h)


def test_gptq_act_order_beats_rtn_and_undoes_the_permutation(dense_case):
    w, h, held_out = dense_case
    spec = QuantSpec(4, 64)
    q = gptq_quantize(w, h, spec, act_order=True)
    assert isinstance(q, Int4Weight) and q.shape == (64, 256)
    ratio = layer_error(w, q.dequantize(), held_out) / layer_error(w, quantize_rtn(w, spec).dequantize(), held_out)
    print(f"GPTQ act-order/RTN held-out error int4-g64: {ratio:.3f}")
    assert ratio <= 0.6


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False), QuantSpec(8, None),
                                  QuantSpec(8, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_exactly_rtn(spec, act_order):
    """No correlations -> no error feedback: GPTQ must produce RTN's bytes (same grid; permutation undone)."""
    gen = torch.Generator().manual_seed(1)
    w = student_t(16, 128, gen=gen)
    h = torch.diag(torch.rand(128, generator=gen) * 10 + 0.1)  # distinct diagonal: act-order really permutes
    q, rtn = gptq_quantize(w, h, spec, act_order=act_order), quantize_rtn(w, spec)
    assert all(torch.equal(a, b) for a, b in zip(q.tensors().values(), rtn.tensors().values()))


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_batches_match_column_by_column(dense_case, act_order):
    """Blocked updates (with the pending-update correction for group parameters) == eager updates, up to fp32."""
    w, h, _ = dense_case
    w, h = w[:16, :128], h[:128, :128]
    spec = QuantSpec(4, 32, symmetric=False)
    eager = gptq_quantize(w, h, spec, block_size=1, act_order=act_order).dequantize()
    lazy = gptq_quantize(w, h, spec, block_size=48, act_order=act_order).dequantize()  # blocks straddle groups
    close = torch.isclose(eager, lazy, rtol=1e-3, atol=1e-6).float().mean()
    assert close >= 0.99  # a code may flip where fp32 rounding lands on a half step


def reference_gptq(w: torch.Tensor, h: torch.Tensor, group: int, percdamp: float = 0.01) -> torch.Tensor:
    """Independent textbook form (OBS updates with an explicit inverse, downdated after each column; fp64; INT4 sym).

    Group scales from the group's current weights when its first column is reached, as in gptq.py.
    """
    n = w.shape[1]
    hinv = torch.linalg.inv(h.double() + percdamp * h.diagonal().mean().double() * torch.eye(n, dtype=torch.float64))
    w = w.double().clone()
    out = torch.empty_like(w)
    for j in range(n):
        if j % group == 0:
            scale = (w[:, j:j + group].abs().amax(-1) / 7).half()  # the stored fp16 grid (round-up aside)
            scale = torch.where(scale.double() < w[:, j:j + group].abs().amax(-1) / 7,
                                torch.nextafter(scale, torch.full_like(scale, 1e4)), scale).double()
        out[:, j] = torch.round(w[:, j] / scale).clamp(-8, 7) * scale
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]  # condition out column j
    return out.float()


def test_gptq_matches_an_independent_reference(dense_case):
    w, h, _ = dense_case
    w, h = w[:16, :64], h[:64, :64]
    ours = gptq_quantize(w, h, QuantSpec(4, 16), block_size=24).dequantize()
    ref = reference_gptq(w, h, 16)
    assert torch.isclose(ours, ref, rtol=1e-3, atol=1e-6).float().mean() >= 0.99


def test_dead_inputs_are_rounded_not_zeroed():
    gen = torch.Generator().manual_seed(2)
    w = student_t(8, 64, gen=gen)
    x = Inputs(64, seed=3)(512)
    x[:, :32] = 0  # the first half never fires during calibration
    q = gptq_quantize(w, hessian_of(x), QuantSpec(8, None))
    assert (q.qweight[:, :32] != 0).float().mean() > 0.9
    # an all-zero Hessian (an expert that saw nothing) is plain RTN
    zero_h = gptq_quantize(w, torch.zeros(64, 64), QuantSpec(4, 32))
    assert all(torch.equal(a, b) for a, b in zip(zero_h.tensors().values(),
                                                 quantize_rtn(w, QuantSpec(4, 32)).tensors().values()))


def test_gptq_stacked_experts_and_input_is_not_written():
    gen = torch.Generator().manual_seed(4)
    w = student_t(3, 8, 64, gen=gen)
    before = w.clone()
    inputs = Inputs(64, seed=5)
    hs = torch.stack([hessian_of(inputs(256)) for _ in range(3)])
    q = gptq_quantize_stacked(w, hs, QuantSpec(8, 32))
    assert isinstance(q, Int8Weight) and q.shape == (3, 8, 64) and q.scales.shape == (3, 8, 2)
    for e in range(3):
        single = gptq_quantize(w[e], hs[e], QuantSpec(8, 32))
        assert torch.equal(q.expert(e).qweight, single.qweight)
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="not divisible"):
        gptq_quantize(w[0, :, :48], hs[0, :48, :48], QuantSpec(4, 32))


# --- Hessian accumulators ---------------------------------------------------------------------------------------------

def test_hessian_accumulator_streams_and_weights():
    x = Inputs(32, seed=6)(300)
    one = HessianAccumulator(32, dtype=torch.float64)
    one.add(x)
    streamed = HessianAccumulator(32, dtype=torch.float64)
    for chunk in x.split(70):
        streamed.add(chunk)
    x64 = x.double()
    assert torch.allclose(one.hessian(), 2 * x64.T @ x64 / 300)
    assert torch.allclose(streamed.hessian(), one.hessian())
    # an integer weight equals repeating the token; zero-weight tokens do not count
    w = torch.randint(0, 3, (300,)).double()
    weighted = HessianAccumulator(32, dtype=torch.float64)
    weighted.add(x, w)
    repeated = HessianAccumulator(32, dtype=torch.float64)
    repeated.add(x.repeat_interleave(w.long(), dim=0))
    assert torch.allclose(weighted.hessian(), repeated.hessian())
    assert weighted.tokens == int((w > 0).sum())


def test_hessian_accumulator_hook():
    linear = nn.Linear(16, 4, bias=False)
    acc = HessianAccumulator(16)
    handle = acc.attach(linear)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        linear(x)
    handle.remove()
    linear(torch.randn(3, 16))  # after removal: not counted
    assert acc.tokens == 10 and torch.allclose(acc.hessian(), hessian_of(x.reshape(-1, 16)))


def test_expert_hessians_follow_their_definitions():
    gen = torch.Generator().manual_seed(7)
    n_exp, dim, inter, t = 4, 16, 8, 40
    x = torch.randn(t, dim, generator=gen)
    probs = torch.randn(t, n_exp, generator=gen).softmax(-1)
    weights, ids = probs.topk(2, dim=-1)
    gate, up = torch.randn(n_exp, inter, dim, generator=gen), torch.randn(n_exp, inter, dim, generator=gen)
    for fn, width in [(None, dim), (expert_intermediate(gate, up), inter)]:
        eh = ExpertHessians(n_exp, width, dtype=torch.float64)
        eh.add(x[:25], probs[:25], ids[:25], weights[:25], fn)
        eh.add(x[25:], probs[25:], ids[25:], weights[25:], fn)  # streaming
        for e in range(n_exp):
            xe = (fn(e, x) if fn else x).double()
            routed = (ids == e).any(-1)
            g = (weights * (ids == e)).sum(-1).double()
            h_r = 2 * (xe[routed] * g[routed, None]).T @ xe[routed] / g[routed].sum()
            h_a = 2 * (xe * probs[:, e, None].double()).T @ xe / probs[:, e].double().sum()
            assert torch.allclose(eh.hessian(e, "routed"), h_r)
            assert torch.allclose(eh.hessian(e, "all-tokens"), h_a)
            a = int(routed.sum()) / (int(routed.sum()) + width)
            assert torch.allclose(eh.hessian(e, "blend"), a * h_r + (1 - a) * h_a)
        assert eh.token_counts() == torch.bincount(ids.flatten(), minlength=n_exp).tolist()
        assert eh.stacked("all-tokens").shape == (n_exp, width, width)
    with pytest.raises(ValueError, match="mode"):
        eh.hessian(0, "oracle")


# --- balance the calibration: a rarely routed expert ---------------------------------------------------------------

@pytest.fixture(scope="module")
def rare_expert_case():
    """8 experts, top-2 softmax router; the calibration set is cut so that expert 0 is routed exactly 2 tokens."""
    gen = torch.Generator().manual_seed(10)
    n_exp, dim, inter = 8, 128, 64
    inputs = Inputs(dim, seed=0, outliers=4)
    router = torch.randn(n_exp, dim, generator=gen) / (2 * dim ** 0.5)
    gate, up = student_t(n_exp, inter, dim, gen=gen, scale=0.05), student_t(n_exp, inter, dim, gen=gen, scale=0.05)
    down = student_t(n_exp, dim, inter, gen=gen, scale=0.05)

    def route(x):
        probs = (x @ router.T).softmax(-1)
        weights, ids = probs.topk(2, dim=-1)
        return probs, ids, weights

    calib = inputs(1024)
    hit = (route(calib)[1] == 0).any(-1)
    keep = ~hit
    keep[hit.nonzero()[:2, 0]] = True  # keep only two of the tokens routed to expert 0
    calib = calib[keep]
    held_out, many = inputs(4000), inputs(4000)
    held_out = held_out[(route(held_out)[1] == 0).any(-1)]  # fresh tokens routed to expert 0
    many = many[(route(many)[1] == 0).any(-1)]  # an "oracle" calibration set for expert 0
    return dict(calib=calib, route=route(calib), held_out=held_out, many=many, gate=gate, up=up,
                gate_proj=gate, down_proj=down)


# Measured (seeds 0-2, INT4 g32/g64 and INT8; held-out error relative to RTN):
#   gate_proj: routed (2 tokens) 0.97-1.42, all-tokens 0.48-0.69, blend 0.48-0.71, oracle (~300 routed tokens) 0.35-0.66
#   down_proj: routed 1.31-2.54, all-tokens 0.59-0.91, blend 0.60-0.93, oracle 0.51-0.67
#   all-tokens / routed <= 0.68 everywhere. Asserted: all-tokens <= 0.8 x routed and < 0.95 x RTN.
@pytest.mark.parametrize("proj", ["gate_proj", "down_proj"])
def test_all_tokens_hessian_rescues_a_rarely_routed_expert(rare_expert_case, proj):
    c = rare_expert_case
    fn = expert_intermediate(c["gate"], c["up"]) if proj == "down_proj" else None
    stacked = c[proj]
    width = stacked.shape[2]
    eh = ExpertHessians(stacked.shape[0], width)
    eh.add(c["calib"], *c["route"], expert_inputs=fn)
    assert eh.token_counts()[0] == 2

    h_routed, h_all = eh.hessian(0, "routed"), eh.hessian(0, "all-tokens")
    h_many = hessian_of(fn(0, c["many"]) if fn else c["many"])
    assert int(torch.linalg.matrix_rank(h_routed)) == 2
    assert int(torch.linalg.matrix_rank(h_all)) == width  # full rank
    assert float(torch.linalg.cond(h_all)) < 10 * float(torch.linalg.cond(h_many))  # as well conditioned as it gets

    w, spec = stacked[0], QuantSpec(4, 32)
    x = fn(0, c["held_out"]) if fn else c["held_out"]
    rtn = layer_error(w, quantize_rtn(w, spec).dequantize(), x)
    err = {name: layer_error(w, gptq_quantize(w, h, spec).dequantize(), x) / rtn
           for name, h in [("routed", h_routed), ("all-tokens", h_all), ("blend", eh.hessian(0)), ("oracle", h_many)]}
    print(f"{proj} int4-g32 held-out error / RTN: " + ", ".join(f"{k} {v:.3f}" for k, v in err.items()))
    assert err["all-tokens"] <= 0.8 * err["routed"]
    assert err["all-tokens"] < 0.95
    assert err["blend"] <= 0.8 * err["routed"]  # 2 routed tokens vs prior 128: the blend is ~all-tokens
