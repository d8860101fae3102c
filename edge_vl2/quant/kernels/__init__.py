"""Optional compute kernels for the quantized layers (Triton). Nothing here is imported until a backend asks for it.

`triton_status()` says whether the Triton kernels can run in this process and, if not, why: they need `triton` and
either a CUDA device or TRITON_INTERPRET=1 (Triton's interpreter, which runs the same kernels on CPU tensors; that is
how the tests check them on machines without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import sys


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run through Triton's Python interpreter (CPU tensors, slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status() -> tuple[bool, str]:
    """(usable, reason): whether the Triton quantized-matmul kernels can run here."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if triton_interpreting():
        if _imported_before_interpret_was_set():
            return False, ("TRITON_INTERPRET=1 was set after triton was imported; set it before Python starts "
                           "(triton.language's own helpers were built for compilation, not the interpreter)")
        return True, "triton interpreter (TRITON_INTERPRET=1, CPU tensors)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    return True, f"triton on {torch.cuda.get_device_name()}"


def _imported_before_interpret_was_set() -> bool:
    """triton.language's jit helpers (tl.sum, tl.zeros) are compiled-mode functions when triton was imported before
    TRITON_INTERPRET=1; interpreted kernels calling them fail with "Cannot call @triton.jit'd outside of a kernel"."""
    if "triton.language" not in sys.modules:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(sys.modules["triton.language"].sum, JITFunction)
