"""`edge-vl2 draw`: the grounding boxes of an answer you already have, as data and drawn on its image."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command()
@click.option("--image", "images", multiple=True, required=True,
              help="The prompt's image(s), in order; the boxes are on the last one (as officially).")
@click.option("--answer", required=True, help="The answer text with <|ref|>…<|/ref|><|det|>[[…]]<|/det|> spans.")
@click.option("--out", "draw_file", type=click.Path(dir_okay=False), default=None, help="Write the drawing here.")
@click.option("--boxes", "boxes_file", type=click.Path(dir_okay=False), default=None,
              help="Write the boxes and the skipped box text as JSON here.")
@click.option("--max-side", type=click.IntRange(min=16), default=None,
              help="Shrink the drawing so its longer side is at most this many pixels (the JSON keeps original "
                   "pixels).")
@one_line_errors
def draw(images, answer, draw_file, boxes_file, max_side):
    """Print the boxes of ANSWER in pixels of the last image, and draw them (--out) or save them (--boxes).

    No model is loaded: this is what `run --draw/--boxes` does after generating, for answers from elsewhere (a
    server, a log).
    """
    from ..inputs.grounding import find_grounding
    from ..inputs.images import load_image
    from .answers import check_answer_options, report_grounding

    check_answer_options(images, None, None, boxes_file, draw_file)
    pil_images = [load_image(p) for p in images]
    report_grounding(find_grounding(answer, [im.size for im in pil_images]), pil_images[-1], boxes_file, draw_file,
                     max_side)
