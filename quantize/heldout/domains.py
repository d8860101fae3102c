"""The fidelity suite's held-out domains, none produced by the calibration generator's prompts:

    prose        hand-written paragraphs (`texts.PROSE`), raw text after bos (as `llama-perplexity` scores text)
    chat         hand-written multi-turn conversations in the official template (`texts.CHAT`)
    photo        real photos (a folder, by default the repo's tests/fixtures/images) through a camera-like pipeline:
                 crop, JPEG re-encode at low quality, rotation, downscale; one image, hand-written questions
    document     rendered documents from `calibration_data` under the evaluation seed: the in-distribution domain
    multi_image  2-3 photos in one prompt (3 images: no tiling, one 384 px view each, as the official processor)

    items = heldout_items(per_domain=2, photo_dir="tests/fixtures/images", max_tiles=3)

Same arguments -> the same prompts and byte-identical images.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .texts import CHAT, PROSE

DOMAINS = ("prose", "chat", "photo", "document", "multi_image")
TEXT_DOMAINS = ("prose", "chat")
DEFAULT_PHOTO_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "images"

PHOTO_QUESTIONS = ("What is happening in this picture?", "Describe the scene in detail.",
                   "How many people can you see, and what are they doing?", "What time of day does this look like?",
                   "Is there any text visible in the photo? If so, what does it say?")
MULTI_QUESTIONS = ("What do these pictures have in common?", "Compare the first and the last image.",
                   "Which of these photos was taken indoors?")


@dataclass
class HeldOutItem:
    """One held-out prompt: its domain, text (raw text for prose) or conversation, and images in tag order."""

    domain: str
    conversation: list[dict] | None = None  # processor.process messages; None for raw text
    text: str | None = None  # raw text (prose)
    images: list = field(default_factory=list)


def camera_variant(image: Image.Image, rng: random.Random) -> Image.Image:
    """A camera-like version of a photo: random crop (60-95 %), rotation (0/90/270 or a few degrees), downscale,
    then JPEG re-encoding at quality 35-75 (block artefacts a phone or messenger adds)."""
    image = image.convert("RGB")
    w, h = image.size
    f = rng.uniform(0.6, 0.95)
    cw, ch = max(32, int(w * f)), max(32, int(h * f))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    turn = rng.choice((0, 90, 270, "tilt"))
    if turn == "tilt":
        image = image.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    elif turn:
        image = image.rotate(turn, expand=True)
    scale = rng.uniform(0.5, 1.0)
    image = image.resize((max(32, int(image.width * scale)), max(32, int(image.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=rng.randint(35, 75))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _photos(photo_dir: str | Path) -> list[Path]:
    from ..calibration_data import _list_images

    return _list_images(photo_dir)


def heldout_items(per_domain: int, photo_dir: str | Path | None = DEFAULT_PHOTO_DIR, max_tiles: int | None = 3,
                  domains: tuple[str, ...] = DOMAINS, seed: int = 0) -> list[HeldOutItem]:
    """`per_domain` items of each domain (photo domains need `photo_dir`; a UserError when it has no images)."""
    from ..calibration_data import _fit_tiles, evaluation_samples

    unknown = set(domains) - set(DOMAINS)
    if unknown or per_domain < 0:
        raise ValueError(f"unknown domains {sorted(unknown)} (expected {DOMAINS}) or per_domain < 0")
    rng = random.Random(f"edge-vl2-heldout:{seed}")
    photos = _photos(photo_dir) if {"photo", "multi_image"} & set(domains) else []
    fit = (lambda im: _fit_tiles(im, max_tiles)) if max_tiles else (lambda im: im)
    out: list[HeldOutItem] = []
    for d in domains:
        for k in range(per_domain):
            if d == "prose":
                out.append(HeldOutItem(d, text=PROSE[k % len(PROSE)]))
            elif d == "chat":
                history, last = CHAT[k % len(CHAT)]
                conv = [m for u, a in history for m in ({"role": "user", "content": u},
                                                        {"role": "assistant", "content": a})]
                out.append(HeldOutItem(d, conversation=conv + [{"role": "user", "content": last},
                                                               {"role": "assistant", "content": ""}]))
            elif d == "photo":
                image = fit(camera_variant(Image.open(photos[k % len(photos)]), rng))
                out.append(HeldOutItem(d, _single(PHOTO_QUESTIONS[k % len(PHOTO_QUESTIONS)]), images=[image]))
            elif d == "document":
                prompt, images = list(evaluation_samples(1, seed=10_007 + k, image_fraction=1.0,
                                                         max_tiles=max_tiles))[0]
                out.append(HeldOutItem(d, _single(prompt.removeprefix("<image>\n")), images=images))
            else:  # multi_image
                pick = rng.sample(photos, min(3, len(photos)))
                images = [camera_variant(Image.open(p), rng) for p in pick]
                tags = "".join(f"Image {i + 1}: <image>\n" for i in range(len(images)))
                out.append(HeldOutItem(d, [{"role": "user", "content": tags + MULTI_QUESTIONS[k % 3]},
                                           {"role": "assistant", "content": ""}], images=images))
    return out


def _single(question: str) -> list[dict]:
    return [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": ""}]
