"""The GPU check's pieces that run anywhere (edge_vl2.tools.gpu_check, the run command's GPU switches): one
configuration measured on the test bundle with the cpu backend gives a complete record and a table line; asking for
CUDA graphs without a GPU decodes eagerly and says why; a memory cap without a GPU is one line, exit 2. The figures
themselves need a GPU: devices/gpu-check.sh, whose --dry-run (the same steps on test-size checkpoints with the cpu
backend) is run here end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_vl2.tools.gpu_check import decode_bytes_per_token, format_table, measure_bundle

import _bundles

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks; gpu-check.sh runs the GPU")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _bundles.tiny_rtn_bundle(tmp_path_factory)


def test_measure_bundle_gives_a_full_record(bundle):
    record = measure_bundle(str(bundle), cuda_graphs=True, prompt_tokens=24, new_tokens=5, backend="cpu")
    assert record["decode_mode"] == "eager: the model is on cpu, not CUDA"  # the step says why it did not capture
    assert record["decode_tokens"] == 3 and record["decode_ms_median"] > 0 and record["prefill_chunk"] == 512
    assert record["prompt_tokens"] == 24 and record["gpu"] == "none" and record["bytes_per_token"] > 0
    line = format_table([{"label": "tiny-test", "config": "eager", **record}, {"label": "small", "skipped": "disk"}])
    assert "tiny-test" in line and "skipped: disk" in line


def test_gpu_check_script_dry_run(tmp_path):
    """The whole script without a GPU: synth, export and the three configurations for Tiny and Small (test size),
    one table on stdout; the memory-cap row is a recorded skip, never an error."""
    script = Path(__file__).parents[1] / "devices" / "gpu-check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # the syntax, before spending minutes
    env = {**os.environ, "GPU_CHECK_BUDGET_S": "900", "PYTHON": sys.executable}  # 900: a shared 2-core host
    proc = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["label"], r["config"]) for r in records] == [
        (f"{v}-int4", c) for v in ("tiny", "small") for c in ("eager", "cuda-graphs", "graphs+16GB-cap")]
    measured = [r for r in records if "skipped" not in r]
    assert len(measured) == 4 and all("error" not in r and r["decode_tokens"] == 6 for r in measured), measured
    assert all(r["skipped"] == "the memory cap needs CUDA" for r in records if r not in measured)
    assert all(r["decode_mode"] == "eager: the model is on cpu, not CUDA" for r in measured if r["cuda_graphs"])
    table = proc.stdout.strip().splitlines()
    assert table[0].startswith("model") and len(table) == 1 + 6 + 1  # header, six rows, the GPU line


def test_bytes_per_token_counts_k_of_e_experts(bundle):
    from edge_vl2.pipeline import VL2Pipeline
    from edge_vl2.quant.experts import QuantExperts
    from edge_vl2.quant.linear import QuantLinear

    model = VL2Pipeline.from_bundle(bundle, verify=False).model
    cfg = model.language.cfg
    dense = sum(m.decode_nbytes for m in model.modules() if isinstance(m, QuantLinear))
    experts = sum(m.decode_nbytes for m in model.modules() if isinstance(m, QuantExperts))
    got = decode_bytes_per_token(model)
    assert dense + experts * cfg.num_experts_per_tok // cfg.n_routed_experts < got < dense + experts


def test_run_switches_without_a_gpu(bundle):
    proc = _bundles.cli("run", "--bundle", bundle, "--cuda-graphs", "on", "--max-new-tokens", "3", "--stats",
                        "Hello")
    assert proc.returncode == 0, proc.stderr
    assert "eager: CUDA graphs need the decoder on CUDA" in proc.stderr and "prefill" in proc.stderr
    proc = _bundles.cli("run", "--bundle", bundle, "--memory-cap-gb", "16", "Hello")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--memory-cap-gb needs a CUDA device" in proc.stderr
