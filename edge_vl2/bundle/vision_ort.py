"""The vision tower + projector as an ONNX Runtime session: tiles [N, 3, 384, 384] -> embeddings [N, 196, H].

The graph is the one `edge_vl2.export.vision_onnx` writes: input `pixels` (float32 at the boundary whatever the
graph's precision), output `tile_embeds`, dynamic tile axis. Only `onnxruntime`, numpy and torch are imported here:
the device never needs the onnx package. A runner is a pipeline tile encoder:

    runner = OrtVisionRunner("bundle/vision-int8.onnx")
    print(runner.describe())                        # the providers ONNX Runtime really uses, precision, threads
    vl2 = VL2Pipeline(model, processor, model_dir, tile_encoder=runner)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, one_line
from ..procinfo import cpu_flags

try:
    import onnxruntime as ort
except ImportError:  # a device install without the [cpu] / [gpu] extra
    ort = None

INPUT, OUTPUT = "pixels", "tile_embeds"
TILE = 384
META_PREFIX = "edge_vl2."
# Fastest first; CPU always works. TensorRT and CUDA appear only in onnxruntime-gpu builds.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))  # what this process may use, not what the machine has
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


# CPUs where ONNX Runtime's u8s8 kernels (QInt8 weights) add products in 32 bits instead of saturating 16-bit pairs
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings counted once): ONNX Runtime's int8 and fp32 GEMMs keep
    a core's vector units busy, so a second thread per core adds contention, not speed. Falls back to the logical
    count where the topology is not readable."""
    cpus = _allowed_cpus()
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Execution providers in preference order: the requested ones (each must be installed), else every installed
    one of TensorRT, CUDA, CPU."""
    if ort is None:
        raise UserError("onnxruntime is not installed: install edge-vl2[cpu] or edge-vl2[gpu] (exactly one)")
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in PROVIDER_ORDER if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise UserError(f"ONNX Runtime provider(s) {missing} not installed; this onnxruntime has {available}")
    return list(requested)


class OrtVisionRunner:
    """One ONNX Runtime session over a vision graph.

    `providers`: None picks TensorRT, CUDA, CPU in that order among those installed (ONNX Runtime may still drop a
    GPU provider whose libraries or device are missing: `.providers` says what the session really uses). An explicit
    list must be honoured: if its first provider does not start, that is an error, not a silent CPU run.
    `threads`: intra-op threads (default: one per physical core).
    `batch`: tiles per run, bounding activation memory (and the TensorRT profile's largest batch).
    `trt_cache_dir`: where TensorRT keeps built engines between runs (building one takes minutes on a Jetson).
    `output_device`: where `encode_tiles` returns the embeddings (the decoder's device). `io_binding`: bind inputs
    and outputs to torch memory (default: when a GPU provider runs the session and the output is on CUDA, so the
    embeddings never visit the host; forced on CPU by tests to check the same path).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 batch: int = 4, trt_cache_dir: str | Path | None = None,
                 output_device: str | torch.device = "cpu", io_binding: bool | None = None):
        self.path = Path(path)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch = batch
        self.output_device = torch.device(output_device)
        chosen = choose_providers(providers)
        if not self.path.is_file():
            raise UserError(f"{self.path}: vision ONNX file not found")
        opts = ort.SessionOptions()
        self.threads = threads or physical_cores()
        opts.intra_op_num_threads = self.threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=[(p, self._provider_options(p, trt_cache_dir))
                                                           for p in chosen])
        except Exception as e:  # ORT raises its own classes (InvalidProtobuf, Fail, ...) for a bad or truncated file
            raise UserError(f"{self.path}: not a loadable ONNX vision graph ({one_line(e)})") from None
        self.providers: list[str] = self.session.get_providers()
        if providers is not None and chosen[0] not in self.providers:
            raise UserError(f"{self.path}: ONNX Runtime could not start {chosen[0]} (session runs on "
                            f"{self.providers}); check the GPU driver / CUDA / TensorRT libraries")
        self._check_signature()
        self.metadata = {k[len(META_PREFIX):]: v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                         if k.startswith(META_PREFIX)}
        on_gpu = self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        if io_binding is None:  # by default only where it saves a copy: GPU provider, embeddings wanted on the GPU
            io_binding = on_gpu and self.output_device.type == "cuda"
        if io_binding and self.output_device.type == "cuda" and not on_gpu:
            raise UserError(f"{self.path}: embeddings on {self.output_device} need a GPU provider; the session runs "
                            f"on {self.providers}")
        self.io_binding = io_binding

    def _provider_options(self, provider: str, trt_cache_dir) -> dict:
        if provider != "TensorrtExecutionProvider":
            return {}
        # The profile is needed before the session exists, so it uses the fixed DeepSeek-VL2 tile (model-facts §3).
        lo, hi = (f"{INPUT}:{n}x3x{TILE}x{TILE}" for n in (1, self.batch))
        opts = {"trt_profile_min_shapes": lo, "trt_profile_opt_shapes": hi,
                "trt_profile_max_shapes": hi}  # one engine for every chunk size we send
        if trt_cache_dir is not None:
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(trt_cache_dir))
        return opts

    def _check_signature(self) -> None:
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in ins] != [INPUT] or OUTPUT not in [o.name for o in outs]:
            raise UserError(f"{self.path}: expected input {INPUT!r} and output {OUTPUT!r}, the graph has inputs "
                            f"{[i.name for i in ins]} and outputs {[o.name for o in outs]}")
        shape, out_shape = ins[0].shape, next(o.shape for o in outs if o.name == OUTPUT)
        if ins[0].type != "tensor(float)" or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            raise UserError(f"{self.path}: input {INPUT!r} must be float32 [N, 3, S, S], got {ins[0].type} {shape}")
        if len(out_shape) != 3 or not all(isinstance(d, int) for d in out_shape[1:]):
            raise UserError(f"{self.path}: output {OUTPUT!r} must be [N, tokens, hidden], got {out_shape}")
        self.tile_shape: tuple[int, int, int] = tuple(shape[1:])  # (3, S, S)
        self.tokens, self.hidden = out_shape[1], out_shape[2]

    @property
    def cpu_problem(self) -> str | None:
        """Why this graph's outputs cannot be trusted on this CPU, or None (x86 int8 graphs only): the loader refuses
        the bundle with this message."""
        flags = cpu_flags()
        if "QInt8" in self.metadata.get("quantization", "") and "avx2" in flags and not flags & VNNI_FLAGS:
            return (f"{self.path.name} has QInt8 weights (vision recipe fused-vnni) and this CPU has no VNNI / AMX: "
                    "ONNX Runtime's u8s8 kernels saturate here (worst-tile cosine 0.93 measured); export the bundle "
                    "with --vision-recipe fused for this device")
        return None

    @property
    def precision(self) -> str | None:
        """fp32 / fp16 / int8 as recorded at export (None for a graph written by something else)."""
        return self.metadata.get("precision")

    def encode_tiles(self, pixel_values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tiles [N, 3, S, S] -> embeddings [N, tokens, hidden] float32 on `output_device`, `batch` tiles
        a run. With IO binding ONNX Runtime writes straight into the returned tensor (on a GPU provider: device
        memory, never the host); `out` (that shape, float32, on `output_device`) is written instead of a new one."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != self.tile_shape:
            raise UserError(f"{self.path}: the graph takes tiles [N, {', '.join(map(str, self.tile_shape))}], got "
                            f"{list(pixel_values.shape)}; the bundle's vision graph and processor disagree")
        shape = (pixel_values.shape[0], self.tokens, self.hidden)  # [N, 196, H]
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=self.output_device)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != self.output_device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 {list(shape)} tensor on {self.output_device}")
        for start in range(0, shape[0], self.batch):
            chunk, dst = pixel_values[start:start + self.batch], out[start:start + self.batch]
            if self.io_binding:
                self._run_bound(chunk, dst)
            else:
                pixels = np.ascontiguousarray(chunk.detach().to(device="cpu", dtype=torch.float32).numpy())
                dst.copy_(torch.from_numpy(self.session.run([OUTPUT], {INPUT: pixels})[0]))
        return out

    def _run_bound(self, pixels: torch.Tensor, dst: torch.Tensor) -> None:
        """One run with input and output bound to torch memory on `dst`'s device (no staging copies)."""
        x = pixels.detach().to(device=dst.device, dtype=torch.float32).contiguous()
        kind, index = dst.device.type, dst.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(INPUT, kind, index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT, kind, index, np.float32, list(dst.shape), dst.data_ptr())
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    __call__ = encode_tiles  # the pipeline's `tile_encoder` signature: tiles [N, 3, S, S] -> [N, tokens, hidden]

    def describe(self) -> str:
        """One line naming what runs the vision graph, for logs and `--stats` output."""
        bound = f", IO-bound to {self.output_device}" if self.io_binding else ""
        return (f"vision: {self.path.name} ({self.precision or 'unknown'} graph) on ONNX Runtime {ort.__version__}, "
                f"providers {', '.join(self.providers)}, {self.threads} threads{bound}")

    def __repr__(self) -> str:
        return f"OrtVisionRunner({str(self.path)!r}, providers={self.providers}, precision={self.precision})"
