"""edge_vl2.checks: the validation primitives every boundary uses, and the path rules (no traversal out of a
checkpoint, no FIFO opened) on a real checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edge_vl2 import checks
from edge_vl2.errors import UserError
from edge_vl2.model.checkpoint import open_checkpoint

from conftest import TINY_LIKE

INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("value", [True, 64.0, 64.7, "64", None, float("nan"), 0, 10**12])
def test_integer_refuses_everything_but_an_integer_in_range(value):
    with pytest.raises(UserError, match=r"hidden_size must be an integer in \[1, 65536\], got"):
        checks.integer(value, "hidden_size", 1, 65536)


def test_integer_and_number_accept_what_they_should():
    assert checks.integer(64, "x", 1, 64) == 64 and checks.integer(10**30, "seed", 0) == 10**30
    assert checks.number(3, "x", 0, 5) == 3.0 and checks.number(1.0, "p", 0, 1, lo_open=True) == 1.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "0.5", True, None, 0.0, 1.5])
def test_number_refuses_non_finite_and_out_of_range(value):
    with pytest.raises(UserError, match=r"top_p must be a finite number in \(0, 1\]"):
        checks.number(value, "top_p", 0, 1, lo_open=True)


def test_text_refuses_undecodable_bytes_and_non_strings():
    assert checks.text("caf\u00e9 \U0001f642", "prompt") == "caf\u00e9 \U0001f642"
    with pytest.raises(UserError, match="prompt is not valid UTF-8 text"):
        checks.text("caf\udce9", "prompt")  # how Python carries the undecodable argv byte 0xe9
    with pytest.raises(UserError, match="must be a string"):
        checks.text(b"hi", "prompt")


def test_fields_name_the_file_and_the_field():
    f = checks.Fields({"n": "3", "ok": True}, "x.json", "section.")
    with pytest.raises(UserError, match=r"^x.json: section.n must be an integer"):
        f.int("n", 1)
    with pytest.raises(UserError, match=r"^x.json: section.missing is missing$"):
        f.int("missing")
    assert f.bool("ok") is True and f.int("absent", default=None) is None
    with pytest.raises(UserError, match="must be an object"):
        checks.Fields([], "x.json")


def test_regular_file_refuses_fifo_directory_and_devices_before_opening(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block forever
    for path, needle in ((tmp_path / "fifo", "FIFO"), (tmp_path, "directory"), ("/dev/zero", "FIFO, device"),
                         (tmp_path / "none", "not found")):
        with pytest.raises(UserError, match=needle):
            checks.read_bytes(path, "config")


def test_strict_json_refuses_nan_deep_nesting_and_bad_utf8(tmp_path):
    for text, needle in (('{"a": NaN}', "NaN is not JSON"), ("[" * 100_000, "not valid JSON"), ("{", "not valid")):
        (tmp_path / "a.json").write_text(text)
        with pytest.raises(UserError, match=needle):
            checks.read_json(tmp_path / "a.json")
    (tmp_path / "a.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xff at offset 7\)"):
        checks.read_json(tmp_path / "a.json")


@pytest.mark.parametrize("name, needle", [("../other/shard", "outside its folder"), ("a/../../b", "outside"),
                                          ("/etc/passwd", "not a relative file name"), ("", "not a relative"),
                                          ("./x", "not a plain relative path"), (5, "not a relative")])
def test_inside_refuses_names_that_leave_the_folder(tmp_path, name, needle):
    with pytest.raises(UserError, match=needle):
        checks.inside(tmp_path, name, "shard")


def test_inside_follows_links_only_within_the_allowed_roots(tmp_path):
    root, blobs, elsewhere = tmp_path / "snapshots" / "abc", tmp_path / "blobs", tmp_path / "elsewhere"
    for d in (root, blobs, elsewhere):
        d.mkdir(parents=True)
    (blobs / "b1").write_text("x")
    (elsewhere / "secret").write_text("x")
    os.symlink(blobs / "b1", root / "shard1")  # the Hugging Face cache layout
    os.symlink(elsewhere / "secret", root / "shard2")
    assert checks.inside(root, "shard1", "shard", (blobs,)) == root / "shard1"
    with pytest.raises(UserError, match="a link to .*secret, outside its folder"):
        checks.inside(root, "shard2", "shard", (blobs,))


def test_checkpoint_index_cannot_point_outside_the_checkpoint(tmp_path):
    """A downloaded checkpoint whose index sends a tensor to `../other/shard` is refused before that file is opened,
    although the file exists and would load (path traversal)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY_LIKE, ckpt)
    index = json.loads((ckpt / INDEX).read_text())
    shard = next(iter(index["weight_map"].values()))
    (tmp_path / "other").mkdir()
    shutil.copyfile(ckpt / shard, tmp_path / "other" / "shard")
    index["weight_map"]["language.model.embed_tokens.weight"] = "../other/shard"
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"shard '../other/shard' points outside its folder"):
        open_checkpoint(ckpt)
    os.replace(ckpt / shard, tmp_path / "other" / "moved")  # a shard that is a link out of the folder
    os.symlink(tmp_path / "other" / "moved", ckpt / shard)
    index["weight_map"]["language.model.embed_tokens.weight"] = shard
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside its folder"):
        open_checkpoint(ckpt)
