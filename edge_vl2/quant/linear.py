"""Quantized linear layers: one module over the canonical INT4/INT8 formats, with its kernel chosen once.

`QuantLinear(weight, backend)` takes an Int4Weight / Int8Weight (edge_vl2.quant.formats) and repacks it once, at
construction, into what the backend's kernel wants (edge_vl2.quant.ops, one file per backend); forward(x [..., in])
-> [..., out] in x's dtype. One backend per process, picked by the caller; `available_backends()` says what this
machine can run and why not:
- reference  fp32 dequantize + matmul: the correctness oracle, never a deployment format.
- cpu        our qkern kernels (edge_vl2.quant.kernels.qkern: int8 activations, the canonical tensors read in place)
             for few rows, or PyTorch's packed weight-only ops with bf16 activations where qkern cannot run (not
             built, or EDGE_VL2_CPU_KERNEL=torch); many rows (prefill) dequantize to fp32 a block at a time and run
             the fp32 GEMM, because CPUs without bf16 units run bf16 GEMMs slowly.
- cuda       tinygemm INT4 (sm80+) or the Triton kernels reading the canonical layout directly.
- bnb        bitsandbytes NF4 / LLM.int8, re-quantized from our weights: the baseline we compare against.
Backends other than reference round activations, scales and outputs to bf16 (8 significant bits): tests bound their
difference from the reference (tests/test_qlinear.py says by how much and why). Measured speeds: README.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import nn

from .formats import Int4Weight, Int8Weight, QuantizedWeight
from .ops import BnbOp, CpuInt4Op, CpuInt8GroupOp, CpuInt8Op, CudaInt4Op, QkernOp, ReferenceOp, TritonOp, WeightOp

BACKENDS = ("reference", "cpu", "cuda", "bnb")
CPU_KERNELS = ("auto", "qkern", "torch")  # auto: qkern where it loads and takes the weight, else torch
CPU_KERNEL_ENV = "EDGE_VL2_CPU_KERNEL"


@dataclass(frozen=True)
class BackendInfo:
    available: bool
    detail: str  # what it would run, or why it cannot run here


def available_backends() -> dict[str, BackendInfo]:
    """Every backend name -> whether it can run in this process and what it would use (or why not)."""
    from .kernels import triton_status

    out = {"reference": BackendInfo(True, "dequantize + fp32 matmul (correctness oracle)")}
    out["cpu"] = _cpu_backend_info()
    triton_ok, triton_why = triton_status()
    if torch.cuda.is_available():
        tiny = torch.cuda.get_device_capability() >= (8, 0) and hasattr(torch, "_weight_int4pack_mm")
        detail = ("INT4 via torch._weight_int4pack_mm" if tiny else "no tinygemm (needs sm80+)") + \
                 f"; others via {triton_why if triton_ok else 'nothing: ' + triton_why}"
        out["cuda"] = BackendInfo(tiny or triton_ok, detail)
    else:
        out["cuda"] = BackendInfo(triton_ok, triton_why)
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    out["bnb"] = BackendInfo(bnb, "bitsandbytes NF4 / LLM.int8" if bnb else "bitsandbytes is not installed")
    return out


def _cpu_backend_info() -> BackendInfo:
    from .kernels import qkern

    torch_ops = all(hasattr(torch, op) for op in ("_weight_int8pack_mm", "_convert_weight_to_int4pack_for_cpu",
                                                   "_weight_int4pack_mm_for_cpu"))
    packed = "torch._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, bf16 activations" if torch_ops else \
        f"torch {torch.__version__} lacks the packed CPU ops"
    ok, what = qkern.status()
    if _cpu_kernel(None) == "torch" or not ok:
        why = f"{CPU_KERNEL_ENV}=torch" if ok else f"qkern unavailable: {what}"
        return BackendInfo(torch_ops, f"{packed} ({why})")
    return BackendInfo(True, f"{what}; {packed} for shapes qkern does not take")


def cpu_kernel_line() -> str:
    """What the cpu backend multiplies with in this process, for the one-time load line."""
    from .kernels import qkern

    ok, what = qkern.status()
    if ok and _cpu_kernel(None) != "torch":
        return what
    return "PyTorch packed ops (" + (f"{CPU_KERNEL_ENV}=torch" if ok else f"qkern unavailable: {what}") + ")"


def _cpu_kernel(requested: str | None) -> str:
    kernel = requested or os.environ.get(CPU_KERNEL_ENV, "auto")
    if kernel not in CPU_KERNELS:
        raise ValueError(f"cpu kernel ({CPU_KERNEL_ENV} or kernel=) must be one of {', '.join(CPU_KERNELS)}, got "
                         f"{kernel!r}")
    return kernel


def uses_qkern(w: QuantizedWeight, backend: str, kernel: str | None = None) -> bool:
    """Whether make_op gives this weight a qkern op (which reads the canonical tensors in place: fusing gate and up
    into one tensor would only copy them). kernel "qkern" (or EDGE_VL2_CPU_KERNEL=qkern) makes it an error when
    qkern cannot run the weight; "auto" falls back to PyTorch's ops."""
    if backend != "cpu":
        return False
    kernel = _cpu_kernel(kernel)
    if kernel == "torch":
        return False
    from .kernels import qkern

    ok, why = qkern.status()
    if kernel == "qkern" and not ok:
        raise ValueError(f"cpu kernel qkern: {why}")
    if kernel == "qkern" and not qkern.supported(w):
        raise ValueError(f"cpu kernel qkern does not take {list(w.shape)} in {w.bits} bits, group {w.group_size} "
                         "(needs in_features and groups multiples of 32)")
    return ok and qkern.supported(w)


def _check_weight(w) -> None:
    if not isinstance(w, (Int4Weight, Int8Weight)):
        raise TypeError(f"expected an Int4Weight or Int8Weight, got {type(w).__name__}")


# the construction options each backend accepts (anything else is a TypeError naming it)
BACKEND_OPTIONS = {"reference": {"cache"}, "cpu": {"prefill_dequant", "kernel"}, "cuda": {"kernel"}, "bnb": set()}


def make_op(w: QuantizedWeight, backend: str, **options) -> WeightOp:
    """The WeightOp for a backend and a weight's format (the one place the per-format kernel is chosen).

    options: reference `cache` (bool), cpu `prefill_dequant` (bool) and `kernel` ("auto" | "qkern" | "torch"; default
    EDGE_VL2_CPU_KERNEL, else auto), cuda `kernel` ("auto" | "triton" | "torch"; auto: tinygemm for INT4 weights on
    sm80+, Triton for everything else and for routed-expert stacks, whose decode rows pick their expert inside one
    kernel instead of one tinygemm call per chosen expert from the host).
    """
    _check_weight(w)
    if backend not in BACKEND_OPTIONS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    extra = set(options) - BACKEND_OPTIONS[backend]
    if extra:
        raise TypeError(f"backend {backend!r} takes no option {', '.join(sorted(extra))}")
    if backend == "reference":
        return ReferenceOp(w, **options)
    if backend == "cpu":
        kernel = options.pop("kernel", None)
        if uses_qkern(w, backend, kernel):
            return QkernOp(w, **options)
        if w.bits == 4:
            return CpuInt4Op(w, **options)
        return CpuInt8Op(w, **options) if w.group_size is None else CpuInt8GroupOp(w, **options)
    if backend == "cuda":
        from .kernels import triton_interpreting

        kernel = options.get("kernel", "auto")
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"cuda kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")
        on_cuda = w.qweight.is_cuda
        if not on_cuda and not triton_interpreting():
            raise ValueError("the cuda backend needs the weight on a CUDA device (or TRITON_INTERPRET=1 for tests)")
        tiny = on_cuda and w.bits == 4 and hasattr(torch, "_weight_int4pack_mm") \
            and torch.cuda.get_device_capability(w.qweight.device) >= (8, 0)
        stacked = len(w.shape) == 3  # routed experts: Triton picks each row's expert in-kernel (CUDA-graph safe)
        if kernel == "torch" or (kernel == "auto" and tiny and not stacked):
            if not tiny:
                raise ValueError("kernel='torch' needs an INT4 weight on an sm80+ CUDA device")
            return CudaInt4Op(w)
        return TritonOp(w)
    return BnbOp.from_quantized(w, "nf4" if w.bits == 4 else "int8")


# --- the layer ---------------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A bias-free linear layer over a quantized weight: forward(x [..., in]) -> [..., out] in x's dtype.

    `dtype` is the activation dtype of the model the layer sits in; `weight` is a zero-element placeholder with that
    dtype and the layer's device, for callers that read `lm_head.weight.dtype` / `.device` (it holds no values).
    """

    def __init__(self, weight: QuantizedWeight | None, backend: str = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                 op: WeightOp | None = None, **options):
        """options: see `make_op` (reference `cache`, cpu `prefill_dequant`, cuda `kernel`)."""
        super().__init__()
        self.op = op if op is not None else make_op(weight, backend, **options)
        if self.op.n_experts is not None:
            raise ValueError("QuantLinear takes one weight [out, in]; stacked experts go to QuantExperts")
        self.backend = backend
        self.in_features, self.out_features = self.op.in_features, self.op.out_features
        held = [*self.op.buffers(), *self.op.parameters()]  # bitsandbytes keeps its weights as parameters
        device = held[0].device if held else torch.device("cpu")
        self.register_buffer("_placeholder", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def bnb_from_float(cls, weight: torch.Tensor, kind: str = "nf4", blocksize: int = 64) -> "QuantLinear":
        """A bitsandbytes layer quantized straight from a float weight [out, in] (the benchmark's baseline)."""
        return cls(None, "bnb", weight.dtype, op=BnbOp.from_float(weight, kind, blocksize))

    @property
    def weight(self) -> torch.Tensor:
        return self._placeholder

    @property
    def nbytes(self) -> int:
        """Bytes of the repacked weight this layer holds."""
        return self.op.nbytes

    @property
    def decode_nbytes(self) -> int:
        """Bytes a few-row call reads (nbytes less copies only the prefill path uses)."""
        return self.op.decode_nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x.reshape(-1, self.in_features))  # [M, out]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_many(self, x: torch.Tensor, others) -> tuple[torch.Tensor, ...] | None:
        """This layer and `others` (QuantLinear layers of the same input x) in one kernel call, when the op can
        (qkern, few rows: `edge_vl2.model.layers.project`); None when it cannot."""
        many = getattr(self.op, "forward_many", None)
        if many is None or not all(isinstance(o, QuantLinear) for o in others):
            return None
        ys = many(x.reshape(-1, self.in_features), [o.op for o in others])
        if ys is None:
            return None
        return tuple(y.to(x.dtype).contiguous().reshape(*x.shape[:-1], y.shape[-1]) for y in ys)

    def describe(self) -> str:
        return f"{self.backend}: {self.op.describe()}"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.describe()}"
