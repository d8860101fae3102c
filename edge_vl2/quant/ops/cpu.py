"""The cpu backend: our qkern kernels (or, where they cannot run, PyTorch's packed weight-only ops) for few rows,
fp32 dequantize + GEMM for many."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import Int4Weight, Int8Weight, QuantizedWeight
from .base import WeightOp, _flat_qweight, format_name

# cpu backend: from this many rows on, dequantizing to fp32 once per call and running the fp32 GEMM beats the packed
# bf16-activation ops on the 2-core AVX2 box (896x1280, interleaved medians; packed INT8 / INT4 / dequant INT8 / INT4,
# ms): 96 rows 4.1 / 4.3 / 4.7 / 6.0; 192 rows 7.7 / 8.3 / 5.7 / 7.9; 1024 rows 44 / 51 / 22 / 26 (fp32 GEMM alone
# 20, bf16 GEMM 143). None disables it. The dequantized weight is made in blocks of DEQUANT_BLOCK_ELEMENTS.
PREFILL_DEQUANT_MIN_ROWS: int | None = 192
DEQUANT_BLOCK_ELEMENTS = 1 << 22
# qkern: from this many rows, qkern's own fp32 dequantize (qk_dequant, ~0.8 ms for an expert's [1792, 1280] INT4
# gate+up) + the fp32 GEMM beats its int8 dot products, whose cost grows with every row (same weight, 1 thread, best
# of 15 on the loaded 2-core box, ms: 16 rows 0.87 / 1.35, 32 rows 1.81 / 1.95, 48 rows 2.72 / 2.25, 64 rows 3.6 /
# 2.6; with torch's GEMM held to AVX2 32 rows 2.0 / 2.3, 48 rows 3.0 / 2.4). A prefill's experts get ~k/E of its
# tokens each (~60 of a 630-token photo prompt) and its other layers all of them: both take the GEMM.
QKERN_DEQUANT_MIN_ROWS = 40


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
        # The op reads past the row unless in_features % 8 == 0 (segfaults in torch 2.13): such weights (small test
        # models only) take the dequantize path for every call.
        self.packable = self.in_features % 8 == 0
        if not self.packable:
            self.kernel = "fp32 dequantize + matmul per call (in_features not a multiple of 8)"
        q = w.qweight.contiguous()  # [*E, N, K]
        # torch 2.13's _weight_int8pack_mm segfaults on a weight that is not 16-byte aligned (measured: offsets 1, 2,
        # 4, 8 crash, 16, 32, 48 run), and safetensors packs tensors without padding: copy such a weight here, for
        # this op only (qkern reads the bundle's codes in place at any offset).
        if self.packable and q.data_ptr() % 16:
            q = q.clone()
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", w.scales.to(torch.bfloat16).contiguous(), persistent=False)  # [*E, N]
        self.register_buffer("scales32", w.scales.float().contiguous(), persistent=False)  # exact, for fp32 path

    def forward(self, x, expert=None):
        self._check_expert(expert)
        q, s = (self.qweight, self.scales) if expert is None else (self.qweight[expert], self.scales[expert])
        if self._use_dequant(x) or not self.packable:
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
    prefill path keeps the canonical tensors too: +0.5 byte per weight (prefill_dequant=False saves it). A weight the
    packed op cannot take (out_features not a multiple of 16, or a group size outside 32-256: small test models,
    never the real Tiny/Small shapes) runs every call through the dequantize path instead, so any weight the export
    writes runs here.
    """

    kernel = "torch._weight_int4pack_mm_for_cpu (bf16 activations)"
    prefill_only = ("canonical_qweight", "canonical_scales", "canonical_zeros")

    def __init__(self, w: Int4Weight, prefill_dequant: bool = True):
        self.packable = w.shape[-2] % 16 == 0 and w.group_size in (32, 64, 128, 256)
        super().__init__(w, prefill_dequant)
        if not self.packable:
            self.kernel = "fp32 dequantize + matmul per call (shape the packed op cannot take)"
            self.prefill_only = ()
        self.group_size = w.group_size
        if self.packable:
            self.register_buffer("packed", _pack_for_cpu(w, self.n_experts is not None), persistent=False)
            self.register_buffer("scales_and_zeros", int4_scales_and_zeros(w), persistent=False)
        if self.prefill_dequant or not self.packable:
            for name, t in w.tensors().items():
                self.register_buffer(f"canonical_{name}", t, persistent=False)

    def _use_dequant(self, x: torch.Tensor) -> bool:
        return not self.packable or super()._use_dequant(x)

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


def _pack_for_cpu(w: Int4Weight, stacked: bool) -> torch.Tensor:
    """The canonical codes in the packed op's own layout, uint8 [*E, N, K/2], one [N, K] matrix at a time."""
    flat = _flat_qweight(w)
    stack = flat if stacked else flat[None]
    packed = None
    for e in range(stack.shape[0]):  # the conversion takes one [N, K] int32 matrix of codes 0..15
        codes = torch.stack([stack[e] & 0x0F, stack[e] >> 4], dim=-1).flatten(-2).to(torch.int32)
        one = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        packed = one.new_empty((stack.shape[0], *one.shape)) if packed is None else packed  # filled in place
        packed[e] = one
    return packed if stacked else packed[0]


class QkernOp(CpuOp):
    """qkern (edge_vl2.quant.kernels.qkern) over the canonical tensors where they lie: no repacked copy, so the
    memory-mapped bundle is the only copy of the weight. Few rows: int8-activation dot products on AVX2 (fp32 on the
    scalar tier); from QKERN_DEQUANT_MIN_ROWS rows qkern dequantizes the same tensors to fp32 a block at a time for
    the fp32 GEMM."""

    def __init__(self, w: QuantizedWeight, prefill_dequant: bool = True):
        from ..kernels import qkern

        super().__init__(w, prefill_dequant)
        self._qkern, self._cls, self._names = qkern, type(w), tuple(w.tensors())
        for name, t in w.tensors().items():
            self.register_buffer(name, t.contiguous(), persistent=False)
        self._mat = None
        self.kernel = f"qkern ({'INT4' if w.bits == 4 else 'INT8'} x int8 activations)"

    def _use_dequant(self, x: torch.Tensor) -> bool:
        return self.prefill_dequant and x.shape[0] >= QKERN_DEQUANT_MIN_ROWS

    def describe(self) -> str:
        extra = f"; >= {QKERN_DEQUANT_MIN_ROWS} rows: fp32 dequantize + GEMM" if self.prefill_dequant else ""
        return f"{self.format} via {self.kernel}{extra}"

    def weight(self, expert: int | None = None) -> QuantizedWeight:
        w = self._cls(**{n: getattr(self, n) for n in self._names})
        return w if expert is None else w.expert(expert)

    def mat(self):
        """The C descriptor: pointers into the buffers, made again if they moved (.to(), load_state_dict)."""
        if self._mat is None or self._mat.qw != self.qweight.data_ptr():
            self._mat = self._qkern.QMat.of(self.weight())
        return self._mat

    def forward_many(self, x: torch.Tensor, others: list) -> list[torch.Tensor] | None:
        """x [M, K] through this weight and `others` (qkern ops of the same K and format) in one qkern call -> their
        outputs, fp32; None when a weight differs or x has many rows (the dequantize path)."""
        ops = [self, *others]
        if self.n_experts is not None or not all(isinstance(o, QkernOp) and o.format == self.format and
                                                 o.in_features == self.in_features and o.n_experts is None
                                                 for o in others) or any(o._use_dequant(x) for o in ops):
            return None
        y = self._qkern.linear_many([o.mat() for o in ops], x)
        return list(y.split([o.out_features for o in ops], dim=1))

    def forward(self, x, expert=None):
        self._check_expert(expert)
        if self._use_dequant(x):
            m = self.mat()
            return _dequant_linear(x, self.out_features, self.in_features,
                                   lambda a, b: self._qkern.dequant(m, expert, a, b))
        return self._qkern.linear(self.mat(), x, expert)
