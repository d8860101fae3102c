"""One bundle on a GPU: load, vision, prefill and decode with and without CUDA graphs and under a memory cap.

`devices/gpu-check.sh` runs this after making and exporting the checkpoints; it is also the place `edge-vl2 bench
--bundle` can take its GPU figures from (`measure_bundle` returns one flat record per configuration):

    python -m edge_vl2.tools.gpu_check run BUNDLE LABEL [--image IMG] [--prompt-tokens N] [--new-tokens N]
                                       [--backend cpu] >> out.jsonl
    python -m edge_vl2.tools.gpu_check table out.jsonl

`run` measures each configuration of CONFIGS in its own child process (a fresh CUDA context, memory cap and peak
counters) and prints one JSON record per line. Decode figures drop the first step (it captures the graph; its time is
`capture_s`); `bytes_per_token` is what one decode step reads of the decoder's weights (dense layers, k of E experts,
lm_head; the embedding row and the cache are not counted), so `achieved_gbs` is a lower bound of the bandwidth used.
`--backend cpu` is the script's dry run (`gpu-check.sh --dry-run`): the same steps without a GPU, the memory-cap
configuration recorded as skipped.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# label, CUDA graphs, PyTorch memory cap (GB), device profile (fit check + prefill budget)
CONFIGS = (("eager", False, None, None), ("cuda-graphs", True, None, None),
           ("graphs+16GB-cap", True, 16.0, "rtx4060ti-16gb"))


def decode_bytes_per_token(model) -> int:
    """Weight bytes one decode token reads: quantized layers' decode kernels, k/E of each expert stack, and the
    decoder's float parameters other than the embedding table (norms, routers, MLA's w_uk / w_uv), and one row of
    the table."""
    from ..quant.embedding import QuantEmbedding
    from ..quant.experts import QuantExperts
    from ..quant.linear import QuantLinear

    lm = model.language
    k, n_experts = lm.cfg.num_experts_per_tok, lm.cfg.n_routed_experts
    total = 0
    for module in lm.modules():
        if isinstance(module, QuantLinear):
            total += module.decode_nbytes
        elif isinstance(module, QuantExperts):
            total += module.decode_nbytes * k // n_experts
    embed = lm.model.embed_tokens
    if isinstance(embed, QuantEmbedding):  # buffers, not parameters: one row of the table per token
        total += embed.nbytes // embed.num_embeddings
    weight = getattr(embed, "weight", None)
    total += sum(p.numel() * p.element_size() for p in lm.parameters() if p is not weight and p.numel() > 1)
    return total


def measure_bundle(bundle: str, cuda_graphs: bool, memory_cap_gb: float | None = None,
                   device_profile: str | None = None, prompt_tokens: int = 256, new_tokens: int = 64,
                   image: str | None = None, backend: str = "cuda") -> dict:
    """One configuration in this process: bf16 activations, greedy decode of `new_tokens` with no stop token.
    Returns the flat record described in the module docstring (`backend` other than cuda: a CPU check of the
    plumbing)."""
    import torch

    from ..cuda_memory import cuda_memory_figures
    from ..generate import SamplingParams, generate_tokens
    from ..pipeline import VL2Pipeline

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    vl2 = VL2Pipeline.from_bundle(bundle, backend=backend, device_profile=device_profile, verify=False,
                                  cuda_graphs=cuda_graphs, memory_cap_gb=memory_cap_gb)
    sync()
    load_s = time.perf_counter() - t0
    filler = " ".join(["The quick brown fox jumps over the lazy dog."] * prompt_tokens)
    inputs = vl2.prepare(("<image>\n" if image else "") + filler, [image] if image else [])
    keep = prompt_tokens + sum(inputs.num_image_tokens)
    inputs.input_ids, inputs.images_seq_mask = inputs.input_ids[:keep], inputs.images_seq_mask[:keep]
    t0 = time.perf_counter()
    embeds = vl2.embeddings(inputs)
    sync()
    vision_s = time.perf_counter() - t0
    info: dict = {}
    marks = [time.perf_counter()]
    tokens = generate_tokens(vl2.model.language, embeds, inputs.input_ids, SamplingParams(max_new_tokens=new_tokens),
                             eos_id=-1, prefill_budget=vl2.prefill_budget, cuda_graphs=cuda_graphs, info=info)
    for _ in tokens:
        marks.append(time.perf_counter())  # each yield follows a host read of the sampled token: the step is done
    steps = sorted(b - a for a, b in zip(marks[2:], marks[3:]))  # decode steps after the first (capture) one
    median, p90 = statistics.median(steps), steps[int(0.9 * (len(steps) - 1))]
    per_token = decode_bytes_per_token(vl2.model)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"bundle": str(bundle), "backend": backend, "cuda_graphs": cuda_graphs, "memory_cap_gb": memory_cap_gb,
            "device_profile": device_profile, "gpu": gpu, "torch": torch.__version__,
            "decode_mode": info.get("decode"), "capture_s": round(info.get("capture_s", 0.0), 3),
            "load_s": round(load_s, 2), "prompt_tokens": int(embeds.shape[0]),
            "image_tiles": int(inputs.pixel_values.shape[0]), "vision_s": round(vision_s, 3),
            "prefill_chunk": info.get("prefill_chunk"),
            "prefill_tok_s": round(embeds.shape[0] / (marks[1] - marks[0]), 1), "decode_tokens": len(steps),
            "decode_ms_median": round(median * 1e3, 3), "decode_ms_p90": round(p90 * 1e3, 3),
            "decode_tok_s": round(1 / median, 1), "bytes_per_token": per_token,
            "achieved_gbs": round(per_token / median / 1e9, 1), **cuda_memory_figures()}


def run_configs(bundle: str, label: str, **options) -> list[dict]:
    """Every CONFIGS entry in a child process; a failed one is a record with its error (an out-of-memory error
    under the cap is a result, not a crash)."""
    records = []
    for name, graphs, cap, profile in CONFIGS:
        if cap is not None and options.get("backend", "cuda") != "cuda":
            records.append({"label": label, "config": name, "skipped": "the memory cap needs CUDA"})
            continue
        kwargs = dict(bundle=bundle, cuda_graphs=graphs, memory_cap_gb=cap, device_profile=profile, **options)
        proc = subprocess.run([sys.executable, "-m", "edge_vl2.tools.gpu_check", "measure", json.dumps(kwargs)],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            record = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            record = {"bundle": bundle, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
        records.append({"label": label, "config": name, **record})
    return records


def format_table(records: list[dict]) -> str:
    """One line per (model, configuration), then the skips the script recorded."""
    head = (f"{'model':<12}{'config':<17}{'decode tok/s':>13}{'ms/tok p50':>11}{'p90':>8}{'GB/s':>7}"
            f"{'prefill t/s':>12}{'chunk':>6}{'torch peak GB':>14}{'device GB':>10}{'load s':>7}  decode path")
    lines = [head]
    for r in records:
        if "skipped" in r:
            lines.append(f"{r['label']:<12}{r.get('config', ''):<17}skipped: {r['skipped']}")
        elif "error" in r:
            lines.append(f"{r['label']:<12}{r['config']:<17}ERROR {r['error']}")
        else:
            lines.append(f"{r['label']:<12}{r['config']:<17}{r['decode_tok_s']:>13.1f}"
                         f"{r['decode_ms_median']:>11.3f}{r['decode_ms_p90']:>8.3f}{r['achieved_gbs']:>7.0f}"
                         f"{r['prefill_tok_s']:>12.0f}{r['prefill_chunk']:>6}{r.get('torch_peak_gb', 0):>14.2f}"
                         f"{r.get('device_used_gb', 0):>10.2f}{r['load_s']:>7.1f}  {r['decode_mode']}")
    gpus = {r["gpu"] for r in records if "gpu" in r}
    if gpus:
        lines.append(f"GPU: {', '.join(sorted(gpus))}; torch {next(r['torch'] for r in records if 'torch' in r)}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "measure":
        print(json.dumps(measure_bundle(**json.loads(argv[1]))))
    elif command == "run":
        import argparse

        parser = argparse.ArgumentParser(prog="gpu_check run")
        parser.add_argument("bundle")
        parser.add_argument("label")
        parser.add_argument("--image")
        parser.add_argument("--prompt-tokens", type=int, default=256)
        parser.add_argument("--new-tokens", type=int, default=64)
        parser.add_argument("--backend", default="cuda", help="cpu: a dry run of the steps without a GPU")
        a = parser.parse_args(argv[1:])
        for record in run_configs(a.bundle, a.label, image=a.image, prompt_tokens=a.prompt_tokens,
                                  new_tokens=a.new_tokens, backend=a.backend):
            print(json.dumps(record), flush=True)
    elif command == "table":
        print(format_table([json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]))
    else:
        sys.exit("usage: python -m edge_vl2.tools.gpu_check measure KWARGS_JSON | run BUNDLE LABEL [...] | table FILE")


if __name__ == "__main__":
    main(sys.argv[1:])
