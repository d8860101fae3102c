"""Which x86 vector ISA a benchmark runs on, and running one as on an AVX2-only kiosk CPU.

A kiosk PC has AVX2 and no AVX-512, VNNI or AMX; a build or test machine often has them, and ONNX Runtime (MLAS),
oneDNN, FBGEMM and PyTorch pick their kernels from CPUID: on a Sapphire Rapids Xeon an INT8 GEMM runs ~5x faster
than on its AVX2 path (edge_vl2 README, Measured). Only some libraries can be told to stay at AVX2 (PyTorch:
ATEN_CPU_CAPABILITY, oneDNN: ONEDNN_MAX_CPU_ISA); MLAS honours no setting. So `capped_env("avx2")` preloads a small
library (cpuid_cap.c, compiled here with the system C compiler on first use) that makes CPUID report no feature
above AVX2 in the child process, on Linux CPUs with the `cpuid_fault` flag, and sets the two variables as well
(and EDGE_VL2_CPU_ISA=avx2, which caps edge-vl2's own CPU kernels).

    env = capped_env("avx2")                     # for subprocess.run(..., env=env)
    isa_report()                                 # {"cpu_flags": "avx512f,amx_int8,...", "torch": "AVX512", ...}

Standard library only at import time (callers set the environment before torch is imported).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import UserError
from ..procinfo import cpu_flags

ISAS = ("native", "avx2")
SOURCE = Path(__file__).with_name("cpuid_cap.c")
MARKER = "EDGE_VL2_CPUID_CAP"  # set in the child so it can say what it runs on
# the runtime's own cap for its CPU kernels (qkern: scalar | avx2 | avx-vnni): the AVX2 child sets it to avx2 too
KERNEL_ISA = "EDGE_VL2_CPU_ISA"
# Flags that change which kernels the libraries above choose, reported as they are (capped or not).
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                  "amx_int8", "amx_bf16")


def _library() -> Path:
    """The compiled cap, cached per source version under ~/.cache/edge-vl2 (or $XDG_CACHE_HOME)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-vl2"
    lib = cache / f"cpuid_cap-{digest}.so"
    if lib.is_file():
        return lib
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        raise UserError("capping the CPU ISA needs a C compiler (cc, gcc or clang) to build cpuid_cap.c")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"building {SOURCE.name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(tmp, lib)  # atomic: concurrent builders each write their own tmp
    return lib


def capped_env(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that runs on `isa` ("native": unchanged; "avx2": as described above).
    UserError where this machine cannot do it (not x86-64 Linux with cpuid_fault, no C compiler)."""
    env = dict(os.environ if base is None else base)
    if isa not in ISAS:
        raise UserError(f"unknown CPU ISA {isa!r}; choose one of {', '.join(ISAS)}")
    env[MARKER] = isa
    if isa == "native":
        return env
    flags = cpu_flags()
    if "avx2" not in flags:
        raise UserError("this CPU has no AVX2: it cannot run the AVX2 path at all")
    if "cpuid_fault" not in flags:
        raise UserError("this CPU/kernel cannot trap CPUID (no cpuid_fault flag): the AVX2 path cannot be forced "
                        "here; report figures as this CPU's")
    preload = " ".join(p for p in (str(_library()), env.get("LD_PRELOAD", "")) if p)
    env.update(LD_PRELOAD=preload, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", **{KERNEL_ISA: "avx2"})
    return env


def cap_active() -> bool:
    """Whether this process runs under the CPUID cap (the preloaded library says so)."""
    try:
        return bool(ctypes.CDLL(None).edge_vl2_cpuid_cap_active())
    except (AttributeError, OSError):
        return False


def isa_report() -> dict:
    """What this process computes on: the requested ISA, whether the cap is active, the CPU's flags and the
    capability PyTorch dispatches to (import torch first)."""
    import sys

    flags = cpu_flags()
    report = {"requested": os.environ.get(MARKER, "native"), "cpuid_capped": cap_active(),
              "cpu_flags": ",".join(f for f in REPORTED_FLAGS if f in flags)}
    if "torch" in sys.modules:
        report["torch"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    return report


def describe(report: dict) -> str:
    """One line: 'AVX2 path forced (CPUID capped; CPU has avx512f,...)' or 'this CPU (avx2,...,amx_int8)'."""
    torch_isa = f", torch {report['torch']}" if "torch" in report else ""
    if report["cpuid_capped"]:
        return f"AVX2 path forced (CPUID capped{torch_isa}; the CPU has {report['cpu_flags']})"
    return f"this CPU's own ISA ({report['cpu_flags']}{torch_isa})"
