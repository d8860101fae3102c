"""`edge-vl2 bench`: how fast and how big a bundle or checkpoint runs on this machine, next to its peers, in one run.

    edge-vl2 bench --bundle B --device cpu-kiosk --vs reference,torch,llamacpp [--image PHOTO]
    edge-vl2 bench --model M --dtypes bf16,fp32

Configurations run one after another, each in its own child process (its peak RSS is its own):
- the bundle on its backend (on the cpu backend: qkern where it loads), or the checkpoint per dtype (--model);
- `--vs torch`: the same bundle on the cpu backend's PyTorch ops (the path before qkern);
- `--vs reference`: the full-precision path, the bundle's source checkpoint (or --model) in bf16;
- `--vs llamacpp`: llama.cpp (llama-cpp-python) on GGUFs of the same decoder weights, Q4_0 and Q4_K_M, written once
  into --gguf-dir by edge_vl2.tools.peer (bf16 source, llama.cpp's own quantizer), same prompt ids and threads.
A record per configuration: load (with and without hash verification), vision per tile, prefill tok/s, decode
ms/token (median, p90), bytes read per decode token (the decoder's weights as they are held, routed experts at k/E,
one embedding row, plus the cache read at the mean decode context), the GB/s that achieves and its share of the
device profile's bandwidth and of the read bandwidth measured here first (a streaming read of 1 GiB, median of 5),
peak RSS (peak CUDA memory on a GPU) next to what the device fit check plans. Then one record of ratios to the first.
JSON lines on stdout; progress on stderr. The host may be shared: read ratios within one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..procinfo import peak_rss_bytes
from .timing import timing_env

FILLER = "The quick brown fox jumps over the lazy dog."
GB = 1e9


# --- in the child ------------------------------------------------------------------------------------------------

def _prompt(vl2, prompt_tokens: int, image: str | None):
    """A prompt of `prompt_tokens` text tokens (plus one image's tokens): the filler sentence, cut to length."""
    inputs = vl2.prepare(("<image>\n" if image else "") + " ".join([FILLER] * prompt_tokens), [image] if image else [])
    n = prompt_tokens + (sum(inputs.num_image_tokens) if image else 0)
    inputs.input_ids, inputs.images_seq_mask = inputs.input_ids[:n], inputs.images_seq_mask[:n]
    return inputs


def decode_read_bytes(lm) -> dict:
    """Bytes one decode token reads from the decoder as it is held: quantized layers their few-row kernel's tensors,
    routed experts k/E of theirs (uniform routing), the embedding one row, everything else whole."""
    from torch import nn

    from ..model.moe import StackedExperts
    from ..quant.experts import QuantExperts
    from ..quant.linear import QuantLinear

    cfg = lm.cfg
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    weights = experts = 0
    inside: list[str] = []  # quantized modules: their kernels' tensors count, not their parts' parameters
    for name, module in lm.named_modules():
        if any(name.startswith(q + ".") for q in inside):
            continue
        if isinstance(module, (QuantExperts, QuantLinear)):
            inside.append(name)
        if isinstance(module, QuantExperts):
            experts += module.decode_nbytes
        elif isinstance(module, QuantLinear):
            weights += module.decode_nbytes
        elif isinstance(module, StackedExperts):
            experts += sum(p.numel() * p.element_size() for p in module.parameters())
        elif isinstance(module, nn.Embedding):
            weights += module.weight.shape[1] * module.weight.element_size()
        else:
            weights += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return {"weights": int(weights + experts * share), "routed_share": share}


def _time_generation(vl2, inputs, new_tokens: int) -> dict:
    """Vision (the tile encoder), prefill into a fresh cache, then `new_tokens` greedy decode steps, timed apart."""
    import torch

    from ..generate import decode_step, prefill
    from ..model.cache import StaticCache, cache_bytes

    t0 = time.perf_counter()
    embeds = vl2.embeddings(inputs)
    vision_s = time.perf_counter() - t0
    lm = vl2.model.language
    cache = StaticCache(lm.cfg, embeds.shape[0] + new_tokens, embeds.dtype, embeds.device)
    t0 = time.perf_counter()
    token = int(prefill(lm, embeds, cache).argmax())
    prefill_s = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        t1 = time.perf_counter()
        token = int(decode_step(lm, token, cache).argmax())
        steps.append(time.perf_counter() - t1)
    steps.sort()
    tiles = int(inputs.pixel_values.shape[0])
    context = embeds.shape[0] + new_tokens // 2
    return {"prompt_tokens": int(embeds.shape[0]), "image_tiles": tiles, "vision_s": round(vision_s, 3),
            "vision_s_per_tile": round(vision_s / tiles, 3) if tiles else None, "prefill_s": round(prefill_s, 3),
            "prefill_tok_s": round(embeds.shape[0] / prefill_s, 1), "decode_tokens": new_tokens,
            "decode_ms_median": round(steps[len(steps) // 2] * 1e3, 2),
            "decode_ms_p90": round(steps[min(len(steps) - 1, (9 * len(steps)) // 10)] * 1e3, 2),
            "decode_tok_s": round(1 / steps[len(steps) // 2], 2),
            "cache_read_bytes": cache_bytes(lm.cfg, context, itemsize=embeds.element_size()),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def _load_bundle(spec: dict):
    """Load twice (with, then without, hash verification: the second is what runs); plan of the fit check."""
    import gc

    from ..bundle.reader import open_bundle
    from ..pipeline import VL2Pipeline

    kwargs = {"backend": spec.get("backend"), "device_profile": spec.get("device")}
    t0 = time.perf_counter()
    vl2 = VL2Pipeline.from_bundle(spec["path"], verify=True, **kwargs)
    verified = time.perf_counter() - t0
    del vl2
    gc.collect()
    t0 = time.perf_counter()
    vl2 = VL2Pipeline.from_bundle(spec["path"], verify=False, **kwargs)
    load = {"load_s": round(verified, 2), "load_s_skip_verify": round(time.perf_counter() - t0, 2)}
    if spec.get("device"):  # what the device fit check plans, counted as load_bundle counts it
        from ..bundle.loader import fit_bytes
        from ..devices.profiles import check_fit, load_device

        profile = load_device(spec["device"])
        weights, cache = fit_bytes(open_bundle(spec["path"], verify=False), profile)
        load.update(fit_weights_gb=round(weights / GB, 2), fit_cache_gb=round(cache / GB, 2),
                    fit_check_gb=round(check_fit(profile, weights, cache, spec["path"]), 2))
    return vl2, load


def measure(spec: dict) -> dict:
    """One configuration in this process (see the module docstring); spec: kind bundle|model, path, dtype, device,
    backend, prompt_tokens, new_tokens, image, threads."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "bundle":
        vl2, load = _load_bundle(spec)
    else:
        from ..pipeline import VL2Pipeline

        t0 = time.perf_counter()
        vl2 = VL2Pipeline.from_pretrained(spec["path"], dtype=spec["dtype"], device=spec.get("torch_device", "cpu"))
        load = {"load_s": round(time.perf_counter() - t0, 2)}
        if spec.get("device"):  # the bundle's tile cap, so both see the same prompt
            from ..devices.profiles import load_device

            cap = load_device(spec["device"]).max_tiles
            if vl2.processor.max_tiles() > cap:
                vl2.processor = vl2.processor.capped_at(cap)
    inputs = _prompt(vl2, spec["prompt_tokens"], spec.get("image"))
    timing = _time_generation(vl2, inputs, spec["new_tokens"])
    read = decode_read_bytes(vl2.model.language)
    out = {**load, **timing, "decode_weight_bytes": read["weights"], "peak_rss_gb": round(peak_rss_bytes() / GB, 2),
           "threads": torch.get_num_threads(), "prompt_ids": inputs.input_ids.tolist()}
    from ..quant.swap import describe_quantized

    out["kernels"] = sorted(describe_quantized(vl2.model))
    return out


# --- in the parent -----------------------------------------------------------------------------------------------

def read_bandwidth(threads: int) -> dict:
    """GB/s of a streaming read of 1 GiB (median and best of 5), in a child so its buffer is not in any peak RSS."""
    code = ("import json, torch; from edge_vl2.quant.kernels import qkern; ok, why = qkern.status()\n"
            f"r = sorted(qkern.read_bandwidth(1 << 30, 5, {threads})) if ok else None\n"
            "print(json.dumps({'median': round(r[2], 2), 'best': round(r[-1], 2)} if r else {'error': why}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=timing_env())
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout)


def _child(spec: dict, env_extra: dict) -> dict:
    env = {**timing_env(), **env_extra}
    proc = subprocess.run([sys.executable, "-m", "edge_vl2.tools.bench", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_record(threads: int) -> dict:
    """What the figures stand on: the CPU's vector extensions, qkern's tier, the load, the read bandwidth."""
    import torch

    from ..quant.kernels import qkern
    from ..quant.linear import cpu_kernel_line

    qkern.set_threads(threads)  # the children's count (they get EDGE_VL2_CPU_THREADS), for the kernel line
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return {"config": "machine", "cpus": os.cpu_count(), "simd": simd, "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_kernel": cpu_kernel_line(),
            "load_average": [round(v, 1) for v in os.getloadavg()], "threads": threads,
            "read_gbs": read_bandwidth(threads)}


def _roofline(record: dict, profile_gbs: float | None, read_gbs: float | None) -> None:
    """Achieved GB/s of decode (bytes per token / median time) and its share of the two bandwidths."""
    if "decode_ms_median" not in record or "decode_weight_bytes" not in record:
        return
    per_token = record["decode_weight_bytes"] + record.get("cache_read_bytes", 0)
    gbs = per_token / (record["decode_ms_median"] / 1e3) / GB
    record["decode_read_bytes"] = per_token
    record["decode_gbs"] = round(gbs, 2)
    if profile_gbs:
        record["pct_of_profile_bandwidth"] = round(100 * gbs / profile_gbs, 1)
    if read_gbs:
        record["pct_of_measured_read"] = round(100 * gbs / read_gbs, 1)


def ratios(records: list[dict]) -> dict:
    """Decode and prefill speed of every configuration relative to the first one that ran."""
    ran = [r for r in records if "decode_tok_s" in r]
    if not ran:
        return {"config": "ratios", "error": "no configuration ran"}
    base = ran[0]
    out = {"config": "ratios", "base": base["config"]}
    for r in ran[1:]:
        out[r["config"]] = {"decode": round(r["decode_tok_s"] / base["decode_tok_s"], 2),
                            "prefill": round(r["prefill_tok_s"] / base["prefill_tok_s"], 2)}
    return out


VS = ("reference", "torch", "llamacpp")
GGUF_QUANTS = ("Q4_0", "Q4_K_M")


def _reference_source(bundle: str | None, model: str | None) -> str | None:
    """The full-precision checkpoint to compare with: --model, else the bundle's recorded source if it is here."""
    if model or not bundle:
        return model
    from pathlib import Path

    from ..bundle.reader import open_bundle

    src = open_bundle(bundle, verify=False).manifest.source
    path = getattr(src, "path", None) or getattr(src, "model", None)
    return path if path and Path(path).is_dir() else None


def plan(bundle: str | None, model: str | None, dtypes: list[str], vs: list[str], common: dict) -> list[tuple]:
    """(config name, child spec, extra environment) per configuration, in run order."""
    out = []
    if bundle:
        spec = {"kind": "bundle", "path": bundle, **common}
        out.append(("bundle", spec, {}))
        if "torch" in vs:
            out.append(("bundle-torch-ops", spec, {"EDGE_VL2_CPU_KERNEL": "torch"}))
    else:
        out += [(f"model-{d}", {"kind": "model", "path": model, "dtype": d, **common}, {}) for d in dtypes]
    if "reference" in vs and bundle:
        source = _reference_source(bundle, model)
        out.append(("reference-bf16", {"kind": "model", "path": source, "dtype": "bf16", **common} if source else
                    {"error": "the bundle's source checkpoint is not here: give --model"}, {}))
    return out


def llamacpp_records(source: str | None, prompt_ids: list[int], new_tokens: int, threads: int, gguf_dir: str | None,
                     quants=GGUF_QUANTS) -> list[dict]:
    """llama.cpp on a GGUF of the same decoder (edge_vl2.tools.peer), one child per quantization type."""
    out = []
    for quant in quants:
        name = f"llamacpp-{quant}"
        if source is None:
            out.append({"config": name, "error": "needs the source checkpoint: give --model"})
            continue
        spec = {"kind": "llamacpp", "source": source, "quant": quant, "prompt_ids": prompt_ids,
                "new_tokens": new_tokens, "threads": threads, "gguf_dir": gguf_dir or default_gguf_dir(source)}
        out.append({"config": name, **_child(spec, {})})
    return out


def default_gguf_dir(source: str) -> str:
    """Where the GGUFs of a checkpoint are written once and reused: ~/.cache/edge-vl2/gguf/<checkpoint folder>."""
    from pathlib import Path

    return str(Path.home() / ".cache" / "edge-vl2" / "gguf" / Path(source).name)


def _llamacpp(spec: dict) -> dict:
    """In a child without torch's kernels in play: the GGUFs (the bf16 source written once from the checkpoint by
    the peer writer, each llama.cpp type quantized from it once; both reused from gguf_dir), then llama.cpp's
    prefill of the same prompt ids and batch-1 greedy decode (edge_vl2.tools.peer.llama_runner)."""
    from pathlib import Path

    try:
        from .peer.gguf_writer import write_gguf
        from .peer.llama_runner import quantize_gguf, system_info, time_generation
    except ImportError as e:
        return {"error": f"edge_vl2.tools.peer is not available ({e})"}
    folder = Path(spec["gguf_dir"])
    src, path = folder / "tiny-bf16.gguf", folder / f"tiny-{spec['quant']}.gguf"
    try:
        if not path.exists():
            if not src.exists():
                write_gguf(spec["source"], src, "bf16")
            quantize_gguf(src, path, spec["quant"])
        timed = time_generation(path, spec["prompt_ids"], spec["new_tokens"], spec["threads"]).as_dict()
        info = system_info()
    except Exception as e:  # noqa: BLE001 - the peer's failure is a record, not the end of the bench
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    timed.pop("gguf", None)
    return {"gguf": str(path), "gguf_bytes": path.stat().st_size, **timed, "llama_cpp": info,
            "peak_rss_gb": round(peak_rss_bytes() / GB, 2)}


def run_bench(bundle: str | None, model: str | None, dtypes: list[str], vs: list[str], device: str | None,
              prompt_tokens: int, new_tokens: int, image: str | None, threads: int, torch_device: str = "cpu",
              backend: str | None = None, gguf_dir: str | None = None, progress=lambda _m: None):
    """Yield the machine record, one record per configuration (in order, back to back) and the ratios."""
    machine = machine_record(threads)
    yield machine
    read_gbs = machine["read_gbs"].get("median")
    profile_gbs = None
    if device:
        from ..devices.profiles import load_device

        profile_gbs = load_device(device).bandwidth_gbs
    common = {"device": device, "backend": backend, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "image": image, "threads": threads, "torch_device": torch_device}
    env = {"EDGE_VL2_CPU_THREADS": str(threads)}
    records, prompt_ids = [], None
    for name, spec, extra in plan(bundle, model, dtypes, vs, common):
        progress(f"bench: {name}")
        record = {"config": name, **(spec if "error" in spec else _child(spec, {**env, **extra}))}
        prompt_ids = record.pop("prompt_ids", None) or prompt_ids
        _roofline(record, profile_gbs, read_gbs)
        records.append(record)
        yield record
    if "llamacpp" in vs:
        # the same ids (with an image its placeholder ids stand in for the image embeddings: the same context length)
        for record in llamacpp_records(_reference_source(bundle, model), prompt_ids or [], new_tokens, threads,
                                       gguf_dir):
            progress(f"bench: {record['config']}")
            records.append(record)
            yield record
    yield ratios(records)


if __name__ == "__main__":  # a child of run_bench
    child_spec = json.loads(sys.argv[1])
    print(json.dumps(_llamacpp(child_spec) if child_spec["kind"] == "llamacpp" else measure(child_spec)))
