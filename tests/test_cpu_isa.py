"""edge_vl2.tools.cpu_isa: a child process started with `capped_env("avx2")` sees an AVX2-only CPU (PyTorch's
dispatcher reports AVX2, the preloaded CPUID cap says it is active) and computes the same numbers; requests this
machine cannot honour are one-line errors. Skipped where the CPU has nothing above AVX2 to hide, cannot trap CPUID
or no C compiler exists (the cap is a benchmark aid, never part of a device install)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edge_vl2.errors import UserError
from edge_vl2.procinfo import cpu_flags
from edge_vl2.tools.cpu_isa import capped_env, isa_report

FLAGS = cpu_flags()
CAN_CAP = {"avx2", "avx512f", "cpuid_fault"} <= FLAGS and any(shutil.which(c) for c in ("cc", "gcc", "clang"))

CHILD = """
import json, torch
from edge_vl2.tools.cpu_isa import isa_report
torch.manual_seed(0)
a, b = torch.randn(64, 96), torch.randn(96, 32)
print(json.dumps({**isa_report(), "sum": float((a @ b).double().sum())}))
"""


def child(env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not CAN_CAP, reason="needs AVX-512 to hide, the cpuid_fault flag and a C compiler")
def test_capped_child_sees_avx2_only():
    native, capped = child(capped_env("native")), child(capped_env("avx2"))
    assert not native["cpuid_capped"] and native["torch"] != "AVX2" and native["requested"] == "native"
    assert capped["cpuid_capped"] and capped["torch"] == "AVX2" and capped["requested"] == "avx2"
    assert capped["sum"] == pytest.approx(native["sum"], rel=1e-5)  # fp32 GEMMs on either path, other sum orders
    assert "avx512f" in capped["cpu_flags"]  # /proc/cpuinfo still shows the hardware: reports name both
    assert capped_env("avx2")["EDGE_VL2_CPU_ISA"] == "avx2"  # the runtime's own kernels are capped alike


def test_bad_requests_are_one_line_errors():
    with pytest.raises(UserError, match="unknown CPU ISA 'sse2'"):
        capped_env("sse2")
    assert isa_report()["cpuid_capped"] is False  # this test process runs uncapped
