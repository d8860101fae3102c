"""`edge-vl2 batch`: one prompt over a folder (or glob) of images, one JSON line per image, resumable."""

from __future__ import annotations

import click

from ..errors import UserError
from .common import check_model_choice, load_pipeline, model_options, one_line_errors, sampling_options, \
    sampling_params


@click.command()
@model_options
@click.option("--images", "images_spec", required=True, help="A folder of images, or a glob ('scans/**/*.png').")
@click.option("--prompt", required=True, help="Asked about each image; an <image> tag is put first when it has none.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Results, one JSON line per image.")
@sampling_options
@click.option("--retry-errors", is_flag=True, help="Redo the images whose line in --out is an error.")
@one_line_errors
def batch(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, images_spec, prompt, out,
          max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, retry_errors):
    """Answer PROMPT about every image, appending {"image", "answer", "boxes", "timings", ...} (or {"image",
    "error"} for a file that cannot be read) to OUT. Images already in OUT are skipped, so an interrupted batch
    resumes where it stopped. Exit status 0 when every image has a line, also when some lines are errors."""
    import sys
    from pathlib import Path

    from ..batch import finished_images, list_images, run_batch

    sampling = sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    check_model_choice(model, bundle, dtype, backend, skip_verify)
    if prompt.count("<image>") > 1:
        raise UserError("--prompt may hold at most one <image> tag: each line is about one image")
    images = list_images(images_spec)
    todo = len(images) - len(finished_images(Path(out), retry_errors) & {str(p) for p in images})
    click.echo(f"{len(images)} images, {len(images) - todo} already in {out}", err=True)
    if not todo:
        return
    vl2 = load_pipeline(model, bundle, dtype, device_profile, backend, skip_verify, torch_device)
    with click.progressbar(length=todo, label="batch", file=sys.stderr, show_pos=True, show_eta=True,
                           item_show_func=lambda name: name) as bar:
        def progress(image, line):
            if line is not None:
                bar.update(1, Path(image).name + (" (error)" if "error" in line else ""))

        summary = run_batch(vl2, images, prompt, out, sampling, retry_errors=retry_errors, progress=progress)
    click.echo(f"{summary.answered} answered, {summary.failed} errors (their lines say why), {summary.skipped} "
               f"skipped (already in {out})", err=True)
