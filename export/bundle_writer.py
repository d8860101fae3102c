"""Checkpoint -> bundle (schema v1: docs/bundle-format.md, edge_vl2.bundle.manifest): `export_bundle(ExportOptions(...))`.

Order of work, each stage freeing what it loaded before the next:
1. plan from headers only: decoder tensors and their formats, estimated bundle size, planned peak memory per stage;
   refused here (nothing written) when the memory plan exceeds what the machine has, or `--device` cannot fit it;
2. tokenizer and processor files copied;
3. vision graph(s): only the tower + projector are loaded, exported and validated against PyTorch;
4. decoder: `rtn` streams from the checkpoint (never loads the model); `gptq` loads the model (bf16 decoder, fp32
   vision), calibrates and quantizes it in memory;
5. fidelity on held-out samples (`fidelity_samples`, 0 = skipped and recorded as such): needs the model in memory;
6. sha256 of every file, then manifest.json written last.

Everything is written into a staging folder beside the output (`.NAME.edge-vl2-staging-HOST-PID`, same filesystem)
that is renamed to the output at the very end. Any error, Ctrl-C or SIGTERM removes it. A SIGKILL (or power loss)
cannot: the next export to the same output finds that folder, sees its process is gone and deletes it; the runtime
never reads such a folder (it has no manifest and a hidden name).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from edge_vl2 import __version__, checks
from edge_vl2.bundle.manifest import MANIFEST, SCHEMA, SCHEMA_VERSION, Manifest
from edge_vl2.bundle.reader import sha256_file
from edge_vl2.devices.profiles import check_fit, load_device
from edge_vl2.errors import UserError, one_line
from edge_vl2.export import toolchain
from edge_vl2.inputs.processor import Processor
from edge_vl2.model.cache import cache_bytes
from edge_vl2.model.checkpoint import open_checkpoint
from edge_vl2.model.vl2 import load_model
from edge_vl2.procinfo import available_memory, peak_rss_bytes
from edge_vl2.quantize.recipe import INT8, Recipe, preset

from .decoder_export import ShardWriter, stream_rtn, write_quantized
from .plan import GB, SourceReader, plan_decoder, plan_memory, vision_bytes

STAGING_TAG = "edge-vl2-staging"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
VISION_PRECISIONS = ("fp32", "fp16", "int8")
VISION_RECIPES = ("fused", "fused-vnni", "plain")  # edge_vl2.export.vision_onnx.RECIPES (imported lazily there)
# Without --device: fp16 runs on every provider (GPU natively, ORT CPU by casting) at half the fp32 size, which a
# Tiny INT4 bundle needs to stay under 2.8 GB. A device profile picks its own (cpu-kiosk: int8, GPUs: fp16).
DEFAULT_VISION = "fp16"
METHODS = ("gptq", "rtn")


@dataclass
class ExportOptions:
    model: str  # checkpoint folder or Hub id
    out: str  # bundle folder to create
    recipe: str = "int4"  # int4 | int8 | mixed | bf16 | path to a recipe JSON
    method: str = "gptq"  # gptq (calibrated, model in memory) | rtn (streamed, any size)
    mode: str = "blend"  # GPTQ routed-expert Hessians: routed | all-tokens | blend
    calib_dir: str | None = None  # folder of calibration images (default: rendered documents, charts, receipts)
    calib_samples: int = 32
    fidelity_samples: int = 4  # held-out samples; 0 skips (recorded as skipped)
    vision: tuple[str, ...] | None = None  # graph precisions; default from the device profile, else DEFAULT_VISION
    vision_recipe: str | None = None  # fused | fused-vnni | plain (vision_onnx.RECIPES); default per precision
    device: str | None = None  # device profile the bundle must fit
    shard_gb: float = 1.0
    max_memory_gb: float | None = None  # default: MemAvailable now
    max_tiles: int = 3  # tiles per calibration / evaluation image (~6 s each for the full-size tower on 2 cores)
    int8_share: float = 0.25  # mixed: share of the routed experts' INT4 -> INT8 byte difference spent on INT8


def resolve_recipe(name: str) -> Recipe:
    """A preset (`mixed` is its INT4 base here; the per-expert INT8 choice is made from calibration data) or a
    recipe JSON file."""
    try:
        return preset(name)
    except ValueError as e:
        path, not_preset = Path(name), str(e)
    if not path.exists():
        raise UserError(f"--recipe {name}: {not_preset}, nor a recipe JSON file")
    try:
        return Recipe.from_dict(checks.read_json(path, "recipe file", 1 << 24))
    except ValueError as e:
        raise UserError(f"{path}: not a valid recipe ({one_line(e)})") from None


# --- staging ------------------------------------------------------------------------------------------------------

def staging_prefix(out: Path) -> str:
    return f".{out.name}.{STAGING_TAG}-"


def staging_dir(out: Path) -> Path:
    return out.parent / f"{staging_prefix(out)}{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path, log: Callable[[str], None]) -> None:
    """Delete staging folders of earlier exports to `out` whose process is gone (killed, or the machine rebooted);
    refuse while one is still running here. Folders from other hosts (shared filesystems) are left alone."""
    host = socket.gethostname()
    for folder in sorted(out.parent.glob(staging_prefix(out) + "*")):
        owner, _, pid = folder.name[len(staging_prefix(out)):].rpartition("-")
        if owner != host or not pid.isdigit():
            log(f"note: {folder} belongs to an export on {owner or 'another host'}; left alone")
        elif _alive(int(pid)) and int(pid) != os.getpid():
            raise UserError(f"{out}: another export (pid {pid}) is writing it now ({folder})")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            log(f"removed {folder.name}, left by an interrupted export (pid {pid})")


class ProgressLine:
    """`label i/n pct elapsed` on stderr: redrawn in place on a terminal, one line per 10 % otherwise."""

    def __init__(self, label: str):
        self.label, self.t0, self.shown = label, time.perf_counter(), -1
        self.tty = sys.stderr.isatty()

    def __call__(self, i: int, n: int) -> None:
        pct = 100 * i // max(n, 1)
        if not self.tty and pct // 10 == self.shown and i != n:
            return
        self.shown = pct // 10
        line = f"[{self.label}] {i}/{n} {pct:3d}% {time.perf_counter() - self.t0:6.0f} s"
        sys.stderr.write(("\r" + line + ("\n" if i == n else "")) if self.tty else line + "\n")
        sys.stderr.flush()


# --- the export -----------------------------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _source_info(model: str, model_dir: Path) -> dict:
    revision = model_dir.name if model_dir.parent.name == "snapshots" else None  # Hub cache layout
    return {"model": model, "path": str(model_dir.resolve()), "revision": revision,
            "config_sha256": sha256_file(model_dir / "config.json")}


def _finite(value):
    """JSON-safe: NaN / inf (e.g. a percentile of nothing) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return None
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class ExportPlan:
    """Everything decided before the first byte is written: the source, the recipe, the tensor plans, the vision
    graphs, and the size and memory estimates the export was allowed to start on."""

    model_dir: Path
    cfg: object  # VL2Config
    ckpt: object  # the checkpoint reader (weight map)
    processor: Processor
    recipe: Recipe
    method: str  # gptq | rtn | none (a recipe that quantizes nothing)
    plans: list
    precisions: list[str]
    estimate: int
    memory: dict[str, int]
    profile: object | None  # DeviceProfile


def export_bundle(opts: ExportOptions, log: Callable[[str], None] = _say) -> Manifest:
    """Write the bundle `opts.out` from `opts.model`; returns its manifest. Nothing is left at `opts.out` (or beside
    it) unless the whole export succeeded."""
    t_start = time.perf_counter()
    _check_options(opts)
    out = Path(opts.out).expanduser()
    if out.exists() or out.is_symlink():
        raise UserError(f"{out}: already exists; choose a new folder (a bundle is never overwritten)")
    clean_stale_staging(out, log)
    stage, made = _make_stage(out)  # first, so an --out that cannot be written fails before any work
    try:
        plan = plan_export(opts, log)
        manifest = replace(_write(opts, plan, stage, log), export={
            "seconds": round(time.perf_counter() - t_start, 1), "estimated_bytes": plan.estimate,
            "planned_peak_bytes": plan.memory["peak"], "memory_plan": plan.memory, "peak_rss_bytes": peak_rss_bytes(),
            "device": plan.profile.name if plan.profile else None, "torch": torch.__version__}).with_digest()
        with open(stage / MANIFEST, "w", encoding="ascii") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            raise UserError(f"{out}: appeared while exporting; the new bundle is not published")
        os.rename(stage, out)
    except BaseException as e:
        shutil.rmtree(made, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions, a folder removed under us: the user's to fix
            raise UserError(f"{out}: export failed: {e.strerror or e} ({e.filename or 'no file name'})") from None
        raise
    total = manifest.file_bytes(manifest.files)
    log(f"wrote {out}: {total / GB:.3f} GB (estimated {plan.estimate / GB:.3f} GB), peak RSS "
        f"{manifest.export['peak_rss_bytes'] / GB:.2f} GB (planned {plan.memory['peak'] / GB:.1f} GB), "
        f"{manifest.export['seconds']:.0f} s")
    return manifest


def _make_stage(out: Path) -> tuple[Path, Path]:
    """Create the staging folder (and OUT's missing parents); returns it and the topmost folder made, which an error
    removes whole."""
    made = staging_dir(out)
    while not made.parent.exists() and made.parent != made.parent.parent:
        made = made.parent
    try:
        staging_dir(out).mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the bundle folder there ({e.strerror})") from None
    return staging_dir(out), made


def _check_options(opts: ExportOptions) -> None:
    """ExportOptions from an API caller, checked like the CLI's option types check them."""
    checks.path_arg(opts.out, "out")
    checks.path_arg(opts.model, "model")
    checks.text(opts.recipe, "recipe", nonempty=True)
    checks.choice(opts.method, "method", METHODS)
    checks.choice(opts.mode, "mode", ("routed", "all-tokens", "blend"))
    checks.integer(opts.fidelity_samples, "fidelity_samples", 0)
    checks.integer(opts.calib_samples, "calib_samples", 1)
    checks.integer(opts.max_tiles, "max_tiles", 1)
    checks.number(opts.shard_gb, "shard_gb", 0.001)
    checks.number(opts.int8_share, "int8_share", 0, 1)
    if opts.max_memory_gb is not None:
        checks.number(opts.max_memory_gb, "max_memory_gb", 0, lo_open=True)
    if opts.vision is not None and (not isinstance(opts.vision, (tuple, list)) or not opts.vision
                                    or len(set(opts.vision)) < len(opts.vision)
                                    or not set(opts.vision) <= set(VISION_PRECISIONS)):
        raise UserError(f"vision must be one or more of {', '.join(VISION_PRECISIONS)}, each once, got "
                        f"{checks.show(opts.vision)}")
    if opts.vision_recipe is not None:
        checks.choice(opts.vision_recipe, "vision_recipe", VISION_RECIPES)
    if opts.device is not None:
        checks.text(opts.device, "device", nonempty=True)
    if opts.calib_dir is not None and not checks.path_arg(opts.calib_dir, "calib_dir").is_dir():
        raise UserError(f"--calib-dir {opts.calib_dir}: no such folder")
    if opts.recipe == "mixed" and opts.method != "gptq":
        raise UserError("recipe mixed chooses INT8 experts from calibration data: it needs --method gptq")


def plan_export(opts: ExportOptions, log: Callable[[str], None]) -> ExportPlan:
    """Stage 1, from headers only: what will be written, how big, how much memory each stage needs; refused here
    (nothing written) when the memory plan exceeds what the machine has, or `--device` cannot fit the bundle."""
    recipe = resolve_recipe(opts.recipe)
    profile = load_device(opts.device) if opts.device else None
    precisions = list(opts.vision or [profile.vision_precision if profile else DEFAULT_VISION])
    method = opts.method if any(v is not None for v in recipe.to_dict()["modules"].values()) else "none"
    model_dir, cfg, ckpt = open_checkpoint(opts.model)
    processor = Processor.from_pretrained(model_dir)  # a broken tokenizer fails now, not after the decoder
    plans = plan_decoder(cfg, recipe)
    decoder_est = sum(p.nbytes for p in plans)
    if opts.recipe == "mixed":  # the allocation spends int8_share of the INT4 -> INT8 difference of the routed experts
        high = plan_decoder(cfg, replace(recipe, routed_experts=INT8))
        decoder_est += int(opts.int8_share * sum(h.nbytes - p.nbytes for h, p in zip(high, plans) if p.stacked))
    graph_est = {p: vision_bytes(cfg, p) for p in precisions}
    files_est = sum((model_dir / f).stat().st_size for f in TOKENIZER_FILES if (model_dir / f).is_file())
    estimate = decoder_est + sum(graph_est.values()) + files_est
    memory = plan_memory(cfg, plans, method, opts.fidelity_samples > 0, int(opts.shard_gb * GB), precisions)
    limit = int(opts.max_memory_gb * GB) if opts.max_memory_gb else available_memory()
    log(f"export {cfg.variant} ({model_dir}) recipe {recipe.name}, method {method}, vision {'+'.join(precisions)}")
    log(f"estimated bundle size {estimate / GB:.2f} GB (decoder {decoder_est / GB:.2f} GB, vision "
        + ", ".join(f"{p} {b / GB:.2f} GB" for p, b in graph_est.items()) + ")")
    log("planned peak memory " + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in memory.items())
        + f"; limit {limit / GB:.1f} GB")
    if profile:
        graph = profile.vision_precision if profile.vision_precision in precisions else precisions[0]
        check_fit(profile, decoder_est + graph_est[graph], cache_bytes(cfg.language), f"this bundle ({cfg.variant}, "
                  f"{recipe.name}, {graph} vision)")
    over = {k: v for k, v in memory.items() if k != "peak" and v > limit}
    if over:
        stage, need = max(over.items(), key=lambda kv: kv[1])
        hint = {"gptq": "use --method rtn (streams the checkpoint)", "fidelity": "pass --fidelity-samples 0",
                "vision": "free memory or pass --max-memory-gb if this is wrong",
                "decoder": "lower --shard-gb"}[stage]
        raise UserError(f"the {stage} stage needs about {need / GB:.1f} GB and {limit / GB:.1f} GB is available: "
                        f"{hint}")
    return ExportPlan(model_dir, cfg, ckpt, processor, recipe, method, plans, precisions, estimate, memory, profile)


def _write(opts: ExportOptions, plan: ExportPlan, stage: Path, log: Callable[[str], None]) -> Manifest:
    """Stages 2-6 into `stage`; returns the manifest without its export record and digest."""
    model_dir, processor = plan.model_dir, plan.processor
    copied = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    for f in copied:
        shutil.copyfile(model_dir / f, stage / f)
    graphs = toolchain.export_vision_graphs(model_dir, stage, plan.precisions,
                                            toolchain.validation_images(opts.calib_dir, opts.max_tiles), processor, log,
                                            opts.vision_recipe)
    model, recipe, plans, writer, calibration = _write_decoder(opts, plan, stage, log)
    fidelity = _fidelity(opts, plan, model, plans, writer, stage, log)
    del model
    files = _hash_files(stage)
    tok = processor.tokenizer
    return Manifest.from_dict({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "toolchain_version": __version__,
        "source": _source_info(opts.model, model_dir), "variant": plan.cfg.variant,
        "config": json.loads((model_dir / "config.json").read_text()),
        "tokens": {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "image": tok.image_id,
                   "special": tok.special_ids},
        "processor": {"config": processor.config.to_dict(), "template": processor.config.sft_format,
                      "files": copied},
        "recipe": {**recipe.to_dict(), "method": plan.method, "mode": opts.mode if plan.method == "gptq" else None,
                   "calibration": calibration},
        "decoder": {"files": writer.files, "dtype": "bf16",
                    "tensors": {k: {"dtype": d, "shape": s} for k, (d, s) in writer.expected.items()},
                    "quantized": {prefix: {"param": p.name, "bits": s.bits, "group_size": s.group_size,
                                           "symmetric": s.symmetric, "shape": list(shape)}
                                  for p in plans for prefix, s, shape in p.weights()},
                    "high_precision": [p.name for p in plans if not p.quantized],
                    "bytes": sum(files[f]["bytes"] for f in writer.files)},
        "vision": {"graphs": graphs}, "fidelity": {k: v for k, v in fidelity.items() if k != "domains"},
        "fidelity_domains": fidelity.get("domains"), "files": files,
    }, "the manifest being written")


def _write_decoder(opts: ExportOptions, plan: ExportPlan, stage: Path, log: Callable[[str], None]):
    """Stage 4: GPTQ (model in memory) or streamed RTN; returns (model or None, recipe, plans, writer, calibration)."""
    recipe, plans = plan.recipe, plan.plans
    writer = ShardWriter(stage, plans, int(opts.shard_gb * GB))
    model, calibration = None, {}
    t0 = time.perf_counter()
    if plan.method == "gptq":
        model, _ = load_model(plan.model_dir, dtype=torch.bfloat16, vision_dtype=torch.float32)
        calib = toolchain.calibration(model, plan.processor, opts.calib_samples, opts.calib_dir, opts.max_tiles, log)
        if opts.recipe == "mixed":
            recipe, calibration["allocation"] = toolchain.allocate_mixed(model, calib, recipe, opts.int8_share,
                                                                         opts.mode, log)
            plans = plan_decoder(plan.cfg, recipe)
            writer = ShardWriter(stage, plans, int(opts.shard_gb * GB))
        weights, summary = toolchain.gptq(model, recipe, calib, opts.mode, log)
        calibration.update(summary)
        write_quantized(model, weights, plans, writer, ProgressLine("decoder write"))
        del weights, calib
    else:
        stream_rtn(SourceReader(plan.model_dir, plan.ckpt.weight_map), plan.cfg, plans, writer,
                   ProgressLine("decoder"))
    log(f"decoder: {len(writer.files)} file(s), {time.perf_counter() - t0:.0f} s")
    return model, recipe, plans, writer, calibration


def _fidelity(opts: ExportOptions, plan: ExportPlan, model, plans, writer, stage: Path,
              log: Callable[[str], None]) -> dict:
    """Stage 5: the written decoder against the checkpoint on held-out samples (consumes the model)."""
    if not opts.fidelity_samples:
        return {"skipped": "--fidelity-samples 0"}
    if model is None:
        model, _ = load_model(plan.model_dir, dtype=torch.bfloat16, vision_dtype=torch.float32)
    work = stage / ".work"
    t0 = time.perf_counter()
    fidelity = toolchain.fidelity(model, plan.processor, [stage / f for f in writer.files], plans,
                                  opts.fidelity_samples, work, opts.max_tiles)
    shutil.rmtree(work)
    log(f"fidelity on {fidelity['samples']} held-out samples: KL mean {fidelity['kl_mean']:.5f} "
        f"p99 {fidelity['kl_p99']:.5f}, top-1 agreement {100 * fidelity['top1_agreement']:.2f} %, routing "
        f"overlap {fidelity['routing_overlap_mean'] or float('nan'):.4f}, {time.perf_counter() - t0:.0f} s")
    for d, f in fidelity["domains"].items():
        log(f"  held-out {d}: KL mean {f['kl_mean']:.5f} p99 {f['kl_p99']:.5f}, top-1 {100 * f['top1']:.2f} %")
    return _finite(fidelity)


def _hash_files(stage: Path) -> dict:
    """Stage 6: size and sha256 of every file, each made readable per the umask."""
    files = sorted(p.name for p in stage.iterdir())
    hashes, progress = {}, ProgressLine("sha256")
    mode = 0o666 & ~_umask()  # some writers make 0600 files; a bundle is read by whoever runs it
    for i, name in enumerate(files):
        os.chmod(stage / name, mode)
        hashes[name] = {"bytes": (stage / name).stat().st_size, "sha256": sha256_file(stage / name)}
        progress(i + 1, len(files))
    return hashes
