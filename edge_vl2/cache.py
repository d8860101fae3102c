"""Static, preallocated attention caches (batch 1), sized before any compute.

The processor knows the prompt length (image tokens included) before the vision tower runs, so the cache is sized to
prompt + max new tokens once, capped at the model context; nothing grows during decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LanguageConfig
from .errors import UserError


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
        self.layers = [LayerCache(self._alloc(cfg, capacity, dtype, device)) for _ in range(cfg.num_hidden_layers)]

    @staticmethod
    def _alloc(cfg: LanguageConfig, cap: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        if cfg.use_mla:  # compressed: 512-d normalised latent + 64-d roped key per token (576 values)
            return {"latent": torch.zeros(cap, cfg.kv_lora_rank, dtype=dtype, device=device),
                    "k_pe": torch.zeros(cap, cfg.qk_rope_head_dim, dtype=dtype, device=device)}
        shape = (cfg.num_key_value_heads, cap, cfg.head_dim)
        return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device)}

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.capacity:
            raise UserError(f"sequence of {self.length + n_new} tokens does not fit the cache of {self.capacity}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors.values())
