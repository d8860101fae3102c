"""A memory cap on the CUDA device, to prove that a model fits a smaller card, and what was used under it.

    cap_cuda_memory(16)      # PyTorch may allocate at most 16 GB on this device (an out-of-memory error past it)
    cuda_memory_figures()    # {"torch_peak_gb", "torch_reserved_peak_gb", "device_used_gb", "device_total_gb"}

GB are 10^9 bytes, as in the device profiles (a "16 GB" card holds 16 GiB = 17.2 GB: the cap is the stricter
reading). The cap bounds PyTorch's caching allocator (weights, cache, activations, CUDA-graph pools); the CUDA context
and ONNX Runtime's own arena are outside it, which is why `device_used_gb` (everything on the device, from the
driver) is reported beside PyTorch's peak.
"""

from __future__ import annotations

import torch

from .errors import UserError

GB = 1e9


def cap_cuda_memory(cap_gb: float, device: int | str | torch.device | None = None) -> float:
    """Limit this process's PyTorch allocations on `device` to `cap_gb`; returns the fraction set."""
    if not torch.cuda.is_available():
        raise UserError("--memory-cap-gb needs a CUDA device; none is visible")
    index = torch.device(device if device is not None else "cuda").index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    if not 0 < cap_gb * GB <= total:
        raise UserError(f"--memory-cap-gb {cap_gb:g}: the device has {total / GB:.1f} GB; give 0 < cap <= that")
    fraction = cap_gb * GB / total
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def cuda_memory_figures(device: int | None = None) -> dict:
    """PyTorch's peak allocated and reserved bytes since start (or the last reset) and the device's use now."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
            "torch_reserved_peak_gb": round(torch.cuda.max_memory_reserved(device) / GB, 3),
            "device_used_gb": round((total - free) / GB, 3), "device_total_gb": round(total / GB, 3)}
