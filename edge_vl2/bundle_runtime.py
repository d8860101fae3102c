"""A bundle -> a ready `VL2Pipeline`: validate, check the device fits, build the decoder, start ONNX Runtime.

    vl2 = load_bundle("tiny-int4", device_profile="cpu-kiosk")    # or VL2Pipeline.from_bundle(...)

1. `open_bundle` validates the manifest, every file's size and sha256 (`verify=False` skips only the hashes), every
   decoder tensor's dtype and shape, and the processor file.
2. With a device profile, `check_fit` refuses a bundle whose decoder + vision graph + full-context cache exceed the
   profile's memory budget, before anything is loaded.
3. The decoder is built on the meta device without a vision tower. Its bf16 tensors are views of the memory-mapped
   shards (no copy when the runtime dtype is bf16 on the CPU); each quantized layer is swapped in by
   `quantize_model_`, which repacks the canonical tensors once for the backend.
4. The vision graph runs in ONNX Runtime with the providers of the profile (or TensorRT, CUDA, CPU: whatever is
   installed); backend, providers and graph are printed once.

Only the runtime is imported here: no transformers, timm, optimum, onnx, nor the toolchain.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .bundle import Bundle, mmap_tensors, open_bundle
from .device_profiles import DeviceProfile, check_fit, load_device
from .errors import UserError
from .model import DeepseekVL2
from .qformat import load_quantized

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def choose_backend(requested: str | None, profile: DeviceProfile | None) -> str:
    """The decoder backend: the one asked for, else the profile's, else cuda when a GPU is visible, else cpu."""
    from .qlinear import available_backends

    name = requested or (profile.decoder_backend if profile else ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = available_backends()
    if name not in backends:
        raise UserError(f"unknown decoder backend {name!r}; choose one of {', '.join(backends)}")
    if not backends[name].available:
        why = f" (device profile {profile.name})" if profile and not requested else ""
        raise UserError(f"decoder backend {name}{why} cannot run here: {backends[name].detail}")
    return name


def choose_vision(bundle: Bundle, profile: DeviceProfile | None) -> dict:
    """The profile's vision precision when the bundle has it, else the bundle's first graph."""
    if profile is not None:
        for g in bundle.manifest["vision"]["graphs"]:
            if g["precision"] == profile.vision_precision:
                return g
    return bundle.vision_graph()


def choose_providers(profile: DeviceProfile | None) -> list[str] | None:
    """The profile's ONNX Runtime providers that are installed (None without a profile: all installed ones)."""
    if profile is None:
        return None
    from .vision_ort import ort

    if ort is None:
        raise UserError("onnxruntime is not installed: install edge-vl2[cpu] or edge-vl2[gpu] (exactly one)")
    installed = ort.get_available_providers()
    usable = [p for p in profile.ort_providers if p in installed]
    if not usable:
        raise UserError(f"device {profile.name} runs vision on {profile.ort_providers}; this onnxruntime has "
                        f"{installed}")
    return usable


def _placeholder(shape: torch.Size, dtype: torch.dtype, device: str) -> nn.Parameter:
    """A stand-in for a weight that `quantize_model_` replaces: its shape, dtype and device, 1 element of memory."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


def build_decoder(bundle: Bundle, backend: str, device: str, dtype: torch.dtype) -> DeepseekVL2:
    """The decoder side of the model (no vision tower) from the bundle's shards, quantized layers on `backend`."""
    from .quantized_model import quantize_model_

    with torch.device("meta"):
        model = DeepseekVL2(bundle.config, with_vision=False)
    tensors: dict[str, torch.Tensor] = {}
    for f in bundle.decoder_files:
        tensors.update(mmap_tensors(f))
    quantized = bundle.manifest["decoder"]["quantized"]
    try:
        weights = {prefix: load_quantized(prefix, tensors) for prefix in quantized}
    except ValueError as e:
        raise UserError(f"{bundle.path}: {e}") from None
    covered = {q["param"] for q in quantized.values()}
    state, used = {}, {k for p in quantized for k in tensors if k.rpartition(".")[0] == p}
    for name, p in model.named_parameters():
        if name in covered:
            state[name] = _placeholder(p.shape, dtype, device)
            continue
        t = tensors.get(name)
        if t is None:
            raise UserError(f"{bundle.path}: the bundle has no tensor {name!r} that its config implies")
        if t.shape != p.shape:
            raise UserError(f"{bundle.path}: tensor {name!r} is {list(t.shape)}, its config implies {list(p.shape)}")
        state[name] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise UserError(f"{bundle.path}: tensor {extra[0]!r} belongs to no layer of this model")
    model.load_state_dict(state, strict=True, assign=True)
    try:
        quantize_model_(model, weights, backend)
    except ValueError as e:
        raise UserError(f"{bundle.path}: {e}") from None
    return model.eval()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_bundle(path: str | Path, backend: str | None = None, device_profile: str | DeviceProfile | None = None,
                verify: bool = True, dtype: str = "bf16", log: Callable[[str], None] | None = _say):
    """A `VL2Pipeline` over the bundle at `path` (see the module docstring for the steps and what they refuse).

    `backend`: cpu | cuda | reference | bnb (default: from the profile, else cuda when available, else cpu).
    `device_profile`: a shipped profile name, a TOML path or a DeviceProfile; None skips the fit check.
    `dtype`: activations and high-precision tensors, bf16 (deployment) or fp32 (reference comparisons).
    """
    from .pipeline import VL2Pipeline
    from .processor import Processor
    from .quantized_model import describe_quantized
    from .vision_ort import OrtVisionRunner

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    profile = load_device(device_profile) if isinstance(device_profile, str) else device_profile
    bundle = open_bundle(path, verify=verify)
    graph = choose_vision(bundle, profile)
    if profile is not None:
        check_fit(profile, bundle.decoder_bytes + bundle.graph_bytes(graph), bundle.cache_bytes(),
                  f"bundle {bundle.path.name} ({bundle.manifest['variant']}, {bundle.manifest['recipe']['name']})")
    backend = choose_backend(backend, profile)
    device = "cuda" if backend == "cuda" or (backend == "bnb" and torch.cuda.is_available()) else "cpu"
    model = build_decoder(bundle, backend, device, DTYPES[dtype])
    runner = OrtVisionRunner(bundle.path / graph["file"], providers=choose_providers(profile))
    processor = Processor.from_pretrained(bundle.path)
    capped = profile is not None and processor.max_tiles() > profile.max_tiles
    if capped:
        processor = processor.capped_at(profile.max_tiles)
    if log is not None:  # once, in one line; `describe_quantized(vl2.model)` has each layer's kernel
        from .qexperts import QuantExperts

        stacks = sum(isinstance(m, QuantExperts) for m in model.modules())
        n = sum(describe_quantized(model).values())
        log(f"bundle {bundle.path.name}: {bundle.manifest['variant']} {bundle.manifest['recipe']['name']}"
            f"{' (hashes not verified)' if not verify else ''}; decoder backend {backend} on {device} "
            f"({n - stacks} quantized linear layers, {stacks} expert stacks), vision {graph['precision']} graph on "
            f"{', '.join(runner.providers)}"
            f"{f'; at most {profile.max_tiles} tiles per image ({profile.name})' if capped else ''}")
    return VL2Pipeline(model, processor, bundle.path, tile_encoder=runner.encode_tiles)


def check_checkpoint_fit(model: str | Path, device_profile: str | DeviceProfile, dtype: str, torch_device: str) -> None:
    """Reference mode: refuse, from the checkpoint's headers alone, a model whose weights in the dtypes it would
    run in (see `pipeline.resolve_dtypes`) plus a full-context cache exceed the profile's budget."""
    from .bundle import cache_bytes
    from .checkpoint import open_checkpoint
    from .pipeline import resolve_dtypes

    profile = load_device(device_profile) if isinstance(device_profile, str) else device_profile
    _, cfg, _ = open_checkpoint(model)
    decoder_dtype, vision_dtype = resolve_dtypes(dtype, torch_device)
    with torch.device("meta"):
        vl2 = DeepseekVL2(cfg)
    weights = sum(p.numel() * (vision_dtype if n.startswith(("vision.", "projector.")) else decoder_dtype).itemsize
                  for n, p in vl2.named_parameters())
    check_fit(profile, weights, cache_bytes(cfg) * decoder_dtype.itemsize // 2,
              f"{model} in reference mode ({cfg.variant}, unquantized)")


# --- inspect -------------------------------------------------------------------------------------------------------

def _fmt_spec(d: dict | None) -> str:
    if d is None:
        return "bf16"
    return f"int{d['bits']}" + (f" g{d['group_size']}" if d.get("group_size") else " per-channel") + \
        ("" if d.get("symmetric", True) else " asym")


def inspect_lines(bundle: Bundle) -> list[str]:
    """A human summary of a bundle: model, recipe, sizes, vision graphs, fidelity, what can run it and where."""
    from .device_profiles import available_devices
    from .qlinear import available_backends
    from .vision_ort import ort

    m, gb = bundle.manifest, 1e9
    recipe, dec = m["recipe"], m["decoder"]
    modules = ", ".join(f"{k} {_fmt_spec(v)}" for k, v in recipe["modules"].items())
    overrides = len(recipe.get("expert_overrides") or {})
    lines = [
        f"bundle {bundle.path} (schema {m['schema_version']}, toolchain {m['toolchain_version']})",
        f"model: {m['variant']} from {m['source']['model']} (config sha256 {m['source']['config_sha256'][:12]})",
        f"recipe: {recipe['name']} by {recipe['method']}" + (f" ({recipe['mode']})" if recipe.get("mode") else "")
        + f": {modules}" + (f"; {overrides} per-expert overrides" if overrides else ""),
        f"size: {bundle.total_bytes / gb:.3f} GB; decoder {bundle.decoder_bytes / gb:.3f} GB in "
        f"{len(dec['files'])} file(s) ({len(dec['quantized'])} quantized weights, {len(dec['high_precision'])} "
        "bf16 tensors)",
    ]
    for g in m["vision"]["graphs"]:
        v = g.get("validation", {})
        lines.append(f"vision: {g['precision']} {g['file']} {bundle.graph_bytes(g) / gb:.3f} GB, opset {g['opset']}, "
                     f"max |ORT - torch| {v.get('max_abs', float('nan')):.3g}, worst tile cosine "
                     f"{v.get('cosine_min', float('nan')):.6f} on {v.get('tiles', 0)} tiles")
    f = m["fidelity"]
    if "skipped" in f:
        lines.append(f"fidelity: not measured ({f['skipped']})")
    else:
        lines.append(f"fidelity ({f['samples']} held-out samples, {f['positions']} positions): KL mean "
                     f"{f['kl_mean']:.5f}, p99 {f['kl_p99']:.5f}; top-1 agreement {100 * f['top1_agreement']:.2f} %"
                     + (f"; top-{f['top_k']} routing overlap {f['routing_overlap_mean']:.4f}"
                        if f.get("routing_overlap_mean") is not None else ""))
    e = m.get("export", {})
    if e:
        lines.append(f"export: {e.get('seconds', 0):.0f} s, peak RSS {e.get('peak_rss_bytes', 0) / gb:.2f} GB "
                     f"(planned {e.get('planned_peak_bytes', 0) / gb:.1f} GB)")
    installed = ort.get_available_providers() if ort is not None else []
    backends = [n for n, b in available_backends().items() if b.available]
    lines.append(f"runs here with: ONNX Runtime providers {', '.join(installed) or 'none (onnxruntime missing)'}; "
                 f"decoder backends {', '.join(backends)}")
    fits, too_big = [], []
    for name in available_devices():
        profile = load_device(name)
        graph = choose_vision(bundle, profile)
        try:
            need = check_fit(profile, bundle.decoder_bytes + bundle.graph_bytes(graph), bundle.cache_bytes(), "")
            fits.append(f"{name} ({need:.1f}/{profile.memory_budget_gb:.1f} GB)")
        except UserError:
            too_big.append(name)
    lines.append("fits: " + (", ".join(fits) or "no shipped device profile")
                 + (f"; too big for: {', '.join(too_big)}" if too_big else ""))
    return lines
