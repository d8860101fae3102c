"""`python -m edge_vl2.cli`: the same as the `edge-vl2` command."""

from . import main

main()
