"""Round-to-nearest quantization: the no-calibration baseline, and the only RTN in the project.

Dense weights are [out, in]; stacked routed experts [E, out, in] are quantized one expert at a time into a stack
filled in place (bounded fp32 working memory, no list of parts beside the stack). Nothing here writes a model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from edge_vl2.quant.naming import EXPERT_PROJS, expert_name, is_stacked, stacked_name
from edge_vl2.quant.swap import quantizable_modules

from .formats import QuantizedWeight, QuantSpec, quantize_rtn_int4, quantize_rtn_int8


def quantize_rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """w [out, in] or stacked experts [E, out, in] -> the spec's format (Int4Weight or Int8Weight)."""
    if w.dim() == 3:
        first = quantize_rtn(w[0], spec)
        stacked = {k: t.new_empty((w.shape[0], *t.shape)) for k, t in first.tensors().items()}
        for e in range(w.shape[0]):
            for k, t in (first if e == 0 else quantize_rtn(w[e], spec)).tensors().items():
                stacked[k][e] = t
        return type(first)(**stacked)
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


@torch.no_grad()
def rtn_decoder_weights(model: nn.Module, spec_for: Callable[[str], QuantSpec | None]) -> dict[str, QuantizedWeight]:
    """RTN weights for the decoder layers of a loaded model that `spec_for(name)` gives a spec for, named as
    `swap_in_quantized_` takes them (linear layers by module path; routed experts asked one by one by their
    per-expert name and stored stacked or per expert by the rule of edge_vl2.quant.naming). The model is only read."""
    linears, experts = quantizable_modules(model)
    out = {}
    for name, m in linears.items():
        spec = spec_for(name)
        if spec is not None:
            out[name] = quantize_rtn(m.weight.detach(), spec)
    for stack, m in experts.items():
        for proj in EXPERT_PROJS:
            w = getattr(m, proj).detach()
            specs = [spec_for(expert_name(stack, e, proj)) for e in range(w.shape[0])]
            if is_stacked(specs):
                out[stacked_name(stack, proj)] = quantize_rtn(w, specs[0])
            else:
                out.update({expert_name(stack, e, proj): quantize_rtn(w[e], spec)
                            for e, spec in enumerate(specs) if spec is not None})
    return out
