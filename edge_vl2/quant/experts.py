"""Quantized routed experts: a drop-in for `edge_vl2.model.moe.StackedExperts` over stacked INT4/INT8 weights.

Same two entry points and outputs as StackedExperts:
- `per_chosen_expert(x [T, H], ids [T, k]) -> [T, k, H]` for a few tokens (decode). No loop over all E experts: the cuda
  backend runs each projection for all (token, slot) rows in ONE Triton launch that picks the expert per row (no
  host sync); the reference backend gathers the chosen experts by index (while packed, when not cached) and batches
  the matmuls; the cpu/bnb backends loop over the k chosen experts only, one fast packed op per expert (on a 2-core
  AVX2 CPU that measured faster than gathering the k packed experts and dequantizing them).
- `sorted_by_expert(x, ids) -> [T, k, H]` for many tokens (prefill): (token, slot) pairs sorted by expert, one
  matmul per USED expert on its rows.

The experts of one layer need not share a format: a recipe may give some experts INT8, others INT4, and keep some in
high precision (the toolchain then writes per-expert tensors `...mlp.experts.{e}.{proj}`). Experts with the same
formats form an `ExpertGroup` (their weights stacked, one op per projection); each (token, slot) row goes to its
expert's group. A layer in one format is one group and pays nothing for this; several groups cost a few small
index operations per call (and on CUDA a host sync, which keeps such a layer out of a captured graph).

Within a group, gate and up are fused into one [n, 2I, H] weight when they share a format (one matmul per expert
instead of two), except on qkern, which reads them where they lie (a fused copy would double their memory).

`moe_step(x, ids, weights, shared)` is the cpu backend's decode step: ONE qkern call for the k chosen experts' gate+up,
SiLU * up, down and weighted sum, plus the shared experts (MoE.forward uses it when it returns a tensor).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Int4Weight, Int8Weight, QuantizedWeight
from .linear import make_op, uses_qkern
from .ops import BnbOp, FloatOp, QkernOp, WeightOp, format_name

ExpertWeight = QuantizedWeight | torch.Tensor  # a float tensor is a projection kept in high precision


def concat_out(a: QuantizedWeight, b: QuantizedWeight) -> QuantizedWeight:
    """Two weights [..., Na, K], [..., Nb, K] of one format -> one [..., Na + Nb, K] (rows of a first)."""
    if format_name(a) != format_name(b) or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"cannot fuse {format_name(a)} {list(a.shape)} with {format_name(b)} {list(b.shape)}")
    if a.bits == 4:
        zeros = None if a.zeros is None else torch.cat([a.zeros, b.zeros], dim=-2)
        return Int4Weight(torch.cat([a.qweight, b.qweight], dim=-3), torch.cat([a.scales, b.scales], dim=-2), zeros)
    scale_axis = -1 if a.group_size is None else -2
    return Int8Weight(torch.cat([a.qweight, b.qweight], dim=-2), torch.cat([a.scales, b.scales], dim=scale_axis))


def weight_format(w: ExpertWeight) -> str:
    """'INT4 g128 sym', 'INT8 per-channel', ... or the dtype of a weight kept in high precision ('bfloat16')."""
    return str(w.dtype).removeprefix("torch.") if isinstance(w, torch.Tensor) else format_name(w)


def _stack(parts: list[ExpertWeight]) -> ExpertWeight:
    return torch.stack(parts) if isinstance(parts[0], torch.Tensor) else type(parts[0]).stack(parts)


class ExpertGroup(nn.Module):
    """Experts sharing one format per projection: gate/up [n, I, H], down [n, H, I], repacked for one backend.

    A projection given as a float tensor stays in high precision (FloatOp); quantized ones go to `make_op`.
    """

    def __init__(self, gate_proj: ExpertWeight | None, up_proj: ExpertWeight | None,
                 down_proj: ExpertWeight | None, backend: str = "cpu", *, fuse_gate_up: bool = True,
                 ops: tuple[WeightOp, WeightOp | None, WeightOp] | None = None, **options):
        """options go to every quantized projection's kernel (see edge_vl2.quant.linear.make_op); `ops` takes ready ops
        instead of weights (fused gate+up, None, down)."""
        super().__init__()
        self.backend = backend
        if ops is None:
            weights = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
            for name, w in weights.items():
                if len(w.shape) != 3:
                    raise ValueError(f"experts {name} must be stacked [E, out, in], got {list(w.shape)}")
            g, u, d = (tuple(w.shape) for w in weights.values())
            if g[0] != d[0] or g[1:] != d[1:][::-1] or u != g:
                raise ValueError(f"expert shapes do not fit: gate {list(g)}, up {list(u)}, down {list(d)}")

            def op(w: ExpertWeight) -> WeightOp:
                return FloatOp(w) if isinstance(w, torch.Tensor) else make_op(w, backend, **options)

            quantized = not isinstance(gate_proj, torch.Tensor) and not isinstance(up_proj, torch.Tensor)
            fuse_gate_up = fuse_gate_up and not (quantized and uses_qkern(gate_proj, backend, options.get("kernel")))
            if fuse_gate_up and quantized and weight_format(gate_proj) == weight_format(up_proj):
                ops = (op(concat_out(gate_proj, up_proj)), None, op(down_proj))
            else:
                ops = (op(gate_proj), op(up_proj), op(down_proj))
        first, up, down = ops
        self.gate_up = first if up is None else None  # fused [n, 2I, H], gate rows first
        self.gate = None if up is None else first
        self.up = up
        self.down = down
        self.n_experts, self.hidden, self.inter = down.n_experts, down.out_features, down.in_features

    @property
    def fused(self) -> bool:
        return self.gate_up is not None

    @property
    def ops(self) -> list[WeightOp]:
        return [op for op in (self.gate_up, self.gate, self.up, self.down) if op is not None]

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def decode_nbytes(self) -> int:
        return sum(op.decode_nbytes for op in self.ops)

    def describe(self) -> str:
        first = f"gate+up fused {self.gate_up.describe()}" if self.fused else \
            f"gate {self.gate.describe()}, up {self.up.describe()}"
        return f"{first}; down {self.down.describe()}"

    def _hidden(self, gu: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        g, u = gu if isinstance(gu, tuple) else gu.split(self.inter, dim=-1)
        return F.silu(g) * u

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e (index within the group) on its rows x [n, H] -> [n, H] in the kernels' output dtype."""
        gu = self.gate_up(x, e) if self.fused else (self.gate(x, e), self.up(x, e))
        return self.down(self._hidden(gu), e)

    def rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row r of x [R, H] through expert ids[r] (indices within the group) -> [R, H]."""
        gu = self.gate_up.rows(x, ids) if self.fused else (self.gate.rows(x, ids), self.up.rows(x, ids))
        return self.down.rows(self._hidden(gu), ids)


class QuantExperts(nn.Module):
    """All routed experts of one layer, as one or more ExpertGroups; `members[g]` are group g's expert ids, in the
    order of its stacked weights (default: one group holding experts 0..E-1)."""

    def __init__(self, groups: Sequence[ExpertGroup], members: Sequence[Sequence[int]] | None = None):
        super().__init__()
        members = [list(range(groups[0].n_experts))] if members is None and len(groups) == 1 else members
        if members is None or len(members) != len(groups):
            raise ValueError("give the expert ids of every group")
        n = sum(len(m) for m in members)
        if sorted(e for m in members for e in m) != list(range(n)):
            raise ValueError(f"the groups' expert ids must be 0..{n - 1}, each once")
        for group, ids in zip(groups, members):
            if group.n_experts != len(ids) or (group.hidden, group.inter) != (groups[0].hidden, groups[0].inter):
                raise ValueError(f"group of {group.n_experts} experts [{group.inter}, {group.hidden}] does not fit "
                                 f"{len(ids)} ids and [{groups[0].inter}, {groups[0].hidden}]")
        self.groups = nn.ModuleList(groups)
        self.members = [list(m) for m in members]
        self.backend = groups[0].backend
        self.n_experts, self.hidden, self.inter = n, groups[0].hidden, groups[0].inter
        self._where = [(0, 0)] * n  # expert id -> (group, index within the group)
        for g, ids in enumerate(self.members):
            for local, e in enumerate(ids):
                self._where[e] = (g, local)
        group_of, local_of = zip(*self._where)
        self.register_buffer("group_of", torch.tensor(group_of), persistent=False)
        self.register_buffer("local_of", torch.tensor(local_of), persistent=False)
        self._step = None  # the qkern MoE step's plan, made on first use

    @classmethod
    def stacked(cls, gate_proj: ExpertWeight, up_proj: ExpertWeight, down_proj: ExpertWeight, backend: str = "cpu",
                *, fuse_gate_up: bool = True, **options) -> "QuantExperts":
        """Every expert in one format per projection: stacked weights [E, out, in], used as they are (no copy)."""
        return cls([ExpertGroup(gate_proj, up_proj, down_proj, backend, fuse_gate_up=fuse_gate_up, **options)])

    @classmethod
    def per_expert(cls, weights: Sequence[tuple[ExpertWeight, ExpertWeight, ExpertWeight]], backend: str = "cpu",
                   *, fuse_gate_up: bool = True, **options) -> "QuantExperts":
        """weights[e] = expert e's (gate_proj, up_proj, down_proj), each [out, in], quantized or float (kept in high
        precision). Experts whose three formats agree are stacked into one group (a copy of their tensors)."""
        by_formats: dict[tuple[str, ...], list[int]] = {}
        for e, projs in enumerate(weights):
            by_formats.setdefault(tuple(weight_format(w) for w in projs), []).append(e)
        groups = [ExpertGroup(*(_stack([weights[e][p] for e in ids]) for p in range(3)), backend,
                              fuse_gate_up=fuse_gate_up, **options) for ids in by_formats.values()]
        return cls(groups, list(by_formats.values()))

    @classmethod
    def bnb_from_float(cls, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                       kind: str = "nf4", blocksize: int = 64) -> "QuantExperts":
        """bitsandbytes experts quantized straight from float stacks (the benchmark's baseline), gate/up fused (one
        expert's rows concatenated at a time: no fused copy of the whole stack)."""
        e, i, h = gate_proj.shape
        gate_up = BnbOp(kind, (e, 2 * i, h), lambda k: torch.cat([gate_proj[k], up_proj[k]]), blocksize)
        down = BnbOp.from_float(down_proj, kind, blocksize)
        return cls([ExpertGroup(None, None, None, "bnb", ops=(gate_up, None, down))])

    @property
    def fused(self) -> bool:
        return all(g.fused for g in self.groups)

    @property
    def nbytes(self) -> int:
        """Bytes the experts' repacked weights hold."""
        return sum(g.nbytes for g in self.groups)

    @property
    def decode_nbytes(self) -> int:
        """Bytes the few-row kernels read over all experts (a decode token reads k / E of it)."""
        return sum(g.decode_nbytes for g in self.groups)

    def describe(self) -> str:
        if len(self.groups) == 1:
            return f"{self.backend}: {self.n_experts} experts, {self.groups[0].describe()}"
        parts = "; ".join(f"{len(ids)} x [{g.describe()}]" for g, ids in zip(self.groups, self.members))
        return f"{self.backend}: {self.n_experts} experts in {len(self.groups)} format groups: {parts}"

    def per_chosen_expert(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Few tokens: x [T, H], ids [T, k] -> outputs [T, k, H] (each (token, slot) row through its expert)."""
        t, k = ids.shape
        rows = x[:, None, :].expand(t, k, x.shape[1]).reshape(t * k, x.shape[1])  # [T*k, H]
        flat = ids.reshape(-1)
        if len(self.groups) == 1:  # its ids are 0..E-1 in order: no remapping, no host sync
            return self.groups[0].rows(rows, flat).to(x.dtype).view(t, k, -1)
        out = x.new_empty(t * k, x.shape[1])
        group_of, local = self.group_of[flat], self.local_of[flat]
        for g, group in enumerate(self.groups):
            sel = (group_of == g).nonzero().flatten()
            if sel.numel():
                out[sel] = group.rows(rows[sel], local[sel]).to(x.dtype)
        return out.view(t, k, -1)

    def sorted_by_expert(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Many tokens: group (token, slot) pairs by expert and run each used expert once -> [T, k, H]."""
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        used = counts.nonzero().flatten()
        rows = x[order // k]  # tokens in expert order
        out = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
        begin = 0
        for e, n in zip(used.tolist(), counts[used].tolist()):
            g, local = self._where[e]
            out[order[begin:begin + n]] = self.groups[g].expert(rows[begin:begin + n], local).to(x.dtype)
            begin += n
        return out.view(t, k, -1)

    def moe_step(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 shared: nn.Module | None = None) -> torch.Tensor | None:
        """x [T, H], ids [T, k], fp32 weights [T, k] -> fp32 [T, H] = sum_j weights_j * expert_j(x) + shared(x), in
        ONE qkern call when every routed projection (and the shared experts' gate/up/down, else they run as
        modules) is a qkern op of one group; None when it cannot (the caller takes the per-expert path)."""
        if self._step is None:
            self._step = _QkernStep.plan(self, shared)
        if not self._step:
            return None
        return self._step(x, ids, weights, shared)


class _QkernStep:
    """The ops one qkern MoE call reads: routed (gate, up or None, down), shared (gate, up, down) or None."""

    def __init__(self, routed: tuple, shared: tuple | None):
        self.routed, self.shared = routed, shared

    @classmethod
    def plan(cls, experts: QuantExperts, shared: nn.Module | None) -> "_QkernStep | bool":
        if len(experts.groups) != 1:
            return False
        g = experts.groups[0]
        routed = (g.gate_up, None, g.down) if g.fused else (g.gate, g.up, g.down)
        if not all(isinstance(op, QkernOp) for op in routed if op is not None) or \
                (not g.fused and g.gate.format != g.up.format):
            return False
        ops = tuple(getattr(getattr(shared, p, None), "op", None) for p in ("gate_proj", "up_proj", "down_proj"))
        fused_shared = all(isinstance(op, QkernOp) for op in ops) and ops[0].format == ops[1].format
        return cls(routed, ops if fused_shared else None)

    def __bool__(self) -> bool:
        return True

    def __call__(self, x, ids, weights, shared):
        from .kernels import qkern

        mats = [None if op is None else op.mat() for op in self.routed]
        both = None if self.shared is None else tuple(op.mat() for op in self.shared)
        y = qkern.moe(*mats, x, ids, weights, both)
        if self.shared is None and shared is not None:
            y += shared(x).float()
        return y
