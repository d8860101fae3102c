"""Swap a loaded model's decoder layers for quantized ones, in place, from weights the toolchain already quantized.

Names are module paths in `DeepseekVL2`, as the toolchain writes them:
    language.model.layers.3.self_attn.q_proj        an nn.Linear             -> QuantLinear
    language.lm_head, ...mlp.down_proj, ...mlp.shared_experts.up_proj          -> QuantLinear
    language.model.layers.1.mlp.experts.gate_proj   routed experts           -> part of a QuantExperts
    language.model.layers.1.mlp.experts.5.gate_proj (stacked or per expert: edge_vl2.quant.naming)
    language.model.embed_tokens                     the token embedding table      -> QuantEmbedding
The router (`mlp.gate`), norms, MLA's w_uk / w_uv, the vision tower and the projector always stay in high
precision: a name outside the decoder's linear layers, expert stacks and embedding table is an error, not a silent
skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..model.moe import StackedExperts
from .embedding import QuantEmbedding
from .experts import ExpertWeight, QuantExperts
from .formats import Int4Weight, Int8Weight, QuantizedWeight
from .linear import QuantLinear
from .naming import EXPERT_PROJS, parse_expert_name

if TYPE_CHECKING:
    from ..model.vl2 import DeepseekVL2

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


def swap_in_quantized_(model: "DeepseekVL2", quantized: dict[str, QuantizedWeight], backend: str,
                    **options) -> "DeepseekVL2":
    """Replace, in place, every decoder layer named in `quantized` by its quantized form on `backend`.

    Linear layers are named by their module path; routed experts by `{experts}.{proj}` (the whole stack) or
    `{experts}.{e}.{proj}` (one expert), never both for one projection. Each weight is moved to the replaced
    module's device and repacked once. `options` go to QuantLinear / QuantExperts (`cache`, `kernel`,
    `prefill_dequant`; `fuse_gate_up` for experts). Unknown names, a projection named both ways, and shape
    mismatches raise ValueError naming them, before anything is swapped. Returns the model.
    """
    linears, experts = quantizable_modules(model)
    embeddings = {n: m for n, m in model.named_modules()
                  if n.startswith(DECODER_PREFIX) and isinstance(m, nn.Embedding)}
    linear_opts = {k: v for k, v in options.items() if k != "fuse_gate_up"}
    tables = _checked_tables(quantized, linears, experts, embeddings)
    for name, w in quantized.items():
        if name in embeddings:
            old = embeddings[name].weight
            _set_module(model, name, QuantEmbedding(_to(w, old.device), old.dtype))
        elif name in linears:
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


def _checked_tables(quantized: dict[str, QuantizedWeight], linears: dict, experts: dict,
                    embeddings: dict) -> dict[str, dict[str, QuantizedWeight | dict[int, QuantizedWeight]]]:
    """Every name and shape checked (ValueError naming all problems); returns the routed-expert weights as
    stack name -> proj -> the whole stack's weight, or {expert index: weight}."""
    sizes = {name: m.gate_proj.shape[0] for name, m in experts.items()}
    tables: dict[str, dict[str, QuantizedWeight | dict[int, QuantizedWeight]]] = {}
    unknown, errors = [], []
    for name, w in quantized.items():
        if name in embeddings:
            if tuple(w.shape) != tuple(embeddings[name].weight.shape):
                errors.append(f"{name}: quantized table {list(w.shape)} != {list(embeddings[name].weight.shape)}")
            continue
        if name in linears:
            old = linears[name]
            if old.bias is not None:
                errors.append(f"{name}: QuantLinear has no bias; the decoder's linear layers have none")
            elif tuple(w.shape) != tuple(old.weight.shape):
                errors.append(f"{name}: quantized weight {list(w.shape)} != layer weight {list(old.weight.shape)}")
            continue
        key = parse_expert_name(name, sizes)
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
        raise ValueError(f"not a quantizable decoder layer (routers, norms, w_uk/w_uv, vision and projector stay in "
                         f"high precision): {', '.join(sorted(unknown))}")
    if errors:
        raise ValueError("; ".join(errors))
    return tables


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
        if isinstance(module, (QuantLinear, QuantExperts, QuantEmbedding)):
            line = module.describe()
            counts[line] = counts.get(line, 0) + 1
    return counts
