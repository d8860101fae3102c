"""Timing hygiene for every benchmark command, in one place.

Under libgomp's default spin-then-sleep policy, small torch ops on a busy 2-core host sometimes stall a flat ~8 ms
waiting for a sleeping worker; a short spin count removes the stalls. libgomp reads the setting once, when torch is
first imported, so benchmarks call `set_timing_env()` before importing torch. An explicit user setting wins.
Standard library only.
"""

from __future__ import annotations

import os
import sys

TIMING_ENV = {"GOMP_SPINCOUNT": "100000"}  # or OMP_WAIT_POLICY=PASSIVE


def set_timing_env() -> str:
    """Apply TIMING_ENV unless the user set an OpenMP wait policy; say what is set and whether it can take effect."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.update(TIMING_ENV)
    applied = ", ".join(f"{k}={os.environ[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ)
    if "torch" in sys.modules:  # libgomp read its settings when torch loaded
        return f"{applied} set after torch was imported: not in effect"
    return applied


def timing_env() -> dict[str, str]:
    """The environment for a benchmark child process: ours, with TIMING_ENV unless the user chose a policy."""
    env = dict(os.environ)
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env.update(TIMING_ENV)
    return env
