"""Developer tools: `synth`, `bench`, `vision-bench`, `qbench` and `peer` (our recipes vs llama.cpp)."""

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
@click.option("--model", required=True, help="Checkpoint folder in the official layout, or a Hub id.")
@click.option("--dtypes", default="fp32,bf16", show_default=True, help="Comma-separated; the first is the baseline.")
@click.option("--prompt-tokens", default=128, show_default=True, type=int, help="Text tokens in the prompt.")
@click.option("--new-tokens", default=32, show_default=True, type=int, help="Decode steps to time (median).")
@click.option("--image", default=None, help="Add one image (its tiles and image tokens) to the prompt.")
@click.option("--torch-device", default="cpu", show_default=True, help="torch device of the decoder (cpu, cuda).")
@one_line_errors
def bench(model, dtypes, prompt_tokens, new_tokens, image, torch_device):
    """Time loading, vision, prefill and decode per dtype in one run; one JSON record per line, ratios to the first."""
    import json

    from ..model.checkpoint import resolve_model_dir
    from ..tools.bench import run_all

    model_dir = resolve_model_dir(model)  # fail here, once, rather than in every child
    for record in run_all(str(model_dir), dtypes.split(","), prompt_tokens, new_tokens, image, torch_device):
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


@click.command()
@click.option("--suite", "suite_dir", required=True, type=click.Path(file_okay=False),
              help="Held-out suite and reference kept by `edge-vl2 quantize --suite-dir`.")
@click.option("--report", "reports", multiple=True, type=click.Path(dir_okay=False),
              help="`edge-vl2 quantize --report` file(s) measured with that suite (our recipes).")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(file_okay=False),
              help="Bundle(s) exported with --fidelity-samples (their per-domain figures).")
@click.option("--peer-dir", default=None, type=click.Path(file_okay=False),
              help="llama.cpp GGUFs of the same decoder (peer.json, from edge_vl2.tools.peer.suite build).")
@click.option("--types", default="Q4_0,Q4_K_M,Q5_K_M,Q8_0", show_default=True, help="llama.cpp types to score.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="llama.cpp threads.")
@click.option("--source/--no-source", default=True, show_default=True,
              help="Also score the unquantized GGUF (the check that llama.cpp runs our decoder; slow on a CPU).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the rows as JSON.")
@one_line_errors
def peer(suite_dir, reports, bundles, peer_dir, types, threads, source, json_out):
    """Our recipes and llama.cpp's Q4_0 / Q4_K_M / Q5_K_M / Q8_0 side by side: bytes, KL and top-1 per held-out
    domain on the same token sequences (llama.cpp: text domains only, it has no vision tower for this model)."""
    import json

    from edge_vl2.quantize.heldout.suite import load_suite

    from ..tools.side_by_side import format_table, side_by_side

    if not (reports or bundles or peer_dir):
        raise UserError("nothing to compare: give --report, --bundle and/or --peer-dir")
    result = side_by_side(load_suite(suite_dir), list(reports), list(bundles), peer_dir,
                          tuple(t.strip() for t in types.split(",") if t.strip()), threads, source,
                          progress=lambda m: click.echo(m, err=True))
    click.echo(format_table(result))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
