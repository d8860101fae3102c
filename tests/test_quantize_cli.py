"""`edge-vl2 quantize` end to end on a test-size synthetic Tiny: several configurations against one reference, the
JSON report, a user calibration folder, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from edge_vl2.cli import main
from edge_vl2.errors import UserError
from edge_vl2.quantize.command import parse_configs

from _toolchain import checkpoint

FAST = ["--calib-samples", "3", "--eval", "2", "--max-tokens", "256", "--threads", "1", "--suite", "0"]


def invoke(*args):
    return CliRunner().invoke(main, ["quantize", *map(str, args)], catch_exceptions=False)


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_compare_several_configurations(tmp_path):
    report_path = tmp_path / "out" / "report.json"
    result = invoke("--model", checkpoint("tiny"), "--compare", "rtn-int4,gptq-int8,mixed", "--mixed-budget",
                    "int4-g64", "--report", report_path, *FAST)
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert [r["config"] for r in report["runs"]] == ["rtn-int4", "gptq-int8", "mixed"]
    assert result.stderr.count("full-precision reference") == 1  # computed once for all three
    assert report["calibration"]["sequences"] == 3 and report["variant"] == "tiny"
    for run in report["runs"]:
        f = run["fidelity"]
        assert f["samples"] == 2 and 0 <= f["kl_mean"] <= f["kl_max"] and 0 <= f["top1_agreement"] <= 1
        assert run["bytes"]["total"] < run["bytes"]["bf16_total"] and run["quantize_seconds"] >= 0
    rtn, int8, mixed = report["runs"]
    assert rtn["method"] == "rtn" and rtn["hessians"] is None and int8["hessians"] == "blend"
    assert int8["fidelity"]["kl_mean"] < rtn["fidelity"]["kl_mean"]  # GPTQ INT8 vs RTN INT4: not close
    assert mixed["allocation"]["expert_bytes"] <= mixed["allocation"]["budget_bytes"]
    assert mixed["recipe"]["name"] == "mixed"
    assert report["wall_seconds"] > 0 and report["peak_rss_gb"] > 0
    # stdout: a fidelity report per configuration and the summary table
    for name in ("rtn-int4", "gptq-int8", "mixed"):
        assert f"== {name} ==" in result.stdout
    assert "KL(fp||q)" in result.stdout and "routing overlap" in result.stdout and "peak RSS" in result.stdout


def test_single_configuration_with_user_images(tmp_path):
    for i in range(2):
        Image.new("RGB", (300, 200), (40 * i, 90, 160)).save(tmp_path / f"p{i}.png")
    result = invoke("--model", checkpoint("tiny"), "--recipe", "int4", "--method", "rtn", "--calib-dir", tmp_path,
                    "--report", tmp_path / "r.json", *FAST)
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["config"] for r in report["runs"]] == ["rtn-int4-blend"]
    assert report["calibration"]["source"] == str(tmp_path) and report["calibration"]["images"] >= 1


def test_held_out_suite_per_domain(tmp_path):
    from edge_vl2.quantize.heldout.suite import load_suite

    result = invoke("--model", checkpoint("tiny"), "--compare", "rtn-int8,gptq-int4", "--eval", "0",
                    "--calib-samples", "2", "--calib-answers", "4", "--suite", "1", "--answer-tokens", "4",
                    "--max-tokens", "256", "--threads", "1", "--suite-dir", tmp_path / "suite",
                    "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["suite"]["sequences"] == 5
    for run in report["runs"]:
        assert set(run["suite"]["domains"]) == {"prose", "chat", "photo", "document", "multi_image"}
        assert all(0 <= f["kl_mean"] <= f["kl_max"] for f in run["suite"]["domains"].values())
    int8, int4 = report["runs"]
    tokens = int4["expert_tokens"]  # GPTQ: routed calibration tokens per expert (RTN routes nothing)
    assert tokens["experts"] == 2 * 8 and tokens["min"] <= tokens["median"] <= tokens["max"]
    # INT8 g32 vs INT4: the suite must rank them on every domain
    assert all(int8["suite"]["domains"][d]["kl_mean"] < int4["suite"]["domains"][d]["kl_mean"]
               for d in int8["suite"]["domains"])
    # the calibration sequences carry the 4 answer tokens
    assert report["calibration"]["tokens"] > 0
    assert "held-out suite" in result.stdout and "multi_image" in result.stdout
    assert len(load_suite(tmp_path / "suite").sequences) == 5
    # `edge-vl2 peer` prints those rows side by side (llama.cpp rows: tests/test_side_by_side.py)
    table = CliRunner().invoke(main, ["peer", "--suite", str(tmp_path / "suite"), "--report", str(tmp_path / "r.json"),
                                      "--json", str(tmp_path / "t.json")], catch_exceptions=False)
    assert table.exit_code == 0, table.stderr
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["rtn-int8", "gptq-int4"]
    assert rows[0]["domains"]["prose"]["kl_mean"] == int8["suite"]["domains"]["prose"]["kl_mean"]
    assert "rtn-int8" in table.stdout and "multi_image" in table.stdout


@pytest.mark.parametrize("args, needles", [
    (["--model", "/nonexistent/ckpt"], ["/nonexistent/ckpt"]),
    (["--compare", "gptq-int3"], ["gptq-int3", "unknown recipe preset"]),
    (["--compare", "rtn-int4,,int8"], ["empty entry"]),
    (["--compare", "int8,int8"], ["repeated"]),
    (["--calib-dir", "/nonexistent/images"], ["/nonexistent/images", "not a directory"]),
    (["--calib-samples", "0"], ["--calib-samples", "0 is not in the range x>=1"]),
    (["--recipe", "missing.json"], ["missing.json", "cannot read"]),
    (["--mixed-budget", "lots", "--recipe", "mixed"], ["--mixed-budget", "lots"]),
])
def test_bad_input_is_one_line(args, needles):
    if "--model" not in args:
        args = ["--model", checkpoint("tiny"), *args]
    samples = args[args.index("--calib-samples") + 1] if "--calib-samples" in args else "2"
    assert_one_line_error(invoke(*args, "--eval", "0", "--calib-samples", samples, "--max-tokens", "64"), *needles)


def test_parse_configs():
    cfgs = parse_configs("rtn-int4,gptq-int4-g32-routed,int8-all-tokens,mixed", method="gptq", mode="blend")
    assert [(c.method, c.recipe, c.mode) for c in cfgs] == [("rtn", "int4", "blend"), ("gptq", "int4-g32", "routed"),
                                                           ("gptq", "int8", "all-tokens"), ("gptq", "mixed", "blend")]
    with pytest.raises(UserError, match="bogus"):
        parse_configs("bogus")
