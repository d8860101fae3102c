"""Developer tools: `synth` (synthetic checkpoints), `bench`, `vision-bench` and `qbench`."""

from __future__ import annotations

import click

from ..errors import UserError
from .common import one_line_errors


@click.command()
@click.option("--variant", type=click.Choice(["tiny", "small", "base"]), required=True)
@click.option("--size", type=click.Choice(["test", "full"]), default="test", show_default=True,
              help="test: tiny dimensions, real vocabulary and layout; full: the real dimensions.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create.")
@click.option("--seed", default=0, show_default=True, type=int)
@one_line_errors
def synth(variant, size, out, seed):
    """Write a synthetic checkpoint in the exact official layout (random, trained-looking weights)."""
    from pathlib import Path

    from ..tools.synth import write_checkpoint

    if Path(out).exists():
        raise UserError(f"{out}: already exists; choose a new folder")
    path = write_checkpoint(out, variant, size, seed=seed, progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@click.command()
@click.option("--bundle", default=None, type=click.Path(exists=True, file_okay=False),
              help="A bundle folder: run it on its backend (the device profile's, else cpu / cuda).")
@click.option("--model", default=None,
              help="A checkpoint (folder or Hub id): timed per --dtypes, or with --bundle the full-precision "
                   "reference and the GGUF source [default: the bundle's recorded source].")
@click.option("--dtypes", default="bf16", show_default=True, help="--model alone: comma-separated, first = base.")
@click.option("--vs", default="", help="Also run, back to back: reference (bf16 checkpoint), torch (the bundle on "
              "PyTorch's cpu ops), llamacpp (GGUF Q4_0 / Q4_K_M of the same decoder). Comma-separated.")
@click.option("--device", default=None, help="Device profile: fit check, tile cap, backend, bandwidth roofline.")
@click.option("--backend", default=None, help="Decoder backend of the bundle [default: the profile's].")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1), help="Text tokens.")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(2), help="Decode steps timed.")
@click.option("--image", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Add one image (its tiles and image tokens) to the prompt: times vision per tile too.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="torch, qkern and llama.cpp threads, the same for every configuration.")
@click.option("--torch-device", default="cpu", show_default=True, help="torch device of --model (cpu, cuda).")
@click.option("--gguf-dir", default=None, type=click.Path(file_okay=False),
              help="--vs llamacpp: where the GGUFs are written once and reused [default: "
                   "~/.cache/edge-vl2/gguf/<checkpoint folder>].")
@one_line_errors
def bench(bundle, model, dtypes, vs, device, backend, prompt_tokens, new_tokens, image, threads, torch_device,
          gguf_dir):
    """Load, vision per tile, prefill, decode (median, p90), bytes per token, GB/s against the roofline and peak
    memory of a bundle or checkpoint, with its peers back to back; one JSON record per line, then the ratios."""
    import json

    from ..tools.bench import VS, run_bench

    if not bundle and not model:
        raise UserError("give --bundle B or --model M")
    wanted = [v.strip() for v in vs.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VS]
    if unknown or (wanted and not bundle and set(wanted) - {"llamacpp"}):
        raise UserError(f"--vs: {', '.join(unknown) or ','.join(wanted)}: choose from {', '.join(VS)} "
                        "(reference and torch need --bundle)")
    if device:
        from ..devices.profiles import load_device

        load_device(device)  # an unknown profile fails here, once
    if model and not bundle:
        from ..model.checkpoint import resolve_model_dir

        model = str(resolve_model_dir(model))
    for record in run_bench(bundle, model, [d.strip() for d in dtypes.split(",")], wanted, device, prompt_tokens,
                            new_tokens, image, threads, torch_device, backend, gguf_dir,
                            progress=lambda m: click.echo(m, err=True)):
        click.echo(json.dumps(record))


@click.command("vision-bench")
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

    from ..tools.vision_bench import format_table, run_vision_bench  # stdlib only: it sets GOMP_SPINCOUNT first

    result = run_vision_bench(model, image, tuple(p.strip() for p in precisions.split(",") if p.strip()), repeats,
                              max_tiles, threads, progress=lambda msg: click.echo(msg, err=True))
    click.echo(json.dumps(result) if as_json else format_table(result))


@click.command()
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

    from ..tools.timing import set_timing_env

    set_timing_env()  # before torch is imported (edge_vl2.tools.timing)
    from ..tools.qbench import CONFIGS, run_qbench

    names = [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if not names or unknown:
        raise UserError(f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    for record in run_qbench(variant, names, prefill_tokens, rounds, decode_steps, seed, interleave, threads, size,
                             progress=lambda msg: click.echo(msg, err=True)):
        click.echo(json.dumps(record))
