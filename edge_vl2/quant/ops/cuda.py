"""The cuda backend: tinygemm INT4 (sm80+) and the Triton kernels reading the canonical layout."""

from __future__ import annotations

import torch

from ..formats import Int4Weight, QuantizedWeight
from .base import WeightOp, _flat_qweight, format_name
from .cpu import int4_scales_and_zeros


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
    """The Triton kernels of edge_vl2.quant.kernels on the canonical tensors as stored (no repacking)."""

    sync_free_rows = True  # qmm_rows reads each row's expert id inside the kernel

    def __init__(self, w: QuantizedWeight):
        super().__init__(w.shape, format_name(w))
        from ..kernels import triton_status

        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"the cuda backend's Triton kernels cannot run here: {why}")
        from ..kernels import triton_qmm

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
