"""`edge-vl2 run`: answer a prompt about images from a checkpoint (reference mode) or a bundle."""

from __future__ import annotations

import click

from ..errors import UserError
from . import types
from .common import one_line_errors


@click.command()
@click.option("--model", default=None, help="Checkpoint folder in the official layout, or a Hub id (reference mode).")
@click.option("--bundle", default=None, type=click.Path(), help="A bundle folder written by `edge-vl2 export`.")
@click.option("--image", "images", multiple=True, help="An image file; repeat for several, in <image> tag order.")
@click.option("--system", default=None, help="System text placed before the first turn.")
@click.option("--max-new-tokens", default=512, show_default=True, type=types.POSITIVE)
@click.option("--temperature", default=0.0, show_default=True, type=types.SamplingScale(zero_ok=True),
              help="0 = greedy; else at least 1e-4.")
@click.option("--top-p", default=1.0, show_default=True, type=types.TOP_P)
@click.option("--top-k", default=0, show_default=True, type=types.COUNT, help="0 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True,
              type=types.SamplingScale(zero_ok=False),
              help="1 = off; at least 1e-4.")
@click.option("--seed", default=None, type=types.SEED)
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
@click.option("--torch-device", default="cpu", show_default=True, type=types.TorchDevice(),
              help="Reference mode (--model): cpu, cuda or cuda:N.")
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
def run(model, bundle, images, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, dtype,
        device_profile, backend, skip_verify, torch_device, cuda_graphs, memory_cap_gb, stats, json_schema_file, regex,
        choices, boxes_file, draw_file, document, pages, prompt):
    """Answer PROMPT about the images, streaming the text; grounding boxes are also printed in pixels.

    Give either --model (reference mode: the checkpoint in bf16/fp32) or --bundle (an exported, quantized bundle).
    Images without an <image> tag in PROMPT get one on a line of its own at the start (official demo convention).
    """
    from ..cuda_memory import cuda_memory_figures
    from ..generate import SamplingParams
    from ..inputs.images import load_image
    from ..pipeline import VL2Pipeline
    from .answers import check_answer_options, check_complete, constraint_kwargs, report_grounding, run_document

    constraint = constraint_kwargs(json_schema_file, regex, choices)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty, seed=seed, **constraint)
    check_answer_options(images, document, pages, boxes_file, draw_file)
    if (model is None) == (bundle is None):
        raise UserError("give exactly one of --model (a checkpoint) or --bundle (an exported bundle)")
    if model is not None and (backend or skip_verify):
        raise UserError("--backend and --skip-verify apply to --bundle only")
    if bundle is not None and dtype == "fp16":
        raise UserError("bundles run in bf16 (--dtype auto) or fp32")
    pil_images = [load_image(p) for p in images]  # bad images fail before the model loads
    graphs = cuda_graphs == "on"
    if bundle is not None:
        vl2 = VL2Pipeline.from_bundle(bundle, backend=backend, device_profile=device_profile,
                                      verify=not skip_verify, dtype="fp32" if dtype == "fp32" else "bf16",
                                      cuda_graphs=graphs, memory_cap_gb=memory_cap_gb)
    else:
        vl2 = VL2Pipeline.from_pretrained(model, dtype=dtype, device=torch_device, device_profile=device_profile,
                                          cuda_graphs=graphs, memory_cap_gb=memory_cap_gb)
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
        n = timings.get("decode_tokens", 0)
        rate = (n - 1) / timings["decode_s"] if n > 1 and timings.get("decode_s") else float("nan")
        click.echo(f"prompt {inputs.seq_len} tokens ({sum(inputs.num_image_tokens)} image), vision "
                   f"{timings.get('vision_s', 0):.2f} s ({inputs.pixel_values.shape[0]} tiles), "
                   f"prefill {timings.get('prefill_s', 0):.2f} s (chunks of {timings.get('prefill_chunk')}), "
                   f"{n} new tokens, decode {rate:.2f} tok/s ({_decode_mode(graphs, vl2, timings)})", err=True)
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
