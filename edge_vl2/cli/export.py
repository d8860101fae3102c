"""`edge-vl2 export` (checkpoint -> bundle) and `edge-vl2 inspect` (what a bundle is and where it runs)."""

from __future__ import annotations

import click

from . import types
from .common import one_line_errors


@click.command()
@click.option("--model", required=True, help="Checkpoint folder in the official layout, or a Hub id.")
@click.option("--recipe", default="int4", show_default=True, help="int4 | int8 | bf16 | mixed | int8-channel | int4-g<N> | int8-g<N>, or a recipe JSON file (README: Export and bundles).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="gptq: calibrated, loads the model; rtn: round-to-nearest streamed from the checkpoint (any size).")
@click.option("--calib-dir", default=None, type=click.Path(file_okay=False),
              help="Folder of calibration images [default: rendered documents, receipts, tables, charts, forms].")
@click.option("--calib-samples", default=32, show_default=True, type=types.POSITIVE)
@click.option("--fidelity-samples", default=4, show_default=True, type=types.COUNT,
              help="Held-out samples for the fidelity figures (needs the model in memory); 0 skips them.")
@click.option("--vision", default=None, type=types.CommaChoice(("fp32", "fp16", "int8")),
              help="Vision graph precision(s), comma-separated fp32,fp16,int8 [default: the device profile's, "
                   "else fp16].")
@click.option("--vision-recipe", type=click.Choice(["fused", "fused-vnni", "plain"]), default=None,
              help="How the graphs are built: fused (ONNX Runtime contrib ops; int8 weights exact on any x86 CPU), "
                   "fused-vnni (int8 ~2x faster, same outputs, only for CPUs with AVX-512 VNNI / AVX-VNNI / AMX), "
                   "plain (standard ops only) [default: fused for fp32/int8, plain for fp16 (TensorRT)].")
@click.option("--int8-share", default=0.25, show_default=True, type=types.SHARE,
              help="mixed: share of the routed experts' INT4 -> INT8 byte difference spent on INT8 experts.")
@click.option("--device", default=None, help="Device profile the bundle must fit (name or .toml).")
@click.option("--shard-gb", default=1.0, show_default=True, type=types.FiniteFloat(min=0.001),
              help="Size of each decoder file (at least 0.001).")
@click.option("--max-memory-gb", default=None, type=types.POSITIVE_FLOAT,
              help="Memory the export may plan for [default: what the machine has available now].")
@click.option("--out", required=True, type=click.Path(), help="Bundle folder to create (must not exist).")
@one_line_errors
def export(model, recipe, method, calib_dir, calib_samples, fidelity_samples, vision, vision_recipe, int8_share,
           device, shard_gb, max_memory_gb, out):
    """Quantize a checkpoint and write a self-contained bundle (decoder, vision ONNX, tokenizer, manifest).

    Prints the estimated size and planned peak memory first; writes into a staging folder beside OUT and renames
    it at the end, so an interrupted or failed export leaves nothing at OUT.
    """
    import signal

    from edge_vl2.export.bundle_writer import ExportOptions, export_bundle

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # the staging folder is removed on the way out

    signal.signal(signal.SIGTERM, interrupted)
    export_bundle(ExportOptions(model=model, out=out, recipe=recipe, method=method, calib_dir=calib_dir,
                                calib_samples=calib_samples, fidelity_samples=fidelity_samples, vision=vision,
                                vision_recipe=vision_recipe, int8_share=int8_share, device=device, shard_gb=shard_gb,
                                max_memory_gb=max_memory_gb),
                  log=lambda msg: click.echo(msg, err=True))
    click.echo(out)


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads the whole bundle).")
@one_line_errors
def inspect(bundle, verify):
    """Summarise a bundle: model, recipe, sizes, vision graphs, fidelity, and where it can run."""
    from ..bundle.inspect import inspect_lines
    from ..bundle.reader import open_bundle

    b = open_bundle(bundle, verify=verify)
    for line in inspect_lines(b):
        click.echo(line)
    click.echo("hashes: " + ("verified" if verify else "not checked (add --verify)"))
