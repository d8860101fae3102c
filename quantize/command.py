"""`edge-vl2 quantize`: quantize the decoder under one or several configurations and measure each against the full
precision model on held-out samples, with the reference computed once.

    report = run_quantize(QuantizeOptions(model="ckpt/", configs=parse_configs("rtn-int4,gptq-int4,mixed")))

A configuration is `[method-]recipe[-hessians]`: method `rtn` or `gptq`, a recipe preset (`int8`, `int4`,
`int4-g32`, `mixed`, `bf16`) or a recipe JSON file, and the expert-Hessian mode (`routed`, `all-tokens`, `blend`);
what is left out comes from the command's --method / --hessians.

Memory (full-size Tiny: 3.37B parameters): the model is loaded once in bf16 (6.7 GB) with the vision tower in fp32;
vision runs only while encoding the calibration and evaluation samples, then the tower is dropped. GPTQ works on one
fp32 layer copy at a time. The reference logits go to a temporary folder on disk. Each configuration's quantized
weights are swapped into the model one parameter at a time and the originals re-read from the checkpoint afterwards,
so no second copy of the decoder is ever held.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from edge_vl2.errors import UserError
from edge_vl2.procinfo import peak_rss_bytes

from .calibration import MODES, CalibrationSet, decoder_inputs, encode_samples
from .formats import QuantSpec
from .model_gptq import METHODS
from .recipe import Recipe, load_recipe

GB = 1e9


@dataclass(frozen=True)
class Config:
    """One configuration to measure: `label` as the user wrote it."""

    label: str
    method: str
    recipe: str  # preset name or JSON path
    mode: str


def parse_configs(text: str, method: str = "gptq", mode: str = "blend") -> list[Config]:
    """`rtn-int4,gptq-int8,mixed,gptq-int4-g32-routed,my.json` -> configurations (UserError on a bad entry)."""
    out = []
    for label in (t.strip() for t in text.split(",")):
        if not label:
            raise UserError(f"--compare {text!r}: empty entry")
        m = re.fullmatch(rf"(?:({'|'.join(METHODS)})-)?(.+?)(?:-({'|'.join(MODES)}))?", label)
        cfg = Config(label, m.group(1) or method, m.group(2), m.group(3) or mode)
        try:
            if cfg.recipe != "mixed":
                load_recipe(cfg.recipe)
        except ValueError as e:
            raise UserError(f"--compare entry {label!r}: {e}") from None
        out.append(cfg)
    if len({c.label for c in out}) != len(out):
        raise UserError(f"--compare {text!r}: an entry is repeated")
    return out


@dataclass
class QuantizeOptions:
    model: str
    configs: list[Config]
    calib: int = 32  # calibration samples (0: none; GPTQ and mixed need some)
    calib_dir: str | None = None  # the user's calibration images instead of rendered ones
    eval: int = 8  # held-out evaluation samples (0: no fidelity figures)
    max_tokens: int = 768  # per sequence; 617 image tokens for a 3-tile image, then the prompt text
    max_tiles: int = 3
    dtype: str = "bf16"  # decoder dtype (the reference); vision always fp32
    mixed_candidates: tuple[str, ...] = ("int4-g128", "int4-g32", "int8-channel")
    mixed_budget: str = "int4-g32"  # bytes of this uniform routed-expert spec, or a number of GB of routed experts
    sensitivity: str = "gptq"
    suite: int = 2  # held-out suite items per domain (prose, chat, photo, document, multi_image); 0: none
    photo_dir: str | None = None  # the suite's photos (None: the repo's tests/fixtures/images)
    answer_tokens: int = 32  # the reference's greedy answer, teacher-forced, scored in the suite
    calib_answers: int = 0  # the reference's greedy answer appended to each calibration sequence (decode-time
    #                         activations in the Hessians)
    suite_dir: str | None = None  # keep the suite's sequences and reference here (for `edge-vl2 peer`)
    percdamp: float = 0.01  # GPTQ damping (fraction of the Hessian's mean diagonal); pick it on the held-out suite
    report_path: str | None = None  # the report so far is written here after each configuration
    progress: Callable[[str], None] = field(default=lambda _m: None)


def run_quantize(opts: QuantizeOptions) -> dict:
    """Run every configuration; returns the report (also what `--report` writes)."""
    from edge_vl2.dtypes import TORCH_DTYPES
    from edge_vl2.inputs.processor import Processor
    from edge_vl2.model.checkpoint import resolve_model_dir
    from edge_vl2.model.vl2 import load_model

    from .calibration_data import calibration_samples, evaluation_samples
    from .fake_quant import checkpoint_restorer, decoder_bytes, swapped
    from .fidelity import compare, reference_from_encoded
    from .heldout.suite import suite_compare
    from .model_gptq import quantize_decoder

    say = opts.progress
    t_start = time.perf_counter()
    if any(c.recipe == "mixed" for c in opts.configs):
        _budget_spec(opts.mixed_budget)  # bad budgets fail before the model loads
    needs_calib = any(c.method == "gptq" or c.recipe == "mixed" for c in opts.configs)
    if needs_calib and opts.calib <= 0:
        raise UserError("GPTQ and the mixed recipe need calibration data: --calib-samples must be > 0")
    model_dir = resolve_model_dir(opts.model)
    # bad calibration folders fail before the model loads
    calib_samples = list(calibration_samples(opts.calib, seed=0, image_dir=opts.calib_dir,
                                             max_tiles=opts.max_tiles)) if opts.calib > 0 else []
    t0 = time.perf_counter()
    model, _ = load_model(model_dir, dtype=TORCH_DTYPES[opts.dtype], vision_dtype=torch.float32)
    processor = Processor.from_pretrained(model_dir)
    report: dict = {"model": str(model_dir), "variant": model.cfg.variant, "dtype": opts.dtype,
                    "percdamp": opts.percdamp,
                    "load_seconds": round(time.perf_counter() - t0, 1)}
    say(f"loaded {model_dir} ({model.cfg.variant}, decoder {opts.dtype}) in {report['load_seconds']} s")

    t0 = time.perf_counter()
    with torch.inference_mode():
        calib = _calibration(model, processor, calib_samples, opts.max_tokens, opts.calib_answers) \
            if calib_samples else None
        encoded = encode_samples(model, processor, evaluation_samples(opts.eval, max_tiles=opts.max_tiles))
        sequences = _suite_sequences(model, processor, opts)
    model.vision = model.projector = None  # every image is encoded: the tower's memory goes back
    report["calibration"] = {"sequences": len(calib), "tokens": calib.tokens, "images": calib.images,
                             "source": opts.calib_dir or "rendered"} if calib else None
    report["encode_seconds"] = round(time.perf_counter() - t0, 1)
    say(f"calibration {report['calibration']}; {len(encoded)} held-out samples; vision and embeddings "
        f"{report['encode_seconds']} s")

    with tempfile.TemporaryDirectory(prefix="edge-vl2-reference-") as cache:
        t0 = time.perf_counter()
        reference = reference_from_encoded(model, encoded, max_tokens=opts.max_tokens, cache_dir=cache) \
            if encoded else None
        report["reference_seconds"] = round(time.perf_counter() - t0, 1)
        say(f"full-precision reference on {len(encoded)} held-out samples: {report['reference_seconds']} s")
        suite_ref = _suite_reference(model, sequences, opts, cache, report)
        restore = checkpoint_restorer(model, model_dir)
        report["runs"] = []
        sensitivity_cache: dict = {}
        for cfg in opts.configs:
            t0 = time.perf_counter()
            recipe, allocation = _recipe(cfg, model, calib, opts, sensitivity_cache)
            result = quantize_decoder(model, recipe, calib, cfg.method, cfg.mode, percdamp=opts.percdamp,
                                      progress=say)
            run = {"config": cfg.label, "method": cfg.method, "hessians": cfg.mode if cfg.method == "gptq" else None,
                   "recipe": recipe.to_dict(), "allocation": allocation,
                   "quantize_seconds": round(time.perf_counter() - t0, 1)}
            t1 = time.perf_counter()
            with swapped(model, result.weights, restore=restore):
                fidelity = compare(reference, model, quant=result) if reference is not None else None
                run["suite"] = suite_compare(suite_ref, model) if suite_ref is not None else None
            run["compare_seconds"] = round(time.perf_counter() - t1, 1)
            run["expert_tokens"] = expert_token_summary(result.expert_tokens)
            run["bytes"] = decoder_bytes(model, result.weights)
            run["fidelity"] = fidelity
            report["runs"].append(run)
            say(f"{cfg.label}: quantized in {run['quantize_seconds']} s, compared in {run['compare_seconds']} s")
            if opts.report_path:  # a long run that dies later keeps what it measured
                from .fidelity import write_json

                write_json(report, opts.report_path)
            del result
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["peak_rss_gb"] = round(peak_rss_bytes() / GB, 2)
    return report


def expert_token_summary(expert_tokens: dict[str, list[int]]) -> dict | None:
    """Routed calibration tokens per expert over all MoE layers: min / p10 / median / max and how many experts saw
    fewer than 32 (where the blended Hessian leans on the all-token statistics)."""
    counts = sorted(c for layer in expert_tokens.values() for c in layer)
    if not counts:
        return None
    at = lambda q: counts[min(len(counts) - 1, int(q * len(counts)))]  # noqa: E731
    return {"experts": len(counts), "min": counts[0], "p10": at(0.1), "median": at(0.5), "max": counts[-1],
            "under_32": sum(c < 32 for c in counts)}


def _calibration(model, processor, samples, max_tokens: int, answer_tokens: int = 0) -> CalibrationSet:
    """Decoder inputs of the calibration samples (vision once per image), each followed by the embeddings of the
    model's own greedy answer (`answer_tokens`, teacher-forced) so decode-time activations reach the Hessians."""
    from .heldout.suite import greedy_answer

    embeds = []
    for enc in encode_samples(model, processor, samples):
        x = decoder_inputs(model, enc, max_tokens)
        if answer_tokens:
            answer = torch.tensor(greedy_answer(model, x, answer_tokens), device=x.device)
            x = torch.cat([x, model.language.model.embed_tokens(answer).to(x.dtype)])
        embeds.append(x.float().clone())
    return CalibrationSet(embeds, sum(len(s.images) for s in samples))


def _suite_sequences(model, processor, opts: QuantizeOptions) -> list:
    """The held-out suite's teacher-forced sequences (vision runs here, before the tower is dropped)."""
    if not opts.suite:
        return []
    from .heldout.domains import DEFAULT_PHOTO_DIR, heldout_items
    from .heldout.suite import build_sequences

    t0 = time.perf_counter()
    items = heldout_items(opts.suite, photo_dir=opts.photo_dir or DEFAULT_PHOTO_DIR, max_tiles=opts.max_tiles)
    seqs = build_sequences(model, processor, items, opts.answer_tokens, progress=opts.progress)
    opts.progress(f"held-out suite: {len(seqs)} sequences, {time.perf_counter() - t0:.0f} s")
    return seqs


def _suite_reference(model, sequences: list, opts: QuantizeOptions, cache: str, report: dict):
    """The reference on the suite (kept in `opts.suite_dir` for `edge-vl2 peer` when given)."""
    if not sequences:
        report["suite"] = None
        return None
    from .heldout.suite import save_suite, suite_reference

    t0 = time.perf_counter()
    ref = suite_reference(model, sequences, cache_dir=opts.suite_dir or cache)
    if opts.suite_dir:
        save_suite(ref, opts.suite_dir)
    report["suite"] = {"sequences": len(sequences), "answer_tokens": opts.answer_tokens,
                       "domains": sorted({s.domain for s in sequences}),
                       "reference_seconds": round(time.perf_counter() - t0, 1), "saved_to": opts.suite_dir}
    return ref


def _recipe(cfg: Config, model, calib, opts: QuantizeOptions, cache: dict) -> tuple[Recipe, dict | None]:
    """The configuration's recipe; `mixed` runs the per-expert allocation (sensitivities cached per mode)."""
    if cfg.recipe != "mixed":
        return load_recipe(cfg.recipe), None
    from .allocate import allocate, measure_sensitivity, mixed_recipe
    from .recipe import preset

    candidates = [load_recipe(c).routed_experts for c in opts.mixed_candidates]
    key = (cfg.mode, opts.sensitivity)
    if key not in cache:
        t0 = time.perf_counter()
        cache[key] = measure_sensitivity(model, calib, candidates, method=opts.sensitivity, mode=cfg.mode,
                                         progress=opts.progress)
        opts.progress(f"per-expert sensitivity ({opts.sensitivity}, {len(candidates)} candidates): "
                      f"{time.perf_counter() - t0:.0f} s")
    budget = _budget(opts.mixed_budget, model)
    allocation = allocate(cache[key], budget)
    opts.progress(f"mixed: experts per format {allocation.counts()}, {allocation.expert_bytes / GB:.4f} GB of "
                  f"routed experts (budget {budget / GB:.4f} GB)")
    return mixed_recipe(preset("mixed"), allocation, name="mixed"), allocation.summary()


def summary_table(report: dict) -> str:
    """One line per configuration: bytes, KL, top-1, routing overlap, time."""
    lines = [f"{'config':24s} {'decoder GB':>10s} {'x bf16':>6s} {'KL mean':>9s} {'KL p99':>8s} {'top-1 %':>7s} "
             f"{'routing':>7s} {'quantize s':>10s}"]
    for run in report["runs"]:
        f, b = run["fidelity"] or {}, run["bytes"]
        cells = [f"{b['total'] / GB:10.4f}", f"{b['total'] / b['bf16_total']:6.3f}"]
        cells += [f"{f['kl_mean']:9.5f}", f"{f['kl_p99']:8.4f}", f"{100 * f['top1_agreement']:7.2f}",
                  f"{f['routing_overlap_mean']:7.4f}"] if f else [" " * 9, " " * 8, " " * 7, " " * 7]
        lines.append(f"{run['config']:24s} " + " ".join(cells) + f" {run['quantize_seconds']:10.1f}")
    return "\n".join(lines) + _suite_table(report)


def _suite_table(report: dict) -> str:
    """Held-out suite: KL mean (top-1 %) per domain and configuration."""
    runs = [r for r in report["runs"] if r.get("suite")]
    if not runs:
        return ""
    domains = list(runs[0]["suite"]["domains"])
    lines = ["", "held-out suite, KL mean (top-1 %) at text positions + teacher-forced answers:",
             f"{'config':24s} {'decoder GB':>10s} " + " ".join(f"{d:>16s}" for d in domains)]
    for run in runs:
        cells = [f"{run['suite']['domains'][d]['kl_mean']:8.4f} ({100 * run['suite']['domains'][d]['top1']:4.1f})"
                 for d in domains]
        lines.append(f"{run['config']:24s} {run['bytes']['total'] / GB:10.4f} " + " ".join(f"{c:>16s}" for c in cells))
    return "\n".join(lines)


def _budget_spec(text: str) -> float | QuantSpec:
    """--mixed-budget: a number of GB of routed experts, or a recipe whose uniform routed experts set the bytes."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        spec = load_recipe(text).routed_experts
    except ValueError as e:
        raise UserError(f"--mixed-budget {text!r}: expected a number of GB or a recipe name ({e})") from None
    if spec is None:
        raise UserError(f"--mixed-budget {text!r}: that recipe leaves the routed experts unquantized")
    return spec


def _budget(text: str, model) -> int:
    """Routed-expert byte budget (see _budget_spec)."""
    from .allocate import routed_expert_bytes

    spec = _budget_spec(text)
    return int(spec * GB) if isinstance(spec, float) else routed_expert_bytes(model, spec)
