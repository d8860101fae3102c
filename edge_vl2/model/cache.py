"""Static, preallocated attention caches (batch 1), sized before any compute.

The processor knows the prompt length (image tokens included) before the vision tower runs, so the cache is sized to
prompt + max new tokens once, capped at the model context; nothing grows during decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .config import LanguageConfig


def cache_shapes(cfg: LanguageConfig, capacity: int) -> dict[str, tuple[int, ...]]:
    """One layer's cache tensors for `capacity` positions: MLA keeps the 512-d normalised latent and the 64-d roped
    key (576 values a token, model-facts §9.3); plain attention keeps K and V per head."""
    if cfg.use_mla:
        return {"latent": (capacity, cfg.kv_lora_rank), "k_pe": (capacity, cfg.qk_rope_head_dim)}
    kv = (cfg.num_key_value_heads, capacity, cfg.head_dim)
    return {"k": kv, "v": kv}


def cache_bytes(cfg: LanguageConfig, positions: int | None = None, itemsize: int = 2) -> int:
    """Bytes of a whole-model cache for `positions` tokens (default: the full context) at `itemsize` (bf16: 2)."""
    shapes = cache_shapes(cfg, positions or cfg.max_position_embeddings)
    return itemsize * cfg.num_hidden_layers * sum(math.prod(s) for s in shapes.values())


@dataclass
class LayerCache:
    """One layer's slots: MHA keeps `k`, `v` [n_kv, cap, d]; MLA keeps `latent` [cap, c] and `k_pe` [cap, r]."""

    tensors: dict[str, torch.Tensor]


class StaticCache:
    """Per-layer cache tensors plus the number of positions already written."""

    def __init__(self, cfg: LanguageConfig, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if capacity > cfg.max_position_embeddings:
            raise UserError(f"prompt plus new tokens needs {capacity} positions; the model context is "
                            f"{cfg.max_position_embeddings}")
        self.capacity = capacity
        self.length = 0
        shapes = cache_shapes(cfg, capacity)
        self.layers = [LayerCache({k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()})
                       for _ in range(cfg.num_hidden_layers)]

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.capacity:
            raise UserError(f"sequence of {self.length + n_new} tokens does not fit the cache of {self.capacity}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors.values())
