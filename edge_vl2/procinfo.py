"""Memory figures of this process and machine, and the CPU's feature flags, from Linux /proc (standard library only:
benchmarks import it before they set the environment torch reads)."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def proc_bytes(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a Linux /proc file, in bytes (None elsewhere)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the current program image; ru_maxrss would also count
    the parent's pages a fork-then-exec child briefly mapped (a small job launched from a big process would report
    the parent's size). Memory-mapped file pages (checkpoints, shards) count while mapped."""
    return proc_bytes("/proc/self/status", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory() -> int:
    """MemAvailable (what can be had now without swapping), else total RAM."""
    return proc_bytes("/proc/meminfo", "MemAvailable") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_flags() -> set[str]:
    """The kernel's list of this CPU's features (the hardware's, whatever CPUID is made to report); empty where
    /proc/cpuinfo has none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()
