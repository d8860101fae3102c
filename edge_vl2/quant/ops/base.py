"""What every kernel op shares: the WeightOp interface, format names, byte counts, and FloatOp for unquantized
weights."""

from __future__ import annotations

import torch
from torch import nn

from ...model.layers import linear
from ..formats import QuantizedWeight


def format_name(w: QuantizedWeight) -> str:
    """'INT4 g128 asym', 'INT8 per-channel', 'INT8 g64'."""
    if w.bits == 4:
        return f"INT4 g{w.group_size} {'sym' if w.symmetric else 'asym'}"
    return "INT8 per-channel" if w.group_size is None else f"INT8 g{w.group_size}"


def _flat_qweight(w: QuantizedWeight) -> torch.Tensor:
    """INT4 [..., N, K/g, g/2] -> [..., N, K/2] (a view); INT8 unchanged."""
    return w.qweight.flatten(-2) if w.bits == 4 else w.qweight


def _tensor_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers()) + \
        sum(p.numel() * p.element_size() for p in module.parameters())


class WeightOp(nn.Module):
    """A weight [N, K] or expert stack [E, N, K] repacked for one kernel.

    forward(x [M, K], expert) -> [M, N] in the kernel's output dtype (bf16 for the packed CPU ops, fp32 for the
    reference); `rows(x [R, K], expert_ids [R])` multiplies row r by expert expert_ids[r].
    """

    kernel = ""
    prefill_only: tuple[str, ...] = ()  # buffers only the many-row (prefill) path reads, e.g. fp32 scales
    # True when `rows` keeps the expert choice on the device (no .tolist(), one launch): a CUDA graph can capture it
    sync_free_rows = False

    def __init__(self, shape: tuple[int, ...], label: str):
        super().__init__()
        if len(shape) not in (2, 3):
            raise ValueError(f"expected a weight [out, in] or experts [E, out, in], got {list(shape)}")
        self.out_features, self.in_features = shape[-2], shape[-1]
        self.n_experts = shape[0] if len(shape) == 3 else None
        self.format = label

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Default: group the rows by expert and run each used expert once (a loop over used experts only)."""
        ids = expert_ids.tolist()
        if len(set(ids)) == len(ids):  # decode: k distinct experts, one row each
            return torch.cat([self(x[r:r + 1], e) for r, e in enumerate(ids)])
        order = expert_ids.argsort(stable=True)
        counts = torch.bincount(expert_ids, minlength=self.n_experts)
        used = counts.nonzero().flatten().tolist()
        out, begin = None, 0
        for e, n in zip(used, counts[used].tolist()):
            idx = order[begin:begin + n]
            y = self(x[idx], e)
            if out is None:
                out = y.new_empty(x.shape[0], self.out_features)
            out[idx] = y
            begin += n
        return out

    @property
    def nbytes(self) -> int:
        """Bytes this op holds."""
        return _tensor_bytes(self)

    @property
    def decode_nbytes(self) -> int:
        """Bytes the few-row (decode) kernel reads over all experts: nbytes less the prefill-only copies."""
        extra = [getattr(self, name, None) for name in self.prefill_only]  # canonical_zeros: asymmetric only
        return self.nbytes - sum(t.numel() * t.element_size() for t in extra if t is not None)

    def describe(self) -> str:
        return f"{self.format} via {self.kernel}"

    def _check_expert(self, expert: int | None) -> None:
        if (expert is None) != (self.n_experts is None):
            raise ValueError("an expert index is needed for stacked experts, and only for them")


class FloatOp(WeightOp):
    """A weight left in high precision (experts a recipe keeps unquantized), multiplied in its own dtype through
    `layers.linear` exactly as the full-precision StackedExperts does."""

    kernel = "float matmul"

    def __init__(self, weight: torch.Tensor):
        if not weight.is_floating_point():
            raise TypeError(f"FloatOp takes a float weight, got {weight.dtype}")
        super().__init__(tuple(weight.shape), str(weight.dtype).removeprefix("torch."))
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        w = self.weight if expert is None else self.weight[expert]
        return linear(x.to(w.dtype), w)
