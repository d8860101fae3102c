"""The hostile-input corpus: every case of tests/hostile/corpus.json (written by tests/hostile/make_corpus.py) on
test-size checkpoints and bundles. Each bad value, file or bundle must end in one line on stderr naming it, exit
status 2 (the API: a one-line UserError), and each unusual but valid input in a correct answer; never a traceback,
never a hang (every case is time-bounded), and nothing left on disk or changed in the shared artefacts. The last test
prints the summary line."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from _bundles import checkpoint, small_int4_bundle, tiny_rtn_bundle
from _hostile import CORPUS, TIME_LIMIT_S, listing, prepare, run_case
from conftest import IMAGES

CASES = json.loads(CORPUS.read_text())
RESULTS: dict = {}
SHARED = ("tiny", "small", "tiny_bundle", "small_bundle")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict:
    return {"tiny": str(checkpoint(tmp_path_factory, "tiny")), "small": str(checkpoint(tmp_path_factory, "small")),
            "tiny_bundle": str(tiny_rtn_bundle(tmp_path_factory)),
            "small_bundle": str(small_int4_bundle(tmp_path_factory)), "img": str(IMAGES / "monday.jpg")}


@pytest.fixture(scope="module")
def pipelines() -> dict:
    return {}  # the tiny pipeline the API cases share, loaded once


def test_the_corpus_is_what_its_script_writes():
    sys.path.insert(0, str(CORPUS.parent))
    try:
        from make_corpus import build
    finally:
        sys.path.pop(0)
    assert build() == CASES, "tests/hostile/corpus.json is stale: run python tests/hostile/make_corpus.py"
    assert len(CASES) >= 250


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case, ctx, pipelines, tmp_path):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    cctx = prepare(case, case_dir, ctx)
    roots = [case_dir, *(Path(ctx[k]) for k in SHARED)]
    before = listing(*roots)
    out = run_case(case, cctx, pipelines)
    after = listing(*roots)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        out.problems.append(f"left or changed on disk: {changed[:3]}")
    if out.kind != case["expect"]:
        out.problems.append(f"expected {case['expect']}, got {out.kind}: {out.line}")
    elif out.kind == "error":
        missing = [m for m in case.get("match", []) if m not in out.line]
        if missing:
            out.problems.append(f"the error line lacks {missing}: {out.line}")
    elif case.get("same_as") in RESULTS and out.stdout != RESULTS[case["same_as"]].stdout:
        out.problems.append(f"output {out.stdout!r} differs from {case['same_as']}: {RESULTS[case['same_as']].stdout!r}")
    RESULTS[case["id"]] = out
    assert out.kind not in ("traceback", "hang"), f"{out.kind} ({out.seconds:.0f} s): {out.line}"
    assert not out.problems, out.problems


def test_summary(capsys):
    """One line for the record; every case above has already asserted its own outcome."""
    if not RESULTS:
        pytest.skip("no corpus case ran")
    kinds = Counter(o.kind for o in RESULTS.values())
    leftovers = sum(any(p.startswith("left or changed") for p in o.problems) for o in RESULTS.values())
    unexpected = sum(any(not p.startswith("left or changed") for p in o.problems) for o in RESULTS.values())
    slowest = max(RESULTS.items(), key=lambda kv: kv[1].seconds)
    line = (f"hostile corpus: {len(RESULTS)} of {len(CASES)} cases, {kinds['error']} clean one-line errors, "
            f"{kinds['ok']} correct outputs; {kinds['traceback']} tracebacks, {kinds['hang']} hangs "
            f"(limit {TIME_LIMIT_S} s, slowest {slowest[1].seconds:.1f} s: {slowest[0]}), {leftovers} leftovers, "
            f"{unexpected} unexpected; {sum(o.seconds for o in RESULTS.values()):.0f} s")
    with capsys.disabled():
        print("\n" + line)
    assert kinds["traceback"] == kinds["hang"] == leftovers == unexpected == 0, line
