"""`edge-vl2 bench`: load time, peak memory, vision, prefill and decode speed, several configurations in one run.

Each configuration runs in its own subprocess so its peak RSS is its own; the parent prints one JSON record per
configuration and the ratios against the first one. The host is noisy: compare within one run, never across runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from ..procinfo import peak_rss_bytes
from .timing import timing_env


def measure(model: str, dtype: str, prompt_tokens: int, new_tokens: int, image: str | None, device: str) -> dict:
    """One configuration, in this process."""
    import torch

    from ..generate import decode_step, prefill
    from ..model.cache import StaticCache
    from ..pipeline import VL2Pipeline

    t0 = time.perf_counter()
    vl2 = VL2Pipeline.from_pretrained(model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    filler = " ".join(["The quick brown fox jumps over the lazy dog."] * prompt_tokens)
    images = [image] if image else []
    prompt = ("<image>\n" if image else "") + filler
    inputs = vl2.prepare(prompt, images)
    ids = inputs.input_ids[: prompt_tokens + (sum(inputs.num_image_tokens) if image else 0)]
    inputs.input_ids, inputs.images_seq_mask = ids, inputs.images_seq_mask[: ids.shape[0]]
    t0 = time.perf_counter()
    embeds = vl2.embeddings(inputs)
    vision_s = time.perf_counter() - t0
    lm = vl2.model.language
    cache = StaticCache(lm.cfg, embeds.shape[0] + new_tokens, embeds.dtype, embeds.device)
    t0 = time.perf_counter()
    logits = prefill(lm, embeds, cache)
    prefill_s = time.perf_counter() - t0
    steps = []
    token = int(logits.argmax())
    for _ in range(new_tokens):
        t1 = time.perf_counter()
        token = int(decode_step(lm, token, cache).argmax())
        steps.append(time.perf_counter() - t1)
    steps.sort()
    median = steps[len(steps) // 2]
    weight_bytes = sum(p.numel() * p.element_size() for p in vl2.model.language.parameters())
    return {"model": str(model), "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
            "load_s": round(load_s, 2), "peak_rss_mb": round(peak_rss_bytes() / 2**20),
            "prompt_tokens": int(embeds.shape[0]), "image_tiles": int(inputs.pixel_values.shape[0]),
            "vision_s": round(vision_s, 3), "prefill_s": round(prefill_s, 3),
            "prefill_tok_s": round(embeds.shape[0] / prefill_s, 1),
            "decode_tokens": new_tokens, "decode_ms_median": round(median * 1e3, 1),
            "decode_tok_s": round(1.0 / median, 2), "decoder_weight_gb": round(weight_bytes / 1e9, 3)}


def run_all(model: str, dtypes: list[str], prompt_tokens: int, new_tokens: int, image: str | None,
            device: str) -> list[dict]:
    """Each dtype in a fresh subprocess (clean peak RSS); records in order, with ratios to the first."""
    env = timing_env()
    records = []
    for dtype in dtypes:
        args = [sys.executable, "-m", "edge_vl2.tools.bench", model, dtype, str(prompt_tokens), str(new_tokens),
                image or "", device]
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            records.append({"dtype": dtype, "error": tail})
            continue
        records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r for r in records if "error" not in r), None)
    for r in records:
        if base and "error" not in r and r is not base:
            r["decode_speedup_vs_first"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2)
            r["prefill_speedup_vs_first"] = round(r["prefill_tok_s"] / base["prefill_tok_s"], 2)
    return records


if __name__ == "__main__":  # the child process of run_all
    model, dtype, p_tokens, n_tokens, image, device = sys.argv[1:7]
    print(json.dumps(measure(model, dtype, int(p_tokens), int(n_tokens), image or None, device)))
