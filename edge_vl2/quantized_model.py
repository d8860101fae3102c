"""Swap a loaded model's decoder layers for quantized ones, in place, and (for tests and benchmarks) make the
quantized weights with round-to-nearest.

Names are module paths in `DeepseekVL2`, as the toolchain writes them:
    language.model.layers.3.self_attn.q_proj        an nn.Linear             -> QuantLinear
    language.lm_head, ...mlp.down_proj, ...mlp.shared_experts.up_proj          -> QuantLinear
    language.model.layers.1.mlp.experts.gate_proj   a whole expert stack      -> part of a QuantExperts
    language.model.layers.1.mlp.experts.5.gate_proj one expert (the checkpoint's per-expert name), when the experts
                                                    of a layer do not share one format
An expert projection named neither way keeps its float weight (a recipe may leave experts in high precision). The
router (`mlp.gate`), norms, embeddings, MLA's w_uk / w_uv, the vision tower and the projector always stay in high
precision: a name outside the decoder's linear layers and expert stacks is an error, not a silent skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .moe import StackedExperts
from .qexperts import ExpertWeight, QuantExperts
from .qformat import Int4Weight, Int8Weight, QuantizedWeight
from .qlinear import QuantLinear

if TYPE_CHECKING:
    from .model import DeepseekVL2
    from .quantize.formats import QuantSpec

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
DECODER_PREFIX = "language."


def _to(w: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    """The same weight with its tensors on `device` (a no-op when already there)."""
    return type(w)(**{k: v.to(device) for k, v in w.tensors().items()})


def quantizable_modules(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, StackedExperts]]:
    """The decoder's nn.Linear layers and StackedExperts modules, by full module name (the router is neither)."""
    linears, experts = {}, {}
    for name, module in model.named_modules():
        if not name.startswith(DECODER_PREFIX):
            continue
        if isinstance(module, nn.Linear):
            linears[name] = module
        elif isinstance(module, StackedExperts):
            experts[name] = module
    return linears, experts


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _expert_key(name: str, experts: dict[str, StackedExperts]) -> tuple[str, int | None, str] | None:
    """`{stack}.{proj}` -> (stack, None, proj); `{stack}.{e}.{proj}` -> (stack, e, proj); anything else None."""
    head, _, proj = name.rpartition(".")
    if proj not in EXPERT_PROJS:
        return None
    if head in experts:
        return head, None, proj
    stack, _, index = head.rpartition(".")
    if stack in experts and index.isdigit() and int(index) < experts[stack].gate_proj.shape[0]:
        return stack, int(index), proj
    return None


def quantize_model_(model: "DeepseekVL2", quantized: dict[str, QuantizedWeight], backend: str,
                    **options) -> "DeepseekVL2":
    """Replace, in place, every decoder layer named in `quantized` by its quantized form on `backend`.

    Linear layers are named by their module path; routed experts by `{experts}.{proj}` (the whole stack) or
    `{experts}.{e}.{proj}` (one expert), never both for one projection. Each weight is moved to the replaced
    module's device and repacked once. `options` go to QuantLinear / QuantExperts (`cache`, `kernel`,
    `prefill_dequant`; `fuse_gate_up` for experts). Unknown names, a projection named both ways, and shape
    mismatches raise ValueError naming them, before anything is swapped. Returns the model.
    """
    linears, experts = quantizable_modules(model)
    linear_opts = {k: v for k, v in options.items() if k != "fuse_gate_up"}
    # stack name -> proj -> the whole stack's weight, or {expert index: weight}
    tables: dict[str, dict[str, QuantizedWeight | dict[int, QuantizedWeight]]] = {}
    unknown, errors = [], []
    for name, w in quantized.items():
        if name in linears:
            old = linears[name]
            if old.bias is not None:
                errors.append(f"{name}: QuantLinear has no bias; the decoder's linear layers have none")
            elif tuple(w.shape) != tuple(old.weight.shape):
                errors.append(f"{name}: quantized weight {list(w.shape)} != layer weight {list(old.weight.shape)}")
            continue
        key = _expert_key(name, experts)
        if key is None:
            unknown.append(name)
            continue
        stack, e, proj = key
        want = tuple(getattr(experts[stack], proj).shape)[(0 if e is None else 1):]
        if tuple(w.shape) != want:
            errors.append(f"{name}: quantized weight {list(w.shape)} != {list(want)}")
        entry = tables.setdefault(stack, {}).get(proj)
        if entry is not None and (e is None or not isinstance(entry, dict)):
            errors.append(f"{stack}.{proj}: given both as a whole stack and per expert")
        elif e is None:
            tables[stack][proj] = w
        else:
            tables[stack].setdefault(proj, {})[e] = w
    if unknown:
        raise ValueError(f"not a quantizable decoder layer (routers, norms, embeddings, w_uk/w_uv, vision and "
                         f"projector stay in high precision): {', '.join(sorted(unknown))}")
    if errors:
        raise ValueError("; ".join(errors))

    for name, w in quantized.items():
        if name in linears:
            old = linears[name]
            _set_module(model, name, QuantLinear(_to(w, old.weight.device), backend, old.weight.dtype, **linear_opts))
    for stack, table in tables.items():
        old = experts[stack]
        device = old.gate_proj.device
        if all(isinstance(table.get(p), (Int4Weight, Int8Weight)) for p in EXPERT_PROJS):
            new = QuantExperts.stacked(*(_to(table[p], device) for p in EXPERT_PROJS), backend, **options)
        else:
            new = QuantExperts.per_expert([tuple(_expert_weight(old, table, p, e, device) for p in EXPERT_PROJS)
                                           for e in range(old.gate_proj.shape[0])], backend, **options)
        _set_module(model, stack, new)
    return model


def _expert_weight(old: StackedExperts, table: dict, proj: str, e: int, device: torch.device) -> ExpertWeight:
    """Expert e's `proj`: from the quantized stack, its own quantized tensor, or (neither) the float weight."""
    entry = table.get(proj)
    if isinstance(entry, (Int4Weight, Int8Weight)):
        return _to(entry.expert(e), device)
    if entry is not None and e in entry:
        return _to(entry[e], device)
    return getattr(old, proj)[e].detach()


def describe_quantized(model: nn.Module) -> dict[str, int]:
    """How many layers run each `describe()` line (for the one-time backend report the caller prints)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            line = module.describe()
            counts[line] = counts.get(line, 0) + 1
    return counts


def rtn_quantize(weight: torch.Tensor, spec: "QuantSpec") -> QuantizedWeight:
    """Round-to-nearest: a float weight [out, in] or expert stack [E, out, in] (one expert at a time: bounded fp32
    working memory) -> the spec's format. Toolchain work (see rtn_quantize_decoder): imports it when called."""
    from .quantize.formats import quantize_rtn_int4, quantize_rtn_int8

    if weight.dim() == 3:  # filled in place, expert by expert: a list of parts plus their stack would be twice
        first = rtn_quantize(weight[0], spec)
        stacked = {k: t.new_empty((weight.shape[0], *t.shape)) for k, t in first.tensors().items()}
        for e in range(weight.shape[0]):
            for k, t in (first if e == 0 else rtn_quantize(weight[e], spec)).tensors().items():
                stacked[k][e] = t
        return type(first)(**stacked)
    if spec.bits == 4:
        return quantize_rtn_int4(weight, spec.group_size, spec.symmetric)
    return quantize_rtn_int8(weight, spec.group_size)


def rtn_quantize_decoder(model: nn.Module, spec_for: Callable[[str], "QuantSpec | None"]) -> dict[str, QuantizedWeight]:
    """Round-to-nearest quantized weights for the decoder layers that `spec_for(name)` gives a spec for.

    Linear layers are asked by module path; routed experts one by one, by the checkpoint's per-expert name
    `{experts}.{e}.{proj}`. Names in the result as `quantize_model_` takes them: an expert projection whose experts
    all got one spec is stacked under `{experts}.{proj}`, otherwise each quantized expert is returned under its own
    name (the toolchain's layout). The model is only read.

    This is toolchain work kept here so tests and benchmarks can build quantized models without GPTQ; it imports
    the quantization library when called, never when this module is imported.
    """
    linears, experts = quantizable_modules(model)
    out = {}
    with torch.no_grad():
        for name, m in linears.items():
            spec = spec_for(name)
            if spec is not None:
                out[name] = rtn_quantize(m.weight.detach(), spec)
        for stack, m in experts.items():
            for proj in EXPERT_PROJS:
                w = getattr(m, proj).detach()
                specs = [spec_for(f"{stack}.{e}.{proj}") for e in range(w.shape[0])]
                if None not in specs and len(set(specs)) == 1:
                    out[f"{stack}.{proj}"] = rtn_quantize(w, specs[0])
                else:
                    out.update({f"{stack}.{e}.{proj}": rtn_quantize(w[e], spec)
                                for e, spec in enumerate(specs) if spec is not None})
    return out
