"""Decoder tensors -> bundle shards, and the fidelity of what was written.

Two ways to make the quantized tensors, one way to write them (`ShardWriter`, in the order of `plan_decoder`, each
tensor checked against its planned key, dtype and shape):

- `stream_rtn`: round-to-nearest straight from the checkpoint, one tensor at a time (routed experts one expert at a
  time, stacked as they are made; big matrices in blocks of rows: RTN's scales are per row or per group of a row, so
  blocks give the same bytes as the whole tensor). Memory stays a few hundred MB whatever the model size: this is how
  a 16B-parameter Small is exported on a 24 GB machine. Same arithmetic as the toolchain's
  `quantize_decoder(method="rtn")` (tests/test_export.py checks the bytes are identical).
- `write_quantized`: the tensors of a `QuantResult` (GPTQ on the model in memory) plus the model's own bf16 tensors.

"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from edge_vl2.dtypes import SAFETENSORS_CODES
from edge_vl2.model.vl2 import source_tensor
from edge_vl2.quant.formats import Int4Weight, Int8Weight, QuantizedWeight
from edge_vl2.quantize.rtn import quantize_rtn

from .plan import ROW_BLOCK_ELEMENTS, SourceReader, TensorPlan

Progress = Callable[[int, int], None]


class ShardWriter:
    """Tensors in, `decoder-NNNNN.safetensors` files out, each flushed once it holds `shard_bytes`."""

    def __init__(self, folder: Path, plans: list[TensorPlan], shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.expected = {k: v for p in plans for k, v in p.keys().items()}
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[str] = []
        self.written: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        want = self.expected.get(key)
        got = (SAFETENSORS_CODES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape))
        if want is None or key in self.written or key in self.buffer:
            raise RuntimeError(f"decoder tensor {key!r} is not planned, or written twice")
        if got != want:
            raise RuntimeError(f"decoder tensor {key!r} came out {got}, planned {want}")
        self.buffer[key] = tensor.contiguous()
        self.buffered += tensor.numel() * tensor.element_size()
        if self.buffered >= self.shard_bytes:
            self.flush()

    def add_weight(self, prefix: str, w: QuantizedWeight) -> None:
        for key, t in w.to_state_dict(prefix).items():
            self.add(key, t)

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"decoder-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.written.update(self.buffer)
        self.buffer, self.buffered = {}, 0

    def close(self) -> list[str]:
        self.flush()
        missing = [k for k in self.expected if k not in self.written]
        if missing:
            raise RuntimeError(f"decoder tensor {missing[0]!r} was planned but never written")
        return self.files


# --- RTN, streaming ------------------------------------------------------------------------------------------------

def _cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row blocks [out_i, in] of one format -> [sum out_i, in] (every tensor of a 2-D weight starts with `out`)."""
    if len(parts) == 1:
        return parts[0]
    cls = type(parts[0])
    fields = parts[0].tensors().keys()
    return cls(**{k: torch.cat([p.tensors()[k] for p in parts]) for k in fields})


def rtn_rows(read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], spec) -> QuantizedWeight:
    """RTN of a [out, in] matrix read in blocks of rows (identical to quantizing it whole)."""
    out, inp = shape
    step = max(1, ROW_BLOCK_ELEMENTS // max(inp, 1))
    return _cat_rows([quantize_rtn(read_rows(r, min(out, r + step)), spec) for r in range(0, out, step)])


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    return (Int4Weight if parts[0].bits == 4 else Int8Weight).stack(parts)


def stream_rtn(reader: SourceReader, cfg, plans: list[TensorPlan], writer: ShardWriter,
               progress: Progress | None = None) -> None:
    """Every planned decoder tensor from the checkpoint to `writer`, quantized by RTN where the plan says so."""
    for i, plan in enumerate(plans):
        if not plan.quantized:
            writer.add(plan.name, source_tensor(reader, plan.name, cfg).to(torch.bfloat16))
        elif plan.stacked:  # `...mlp.experts.{proj}` <- the checkpoint's `...mlp.experts.{e}.{proj}.weight`
            head, proj = plan.name.rsplit(".", 1)
            specs = plan.expert_specs or (plan.spec,) * plan.shape[0]
            parts = []
            for e, spec in enumerate(specs):
                name = f"{head}.{e}.{proj}.weight"
                parts.append(rtn_rows(lambda r0, r1, n=name: reader.get(n, (r0, r1)), plan.shape[1:], spec))
            if plan.expert_specs is None:
                writer.add_weight(plan.name, _stack(parts))
            else:
                for (prefix, _, _), part in zip(plan.weights(), parts):
                    writer.add_weight(prefix, part)
            del parts
        else:
            writer.add_weight(plan.name.removesuffix(".weight"),
                              rtn_rows(lambda r0, r1: reader.get(plan.name, (r0, r1)), plan.shape, plan.spec))
        if progress:
            progress(i + 1, len(plans))
    writer.close()


# --- in memory (GPTQ) ----------------------------------------------------------------------------------------------

def write_quantized(model, weights: dict[str, QuantizedWeight], plans: list[TensorPlan], writer: ShardWriter,
                    progress: Progress | None = None) -> None:
    """A quantization result's tensors where the plan quantizes, the model's own tensors (as bf16) elsewhere."""
    params = dict(model.named_parameters())
    planned = {prefix for p in plans for prefix, _, _ in p.weights()}
    unplanned = sorted(set(weights) ^ planned)
    if unplanned:
        raise RuntimeError(f"quantized tensor {unplanned[0]!r} is in the quantization result or the bundle plan, "
                           "not both")
    for i, plan in enumerate(plans):
        if not plan.quantized:
            writer.add(plan.name, params[plan.name].detach().to(torch.bfloat16))
        for prefix, _, _ in plan.weights():
            writer.add_weight(prefix, weights[prefix])
        if progress:
            progress(i + 1, len(plans))
    writer.close()
