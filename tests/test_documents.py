"""Documents: pages rendered for the tile grid (the processor then picks exactly that grid), PDF and multi-page TIFF,
one clear line for every bad document, page ranges, and answers asked page by page and merged."""

import json
from decimal import Decimal

import jsonschema
import pytest
from PIL import Image

from edge_vl2.errors import UserError
from edge_vl2.inputs import documents
from edge_vl2.inputs.documents import Document, fit_size, parse_pages
from edge_vl2.inputs.tiling import OFFICIAL_CANDIDATE_RESOLUTIONS, select_best_resolution
from edge_vl2.pages import merge_objects, page_schema

from _pdf import CATALOG, encrypted_pdf, write_pdf
from conftest import FIXTURES

PDF = FIXTURES / "documents" / "invoice-2p.pdf"
KIOSK = ((384, 384), (384, 768), (768, 384))  # the candidates left by cpu-kiosk's 3-tile cap


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("candidates", [OFFICIAL_CANDIDATE_RESOLUTIONS, KIOSK])
def test_rendered_size_is_the_grid_the_processor_picks(candidates):
    """For pages of many shapes and sizes (points), the rendered image gets from the official rule the candidate
    where the page fits at the largest area, and fills it along one side."""
    sizes = [(612, 792), (595, 842), (842, 595), (200, 2000), (2000, 150), (14400, 14400), (50, 60), (1, 700)]
    for size in sizes:
        w, h = fit_size(size, candidates)
        best_area = max(min(W / size[0], H / size[1]) ** 2 * size[0] * size[1] for W, H in candidates)
        W, H = select_best_resolution((w, h), candidates)
        assert min(W / size[0], H / size[1]) ** 2 * size[0] * size[1] == pytest.approx(best_area, rel=1e-9)
        assert (w <= W and h <= H) and (W - w <= 1 or H - h <= 1), (size, (w, h), (W, H))


def test_pdf_pages_render_for_the_grid():
    with Document(PDF) as doc:
        assert len(doc) == 2
        pages = list(doc.render([2, 1], OFFICIAL_CANDIDATE_RESOLUTIONS))
    assert [p.number for p in pages] == [2, 1]
    for p in pages:  # US letter 612 x 792 pt: 2x3 tiles (768 x 1152), fitted to the height
        assert p.image.mode == "RGB" and p.image.size == fit_size((612, 792), OFFICIAL_CANDIDATE_RESOLUTIONS)
        assert p.image.getextrema()[0] == (0, 255)  # text on white, not a blank page


def test_pdf_page_rotation_is_applied(tmp_path):
    pdfium = pytest.importorskip("pypdfium2")
    Image.new("L", (400, 100), 255).save(tmp_path / "flat.pdf", resolution=72.0)
    doc = pdfium.PdfDocument(tmp_path / "flat.pdf")
    doc[0].set_rotation(90)
    doc.save(tmp_path / "rotated.pdf")
    doc.close()
    with Document(tmp_path / "rotated.pdf") as rotated:
        (page,) = rotated.render([1], KIOSK)
    assert page.image.height > page.image.width  # 400 x 100 pt turned upright


def test_multipage_tiff(tmp_path):
    frames = [Image.new("L", (850, 1100), 255), Image.new("RGB", (1100, 850), (250, 250, 250)),
              Image.new("1", (300, 300), 1)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    with Document(tmp_path / "scan.tif") as doc:
        assert len(doc) == 3
        pages = list(doc.render([1, 2, 3], OFFICIAL_CANDIDATE_RESOLUTIONS))
    assert [p.image.size for p in pages] == [fit_size(f.size, OFFICIAL_CANDIDATE_RESOLUTIONS) for f in frames]
    assert all(p.image.mode == "RGB" for p in pages)


def test_oversized_tiff_page_is_refused(tmp_path, monkeypatch):
    Image.new("L", (200, 200)).save(tmp_path / "big.tif")
    monkeypatch.setattr(documents, "MAX_IMAGE_PIXELS", 10_000)
    with Document(tmp_path / "big.tif") as doc, pytest.raises(UserError, match="page 1 is 200x200"):
        list(doc.render([1], KIOSK))


def bad_documents(tmp_path):
    encrypted = encrypted_pdf(tmp_path / "encrypted.pdf")
    empty = write_pdf(tmp_path / "empty.pdf", [CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"])
    damaged = tmp_path / "damaged.pdf"
    damaged.write_bytes(PDF.read_bytes()[:4000])
    garbage = tmp_path / "garbage.pdf"
    garbage.write_bytes(b"%PDF-1.7\nthis is not a PDF body\n%%EOF\n")
    broken_tiff = tmp_path / "broken.tif"
    broken_tiff.write_bytes(b"II*\0" + b"\xff" * 64)
    photo = FIXTURES / "images" / "monday.jpg"
    return [(encrypted, "encrypted"), (empty, "no pages"), (damaged, "damaged"), (garbage, "damaged"),
            (broken_tiff, "damaged or unreadable TIFF"), (photo, "not a PDF or TIFF"),
            (tmp_path / "missing.pdf", "not found"), (tmp_path, "not a file")]


def test_bad_documents_are_one_line_errors(tmp_path):
    for path, needle in bad_documents(tmp_path):
        with pytest.raises(UserError) as e:
            Document(path).close()
        message = str(e.value)
        assert needle in message and str(path) in message and "\n" not in message, message


def test_page_ranges():
    assert parse_pages(None, 3, "a.pdf") == [1, 2, 3]
    assert parse_pages("3-5, 1,4", 9, "a.pdf") == [3, 4, 5, 1]
    for spec, needle in (("0", "counted from 1"), ("2-1", "counted from 1"), ("x", "ranges such as"),
                         ("1-10", "has 9 pages"), ("1-200", "has 9 pages")):
        with pytest.raises(UserError, match=needle):
            parse_pages(spec, 9, "a.pdf")
    with pytest.raises(UserError, match="choose at most"):  # enormous: asked for by name, never all at once
        parse_pages(None, 5000, "big.pdf")
    assert parse_pages("4990-5000", 5000, "big.pdf") == list(range(4990, 5001))
    with pytest.raises(UserError, match="more than 100 pages"):
        parse_pages("1-5000", 5000, "big.pdf")


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["vendor", "total"], "properties": {
    "vendor": {"type": "string", "maxLength": 24}, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
    "total": {"type": "number", "minimum": 0, "maximum": 100000, "multipleOf": 0.01},
    "items": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}}}}


def test_page_schema_lets_a_page_say_null():
    page = page_schema(SCHEMA)
    assert page["required"] == ["vendor", "date", "total", "items"]
    jsonschema.validate({"vendor": None, "date": None, "total": 12.5, "items": None}, page)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"vendor": "x", "date": "May 2", "total": None, "items": None}, page)
    assert page_schema({"type": "string"}) == {"type": "string"}  # not an object: asked as it is


def test_merge_takes_each_field_from_the_pages_that_have_it():
    answers = [(1, {"vendor": "Northwind", "date": None, "total": None, "items": ["paper", "toner"]}),
               (2, {"vendor": "Northwind Ltd", "date": "2024-05-02", "total": 303.06, "items": ["boxes"]}),
               (3, None)]  # a page whose answer was cut off
    merged, sources, missing = merge_objects(answers, SCHEMA)
    assert merged == {"vendor": "Northwind", "items": ["paper", "toner", "boxes"], "date": "2024-05-02",
                      "total": 303.06}
    assert sources == {"vendor": 1, "items": [1, 2], "date": 2, "total": 2} and missing == []
    jsonschema.validate(merged, SCHEMA)
    merged, _, missing = merge_objects([(1, {"vendor": None, "total": 5.0})], SCHEMA)
    assert missing == ["vendor"] and merged == {"total": 5.0}


def test_ask_a_two_page_pdf(tmp_path):
    """End to end on the fixture PDF with a random-weight model, tiles capped as on cpu-kiosk: one answer per page
    under the per-page schema, a merged object built from them with its sources, and a text question merged under
    page headers."""
    from edge_vl2 import SamplingParams, VL2Pipeline
    from edge_vl2.pages import ask_document

    from conftest import TINY_LIKE

    vl2 = VL2Pipeline.from_pretrained(TINY_LIKE, dtype="fp32")
    vl2.processor = vl2.processor.capped_at(3)
    seen = []
    result = ask_document(vl2, PDF, "Extract the invoice.", SamplingParams(max_new_tokens=600, temperature=1.0,
                                                                           seed=0, json_schema=SCHEMA),
                          on_page=lambda answer, image: seen.append((answer.page, image.size)))
    assert [p.page for p in result.pages] == [1, 2] and [s[0] for s in seen] == [1, 2]
    assert seen[0][1] == fit_size((612, 792), KIOSK) == (384, 496)  # the width limits: 1x2 tiles
    for p in result.pages:
        assert p.finish_reason == "stop"
        jsonschema.validate(json.loads(p.text, parse_float=Decimal), json.loads(json.dumps(page_schema(SCHEMA)),
                                                                               parse_float=Decimal))
    assert (result.merged, result.sources, result.missing) == merge_objects(
        [(p.page, p.value) for p in result.pages], SCHEMA)
    assert json.loads(json.dumps(result.to_dict()))["pages"][1]["page"] == 2
    text = ask_document(vl2, PDF, "What is this?", SamplingParams(max_new_tokens=5), pages="2")
    assert [p.page for p in text.pages] == [2] and text.merged.startswith("[page 2]\n")
