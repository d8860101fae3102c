"""Round-to-nearest quantization: the no-calibration baseline, one call per tensor.

Dense weights are [out, in]; stacked routed experts [E, out, in] are quantized one expert at a time (bounded fp32
working memory) and stacked again. The module walk only reads parameters: it never replaces layers or writes weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .formats import Int4Weight, Int8Weight, QuantizedWeight, QuantSpec, quantize_rtn_int4, quantize_rtn_int8


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """w [out, in] or stacked experts [E, out, in] -> the spec's format (Int4Weight or Int8Weight)."""
    if w.dim() == 3:
        parts = [quantize_rtn(w[e], spec) for e in range(w.shape[0])]
        return (Int4Weight if spec.bits == 4 else Int8Weight).stack(parts)
    if w.dim() != 2:
        raise ValueError(f"expected a weight [out, in] or stacked experts [E, out, in], got {list(w.shape)}")
    if spec.bits == 4:
        return quantize_rtn_int4(w, spec.group_size, spec.symmetric)
    return quantize_rtn_int8(w, spec.group_size)


def quantizable_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Tensor prefix -> weight for every nn.Linear ({path}) and stacked expert parameter ({path}, 3-D) in a module.

    The prefix is the name the quantized tensors get: `{prefix}.qweight`, `{prefix}.scales`, ...
    """
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            out[name] = sub.weight
    for name, p in module.named_parameters():
        if p.dim() == 3:
            out[name] = p
    return out


def quantize_module_rtn(module: nn.Module, plan: Callable[[str], QuantSpec | None]) -> dict[str, QuantizedWeight]:
    """RTN-quantize every weight that `plan(prefix)` gives a spec for (None keeps it in full precision).

    Returns {prefix: quantized weight}; the module is left untouched. The plan decides what stays bf16 (router,
    norms, embeddings per the recipe): norms and embeddings are never offered, they are not Linear or 3-D.
    """
    out = {}
    for prefix, w in quantizable_weights(module).items():
        spec = plan(prefix)
        if spec is not None:
            out[prefix] = quantize_rtn(w.detach(), spec)
    return out
