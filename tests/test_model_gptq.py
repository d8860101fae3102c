"""Whole-decoder quantization (quantize_decoder) on test-size synthetic Tiny (plain attention) and Small (MLA).

What is proved:
- the batched GPTQ used for experts computes the same codes as the committed per-weight `gptq_quantize`;
- the output covers exactly the recipe's tensors, in the recipe's formats (stacked or per expert), the input model
  is never modified, and RTN with calibration data makes bit-identical weights to RTN without;
- model-level GPTQ beats RTN at the same bits: lower Hessian-weighted reconstruction error on *held-out* inputs of
  the full-precision model, module kind by module kind, and lower logit KL on held-out samples;
- for rarely routed experts, the routed-only Hessian (a few calibration tokens) gives worse held-out expert error
  than the all-tokens or blended Hessians (the evidence for `--hessians blend`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_vl2.quantize.batched_gptq import gptq_batched, pack
from edge_vl2.quantize.calibration import CalibrationSet, LinearHessians, fill_expert_hessians, route_all
from edge_vl2.quantize.fake_quant import swapped
from edge_vl2.quantize.fidelity import compare
from edge_vl2.quantize.formats import Int4Weight, Int8Weight, QuantSpec
from edge_vl2.quantize.gptq import gptq_quantize
from edge_vl2.quantize.hessian import ExpertHessians, HessianAccumulator, expert_intermediate, weighted_error
from edge_vl2.quantize.model_gptq import quantize_decoder
from edge_vl2.quantize.recipe import INT8, Recipe, expert_name, module_kind, preset
from edge_vl2.quantize.rtn import quantize_rtn

from _toolchain import assert_unchanged, calibration, model, parameters_snapshot, reference

PROJS = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False), INT8], ids=str)
def test_batched_gptq_is_gptq(spec):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 48, 128, generator=gen) * 0.05
    x = torch.randn(3, 400, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen))
    h = 2 * x.transpose(1, 2) @ x / 400
    codes, scales, zeros, losses = gptq_batched(w, h, spec, block_size=32)
    for b in range(3):
        ref = gptq_quantize(w[b], h[b], spec, block_size=32)
        ours = pack(spec, codes[b], scales[b], zeros[b])
        assert type(ours) is type(ref)
        for name, t in ref.tensors().items():
            assert torch.equal(ours.tensors()[name], t), name
        # the reported objective is the dampened-Hessian error of the result (float32 arithmetic: 1e-3 relative)
        h_damp = h[b] + 0.01 * h[b].diagonal().mean() * torch.eye(128)
        assert losses[b].item() == pytest.approx(weighted_error(w[b], ours.dequantize(), h_damp), rel=1e-3)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_output_covers_the_recipe(variant):
    vl2, _ = model(variant)
    before = parameters_snapshot(vl2)
    recipe = preset("int4").with_overrides({expert_name(2, e, p): INT8 for e in (1, 5) for p in PROJS})
    result = quantize_decoder(vl2, recipe, calibration(variant), "gptq", "blend")
    assert_unchanged(vl2, before)
    params = dict(vl2.named_parameters())
    expected = set()
    for name, p in params.items():
        prefix = name.removesuffix(".weight")
        if recipe.spec_for(prefix) is None:
            continue
        if prefix.startswith("language.model.layers.2.mlp.experts."):  # overrides: stored per expert
            expected |= {expert_name(2, e, prefix.rsplit(".", 1)[1]) for e in range(p.shape[0])}
        else:
            expected.add(prefix)
    assert set(result.weights) == expected
    assert not any(module_kind(k) is None for k in result.weights)  # never a router, norm or w_uk/w_uv
    for key, qw in result.weights.items():
        spec = recipe.spec_for(key, qw.shape[-1])
        assert isinstance(qw, Int4Weight if spec.bits == 4 else Int8Weight), key
        assert qw.group_size == spec.group_size, key
        want = params.get(f"{key}.weight", params.get(key))
        want_shape = tuple(want.shape) if want is not None else tuple(params[
            key.rsplit(".", 2)[0] + "." + key.rsplit(".", 1)[1]].shape[1:])
        assert tuple(qw.shape) == want_shape, key
    assert result.expert_tokens and all(sum(c) == 3 * result.calibration["tokens"]
                                        for c in result.expert_tokens.values())  # top-3 routing


def test_rtn_with_data_makes_the_data_free_weights():
    vl2, _ = model("tiny")
    free = quantize_decoder(vl2, preset("int4"), None, "rtn")
    walked = quantize_decoder(vl2, preset("int4"), calibration("tiny"), "rtn")
    assert set(free.weights) == set(walked.weights)
    for key, qw in free.weights.items():
        assert all(torch.equal(a, b) for a, b in zip(qw.tensors().values(), walked.weights[key].tensors().values()))
    # only the walk measures Hessian-weighted errors
    assert all(e["rel_weighted"] is None for e in free.errors.values())
    assert all(e["rel_weighted"] is not None for k, e in walked.errors.items() if "embed" not in k)
    lm_head = vl2.language.lm_head.weight
    spec = preset("int4").lm_head
    assert torch.equal(free.weights["language.lm_head"].qweight, quantize_rtn(lm_head.detach(), spec).qweight)


# --- GPTQ vs RTN --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def held_out_hessians(vl2, embeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Input Hessians of every decoder linear and every routed expert projection ({expert name: H}) of the
    full-precision model on held-out decoder inputs (routed tokens, gate-weighted, for experts)."""
    lm = vl2.language
    linears = {f"language.{n}": m for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    moe_inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: moe_inputs.setdefault(i, []).append(a[0]))
             for i, layer in enumerate(lm.model.layers) if hasattr(layer.mlp, "experts")]
    final = HessianAccumulator(lm.cfg.hidden_size)  # lm_head's inputs, without computing the logits
    with LinearHessians(linears) as hs:
        for x in embeds:
            final.add(lm(x))
    for h in hooks:
        h.remove()
    out = {n: hs[n].hessian() for n in linears}
    out["language.lm_head"] = final.hessian()
    for i, xs in moe_inputs.items():
        mlp = lm.model.layers[i].mlp
        routing = route_all(mlp.gate, xs)
        n_experts, _, hidden = mlp.experts.gate_proj.shape
        for projs, fn, n_in in ((("gate_proj", "up_proj"), None, hidden),
                                (("down_proj",), expert_intermediate(mlp.experts.gate_proj, mlp.experts.up_proj),
                                 mlp.experts.down_proj.shape[2])):
            eh = ExpertHessians(n_experts, n_in)
            fill_expert_hessians(eh, xs, routing, "routed", fn)
            for e in range(n_experts):
                for p in projs:
                    out[expert_name(i, e, p)] = eh.hessian(e, "routed")
    return out


def weighted_errors_by_kind(vl2, weights, hessians) -> dict[str, float]:
    """Per module kind: sum tr(D H D^T) / sum tr(W H W^T) over its tensors, H the held-out Hessians."""
    params = dict(vl2.named_parameters())
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for key, qw in weights.items():
        kind = module_kind(key)
        if kind == "embeddings":
            continue
        if f"{key}.weight" in params:
            pairs = [(key, params[f"{key}.weight"].detach(), qw.dequantize())]
        else:  # stacked experts: one Hessian per expert
            layer = int(key.split(".")[3])
            proj = key.rsplit(".", 1)[1]
            w, w_hat = params[key].detach(), qw.dequantize()
            pairs = [(expert_name(layer, e, proj), w[e], w_hat[e]) for e in range(w.shape[0])]
        for name, w, w_hat in pairs:
            h = hessians[name]
            num[kind] = num.get(kind, 0.0) + weighted_error(w, w_hat, h)
            den[kind] = den.get(kind, 0.0) + weighted_error(w, torch.zeros_like(w), h)
    return {k: num[k] / den[k] for k in num}


@pytest.mark.parametrize("variant", ["tiny", pytest.param("small", marks=pytest.mark.slow)])  # small: +30 s
def test_gptq_beats_rtn_on_held_out_data(variant):
    vl2, _ = model(variant)
    ref = reference(variant)
    calib = calibration(variant)
    hessians = held_out_hessians(vl2, [_decoder_inputs(vl2, s) for s in ref.samples])
    recipe = preset("int4")
    results = {m: quantize_decoder(vl2, recipe, calib, m, "blend") for m in ("rtn", "gptq")}
    errors = {m: weighted_errors_by_kind(vl2, r.weights, hessians) for m, r in results.items()}
    kl = {}
    for m, r in results.items():
        with swapped(vl2, r.weights) as q:
            kl[m] = compare(ref, q)["kl_mean"]
    print(variant, "held-out weighted error", errors, "KL", kl)
    # Measured (seed 0, 12 calibration / 8 held-out samples), GPTQ / RTN held-out weighted error per kind: tiny
    # 0.11-0.20 (attention 0.11, dense 0.10, shared 0.15, routed 0.20, lm_head 0.12), small 0.11-0.20; KL tiny
    # 0.089 vs 1.56, small 0.086 vs 1.85. Asserted: every kind at most 0.8x RTN's error, and the
    # KL at most half of RTN's -- wide margins for a noisy 3-layer model, far from a tie.
    for kind, rtn_error in errors["rtn"].items():
        assert errors["gptq"][kind] <= 0.8 * rtn_error, kind
    assert kl["gptq"] <= 0.5 * kl["rtn"]


def _decoder_inputs(vl2, sample):
    from edge_vl2.quantize.calibration import decoder_inputs

    return decoder_inputs(vl2, sample, 768)


# --- routed vs all-tokens vs blend Hessians for rarely routed experts -------------------------------------------

def test_blend_hessians_help_rarely_routed_experts():
    """A small calibration set (~3 sequences) leaves some experts of MoE layer 1 with fewer routed tokens than
    their 64 inputs: the routed Hessian is rank-deficient there and GPTQ overfits those tokens. Only routed experts
    are quantized, so layer 1 sees identical full-precision inputs under every mode."""
    vl2, _ = model("tiny")
    calib = calibration("tiny")
    small = CalibrationSet([e[:96] for e in calib.embeds[:4]])
    ref = reference("tiny")
    held_out = [_decoder_inputs(vl2, s) for s in ref.samples]
    hessians = held_out_hessians(vl2, held_out)
    spec = QuantSpec(4, 32)
    recipe = Recipe("experts", routed_experts=spec)
    results = {mode: quantize_decoder(vl2, recipe, small, "gptq", mode) for mode in ("routed", "all-tokens", "blend")}
    counts = results["routed"].expert_tokens["language.model.layers.1.mlp"]
    rare = [e for e, n in enumerate(counts) if n < 32]
    assert rare, f"calibration too large to make a rare expert: {counts}"
    params = dict(vl2.named_parameters())
    err = {}
    for mode, r in results.items():
        total = 0.0
        for p in PROJS:
            w, w_hat = params[f"language.model.layers.1.mlp.experts.{p}"].detach(), \
                r.weights[f"language.model.layers.1.mlp.experts.{p}"].dequantize()
            for e in rare:
                h = hessians[expert_name(1, e, p)]
                total += weighted_error(w[e], w_hat[e], h) / weighted_error(w[e], torch.zeros_like(w[e]), h)
        err[mode] = total / (3 * len(rare))
    rtn = Recipe("experts", routed_experts=spec)
    rtn_w = quantize_decoder(vl2, rtn, None, "rtn").weights
    rtn_err = sum(weighted_error(params[f"language.model.layers.1.mlp.experts.{p}"].detach()[e],
                                 rtn_w[f"language.model.layers.1.mlp.experts.{p}"].dequantize()[e],
                                 hessians[expert_name(1, e, p)])
                  / weighted_error(params[f"language.model.layers.1.mlp.experts.{p}"].detach()[e],
                                   torch.zeros(1), hessians[expert_name(1, e, p)])
                  for p in PROJS for e in rare) / (3 * len(rare))
    print("rare experts", rare, "calibration tokens", [counts[e] for e in rare], "held-out rel. error", err,
          "rtn", rtn_err)
    # Asserted (this 384-token case: routed 0.00523, all-tokens 0.00498, blend 0.00479, RTN 0.0112): blend and
    # all-tokens both beat routed-only on the rare experts. The record below shows the effect is modest on these
    # synthetic models and vanishes for well-fed experts -- blend is the safe default, not a big win.
    assert err["blend"] < err["routed"]
    assert err["all-tokens"] < err["routed"]


# Recorded measurement (/tmp sweep, `quantize_decoder` routed experts INT4 g32 only, GPTQ, held-out relative
# Hessian-weighted error of MoE layer 1's experts grouped by calibration tokens routed to them; in_features 64/32):
#
#   variant calib   experts <32 tokens (routed / all-tokens / blend / RTN)   experts >=256 tokens (routed / all / blend)
#   tiny     192    0.00535 / 0.00501 / 0.00498 / 0.0112   (4 experts)       -
#   tiny     384    0.00523 / 0.00498 / 0.00479 / 0.0112   (4)               0.00380 / 0.00386 / 0.00378
#   tiny     812    0.00344 / 0.00332 / 0.00386 / 0.0123   (1)               0.00314 / 0.00318 / 0.00318
#   tiny    3645    (none < 32; 32-256: 0.00351 / 0.00311 / 0.00286)         0.00288 / 0.00287 / 0.00287
#   small    192    0.01007 / 0.00977 / 0.00963 / 0.0123   (4)               -
#   small    384    0.00969 / 0.00945 / 0.00944 / 0.0123   (4)               0.00342 / 0.00348 / 0.00339
#   small    812    0.01033 / 0.00726 / 0.00787 / 0.0115   (3)               0.00326 / 0.00334 / 0.00325
#   small   3645    (none < 32; 32-256: 0.00428 / 0.00519 / 0.00365)         0.00286 / 0.00266 / 0.00279
