"""`edge-vl2 constrain-bench`: what a JSON-Schema constraint costs per decode step, against the same model decoding
unconstrained, in one process with the modes interleaved round by round (the host is noisy: read the ratios).

Modes: `free` (no constraint), `overlap` (the next mask computed in a worker thread during the forward pass, what
generation does) and `inline` (computed when needed). Per step it times the mask on the critical path (waiting for
it + applying it), accepting the token, the worker's compute time, the decode step and the whole step. All modes
sample at the same temperature, so the sampler costs the same. When the grammar finishes before the step budget, a
fresh constraint starts on the same cache (the model keeps decoding, the grammar restarts at the object's start).
"""

from __future__ import annotations

import statistics
import time

from .timing import set_timing_env

MODES = ("free", "overlap", "inline")
DEFAULT_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["vendor", "date", "total", "items"],
    "properties": {
        "vendor": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY", "CNY"]},
        "total": {"type": "number", "minimum": 0, "maximum": 1000000, "multipleOf": 0.01},
        "items": {"type": "array", "maxItems": 20, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "price"],
            "properties": {"name": {"type": "string", "maxLength": 40},
                           "qty": {"type": "integer", "minimum": 0, "maximum": 1000},
                           "price": {"type": "number", "minimum": 0, "maximum": 100000, "multipleOf": 0.01}}}}},
}


def _run(vl2, embeds, prompt_ids, mode: str, schema: dict, steps: int, seed: int) -> dict[str, list[float]]:
    """One mode: prefill, then `steps` decode steps; per-step timings in seconds ("compute": the grammar worker's
    total, one entry)."""
    import torch

    from ..constrain import TokenConstraint, build_grammar, grammar_vocabulary
    from ..generate import SamplingParams, decode_step, prefill, sample
    from ..model.cache import StaticCache

    lm = vl2.model.language
    width, eos = lm.cfg.vocab_size, vl2.tokenizer.eos_id
    params = SamplingParams(temperature=1.0)
    grammar = build_grammar(json_schema=schema) if mode != "free" else None
    vocab = grammar_vocabulary(vl2.tokenizer, width) if mode != "free" else None

    def fresh():
        return None if mode == "free" else TokenConstraint(vocab, grammar, eos, width, overlap=mode == "overlap")

    cache = StaticCache(lm.cfg, embeds.shape[0] + steps + 1, embeds.dtype, embeds.device)
    generator = torch.Generator().manual_seed(seed)
    logits = prefill(lm, embeds, cache)
    c, t, compute = fresh(), {k: [] for k in ("mask", "accept", "decode", "step")}, 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        masked = c.mask(logits) if c is not None else logits
        t1 = time.perf_counter()
        token = sample(masked, params, prompt_ids, generator)
        t2 = time.perf_counter()
        if c is not None and token != eos:
            c.accept(token)
        t3 = time.perf_counter()
        logits = decode_step(lm, token, cache)
        t4 = time.perf_counter()
        if c is not None:
            t["mask"].append(t1 - t0)
            t["accept"].append(t3 - t2)
            if token == eos or c.finished:  # the object closed: the grammar starts again, the cache goes on
                c.close()
                compute += c.stats["compute_s"]
                c = fresh()
        t["decode"].append(t4 - t3)
        t["step"].append(t4 - t0)
    if c is not None:
        c.close()
        t["compute"] = [(compute + c.stats["compute_s"]) / steps]
    return t


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean_ms": round(statistics.fmean(values) * 1e3, 3), "median_ms": round(ordered[len(values) // 2] * 1e3, 3),
            "p90_ms": round(ordered[int(0.9 * (len(values) - 1))] * 1e3, 3), "max_ms": round(ordered[-1] * 1e3, 3)}


def measure(vl2, schema: dict | None = None, image=None, steps: int = 48, rounds: int = 2, seed: int = 0) -> dict:
    """Per-step cost of the constraint vs free decoding; rounds interleave the modes."""
    import torch

    schema = schema or DEFAULT_SCHEMA
    prompt = ("<image>\n" if image is not None else "") + "Extract the receipt as JSON: vendor, date, total, items."
    inputs = vl2.prepare(prompt, [image] if image is not None else [])
    embeds = vl2.embeddings(inputs)
    timings = {m: {k: [] for k in ("mask", "accept", "compute", "decode", "step")} for m in MODES}
    from ..constrain import grammar_vocabulary

    t0 = time.perf_counter()
    grammar_vocabulary(vl2.tokenizer, vl2.model.language.cfg.vocab_size)  # built once, shared: not a step cost
    vocab_s = time.perf_counter() - t0
    for mode in MODES:  # warm-up (first-call allocations, lazy inits), not timed
        _run(vl2, embeds, inputs.input_ids, mode, schema, 4, seed)
    for r in range(rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:  # a different mode goes first each round
            for key, values in _run(vl2, embeds, inputs.input_ids, mode, schema, steps, seed + r).items():
                timings[mode][key] += values
    out = {"prompt_tokens": int(embeds.shape[0]), "steps_per_mode": steps * rounds, "rounds": rounds,
           "image_tiles": int(inputs.pixel_values.shape[0]),
           "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "grammar_vocabulary_s": round(vocab_s, 2),
           "modes": {m: {k: _summary(v) for k, v in timings[m].items() if v} for m in MODES}}
    free_step = statistics.fmean(timings["free"]["step"])
    # The forward pass is the same work in every mode: its median over all modes is the step a stall from another
    # process (seconds, now and then, on a shared host) moves least.
    decode_median = statistics.median(v for m in MODES for v in timings[m]["decode"])
    out["decode_median_all_modes_ms"] = round(decode_median * 1e3, 3)
    for mode in ("overlap", "inline"):
        critical = statistics.fmean(timings[mode]["mask"]) + statistics.fmean(timings[mode]["accept"])
        out["modes"][mode]["mask_plus_accept_mean_ms"] = round(critical * 1e3, 3)
        out["modes"][mode]["mask_plus_accept_pct_of_decode_median"] = round(100 * critical / decode_median, 2)
        out["modes"][mode]["mask_plus_accept_pct_of_free_step"] = round(100 * critical / free_step, 2)
        out["modes"][mode]["step_ratio_to_free"] = round(statistics.fmean(timings[mode]["step"]) / free_step, 3)
        out["modes"][mode]["worker_compute_mean_ms"] = round(statistics.fmean(timings[mode]["compute"]) * 1e3, 3)
        del out["modes"][mode]["compute"]
    return out


def main(bundle: str | None, model: str | None, device_profile: str | None, schema: dict | None, image,
         steps: int, rounds: int, seed: int) -> dict:
    applied = set_timing_env()
    from ..pipeline import VL2Pipeline

    t0 = time.perf_counter()
    if bundle is not None:
        vl2 = VL2Pipeline.from_bundle(bundle, device_profile=device_profile, verify=False)
    else:
        vl2 = VL2Pipeline.from_pretrained(model, device_profile=device_profile)
    load_s = time.perf_counter() - t0
    result = measure(vl2, schema, image, steps, rounds, seed)
    return {"model": bundle or model, "device_profile": device_profile, "timing_env": applied,
            "load_s": round(load_s, 1), **result}
