"""Calibration and evaluation data that ships with the project: rendered document images and prompts, no network.

Every image is drawn with Pillow from a seed (Pillow's bundled font, so no system fonts are needed): documents with
paragraphs, receipts with line items and a total, tables with grid lines, bar and line charts, forms. Sizes and
aspect ratios vary so the processor picks different tilings. Prompts follow the official template's tasks: describe,
OCR, table-to-markdown, chart questions, grounding (`<|ref|>...<|/ref|>.` and `<|grounding|>...`) and text-only chat.

    for prompt, images in calibration_samples(32, seed=0):              # calibration
        ...
    for prompt, images in evaluation_samples(8):                        # held out: a different seed
        ...
    calibration_samples(32, seed=0, image_dir="my_photos/")             # the user's own images, same prompts

Same (n, seed, arguments) -> the same prompts and byte-identical images.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, NamedTuple

from PIL import Image, ImageDraw, ImageFont

EVAL_SEED = 1_000_003  # held-out samples: never the calibration seed
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# (width, height): portrait pages, receipts, wide banners, squares, small crops -> 1x1 up to 3x3 tilings.
SIZES = ((384, 384), (640, 480), (480, 640), (612, 792), (360, 960), (800, 450), (1024, 384), (900, 600),
         (256, 256), (768, 768), (1100, 850), (300, 700))

WORDS = ("the model quantized weights expert router token image document invoice table chart value total price "
         "amount report quarter revenue growth market customer order shipping address date number page section "
         "summary result figure sample method data memory device edge camera kiosk scanner receipt payment "
         "balance tax discount item quantity unit store city street office phone email account north south "
         "east west annual monthly weekly budget forecast cost margin profit sales region product service").split()
ITEMS = ("Coffee", "Bagel", "Orange juice", "Sandwich", "Salad", "Water", "Croissant", "Tea", "Muffin", "Soup",
         "Notebook", "Pens (3)", "Stapler", "Paper A4", "Batteries", "USB cable", "Tape", "Folder")
NAMES = ("Alice Martin", "Bo Chen", "Carla Diaz", "Dev Patel", "Emma Weber", "Farid Haddad", "Greta Olsen")
CATEGORIES = ("North", "South", "East", "West", "Central", "Online", "Retail", "Export")

TEXT_PROMPTS = (
    "Explain in two sentences what a mixture-of-experts language model is.",
    "Write a short poem about a lighthouse in winter.",
    "What is 17 times 23? Show your steps.",
    "Translate into French: The meeting is moved to Thursday afternoon.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three tips for taking clear photos of documents.",
    "Summarise the causes of the French Revolution in one paragraph.",
    "What is the difference between RAM and flash storage?",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
)
PROMPTS = {
    "document": ("<image>\nDescribe this image.", "<image>\nRead all the text in the image.",
                 "<image>\nSummarise this document in one sentence.", "<image>\n<|ref|>the title<|/ref|>.",
                 "<image>\n<|grounding|>Locate the heading and the first paragraph."),
    "receipt": ("<image>\nWhat is the total amount on this receipt?", "<image>\n<|ref|>the total<|/ref|>.",
                "<image>\nList the items and their prices.", "<image>\nRead all the text in the image.",
                "<image>\n<|grounding|>Find the store name and the date."),
    "table": ("<image>\nConvert the table to markdown.", "<image>\nWhich row has the largest value in the last column?",
              "<image>\n<|ref|>the header row<|/ref|>.", "<image>\nDescribe this image."),
    "bar_chart": ("<image>\nWhich category has the highest value in the chart?",
                  "<image>\nWhat is the value of {label}?", "<image>\n<|ref|>the tallest bar<|/ref|>.",
                  "<image>\nDescribe the chart."),
    "line_chart": ("<image>\nDescribe the trend shown in the chart.", "<image>\nWhat is the value at {label}?",
                   "<image>\n<|grounding|>Locate the highest point of the line."),
    "form": ("<image>\nExtract the fields of this form as JSON.", "<image>\n<|ref|>the signature field<|/ref|>.",
             "<image>\nWho filled in this form?", "<image>\n<|grounding|>Locate the date field."),
    "user": ("<image>\nDescribe this image.", "<image>\nRead all the text in the image.",
             "<image>\n<|grounding|>Describe the image.", "<image>\n<|ref|>the main object<|/ref|>."),
}


class Sample(NamedTuple):
    """One prompt in the official template and its images (in `<image>` tag order)."""

    prompt: str
    images: list


def calibration_samples(n: int, seed: int = 0, image_dir: str | Path | None = None, image_fraction: float = 0.75,
                        max_tiles: int | None = None) -> Iterator[Sample]:
    """`n` (prompt, [PIL images]) samples: a mix of rendered documents/receipts/tables/charts/forms and text-only
    prompts (`image_fraction` of them have an image).

    `image_dir`: use the user's own images from that folder (sorted, cycled) instead of rendered ones.
    `max_tiles`: keep only image sizes whose tiling (global view + local tiles) has at most that many tiles
    (vision costs ~6 s per tile for the full-size tower on a 2-core CPU).
    """
    if n < 0 or not 0.0 <= image_fraction <= 1.0:
        raise ValueError("need n >= 0 and 0 <= image_fraction <= 1")
    rng = random.Random(f"edge-vl2-calibration:{seed}")
    user_images = _list_images(image_dir) if image_dir is not None else None
    sizes = [s for s in SIZES if max_tiles is None or tiles_for(s) <= max_tiles]
    if not sizes:
        raise ValueError(f"no calibration image size fits in {max_tiles} tiles (the minimum is 2)")
    next_user = 0
    for _ in range(n):
        if rng.random() >= image_fraction:
            yield Sample(rng.choice(TEXT_PROMPTS), [])
            continue
        if user_images is not None:
            from edge_vl2.inputs.images import load_image

            path = user_images[next_user % len(user_images)]
            next_user += 1
            image = load_image(path)
            if max_tiles is not None and tiles_for(image.size) > max_tiles:
                image = _fit_tiles(image, max_tiles)
            yield Sample(rng.choice(PROMPTS["user"]), [image])
            continue
        kind = rng.choice(tuple(RENDERERS))
        size = rng.choice(sizes)
        image, labels = RENDERERS[kind](random.Random(rng.random()), size)
        prompt = rng.choice(PROMPTS[kind]).replace("{label}", rng.choice(labels) if labels else "the first entry")
        yield Sample(prompt, [image])


def evaluation_samples(n: int, seed: int = EVAL_SEED, image_dir: str | Path | None = None,
                       image_fraction: float = 0.75, max_tiles: int | None = None) -> Iterator[Sample]:
    """Held-out samples: `calibration_samples` under a seed that calibration never uses."""
    return calibration_samples(n, seed, image_dir, image_fraction, max_tiles)


def tiles_for(size: tuple[int, int], image_size: int = 384) -> int:
    """Tiles the official processor makes for an image of this (w, h): 1 global + the local grid."""
    from edge_vl2.inputs.tiling import OFFICIAL_CANDIDATE_RESOLUTIONS, select_best_resolution

    w, h = select_best_resolution(size, OFFICIAL_CANDIDATE_RESOLUTIONS)
    return 1 + (w // image_size) * (h // image_size)


def _fit_tiles(image: Image.Image, max_tiles: int) -> Image.Image:
    """Shrink a user image until its tiling fits `max_tiles` (aspect ratio kept)."""
    while tiles_for(image.size) > max_tiles and min(image.size) > 32:
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)), Image.BICUBIC)
    return image


def _list_images(image_dir: str | Path) -> list[Path]:
    from edge_vl2.errors import UserError

    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


# --- renderers: (rng, (w, h)) -> (RGB image, labels a question may name) ----------------------------------------

def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, size))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _canvas(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    shade = rng.randint(235, 255)
    image = Image.new("RGB", size, (shade, shade, rng.randint(225, 255)))
    return image, ImageDraw.Draw(image)


def render_document(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A page: a title, then justified-looking paragraphs of words, wrapped to the page width."""
    image, draw = _canvas(rng, size)
    w, h = size
    margin, fs = max(8, w // 16), max(9, min(w, h) // 28)
    title = _words(rng, rng.randint(2, 5)).title()
    draw.text((margin, margin), title, fill=(10, 10, 40), font=_font(int(fs * 1.6)))
    y, font = margin + int(fs * 3), _font(fs)
    while y < h - margin - fs:
        line, words = "", rng.randint(20, 60)
        for _ in range(words):
            word = rng.choice(WORDS)
            if draw.textlength(line + " " + word, font=font) > w - 2 * margin:
                draw.text((margin, y), line, fill=(20, 20, 20), font=font)
                y += int(fs * 1.4)
                line = word
                if y >= h - margin - fs:
                    break
            else:
                line = (line + " " + word).strip()
        else:
            draw.text((margin, y), line, fill=(20, 20, 20), font=font)
            y += int(fs * 2.2)  # paragraph break
    return image, [title]


def render_receipt(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A till receipt: store, date, line items with quantities and prices, subtotal, tax and the total."""
    image, draw = _canvas(rng, size)
    w, h = size
    fs = max(9, min(w // 22, h // 30))
    font, big = _font(fs), _font(int(fs * 1.4))
    x0, x1, y = w // 10, w - w // 10, h // 30
    store = f"{rng.choice(['CORNER', 'CITY', 'FRESH', 'OFFICE'])} {rng.choice(['MARKET', 'CAFE', 'SUPPLY', 'STORE'])}"
    draw.text((x0, y), store, fill=(0, 0, 0), font=big)
    y += int(fs * 2)
    draw.text((x0, y), f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/20{rng.randint(19, 25)}  "
                       f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}", fill=(0, 0, 0), font=font)
    y += int(fs * 2)
    subtotal, labels = 0.0, []
    for _ in range(rng.randint(3, 12)):
        if y > h - fs * 8:
            break
        item, qty, price = rng.choice(ITEMS), rng.randint(1, 4), rng.randint(50, 2500) / 100
        subtotal += qty * price
        labels.append(item)
        draw.text((x0, y), f"{qty} x {item}", fill=(0, 0, 0), font=font)
        text = f"{qty * price:.2f}"
        draw.text((x1 - draw.textlength(text, font=font), y), text, fill=(0, 0, 0), font=font)
        y += int(fs * 1.5)
    draw.line((x0, y, x1, y), fill=(0, 0, 0), width=1)
    tax = round(subtotal * 0.08, 2)
    for label, value, f in (("Subtotal", subtotal, font), ("Tax 8%", tax, font), ("TOTAL", subtotal + tax, big)):
        y += int(fs * 1.6)
        draw.text((x0, y), label, fill=(0, 0, 0), font=f)
        text = f"{value:.2f}"
        draw.text((x1 - draw.textlength(text, font=f), y), text, fill=(0, 0, 0), font=f)
    return image, labels


def render_table(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A grid table: header row, a label column, numeric cells, grid lines."""
    image, draw = _canvas(rng, size)
    w, h = size
    cols, rows = rng.randint(3, 6), rng.randint(4, 12)
    x0, y0, x1, y1 = w // 20, h // 20, w - w // 20, h - h // 20
    cw, rh = (x1 - x0) / cols, (y1 - y0) / (rows + 1)
    font = _font(int(min(rh * 0.5, cw / 7)))
    headers = ["Region"] + [rng.choice(["Q1", "Q2", "Q3", "Q4", "Units", "Price", "Cost", "Growth"])
                            for _ in range(cols - 1)]
    labels = []
    for r in range(rows + 1):
        for c in range(cols):
            cell = headers[c] if r == 0 else (rng.choice(CATEGORIES) if c == 0 else f"{rng.randint(1, 9999):,}")
            if r and c == 0:
                labels.append(cell)
            draw.text((x0 + c * cw + 4, y0 + r * rh + rh * 0.2), cell, font=font,
                      fill=(0, 0, 0) if r else (0, 0, 120))
    for r in range(rows + 2):
        draw.line((x0, y0 + r * rh, x1, y0 + r * rh), fill=(60, 60, 60), width=2 if r in (0, 1) else 1)
    for c in range(cols + 1):
        draw.line((x0 + c * cw, y0, x0 + c * cw, y1), fill=(60, 60, 60), width=1)
    return image, labels


def _axes(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random, top: float):
    w, h = size
    x0, y0, x1, y1 = w // 8, h // 8, w - w // 16, h - h // 6
    font = _font(max(8, min(w, h) // 32))
    draw.text((x0, max(2, y0 // 3)), _words(rng, 3).title(), fill=(0, 0, 0), font=_font(max(9, min(w, h) // 22)))
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0), width=2)
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0), width=2)
    for k in range(5):
        y = y1 - (y1 - y0) * k / 4
        draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
        draw.text((2, y - 6), f"{top * k / 4:.0f}", fill=(0, 0, 0), font=font)
    return x0, y0, x1, y1, font


def render_bar_chart(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    image, draw = _canvas(rng, size)
    labels = rng.sample(CATEGORIES, rng.randint(3, 7))
    values = [rng.randint(5, 100) for _ in labels]
    top = max(values) * 1.1
    x0, y0, x1, y1, font = _axes(draw, size, rng, top)
    step = (x1 - x0) / len(labels)
    color = tuple(rng.randint(30, 200) for _ in range(3))
    for k, (label, v) in enumerate(zip(labels, values)):
        bx = x0 + k * step + step * 0.15
        draw.rectangle((bx, y1 - (y1 - y0) * v / top, bx + step * 0.7, y1), fill=color, outline=(0, 0, 0))
        draw.text((bx, y1 + 4), label, fill=(0, 0, 0), font=font)
    return image, labels


def render_line_chart(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    image, draw = _canvas(rng, size)
    labels = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][:rng.randint(5, 12)]
    v, values = rng.uniform(20, 60), []
    for _ in labels:
        v = max(1.0, v + rng.uniform(-12, 15))
        values.append(v)
    top = max(values) * 1.15
    x0, y0, x1, y1, font = _axes(draw, size, rng, top)
    step = (x1 - x0) / max(1, len(labels) - 1)
    pts = [(x0 + k * step, y1 - (y1 - y0) * v / top) for k, v in enumerate(values)]
    draw.line(pts, fill=(200, 30, 30), width=3)
    for (px, py), label in zip(pts, labels):
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(200, 30, 30))
        draw.text((px - 8, y1 + 4), label, fill=(0, 0, 0), font=font)
    return image, labels


def render_form(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """A filled-in form: labelled fields with underlines, a checkbox row, a signature line."""
    image, draw = _canvas(rng, size)
    w, h = size
    fs = max(9, min(w, h) // 26)
    font = _font(fs)
    x0, y = w // 12, h // 14
    draw.text((x0, y), rng.choice(["Application Form", "Registration", "Delivery Note", "Claim Form"]),
              fill=(0, 0, 80), font=_font(int(fs * 1.5)))
    y += int(fs * 3)
    fields = [("Name", rng.choice(NAMES)), ("Date", f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.2024"),
              ("Email", f"{rng.choice(WORDS)}@example.com"), ("Phone", f"+1 555 {rng.randint(1000, 9999)}"),
              ("Address", f"{rng.randint(1, 999)} {rng.choice(WORDS).title()} Street"),
              ("Amount", f"{rng.randint(10, 5000)}.00")]
    for label, value in fields:
        if y > h - fs * 5:
            break
        draw.text((x0, y), f"{label}:", fill=(0, 0, 0), font=font)
        vx = x0 + int(fs * 6)
        draw.text((vx, y - 2), value, fill=(20, 20, 160), font=font)
        draw.line((vx, y + fs + 2, w - x0, y + fs + 2), fill=(0, 0, 0))
        y += int(fs * 2.2)
    for k, opt in enumerate(("Yes", "No")):
        bx = x0 + k * fs * 6
        draw.rectangle((bx, y, bx + fs, y + fs), outline=(0, 0, 0))
        if rng.random() < 0.5:
            draw.line((bx, y, bx + fs, y + fs), fill=(20, 20, 160), width=2)
        draw.text((bx + fs + 4, y), opt, fill=(0, 0, 0), font=font)
    y += int(fs * 2.5)
    draw.text((x0, min(y, h - fs * 2)), "Signature: ____________________", fill=(0, 0, 0), font=font)
    return image, [f[0] for f in fields]


RENDERERS = {"document": render_document, "receipt": render_receipt, "table": render_table,
             "bar_chart": render_bar_chart, "line_chart": render_line_chart, "form": render_form}
