"""Quantized linear layers: one module over the canonical INT4/INT8 formats, with its kernel chosen once.

`QuantLinear(weight, backend)` takes an Int4Weight / Int8Weight (the on-disk MatMulNBits layout, edge_vl2.qformat)
and repacks it once, at construction, into what the backend's kernel wants (the ops live in edge_vl2.qops);
forward(x [..., in]) -> [..., out] in x's dtype.

Backends (one per process, picked by the caller; `available_backends()` says what this machine can run):
- reference  dequantize and matmul in fp32: the correctness oracle. By default it caches the fp32 weight (4 bytes
             per weight, 8x an INT4 layer: an oracle, not a deployment format); `cache=False` keeps only the packed
             tensors and dequantizes per call (for experts: only the chosen ones, gathered by index).
- cpu        PyTorch's weight-only packed ops with bf16 activations (fp32 activations make them 10-15x slower):
             INT8 per channel  torch._weight_int8pack_mm(x_bf16, int8 [N, K], bf16 scales [N])
             INT8 per group    the same op once per group of columns, partial sums in fp32 (measured 7x faster
                               than dequantizing to bf16 per call at one row)
             INT4              torch._convert_weight_to_int4pack_for_cpu + torch._weight_int4pack_mm_for_cpu, whose
                               weight is (code - 8) * scale + zero; ours is (code - z) * s, so scale = s and
                               zero = (8 - z) * s (0 when symmetric), both rounded to bf16.
             Calls with >= PREFILL_DEQUANT_MIN_ROWS rows (prefill) dequantize to fp32 instead and run the fp32
             GEMM: ~2x faster at 1,024 rows on the AVX2 box, whose bf16 GEMM is slow (`prefill_dequant=False`
             turns it off; for INT4 it costs a second, canonical copy of the packed weight).
- cuda       INT4: PyTorch's tinygemm `torch._weight_int4pack_mm` (sm80+, N % 8 == 0); everything else, and every
             layer under TRITON_INTERPRET=1, through the Triton kernels in edge_vl2.kernels, which read the
             canonical layout directly (`kernel="triton"` forces them).
- bnb        bitsandbytes, for comparison: INT4 -> NF4 `Linear4bit`, INT8 -> LLM.int8 `Linear8bitLt` (threshold 0),
             both re-quantized from the dequantized weight (or from a float weight: `QuantLinear.bnb_from_float`).

The bf16 roundings (activations, scales, zero offsets, outputs: 8 significant bits each, relative error <= 2^-9)
make the packed ops differ from the fp32 reference by 3e-3 (symmetric) to 5e-3 (asymmetric INT4) relative
Frobenius error on random data; the tests bound it at 1e-2 (and elementwise, see tests/test_qlinear.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from .qformat import Int4Weight, Int8Weight, QuantizedWeight
from .qops import BnbOp, CpuInt4Op, CpuInt8GroupOp, CpuInt8Op, CudaInt4Op, ReferenceOp, TritonOp, WeightOp

BACKENDS = ("reference", "cpu", "cuda", "bnb")


@dataclass(frozen=True)
class BackendInfo:
    available: bool
    detail: str  # what it would run, or why it cannot run here


def available_backends() -> dict[str, BackendInfo]:
    """Every backend name -> whether it can run in this process and what it would use (or why not)."""
    from .kernels import triton_status

    out = {"reference": BackendInfo(True, "dequantize + fp32 matmul (correctness oracle)")}
    cpu_ops = all(hasattr(torch, op) for op in ("_weight_int8pack_mm", "_convert_weight_to_int4pack_for_cpu",
                                                 "_weight_int4pack_mm_for_cpu"))
    out["cpu"] = BackendInfo(cpu_ops, "torch._weight_int8pack_mm / _weight_int4pack_mm_for_cpu, bf16 activations"
                             if cpu_ops else f"torch {torch.__version__} lacks the packed CPU ops")
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


def _check_weight(w) -> None:
    if not isinstance(w, (Int4Weight, Int8Weight)):
        raise TypeError(f"expected an Int4Weight or Int8Weight, got {type(w).__name__}")


# the construction options each backend accepts (anything else is a TypeError naming it)
BACKEND_OPTIONS = {"reference": {"cache"}, "cpu": {"prefill_dequant"}, "cuda": {"kernel"}, "bnb": set()}


def make_op(w: QuantizedWeight, backend: str, **options) -> WeightOp:
    """The WeightOp for a backend and a weight's format (the one place the per-format kernel is chosen).

    options: reference `cache` (bool), cpu `prefill_dequant` (bool), cuda `kernel` ("auto" | "triton" | "torch").
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
        if kernel == "torch" or (kernel == "auto" and tiny):
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

    def describe(self) -> str:
        return f"{self.backend}: {self.op.describe()}"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.describe()}"
