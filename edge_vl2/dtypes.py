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
# NaN / infinity checks: every value of a tensor up to FULL_CHECK values (norms, routers, biases, layout tokens,
# most quantization scales), else SAMPLE values evenly spaced (a NaN-filled or overflowed embedding or expert is
# caught, one stray NaN in 165M values is not). Checking every value is not affordable: torch's bf16 isfinite runs at
# ~0.1-0.3 GB/s on the 2-core build machine, a minute or more for the 6.7 GB of full-size Tiny.
FULL_CHECK, SAMPLE = 1 << 17, 1 << 12


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
            flat = flat[::flat.numel() // SAMPLE]
        if not bool(torch.isfinite(flat).all()):
            raise UserError(f"{name}: holds NaN or infinite values")
    return t
