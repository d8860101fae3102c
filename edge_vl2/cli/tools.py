"""Developer tools: `synth` (synthetic checkpoints), `bench`, `vision-bench`, `qbench`, `fuzz`, `constrain-bench`,
`peer` (our recipes vs llama.cpp), and for the server `soak` and `serve-bench`."""

from __future__ import annotations

import click

from ..errors import UserError
from . import types
from .common import load_pipeline, model_options, one_line_errors


@click.command()
@click.option("--variant", type=click.Choice(["tiny", "small", "base"]), required=True)
@click.option("--size", type=click.Choice(["test", "full"]), default="test", show_default=True,
              help="test: tiny dimensions, real vocabulary and layout; full: the real dimensions.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to create.")
@click.option("--seed", default=0, show_default=True, type=types.SEED)
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
@click.option("--dtypes", default="bf16", show_default=True, type=types.CommaChoice(types.DTYPES),
              help="--model alone: comma-separated, first = base.")
@click.option("--vs", default=None, type=types.CommaChoice(("reference", "torch", "llamacpp")), help="Also run, back to back: reference (bf16 checkpoint), torch (the bundle on "
              "PyTorch's cpu ops), llamacpp (GGUF Q4_0 / Q4_K_M of the same decoder). Comma-separated.")
@click.option("--device", default=None, help="Device profile: fit check, tile cap, backend, bandwidth roofline.")
@click.option("--backend", default=None, type=click.Choice(["cpu", "cuda", "reference", "bnb"]),
              help="Decoder backend of the bundle [default: the profile's].")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1), help="Text tokens.")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(2), help="Decode steps timed.")
@click.option("--image", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Add one image (its tiles and image tokens) to the prompt: times vision per tile too.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="torch, qkern and llama.cpp threads, the same for every configuration.")
@click.option("--torch-device", default="cpu", show_default=True, type=types.TorchDevice(),
              help="torch device of --model (cpu, cuda, cuda:N).")
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
    wanted = list(vs or ())
    if wanted and not bundle and set(wanted) - {"llamacpp"}:
        raise UserError(f"--vs {','.join(wanted)}: reference and torch need --bundle (choose from {', '.join(VS)})")
    if device:
        from ..devices.profiles import load_device

        load_device(device)  # an unknown profile fails here, once
    if model and not bundle:
        from ..model.checkpoint import resolve_model_dir

        model = str(resolve_model_dir(model))
    for record in run_bench(bundle, model, list(dtypes), wanted, device, prompt_tokens,
                            new_tokens, image, threads, torch_device, backend, gguf_dir,
                            progress=lambda m: click.echo(m, err=True)):
        click.echo(json.dumps(record))


@click.command("vision-bench")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Checkpoint folder in the official layout; only the vision tower and projector are read.")
@click.option("--image", default=None, help="A photo whose processor tiles are timed (default: a generated card).")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True,
              type=types.CommaChoice(("fp32", "fp16", "int8")), help="ONNX graphs to export and time.")
@click.option("--recipes", default=None, type=types.CommaChoice(("fused", "fused-vnni", "plain")),
              help="Graph recipes to time for every precision: fused (what export writes for CPUs), plain (what "
                   "edge-vl2 0.1 wrote). `plain,fused` is a before/after in one run [default: each precision's "
                   "export default: fp32/int8 fused, fp16 plain].")
@click.option("--cpu-isa", "isa", type=click.Choice(["native", "avx2"]), default="native", show_default=True,
              help="avx2: run as on an AVX2-only kiosk CPU (CPUID capped in a child process; Linux x86-64 with "
                   "cpuid_fault and a C compiler).")
@click.option("--repeats", default=3, show_default=True, type=types.POSITIVE,
              help="Timed runs over all tiles (median).")
@click.option("--tiles", "max_tiles", default=None, type=types.POSITIVE,
              help="Time only the first N tiles (global view first).")
@click.option("--threads", default=None, type=types.POSITIVE,
              help="For PyTorch and ONNX Runtime alike [default: one per physical core].")
@click.option("--graphs-dir", default=None, type=click.Path(file_okay=False),
              help="Keep the exported graphs in this folder and reuse the ones already there [default: a "
                   "temporary folder].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object instead of a table.")
@one_line_errors
def vision_bench(model, image, precisions, recipes, isa, repeats, max_tiles, threads, graphs_dir, as_json):
    """Vision per tile in one run: PyTorch fp32 vs ONNX Runtime graphs (max |ORT - torch|, cosine, ms/tile)."""
    import json

    from ..tools.vision_bench import format_table, run_vision_bench  # stdlib only: it sets GOMP_SPINCOUNT first

    result = run_vision_bench(model, image, precisions, repeats, max_tiles, threads,
                              progress=lambda msg: click.echo(msg, err=True), recipes=recipes, isa=isa,
                              graphs_dir=graphs_dir)
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
@click.option("--seed", default=0, show_default=True, type=types.SEED)
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
@click.option("--seconds", default=60.0, show_default=True, type=types.FiniteFloat(min=1, max=86400),
              help="Total time, shared equally by the targets (checked between rounds of 50 inputs).")
@click.option("--targets", default="safetensors,manifest,tokenizer", show_default=True,
              type=types.CommaChoice(("safetensors", "manifest", "tokenizer")))
@click.option("--case-seconds", default=20, show_default=True, type=click.IntRange(1, 3600),
              help="One input running past this counts as a crash (a hang).")
@click.option("--seed", default=None, type=types.SEED, help="Reproducible runs [default: random].")
@one_line_errors
def fuzz(seconds, targets, case_seconds, seed):
    """Fuzz the readers of outside files (safetensors, bundle manifest, tokenizer) for a bounded time with hypothesis:
    every damaged input must load or end in one-line error; exit status 1 on the first crash or hang."""
    import json

    try:
        from ..tools.fuzz import run_fuzz
        results, line = run_fuzz(list(targets), seconds, case_seconds, seed, log=lambda m: click.echo(m, err=True))
    except ModuleNotFoundError as e:
        if e.name != "hypothesis":
            raise
        raise UserError("fuzz needs hypothesis (pip install hypothesis)") from None
    for r in results:
        click.echo(json.dumps(r))
    click.echo(line)
    if any(r["crashes"] for r in results):
        raise SystemExit(1)


@click.command("constrain-bench")
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="A bundle (or give --model).")
@click.option("--model", default=None, help="A checkpoint folder (reference mode).")
@click.option("--device", "device_profile", default=None, help="Device profile, e.g. cpu-kiosk.")
@click.option("--json-schema", "json_schema_file", type=click.Path(dir_okay=False), default=None,
              help="The schema to decode under [default: a receipt schema].")
@click.option("--image", default=None, help="Put one image in the prompt (its tiles make the cache longer).")
@click.option("--steps", default=48, show_default=True, type=click.IntRange(4), help="Decode steps per mode and round.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1), help="Rounds; modes interleave.")
@click.option("--seed", default=0, show_default=True, type=types.SEED)
@one_line_errors
def constrain_bench(bundle, model, device_profile, json_schema_file, image, steps, rounds, seed):
    """Mask cost per decode step (ms and % of an unconstrained step), free vs overlapped vs inline masks, one JSON."""
    import json

    from ..errors import UserError
    from ..tools.constrain_bench import main
    from .answers import constraint_kwargs

    if (model is None) == (bundle is None):
        raise UserError("give exactly one of --model (a checkpoint) or --bundle (an exported bundle)")
    schema = constraint_kwargs(json_schema_file, None, None).get("json_schema")
    click.echo(json.dumps(main(bundle, model, device_profile, schema, image, steps, rounds, seed), indent=1))


@click.command()
@click.option("--bundle", default=None, type=click.Path(exists=True, file_okay=False),
              help="A test-size bundle [default: make one from a synthetic checkpoint in a temporary folder].")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1), help="Concurrent clients.")
@click.option("--requests", default=25, show_default=True, type=click.IntRange(1), help="Requests per client.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the report here (JSON).")
@one_line_errors
def soak(bundle, clients, requests, out):
    """Concurrent clients (official openai client) against a real `edge-vl2 serve`: every response checked, RSS
    before/after, a queue-full burst (503 + Retry-After, no hang), SIGTERM -> exit 0. Exit 1 if anything failed."""
    import sys

    try:
        import openai  # noqa: F401
    except ImportError:
        raise UserError("soak drives the server with the official openai client: pip install openai") from None
    from ..tools.soak import main

    sys.exit(main(bundle, clients, requests, out))


@click.command("serve-bench")
@model_options
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="The photo asked about.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1),
              help="Greedy tokens per answer in the run-vs-HTTP comparison.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the report here (JSON).")
@one_line_errors
def serve_bench(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, image, repeats, max_tokens,
                out):
    """Time to first token for a first and a second question about a photo (vision cache), and the server's
    per-request overhead over the in-process `run` path, on one pipeline in one process."""
    from ..tools.serve_bench import main

    vl2 = load_pipeline(model, bundle, dtype, device_profile, backend, skip_verify, torch_device)
    main(vl2, image, repeats, max_tokens, out)


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
