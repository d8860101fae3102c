"""A token embedding table kept quantized: a lookup dequantizes only the rows it reads.

The table is the decoder's largest tensor after lm_head (Tiny and Small: 129,280 x 1,280 / 2,048), read one row per
token, so its bytes are disk and memory, not bandwidth: INT4 g32 keeps Tiny's 0.33 GB bf16 table in 0.10 GB, which
the INT4 recipe spends on projections every token reads (README "Held-out domains"). The rows come out in the
runtime dtype, exactly `weight.dequantize()[ids]`, on every backend (a gather is not worth a kernel).
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantizedWeight


class QuantEmbedding(nn.Module):
    """nn.Embedding's forward over an Int4Weight / Int8Weight [vocab, hidden]; its tensors are buffers, so
    `.to(device)` moves them with the model."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"an embedding table is [vocab, hidden], got {list(weight.shape)}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self._kind = type(weight)
        self._names = tuple(weight.tensors())
        for name, t in weight.tensors().items():
            self.register_buffer(name, t, persistent=False)

    @property
    def qweight_(self) -> QuantizedWeight:
        """The quantized table as its format object (over this module's current buffers)."""
        return self._kind(**{n: getattr(self, n) for n in self._names})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self._kind(**{n: getattr(self, n).index_select(0, flat) for n in self._names})
        return rows.dequantize(self.dtype).reshape(*ids.shape, self.embedding_dim)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._names)

    def describe(self) -> str:
        w = self.qweight_
        group = "per channel" if w.group_size is None else f"g{w.group_size}"
        sym = "" if w.bits == 8 or w.symmetric else " asym"
        return f"embedding INT{w.bits} {group}{sym} (rows dequantized on lookup)"
