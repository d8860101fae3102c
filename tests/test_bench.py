"""`edge-vl2 bench --bundle` (edge_vl2.tools.bench) at the synthetic test size: every configuration runs and reports,
the bytes it says a decode token reads agree with a count made from the bundle's manifest alone, and its fit-check
figure is the one `load_bundle` and `inspect` use. Speeds are not asserted (perf lives in the bench command itself).
"""

from __future__ import annotations

import json

import pytest

from edge_vl2.bundle.reader import open_bundle

from _bundles import cli, tiny_rtn_bundle


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """One bench run of the test-size Tiny INT4 bundle on cpu-kiosk, with the torch-ops and reference peers."""
    bundle = tiny_rtn_bundle(tmp_path_factory)
    proc = cli("bench", "--bundle", bundle, "--device", "cpu-kiosk", "--vs", "reference,torch", "--prompt-tokens",
               "16", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    return bundle, {r["config"]: r for r in map(json.loads, proc.stdout.splitlines())}


def test_every_configuration_reports(records):
    _, by_name = records
    assert list(by_name) == ["machine", "bundle", "bundle-torch-ops", "reference-bf16", "ratios"]
    for name in ("bundle", "bundle-torch-ops", "reference-bf16"):
        r = by_name[name]
        assert "error" not in r, r
        for key in ("load_s", "prefill_tok_s", "decode_ms_median", "decode_ms_p90", "peak_rss_gb", "decode_gbs"):
            assert r[key] > 0, (name, key, r)
        assert r["decode_ms_p90"] >= r["decode_ms_median"]
    assert by_name["bundle"]["load_s_skip_verify"] > 0
    assert any("qkern" in k for k in by_name["bundle"]["kernels"]), by_name["bundle"]["kernels"]
    assert not any("qkern" in k for k in by_name["bundle-torch-ops"]["kernels"])
    assert set(by_name["ratios"]) >= {"base", "bundle-torch-ops", "reference-bf16"}
    assert by_name["machine"]["read_gbs"]["median"] > 0


def test_decode_bytes_match_the_manifest(records):
    """qkern reads the bundle's tensors in place, so the bytes a decode token reads are the manifest's tensor bytes,
    less the routed experts not chosen (1 - k/E of them) and every embedding row but one (tensors outside `language.`
are the image-token embeddings, not read by a text decode step): counted here from the
    manifest's tensor table, without building the model."""
    bundle, by_name = records
    b = open_bundle(bundle, verify=False)
    cfg = b.config.language
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    total = 0.0
    for name, t in b.manifest.decoder.tensors.items():
        n = _nbytes(t)
        if not name.startswith("language."):  # image_newline, view_seperator: not the decoder's
            continue
        if ".mlp.experts." in name:
            total += n * share
        elif ".embed_tokens." in name:  # bf16 `.weight`, or a quantized table's `.qweight` / `.scales`: one row
            total += n / t.shape[0]
        else:
            total += n
    # the model counts the same tensors; only float rounding of the k/E share differs (< 1 byte per tensor)
    assert abs(by_name["bundle"]["decode_weight_bytes"] - total) <= len(b.manifest.decoder.tensors)


def _nbytes(t) -> int:
    size = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}[t.dtype]
    n = 1
    for d in t.shape:
        n *= d
    return n * size


def test_fit_figure_is_the_fit_checks(records):
    from edge_vl2.bundle.loader import fit_bytes
    from edge_vl2.devices.profiles import RUNTIME_OVERHEAD_GB, load_device

    bundle, by_name = records
    weights, cache = fit_bytes(open_bundle(bundle, verify=False), load_device("cpu-kiosk"))
    assert by_name["bundle"]["fit_check_gb"] == round((weights + cache) / 1e9 + RUNTIME_OVERHEAD_GB, 2)
    inspect = cli("inspect", bundle)
    assert f"cpu-kiosk ({(weights + cache) / 1e9 + RUNTIME_OVERHEAD_GB:.1f}/" in inspect.stdout, inspect.stdout


def test_bad_options_are_one_line_errors(tmp_path_factory):
    bundle = tiny_rtn_bundle(tmp_path_factory)
    for args, needle in ((("--vs", "onnx"), "--vs"), ((), "give --bundle")):
        proc = cli("bench", *(("--bundle", bundle) if args else ()), *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr


def test_llamacpp_peer_runs_on_gguf_of_the_same_decoder(tmp_path_factory, tmp_path):
    """`--vs llamacpp`: the GGUFs are written once into --gguf-dir (bf16 source, then llama.cpp's own quantizer) and
    llama.cpp decodes the same prompt ids; a second run reuses the files."""
    pytest.importorskip("llama_cpp")
    from _bundles import checkpoint

    model = checkpoint(tmp_path_factory, "tiny")
    args = ("bench", "--model", model, "--vs", "llamacpp", "--prompt-tokens", "8", "--new-tokens", "3", "--gguf-dir",
            tmp_path)
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    by_name = {r["config"]: r for r in map(json.loads, proc.stdout.splitlines())}
    for quant in ("Q4_0", "Q4_K_M"):
        r = by_name[f"llamacpp-{quant}"]
        assert "error" not in r, r
        assert r["decode_tok_s"] > 0 and r["prompt_tokens"] == 8 and r["gguf"] == str(tmp_path / f"tiny-{quant}.gguf")
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert set(written) == {"tiny-bf16.gguf", "tiny-Q4_0.gguf", "tiny-Q4_K_M.gguf"}
    assert cli(*args).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written
