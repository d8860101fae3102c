"""Seeded random parameters for modules built with torch.empty, and small configs shared by the parity tests."""

from __future__ import annotations

import torch
from torch import nn

from edge_vl2.model.config import LanguageConfig


def fill_(module: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    """Fill every parameter deterministically (independent of the global RNG and of the module's dtype).

    Matrices get N(0, scale^2 / fan_in) with fan_in = the last dim (conv: all but the output dim), so activations stay
    O(1) through a stack; norm weights get 1 + 0.1 N(0, 1); other vectors (biases, learned rows) 0.1 N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            values = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.dim() == 1:
                values = values * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel() if p.dim() == 4 else p.shape[-1]
                values = values * (scale / fan_in ** 0.5)
            p.copy_(values.to(p.dtype))
    return module


def language_config(use_mla: bool, **overrides) -> LanguageConfig:
    """A 3-layer DeepSeek-MoE decoder small enough for CPU tests (Tiny-like with use_mla False, Small-like with MLA)."""
    d = {
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "n_routed_experts": 8, "n_shared_experts": 2,
        "num_experts_per_tok": 3, "first_k_dense_replace": 1, "q_lora_rank": None, "max_position_embeddings": 4096,
        "use_mla": use_mla, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    }
    if use_mla:
        d.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    d.update(overrides)
    return LanguageConfig.from_dict(d)
