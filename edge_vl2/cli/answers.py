"""`run`'s answer options: constrained output (--json-schema, --regex, --choices), grounding boxes as a file and as
a picture (--boxes, --draw), and documents page by page (--document, --pages).

Everything a user can get wrong is checked here before the model loads: the schema file, the grammar, the output
folders, option combinations.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UserError, one_line


def constraint_kwargs(json_schema_file, regex, choices) -> dict:
    """SamplingParams keyword arguments for the constraint options, the grammar checked (no model needed)."""
    from ..constrain import build_grammar

    kwargs: dict = {}
    if json_schema_file is not None:
        path = Path(json_schema_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--json-schema {path}: cannot read ({one_line(e)})") from None
        try:
            kwargs["json_schema"] = json.loads(text)
        except ValueError as e:
            raise UserError(f"--json-schema {path}: not valid JSON ({one_line(e)})") from None
    if regex is not None:
        kwargs["regex"] = regex
    if choices is not None:
        kwargs["choices"] = [c for c in choices.split("|")]
    if len(kwargs) > 1:
        raise UserError("give at most one of --json-schema, --regex, --choices")
    if kwargs:
        build_grammar(**kwargs)
    return kwargs


def check_answer_options(images, document, pages, boxes_file, draw_file) -> None:
    if document is not None and images:
        raise UserError("--document and --image do not go together: a document's pages are its images")
    if pages is not None and document is None:
        raise UserError("--pages applies to --document only")
    if draw_file is not None and not images and document is None:
        raise UserError("--draw needs an image (--image) or a document (--document) to draw on")
    for option, path in (("--boxes", boxes_file), ("--draw", draw_file)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{option} {path}: folder {Path(path).resolve().parent} does not exist")
    if draw_file is not None:
        from PIL import Image

        if Image.registered_extensions().get(Path(draw_file).suffix.lower()) is None:
            raise UserError(f"--draw {draw_file}: unknown image file type (use .png or .jpg)")
    if document is not None:  # an unreadable document or a bad --pages fails before the model loads
        from ..inputs.documents import Document, parse_pages

        with Document(document) as doc:
            parse_pages(pages, len(doc), str(document))


def write_json(path, obj) -> None:
    from ..drawing import write_atomically

    data = (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    write_atomically(Path(path), lambda f: f.write(data))


def report_grounding(grounding, image, boxes_file, draw_file, max_side: int | None = None) -> None:
    """Print the boxes, say what was skipped (stderr), write --boxes and --draw."""
    from ..drawing import save_drawing
    from ..inputs.grounding import format_boxes

    if grounding.boxes:
        click.echo(format_boxes(grounding.boxes))
    for s in grounding.skipped:
        click.echo(f"skipped box{' of ' + repr(s.label) if s.label else ''}: {s.text!r}: {s.reason}", err=True)
    if boxes_file is not None:
        write_json(boxes_file, grounding.to_dict())
    if draw_file is not None:
        save_drawing(image, grounding.boxes, draw_file, max_side)


def check_complete(timings: dict, max_new_tokens: int, constrained: bool) -> None:
    if constrained and timings.get("finish_reason") == "length":
        raise UserError(f"the answer reached --max-new-tokens {max_new_tokens} (or the context end) before it was "
                        "complete; raise --max-new-tokens")


def run_document(vl2, document, prompt, sampling, pages, boxes_file, draw_file, stats: bool = False) -> None:
    """Page by page: free text is printed under page headers as each page is answered; under a JSON Schema,
    stdout gets one JSON document (pages, merged object, sources, missing) and progress goes to stderr. `stats`:
    one stderr line with the pages per minute (rendering included) and each page's seconds and tokens."""
    import time

    from ..drawing import save_drawing
    from ..inputs.grounding import Grounding
    from ..pages import ask_document

    constrained = sampling.json_schema is not None

    def on_page(answer, image) -> None:
        if constrained:
            click.echo(f"page {answer.page}: {answer.seconds:.1f} s", err=True)
        else:
            click.echo(f"[page {answer.page}]\n{answer.text.strip()}\n")
        if draw_file is not None and answer.boxes:
            path = Path(draw_file)
            save_drawing(image, answer.boxes, path.with_name(f"{path.stem}-page{answer.page}{path.suffix}"))
        for s in answer.skipped_boxes:
            click.echo(f"page {answer.page}: skipped box {s.text!r}: {s.reason}", err=True)

    t0 = time.perf_counter()
    result = ask_document(vl2, document, prompt, sampling, pages, on_page)
    if stats:
        total = time.perf_counter() - t0
        per_page = ", ".join(f"page {a.page} {a.seconds:.1f} s {a.tokens} tokens" for a in result.pages)
        click.echo(f"{len(result.pages)} page(s) in {total:.1f} s = {60 * len(result.pages) / total:.2f} pages/min "
                   f"({per_page})", err=True)
    if boxes_file is not None:
        write_json(boxes_file, {"pages": [{"page": a.page, **Grounding(a.boxes, a.skipped_boxes).to_dict()}
                                          for a in result.pages]})
    if constrained:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    cut = [a.page for a in result.pages if a.finish_reason == "length"]
    if cut and constrained:
        raise UserError(f"the answer of page(s) {', '.join(map(str, cut))} reached --max-new-tokens "
                        f"{sampling.max_new_tokens} before it was complete; raise --max-new-tokens")
