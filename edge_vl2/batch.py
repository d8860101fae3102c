"""One prompt over a folder of images, one JSON line per image, resumable: the back-office job behind `edge-vl2 batch`.

    images = list_images("scans/")                       # or a glob: "scans/**/*.jpg"
    summary = run_batch(vl2, images, "<image>\\nRead the receipt.", "results.jsonl")

Each line is `{"image", "answer", "boxes", "prompt_tokens", "completion_tokens", "timings"}` or, for an image that
could not be read (or a prompt that does not fit with it), `{"image", "error"}`: a bad file never stops the batch.
A line is appended with one write and flushed to disk before the next image starts, so an interrupted batch leaves
only whole lines, except after a hard kill in the middle of a write: the next run cuts such a partial last line off
and redoes that image. Images whose path already has a line are skipped (`retry_errors` redoes those with an error).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError
from .generate import SamplingParams

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class BatchSummary:
    total: int  # images found
    skipped: int  # already in the results file
    answered: int
    failed: int  # lines with an error


def list_images(spec: str | Path) -> list[Path]:
    """A folder (its image files, by name; not recursive) or a glob pattern (`**` recurses), sorted."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif glob.has_magic(spec):
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    elif path.is_file():
        found = [path]
    else:
        raise UserError(f"{spec}: no such folder or file, and not a glob pattern")
    if not found:
        raise UserError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)})" if path.is_dir()
                        else f"{spec}: matches no files")
    return sorted(found)


def finished_images(out: Path, retry_errors: bool = False) -> set[str]:
    """Image keys that already have a line in `out`; a partial last line (a hard kill mid-write) is cut off."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last line never got its newline: drop it, that image is redone
        with open(out, "r+b") as f:
            f.truncate(end)
    done, kept = set(), []
    for n, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["image"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{out}: line {n} is not a result line of edge-vl2 batch; move the file or pick "
                            "another --out") from None
        if not (retry_errors and "error" in record):
            done.add(key)
            kept.append(line)
    if retry_errors and len(kept) < len(data[:end].splitlines()):  # the error lines go; their images are redone
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(out)
    return done


def answer_image(vl2, image: Path, prompt: str, sampling: SamplingParams) -> dict:
    """One result line: the answer, boxes and timings, or the one-line reason this image has none."""
    try:
        inputs = vl2.prepare(prompt, [image], auto_image_tags=True)
        result = vl2.generate(inputs, sampling)
    except UserError as e:
        return {"image": str(image), "error": str(e)}
    return {"image": str(image), "answer": result.text, "boxes": [b.to_dict() for b in result.boxes],
            "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in result.timings.items()}}


def run_batch(vl2, images: list[Path], prompt: str, out: str | Path, sampling: SamplingParams = SamplingParams(),
              retry_errors: bool = False, progress: Callable[[Path, dict | None], None] | None = None) -> BatchSummary:
    """Answer `prompt` about every image not yet in `out`, appending a line per image. `progress(image, line)` is
    called after each image (line None when it was skipped)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out takes a .jsonl file")
    done = finished_images(out, retry_errors)
    summary = BatchSummary(total=len(images), skipped=0, answered=0, failed=0)
    try:
        f = open(out, "a", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror or e})") from None
    with f:
        for image in images:
            if str(image) in done:
                summary.skipped += 1
                if progress:
                    progress(image, None)
                continue
            line = answer_image(vl2, image, prompt, sampling)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")  # one write: a whole line or (hard kill) none
            f.flush()
            os.fsync(f.fileno())
            done.add(str(image))
            summary.failed += "error" in line
            summary.answered += "error" not in line
            if progress:
                progress(image, line)
    return summary
