"""`edge-vl2 run --json-schema/--regex/--choices/--boxes/--draw/--document` and `edge-vl2 draw`, end to end in a
subprocess on the official-code fixture checkpoint (random weights: the outputs prove the plumbing and the
constraint, not the content). Bad options and files give one line and exit 2, before the model loads."""

import json
import os
import re
from decimal import Decimal

import jsonschema
import pytest
from PIL import Image

from _pdf import encrypted_pdf
from _schemas import RECEIPT
from conftest import FIXTURES, IMAGES, TINY_LIKE
from test_cli import assert_one_line_error, cli as _cli

RECEIPT_PNG = FIXTURES / "documents" / "receipt.png"
PDF = FIXTURES / "documents" / "invoice-2p.pdf"
GIRAFFE = IMAGES / "visual_grounding_1.jpeg"
OFFICIAL_ANSWER = "<|ref|>The giraffe at the back.<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"


def cli(*args):
    return _cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny model: no OpenMP stalls on a busy box


def decimal_json(text):
    return json.loads(text, parse_float=Decimal)


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "receipt.json"
    path.write_text(json.dumps(RECEIPT))
    return path


def test_receipt_to_json(schema_file, tmp_path):
    proc = cli("run", "--model", TINY_LIKE, "--image", RECEIPT_PNG, "--json-schema", schema_file, "--temperature",
               "1", "--seed", "1", "--max-new-tokens", "600", "Extract the receipt as JSON.")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(decimal_json(proc.stdout), decimal_json(json.dumps(RECEIPT)))


def test_choices_and_a_cut_answer(schema_file):
    proc = cli("run", "--model", TINY_LIKE, "--choices", "paid|unpaid|東京", "--temperature", "1", "--seed", "3",
               "Status?")
    assert proc.returncode == 0 and proc.stdout.strip() in ("paid", "unpaid", "東京"), proc.stdout + proc.stderr
    proc = cli("run", "--model", TINY_LIKE, "--json-schema", schema_file, "--max-new-tokens", "4", "Extract.")
    assert_one_line_error(proc, "--max-new-tokens 4")


def test_boxes_and_drawing_files(tmp_path):
    boxes, drawing = tmp_path / "boxes.json", tmp_path / "drawn.png"
    proc = cli("run", "--model", TINY_LIKE, "--image", IMAGES / "multi_image_1.jpeg", "--image", GIRAFFE,
               "--max-new-tokens", "6", "--boxes", boxes, "--draw", drawing,
               "<image>\n<image>\n<|ref|>The giraffe at the back.<|/ref|>.")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(boxes.read_text())
    assert set(data) == {"boxes", "skipped"} and all(b["image"] == 1 for b in data["boxes"])
    assert Image.open(drawing).size == Image.open(GIRAFFE).size  # drawn on the last image


def test_draw_a_known_answer(tmp_path):
    """`edge-vl2 draw` on the official README's answer for this photo, plus a bad box that is reported."""
    boxes, drawing = tmp_path / "boxes.json", tmp_path / "giraffe.png"
    proc = cli("draw", "--image", GIRAFFE, "--answer", OFFICIAL_ANSWER + "<|det|>[[1, 2, 9999, 4]]<|/det|>",
               "--boxes", boxes, "--out", drawing, "--max-side", "400")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The giraffe at the back.: [580, 270, 999, 900]/999 -> (420, 293, 724, 978) px"
    assert "outside 0..999" in proc.stderr
    data = json.loads(boxes.read_text())
    assert data["boxes"][0]["box"] == [420, 293, 724, 978] and data["skipped"][0]["text"] == "[1, 2, 9999, 4]"
    assert max(Image.open(drawing).size) == 400


def test_two_page_pdf_to_json(schema_file, tmp_path):
    boxes = tmp_path / "boxes.json"
    proc = cli("run", "--model", TINY_LIKE, "--document", PDF, "--json-schema", schema_file, "--temperature", "1",
               "--seed", "0", "--max-new-tokens", "600", "--boxes", boxes, "Extract the invoice as JSON.")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [p["page"] for p in out["pages"]] == [1, 2] and set(out) == {"pages", "merged", "sources", "missing"}
    assert [p["page"] for p in json.loads(boxes.read_text())["pages"]] == [1, 2]
    assert [line.split(":")[0] for line in proc.stderr.splitlines()] == ["page 1", "page 2"]


def test_one_page_of_a_pdf_as_text():
    proc = cli("run", "--model", TINY_LIKE, "--document", PDF, "--pages", "2", "--max-new-tokens", "4", "--stats",
               "What is the total?")
    assert proc.returncode == 0 and proc.stdout.startswith("[page 2]\n"), proc.stdout + proc.stderr
    assert re.fullmatch(r"1 page\(s\) in [\d.]+ s = [\d.]+ pages/min \(page 2 [\d.]+ s 4 tokens\)", proc.stderr.strip())


@pytest.mark.parametrize("args, needle", [
    (["--json-schema", "MISSING"], "cannot read"),
    (["--json-schema", "BADJSON"], "not valid JSON"),
    (["--json-schema", "BADTYPE"], "grammar engine refuses"),
    (["--regex", "[0-9]+(", "--choices", "a|b"], "at most one of"),
    (["--regex", "[0-9]+("], "unclosed group"),
    (["--draw", "out.png"], "--draw needs an image"),
    (["--image", str(GIRAFFE), "--draw", "out.xyz"], "unknown image file type"),
    (["--image", str(GIRAFFE), "--boxes", "no/such/folder/b.json"], "does not exist"),
    (["--document", str(PDF), "--pages", "3"], "has 2 pages"),
    (["--document", str(PDF), "--image", str(GIRAFFE)], "do not go together"),
    (["--pages", "1"], "--document only"),
    (["--document", "ENCRYPTED"], "encrypted"),
    (["--document", str(GIRAFFE)], "not a PDF or TIFF"),
])
def test_bad_options_fail_before_the_model_loads(tmp_path, args, needle):
    """The model path does not exist: each error below is found first."""
    files = {"MISSING": tmp_path / "missing.json", "BADJSON": tmp_path / "bad.json",
             "BADTYPE": tmp_path / "type.json", "ENCRYPTED": encrypted_pdf(tmp_path / "locked.pdf")}
    files["BADJSON"].write_text("{not json")
    files["BADTYPE"].write_text('{"type": "strng"}')
    args = [str(files.get(a, a)) for a in args]
    proc = cli("run", "--model", tmp_path / "no-model", *args, "Question?")
    assert_one_line_error(proc, needle)
