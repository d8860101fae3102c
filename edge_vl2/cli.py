"""`edge-vl2` command line: thin commands over the library; heavy imports happen inside each command."""

from __future__ import annotations

import functools
import sys

import click

from .errors import UserError


def one_line_errors(fn):
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (try a smaller model, fewer images or --max-new-tokens)", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="edge-vl2")
def main():
    """DeepSeek-VL2 Tiny/Small on a 16 GB GPU, a Jetson Orin or a CPU-only PC, offline."""


@main.command()
@click.option("--model", default=None, help="Checkpoint folder in the official layout, or a Hub id (reference mode).")
@click.option("--bundle", default=None, type=click.Path(), help="A bundle folder written by `edge-vl2 export`.")
@click.option("--image", "images", multiple=True, help="An image file; repeat for several, in <image> tag order.")
@click.option("--system", default=None, help="System text placed before the first turn.")
@click.option("--max-new-tokens", default=512, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32", "fp16"]), default="auto", show_default=True,
              help="Bundles: auto = bf16; fp32 for reference comparisons.")
@click.option("--device", "device_profile", default=None,
              help="Device profile (e.g. cpu-kiosk, orin-nx-16gb, or a .toml): refuse, before loading, what cannot "
                   "fit it; for bundles it also picks the backend, vision graph and ONNX Runtime providers.")
@click.option("--backend", type=click.Choice(["cpu", "cuda", "reference", "bnb"]), default=None,
              help="Bundle decoder backend [default: the device profile's, else cuda when available, else cpu].")
@click.option("--skip-verify", is_flag=True,
              help="Bundle: skip the sha256 pass over its files (startup time); sizes, tensor shapes and the "
                   "manifest are still checked.")
@click.option("--torch-device", default="cpu", show_default=True, help="Reference mode (--model): torch device.")
@click.option("--stats/--no-stats", default=False, help="Print token counts and timings to stderr.")
@click.argument("prompt")
@one_line_errors
def run(model, bundle, images, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, dtype,
        device_profile, backend, skip_verify, torch_device, stats, prompt):
    """Answer PROMPT about the images, streaming the text; grounding boxes are also printed in pixels.

    Give either --model (reference mode: the checkpoint in bf16/fp32) or --bundle (an exported, quantized bundle).
    Images without an <image> tag in PROMPT get one on a line of its own at the start (official demo convention).
    """
    from .generate import SamplingParams
    from .grounding import format_boxes
    from .images import load_image
    from .pipeline import VL2Pipeline

    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty, seed=seed)
    if (model is None) == (bundle is None):
        raise UserError("give exactly one of --model (a checkpoint) or --bundle (an exported bundle)")
    if model is not None and (backend or skip_verify):
        raise UserError("--backend and --skip-verify apply to --bundle only")
    if bundle is not None and dtype == "fp16":
        raise UserError("bundles run in bf16 (--dtype auto) or fp32")
    pil_images = [load_image(p) for p in images]  # bad images fail before the model loads
    if bundle is not None:
        vl2 = VL2Pipeline.from_bundle(bundle, backend=backend, device_profile=device_profile,
                                      verify=not skip_verify, dtype="fp32" if dtype == "fp32" else "bf16")
    else:
        if device_profile is not None:
            from .bundle_runtime import check_checkpoint_fit

            check_checkpoint_fit(model, device_profile, dtype, torch_device)
        vl2 = VL2Pipeline.from_pretrained(model, dtype=dtype, device=torch_device)
    inputs = vl2.prepare(prompt, pil_images, system=system, auto_image_tags=True)
    timings: dict = {}
    text = []
    for piece in vl2.stream(inputs, sampling, timings):
        text.append(piece)
        click.echo(piece, nl=False)
    click.echo("")
    boxes = vl2.boxes("".join(text), inputs)
    if boxes:
        click.echo(format_boxes(boxes))
    if stats:
        n = timings.get("decode_tokens", 0)
        rate = (n - 1) / timings["decode_s"] if n > 1 and timings.get("decode_s") else float("nan")
        click.echo(f"prompt {inputs.seq_len} tokens ({sum(inputs.num_image_tokens)} image), vision "
                   f"{timings.get('vision_s', 0):.2f} s ({inputs.pixel_values.shape[0]} tiles), "
                   f"prefill {timings.get('prefill_s', 0):.2f} s, {n} new tokens, decode {rate:.2f} tok/s", err=True)


@main.command()
@click.option("--model", required=True, help="Checkpoint folder in the official layout, or a Hub id.")
@click.option("--recipe", default="int4", show_default=True, help="int4 | int8 | mixed | bf16, or a recipe JSON file.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="gptq: calibrated, loads the model; rtn: round-to-nearest streamed from the checkpoint (any size).")
@click.option("--calib", default=None, type=click.Path(file_okay=False),
              help="Folder of calibration images [default: rendered documents, receipts, tables, charts, forms].")
@click.option("--calib-samples", default=32, show_default=True, type=int)
@click.option("--fidelity-samples", default=4, show_default=True, type=int,
              help="Held-out samples for the fidelity figures (needs the model in memory); 0 skips them.")
@click.option("--vision", default=None,
              help="Vision graph precision(s), comma-separated fp32,fp16,int8 [default: the device profile's, "
                   "else fp16].")
@click.option("--int8-share", default=0.25, show_default=True, type=float,
              help="mixed: share of the routed experts' INT4 -> INT8 byte difference spent on INT8 experts.")
@click.option("--device", default=None, help="Device profile the bundle must fit (name or .toml).")
@click.option("--shard-gb", default=1.0, show_default=True, type=float, help="Size of each decoder file.")
@click.option("--max-memory-gb", default=None, type=float, help="Memory the export may plan for [default: "
              "what the machine has available now].")
@click.option("--out", required=True, type=click.Path(), help="Bundle folder to create (must not exist).")
@one_line_errors
def export(model, recipe, method, calib, calib_samples, fidelity_samples, vision, int8_share, device, shard_gb,
           max_memory_gb, out):
    """Quantize a checkpoint and write a self-contained bundle (decoder, vision ONNX, tokenizer, manifest).

    Prints the estimated size and planned peak memory first; writes into a staging folder beside OUT and renames
    it at the end, so an interrupted or failed export leaves nothing at OUT.
    """
    import signal

    from .export.bundle_writer import ExportOptions, export_bundle

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # the staging folder is removed on the way out

    signal.signal(signal.SIGTERM, interrupted)
    precisions = tuple(p.strip() for p in vision.split(",")) if vision else None
    export_bundle(ExportOptions(model=model, out=out, recipe=recipe, method=method, calib=calib,
                                calib_samples=calib_samples, fidelity_samples=fidelity_samples, vision=precisions,
                                int8_share=int8_share, device=device, shard_gb=shard_gb,
                                max_memory_gb=max_memory_gb),
                  log=lambda msg: click.echo(msg, err=True))
    click.echo(out)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads the whole bundle).")
@one_line_errors
def inspect(bundle, verify):
    """Summarise a bundle: model, recipe, sizes, vision graphs, fidelity, and where it can run."""
    from .bundle import open_bundle
    from .bundle_runtime import inspect_lines

    b = open_bundle(bundle, verify=verify)
    for line in inspect_lines(b):
        click.echo(line)
    click.echo("hashes: " + ("verified" if verify else "not checked (add --verify)"))


@main.command()
@click.option("--variant", type=click.Choice(["tiny", "small", "base"]), required=True)
@click.option("--size", type=click.Choice(["test", "full"]), default="test", show_default=True,
              help="test: tiny dimensions, real vocabulary and layout; full: the real dimensions.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create.")
@click.option("--seed", default=0, show_default=True, type=int)
@one_line_errors
def synth(variant, size, out, seed):
    """Write a synthetic checkpoint in the exact official layout (random, trained-looking weights)."""
    from pathlib import Path

    from .synth import write_checkpoint

    if Path(out).exists():
        raise UserError(f"{out}: already exists; choose a new folder")
    path = write_checkpoint(out, variant, size, seed=seed, progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@main.command()
@click.option("--model", required=True, help="Checkpoint folder in the official layout, or a Hub id.")
@click.option("--dtypes", default="fp32,bf16", show_default=True, help="Comma-separated; the first is the baseline.")
@click.option("--prompt-tokens", default=128, show_default=True, type=int, help="Text tokens in the prompt.")
@click.option("--new-tokens", default=32, show_default=True, type=int, help="Decode steps to time (median).")
@click.option("--image", default=None, help="Add one image (its tiles and image tokens) to the prompt.")
@click.option("--device", default="cpu", show_default=True)
@one_line_errors
def bench(model, dtypes, prompt_tokens, new_tokens, image, device):
    """Time loading, vision, prefill and decode per dtype in one run; one JSON record per line, ratios to the first."""
    import json

    from .bench import run_all
    from .checkpoint import resolve_model_dir

    model_dir = resolve_model_dir(model)  # fail here, once, rather than in every child
    for record in run_all(str(model_dir), dtypes.split(","), prompt_tokens, new_tokens, image, device):
        click.echo(json.dumps(record))


@main.command("vision-bench")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint folder in the official layout; only the vision tower and projector are read.")
@click.option("--image", default=None, help="A photo whose processor tiles are timed (default: a generated card).")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True, help="ONNX graphs to export and time.")
@click.option("--repeats", default=3, show_default=True, type=int, help="Timed runs over all tiles (median).")
@click.option("--tiles", "max_tiles", default=None, type=int, help="Time only the first N tiles (global view first).")
@click.option("--threads", default=None, type=int, help="For PyTorch and ONNX Runtime alike [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object instead of a table.")
@one_line_errors
def vision_bench(model, image, precisions, repeats, max_tiles, threads, as_json):
    """Vision per tile in one run: PyTorch fp32 vs ONNX Runtime graphs (max |ORT - torch|, cosine, ms/tile)."""
    import json

    from .export.vision_bench import format_table, run_vision_bench  # stdlib only: it sets GOMP_SPINCOUNT first

    result = run_vision_bench(model, image, tuple(p.strip() for p in precisions.split(",") if p.strip()), repeats,
                              max_tiles, threads, progress=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps(result) if as_json else format_table(result))


@main.command()
@click.option("--variant", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--configs", default="bf16,int8,int4,nf4,llm.int8", show_default=True,
              help="Comma-separated, from bf16, int8, int4 (cpu backend), nf4, llm.int8 (bitsandbytes).")
@click.option("--prefill-tokens", default=1024, show_default=True, type=click.IntRange(1, 4096))
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1),
              help="Interleaved rounds over the configurations (one prefill each).")
@click.option("--decode-steps", default=20, show_default=True, type=click.IntRange(1),
              help="Decode steps per configuration per round.")
@click.option("--interleave/--one-at-a-time", default=True, show_default=True,
              help="Keep all configurations resident and alternate them (fairest), or build, time and free each "
                   "in turn (less memory: Small).")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads [default: torch's choice].")
@click.option("--size", type=click.Choice(["full", "test"]), default="full", show_default=True,
              help="test: the synthetic test dimensions (hidden 64, 8 experts), to check the command quickly.")
@click.option("--seed", default=0, show_default=True, type=int)
@one_line_errors
def qbench(variant, configs, prefill_tokens, rounds, decode_steps, interleave, threads, size, seed):
    """Time ONE MoE layer at the variant's real size (synthetic weights): bf16 vs INT8/INT4 vs bitsandbytes, one
    decode token and a prefill, in one run; one JSON record per configuration with ratios to bf16."""
    import json
    import os

    os.environ.setdefault("GOMP_SPINCOUNT", "100000")  # before torch is imported: see DESIGN, 8 ms OpenMP stalls
    from .qbench import CONFIGS, run_qbench

    names = [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if not names or unknown:
        raise UserError(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    for record in run_qbench(variant, names, prefill_tokens, rounds, decode_steps, seed, interleave, threads, size,
                             progress=lambda msg: click.echo(msg, err=True)):
        click.echo(json.dumps(record))


@main.command()
@click.option("--model", required=True, help="Checkpoint folder in the official layout, or a Hub id.")
@click.option("--recipe", default="int4", show_default=True,
              help="int8 | int4 | int4-g<N> | mixed | bf16, or a recipe JSON file.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--hessians", type=click.Choice(["routed", "all-tokens", "blend"]), default="blend", show_default=True,
              help="Routed-expert GPTQ statistics: routed tokens only, every token by router affinity, or a blend.")
@click.option("--compare", "compare_", default=None,
              help="Several configurations, reference computed once: [rtn-|gptq-]RECIPE[-HESSIANS],... "
                   "e.g. rtn-int4,gptq-int4,gptq-int8,mixed (overrides --recipe).")
@click.option("--calib", default=32, show_default=True, type=int, help="Calibration samples.")
@click.option("--calib-dir", default=None, help="Calibrate on the images of this folder instead of rendered ones.")
@click.option("--eval", "eval_", default=8, show_default=True, type=int,
              help="Held-out evaluation samples (rendered, another seed); 0 skips the fidelity figures.")
@click.option("--max-tokens", default=768, show_default=True, type=int, help="Tokens per sequence, both sets.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Decoder dtype of the full-precision reference.")
@click.option("--mixed-budget", default="int4-g32", show_default=True,
              help="mixed: routed-expert bytes of this uniform recipe, or a number of GB.")
@click.option("--report", default=None, type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch threads [default: torch's choice]; 1 is faster on a CPU other jobs share.")
@one_line_errors
def quantize(model, recipe, method, hessians, compare_, calib, calib_dir, eval_, max_tokens, dtype, mixed_budget,
             report, threads):
    """Quantize the decoder and print its fidelity against full precision on held-out samples, with wall time and
    bytes; --compare measures several configurations against one full-precision reference."""
    import torch

    from .quantize.command import QuantizeOptions, parse_configs, run_quantize, summary_table
    from .quantize.fidelity import format_report, write_json

    if threads:
        torch.set_num_threads(threads)
    if report:  # fail now, not after an hour of quantization
        from pathlib import Path

        folder = Path(report).resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--report {report}: cannot create {folder} ({e.strerror})") from None

    configs = parse_configs(compare_ or f"{method}-{recipe}-{hessians}", method, hessians)
    if calib < 0 or eval_ < 0 or max_tokens < 16:
        raise UserError("--calib and --eval must be >= 0 and --max-tokens >= 16")
    opts = QuantizeOptions(model, configs, calib=calib, calib_dir=calib_dir, eval=eval_, max_tokens=max_tokens,
                           dtype=dtype, mixed_budget=mixed_budget, progress=lambda m: click.echo(m, err=True))
    result = run_quantize(opts)
    for run in result["runs"]:
        if run["fidelity"]:
            click.echo(f"== {run['config']} ==\n{format_report(run['fidelity'])}\n")
    click.echo(summary_table(result))
    click.echo(f"wall {result['wall_seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    if report:
        write_json(result, report)


if __name__ == "__main__":
    main()
