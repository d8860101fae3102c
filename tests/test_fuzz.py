"""edge_vl2.tools.fuzz, briefly (the long runs are `edge-vl2 fuzz --seconds N`, not part of the suite): each target's
seed is valid for its reader, one round of damaged inputs per target runs with no crash, and the command refuses bad
options in one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

from click.testing import CliRunner

from edge_vl2.cli import main
from edge_vl2.tools import fuzz


def test_the_seeds_are_accepted_by_their_readers():
    """A fuzz run that starts from an input its reader refuses would only test the first check."""
    import json

    from edge_vl2.bundle.manifest import canonical_json

    for reader, value in ((fuzz.read_checkpoint_shard, fuzz.safetensors_seed(quantized=False)),
                          (fuzz.read_bundle_shard, fuzz.safetensors_seed()),
                          (fuzz.read_manifest_text, canonical_json(fuzz.manifest_seed()).encode()),
                          (fuzz.read_tokenizer, {k: v.encode() for k, v in fuzz.tokenizer_seed().items()})):
        with tempfile.TemporaryDirectory() as tmp:
            reader(value, Path(tmp))
    assert json.loads(canonical_json(fuzz.manifest_seed()))["schema"] == "edge-vl2-bundle"


def test_one_round_per_target_without_a_crash():
    results, line = fuzz.run_fuzz(list(fuzz.TARGETS), seconds=0.1, seed=0, log=lambda _m: None)
    for r in results:
        assert r["crashes"] == 0, r["crash"]
        assert r["inputs"] >= 50 and r["user_errors"] > 0  # at least one round; damage is mostly refused
    assert line.endswith(", 0 crashes")


def test_the_command_refuses_bad_options_in_one_line():
    for args in (["--targets", "pickle"], ["--seconds", "nan"], ["--case-seconds", "0"]):
        res = CliRunner().invoke(main, ["fuzz", *args])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
