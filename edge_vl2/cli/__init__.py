"""`edge-vl2` command line: thin commands over the library, one module per command group; heavy imports happen
inside each command, so `edge-vl2 --help` starts fast and a device install needs no toolchain."""

from __future__ import annotations

import click

from . import export, quantize, run, tools


@click.group()
@click.version_option(package_name="edge-vl2")
def main():
    """DeepSeek-VL2 Tiny/Small on a 16 GB GPU, a Jetson Orin or a CPU-only PC, offline."""


for command in (run.run, export.export, export.inspect, quantize.quantize, tools.synth, tools.bench,
                tools.vision_bench, tools.qbench, tools.peer):
    main.add_command(command)
