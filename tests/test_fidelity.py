"""The fidelity report and the ways quantized weights go back into a model.

What is proved: a model compared with itself gives KL exactly 0, top-1 agreement 100 % and routing overlap 1 in
every MoE layer; the report's fields are consistent with each other and with an independent KL computation from
the two models' logits; the one-pass path (fidelity_report) and the recorded-reference path (reference_run +
compare, logits in memory or on disk) agree; `swapped` restores the model exactly, from memory or by re-reading the
checkpoint; `fake_quantize` shares untouched parameters and leaves the input alone; byte counts add up.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from edge_vl2.quantize.calibration import decoder_inputs
from edge_vl2.quantize.calibration_data import evaluation_samples
from edge_vl2.quantize.fake_quant import checkpoint_restorer, decoder_bytes, fake_quantize, swapped
from edge_vl2.quantize.fidelity import (
    compare,
    fidelity_report,
    format_report,
    reference_from_encoded,
    reference_run,
    write_json,
)
from edge_vl2.quantize.model_gptq import quantize_decoder
from edge_vl2.quantize.recipe import expert_name, preset

from _toolchain import (
    MAX_TOKENS,
    N_EVAL,
    assert_unchanged,
    calibration,
    checkpoint,
    model,
    parameters_snapshot,
    reference,
)

MOE_ROUTERS = ["language.model.layers.1.mlp.gate", "language.model.layers.2.mlp.gate"]


@pytest.fixture(scope="module")
def int4_result():
    vl2, _ = model("tiny")
    return quantize_decoder(vl2, preset("int4"), calibration("tiny"), "gptq", "blend")


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_model_against_itself(variant):
    vl2, _ = model(variant)
    ref = reference(variant)
    report = compare(ref, vl2)
    assert report["kl_mean"] == report["kl_max"] == report["kl_p99"] == 0.0
    assert report["top1_agreement"] == 1.0
    assert list(report["routing_overlap"]) == MOE_ROUTERS
    assert all(v == 1.0 for v in report["routing_overlap"].values()) and report["routing_overlap_min"] == 1.0
    assert report["positions"] == sum(min(s.inputs.seq_len, MAX_TOKENS) for s in ref.samples)
    assert report["samples"] == N_EVAL and report["images"] == sum(len(s.images) for s in evaluation_samples(N_EVAL))
    assert report["top_k"] == vl2.cfg.language.num_experts_per_tok
    assert report["bytes"]["total"] == report["bytes"]["bf16_total"] and report["bytes"]["quantized"] == 0


def test_report_fields_are_consistent(int4_result):
    vl2, _ = model("tiny")
    ref = reference("tiny")
    with swapped(vl2, int4_result.weights) as q, torch.inference_mode():
        report = compare(ref, q, quant=int4_result)
        # independent KL(fp || q) of the first sample, from F.kl_div on the two models' own logits
        lm = q.language
        q_logits = lm.logits(lm(decoder_inputs(q, ref.samples[0], MAX_TOKENS)))
    fp_logprobs = ref.sample_logprobs(0)
    kl0 = F.kl_div(F.log_softmax(q_logits, -1), fp_logprobs, log_target=True, reduction="none").sum(-1).double()
    assert 0 < report["kl_p99"] <= report["kl_max"] and 0 < report["kl_mean"] <= report["kl_max"]
    assert report["kl_max"] >= float(kl0.max()) - 1e-6  # the first sample is one of the pooled ones
    n0 = kl0.numel()
    assert 0.0 < report["top1_agreement"] < 1.0
    agree0 = float((q_logits.argmax(-1) == fp_logprobs.argmax(-1)).double().mean())
    assert report["positions"] > n0 and (agree0 == 1.0 or report["top1_agreement"] < 1.0)
    overlaps = list(report["routing_overlap"].values())
    assert report["routing_overlap_min"] == min(overlaps) and report["routing_overlap_mean"] == sum(overlaps) / 2
    assert all(0.0 < v < 1.0 for v in overlaps)
    assert report["kl_mean_text"] is not None and report["kl_mean_text"] >= 0
    assert report["bytes"]["quantized"] == int4_result.nbytes and report["bytes"]["total"] < report["bytes"][
        "bf16_total"]
    assert set(report["modules"]) == set(int4_result.errors) and report["recipe"]["name"] == "int4"
    # the first sample's KL, recomputed alone (fp32 on both sides: equal to rounding)
    one = compare(ref.subset([0]), fake_quantize(vl2, int4_result.weights))
    assert one["kl_mean"] == pytest.approx(float(kl0.mean()), rel=1e-4)
    assert one["positions"] == n0
    text = format_report(report)
    assert "KL(fp||q)" in text and "top-1 agreement" in text and "routing overlap" in text


def test_one_pass_and_recorded_reference_agree(int4_result, tmp_path):
    vl2, processor = model("tiny")
    samples = list(evaluation_samples(2, max_tiles=3))
    q = fake_quantize(vl2, int4_result.weights)
    direct = fidelity_report(vl2, q, processor, samples, quant=int4_result, max_tokens=MAX_TOKENS)
    on_disk = reference_run(vl2, processor, samples, max_tokens=MAX_TOKENS, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logprobs-0.pt", "logprobs-1.pt"]
    recorded = compare(on_disk, q, quant=int4_result)
    for key in ("positions", "kl_mean", "kl_max", "kl_p99", "top1_agreement", "routing_overlap_mean"):
        assert recorded[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12), key
    # without `quant`, the per-module errors come from the two models' parameters
    plain = fidelity_report(vl2, q, processor, samples[:1], max_tokens=64)
    assert plain["positions"] <= 64
    assert set(plain["modules"]) == set(int4_result.weights)


@pytest.mark.parametrize("restore", ["memory", "checkpoint"])
def test_swapped_restores_exactly(int4_result, restore):
    vl2, _ = model("tiny")
    before = parameters_snapshot(vl2)
    restorer = checkpoint_restorer(vl2, checkpoint("tiny")) if restore == "checkpoint" else None
    with swapped(vl2, int4_result.weights, restore=restorer) as q:
        assert q is vl2
        w = q.language.model.layers[1].self_attn.q_proj.weight
        torch.testing.assert_close(w, int4_result.weights["language.model.layers.1.self_attn.q_proj"].dequantize(),
                                   rtol=0, atol=0)
        assert not torch.equal(w, before["language.model.layers.1.self_attn.q_proj.weight"])
    assert_unchanged(vl2, before)


def test_fake_quantize_shares_untouched_parameters(int4_result):
    vl2, _ = model("tiny")
    before = parameters_snapshot(vl2)
    q = fake_quantize(vl2, int4_result.weights)
    assert_unchanged(vl2, before)
    ours, theirs = dict(q.named_parameters()), dict(vl2.named_parameters())
    assert ours["language.model.layers.1.mlp.gate.weight"] is theirs["language.model.layers.1.mlp.gate.weight"]
    assert ours["vision.pos_embed"] is theirs["vision.pos_embed"]
    assert not torch.equal(ours["language.lm_head.weight"], theirs["language.lm_head.weight"])


def test_bytes_add_up():
    vl2, _ = model("tiny")
    params = dict(vl2.named_parameters())
    bf16 = sum(2 * p.numel() for n, p in params.items() if n.startswith("language."))
    result = quantize_decoder(vl2, preset("int8"), None, "rtn")
    b = decoder_bytes(vl2, result.weights)
    covered = {n for n in params if n.removesuffix(".weight") in result.weights}
    assert b["quantized"] == sum(w.nbytes for w in result.weights.values())
    assert b["high_precision"] == sum(2 * params[n].numel() for n in params
                                      if n.startswith("language.") and n not in covered)
    assert b["bf16_total"] == bf16 and b["total"] == b["quantized"] + b["high_precision"]
    # per-expert tensors for only some experts: the others still count in bf16
    some = {expert_name(1, e, "up_proj"): result.weights["language.model.layers.1.mlp.experts.up_proj"].expert(e)
            for e in (0, 3)}
    part = decoder_bytes(vl2, some)
    up = params["language.model.layers.1.mlp.experts.up_proj"]
    assert part["quantized"] == sum(w.nbytes for w in some.values())
    assert part["high_precision"] == bf16 - 2 * up.numel() * 2 // up.shape[0]
    before = up.detach().clone()
    with swapped(vl2, some) as q:  # only those experts change
        new = q.language.model.layers[1].mlp.experts.up_proj
        assert torch.equal(new[1], before[1]) and not torch.equal(new[0], before[0])
        assert torch.equal(new[3], some[expert_name(1, 3, "up_proj")].dequantize())
    assert torch.equal(vl2.language.model.layers[1].mlp.experts.up_proj, before)


def test_write_json_is_atomic_and_valid(tmp_path):
    report = {"kl_mean": 0.5, "nested": {"a": [1, 2]}, "nan": math.nan}
    path = tmp_path / "sub" / "r.json"
    write_json(report, path)
    assert json.loads(path.read_text().replace("NaN", "null"))["nested"] == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_reference_from_encoded_matches_reference_run():
    vl2, processor = model("tiny")
    from edge_vl2.quantize.calibration import encode_samples

    samples = list(evaluation_samples(2, max_tiles=3))
    a = reference_run(vl2, processor, samples, max_tokens=100)
    b = reference_from_encoded(vl2, encode_samples(vl2, processor, samples), max_tokens=100)
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert all(torch.equal(x, y) for x, y in zip(a.top1, b.top1))
    assert a.routing[0].keys() == b.routing[0].keys() == set(MOE_ROUTERS)
