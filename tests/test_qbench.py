"""`edge-vl2 qbench` (edge_vl2.tools.qbench) at the synthetic test size: the command runs end to end and its records say
what they measured. The speed figures themselves come from running the command (README), not from a timed test.

- one record per configuration, in order, with positive timings over the requested samples, weight bytes and the
  ratios to bf16 (bf16's own ratios are 1 and its error 0);
- the error column is a real measurement: RTN INT4 g32 loses more than INT8 per channel on heavy-tailed weights
  (test_quantized_model bounds each against its own dequantized weights; here only the order is checked);
- without bitsandbytes the nf4 / llm.int8 rows are skipped with the reason, and the rest still runs;
- an unknown configuration is one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

from edge_vl2.quant.linear import available_backends
from edge_vl2.tools.qbench import run_qbench

BNB = available_backends()["bnb"]


def cli(*args, hide_bnb: bool = False):
    """Run `edge-vl2` in a fresh process; hide_bnb makes bitsandbytes unimportable there, as on a device without it."""
    hide = "sys.modules['bitsandbytes'] = None; " if hide_bnb else ""
    code = f"import sys; {hide}from edge_vl2.cli import main; sys.argv[0] = 'edge-vl2'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_records_at_test_size():
    configs = ["bf16", "int8", "int4"] + (["nf4", "llm.int8"] if BNB.available else [])
    records = run_qbench("tiny", configs, prefill_tokens=24, rounds=2, decode_steps=3, size="test", threads=1)
    assert [r["config"] for r in records] == configs
    by = {r["config"]: r for r in records}
    for r in records:
        assert r["decode_samples"] == 6 and r["prefill_samples"] == 2 and r["threads"] == 1
        assert r["decode_ms_median"] > 0 and r["prefill_ms_median"] > 0 and r["weight_bytes"] > 0
        assert r["decode_ms_p10"] <= r["decode_ms_median"] <= r["decode_ms_p90"]
        assert 0 < r["decode_read_bytes"] < r["weight_bytes"]  # shared + 3 of 8 routed experts + router
        assert r["experts"] == 8 and r["top_k"] == 3 and r["hidden"] == 64
    assert by["bf16"]["rel_err_vs_bf16"] == 0 and by["bf16"]["decode_speedup_vs_bf16"] == 1.0
    assert 0 < by["int8"]["rel_err_vs_bf16"] < by["int4"]["rel_err_vs_bf16"]
    assert by["int8"]["weight_ratio_vs_bf16"] < 0.6  # 1 byte per weight + per-row scales, against 2


def test_without_bitsandbytes_its_rows_are_skipped_with_the_reason():
    proc = cli("qbench", "--size", "test", "--configs", "bf16,nf4,int8", "--rounds", "1", "--decode-steps", "1",
               "--prefill-tokens", "8", hide_bnb=True)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["config"] for r in records] == ["bf16", "nf4", "int8"]
    assert records[1]["skipped"] == "bitsandbytes is not installed"
    assert records[2]["decode_ms_median"] > 0


def test_unknown_configuration_is_one_line_error():
    proc = cli("qbench", "--size", "test", "--configs", "bf16,fp8")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fp8" in lines[0], proc.stderr
