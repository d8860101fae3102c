"""Calibration statistics for GPTQ: the layer Hessian H = 2/n sum_t x_t x_t^T, for dense linears and per routed expert.

GPTQ minimises ||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) / 2 (with H averaged over tokens), so H is all it needs from
the calibration data. With per-token weights w_t the mean becomes weighted: H = 2 sum w_t x x^T / sum w_t. Every
Hessian here is such a weighted mean, so two of them can be mixed convexly.

Routed experts see only the tokens routed to them, so a rarely routed expert gets a Hessian from a handful of tokens:
rank <= that count, and GPTQ then fits those few tokens at the expense of everything else. `ExpertHessians`
accumulates two estimates per expert (MoEQuant's affinity-guided weighting, llm-compressor's "all tokens to all
experts"):
- routed: tokens routed to the expert, each weighted by its gate weight;
- all-tokens: every calibration token, weighted by the expert's router probability (softmax affinity);
and blends them (`ExpertHessians.hessian`): H_e = a H_routed + (1 - a) H_all with a = n_e / (n_e + n0), n_e the
number of tokens routed to expert e and n0 (`prior_tokens`, default = in_features) the token count at which the two
are trusted equally. A shrinkage estimate: an expert with a few routed tokens gets essentially its affinity-weighted
all-tokens Hessian (full rank), a well-used one its own routed statistics.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class HessianAccumulator:
    """Streaming H = 2 sum_t w_t x_t x_t^T / sum_t w_t over calibration batches of one linear layer's inputs."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.weight = 0.0  # sum of token weights
        self.tokens = 0  # tokens with a non-zero weight

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """x [..., in] (inputs of the layer), optional per-token weights [...] (>= 0)."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum)
        if weights is None:
            self.sum += x.T @ x
            self.weight += x.shape[0]
            self.tokens += x.shape[0]
            return
        w = weights.reshape(-1).to(self.sum)
        if (w < 0).any():
            raise ValueError("token weights must be >= 0")
        self.sum += (x * w[:, None]).T @ x
        self.weight += float(w.sum())
        self.tokens += int((w > 0).sum())

    def hessian(self) -> torch.Tensor:
        """[in, in]; all zeros when nothing was added (GPTQ then reduces to round-to-nearest)."""
        return self.sum * (2.0 / self.weight) if self.weight > 0 else torch.zeros_like(self.sum)

    def attach(self, linear: nn.Module):
        """Accumulate a module's inputs on every forward; returns the hook handle (call .remove() when done)."""
        return linear.register_forward_pre_hook(lambda _m, args: self.add(args[0].detach()))


def expert_intermediate(gate_proj: torch.Tensor, up_proj: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The input of expert e's down_proj: (e, x [T, H]) -> silu(x gate_e^T) * (x up_e^T) [T, I] (stacked [E, I, H])."""
    def inputs(e: int, x: torch.Tensor) -> torch.Tensor:
        g, u = gate_proj[e].to(x.dtype), up_proj[e].to(x.dtype)
        return F.silu(x @ g.T) * (x @ u.T)
    return inputs


class ExpertHessians:
    """One routed and one all-tokens Hessian per routed expert ([E, in, in] each), and the rule that blends them."""

    def __init__(self, n_experts: int, in_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.n_experts, self.in_features = n_experts, in_features
        self.routed = [HessianAccumulator(in_features, dtype, device) for _ in range(n_experts)]
        self.all_tokens = [HessianAccumulator(in_features, dtype, device) for _ in range(n_experts)]

    def add(self, x: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            expert_inputs: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        """One calibration batch of MoE-layer inputs.

        x [T, H]: the MoE layer's input (post-attention-norm hidden states); probs [T, E]: router probabilities
        (softmax affinities); ids, weights [T, k]: the router's choice and gate weights. expert_inputs(e, x) maps x
        to expert e's input for the projection being calibrated (None: x itself, for gate_proj/up_proj;
        `expert_intermediate(...)` for down_proj, so all-tokens mode runs every expert on every token).
        """
        x = x.reshape(-1, x.shape[-1])
        for e in range(self.n_experts):
            routed = ids == e  # [T, k]; an expert appears at most once per token
            rows = routed.any(dim=-1)
            gate_w = (weights * routed).sum(dim=-1)[rows]
            inputs_all = expert_inputs(e, x) if expert_inputs is not None else x
            self.all_tokens[e].add(inputs_all, probs[:, e])
            if rows.any():
                self.routed[e].add(inputs_all[rows], gate_w)

    def token_counts(self) -> list[int]:
        """Calibration tokens routed to each expert."""
        return [acc.tokens for acc in self.routed]

    def hessian(self, e: int, mode: str = "blend", prior_tokens: int | None = None) -> torch.Tensor:
        """Expert e's Hessian [in, in]: mode "routed", "all-tokens", or "blend" (the rule in the module docstring)."""
        if mode == "routed":
            return self.routed[e].hessian()
        if mode == "all-tokens":
            return self.all_tokens[e].hessian()
        if mode != "blend":
            raise ValueError(f"mode must be 'routed', 'all-tokens' or 'blend', got {mode!r}")
        n0 = self.in_features if prior_tokens is None else prior_tokens
        n = self.routed[e].tokens
        a = n / (n + n0) if n + n0 > 0 else 0.0
        return a * self.routed[e].hessian() + (1 - a) * self.all_tokens[e].hessian()

    def stacked(self, mode: str = "blend", prior_tokens: int | None = None) -> torch.Tensor:
        """All experts' Hessians [E, in, in]."""
        return torch.stack([self.hessian(e, mode, prior_tokens) for e in range(self.n_experts)])


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) / 2: the mean over calibration tokens of ||(W - W_hat) x||^2."""
    d = (w - w_hat).to(hessian.dtype)
    return float(((d @ hessian) * d).sum() / 2)
