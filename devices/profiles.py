"""Device profiles (devices/*.toml, shipped as package data): memory budget, bandwidth, backends, tile limit, cpu
kernel threads (optional).

`check_fit` refuses, before anything is loaded, a model or bundle that cannot fit the device's memory budget.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge_vl2.errors import UserError

REQUIRED = ("name", "description", "memory_budget_gb", "bandwidth_gbs", "compute_capability", "ort_providers",
            "decoder_backend", "vision_precision", "max_tiles")
# Working memory beyond weights and cache: activations of a 4k prefill chunk, ORT arena, CUDA context, allocator
# slack. A flat allowance keeps the check simple and errs on the side of refusing.
RUNTIME_OVERHEAD_GB = 0.8


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
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise UserError(f"{source}: device profile lacks {missing[0]!r}")
        if d["decoder_backend"] not in ("cpu", "cuda") or d["vision_precision"] not in ("fp32", "fp16", "int8"):
            raise UserError(f"{source}: decoder_backend must be cpu|cuda and vision_precision fp32|fp16|int8")
        return cls(name=str(d["name"]), description=str(d["description"]),
                   memory_budget_gb=float(d["memory_budget_gb"]), bandwidth_gbs=float(d["bandwidth_gbs"]),
                   compute_capability=str(d["compute_capability"]), ort_providers=tuple(d["ort_providers"]),
                   decoder_backend=d["decoder_backend"], vision_precision=d["vision_precision"],
                   max_tiles=int(d["max_tiles"]), cpu_threads=_positive_or_none(d.get("cpu_threads"), source))

    def decode_roofline_tok_s(self, bytes_per_token: float) -> float:
        """Upper bound on decode speed: bandwidth / bytes read per generated token."""
        return self.bandwidth_gbs * 1e9 / bytes_per_token


def _positive_or_none(value, source: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or value < 1:
        raise UserError(f"{source}: cpu_threads must be a positive integer, got {value!r}")
    return value


def _profile_dir():
    return resources.files("edge_vl2.devices")


def available_devices() -> list[str]:
    return sorted(p.name[:-5] for p in _profile_dir().iterdir() if p.name.endswith(".toml"))


def load_device(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (e.g. `orin-nx-16gb`) or a path to a TOML file of the same form."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text, source = path.read_text(), str(path)
    else:
        entry = _profile_dir() / f"{name_or_path}.toml"
        if not entry.is_file():
            raise UserError(f"unknown device {name_or_path!r}; known: {', '.join(available_devices())}")
        text, source = entry.read_text(), f"{name_or_path}.toml"
    try:
        return DeviceProfile.from_dict(tomllib.loads(text), source)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML ({e})") from None


def check_fit(device: DeviceProfile, weight_bytes: int, cache_bytes: int, what: str) -> float:
    """Refuse (UserError) when weights + a full-context cache + overhead exceed the budget; returns GB needed."""
    need_gb = (weight_bytes + cache_bytes) / 1e9 + RUNTIME_OVERHEAD_GB
    if need_gb > device.memory_budget_gb:
        raise UserError(f"{what} needs about {need_gb:.1f} GB ({weight_bytes / 1e9:.2f} GB weights, "
                        f"{cache_bytes / 1e9:.2f} GB cache at full context, {RUNTIME_OVERHEAD_GB} GB working memory); "
                        f"{device.name} has a budget of {device.memory_budget_gb:.1f} GB")
    return need_gb
