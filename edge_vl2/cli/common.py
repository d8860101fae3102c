"""What every command shares: bad input ends in one line on stderr and a non-zero exit, never a traceback; the
options that choose and load a model, and the sampling options, for `run`, `serve`, `chat` and `batch`."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import UserError, one_line
from . import types


def one_line_errors(fn):
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (try a smaller model, fewer images or --max-new-tokens)", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)

    return wrapper


class OneLineGroup(click.Group):
    """The `edge-vl2` group: a usage error (an unknown option, a value out of range) is one line on stderr too, not
    click's usage block, with click's exit status (2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # `edge-vl2` alone prints the help
            sys.exit(e.exit_code)
        except click.ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _apply(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn


def model_options(fn):
    """--model / --bundle and how to run it: --dtype, --device, --backend, --skip-verify, --torch-device."""
    return _apply(fn, [
        click.option("--model", default=None,
                     help="Checkpoint folder in the official layout, or a Hub id (reference mode)."),
        click.option("--bundle", default=None, type=click.Path(), help="A bundle folder written by `edge-vl2 export`."),
        click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32", "fp16"]), default="auto",
                     show_default=True, help="Bundles: auto = bf16; fp32 for reference comparisons."),
        click.option("--device", "device_profile", default=None,
                     help="Device profile (e.g. cpu-kiosk, orin-nx-16gb, or a .toml): refuse, before loading, what "
                          "cannot fit it; for bundles it also picks the backend, vision graph and ONNX Runtime "
                          "providers."),
        click.option("--backend", type=click.Choice(["cpu", "cuda", "reference", "bnb"]), default=None,
                     help="Bundle decoder backend [default: the device profile's, else cuda when available, else "
                          "cpu]."),
        click.option("--skip-verify", is_flag=True,
                     help="Bundle: skip the sha256 pass over its files (startup time); sizes, tensor shapes and the "
                          "manifest are still checked."),
        click.option("--torch-device", default="cpu", show_default=True, type=types.TorchDevice(),
                     help="Reference mode (--model): cpu, cuda or cuda:N."),
    ])


def check_model_choice(model, bundle, dtype, backend, skip_verify) -> None:
    """The option combinations `load_pipeline` refuses, checked before any slow work."""
    if (model is None) == (bundle is None):
        raise UserError("give exactly one of --model (a checkpoint) or --bundle (an exported bundle)")
    if model is not None and (backend or skip_verify):
        raise UserError("--backend and --skip-verify apply to --bundle only")
    if bundle is not None and dtype == "fp16":
        raise UserError("bundles run in bf16 (--dtype auto) or fp32")


def load_pipeline(model, bundle, dtype, device_profile, backend, skip_verify, torch_device, **gpu):
    """The VL2Pipeline the model options describe; `gpu` is run's cuda_graphs= / memory_cap_gb=."""
    from ..pipeline import VL2Pipeline

    check_model_choice(model, bundle, dtype, backend, skip_verify)
    if bundle is not None:
        return VL2Pipeline.from_bundle(bundle, backend=backend, device_profile=device_profile,
                                       verify=not skip_verify, dtype="fp32" if dtype == "fp32" else "bf16", **gpu)
    return VL2Pipeline.from_pretrained(model, dtype=dtype, device=torch_device, device_profile=device_profile, **gpu)


def sampling_options(fn):
    """--max-new-tokens, --temperature, --top-p, --top-k, --repetition-penalty, --seed."""
    return _apply(fn, [
        click.option("--max-new-tokens", default=512, show_default=True, type=types.POSITIVE),
        click.option("--temperature", default=0.0, show_default=True, type=types.SamplingScale(zero_ok=True),
                     help="0 = greedy; else at least 1e-4."),
        click.option("--top-p", default=1.0, show_default=True, type=types.TOP_P),
        click.option("--top-k", default=0, show_default=True, type=types.COUNT, help="0 = off."),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=types.SamplingScale(zero_ok=False),
                     help="1 = off; at least 1e-4."),
        click.option("--seed", default=None, type=types.SEED),
    ])


def sampling_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, **constraint):
    """SamplingParams from the sampling options; `constraint` is json_schema= / regex= / choices= (run's options)."""
    from ..generate import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, seed=seed, **constraint)


def stats_line(inputs, timings: dict) -> str:
    """The `--stats` line of run, chat and batch: token counts, where the time went, tiles from the vision cache."""
    n = timings.get("decode_tokens", 0)
    rate = (n - 1) / timings["decode_s"] if n > 1 and timings.get("decode_s") else float("nan")
    tiles = timings.get("vision_tiles", inputs.pixel_values.shape[0])
    cached = timings.get("vision_tiles_cached", 0)
    from_cache = f", {cached} from the vision cache" if cached else ""
    chunks = f" (chunks of {timings['prefill_chunk']})" if "prefill_chunk" in timings else ""
    return (f"prompt {inputs.seq_len} tokens ({sum(inputs.num_image_tokens)} image), vision "
            f"{timings.get('vision_s', 0):.2f} s ({tiles} tiles{from_cache}), "
            f"prefill {timings.get('prefill_s', 0):.2f} s{chunks}, {n} new tokens, decode {rate:.2f} tok/s")
