"""The dtype names users choose, the safetensors dtype codes, the `auto` rule, and the checks a loaded weight passes."""

from __future__ import annotations

import torch

from . import checks
from .errors import UserError

# What `--dtype` and `dtype=` accept.
TORCH_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}
# safetensors header codes of the tensors checkpoints and bundles hold.
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8,
                      "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Every checkpoint weight and every high-precision bundle tensor is a float: a bool embedding or an int32 expert would
# otherwise be cast to bf16 and run.
FLOAT_CODES = ("BF16", "F16", "F32", "F64")
# NaN / infinity checks: every value of a tensor up to FULL_CHECK values (norms, biases, layout tokens), else RUNS
# runs of RUN consecutive values evenly spaced from its first to its last value (a NaN-filled or overflowed
# embedding, expert, router or scale tensor, or a damaged region, is caught; one stray NaN among millions is not; at
# most ~2 pages of a memory-mapped file are touched per run). Checking every value is not affordable at load: on the
# 2-core build machine any torch reduction over more than ~32K values wakes the thread pool and costs 10-90 ms
# whatever its size (isfinite over 131K bf16 values 84 ms, over 2K 0.01 ms), and single-threaded all of full-size
# Tiny would take ~17 s.
FULL_CHECK, RUNS, RUN = 1 << 15, 64, 64


def resolve_dtypes(dtype: str, device: str) -> tuple[torch.dtype, torch.dtype]:
    """(decoder dtype, vision dtype). `auto`: bf16 everywhere on CUDA; on CPU a bf16 decoder (memory-bound matmuls
    gain from half the bytes) and an fp32 vision tower (CPU bf16 convolutions and 729-token attention are ~5x slower)."""
    checks.choice(dtype, "dtype", ("auto", *TORCH_DTYPES))
    if dtype == "auto":
        return (torch.bfloat16, torch.bfloat16) if str(device).startswith("cuda") else (torch.bfloat16, torch.float32)
    return TORCH_DTYPES[dtype], TORCH_DTYPES[dtype]


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """`t` unchanged, or a UserError when the values checked (see FULL_CHECK) hold NaN or infinity."""
    if t.is_floating_point() and t.numel():
        flat = t.reshape(-1)
        if flat.numel() > FULL_CHECK:
            step = (flat.numel() - RUN) // (RUNS - 1)
            flat = flat.as_strided((RUNS, RUN), (step, 1), flat.storage_offset())  # a view: nothing is copied
        if not bool(torch.isfinite(flat).all()):
            raise UserError(f"{name}: holds NaN or infinite values")
    return t
