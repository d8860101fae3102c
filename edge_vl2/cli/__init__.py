"""`edge-vl2` command line: thin commands over the library, one module per command group; heavy imports happen
inside each command, so `edge-vl2 --help` starts fast and a device install needs no toolchain."""

from __future__ import annotations

import click

from . import batch, chat, draw, export, quantize, run, serve, tools
from .common import OneLineGroup


@click.group(cls=OneLineGroup)
@click.version_option(package_name="edge-vl2")
def main():
    """DeepSeek-VL2 Tiny/Small on a 16 GB GPU, a Jetson Orin or a CPU-only PC, offline."""


for command in (run.run, serve.serve, chat.chat, batch.batch, draw.draw, export.export, export.inspect,
                quantize.quantize, tools.synth, tools.bench, tools.vision_bench, tools.qbench, tools.constrain_bench,
                tools.fuzz, tools.soak, tools.serve_bench, tools.peer):
    main.add_command(command)
