"""The kernels behind QuantLinear / QuantExperts: one `WeightOp` per backend and weight format, a file per backend.

A WeightOp holds one weight [N, K] or a stack of routed experts [E, N, K], repacked once (at construction) into the
layout its kernel reads; `edge_vl2.quant.linear.make_op` picks the op for a backend and format. Repacked tensors are
non-persistent buffers: the disk format is the canonical one (edge_vl2.quant.formats), never a module's state_dict.
"""

from .base import FloatOp, WeightOp, format_name
from .bnb import BnbOp
from .cpu import (PREFILL_DEQUANT_MIN_ROWS, QKERN_DEQUANT_MIN_ROWS, CpuInt4Op, CpuInt8GroupOp, CpuInt8Op,
                  QkernOp)
from .cuda import CudaInt4Op, TritonOp
from .reference import ReferenceOp

__all__ = ["WeightOp", "FloatOp", "ReferenceOp", "CpuInt4Op", "CpuInt8Op", "CpuInt8GroupOp", "QkernOp", "CudaInt4Op",
           "TritonOp", "BnbOp", "format_name", "PREFILL_DEQUANT_MIN_ROWS",
           "QKERN_DEQUANT_MIN_ROWS"]
