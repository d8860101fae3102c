"""A question about a document, asked page by page, and one merged answer.

Each page is its own prompt (`<image>` + the question) with its own cache, so every page gets the full 4,096-token
context whatever the page count. Free-text answers merge as the page answers in page order, each under its page
number. Under a JSON Schema each page answers a relaxed form of it (every top-level field required but nullable, so a
page says `null` for a field it does not show instead of inventing one) and the merged object takes each field from
the pages that had it: scalars and objects from the first such page, arrays concatenated in page order (line items
that run over a page break), with the page numbers in `sources`. Required fields no page had are listed in
`missing`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from .constrain import parse_schema
from .generate import SamplingParams
from .inputs.documents import Document, parse_pages

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline import VL2Pipeline


@dataclass
class PageAnswer:
    page: int
    text: str
    value: object = None  # the parsed JSON under a schema
    finish_reason: str = "stop"
    boxes: list = field(default_factory=list)  # grounding boxes on this page's image
    skipped_boxes: list = field(default_factory=list)
    seconds: float = 0.0  # prepare + vision + prefill + decode of this page (rendering not included)
    tokens: int = 0  # new tokens of the answer


@dataclass
class DocumentAnswer:
    pages: list[PageAnswer]
    merged: object  # text, or the merged object under a schema
    sources: dict = field(default_factory=dict)  # field -> page number (arrays: list of page numbers)
    missing: list = field(default_factory=list)  # required fields that no page had

    def to_dict(self) -> dict:
        pages = [{"page": p.page, "answer": p.value if p.value is not None else p.text,
                  "finish_reason": p.finish_reason, "boxes": [b.to_dict() for b in p.boxes],
                  "skipped_boxes": [b.to_dict() for b in p.skipped_boxes]} for p in self.pages]
        return {"pages": pages, "merged": self.merged, "sources": self.sources, "missing": self.missing}


def page_schema(schema: dict) -> dict:
    """The schema one page answers: each top-level property may be null, and all of them are required (the model
    decides field by field whether this page shows it)."""
    props = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(props, dict) or not props:
        return schema
    nullable = {k: {"anyOf": [v, {"type": "null"}]} for k, v in props.items()}
    return {**schema, "properties": nullable, "required": list(props)}


def _present(value) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def merge_objects(answers: list[tuple[int, object]], schema: dict) -> tuple[dict, dict, list]:
    """(merged object, field -> page(s), missing required fields) from (page, parsed object) pairs."""
    merged: dict = {}
    sources: dict = {}
    for page, obj in answers:
        if not isinstance(obj, dict):
            continue
        for key, value in obj.items():
            if not _present(value):
                continue
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
                sources.setdefault(key, []).append(page)
            elif key not in merged:
                merged[key], sources[key] = value, page
    missing = [k for k in schema.get("required", []) if k not in merged]
    return merged, sources, missing


def ask_document(vl2: "VL2Pipeline", path, question: str, sampling: SamplingParams = SamplingParams(),
                 pages: str | None = None,
                 on_page: Callable[[PageAnswer, Image.Image], None] | None = None) -> DocumentAnswer:
    """Render the chosen pages (all by default, "1-3,5" style otherwise) for the processor's tile grid, ask
    `question` of each, merge. `on_page(answer, page image)` is called as each page is answered (progress, output,
    drawing its boxes)."""
    schema = parse_schema(sampling.json_schema) if sampling.json_schema is not None else None
    per_page = replace(sampling, json_schema=page_schema(schema)) if schema is not None else sampling
    answers: list[PageAnswer] = []
    prompt = question if "<image>" in question else "<image>\n" + question
    with Document(path) as doc:
        numbers = parse_pages(pages, len(doc), str(path))
        for page in doc.render(numbers, vl2.processor.config.candidate_resolutions):
            t0 = time.perf_counter()
            result = vl2.generate(vl2.prepare(prompt, [page.image]), per_page)
            value = json.loads(result.text) if schema is not None and result.finish_reason == "stop" else None
            answer = PageAnswer(page.number, result.text, value, result.finish_reason, result.boxes,
                                result.skipped_boxes, time.perf_counter() - t0, len(result.token_ids))
            answers.append(answer)
            if on_page is not None:
                on_page(answer, page.image)
    if schema is None:
        merged = "\n\n".join(f"[page {a.page}]\n{a.text.strip()}" for a in answers)
        return DocumentAnswer(answers, merged)
    merged, sources, missing = merge_objects([(a.page, a.value) for a in answers], schema)
    return DocumentAnswer(answers, merged, sources, missing)
