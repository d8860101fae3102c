"""Putting quantized weights back into a model as their dequantized values: the runtime's reference math, used for
every fidelity figure, and the decoder's byte count as a bundle stores it.

Quantized tensors are keyed by checkpoint prefix (`language.model.layers.{i}.self_attn.q_proj`, stacked experts
`...mlp.experts.{proj}`, or one expert of a mixed recipe `...mlp.experts.{e}.{proj}`); `parameter_name` maps a key to
the model parameter it replaces.

Memory: `swapped` replaces one parameter at a time (peak: one extra tensor, not a second model) and, for full-size
models, restores the originals by re-reading them from the checkpoint instead of keeping copies.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .formats import QuantizedWeight


def parameter_name(key: str, params) -> tuple[str, int | None]:
    """A quantized tensor key -> (model parameter name, expert index or None when it covers the whole parameter)."""
    if f"{key}.weight" in params:
        return f"{key}.weight", None
    if key in params:
        return key, None
    head, e, proj = key.rsplit(".", 2) if key.count(".") >= 2 else (key, "", "")
    if e.isdigit() and f"{head}.{proj}" in params:
        return f"{head}.{proj}", int(e)
    raise ValueError(f"quantized tensor {key!r} matches no model parameter")


def _dequantized(model: nn.Module, weights: dict[str, QuantizedWeight]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, dequantized tensor in the parameter's dtype and device), one parameter at a time."""
    params = dict(model.named_parameters())
    per_param: dict[str, list[tuple[int | None, QuantizedWeight]]] = {}
    for key, qw in weights.items():
        name, e = parameter_name(key, params)
        per_param.setdefault(name, []).append((e, qw))
    for name, parts in per_param.items():
        p = params[name]
        if len(parts) == 1 and parts[0][0] is None:
            t = parts[0][1].dequantize(p.dtype).to(p.device)
        else:  # per-expert tensors of a mixed recipe; experts without one keep their values
            t = p.detach().clone()
            for e, qw in parts:
                t[e] = qw.dequantize(p.dtype).to(p.device)
        if t.shape != p.shape:
            raise ValueError(f"{name}: quantized shape {list(t.shape)} != parameter {list(p.shape)}")
        yield name, t


def covered_parameters(model: nn.Module, weights: dict[str, QuantizedWeight]) -> set[str]:
    """The parameter names the quantized weights replace (wholly or, for per-expert keys, in part)."""
    params = dict(model.named_parameters())
    return {parameter_name(key, params)[0] for key in weights}


def fake_quantize(model: nn.Module, weights: dict[str, QuantizedWeight]) -> nn.Module:
    """A copy of `model` whose quantized weights hold their dequantized values; every parameter the quantization
    did not touch (embeddings, norms, routers, vision) is shared with `model`, which is left untouched."""
    new = dict(_dequantized(model, weights))
    memo = {id(p): nn.Parameter(new[n], requires_grad=False) if n in new else p for n, p in model.named_parameters()}
    return copy.deepcopy(model, memo)


@contextmanager
def swapped(model: nn.Module, weights: dict[str, QuantizedWeight],
            restore: Callable[[str], torch.Tensor] | None = None) -> Iterator[nn.Module]:
    """Within the block `model` computes with the dequantized weights; on exit its original values come back.

    `restore(name)` re-reads an original parameter (from the checkpoint, see `checkpoint_restorer`), so no copy is
    held meanwhile; without it the originals are kept in memory (fine for small models).
    """
    params = dict(model.named_parameters())
    kept: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, t in _dequantized(model, weights):
                if restore is None:
                    kept[name] = params[name].data
                params[name].data = t
        yield model
    finally:
        with torch.no_grad():
            for name in covered_parameters(model, weights):
                p = params[name]
                p.data = kept[name] if restore is None else restore(name).to(dtype=p.dtype, device=p.device)


def checkpoint_restorer(model, model_dir) -> Callable[[str], torch.Tensor]:
    """restore(parameter name) -> the parameter's value read again from the checkpoint folder (memory-mapped)."""
    from edge_vl2.model.checkpoint import CheckpointReader
    from edge_vl2.model.vl2 import source_tensor

    reader = CheckpointReader(model_dir)
    return lambda name: source_tensor(reader, name, model.cfg)


def decoder_bytes(model: nn.Module, weights: dict[str, QuantizedWeight] | None = None) -> dict:
    """Bytes of the decoder as a bundle stores it: quantized tensors + every other `language.*` parameter in bf16.

    A parameter only partly covered by per-expert tensors (experts left unquantized) counts those experts in bf16.
    """
    weights = weights or {}
    params = dict(model.named_parameters())
    quant = sum(w.nbytes for w in weights.values())
    covered_rows: dict[str, int] = {}
    for key in weights:
        name, e = parameter_name(key, params)
        covered_rows[name] = params[name].shape[0] if e is None else covered_rows.get(name, 0) + 1
    high = 0
    for name, p in params.items():
        if name.startswith("language."):
            high += 2 * p.numel() * (p.shape[0] - covered_rows.get(name, 0)) // p.shape[0]
    total_bf16 = sum(2 * p.numel() for n, p in params.items() if n.startswith("language."))
    return {"quantized": quant, "high_precision": high, "total": quant + high, "bf16_total": total_bf16}
