"""Full-size Tiny end to end (slow: ~7 GB written, ~10-13 GB RSS, minutes on a 2-core CPU).

Run with `python -m pytest -m slow tests/test_full_size.py`. Set EDGE_VL2_TINY_FULL to an existing full-size
synthetic Tiny folder (`edge-vl2 synth --variant tiny --size full --out DIR`) to skip writing one.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IMAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_full(tmp_path_factory):
    given = os.environ.get("EDGE_VL2_TINY_FULL")
    if given:
        yield Path(given)
        return
    from edge_vl2.tools.synth import write_checkpoint

    out = tmp_path_factory.mktemp("full") / "tiny"
    try:
        yield write_checkpoint(out, "tiny", "full")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # pytest keeps recent tmp dirs: do not leave 6.7 GB behind


def test_run_streams_text_with_a_tiled_image(tiny_full):
    proc = subprocess.run([sys.executable, "-m", "edge_vl2.cli", "run", "--model", str(tiny_full),
                           "--image", str(IMAGES / "monday.jpg"), "--max-new-tokens", "4", "--stats",
                           "<image>\nDescribe this image."], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no text streamed"
    assert "Traceback" not in proc.stderr
    # The photo is tiled beyond one local tile: a 1x1 grid gives 210 global + 1 separator + 210 local = 421 tokens.
    image_tokens = int(proc.stderr.split("(")[1].split(" image")[0])
    assert image_tokens > 421, proc.stderr
