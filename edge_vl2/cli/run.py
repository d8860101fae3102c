"""`edge-vl2 run`: answer a prompt about images from a checkpoint (reference mode) or a bundle."""

from __future__ import annotations

import click

from .common import (check_model_choice, load_pipeline, model_options, one_line_errors, sampling_options,
                     sampling_params, stats_line)


@click.command()
@model_options
@click.option("--image", "images", multiple=True, help="An image file; repeat for several, in <image> tag order.")
@click.option("--system", default=None, help="System text placed before the first turn.")
@sampling_options
@click.option("--stats/--no-stats", default=False, help="Print token counts and timings to stderr.")
@click.argument("prompt")
@one_line_errors
def run(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, images, system, max_new_tokens,
        temperature, top_p, top_k, repetition_penalty, seed, stats, prompt):
    """Answer PROMPT about the images, streaming the text; grounding boxes are also printed in pixels.

    Give either --model (reference mode: the checkpoint in bf16/fp32) or --bundle (an exported, quantized bundle).
    Images without an <image> tag in PROMPT get one on a line of its own at the start (official demo convention).
    Special-token strings typed in PROMPT (<|ref|>, <|User|>, ...) are read as the tokens, as the official
    processor does.
    """
    from ..inputs.grounding import format_boxes
    from ..inputs.images import load_image

    sampling = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    check_model_choice(model, bundle, dtype, backend, skip_verify)
    pil_images = [load_image(p) for p in images]  # bad images fail before the model loads
    vl2 = load_pipeline(model, bundle, dtype, device_profile, backend, skip_verify, torch_device)
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
        click.echo(stats_line(inputs, timings), err=True)
