"""`constrain-bench` runs end to end on a test-size model and reports every mode; the figures themselves are only
meaningful on the full-size bundle (README "Measured")."""

import pytest

from edge_vl2 import VL2Pipeline
from edge_vl2.tools.constrain_bench import MODES, measure

import _toolchain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_measure_reports_each_mode_and_the_mask_share():
    vl2 = VL2Pipeline.from_pretrained(_toolchain.checkpoint("tiny"), dtype="fp32")
    out = measure(vl2, steps=4, rounds=1)
    assert set(out["modes"]) == set(MODES) and out["steps_per_mode"] == 4
    for mode in ("overlap", "inline"):
        figures = out["modes"][mode]
        assert figures["mask_plus_accept_mean_ms"] > 0 and figures["mask_plus_accept_pct_of_free_step"] > 0
        assert figures["mask_plus_accept_pct_of_decode_median"] > 0
        assert {"mask", "accept", "decode", "step"} <= set(figures)
