"""`edge-vl2 batch`: every image once, one JSON line each (a bad file gets an error line and the batch goes on),
resumable (skips what the file has, cuts a half-written last line), through the CLI on the official fixture
checkpoint (reference mode)."""

import json
import pytest
from PIL import Image

from _bundles import cli
from conftest import IMAGES, TINY_LIKE


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "scans"
    d.mkdir()
    for name in ("monday.jpg", "visual_grounding_1.jpeg"):  # small copies: one tile + the global view each
        Image.open(IMAGES / name).resize((320, 240)).save(d / name)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (d / "notes.txt").write_text("not an image: skipped by the folder listing")
    return d


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(folder, out, *extra):
    return cli("batch", "--model", TINY_LIKE, "--dtype", "fp32", "--images", folder, "--prompt", "Describe.",
               "--out", out, "--max-new-tokens", "4", *extra)


def test_every_image_once_a_bad_file_does_not_stop_it_and_it_resumes(folder, tmp_path):
    out = tmp_path / "results.jsonl"
    proc = batch(folder, out)
    assert proc.returncode == 0, proc.stderr
    got = {r["image"]: r for r in lines(out)}
    assert sorted(got) == sorted(str(p) for p in folder.iterdir() if p.suffix != ".txt")
    bad = got[str(folder / "broken.png")]
    assert set(bad) == {"image", "error"} and "broken.png" in bad["error"]
    good = got[str(folder / "monday.jpg")]
    assert good["completion_tokens"] == 4 and good["prompt_tokens"] > 421 and good["boxes"] == []
    assert good["timings"]["vision_tiles"] == 2 and isinstance(good["answer"], str)
    assert "2 answered, 1 errors" in proc.stderr and "Traceback" not in proc.stderr

    # Resume: skips done images and cuts a partial line.
    first = out.read_text().splitlines()
    # A hard kill in the middle of the last write: the last line is half there.
    out.write_text("\n".join(first[:-1]) + "\n" + first[-1][:15])
    proc = batch(folder, out)
    assert proc.returncode == 0 and "1 answered, 0 errors" in proc.stderr
    again = out.read_text().splitlines()
    assert again[:-1] == first[:-1] and json.loads(again[-1])["image"] == json.loads(first[-1])["image"]
    proc = batch(folder, out)
    assert "3 images, 3 already in" in proc.stderr and out.read_text().splitlines() == again
    proc = batch(folder, out, "--retry-errors")  # the broken file's line is redone (and still an error)
    assert proc.returncode == 0 and "0 answered, 1 errors" in proc.stderr
    assert sorted(r["image"] for r in lines(out)) == sorted(json.loads(x)["image"] for x in first)


def test_bad_arguments_are_one_line(folder, tmp_path):
    for args, words in [(["--images", tmp_path / "none"], "no such folder"),
                        (["--images", str(folder / "*.gif")], "matches no files"),
                        (["--images", folder, "--prompt", "<image><image>x"], "at most one <image>")]:
        base = {"--images": folder, "--prompt": "Describe.", "--out": tmp_path / "r.jsonl"}
        it = iter(args)
        base.update(dict(zip(it, it)))
        proc = cli("batch", "--model", TINY_LIKE, *[x for kv in base.items() for x in kv])
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "junk.jsonl").write_text("this is not json\n")
    proc = batch(folder, tmp_path / "junk.jsonl")
    assert proc.returncode == 2 and "line 1 is not a result line" in proc.stderr
