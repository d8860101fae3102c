"""Device profiles (devices/*.toml, shipped as package data): memory budget, bandwidth, backends, tile limit, cpu
kernel threads (optional).

`check_fit` refuses, before anything is loaded, a model or bundle that cannot fit the device's memory budget.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources

from edge_vl2 import checks
from edge_vl2.checks import Fields
from edge_vl2.errors import UserError, one_line

OPTIONAL = ("cpu_threads",)  # absent: EDGE_VL2_CPU_THREADS, else one thread
MAX_THREADS = 1024
REQUIRED = ("name", "description", "memory_budget_gb", "bandwidth_gbs", "compute_capability", "ort_providers",
            "decoder_backend", "vision_precision", "max_tiles")
# Working memory beyond weights and cache: activations of a 4k prefill chunk, ORT arena, CUDA context, allocator
# slack. A flat allowance keeps the check simple and errs on the side of refusing.
RUNTIME_OVERHEAD_GB = 0.8
# A prefill chunk's activations may take half of what the budget leaves beside weights and a full-context cache (the
# other half: ORT's arena, the CUDA context, allocator slack), at least half the flat allowance, at most 4 GB (past
# ~4k-token chunks nothing is gained).
PREFILL_SHARE, PREFILL_MAX_GB = 0.5, 4.0
# Sanity limits: no device edge-vl2 targets has more than a few hundred GB, and a tile cap past the processor's
# largest grid (64 tiles + the global view, edge_vl2.inputs.processor) means nothing.
MAX_GB, MAX_GRID = 1e4, 64


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_budget_gb: float
    bandwidth_gbs: float
    compute_capability: str
    ort_providers: tuple[str, ...]
    decoder_backend: str
    vision_precision: str
    max_tiles: int
    cpu_threads: int | None = None  # threads of the cpu decoder kernels (qkern); None: EDGE_VL2_CPU_THREADS, else 1

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "DeviceProfile":
        """Every field typed and in range, unknown keys refused (a misspelt key would silently fall back)."""
        f = Fields(d, source)
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise UserError(f"{source}: device profile lacks {missing[0]!r}")
        unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise UserError(f"{source}: unknown device profile key {unknown[0]!r}; the keys are "
                            f"{', '.join(REQUIRED + OPTIONAL)}")
        providers = f.raw("ort_providers")
        if not isinstance(providers, list) or not providers or not all(isinstance(p, str) and p for p in providers):
            raise UserError(f"{f.name('ort_providers')} must be a non-empty list of provider names, got "
                            f"{checks.show(providers)}")
        capability = f.str("compute_capability")
        if capability and not re.fullmatch(r"\d+\.\d+", capability):
            raise UserError(f"{f.name('compute_capability')} must be \"\" (no GPU) or like \"8.7\", got {capability!r}")
        return cls(name=f.str("name", nonempty=True), description=f.str("description"),
                   memory_budget_gb=f.float("memory_budget_gb", 0, MAX_GB, lo_open=True),
                   bandwidth_gbs=f.float("bandwidth_gbs", 0, 1e5, lo_open=True), compute_capability=capability,
                   ort_providers=tuple(providers), decoder_backend=f.str("decoder_backend", options=("cpu", "cuda")),
                   vision_precision=f.str("vision_precision", options=("fp32", "fp16", "int8")),
                   max_tiles=f.int("max_tiles", 2, 1 + MAX_GRID),
                   cpu_threads=f.int("cpu_threads", 1, MAX_THREADS) if "cpu_threads" in d else None)

    def decode_roofline_tok_s(self, bytes_per_token: float) -> float:
        """Upper bound on decode speed: bandwidth / bytes read per generated token."""
        return self.bandwidth_gbs * 1e9 / bytes_per_token


def _profile_dir():
    return resources.files("edge_vl2.devices")


def available_devices() -> list[str]:
    return sorted(p.name[:-5] for p in _profile_dir().iterdir() if p.name.endswith(".toml"))


def load_device(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (e.g. `orin-nx-16gb`) or a path to a TOML file of the same form."""
    checks.text(name_or_path, "device profile", nonempty=True)
    if name_or_path.endswith(".toml"):
        text, source = checks.read_text(name_or_path, "device profile", 1 << 20), name_or_path
    else:
        if name_or_path not in available_devices():
            raise UserError(f"unknown device {name_or_path!r}; known: {', '.join(available_devices())} "
                            "(or a path to a .toml file)")
        text, source = (_profile_dir() / f"{name_or_path}.toml").read_text(), f"{name_or_path}.toml"
    try:
        return DeviceProfile.from_dict(tomllib.loads(text), source)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML ({one_line(e)})") from None


def as_profile(value) -> DeviceProfile | None:
    """What an API caller may pass as a device profile: None, a DeviceProfile, a shipped name or a .toml path."""
    if value is None or isinstance(value, DeviceProfile):
        return value
    return load_device(value)


def check_fit(device: DeviceProfile, weight_bytes: int, cache_bytes: int, what: str) -> float:
    """Refuse (UserError) when weights + a full-context cache + overhead exceed the budget; returns GB needed."""
    need_gb = (weight_bytes + cache_bytes) / 1e9 + RUNTIME_OVERHEAD_GB
    if need_gb > device.memory_budget_gb:
        raise UserError(f"{what} needs about {need_gb:.1f} GB ({weight_bytes / 1e9:.2f} GB weights, "
                        f"{cache_bytes / 1e9:.2f} GB cache at full context, {RUNTIME_OVERHEAD_GB} GB working memory); "
                        f"{device.name} has a budget of {device.memory_budget_gb:.1f} GB")
    return need_gb


def prefill_budget(device: DeviceProfile, weight_bytes: int, cache_bytes: int) -> int:
    """Bytes a prefill chunk's activations may take on `device` beside the weights and a full-context cache
    (edge_vl2.generate.prefill_chunk_tokens turns it into a chunk length)."""
    left = device.memory_budget_gb * 1e9 - weight_bytes - cache_bytes
    return int(min(PREFILL_MAX_GB * 1e9, max(PREFILL_SHARE * RUNTIME_OVERHEAD_GB * 1e9, PREFILL_SHARE * left)))
