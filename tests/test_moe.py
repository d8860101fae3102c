"""DeepSeek MoE (model-facts §7.5): Tiny/Small softmax-greedy routing == transformers DeepseekV2Moe, base sigmoid/noaux_tc
routing == transformers DeepseekV3MoE, the router's choices and weights == a float64 reference, and the per-chosen-expert
(decode) expert path == the sorted-by-expert (prefill) path."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from edge_vl2.model.moe import MoE, Router

from _random_weights import fill_, language_config

BASE_RULE = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
             "routed_scaling_factor": 2.0, "n_group": 1, "topk_group": 1}


def _tokens(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _moe(seed: int, **overrides) -> MoE:
    moe = fill_(MoE(language_config(use_mla=True, **overrides)), seed=seed)
    if hasattr(moe.gate, "e_score_correction_bias"):
        with torch.no_grad():  # non-negative, so every choice score is > 0 (see the group-limited test)
            moe.gate.e_score_correction_bias.copy_(
                torch.rand(8, generator=torch.Generator().manual_seed(seed + 1)) * 0.2)
    return moe


def _load_reference(ref: torch.nn.Module, moe: MoE) -> torch.nn.Module:
    """Our stacked gate/up [E, I, H] become transformers' fused gate_up_proj [E, 2I, H] (gate rows first)."""
    sd = {f"shared_experts.{k}": v for k, v in moe.shared_experts.state_dict().items()}
    sd["gate.weight"] = moe.gate.weight.detach()
    sd["experts.gate_up_proj"] = torch.cat([moe.experts.gate_proj, moe.experts.up_proj], dim=1).detach()
    sd["experts.down_proj"] = moe.experts.down_proj.detach()
    if hasattr(moe.gate, "e_score_correction_bias"):
        sd["gate.e_score_correction_bias"] = moe.gate.e_score_correction_bias.detach()
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def _v2_reference(moe: MoE, cfg) -> DeepseekV2Moe:
    ref_cfg = DeepseekV2Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        topk_method=cfg.topk_method, routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=False, experts_implementation="eager")
    return _load_reference(DeepseekV2Moe(ref_cfg), moe)


def _v3_reference(moe: MoE, cfg) -> DeepseekV3MoE:
    ref_cfg = DeepseekV3Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, experts_implementation="eager")
    return _load_reference(DeepseekV3MoE(ref_cfg), moe)


# fp32 on both sides; the expert products are summed in a different order (we combine in fp32 per token, transformers
# index_adds per expert): measured max 6e-7 on outputs of size up to ~5. 1e-5 still fails on any routing or mapping
# difference (one wrong expert or a renormalised weight is O(0.1); swapping gate/up rows measured 1.1).
ATOL = 1e-5


@pytest.mark.parametrize("tokens,few", [(64, False), (3, True), (1, True)])  # sorted-by-expert / per-chosen-expert path
@torch.no_grad()
def test_softmax_greedy_matches_transformers_deepseek_v2(tokens, few):
    moe = _moe(seed=50)
    assert (tokens <= MoE.FEW_TOKENS_MAX) == few
    ref = _v2_reference(moe, language_config(use_mla=True))
    x = _tokens(tokens, 51)
    torch.testing.assert_close(moe(x), ref(x[None])[0], rtol=0, atol=ATOL)


@torch.no_grad()
def test_group_limited_greedy_matches_transformers_deepseek_v2():
    over = {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    moe = _moe(seed=52, **over)
    ref = _v2_reference(moe, language_config(use_mla=True, **over))
    x = _tokens(64, 53)
    torch.testing.assert_close(moe(x), ref(x[None])[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("groups", [{}, {"n_group": 4, "topk_group": 2}])  # base's trivial group step; a real one
@pytest.mark.parametrize("tokens", [64, 2])
@torch.no_grad()
def test_sigmoid_noaux_tc_matches_transformers_deepseek_v3(tokens, groups):
    # Groups: transformers masks dropped groups with -inf, the official DeepSeek remote code (and ours) with 0.0; they
    # agree while all choice scores are > 0, which the non-negative correction bias guarantees (sigmoid > 0). The
    # group step is not a no-op here: with n_group 4 / topk_group 2 the output moves by ~3 vs n_group 1.
    over = {**BASE_RULE, **groups}
    moe = _moe(seed=54, **over)
    ref = _v3_reference(moe, language_config(use_mla=True, **over))
    x = _tokens(tokens, 55)
    torch.testing.assert_close(moe(x), ref(x[None])[0], rtol=0, atol=ATOL)


def _reference_route(x, weight, top_k, rule, bias=None):
    """Float64 transcription of model-facts §7.5: chosen expert sets and their weights."""
    logits = x.double() @ weight.double().T
    if rule == "softmax":
        p = logits.softmax(-1)
        w, ids = p.topk(top_k, dim=-1)
        return ids, w  # scale 1.0, no renormalisation
    s = logits.sigmoid()
    ids = (s + bias.double()).topk(top_k, dim=-1).indices
    w = s.gather(1, ids)
    return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * 2.0


@pytest.mark.parametrize("rule", ["softmax", "sigmoid"])
@torch.no_grad()
def test_router_matches_float64_reference(rule):
    moe = _moe(seed=60, **(BASE_RULE if rule == "sigmoid" else {}))
    router: Router = moe.gate
    x = _tokens(200, 61)
    ids, weights = router(x)
    assert weights.dtype == torch.float32  # router runs in fp32 whatever the activation dtype
    want_ids, want_w = _reference_route(x, router.weight, 3, rule, getattr(router, "e_score_correction_bias", None))
    order, want_order = ids.sort(-1), want_ids.sort(-1)  # top-k is unordered: compare sets
    assert torch.equal(order.values, want_order.values)
    got_w = weights.gather(1, order.indices).double()
    # fp32 router vs float64 reference: measured max 1.2e-7 on weights in (0, 2); 1e-6 is fp32-rounding margin.
    torch.testing.assert_close(got_w, want_w.gather(1, want_order.indices), rtol=0, atol=1e-6)
    if rule == "softmax":  # Tiny/Small: raw softmax probabilities, not renormalised, so they sum to < 1
        assert bool((weights.sum(-1) < 1).all())
    else:  # base: renormalised then scaled by 2.0
        torch.testing.assert_close(weights.sum(-1), torch.full((200,), 2.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["softmax", "sigmoid"])
@torch.no_grad()
def test_per_chosen_expert_path_equals_sorted_path(rule):
    moe = _moe(seed=70, **(BASE_RULE if rule == "sigmoid" else {})).double()
    x = _tokens(40, 71, torch.float64)
    ids, _ = moe.gate(x)
    assert len(set(ids.flatten().tolist())) == 8  # every expert used: the sorted path runs each one
    per_choice, by_expert = moe.experts.per_chosen_expert(x, ids), moe.experts.sorted_by_expert(x, ids)
    assert per_choice.shape == (40, 3, 64)
    # float64, same products batched differently: measured max 2e-15; 1e-12 is float64 reassociation margin.
    torch.testing.assert_close(per_choice, by_expert, rtol=0, atol=1e-12)
