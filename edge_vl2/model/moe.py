"""DeepSeek MoE block: an fp32 router with the checkpoint's exact rule, stacked routed experts, shared experts.

Routed experts are stacked per layer ([E, I, H] gate/up, [E, H, I] down). Two dispatch paths: a few tokens (decode)
run each chosen (token, expert) pair in place, a loop over the k choices that reads each expert's weights where they
lie; many tokens (prefill) sort the (token, slot) pairs by expert and run each used expert once on its rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .layers import SwiGLU, linear


class Router(nn.Module):
    """`mlp.gate`: logits in fp32; softmax/greedy (Tiny, Small) or sigmoid/noaux_tc with correction bias (base)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k, self.method, self.scoring = cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.normalize, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> expert ids [T, k] and fp32 weights [T, k]."""
        logits = F.linear(x.float(), self._weight_fp32())  # [T, E]
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        else:
            choice = scores + self.e_score_correction_bias.float() if self.method == "noaux_tc" else scores
            choice = self._limit_groups(choice)
            ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)  # the uncorrected scores weight the experts
        if self.top_k > 1 and self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def _weight_fp32(self) -> torch.Tensor:
        """The weight in fp32, converted once (a bf16 router would otherwise convert [E, H] on every call)."""
        w = self.weight
        if w.dtype == torch.float32:
            return w
        cached = getattr(self, "_fp32", None)
        if cached is None or cached[0] != (w.data_ptr(), w.device, w._version):
            cached = ((w.data_ptr(), w.device, w._version), w.detach().float())
            self._fp32 = cached
        return cached[1]

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only experts of the best `topk_group` groups (a no-op with one group, as in every VL2 config)."""
        if self.n_group == 1:
            return choice
        t, e = choice.shape
        grouped = choice.view(t, self.n_group, e // self.n_group)
        if self.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, 1.0)
        mask = keep[:, :, None].expand_as(grouped).reshape(t, e)
        return choice.masked_fill(mask == 0, 0.0)  # official: masked scores become 0, not -inf


class StackedExperts(nn.Module):
    """All routed experts of one layer as three stacked weight tensors."""

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))

    def per_chosen_expert(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Few tokens: x [T, H], ids [T, k] -> outputs [T, k, H], running each chosen expert on its token.

        A loop over the k chosen (token, expert) pairs reads each expert's weights in place; gathering the k weight
        matrices into a new tensor first costs a copy of them per step (measured ~9x slower on CPU).
        """
        out = x.new_empty(*ids.shape, x.shape[-1])
        for t, row in enumerate(ids.tolist()):
            for slot, e in enumerate(row):
                h = F.silu(linear(x[t], self.gate_proj[e])) * linear(x[t], self.up_proj[e])
                out[t, slot] = linear(h, self.down_proj[e])
        return out

    def sorted_by_expert(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Many tokens: group (token, slot) pairs by expert and run each used expert once -> [T, k, H]."""
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        rows = x[order // k]  # tokens in expert order
        out = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
        begin = 0
        for e, n in enumerate(counts):
            if n:
                r = rows[begin:begin + n]
                h = F.silu(linear(r, self.gate_proj[e])) * linear(r, self.up_proj[e])
                out[order[begin:begin + n]] = linear(h, self.down_proj[e])
                begin += n
        return out.view(t, k, -1)


class MoE(nn.Module):
    """y = sum_k w_k * Expert_k(x) (combined in fp32, as officially) + SharedExperts(x)."""

    FEW_TOKENS_MAX = 4  # up to here one call per (token, expert) pair beats sorting the pairs by expert

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = StackedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        step = getattr(self.experts, "moe_step", None)  # quantized experts on cpu: routed + shared in one call
        if step is not None and x.shape[0] <= self.FEW_TOKENS_MAX:
            y = step(x, ids, weights, self.shared_experts)
            if y is not None:
                return y.to(x.dtype)
        if x.shape[0] <= self.FEW_TOKENS_MAX:
            per_slot = self.experts.per_chosen_expert(x, ids)
        else:
            per_slot = self.experts.sorted_by_expert(x, ids)
        routed = (per_slot.float() * weights[..., None]).sum(dim=1).to(x.dtype)
        return routed + self.shared_experts(x)
