"""Every call the bundle writer makes into the quantization and vision libraries, in one file: their APIs are young,
so a change there is a change here only.

- `validation_images` / `calibration`: rendered or user images (calibration_data), decoder input embeddings
  (calibration);
- `export_vision_graphs`: tower + projector -> ONNX, validated against PyTorch (vision_onnx);
- `allocate_mixed`: per-expert INT4/INT8 choice under a byte budget (allocate);
- `gptq`: sequential GPTQ of the decoder in memory (model_gptq);
- `fidelity`: held-out KL / top-1 / routing overlap of the written tensors against the fp model (fidelity,
  fake_quant).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from edge_vl2.bundle.reader import mmap_tensors
from edge_vl2.quant.formats import QuantizedWeight, load_quantized
from edge_vl2.quantize.recipe import INT8, Recipe

from .plan import GB, MAX_TOKENS, TensorPlan

Log = Callable[[str], None]
FIDELITY_FIELDS = ("samples", "images", "positions", "kl_mean", "kl_p99", "kl_max", "kl_mean_text",
                   "top1_agreement", "routing_overlap_mean", "routing_overlap_min", "top_k")


def validation_images(calib_dir: str | None, max_tiles: int, n: int = 2) -> list:
    """`n` images to validate the vision graphs on: the first of the user's calibration folder, else rendered."""
    from edge_vl2.quantize.calibration_data import calibration_samples

    samples = calibration_samples(n, seed=7, image_dir=calib_dir, image_fraction=1.0, max_tiles=max_tiles)
    return [image for s in samples for image in s.images]


def export_vision_graphs(model_dir: Path, folder: Path, precisions: list[str], images, processor,
                         log: Log, recipe: str | None = None) -> list[dict]:
    """`vision-{precision}.onnx` for every precision, each validated against the fp32 PyTorch tower on `images`
    (a UserError above tolerance); returns the manifest entries. Only the tower + projector are loaded. `recipe`:
    vision_onnx.RECIPES name for every graph (default: each precision's)."""
    from .vision_onnx import export_vision, load_vision_graph

    graph = load_vision_graph(model_dir)
    entries = []
    for precision in precisions:
        t0 = time.perf_counter()
        entry = export_vision(graph, folder / f"vision-{precision}.onnx", precision, images, processor,
                              recipe=recipe)
        v = entry["validation"]
        log(f"vision {precision} ({entry['graph']}): {entry['bytes'] / GB:.3f} GB, max |ORT - torch| "
            f"{v['max_abs']:.3g} (rel {v['max_rel']:.3g}), worst tile cosine {v['cosine_min']:.6f}, {time.perf_counter() - t0:.0f} s")
        entries.append(entry)
    return entries


def calibration(model, processor, n_samples: int, calib_dir: str | None, max_tiles: int, log: Log):
    from edge_vl2.quantize.calibration import prepare_calibration
    from edge_vl2.quantize.calibration_data import calibration_samples

    samples = calibration_samples(n_samples, image_dir=calib_dir, max_tiles=max_tiles)
    calib = prepare_calibration(model, processor, samples, max_tokens=MAX_TOKENS)
    log(f"calibration: {len(calib)} sequences, {calib.tokens} tokens, {calib.images} images")
    return calib


def allocate_mixed(model, calib, base: Recipe, share: float, mode: str, log: Log) -> tuple[Recipe, dict]:
    """The mixed recipe: each routed expert INT4 (the base's spec) or INT8, chosen from calibration data within
    `share` of the INT4 -> INT8 byte difference of all routed experts; returns (recipe, allocation summary)."""
    from edge_vl2.quantize.allocate import allocate, measure_sensitivity, mixed_recipe, routed_expert_bytes

    low = routed_expert_bytes(model, base.routed_experts)
    budget = low + int(share * (routed_expert_bytes(model, INT8) - low))
    sensitivity = measure_sensitivity(model, calib, [base.routed_experts, INT8], mode=mode, progress=log)
    allocation = allocate(sensitivity, budget)
    log(f"mixed: experts per format {allocation.counts()}, {allocation.expert_bytes / GB:.3f} GB of experts "
        f"(budget {budget / GB:.3f} GB)")
    summary = {k: v for k, v in allocation.summary().items() if k != "choice"}
    return mixed_recipe(base, allocation, name="mixed"), summary


def gptq(model, recipe: Recipe, calib, mode: str, log: Log) -> tuple[dict[str, QuantizedWeight], dict]:
    """GPTQ-quantized decoder tensors {prefix: weight} (the model is left untouched) and a calibration summary."""
    from edge_vl2.quantize.model_gptq import quantize_decoder

    result = quantize_decoder(model, recipe, calib, method="gptq", mode=mode, progress=log)
    return result.weights, dict(result.calibration)


@torch.inference_mode()
def fidelity(model, processor, files: list[Path], plans: list[TensorPlan], n_samples: int, work: Path,
             max_tiles: int, max_tokens: int = MAX_TOKENS) -> dict:
    """Held-out fidelity of the written decoder tensors against `model` (full precision), which this CONSUMES: after
    the reference pass its quantized parameters are overwritten, one at a time, by the dequantized tensors read back
    from the written shards (never a second copy of the decoder, nothing restored: the caller drops the model)."""
    from edge_vl2.quantize.calibration_data import evaluation_samples
    from edge_vl2.quantize.fake_quant import parameter_name
    from edge_vl2.quantize.fidelity import compare, reference_run
    from edge_vl2.quantize.heldout.domains import heldout_items
    from edge_vl2.quantize.heldout.suite import build_sequences, suite_compare, suite_reference

    samples = list(evaluation_samples(n_samples, max_tiles=max_tiles))
    reference = reference_run(model, processor, samples, max_tokens=max_tokens, cache_dir=work)
    # the held-out suite: n_samples items per domain (prose, chat, photos, documents, multi-image)
    suite = suite_reference(model, build_sequences(model, processor, heldout_items(n_samples, max_tiles=max_tiles)),
                            cache_dir=work)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(mmap_tensors(f))
    params = dict(model.named_parameters())
    for p in plans:
        for prefix, _, _ in p.weights():
            name, expert = parameter_name(prefix, params)
            target = params[name]
            value = load_quantized(prefix, tensors).dequantize(target.dtype)
            if expert is None:
                target.data = value
            else:
                target.data[expert] = value
    report = compare(reference, model)
    out = {k: report.get(k) for k in FIDELITY_FIELDS}
    out["domains"] = suite_compare(suite, model)["domains"]
    out.update(max_tokens=max_tokens, reference="the checkpoint in bf16 (vision fp32) on held-out samples",
               measured="the bundle's decoder tensors dequantized into that model (the runtime's reference math)",
               routing_overlap={k: round(v, 6) for k, v in (report.get("routing_overlap") or {}).items()})
    return out
