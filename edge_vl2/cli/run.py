"""`edge-vl2 run`: answer a prompt about images from a checkpoint (reference mode) or a bundle."""

from __future__ import annotations

import click

from . import types
from .common import (check_model_choice, load_pipeline, model_options, one_line_errors, sampling_options,
                     sampling_params, stats_line)


@click.command()
@model_options
@click.option("--image", "images", multiple=True, help="An image file; repeat for several, in <image> tag order.")
@click.option("--system", default=None, help="System text placed before the first turn.")
@sampling_options
@click.option("--cuda-graphs", type=click.Choice(["on", "off"]), default="off", show_default=True,
              help="Decode through a step captured in a CUDA graph (decoder on CUDA, quantized experts; else it "
                   "decodes eagerly and --stats says why).")
@click.option("--memory-cap-gb", type=types.POSITIVE_FLOAT, default=None,
              help="Cap PyTorch's CUDA memory at this many GB (10^9 bytes) before loading: a bigger GPU then proves "
                   "the fit of a smaller one (an out-of-memory error past it).")
@click.option("--stats/--no-stats", default=False, help="Print token counts and timings to stderr.")
@click.option("--json-schema", "json_schema_file", type=click.Path(dir_okay=False),
              help="A JSON Schema file: the answer is one JSON value valid under it (ends when it closes).")
@click.option("--regex", default=None, help="The whole answer matches this regular expression (\\d = [0-9]).")
@click.option("--choices", default=None, help="The answer is exactly one of these '|'-separated options.")
@click.option("--boxes", "boxes_file", type=click.Path(dir_okay=False),
              help="Write the grounding boxes (label, pixel box, image index) and the skipped box text as JSON.")
@click.option("--draw", "draw_file", type=click.Path(dir_okay=False),
              help="Draw the grounding boxes on the (last) image into this .png/.jpg.")
@click.option("--document", type=click.Path(dir_okay=False),
              help="A PDF or multi-page TIFF: PROMPT is asked of each page, then the answers are merged.")
@click.option("--pages", default=None, help="With --document: pages such as 1-3,5 [default: all].")
@click.argument("prompt")
@one_line_errors
def run(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, images, system, max_new_tokens,
        temperature, top_p, top_k, repetition_penalty, seed, cuda_graphs, memory_cap_gb, stats, json_schema_file,
        regex, choices, boxes_file, draw_file, document, pages, prompt):
    """Answer PROMPT about the images, streaming the text; grounding boxes are also printed in pixels.

    Give either --model (reference mode: the checkpoint in bf16/fp32) or --bundle (an exported, quantized bundle).
    Images without an <image> tag in PROMPT get one on a line of its own at the start (official demo convention).
    Special-token strings typed in PROMPT (<|ref|>, <|User|>, ...) are read as the tokens, as the official
    processor does.
    """
    from ..cuda_memory import cuda_memory_figures
    from ..inputs.images import load_image
    from .answers import check_answer_options, check_complete, constraint_kwargs, report_grounding, run_document

    constraint = constraint_kwargs(json_schema_file, regex, choices)
    sampling = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, **constraint)
    check_answer_options(images, document, pages, boxes_file, draw_file)
    check_model_choice(model, bundle, dtype, backend, skip_verify)
    pil_images = [load_image(p) for p in images]  # bad images fail before the model loads
    graphs = cuda_graphs == "on"
    vl2 = load_pipeline(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, cuda_graphs=graphs,
                        memory_cap_gb=memory_cap_gb)
    if document is not None:
        return run_document(vl2, document, prompt, sampling, pages, boxes_file, draw_file, stats)
    inputs = vl2.prepare(prompt, pil_images, system=system, auto_image_tags=True)
    timings: dict = {}
    text = []
    for piece in vl2.stream(inputs, sampling, timings):
        text.append(piece)
        click.echo(piece, nl=False)
    click.echo("")
    report_grounding(vl2.grounding("".join(text), inputs), pil_images[-1] if pil_images else None, boxes_file,
                     draw_file)
    if stats:
        click.echo(f"{stats_line(inputs, timings)} ({_decode_mode(graphs, vl2, timings)})", err=True)
        memory = cuda_memory_figures()
        if memory:
            click.echo(f"CUDA memory: PyTorch peak {memory['torch_peak_gb']:.2f} GB (reserved "
                       f"{memory['torch_reserved_peak_gb']:.2f}), device in use {memory['device_used_gb']:.2f} of "
                       f"{memory['device_total_gb']:.2f} GB", err=True)
    check_complete(timings, max_new_tokens, bool(constraint))


def _decode_mode(requested: bool, vl2, timings: dict) -> str:
    if requested and not vl2.cuda_graphs:
        return "eager: CUDA graphs need the decoder on CUDA"
    return timings.get("decode", "eager")
