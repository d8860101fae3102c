"""qkern: our C kernels for few-row (decode) products over the canonical INT4 / INT8 tensors, read in place.

The library (`qkern.c` next to this file) is built by the normal install as the extension `_qkern` (plain gcc through
setuptools, no Python or torch headers) and loaded here with ctypes. If it was not built or cannot load, `status()`
says why and the cpu backend keeps PyTorch's packed ops (edge_vl2.quant.linear.make_op).

    from edge_vl2.quant.kernels import qkern
    ok, why = qkern.status()
    m = qkern.QMat.of(w)                    # w: Int4Weight / Int8Weight [N, K] or stacked [E, N, K]; no copy
    y = qkern.linear(m, x, expert=None)     # x [M, K] bf16 / fp32 -> fp32 [M, N]
    y = qkern.linear_many([mq, mk, mv], x)  # one input, several weights: fp32 [M, Nq + Nk + Nv]

Process-wide settings, read once (like torch.set_num_threads):
- EDGE_VL2_CPU_ISA = scalar | avx2 | avx-vnni caps the instruction set (default: the best this CPU has). Kiosk PCs
  are AVX2; the AVX-VNNI tier (Alder Lake and later, Zen 5) only speeds up INT4 dot products.
- threads: `set_threads(n)` (the loader passes the device profile's `cpu_threads`), else EDGE_VL2_CPU_THREADS,
  else 1 (on the 2-core build machine a second OpenMP thread made every kernel slower under load).
Import torch before this module: the library then binds to torch's libgomp (one OpenMP runtime per process).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import torch

ISAS = ("scalar", "avx2", "avx-vnni")  # tier 0, 1, 2 of qkern.c
ISA_ENV, THREADS_ENV = "EDGE_VL2_CPU_ISA", "EDGE_VL2_CPU_THREADS"
_HERE = Path(__file__).resolve().parent


class QMat(ctypes.Structure):
    """qk_mat of qkern.c: one weight or expert stack, pointers into the canonical tensors (kept alive here)."""

    _fields_ = [("bits", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("g", ctypes.c_int32),
                ("has_zp", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("qw", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("zp", ctypes.c_void_p),
                ("qw_es", ctypes.c_int64), ("sc_es", ctypes.c_int64), ("zp_es", ctypes.c_int64)]

    @classmethod
    def of(cls, w) -> "QMat":
        """The descriptor of an Int4Weight / Int8Weight; its tensors must be contiguous CPU tensors."""
        q, s, z = w.qweight, w.scales, w.zeros
        for t in (q, s) + (() if z is None else (z,)):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("qkern reads contiguous CPU tensors")
        stacked = len(w.shape) == 3
        n, k = w.shape[-2], w.shape[-1]
        per = (lambda t: t[0].numel() if stacked else 0)
        m = cls(w.bits, n, k, w.group_size or 0, int(z is not None), 0, q.data_ptr(), s.data_ptr(),
                0 if z is None else z.data_ptr(), per(q), per(s), 0 if z is None else per(z))
        m.keep = (q, s, z)
        return m


def supported(w) -> bool:
    """Whether qkern takes this weight: K a multiple of 32; INT4 groups of 32k; INT8 per channel or groups of 32k."""
    k, g = w.shape[-1], w.group_size
    if k % 32:
        return False
    if w.bits == 4:
        return g % 32 == 0 and k % g == 0
    return g is None or (g % 32 == 0 and k % g == 0)


def _library_file() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (_HERE / f"_qkern{suffix}").is_file():
            return _HERE / f"_qkern{suffix}"
    return None


def _bind(lib: ctypes.CDLL) -> None:
    P, i, vp = ctypes.POINTER(QMat), ctypes.c_int, ctypes.c_void_p
    lib.qk_linear.argtypes = [P, i, vp, i, i, vp, i, i]
    lib.qk_linear_many.argtypes = [ctypes.POINTER(P), i, i, vp, i, i, vp, i, i]
    lib.qk_moe.argtypes = [P, P, P, P, P, P, vp, i, i, vp, vp, i, vp, i, i]
    lib.qk_dequant.argtypes = [P, i, ctypes.c_int64, ctypes.c_int64, vp, i]
    lib.qk_read.argtypes = [vp, ctypes.c_int64, i]
    lib.qk_read.restype = ctypes.c_uint64
    lib.qk_set_isa.argtypes = [i]


class _State:
    lib: ctypes.CDLL | None = None
    why = ""
    loaded = False
    threads: int | None = None


def _load() -> None:
    _State.loaded = True
    path = _library_file()
    if path is None:
        _State.why = f"the qkern extension was not built (no _qkern library in {_HERE}; reinstall with a C compiler)"
        return
    try:
        lib = ctypes.CDLL(str(path))
        _bind(lib)
    except (OSError, AttributeError) as e:
        _State.why = f"cannot load {path.name}: {e}"
        return
    if lib.qk_abi() != ctypes.sizeof(QMat) * 100 + 2:
        _State.why = f"{path.name} is from another version of qkern.c (rebuild: pip install -e .)"
        return
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if want and want not in ISAS:
        _State.why = f"{ISA_ENV}={want!r}: expected one of {', '.join(ISAS)}"
        return
    lib.qk_set_isa(ISAS.index(want) if want else lib.qk_best_isa())
    _State.lib = lib


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (see `status`)."""
    if not _State.loaded:
        _load()
    return _State.lib


def status() -> tuple[bool, str]:
    """(usable, what): the ISA tier in force and the threads, or why the library is not usable."""
    lib = library()
    if lib is None:
        return False, _State.why
    best = ISAS[lib.qk_best_isa()]
    capped = "" if isa() == best else f", capped by {ISA_ENV} (CPU has {best})"
    return True, f"qkern {isa()}{capped}, {threads()} thread(s)"


def isa() -> str:
    """The instruction-set tier in force: scalar, avx2 or avx-vnni."""
    return ISAS[library().qk_isa()]


def set_isa(name: str) -> str:
    """Cap the tier (tests run each); returns the tier in force, which never exceeds the CPU's."""
    return ISAS[library().qk_set_isa(ISAS.index(name))]


def best_isa() -> str:
    return ISAS[library().qk_best_isa()]


def threads() -> int:
    """OpenMP threads per call: set_threads(), else EDGE_VL2_CPU_THREADS, else 1."""
    if _State.threads is None:
        raw = os.environ.get(THREADS_ENV, "1")
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
        _State.threads = int(raw)
    return _State.threads


def set_threads(n: int | None) -> None:
    """Threads for every later call (None: back to EDGE_VL2_CPU_THREADS / 1). An explicit environment value wins."""
    _State.threads = None if n is None or THREADS_ENV in os.environ else max(1, int(n))


def _activations(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as the C code reads it: contiguous bf16 (flag 1) or fp32 (flag 0)."""
    if x.dtype == torch.bfloat16:
        return x.contiguous(), 1
    return x.float().contiguous(), 0


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed with code {rc} (-1 format, -2 memory, -3 shapes)")


def linear(m: QMat, x: torch.Tensor, expert: int | None = None, mode: int = 0) -> torch.Tensor:
    """x [M, K] @ W[expert]^T -> fp32 [M, N]. mode 0: int8 activations per 32 (the decode path); 1: fp32."""
    xc, bf = _activations(x)
    y = torch.empty(xc.shape[0], m.n, dtype=torch.float32)
    _check(library().qk_linear(ctypes.byref(m), expert or 0, xc.data_ptr(), bf, xc.shape[0], y.data_ptr(),
                               threads(), mode), "qk_linear")
    return y


def linear_many(mats: list[QMat], x: torch.Tensor, expert: int | None = None, mode: int = 0) -> torch.Tensor:
    """x [M, K] @ [W1; ...; Wn][expert]^T -> fp32 [M, N1 + ... + Nn] in one call, x prepared once (weights of one
    input, such as a layer's q, k and v projections; they must share K and format family)."""
    xc, bf = _activations(x)
    y = torch.empty(xc.shape[0], sum(m.n for m in mats), dtype=torch.float32)
    ptrs = (ctypes.POINTER(QMat) * len(mats))(*(ctypes.pointer(m) for m in mats))
    _check(library().qk_linear_many(ptrs, len(mats), expert or 0, xc.data_ptr(), bf, xc.shape[0], y.data_ptr(),
                                    threads(), mode), "qk_linear_many")
    return y


def dequant(m: QMat, expert: int | None, begin: int, end: int) -> torch.Tensor:
    """Rows begin..end-1 of W[expert], dequantized: fp32 [end - begin, K] (the prefill path's GEMM operand)."""
    out = torch.empty(end - begin, m.k, dtype=torch.float32)
    _check(library().qk_dequant(ctypes.byref(m), expert or 0, begin, end - begin, out.data_ptr(), threads()),
           "qk_dequant")
    return out


def moe(gate: QMat, up: QMat | None, down: QMat, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
        shared: tuple[QMat, QMat | None, QMat] | None = None, mode: int = 0) -> torch.Tensor:
    """One MoE step: x [T, H], ids [T, k], weights fp32 [T, k] -> fp32 [T, H] = sum_j w_j expert_j(x) (+ shared(x)).

    Routed gate/up [E, I, H] (or gate alone [E, 2I, H] with up None), down [E, H, I]; shared (gate, up, down) the
    same for one expert."""
    xc, bf = _activations(x)
    ids = ids.to(torch.int64).contiguous()
    w = weights.float().contiguous()
    y = torch.empty(xc.shape[0], down.n, dtype=torch.float32)
    ref = (lambda m: None if m is None else ctypes.byref(m))
    sg, su, sd = shared if shared is not None else (None, None, None)
    _check(library().qk_moe(ctypes.byref(gate), ref(up), ctypes.byref(down), ref(sg), ref(su), ref(sd),
                            xc.data_ptr(), bf, xc.shape[0], ids.data_ptr(), w.data_ptr(), ids.shape[1], y.data_ptr(),
                            threads(), mode), "qk_moe")
    return y


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, n_threads: int = 1) -> list[float]:
    """GB/s of `repeats` streaming reads of an nbytes buffer (the roofline the bench compares decode against)."""
    import time

    buf = torch.ones(nbytes, dtype=torch.uint8)
    lib = library()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.qk_read(buf.data_ptr(), nbytes, n_threads)
        out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return out
