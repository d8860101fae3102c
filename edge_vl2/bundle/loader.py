"""A bundle -> the parts of a `VL2Pipeline`: validate, check the device fits, build the decoder, start ONNX Runtime.

    vl2 = VL2Pipeline.from_bundle("tiny-int4", device_profile="cpu-kiosk")    # calls load_bundle

1. `open_bundle` validates the manifest, every file's size and sha256 (`verify=False` skips only the hashes), every
   decoder tensor's dtype and shape, and the processor file.
2. With a device profile, `check_fit` refuses a bundle whose decoder + vision graph + full-context cache exceed the
   profile's memory budget, before anything is loaded.
3. The decoder is built on the meta device without a vision tower. Its bf16 tensors are views of the memory-mapped
   shards (no copy when the runtime dtype is bf16 on the CPU); each quantized layer is swapped in by
   `swap_in_quantized_`, which repacks the canonical tensors once for the backend.
4. The vision graph runs in ONNX Runtime with the providers of the profile (or TensorRT, CUDA, CPU: whatever is
   installed); backend, providers and graph are printed once.

Only the runtime is imported here: no transformers, timm, optimum, onnx, nor the toolchain.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import checks
from ..devices.profiles import DeviceProfile, as_profile, check_fit, prefill_budget
from ..dtypes import TORCH_DTYPES
from ..errors import UserError
from ..inputs.processor import Processor
from ..model.vl2 import DeepseekVL2
from ..quant.formats import load_quantized
from .manifest import VisionGraph
from .reader import Bundle, mmap_tensors, open_bundle

BUNDLE_DTYPES = ("bf16", "fp32")  # bf16 to deploy, fp32 for reference comparisons


@dataclass
class LoadedBundle:
    """What `VL2Pipeline` is made of: the decoder (no vision tower), the processor and the ONNX tile encoder."""

    model: DeepseekVL2
    processor: Processor
    path: Path
    tile_encoder: Callable[[torch.Tensor], torch.Tensor]
    prefill_budget: int | None = None  # bytes of prefill activations the device profile leaves (None: no profile)
    info: dict = field(default_factory=dict)  # what runs it: backend, vision graph, providers, device profile


def choose_backend(requested: str | None, profile: DeviceProfile | None) -> str:
    """The decoder backend: the one asked for, else the profile's, else cuda when a GPU is visible, else cpu."""
    from ..quant.linear import available_backends

    name = requested or (profile.decoder_backend if profile else ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = available_backends()
    if name not in backends:
        raise UserError(f"unknown decoder backend {name!r}; choose one of {', '.join(backends)}")
    if not backends[name].available:
        why = f" (device profile {profile.name})" if profile and not requested else ""
        raise UserError(f"decoder backend {name}{why} cannot run here: {backends[name].detail}")
    return name


def choose_vision(bundle: Bundle, profile: DeviceProfile | None) -> VisionGraph:
    """The profile's vision precision when the bundle has it, else the bundle's first graph."""
    return (profile and bundle.manifest.graph(profile.vision_precision)) or bundle.vision_graph()


def fit_bytes(bundle: Bundle, profile: DeviceProfile | None) -> tuple[int, int]:
    """(weights, cache) bytes the device fit check counts for `bundle` on `profile`: the decoder files (every backend
    holds one copy: the cpu kernels read the memory-mapped tensors in place) plus the vision graph the profile picks,
    and a full-context cache. load_bundle, `inspect` and `bench` all count with this one function."""
    return bundle.decoder_bytes + bundle.graph_bytes(choose_vision(bundle, profile)), bundle.cache_bytes()


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
    """A stand-in for a weight that `swap_in_quantized_` replaces: its shape, dtype and device, 1 element of memory."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


def build_decoder(bundle: Bundle, backend: str, device: str, dtype: torch.dtype) -> DeepseekVL2:
    """The decoder side of the model (no vision tower) from the bundle's shards, quantized layers on `backend`."""
    from ..quant.swap import swap_in_quantized_

    with torch.device("meta"):
        model = DeepseekVL2(bundle.config, with_vision=False)
    tensors: dict[str, torch.Tensor] = {}
    for f in bundle.decoder_files:
        tensors.update(mmap_tensors(f))
    quantized = bundle.manifest.decoder.quantized
    try:
        weights = {prefix: load_quantized(prefix, tensors) for prefix in quantized}
    except ValueError as e:
        raise UserError(f"{bundle.path}: {e}") from None
    covered = {q.param for q in quantized.values()}
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
        swap_in_quantized_(model, weights, backend)
    except ValueError as e:
        raise UserError(f"{bundle.path}: {e}") from None
    return model.eval()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_bundle(path: str | Path, backend: str | None = None, device_profile: str | DeviceProfile | None = None,
                verify: bool = True, dtype: str = "bf16", log: Callable[[str], None] | None = _say) -> LoadedBundle:
    """The parts of a pipeline over the bundle at `path` (see the module docstring for the steps and what they refuse).

    `backend`: cpu | cuda | reference | bnb (default: from the profile, else cuda when available, else cpu).
    `device_profile`: a shipped profile name, a TOML path or a DeviceProfile; None skips the fit check.
    `dtype`: activations and high-precision tensors, bf16 (deployment) or fp32 (reference comparisons).
    """
    from .vision_ort import OrtVisionRunner

    checks.choice(dtype, "dtype", BUNDLE_DTYPES)
    if backend is not None:
        checks.text(backend, "backend")
    profile = as_profile(device_profile)
    bundle = open_bundle(path, verify=checks.boolean(verify, "verify"))
    m = bundle.manifest
    graph = choose_vision(bundle, profile)
    budget = None
    if profile is not None:
        weights, cache = fit_bytes(bundle, profile)
        check_fit(profile, weights, cache,
                  f"bundle {bundle.path.name} ({m.variant}, {m.recipe.get('name')})")
        budget = prefill_budget(profile, weights, cache)
    backend = choose_backend(backend, profile)
    device = "cuda" if backend == "cuda" or (backend == "bnb" and torch.cuda.is_available()) else "cpu"
    # embeddings stay where the decoder runs: on a GPU provider they are bound to CUDA memory (never the host)
    runner = OrtVisionRunner(bundle.path / graph.file, providers=choose_providers(profile), output_device=device)
    if runner.cpu_problem:  # before the decoder is read: a refusal costs nothing
        raise UserError(runner.cpu_problem)
    want = (bundle.config.projector.n_embed, bundle.config.vision.image_size)
    if (runner.hidden, runner.tile_shape[-1]) != want:
        raise UserError(f"{bundle.path / graph.file}: the graph maps {runner.tile_shape[-1]} px tiles to "
                        f"{runner.hidden} values, the bundle's config {want[1]} px to {want[0]}")
    kernels = ""
    if backend == "cpu":
        from ..quant.kernels import qkern
        from ..quant.linear import cpu_kernel_line

        qkern.set_threads(profile.cpu_threads if profile else None)
        kernels = cpu_kernel_line() + "; "
    model = build_decoder(bundle, backend, device, TORCH_DTYPES[dtype])
    processor = Processor.from_pretrained(bundle.path)
    capped = profile is not None and processor.max_tiles() > profile.max_tiles
    if capped:
        processor = processor.capped_at(profile.max_tiles)
    if log is not None:
        log(f"bundle {bundle.path.name}: {m.variant} {m.recipe.get('name')}"
            f"{' (hashes not verified)' if not verify else ''}; decoder backend {backend} on {device} "
            f"({kernels}{_layer_counts(model)}), vision {graph.precision} graph on {', '.join(runner.providers)}"
            f"{f'; at most {profile.max_tiles} tiles per image ({profile.name})' if capped else ''}")
    info = {"bundle": str(bundle.path), "variant": m.variant, "recipe": m.recipe.get("name"), "backend": backend,
            "vision": graph.file, "vision_precision": graph.precision, "providers": list(runner.providers),
            "device_profile": profile.name if profile else None, "max_tiles": processor.max_tiles()}
    return LoadedBundle(model, processor, bundle.path, runner.encode_tiles, budget, info)


def _layer_counts(model: DeepseekVL2) -> str:
    """For the one-time load line; `describe_quantized(model)` has each layer's kernel."""
    from ..quant.experts import QuantExperts
    from ..quant.swap import describe_quantized

    stacks = sum(isinstance(m, QuantExperts) for m in model.modules())
    n = sum(describe_quantized(model).values())
    return f"{n - stacks} quantized linear layers, {stacks} expert stacks"
