"""The kernels behind QuantLinear / QuantExperts: one `WeightOp` per backend and weight format.

A WeightOp holds one weight [N, K] or a stack of routed experts [E, N, K], repacked once (at construction) into the
layout its kernel reads; `edge_vl2.qlinear.make_op` picks the op for a backend and format, and the qlinear module
docstring says what each backend runs and how far it may differ from the fp32 reference. Repacked tensors are
non-persistent buffers: the disk format is the canonical one (edge_vl2.qformat), never a module's state_dict.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import linear
from .qformat import Int4Weight, Int8Weight, QuantizedWeight

# cpu backend: from this many rows on, dequantizing to fp32 once per call and running the fp32 GEMM beats the packed
# bf16-activation ops on the 2-core AVX2 box (896x1280, interleaved medians; packed INT8 / INT4 / dequant INT8 / INT4,
# ms): 96 rows 4.1 / 4.3 / 4.7 / 6.0; 192 rows 7.7 / 8.3 / 5.7 / 7.9; 1024 rows 44 / 51 / 22 / 26 (fp32 GEMM alone
# 20, bf16 GEMM 143). None disables it. The dequantized weight is made in blocks of DEQUANT_BLOCK_ELEMENTS.
PREFILL_DEQUANT_MIN_ROWS: int | None = 192
DEQUANT_BLOCK_ELEMENTS = 1 << 22


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


# --- one kernel per backend and format: a repacked weight [*E, N, K] ---------------------------------------------

class WeightOp(nn.Module):
    """A weight [N, K] or expert stack [E, N, K] repacked for one kernel.

    forward(x [M, K], expert) -> [M, N] in the kernel's output dtype (bf16 for the packed CPU ops, fp32 for the
    reference); `rows(x [R, K], expert_ids [R])` multiplies row r by expert expert_ids[r].
    """

    kernel = ""
    prefill_only: tuple[str, ...] = ()  # buffers only the many-row (prefill) path reads, e.g. fp32 scales

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


class ReferenceOp(WeightOp):
    """fp32 dequantize + matmul; cached (fp32 copy) or per call (only the packed tensors are kept)."""

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


def _dequant_linear(x: torch.Tensor, n: int, k: int, rows) -> torch.Tensor:
    """x [M, K] @ W^T in fp32, W dequantized by `rows(a, b)` (fp32 [b - a, K]) in blocks of output rows, so the
    transient fp32 copy stays under DEQUANT_BLOCK_ELEMENTS (an lm_head would otherwise need ~0.7 GB)."""
    xf = x.float()
    step = max(1, DEQUANT_BLOCK_ELEMENTS // k)
    if step >= n:
        return F.linear(xf, rows(0, n))
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for a in range(0, n, step):
        out[:, a:a + step] = F.linear(xf, rows(a, min(n, a + step)))
    return out


class CpuOp(WeightOp):
    """Shared by the cpu ops: the fp32 dequantize + GEMM path for calls with many rows (PREFILL_DEQUANT_MIN_ROWS)."""

    def __init__(self, w: QuantizedWeight, prefill_dequant: bool):
        super().__init__(w.shape, format_name(w))
        self.prefill_dequant = prefill_dequant and PREFILL_DEQUANT_MIN_ROWS is not None

    def _use_dequant(self, x: torch.Tensor) -> bool:
        return self.prefill_dequant and x.shape[0] >= PREFILL_DEQUANT_MIN_ROWS

    def describe(self) -> str:
        extra = f"; >= {PREFILL_DEQUANT_MIN_ROWS} rows: fp32 dequantize + GEMM" if self.prefill_dequant else ""
        return super().describe() + extra


class CpuInt8Op(CpuOp):
    """INT8 per channel: torch._weight_int8pack_mm(x_bf16 [M, K], int8 [N, K], bf16 scales [N])."""

    kernel = "torch._weight_int8pack_mm (bf16 activations)"
    prefill_only = ("scales32",)

    def __init__(self, w: Int8Weight, prefill_dequant: bool = True):
        super().__init__(w, prefill_dequant)
        if self.in_features % 8:  # the op reads past the row otherwise (segfaults in torch 2.13)
            raise ValueError(f"cpu INT8: in_features must be a multiple of 8, got {self.in_features}")
        self.register_buffer("qweight", w.qweight.contiguous(), persistent=False)  # [*E, N, K]
        self.register_buffer("scales", w.scales.to(torch.bfloat16).contiguous(), persistent=False)  # [*E, N]
        self.register_buffer("scales32", w.scales.float().contiguous(), persistent=False)  # exact, for fp32 path

    def forward(self, x, expert=None):
        self._check_expert(expert)
        q, s = (self.qweight, self.scales) if expert is None else (self.qweight[expert], self.scales[expert])
        if self._use_dequant(x):
            s32 = self.scales32 if expert is None else self.scales32[expert]
            return _dequant_linear(x, self.out_features, self.in_features,
                                   lambda a, b: q[a:b].float() * s32[a:b, None])
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, s)


class CpuInt8GroupOp(CpuOp):
    """INT8 per group: _weight_int8pack_mm once per group of g input columns, partial sums added in fp32.

    Measured on the 2-core AVX2 box (896x1280 g128, 1 row): 0.63 ms for the loop vs 4.3 ms dequantizing to bf16 per
    call (per-channel INT8: 0.36 ms). Groups are stored column-block-major [*E, K/g, N, g] so each group's block is
    contiguous.
    """

    kernel = "torch._weight_int8pack_mm per group (bf16 activations, fp32 sums)"
    prefill_only = ("scales32",)

    def __init__(self, w: Int8Weight, prefill_dequant: bool = True):
        super().__init__(w, prefill_dequant)
        g = w.group_size
        self.group_size = g
        q = w.qweight.unflatten(-1, (self.in_features // g, g))  # [*E, N, K/g, g]
        self.register_buffer("qweight", q.transpose(-3, -2).contiguous(), persistent=False)  # [*E, K/g, N, g]
        scales = w.scales.transpose(-2, -1).contiguous()  # [*E, K/g, N]
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        self.register_buffer("scales32", scales.float(), persistent=False)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        q, s = (self.qweight, self.scales) if expert is None else (self.qweight[expert], self.scales[expert])
        if self._use_dequant(x):
            s32 = self.scales32 if expert is None else self.scales32[expert]
            return _dequant_linear(x, self.out_features, self.in_features, lambda a, b: (
                q[:, a:b].float() * s32[:, a:b, None]).transpose(0, 1).reshape(b - a, self.in_features))
        xb = x.to(torch.bfloat16)
        g = self.group_size
        out = torch.zeros(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for j in range(q.shape[0]):
            out += torch._weight_int8pack_mm(xb[:, j * g:(j + 1) * g].contiguous(), q[j], s[j])
        return out


def int4_scales_and_zeros(w: Int4Weight) -> torch.Tensor:
    """Our (code - z) * s as PyTorch's packed-int4 (code - 8) * scale + zero: bf16 [*E, K/g, N, 2], (s, (8 - z) s)."""
    s = w.scales.float()
    zero = (8.0 - w.zero_points().float()) * s  # exactly 0 when symmetric
    return torch.stack([s, zero], dim=-1).transpose(-3, -2).to(torch.bfloat16).contiguous()


class CpuInt4Op(CpuOp):
    """INT4: torch._weight_int4pack_mm_for_cpu(x_bf16, packed, g, scales_and_zeros [K/g, N, 2]).

    The op's packed layout depends on the CPU's vector width (AVX2 / AVX-512 blocks of 32 / 64 rows), so the fp32
    prefill path keeps the canonical tensors too: +0.5 byte per weight (prefill_dequant=False saves it).
    """

    kernel = "torch._weight_int4pack_mm_for_cpu (bf16 activations)"
    prefill_only = ("canonical_qweight", "canonical_scales", "canonical_zeros")

    def __init__(self, w: Int4Weight, prefill_dequant: bool = True):
        super().__init__(w, prefill_dequant)
        if self.out_features % 16 or w.group_size not in (32, 64, 128, 256):
            raise ValueError(f"cpu INT4 needs out_features % 16 == 0 and a group size of 32/64/128/256, got "
                             f"out {self.out_features}, g{w.group_size}")
        self.group_size = w.group_size
        flat = _flat_qweight(w)
        stack = flat if self.n_experts is not None else flat[None]
        packed = None
        for e in range(stack.shape[0]):  # the conversion takes one [N, K] int32 matrix of codes 0..15
            codes = torch.stack([stack[e] & 0x0F, stack[e] >> 4], dim=-1).flatten(-2).to(torch.int32)
            one = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            packed = one.new_empty((stack.shape[0], *one.shape)) if packed is None else packed  # filled in place
            packed[e] = one
        packed = packed if self.n_experts is not None else packed[0]
        self.register_buffer("packed", packed, persistent=False)  # uint8 [*E, N, K/2], the op's own layout
        self.register_buffer("scales_and_zeros", int4_scales_and_zeros(w), persistent=False)
        if self.prefill_dequant:
            for name, t in w.tensors().items():
                self.register_buffer(f"canonical_{name}", t, persistent=False)

    def _canonical(self, expert: int | None) -> Int4Weight:
        zeros = getattr(self, "canonical_zeros", None)
        w = Int4Weight(self.canonical_qweight, self.canonical_scales, zeros)
        return w if expert is None else w.expert(expert)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        if self._use_dequant(x):
            w = self._canonical(expert)
            z = w.zeros
            return _dequant_linear(x, self.out_features, self.in_features, lambda a, b: Int4Weight(
                w.qweight[a:b], w.scales[a:b], None if z is None else z[a:b]).dequantize(torch.float32))
        p, sz = (self.packed, self.scales_and_zeros) if expert is None else \
            (self.packed[expert], self.scales_and_zeros[expert])
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), p, self.group_size, sz)


class CudaInt4Op(WeightOp):
    """INT4 on CUDA (sm80+): tinygemm torch._weight_int4pack_mm; its packer wants uint8 [N, K/2], EVEN column in the
    HIGH nibble (ours: low), and the same (code - 8) * scale + zero convention as the CPU op."""

    kernel = "torch._weight_int4pack_mm (tinygemm, bf16 activations)"

    def __init__(self, w: Int4Weight):
        super().__init__(w.shape, format_name(w))
        k = self.in_features
        inner = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
        if self.out_features % 8 or inner is None or w.group_size not in (32, 64, 128, 256):
            raise ValueError(f"tinygemm needs out % 8 == 0, in % 32 == 0 and g in 32..256: got "
                             f"[{self.out_features}, {k}] g{w.group_size}")
        self.group_size = w.group_size
        flat = _flat_qweight(w)
        swapped = ((flat & 0x0F) << 4) | (flat >> 4)
        stack = swapped if self.n_experts is not None else swapped[None]
        packed = torch.stack([torch._convert_weight_to_int4pack(stack[e].contiguous(), inner)
                              for e in range(stack.shape[0])])
        self.register_buffer("packed", packed if self.n_experts is not None else packed[0], persistent=False)
        self.register_buffer("scales_and_zeros", int4_scales_and_zeros(w), persistent=False)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        p, sz = (self.packed, self.scales_and_zeros) if expert is None else \
            (self.packed[expert], self.scales_and_zeros[expert])
        return torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), p, self.group_size, sz)


class TritonOp(WeightOp):
    """The Triton kernels of edge_vl2.kernels on the canonical tensors as stored (no repacking)."""

    def __init__(self, w: QuantizedWeight):
        super().__init__(w.shape, format_name(w))
        from .kernels import triton_status

        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"the cuda backend's Triton kernels cannot run here: {why}")
        from .kernels import triton_qmm

        self._qmm = triton_qmm
        self.kernel = f"triton ({why})"
        self.bits, self.group_size = w.bits, w.group_size
        self.register_buffer("qweight", _flat_qweight(w).contiguous(), persistent=False)
        self.register_buffer("scales", w.scales.contiguous(), persistent=False)
        self.register_buffer("zeros", None if w.zeros is None else w.zeros.contiguous(), persistent=False)

    def _parts(self, expert):
        pick = (lambda t: t) if expert is None else (lambda t: None if t is None else t[expert])
        return pick(self.qweight), pick(self.scales), pick(self.zeros)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        return self._qmm.qmm(x, *self._parts(expert), self.bits, self.group_size)

    def rows(self, x, expert_ids):
        return self._qmm.qmm_rows(x, expert_ids, self.qweight, self.scales, self.zeros, self.bits, self.group_size)


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise RuntimeError("the bnb backend needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes


class BnbOp(WeightOp):
    """bitsandbytes layers: NF4 Linear4bit or LLM.int8 Linear8bitLt (threshold 0: no fp16 outlier decomposition, a
    plain row-wise int8 weight), one per expert for stacks. bitsandbytes quantizes from a float weight: `matrix(e)`
    gives expert e's [N, K] (e is None for a plain weight), one at a time so no whole float stack is ever made."""

    def __init__(self, kind: str, shape: tuple[int, ...], matrix: Callable[[int | None], torch.Tensor],
                 blocksize: int = 64):
        bnb = _bnb()
        if kind not in ("nf4", "int8"):
            raise ValueError(f"bnb kind must be 'nf4' or 'int8', got {kind!r}")
        super().__init__(tuple(shape), "NF4" if kind == "nf4" else "LLM.int8")
        self.kernel = "bitsandbytes " + ("NF4 Linear4bit" if kind == "nf4" else "LLM.int8 Linear8bitLt")
        # LLM.int8 casts its input to fp16 (warning each call when given bf16): hand it fp16 in the first place
        self.compute_dtype = torch.bfloat16 if kind == "nf4" else torch.float16
        layers = []
        for e in range(self.n_experts or 1):
            m = matrix(None if self.n_experts is None else e)
            n, k = m.shape
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                          device=m.device)
                layer.weight = bnb.nn.Params4bit(m.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                                 blocksize=blocksize)
            else:
                layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0, device=m.device)
                layer.weight = bnb.nn.Int8Params(m.to(torch.bfloat16), requires_grad=False, has_fp16_weights=False)
            layers.append(layer.to(m.device))  # moving to the device is what quantizes
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_quantized(cls, w: QuantizedWeight, kind: str) -> "BnbOp":
        """Re-quantize our weight (dequantized one expert at a time: a whole fp32 stack is ~0.6 GB at Tiny's size)."""
        return cls(kind, w.shape, lambda e: (w if e is None else w.expert(e)).dequantize(torch.float32))

    @classmethod
    def from_float(cls, dense: torch.Tensor, kind: str, blocksize: int = 64) -> "BnbOp":
        """Quantize a float weight [N, K] or stack [E, N, K] straight away (the benchmark's baseline)."""
        return cls(kind, tuple(dense.shape), lambda e: dense if e is None else dense[e], blocksize)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        return self.layers[0 if expert is None else expert](x.to(self.compute_dtype))

    @property
    def nbytes(self) -> int:
        """Packed weights plus bitsandbytes' side tensors (NF4 block absmax, LLM.int8 row scales), which are plain
        attributes rather than parameters or buffers."""
        held = {}
        for layer in self.layers:
            w = layer.weight
            state = getattr(w, "quant_state", None)
            extra = [getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None),
                     getattr(w, "SCB", None), getattr(getattr(layer, "state", None), "SCB", None)]
            held.update({id(t): t for t in [w, *extra] if isinstance(t, torch.Tensor)})  # SCB may sit in both
        return sum(t.numel() * t.element_size() for t in held.values())

    def dequantized(self, expert: int | None = None) -> torch.Tensor:
        """The weight bitsandbytes actually multiplies by, in fp32 (for tests)."""
        bnb = _bnb()
        layer = self.layers[0 if expert is None else expert]
        if isinstance(layer, bnb.nn.Linear4bit):
            return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moved there by a forward
        return layer.weight.data.float() * scb.float()[:, None] / 127


