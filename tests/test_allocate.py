"""Per-expert mixed precision: the greedy multiple-choice allocation and its effect on a real (test-size) model.

What is proved: the allocation respects the budget, spends it (cheapest everywhere at the minimum, the best format
everywhere at the maximum), never predicts more error with more bytes, and is within one upgrade of the brute-force
optimum of its own error model; the sensitivity pass measures what quantize_decoder really does (routing counts
equal the routed tokens, errors ordered INT8 < INT4 small group < INT4 large group); the mixed recipe quantizes to
exactly the bytes the allocation promised; and, measured by KL on held-out samples, the mixed allocation beats the
uniform recipe of the same byte count.
"""

from __future__ import annotations

import itertools
import random

import pytest

from edge_vl2.quantize.allocate import (
    ExpertSensitivity,
    allocate,
    expert_bytes,
    measure_sensitivity,
    mixed_recipe,
    routed_expert_bytes,
    spec_label,
)
from edge_vl2.quantize.fake_quant import decoder_bytes, swapped
from edge_vl2.quantize.fidelity import compare
from edge_vl2.quantize.formats import QuantSpec
from edge_vl2.quantize.model_gptq import quantize_decoder
from edge_vl2.quantize.recipe import INT8, Recipe, expert_name

from _toolchain import calibration, model, reference

G64, G16 = QuantSpec(4, 64), QuantSpec(4, 16)
CANDIDATES = [G64, G16, INT8]


def synthetic_sensitivities(n: int, seed: int) -> list[ExpertSensitivity]:
    """Experts with log-normal heat and errors that fall with bytes (costs as for hidden 64 / inter 32)."""
    rng = random.Random(seed)
    nbytes = {s: expert_bytes(s, 64, 32) for s in CANDIDATES}
    out = []
    for e in range(n):
        heat = rng.lognormvariate(0, 1)
        err = {G64: heat * rng.uniform(0.5, 2), G16: 0, INT8: 0}
        err[G16] = err[G64] * rng.uniform(0.3, 0.9)
        err[INT8] = err[G64] * rng.uniform(0.001, 0.01)
        out.append(ExpertSensitivity(1 + e // 4, e % 4, int(100 * heat), 0.0, err, nbytes))
    return out


def total(sens, choice) -> tuple[int, float]:
    return (sum(s.nbytes[c] for s, c in zip(sens, choice)), sum(s.errors[c] for s, c in zip(sens, choice)))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_allocation_against_brute_force(seed):
    sens = synthetic_sensitivities(6, seed)
    lo, hi = total(sens, [G64] * 6)[0], total(sens, [INT8] * 6)[0]
    previous = float("inf")
    for budget in range(lo, hi + 1, (hi - lo) // 12):
        a = allocate(sens, budget)
        bytes_, error = total(sens, [a.choice[(s.layer, s.expert)] for s in sens])
        assert bytes_ == a.expert_bytes <= budget and error == pytest.approx(a.expected_error)
        assert a.expected_error <= previous + 1e-12  # more bytes never predict more error
        previous = a.expected_error
        best = min(e for b, e in (total(sens, c) for c in itertools.product(CANDIDATES, repeat=6)) if b <= budget)
        # Greedy on the convex hulls is within one hull step of the optimum (the LP-relaxation bound)
        step = max(s.errors[G64] - s.errors[INT8] for s in sens)
        assert best <= a.expected_error <= best + step
    assert all(c == G64 for c in allocate(sens, lo).choice.values())
    assert all(c == INT8 for c in allocate(sens, hi).choice.values())
    with pytest.raises(ValueError, match="below"):
        allocate(sens, lo - 1)


def test_dominated_candidates_are_skipped():
    """A candidate that costs more and is no better is never chosen, whatever the budget."""
    nbytes = {G64: 100, G16: 150, INT8: 200}
    s = ExpertSensitivity(1, 0, 10, 0.1, {G64: 1.0, G16: 1.0, INT8: 0.1}, nbytes)
    assert allocate([s], 150).choice[(1, 0)] == G64
    assert allocate([s], 200).choice[(1, 0)] == INT8


@pytest.fixture(scope="module")
def sensitivity():
    vl2, _ = model("tiny")
    return measure_sensitivity(vl2, calibration("tiny"), CANDIDATES)


def test_sensitivity_measures_the_model(sensitivity):
    vl2, _ = model("tiny")
    calib = calibration("tiny")
    assert [(s.layer, s.expert) for s in sensitivity] == [(i, e) for i in (1, 2) for e in range(8)]
    # Layer 1 (the first MoE layer) sees the same full-precision inputs in the sequential walk when only routed
    # experts are quantized, so its routing counts must agree; later layers route quantized outputs.
    walked = quantize_decoder(vl2, Recipe("e", routed_experts=G64), calib, "rtn")
    assert [s.tokens for s in sensitivity if s.layer == 1] == walked.expert_tokens["language.model.layers.1.mlp"]
    for i in (1, 2):
        assert sum(s.share for s in sensitivity if s.layer == i) == pytest.approx(1.0)
    for s in sensitivity:
        if s.tokens:
            assert s.errors[INT8] < s.errors[G16] < s.errors[G64], (s.layer, s.expert)
        assert s.nbytes == {c: expert_bytes(c, 64, 32) for c in CANDIDATES}
    # hot experts matter more: the error of the busiest expert of a layer exceeds that of the idlest
    for i in (1, 2):
        layer = [s for s in sensitivity if s.layer == i]
        assert max(layer, key=lambda s: s.tokens).errors[G64] > min(layer, key=lambda s: s.tokens).errors[G64]


def test_mixed_beats_uniform_at_equal_bytes(sensitivity):
    """Uniform INT4 g16 vs the mixed allocation (each expert INT4 g64, INT4 g16 or INT8) within the same routed-
    expert bytes; everything else in full precision, so the KL on held-out samples measures the experts alone."""
    vl2, _ = model("tiny")
    calib, ref = calibration("tiny"), reference("tiny")
    budget = routed_expert_bytes(vl2, G16)
    allocation = allocate(sensitivity, budget)
    mixed = mixed_recipe(Recipe("experts", routed_experts=G64), allocation)
    assert Recipe.from_json(mixed.to_json()) == mixed
    uniform = Recipe("uniform-g16", routed_experts=G16)
    kl, nbytes = {}, {}
    for name, recipe in (("uniform", uniform), ("mixed", mixed)):
        result = quantize_decoder(vl2, recipe, calib, "gptq", "blend")
        nbytes[name] = decoder_bytes(vl2, result.weights)["quantized"]
        with swapped(vl2, result.weights) as q:
            kl[name] = compare(ref, q)["kl_mean"]
        if name == "mixed":  # per-expert tensors in the allocated formats, exactly the promised bytes
            for (layer, e), spec in allocation.choice.items():
                qw = result.weights[expert_name(layer, e, "gate_proj")] \
                    if expert_name(layer, e, "gate_proj") in result.weights \
                    else result.weights[f"language.model.layers.{layer}.mlp.experts.gate_proj"].expert(e)
                assert qw.bits == spec.bits and qw.group_size == spec.group_size
    print("allocation", allocation.counts(), "bytes", nbytes, "budget", budget, "KL", kl,
          "predicted", allocation.expected_error, "uniform predicted", allocation.uniform[G16])
    assert nbytes["mixed"] == allocation.expert_bytes <= budget == nbytes["uniform"]
    assert allocation.expected_error < allocation.uniform[G16][1]
    # Measured (12 calibration / 5 held-out samples, seed 0): 10 experts g16, 5 g64, 1 INT8, 61,440 bytes both;
    # KL 0.00219 mixed vs 0.00268 uniform (0.82x); predicted error 0.0130 vs 0.0196. With 16 calibration / 8
    # held-out samples and g64/g32/g16/INT8 candidates: 0.00139 vs 0.00198. Asserted: mixed KL <= 0.9x uniform.
    # (With RTN-proxy sensitivities the same allocation *loses* to uniform, 0.00231 vs 0.00198: GPTQ fits hot experts
    # best, so the proxy over-values them -- why measure_sensitivity runs GPTQ by default.)
    assert kl["mixed"] <= 0.9 * kl["uniform"]
    assert {spec_label(s) for s in allocation.choice.values()} <= {"int4-g64", "int4-g16", "int8"}
