"""Test-size checkpoints and bundles shared by tests/test_export.py and tests/test_bundle.py, made once per session.

An export costs ~30-45 s on the 2-core box (mostly torch.export of the vision tower), so each kind is made once
and reused read-only; a test that damages a bundle works on a copy (`copy_bundle`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

_cache: dict[str, object] = {}


def cli(*args, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_vl2.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def checkpoint(tmp_path_factory, variant: str) -> Path:
    """A synthetic test-size checkpoint in the official layout (real vocabulary, tiny dimensions)."""
    key = f"ckpt-{variant}"
    if key not in _cache:
        from edge_vl2.tools.synth import write_checkpoint

        _cache[key] = write_checkpoint(tmp_path_factory.mktemp("ckpt") / variant, variant, "test")
    return _cache[key]


def tiny_rtn_bundle(tmp_path_factory) -> Path:
    """Tiny, int4 preset, RTN streamed from the checkpoint, fp32 vision graph (so the bundle can be compared with
    the PyTorch reference to summation-order precision), fidelity on one held-out sample; made with the Python API."""
    if "tiny-rtn" not in _cache:
        from edge_vl2.export.bundle_writer import ExportOptions, export_bundle

        out = tmp_path_factory.mktemp("bundle") / "tiny-int4"
        export_bundle(ExportOptions(model=str(checkpoint(tmp_path_factory, "tiny")), out=str(out), recipe="int4",
                                    method="rtn", vision=("fp32",), fidelity_samples=1), log=lambda _m: None)
        _cache["tiny-rtn"] = out
    return _cache["tiny-rtn"]


def small_mixed_bundle(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Small (MLA), mixed recipe (per-expert INT8/INT4 from the allocation) by GPTQ on 2 calibration samples, for
    the cpu-kiosk profile (so its vision graph is the profile's int8), fidelity skipped; made with the CLI. Returns
    (bundle, the export's CompletedProcess)."""
    if "small-mixed" not in _cache:
        out = tmp_path_factory.mktemp("bundle") / "small-mixed"
        proc = cli("export", "--model", checkpoint(tmp_path_factory, "small"), "--recipe", "mixed", "--method", "gptq",
                   "--calib-samples", "2", "--fidelity-samples", "0", "--device", "cpu-kiosk", "--out", out)
        assert proc.returncode == 0, proc.stderr
        (tmp_path_factory.getbasetemp() / "small-mixed-export.log").write_text(proc.stderr)
        _cache["small-mixed"] = (out, proc)
    return _cache["small-mixed"]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def small_int4_bundle(tmp_path_factory) -> Path:
    """Small (MLA), int4 preset, streamed RTN, the default fp16 vision graph, fidelity skipped: the export whose
    narrow weights (kv_a_proj_with_mqa: out 40, INT4 g64) the packed cpu ops refuse; made with the Python API."""
    if "small-int4" not in _cache:
        from edge_vl2.export.bundle_writer import ExportOptions, export_bundle

        out = tmp_path_factory.mktemp("bundle") / "small-int4"
        export_bundle(ExportOptions(model=str(checkpoint(tmp_path_factory, "small")), out=str(out), recipe="int4",
                                    method="rtn", fidelity_samples=0), log=lambda _m: None)
        _cache["small-int4"] = out
    return _cache["small-int4"]
