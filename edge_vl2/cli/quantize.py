"""`edge-vl2 quantize`: quantize the decoder under one or several configurations and measure each."""

from __future__ import annotations

import click

from ..errors import UserError
from . import types
from .common import one_line_errors


@click.command()
@click.option("--model", required=True, help="Checkpoint folder in the official layout, or a Hub id.")
@click.option("--recipe", default="int4", show_default=True,
              help="int4 | int8 | bf16 | mixed | int8-channel | int4-g<N> | int8-g<N>, or a recipe JSON file.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option("--hessians", type=click.Choice(["routed", "all-tokens", "blend"]), default="blend", show_default=True,
              help="Routed-expert GPTQ statistics: routed tokens only, every token by router affinity, or a blend.")
@click.option("--compare", "compare_", default=None,
              help="Several configurations, reference computed once: [rtn-|gptq-]RECIPE[-HESSIANS],... "
                   "e.g. rtn-int4,gptq-int4,gptq-int8,mixed (overrides --recipe).")
@click.option("--calib-samples", default=32, show_default=True, type=types.POSITIVE, help="Calibration samples.")
@click.option("--calib-dir", default=None, help="Calibrate on the images of this folder instead of rendered ones.")
@click.option("--eval", "eval_", default=8, show_default=True, type=types.COUNT,
              help="Held-out evaluation samples (rendered, another seed); 0 skips the fidelity figures.")
@click.option("--max-tokens", default=768, show_default=True, type=click.IntRange(16),
              help="Tokens per sequence, both sets.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Decoder dtype of the full-precision reference.")
@click.option("--mixed-budget", default="int4-g32", show_default=True,
              help="mixed: routed-expert bytes of this uniform recipe, or a number of GB.")
@click.option("--suite", default=2, show_default=True, type=types.COUNT,
              help="Held-out suite items per domain (prose, chat, photo, document, multi_image); 0 skips it.")
@click.option("--photo-dir", default=None, help="The suite's photos [default: the repo's tests/fixtures/images].")
@click.option("--answer-tokens", default=32, show_default=True, type=types.COUNT,
              help="Reference greedy answer per suite item, teacher-forced and scored.")
@click.option("--calib-answers", default=0, show_default=True, type=types.COUNT,
              help="Append the reference's greedy answer (this many tokens) to each calibration sequence.")
@click.option("--suite-dir", default=None, type=click.Path(file_okay=False),
              help="Keep the suite's sequences and reference log-probabilities here (for `edge-vl2 peer`).")
@click.option("--percdamp", default=0.01, show_default=True, type=types.POSITIVE_FLOAT,
              help="GPTQ damping, a fraction of the Hessian's mean diagonal; choose it by held-out suite error.")
@click.option("--report", default=None, type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch threads [default: torch's choice]; 1 is faster on a CPU other jobs share.")
@one_line_errors
def quantize(model, recipe, method, hessians, compare_, calib_samples, calib_dir, eval_, max_tokens, dtype, mixed_budget,
             suite, photo_dir, answer_tokens, calib_answers, suite_dir, percdamp, report, threads):
    """Quantize the decoder and print its fidelity against full precision on held-out samples, with wall time and
    bytes; --compare measures several configurations against one full-precision reference."""
    import torch

    from edge_vl2.quantize.command import QuantizeOptions, parse_configs, run_quantize, summary_table
    from edge_vl2.quantize.fidelity import format_report, write_json

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
    opts = QuantizeOptions(model, configs, calib=calib_samples, calib_dir=calib_dir, eval=eval_, max_tokens=max_tokens,
                           dtype=dtype, mixed_budget=mixed_budget, suite=suite, photo_dir=photo_dir,
                           answer_tokens=answer_tokens, calib_answers=calib_answers, suite_dir=suite_dir,
                           percdamp=percdamp, report_path=report,
                           progress=lambda m: click.echo(m, err=True))
    result = run_quantize(opts)
    for run in result["runs"]:
        if run["fidelity"]:
            click.echo(f"== {run['config']} ==\n{format_report(run['fidelity'])}\n")
    click.echo(summary_table(result))
    click.echo(f"wall {result['wall_seconds']:.0f} s, peak RSS {result['peak_rss_gb']:.2f} GB")
    if report:
        write_json(result, report)
