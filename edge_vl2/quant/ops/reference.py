"""The reference backend: fp32 dequantize + matmul, the oracle every other backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import QuantizedWeight
from .base import WeightOp, format_name


class ReferenceOp(WeightOp):
    """fp32 dequantize + matmul; cached (fp32 copy) or per call (only the packed tensors are kept)."""

    sync_free_rows = True  # rows gathers the chosen experts by a device index

    def __init__(self, w: QuantizedWeight, cache: bool = True):
        super().__init__(w.shape, format_name(w))
        self.cache = cache
        self.kernel = "fp32 dequantize + matmul" + (" (cached fp32 weight)" if cache else " (per call)")
        if cache:
            self.register_buffer("weight", w.dequantize(torch.float32), persistent=False)
        else:
            self._cls, self._names = type(w), tuple(w.tensors())
            for name, t in w.tensors().items():
                self.register_buffer(name, t, persistent=False)

    def dequantized(self, experts: torch.Tensor | int | None = None) -> torch.Tensor:
        """fp32 weight [N, K], or the experts chosen by index (gathered while still packed, then dequantized)."""
        if self.cache:
            return self.weight if experts is None else self.weight[experts]
        pick = (lambda t: t) if experts is None else (lambda t: t[experts])
        return self._cls(**{n: pick(getattr(self, n)) for n in self._names}).dequantize(torch.float32)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        return F.linear(x.float(), self.dequantized(expert))

    def rows(self, x, expert_ids):
        return (self.dequantized(expert_ids) @ x.float()[:, :, None]).squeeze(-1)  # [R, N, K] @ [R, K, 1]
