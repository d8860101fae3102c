"""What a bundle will hold and what making it costs, decided from the checkpoint's headers before any weight is read.

- `SourceReader` reads checkpoint tensors with plain positioned reads (no memory map), whole or a range of rows:
  a streaming export touches each byte once and its resident memory stays what it holds, not what it has read.
- `plan_decoder` lists every decoder tensor of the runtime model (`DeepseekVL2(cfg, with_vision=False)`: runtime
  names, experts stacked, MLA's kv_b_proj split into w_uk / w_uv) with the recipe's spec fitted to its shape and its
  exact size on disk. It refuses what the runtime cannot load: quantized embeddings, or experts of one layer and
  projection in different formats.
- `plan_memory` gives the planned peak resident memory of each stage (formulas beside the constants).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_vl2.dtypes import SAFETENSORS_DTYPES
from edge_vl2.errors import UserError
from edge_vl2.model.config import VL2Config
from edge_vl2.model.vl2 import DeepseekVL2
from edge_vl2.quantize.formats import QuantSpec
from edge_vl2.quantize.recipe import Recipe, fit_spec, module_kind, spec_nbytes

GB = 1e9
# Planned-peak constants (resident bytes). BASE: Python + torch + onnxruntime loaded, measured ~0.45 GB here.
BASE_BYTES = 0.6 * GB
# Vision stage, in units of the fp32 tower + projector (V): the torch copy (1 V), the dynamo exporter's graph (~0.3 V
# beyond it: 2.1 GB peak measured for the 1.6 GB tower), the fp16 pass holding the fp32 and fp16 protos and
# serialising one (1 + 0.5 + 1.25 V), then ORT validating: 4 V covers it with the torch copy alive throughout. The
# int8 graph goes through an fp32 graph and ORT's quantizer, which holds about as much: an int8-only export of
# full-size Tiny peaked at 7.4 GB (0.6 GB base + 4.1 V), so int8 gets no discount (it was planned at 3 V, 5.65 GB).
VISION_STAGE_FACTOR = 4.0
# Streaming decoder stage: one shard buffered (1x) and serialised by safetensors (+1x), plus a bf16 source block and
# its fp32 working copies (ROW_BLOCK_ELEMENTS x (2 + 4 x 3) bytes), plus one stacked expert projection.
ROW_BLOCK_ELEMENTS = 1 << 24
BLOCK_WORK_BYTES = ROW_BLOCK_ELEMENTS * 14
# In-memory stages (GPTQ, fidelity): the model (bf16 decoder, fp32 vision) + 25 % for activations, Hessians and the
# reference logits of one sample.
IN_MEMORY_OVERHEAD = 0.25
# ... plus fp32 logits [MAX_TOKENS, vocab]: the fp and quantized ones and the log-softmax temporaries of the
# comparison (measured 1.5 GB on a test-size model with the real 129k vocabulary, 1 sample of ~500 tokens).
MAX_TOKENS = 512
LOGITS_COPIES = 8


class SourceReader:
    """Checkpoint tensors by name, read with os.pread from the shards listed in the index (no memory map)."""

    def __init__(self, model_dir: Path, weight_map: dict[str, str]):
        self.dir = Path(model_dir)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for shard in sorted(set(weight_map.values())):
            path = self.dir / shard
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if e["dtype"] not in SAFETENSORS_DTYPES:
                    raise UserError(f"{path}: tensor {name!r} has dtype {e['dtype']}, not a float/int type we read")
                start, end = e["data_offsets"]
                self.entries[name] = (path, SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + start, end - start)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[2] for k, v in self.entries.items()}

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [r0, r1) of its first axis) as a fresh CPU tensor in the checkpoint's dtype."""
        try:
            path, dtype, shape, offset, nbytes = self.entries[name]
        except KeyError:
            raise UserError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset, nbytes, shape = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes, \
                (rows[1] - rows[0], *shape[1:])
        buf = bytearray(nbytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        if got != nbytes:
            raise UserError(f"{path}: truncated; cannot read {name!r}")
        return torch.frombuffer(buf, dtype=dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class TensorPlan:
    """One decoder parameter of the runtime model and how the bundle stores it: bf16 (`spec` None), one quantized
    weight (`spec`), or, for routed experts whose formats differ (mixed recipes), one weight per expert
    (`expert_specs`, named like the checkpoint's experts: `...mlp.experts.{e}.{proj}`)."""

    name: str  # runtime parameter name
    shape: tuple[int, ...]
    spec: QuantSpec | None = None
    expert_specs: tuple[QuantSpec, ...] | None = None

    @property
    def stacked(self) -> bool:
        return ".mlp.experts." in self.name

    @property
    def quantized(self) -> bool:
        return self.spec is not None or self.expert_specs is not None

    def weights(self) -> list[tuple[str, QuantSpec, tuple[int, ...]]]:
        """(prefix, spec, shape) of every quantized weight this parameter becomes (prefix: the module path
        `swap_in_quantized_` names, `{prefix}.qweight` etc. in the bundle)."""
        if self.expert_specs is not None:
            head, proj = self.name.rsplit(".", 1)
            return [(f"{head}.{e}.{proj}", s, self.shape[1:]) for e, s in enumerate(self.expert_specs)]
        return [(self.name.removesuffix(".weight"), self.spec, self.shape)] if self.spec is not None else []

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        if not self.quantized:
            return 2 * math.prod(self.shape)
        return sum(math.prod(lead) * spec_nbytes(s, *shape[-2:]) for _, s, shape in self.weights()
                   for lead in [shape[:-2]])

    def keys(self) -> dict[str, tuple[str, list[int]]]:
        """{tensor key in the bundle: (safetensors dtype, shape)} this parameter becomes."""
        if not self.quantized:
            return {self.name: ("BF16", list(self.shape))}
        keys = {}
        for prefix, s, (*lead, out, inp) in self.weights():
            groups = None if s.group_size is None else inp // s.group_size
            if s.bits == 8:
                keys[f"{prefix}.qweight"] = ("I8", [*lead, out, inp])
                keys[f"{prefix}.scales"] = ("F16", [*lead, out] if groups is None else [*lead, out, groups])
                continue
            keys[f"{prefix}.qweight"] = ("U8", [*lead, out, groups, s.group_size // 2])
            keys[f"{prefix}.scales"] = ("F16", [*lead, out, groups])
            if not s.symmetric:
                keys[f"{prefix}.zeros"] = ("U8", [*lead, out, (groups + 1) // 2])
        return keys


def _layer_of(name: str) -> int:
    return int(name.split(".")[3])


def plan_decoder(cfg: VL2Config, recipe: Recipe) -> list[TensorPlan]:
    """Every parameter of the runtime model, in module order, with its format on disk."""
    with torch.device("meta"):
        model = DeepseekVL2(cfg, with_vision=False)
    plans = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        prefix = name.removesuffix(".weight")
        kind = module_kind(prefix) if prefix.startswith("language.") else None
        if kind == "routed_experts":
            proj = prefix.rsplit(".", 1)[1]
            specs = tuple(fit_spec(s, shape[-1]) for s in recipe.expert_specs(_layer_of(prefix), proj, shape[0]))
            if len(set(specs)) == 1:
                plans.append(TensorPlan(name, shape, specs[0]))
            elif None in specs:
                raise UserError(f"recipe {recipe.name}: some experts of {prefix} are quantized and others not")
            else:
                plans.append(TensorPlan(name, shape, expert_specs=specs))
        elif kind is not None:
            plans.append(TensorPlan(name, shape, recipe.spec_for(prefix, shape[-1])))
        else:
            plans.append(TensorPlan(name, shape))
    return plans


def vision_params(cfg: VL2Config) -> tuple[int, int]:
    """(parameters of the exported graph: tower without the unused attention pool, plus projector;
    of those, the ones in MatMul weights, which dynamic INT8 stores in one byte)."""
    with torch.device("meta"):
        model = DeepseekVL2(cfg, with_vision=True)
    total = matmul = 0
    for module in (model.vision, model.projector):
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                matmul += sub.weight.numel()
        total += sum(p.numel() for p in module.parameters())
    return total, matmul


def vision_bytes(cfg: VL2Config, precision: str) -> int:
    """Estimated size of one vision graph file (weights dominate; the graph itself is ~1 MB)."""
    total, matmul = vision_params(cfg)
    if precision == "fp32":
        return 4 * total
    if precision == "fp16":
        return 2 * total
    return matmul + 4 * (total - matmul) + 8 * matmul // max(cfg.vision.width, 1)  # + per-channel scales/zeros


def model_bytes(cfg: VL2Config) -> int:
    """Resident bytes of the whole model loaded for GPTQ or fidelity: bf16 decoder + fp32 vision."""
    with torch.device("meta"):
        model = DeepseekVL2(cfg, with_vision=True)
    return sum(p.numel() * (4 if n.startswith(("vision.", "projector.")) else 2) for n, p in model.named_parameters())


def gptq_work_bytes(cfg: VL2Config) -> int:
    """Working set of GPTQ on the largest decoder layer (quantize/model_gptq.py, batched_gptq.py): the layer in fp32
    twice (the reference copy and the one receiving dequantized weights) plus its bf16 originals; two Hessians per
    routed expert (routed and all-tokens) for each input width (hidden, expert intermediate); the batched solver's
    temporaries over all experts at once (float64 Hessian copy, fp32 inverse factor, fp32 weights and codes)."""
    lc = cfg.language
    with torch.device("meta"):
        model = DeepseekVL2(cfg, with_vision=False)
    per_layer: dict[str, int] = {}
    for n, p in model.named_parameters():
        if ".layers." in n:
            key = n.split(".layers.")[1].split(".")[0]
            per_layer[key] = per_layer.get(key, 0) + p.numel()
    layer = max(per_layer.values())
    e, h, i = lc.n_routed_experts, lc.hidden_size, lc.moe_intermediate_size
    hessians = 2 * 4 * e * (h * h + i * i)
    solver = e * (8 * h * h + 4 * h * h + 2 * 4 * h * i)
    return (2 * 4 + 2) * layer + hessians + solver


def plan_memory(cfg: VL2Config, plans: list[TensorPlan], method: str, fidelity: bool, shard_bytes: int,
                vision_precisions: list[str]) -> dict[str, int]:
    """Planned peak resident bytes per stage and overall ("peak"); see the constants for the formulas."""
    v_fp32 = 4 * vision_params(cfg)[0]
    quant = sum(p.nbytes for p in plans)
    largest = max(p.nbytes for p in plans)
    expert_stack = max((2 * p.shape[0] * p.shape[1] * p.shape[2] + p.nbytes for p in plans if p.stacked), default=0)
    stages = {"vision": int(v_fp32 * VISION_STAGE_FACTOR)}
    in_memory = int(model_bytes(cfg) * (1 + IN_MEMORY_OVERHEAD)) + LOGITS_COPIES * 4 * MAX_TOKENS * \
        cfg.language.vocab_size
    if method == "gptq":
        stages["gptq"] = in_memory + quant + gptq_work_bytes(cfg)
    else:
        stages["decoder"] = 2 * max(shard_bytes, largest) + BLOCK_WORK_BYTES + expert_stack
    if fidelity:  # the written shards are memory-mapped and read back into the model: their pages count too
        stages["fidelity"] = in_memory + quant  # (full-size Tiny INT4: 14.13 GB measured, 12.2 planned without)
    stages = {k: v + int(BASE_BYTES) for k, v in stages.items()}
    stages["peak"] = max(stages.values())
    return stages
