"""SigLIP tower + projector -> ONNX (fp32, fp16, dynamic INT8), checked against PyTorch on real tiles.

A bundle writer calls `export_vision(model, out_path, precision, images, processor)`: the graph is built in a
staging folder, validated against the PyTorch fp32 tower on the images' tiles (`UserError` above the precision's
`Tolerance`, nothing written) and published; the return value is the manifest's entry for it.

Graph contract (read by `edge_vl2.bundle.vision_ort`): input `pixels` [tiles, 3, 384, 384] float32, output `tile_embeds`
[tiles, 196, n_embed] float32, `tiles` dynamic; float32 at the boundary at every precision. Metadata `edge_vl2.*`.

Exporter: `torch.onnx.export(dynamo=True)`: 2.1 GB peak on the full-size tower against 8.5 GB for TorchScript, both
~4e-6 from torch. It writes opset 18 and cannot go lower (no 18->17 adapter for Pad): `opset=17` (TensorRT 8.x
parsers) uses the TorchScript exporter and pays its memory.

Graph recipes (`RECIPES`). "fused", the default for the CPU graphs (fp32, int8): onnxscript's ONNX Runtime fusions
rewrite each block's attention into `com.microsoft.MultiHeadAttention`, residual + LayerNorm into
`SkipLayerNormalization` and the GELUs into `FastGelu` / `BiasGelu` (contrib ops every onnxruntime build has, so the
device needs no optimizer). "plain", the default for fp16 (the GPU graph: TensorRT parses standard ops only and
fuses attention itself), keeps the exporter's standard ops; its INT8 graph is what edge-vl2 0.1 exported, kept so
`vision-bench --recipes plain,fused` measures before against after.
fp16: ONNX Runtime's float16 pass with LayerNorm and Softmax blocked (fp32 between casts, their scale/bias kept
fp32); ORT's CPU provider computes fp16 MatMul/Conv in fp32, so a CPU validation measures fp16 storage rounding.
INT8: `quantize_dynamic`, MatMul weights only, per output channel (per tensor: cosine 0.967 on the full-size tower;
a ConvInteger patch embedding costs accuracy and saves nothing), activations uint8 per tensor at run time. The
weight type decides ONNX Runtime's kernels: QUInt8 ("fused", "plain") runs its u8u8 kernels, exact on every x86-64
CPU; QInt8 ("fused-vnni", with a zero point per channel: the QUInt8 grid shifted by 128) its u8s8 kernels, ~2x
faster and, with VNNI / AMX, the same outputs as QUInt8. On an AVX2-only CPU those kernels add pairs of u8 x s8
products in 16 bits (`vpmaddubsw`), which saturate (worst-tile 1 - cos 0.067 on 3 full-width blocks), so the loader
refuses such a graph there. Measured and dropped (README, "Vision in ONNX Runtime"): symmetric QInt8 (the
quantizer's default; 1 - cos 3.0e-3 on the full-size tower against 1.6e-3) and 7-bit QInt8 (reduce_range, which
cannot saturate on AVX2: 4.6x the QUInt8 error).
The projector's first matmul stays fp32 in the fused graph (ORT folds its input transpose into a FusedMatMul, which
the quantizer does not cover; 0.35 % of the tower's FLOPs). fp16 and int8 derive from the fp32 graph.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from torch import nn

from edge_vl2 import __version__
from edge_vl2.bundle.vision_ort import INPUT, META_PREFIX, OUTPUT, OrtVisionRunner
from edge_vl2.errors import UserError, one_line
from edge_vl2.inputs.images import load_image
from edge_vl2.model.checkpoint import open_checkpoint
from edge_vl2.model.config import VL2Config
from edge_vl2.model.vision import Projector, SiglipTower
from edge_vl2.model.vl2 import DeepseekVL2

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_OPSET = 18  # what the dynamo exporter writes natively; 17 is the lowest with LayerNormalization
FP32_OPS = ("LayerNormalization", "Softmax")  # kept in fp32 inside the fp16 graph
# Weights above this go to `<name>.data` (protobuf cannot pass 2 GiB in one message anyway): a single file is
# serialised in memory at export (+1x to +2.5x the weights), `.data` is streamed. Test-size graphs stay one file.
EXTERNAL_DATA_ABOVE = 2**28
TILE_AXIS = "tiles"


@dataclass(frozen=True)
class GraphRecipe:
    """How a graph is built beyond its precision: `fused` applies the ONNX Runtime transformer fusions; `int8_weights`
    is the quantizer's weight type for the int8 graph ("u8": QUInt8; "s8": QInt8 with a zero point per channel, the
    same grid as QUInt8 shifted by 128, so where products are summed exactly (VNNI, AMX) the outputs are the same)."""

    fused: bool
    int8_weights: str


RECIPES = {"fused": GraphRecipe(fused=True, int8_weights="u8"),       # any x86-64 CPU
           "fused-vnni": GraphRecipe(fused=True, int8_weights="s8"),  # CPUs with AVX-512 VNNI / AVX-VNNI / AMX only
           "plain": GraphRecipe(fused=False, int8_weights="u8")}      # what edge-vl2 0.1 exported
DEFAULT_RECIPE = {"fp32": "fused", "fp16": "plain", "int8": "fused"}  # CPU graphs fused; fp16 portable to TensorRT


@dataclass(frozen=True)
class Tolerance:
    """ORT vs PyTorch fp32, over all validation tiles. `max_rel`: max |ort - torch| / max |torch| (None: not
    checked); `min_cosine`: the worst per-tile cosine of the flattened [196 * n_embed] embeddings."""

    max_rel: float | None
    min_cosine: float


# Measured on tiles of real photos, tiny-like fixture / full-size SigLIP (27 blocks, heavy-tailed random weights):
# fp32: max_rel 8e-7 / 1.3e-6 (summation order only) -> 1e-4. fp16 on ORT CPU: max_rel 4e-4 / 9e-4,
# 1 - cos 8e-8 / 4e-7 -> 1e-2 and 0.9995, room for GPU fp16 arithmetic. INT8 (QUInt8 per channel): 1 - cos
# 4e-4 / 1.6e-3 (2e-4 with normal weights) -> 0.995; its max_rel (3-7%) says little, so it is not bounded.
TOLERANCES = {
    "fp32": Tolerance(max_rel=1e-4, min_cosine=0.99999),
    "fp16": Tolerance(max_rel=1e-2, min_cosine=0.9995),
    "int8": Tolerance(max_rel=None, min_cosine=0.995),
}


class VisionGraph(nn.Module):
    """What goes into the ONNX file: pixels [N, 3, 384, 384] -> projector(tower(pixels)) [N, 196, n_embed].
    Parameter names are the checkpoint's (`vision.*`, `projector.*`)."""

    def __init__(self, vision: SiglipTower, projector: Projector, cfg: VL2Config):
        super().__init__()
        self.vision, self.projector, self.cfg = vision, projector, cfg

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixels))


def vision_graph(model: DeepseekVL2 | VisionGraph) -> VisionGraph:
    """The tower + projector in fp32 (a copy when they hold another dtype; the model is untouched)."""
    vision, projector = model.vision, model.projector
    if vision is None:
        raise ValueError("this model was built without its vision tower (with_vision=False)")
    if isinstance(model, VisionGraph) and all(p.dtype == torch.float32 for p in model.parameters()):
        return model.eval()
    if any(p.dtype != torch.float32 for m in (vision, projector) for p in m.parameters()):
        vision, projector = copy.deepcopy(vision).float(), copy.deepcopy(projector).float()  # bf16 -> fp32 is exact
    return VisionGraph(vision, projector, model.cfg).eval()


def load_vision_graph(model_dir: str | Path) -> VisionGraph:
    """Only the tower + projector of a checkpoint, fp32, checked as strictly as `load_model` (the decoder's
    tensors are never read: the full-size Tiny vision is 1.7 GB in fp32, its decoder 6.7 GB in bf16)."""
    _, cfg, reader = open_checkpoint(model_dir)
    with torch.device("meta"):
        graph = VisionGraph(SiglipTower(cfg.vision), Projector(cfg.projector), cfg)
    state = {n: nn.Parameter(reader.get(n).float(), requires_grad=False) for n, _ in graph.named_parameters()}
    graph.load_state_dict(state, strict=True, assign=True)
    return graph.eval()


# ---- export ----------------------------------------------------------------------------------------------------

def export_vision(model: DeepseekVL2 | VisionGraph, out_path: str | Path, precision: str, images,
                  processor=None, tol: Tolerance | None = None, opset: int = DEFAULT_OPSET,
                  external_data: bool | None = None, fp32_graph: str | Path | None = None,
                  recipe: str | None = None) -> dict:
    """Write the `precision` ("fp32", "fp16" with LayerNorm/softmax in fp32, "int8") vision graph to `out_path`,
    validated against `model` on `images`, and return its manifest entry:

        {"file", "files" (graph first, then its .data if any), "precision", "graph", "opset", "ir_version",
         "exporter", "inputs", "outputs", "dynamic_axes", "bytes", ["quantization"],
         "validation": {"tiles", "max_abs", "max_rel", "scale", "cosine_min", "cosine_mean", "tolerance", ...}}

    `model`: a `DeepseekVL2` or, lighter, `load_vision_graph(checkpoint)`. `images`: paths / PIL images tiled by
    `processor` exactly as at run time, or a tiles tensor [N, 3, S, S]. Above `tol` (default:
    `TOLERANCES[precision]`) a `UserError` is raised and nothing is written. Files are built in a temporary folder
    beside `out_path` and renamed at the end. `fp32_graph`: for fp16 / int8, convert this fp32 graph (written by an
    earlier call) instead of exporting the model again. `recipe`: "fused" or "plain" (default `DEFAULT_RECIPE`).
    """
    _check_request(precision, opset, recipe)
    tiles = validation_tiles(images, processor)  # bad images fail before minutes of export
    graph = vision_graph(model)
    out = Path(out_path)
    with _staging(out) as stage:
        write_vision_graph(graph, stage / out.name, precision, opset, external_data, fp32_graph, recipe)
        entry = _describe(stage / out.name)
        entry["validation"] = validate_vision(graph, stage / out.name, tiles, tol or TOLERANCES[precision])
        _publish(stage, out, entry["files"])
    return entry


def write_vision_graph(model: DeepseekVL2 | VisionGraph | None, path: str | Path, precision: str,
                       opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                       fp32_graph: str | Path | None = None, recipe: str | None = None) -> None:
    """Write the graph at `path` with no validation and no staging (`export_vision`'s and the benchmark's step).
    `fp32_graph`: derive the graph from this fp32 graph file (`model` is then unused): no second trace, and the
    conversion's memory peak (~3x the fp32 weights) need not stack on the PyTorch model's. A fused fp32 graph serves
    only fused graphs; a plain one serves both (it is fused on the way, which is all a fused fp32 graph needs)."""
    _check_request(precision, opset, recipe)
    path = Path(path)
    fused = RECIPES[recipe or DEFAULT_RECIPE[precision]].fused
    if fp32_graph is not None:
        meta, big = _read_meta(Path(fp32_graph), want_precision="fp32")  # missing / corrupt / not fp32: UserError
        _derive(Path(fp32_graph), path, precision, meta, big, external_data, recipe)
        return
    graph = vision_graph(model)
    size = graph.cfg.vision.image_size
    meta = {"precision": "fp32", "toolchain": __version__, "image_size": size, "n_embed": graph.cfg.projector.n_embed}
    fp32_bytes = sum(p.numel() for p in graph.parameters()) * 4
    example = torch.zeros(2, 3, size, size)  # N=2: torch.export specialises 0 and 1
    work = Path(tempfile.mkdtemp(prefix=".work.", dir=path.parent))
    try:
        fp32 = path if precision == "fp32" else work / "fp32.onnx"
        if fp32 != path:  # scratch for the conversion: external data is streamed, never serialised in memory
            fp32_external = True
        else:
            fp32_external = fp32_bytes > EXTERNAL_DATA_ABOVE if external_data is None else external_data
        if opset >= 18:
            program = _dynamo_export(graph, example, opset)
            meta["exporter"] = f"torch.onnx.export(dynamo=True), torch {torch.__version__}"
            model_ir = program.model
        else:
            _torchscript_export(graph, example, work / "raw.onnx", opset)
            meta["exporter"] = f"torch.onnx.export(dynamo=False), torch {torch.__version__}"
            model_ir = _load_ir(work / "raw.onnx")
        meta["graph"] = fuse_for_ort(model_ir, graph.cfg.vision.layers) if fused else "plain"
        _strip_ir_debug_info(model_ir)
        model_ir.metadata_props.update({META_PREFIX + k: str(v) for k, v in meta.items()})
        # Straight from the in-memory graph: with external data this peaks at +0.1x the weights (a single file is
        # serialised in memory: +2.5x), measured on 3- and 6-block full-width towers.
        _save_ir(model_ir, fp32, fp32_external)
        del model_ir
        if opset >= 18:
            del program
        if precision != "fp32":
            _derive(fp32, path, precision, meta, fp32_bytes > EXTERNAL_DATA_ABOVE, external_data, recipe)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _derive(src: Path, dst: Path, precision: str, meta: dict, big: bool, external_data: bool | None,
            recipe: str | None) -> None:
    """fp16, int8 or (fusing a plain graph) fp32 from the fp32 graph at `src`, whose `edge_vl2.*` metadata is
    `meta`."""
    want = RECIPES[recipe or DEFAULT_RECIPE[precision]]
    src_fused = meta.get("graph", "plain") != "plain"
    if src_fused and not want.fused:
        raise UserError(f"{src}: a fused fp32 graph cannot give the plain {precision} graph; derive it from a plain "
                        "fp32 graph (recipe 'plain') or export it from the model")
    work = Path(tempfile.mkdtemp(prefix=".derive.", dir=dst.parent))
    try:
        if want.fused and not src_fused:  # fuse a copy first
            model_ir = _load_ir(src)
            meta = {**meta, "graph": fuse_for_ort(model_ir, _vision_layers(model_ir))}
            model_ir.metadata_props.update({META_PREFIX + "graph": meta["graph"]})
            _strip_ir_debug_info(model_ir)
            src = work / "fused.onnx"
            _save_ir(model_ir, src, True)
            del model_ir
        if precision == "int8":
            _quantize_int8(src, dst, meta, big, external_data, want.int8_weights)
            return
        if precision == "fp32":
            _save_ir(_load_ir(src), dst, big if external_data is None else external_data)
            return
        proto = _to_fp16(src)
        _set_metadata(proto, {**meta, "precision": "fp16"})
        _save(proto, dst, external_data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- ONNX Runtime fusions ----------------------------------------------------------------------------------------

def fuse_for_ort(model_ir, layers: int) -> str:
    """Rewrite the graph (an `onnx_ir.Model`, in place) with onnxscript's ONNX Runtime fusions and return what they
    did, e.g. "fused: 27 MultiHeadAttention, 54 SkipLayerNormalization, ...". Every block's attention must become
    one MultiHeadAttention: fewer means the exporter's or onnxscript's patterns changed, a toolchain fault (the
    graph would still be right, only slower), so it raises rather than shipping a half-fused graph."""
    from collections import Counter

    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet():
        optimize_for_ort(model_ir)
    ops = Counter(node.op_type for node in model_ir.graph.all_nodes())
    if ops["MultiHeadAttention"] != layers or ops["Softmax"]:
        raise RuntimeError(f"ONNX Runtime attention fusion matched {ops['MultiHeadAttention']} of {layers} blocks "
                           f"({ops['Softmax']} Softmax left); check the onnxscript version")
    fused = [op for op in ("MultiHeadAttention", "SkipLayerNormalization", "FastGelu", "BiasGelu", "Gelu") if ops[op]]
    return "fused: " + ", ".join(f"{ops[op]} {op}" for op in fused)


def _vision_layers(model_ir) -> int:
    """Blocks in an unfused graph: one Softmax per attention."""
    return sum(node.op_type == "Softmax" for node in model_ir.graph.all_nodes())


def _strip_ir_debug_info(model_ir) -> None:
    """`_strip_debug_info` for an `onnx_ir.Model`: the exporter's stack traces and the rewriter's rule names."""
    for node in model_ir.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None


def _load_ir(path: Path):
    import onnx_ir

    return onnx_ir.load(str(path))  # external weights stay on disk (memory-mapped) until written


def _save_ir(model_ir, path: Path, external_data: bool) -> None:
    """One file, or the graph plus `<name>.data` (the layout `_save` writes)."""
    import onnx_ir
    from onnx_ir.external_data import load_to_model

    if not external_data:
        load_to_model(model_ir)  # weights still in another graph's .data file come into this one
    onnx_ir.save(model_ir, str(path), external_data=path.name + ".data" if external_data else None)


def _check_request(precision: str, opset: int, recipe: str | None = None) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown vision precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"unknown vision graph recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    if opset < 17:
        raise UserError(f"opset {opset} < 17 has no LayerNormalization; use 17 or later")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute the exporter's and quantizer's advice (torchvision ops skipped, "run pre-processing"): noise here."""
    loggers = {lg: lg.level for lg in map(logging.getLogger, ("torch.onnx", ""))}
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in loggers.items():
            lg.setLevel(level)


def _dynamo_export(graph: VisionGraph, example: torch.Tensor, opset: int):
    with torch.no_grad(), _quiet():
        return torch.onnx.export(graph, (example,), None, input_names=[INPUT], output_names=[OUTPUT],
                                 opset_version=opset, dynamo=True, verbose=False,
                                 dynamic_shapes={INPUT: {0: torch.export.Dim(TILE_AXIS)}})


def _torchscript_export(graph: VisionGraph, example: torch.Tensor, path: Path, opset: int) -> None:
    with torch.no_grad(), _quiet():
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT: {0: TILE_AXIS}, OUTPUT: {0: TILE_AXIS}})


def _to_fp16(fp32_path: Path) -> onnx.ModelProto:
    """fp32 graph -> fp16 graph with FP32_OPS computing in fp32 between casts; boundary stays float32."""
    from onnx.external_data_helper import load_external_data_for_tensor
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter turns every initializer to fp16 and casts the blocked ops' ones back up at run time; keep the
    # original fp32 values of those instead (LayerNorm gamma/beta), read without loading the whole graph.
    head = onnx.load(str(fp32_path), load_external_data=False)
    blocked_inputs = {x for n in head.graph.node if n.op_type in FP32_OPS for x in n.input}
    originals = {}
    for t in head.graph.initializer:
        if t.name in blocked_inputs and t.data_type == onnx.TensorProto.FLOAT:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(t, str(fp32_path.parent))
            originals[t.name] = onnx.numpy_helper.to_array(t)
    del head
    # a path (not a proto) lets the converter run shape inference on graphs over 2 GB
    proto = convert_float_to_float16(str(fp32_path), keep_io_types=True, op_block_list=list(FP32_OPS))
    _restore_fp32_initializers(proto, originals)
    problems = fp32_island_problems(proto)
    if problems:  # a converter change, not a user error
        raise RuntimeError("fp16 conversion left blocked ops in fp16: " + "; ".join(problems[:5]))
    return proto


def _restore_fp32_initializers(proto: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    """Replace `Cast(to=float)` of an fp16 initializer with the original fp32 initializer (no fp16 rounding)."""
    graph = proto.graph
    kept, added = [], []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.input[0] in originals and to == onnx.TensorProto.FLOAT:
            added.append(onnx.numpy_helper.from_array(originals[node.input[0]], node.output[0]))
            continue
        kept.append(node)
    if not added:
        return
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def fp32_island_problems(proto: onnx.ModelProto) -> list[str]:
    """Structural check of an fp16 graph: every FP32_OPS node reads fp32 (a Cast to float, an fp32 initializer or
    graph input, another such node) and feeds only casts to fp16, other such nodes or graph outputs."""
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    f32_sources = ({t.name for t in proto.graph.initializer if t.data_type == F32}
                   | {i.name for i in proto.graph.input if i.type.tensor_type.elem_type == F32})
    outputs = {o.name for o in proto.graph.output}

    def cast_to(node, dtype) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)

    problems = []
    for n in proto.graph.node:
        if n.op_type not in FP32_OPS:
            continue
        for x in n.input:
            p = producer.get(x)
            if x and x not in f32_sources and not (p is not None and (cast_to(p, F32) or p.op_type in FP32_OPS)):
                problems.append(f"{n.op_type} {n.name}: input {x} is not float32")
        for y in n.output:
            for c in consumers.get(y, []):
                if not (cast_to(c, F16) or c.op_type in FP32_OPS) and y not in outputs:
                    problems.append(f"{n.op_type} {n.name}: output {y} feeds {c.op_type} {c.name} without a cast")
    if not any(n.op_type in FP32_OPS for n in proto.graph.node):
        problems.append(f"no {'/'.join(FP32_OPS)} node in the graph")
    return problems


def _quantize_int8(src: Path, dst: Path, meta: dict, big: bool, external_data: bool | None, weights: str) -> None:
    """Dynamic INT8 for CPU devices: MatMul weights per output channel, QInt8 (`weights` "s8") or QUInt8 ("u8"),
    both asymmetric (the quantizer's default symmetric QInt8 measured 1 - cos 3.0e-3 on the full-size tower against
    1.6e-3: a heavy-tailed channel's one-sided outlier wastes half of a symmetric range),
    activations quantised to uint8 per tensor at run time by ONNX Runtime: a CPU format (GPU devices take the fp16
    graph). `meta`: the fp32 graph's `edge_vl2.*` metadata; `big`: its weights pass EXTERNAL_DATA_ABOVE."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}[weights]
    work = Path(tempfile.mkdtemp(prefix=".int8.", dir=dst.parent))
    try:
        with _quiet():
            quantize_dynamic(str(src), str(work / "q.onnx"), weight_type=weight_type, per_channel=True,
                             op_types_to_quantize=["MatMul"], use_external_data_format=big,
                             extra_options={"MatMulConstBOnly": True,  # activations @ activations stay fp32
                                            "WeightSymmetric": False})  # QInt8 too: min..max per channel
        proto = onnx.load(str(work / "q.onnx"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kind = {"s8": "QInt8 (zero point per channel)", "u8": "QUInt8"}[weights]
    recipe = (f"dynamic int8 (onnxruntime {onnxruntime.__version__}): MatMul weights {kind} per output channel, "
              "activations uint8 per tensor at run time")
    _set_metadata(proto, {**meta, "precision": "int8", "quantization": recipe})
    _save(proto, dst, external_data)


# ---- validation ------------------------------------------------------------------------------------------------

def validate_vision(model: DeepseekVL2 | VisionGraph, onnx_path: str | Path, images,
                    tol: Tolerance | None = None, processor=None, providers: list[str] | None = None,
                    batch: int = 4) -> dict:
    """Run the ONNX graph (through the runtime's `OrtVisionRunner`) and the PyTorch fp32 tower + projector on the
    same tiles; return `compare`'s figures plus precision, tolerance and providers; `UserError` above `tol`
    (default: the tolerance of the precision the graph records). `providers` default to the CPU (the export
    machine's reference)."""
    runner = OrtVisionRunner(onnx_path, providers=providers or ["CPUExecutionProvider"], batch=batch)
    precision = runner.precision
    if tol is None:
        if precision not in TOLERANCES:
            raise UserError(f"{onnx_path}: the graph records no edge-vl2 precision; pass a tolerance")
        tol = TOLERANCES[precision]
    tiles = validation_tiles(images, processor)
    graph = vision_graph(model)
    with torch.no_grad():
        want = torch.cat([graph(chunk) for chunk in tiles.split(batch)])  # [N, 196, H]
    report = {**compare(runner.encode_tiles(tiles), want), "precision": precision, "tolerance": asdict(tol),
              "providers": runner.providers, "images": _image_names(images)}
    failures = tolerance_failures(report, tol)
    if failures:
        raise UserError(f"{onnx_path}: {precision} vision graph differs from PyTorch beyond tolerance on "
                        f"{report['tiles']} tiles: " + "; ".join(failures))
    return report


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Figures of `got` against the reference `want`, both [N, tokens, H]: max_abs, scale (max |want|), max_rel,
    and the worst / mean per-tile cosine of the flattened embeddings."""
    got, want = got.double(), want.double()
    max_abs, scale = float((got - want).abs().max()), float(want.abs().max())
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
    return {"tiles": int(want.shape[0]), "max_abs": max_abs, "scale": scale,
            "max_rel": max_abs / scale if scale else float("inf"),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def tolerance_failures(report: dict, tol: Tolerance) -> list[str]:
    """What in a `compare` report breaks `tol` (empty: within tolerance)."""
    failures = []
    if not all(np.isfinite([report["max_abs"], report["cosine_min"]])):
        failures.append("non-finite outputs")
    if tol.max_rel is not None and not report["max_rel"] <= tol.max_rel:
        failures.append(f"max |ORT - torch| {report['max_abs']:.3g} is {report['max_rel']:.3g} of the "
                        f"embeddings' scale {report['scale']:.3g} (limit {tol.max_rel:g})")
    if not report["cosine_min"] >= tol.min_cosine:
        failures.append(f"worst tile cosine {report['cosine_min']:.6f} (limit {tol.min_cosine:g})")
    return failures


def validation_tiles(images, processor=None) -> torch.Tensor:
    """Tiles [N, 3, S, S] float32 from a tiles tensor, or from images tiled exactly as at run time."""
    if isinstance(images, torch.Tensor):
        tiles = images
    else:
        images = [images] if isinstance(images, (str, Path)) else list(images or [])
        if images and processor is None:
            raise ValueError("tiling images needs the checkpoint's Processor (Processor.from_pretrained(ckpt))")
        tiles = torch.cat([processor.tile_image(load_image(x))[0] for x in images]) if images else None
    if tiles is None or tiles.ndim != 4 or tiles.shape[0] == 0:
        raise UserError("vision validation needs at least one image or a non-empty [N, 3, S, S] tiles tensor")
    return tiles.to(torch.float32)


def _image_names(images) -> list[str] | None:
    """What the figures were measured on, for the manifest (None for a bare tiles tensor)."""
    if isinstance(images, torch.Tensor):
        return None
    items = [images] if isinstance(images, (str, Path)) else list(images)
    return [Path(x if isinstance(x, (str, Path)) else getattr(x, "filename", "") or "image").name for x in items]


# ---- files -----------------------------------------------------------------------------------------------------

def _read_meta(path: Path, want_precision: str | None = None) -> tuple[dict, bool]:
    """The `edge_vl2.*` metadata of a graph file and whether its weights pass EXTERNAL_DATA_ABOVE (not read)."""
    if not path.is_file():
        raise UserError(f"{path}: vision ONNX file not found")
    try:
        head = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, onnx its own types
        raise UserError(f"{path}: not a readable ONNX file ({one_line(e)})") from None
    meta = {p.key[len(META_PREFIX):]: p.value for p in head.metadata_props if p.key.startswith(META_PREFIX)}
    if want_precision and meta.get("precision") != want_precision:
        raise UserError(f"{path}: expected the {want_precision} vision graph, this one is "
                        f"{meta.get('precision', 'not from edge-vl2')}")
    return meta, sum(_tensor_bytes(t) for t in head.graph.initializer) > EXTERNAL_DATA_ABOVE


def _set_metadata(proto: onnx.ModelProto, values: dict) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    for k, v in kept + [(META_PREFIX + k, str(v)) for k, v in values.items()]:
        proto.metadata_props.add(key=k, value=v)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records (stack traces with this checkout's absolute paths, FX node text:
    ~1 KB a node), so a graph and its sha256 depend on the weights and the toolchain, not on the machine."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")


def _save(proto: onnx.ModelProto, path: Path, external_data: bool | None) -> None:
    """Write one file, or the graph plus `<name>.data` (None: when the weights pass EXTERNAL_DATA_ABOVE)."""
    _strip_debug_info(proto)
    if external_data is None:
        external_data = sum(_tensor_bytes(t) for t in proto.graph.initializer) > EXTERNAL_DATA_ABOVE
    if not external_data:
        onnx.save_model(proto, str(path))
        return
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _describe(path: Path) -> dict:
    """The manifest's description of a written graph, read back from the file (weights not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    data = path.parent / (path.name + ".data")
    files = [path.name, data.name] if data.exists() else [path.name]

    def dims(v) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    def io(values) -> dict:
        return {v.name: {"shape": dims(v),
                         "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values}

    meta = {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    entry = {"file": path.name, "files": files, "precision": meta.get("precision"), "graph": meta.get("graph", "plain"),
             "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
             "ir_version": proto.ir_version, "exporter": meta.get("exporter"),
             "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
             "dynamic_axes": {v.name: {str(i): d for i, d in enumerate(dims(v)) if isinstance(d, str)}
                              for v in [*proto.graph.input, *proto.graph.output]},
             "bytes": sum((path.parent / f).stat().st_size for f in files)}
    if "quantization" in meta:
        entry["quantization"] = meta["quantization"]
    return entry


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` (same filesystem, so publishing is a rename), removed whatever happens."""
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the vision graph's file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: Path, files: list[str]) -> None:
    for name in sorted(files, key=lambda f: f == out.name):  # weights before the graph that points at them
        shutil.copymode(stage / out.name, stage / name)  # onnx writes data files 0600; give them the graph's mode
        os.replace(stage / name, out.parent / name)
    stale = out.parent / (out.name + ".data")
    if stale.name not in files and stale.exists():  # an earlier export's weights, no longer referenced
        stale.unlink()
