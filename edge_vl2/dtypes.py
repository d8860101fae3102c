"""The dtype names users choose, the safetensors dtype codes, and the `auto` rule: one table for each."""

from __future__ import annotations

import torch

# What `--dtype` and `dtype=` accept.
TORCH_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}
# safetensors header codes of the tensors checkpoints and bundles hold.
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8,
                      "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def resolve_dtypes(dtype: str, device: str) -> tuple[torch.dtype, torch.dtype]:
    """(decoder dtype, vision dtype). `auto`: bf16 everywhere on CUDA; on CPU a bf16 decoder (memory-bound matmuls
    gain from half the bytes) and an fp32 vision tower (CPU bf16 convolutions and 729-token attention are ~5x slower)."""
    if dtype == "auto":
        return (torch.bfloat16, torch.bfloat16) if str(device).startswith("cuda") else (torch.bfloat16, torch.float32)
    return TORCH_DTYPES[dtype], TORCH_DTYPES[dtype]
