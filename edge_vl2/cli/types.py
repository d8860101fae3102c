"""Option types every command shares: numbers that refuse NaN and infinity, ranges, seeds torch accepts, a torch
device this build can use, comma-separated choices. Click reports a bad value as one line naming the option
(`common.OneLineGroup`), exit status 2, before any work starts."""

from __future__ import annotations

import math

import click

from .. import checks
from ..errors import UserError


class FiniteFloat(click.FloatRange):
    """A float in a range, never NaN or infinity (click's FloatRange lets NaN through: every comparison is False)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class SamplingScale(FiniteFloat):
    """A temperature (0 = greedy) or repetition penalty: positive values from SamplingParams' MIN_SCALE, under which
    fp32 logits divided by it could overflow."""

    def __init__(self, zero_ok: bool):
        super().__init__(min=0, min_open=not zero_ok)
        self.zero_ok = zero_ok

    def convert(self, value, param, ctx):
        from ..generate import MIN_SCALE  # torch is loaded by then: only `run` uses these

        rv = super().convert(value, param, ctx)
        if 0 < rv < MIN_SCALE:
            self.fail(f"{value!r} is under {MIN_SCALE}{' (0 = greedy)' if self.zero_ok else ''}.", param, ctx)
        return rv


class TorchDevice(click.ParamType):
    """cpu, cuda or cuda:N, refused here when this torch build or machine cannot use it."""

    name = "device"

    def convert(self, value, param, ctx):
        try:
            return checks.torch_device(value, "torch device")
        except UserError as e:
            self.fail(str(e), param, ctx)


class CommaChoice(click.ParamType):
    """One or more of `choices`, comma-separated, each once; an empty list is refused, never read as the default."""

    name = "list"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if not all(items) or len(set(items)) < len(items) or not set(items) <= set(self.choices):
            self.fail(f"{value!r}: give one or more of {', '.join(self.choices)}, comma-separated, each once",
                      param, ctx)
        return tuple(items)


DTYPES = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")  # edge_vl2.dtypes, without torch
SEED = click.IntRange(0, 2**64 - 1)  # torch.Generator.manual_seed takes 64 bits
COUNT = click.IntRange(0)
POSITIVE = click.IntRange(1)
POSITIVE_FLOAT = FiniteFloat(min=0, min_open=True)
SHARE = FiniteFloat(0, 1)
TOP_P = FiniteFloat(0, 1, min_open=True)
