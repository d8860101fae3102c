"""A small byte-level BPE in the official `tokenizer.json` layout, with special tokens at the REAL ids (model-facts §6.1).

The real tokenizers have ~100k/129k entries; ours trains a few hundred merges on the English text at the end of this
file, then pads the vocabulary with filler tokens up to the first special id. Fillers are never produced by encoding
(no merge builds them) but decode to readable text, so every id below the specials exists as in the real file.
Structure mirrors the official files: DeepSeek pre-tokenizer Sequence (digits in runs of <= 3, CJK runs, word/punct
regex, then ByteLevel without regex), ByteLevel decoder, TemplateProcessing that prepends bos, merges as "a b".
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"  # fullwidth ｜ and ▁
# ASCII | here, unlike bos/eos/pad. Order = id order in both tokenizer families.
EXTRA_SPECIALS = ("<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>")

# Copied from the official tokenizer.json (the DeepSeek-V3 family pre-tokenizer).
_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    # (non-raw on purpose: CR and LF are literal characters in the official pattern)
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
_TRAIN_VOCAB = 1024  # upper bound; the corpus yields fewer merges (min_frequency 2)


def special_token_ids(variant: str) -> dict[str, int]:
    """The real ids: tiny/base (129,280-row vocab) bos/eos/pad 0-2 and the rest from 128815; small 100000-100010."""
    if variant == "small":
        return {tok: 100000 + i for i, tok in enumerate((BOS, EOS, PAD) + EXTRA_SPECIALS)}
    if variant in ("tiny", "base"):
        return {BOS: 0, EOS: 1, PAD: 2, **{tok: 128815 + i for i, tok in enumerate(EXTRA_SPECIALS)}}
    raise ValueError(f"unknown variant {variant!r}")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in _SPLITS]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _train(in_vocab_specials: list[str]) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE on the corpus: specials (if any) first, then the 256 byte symbols, then merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=_TRAIN_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=in_vocab_specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 byte symbols
    tok.train_from_iterator([_CORPUS], trainer)  # one item, so "\n\n" and line starts get merges
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # byte-level tokens have no spaces
    return model["vocab"], merges


def tokenizer_json(variant: str) -> str:
    """The `tokenizer.json` text for `variant` (deterministic)."""
    ids = special_token_ids(variant)
    # tiny/base keep bos/eos/pad inside the BPE vocab at 0-2 (as the official file does); every other special is
    # added on top of the BPE vocab, which therefore ends just below the first of them.
    first_added = min(i for i in ids.values() if i > 2)
    in_vocab = [t for t, i in ids.items() if i < first_added]
    vocab, merges = _train(in_vocab)
    assert [vocab[t] for t in in_vocab] == [ids[t] for t in in_vocab]
    # Filler ids up to the specials: ASCII (each char is its own byte-level symbol), unlike anything trained.
    for k in range(len(vocab), first_added):
        vocab[f"<|filler{k}|>"] = k
    assert len(vocab) == first_added

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, ids[BOS])])
    # Added in id order: existing vocab entries keep their id, new ones are numbered from len(vocab) on.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(ids, key=ids.get)])
    got = {t: tok.token_to_id(t) for t in ids}
    if got != ids:
        raise AssertionError(f"special tokens landed at {got}, expected {ids}")
    data = json.loads(tok.to_str())
    data["model"]["merges"] = merges  # "a b" strings, as in the official files (readable by tokenizers < 0.20)
    return json.dumps(data, ensure_ascii=False, indent=2)


def build_tokenizer(variant: str) -> Tokenizer:
    """A byte-level BPE `Tokenizer` whose special tokens sit at `variant`'s real ids."""
    return Tokenizer.from_str(tokenizer_json(variant))


def _special_files(variant: str) -> dict[str, dict]:
    ids = special_token_ids(variant)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in sorted(ids.items(), key=lambda kv: kv[1])}
    special_map = {"additional_special_tokens": ["<|User|>", "<|Assistant|>"], "bos_token": BOS, "eos_token": EOS,
                   "pad_token": PAD}
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, **special_map,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
              "tokenizer_class": "LlamaTokenizer", "unk_token": None, "use_default_system_prompt": False}
    # Top-level keys sorted, added_tokens_decoder in id order ("2" before "128815"), as transformers writes them.
    return {"special_tokens_map.json": dict(sorted(special_map.items())),
            "tokenizer_config.json": dict(sorted(config.items()))}


def write_tokenizer_files(out_dir: str | Path, variant: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    out = Path(out_dir)
    (out / "tokenizer.json").write_text(tokenizer_json(variant), encoding="utf-8")
    for name, data in _special_files(variant).items():
        (out / name).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# Training text: the kinds of strings a VL model reads and writes (documents, receipts, tables, captions, chat,
# grounding answers), with digits and punctuation so numbers and symbols get merges too.
_CORPUS = """\
Quarterly Report, Q3 2024. Revenue rose 12.5% year over year to $4,318 million, driven by strong demand in the
cloud segment. Operating margin was 23.1%, compared with 19.8% in the same period last year. The board approved a
dividend of $0.42 per share, payable on November 15, 2024 to shareholders of record as of October 31, 2024.
Section 2.1: Scope. This agreement ("Agreement") applies to all services provided by the Supplier to the Customer.
Section 2.2: Term. The initial term is twelve (12) months, renewed automatically unless either party gives notice.
Please sign below and return one copy to the address shown on page 3 of 7.

GREEN GROCER MARKET
123 Main Street, Springfield, IL 62704
Tel: (217) 555-0198
Date: 03/14/2024   Time: 10:42 AM
Receipt #: 000482-117
------------------------------------------
2 x Organic Bananas        @ 0.69     1.38
1 x Whole Milk 1 gal                  3.49
3 x Greek Yogurt           @ 1.25     3.75
1 x Sourdough Bread                   4.99
1 x Coffee Beans 12 oz               11.99
------------------------------------------
SUBTOTAL                             25.60
TAX 6.25%                             1.60
TOTAL                               $27.20
VISA **** 4821                      $27.20
Thank you for shopping with us! Returns accepted within 30 days with receipt.

| Country | Capital | Population (M) | Area (km2) |
|---------|---------|----------------|------------|
| France  | Paris   | 68.2           | 551,695    |
| Japan   | Tokyo   | 124.5          | 377,975    |
| Brazil  | Brasilia| 216.4          | 8,515,767  |
| Kenya   | Nairobi | 55.1           | 580,367    |

Table 3: Results on the validation set. Accuracy (%) and latency (ms) for each model size.
Model      Params   Acc.   Latency
small      1.0B     71.4   12.3
medium     2.8B     76.9   25.7
large      4.5B     80.2   48.1

Figure 1: A dog catches a red frisbee in a sunny park while two children watch from a wooden bench.
A close-up photo of a cat sleeping on a blue sofa next to a stack of books.
An aerial view of a city at night, with bright streets forming a grid and a river crossing from left to right.
A bowl of fresh salad with tomatoes, cucumbers, olives and feta cheese on a white table.
Two people riding bicycles along a coastal road at sunset; the sky is orange and purple.
The chart shows monthly sales from January to December, peaking in July at 1,240 units.
A handwritten note that reads: "Meet me at the station at 5:30 pm. Don't be late!"
A street sign that says "Main St" and "5th Ave" above a traffic light.

User: What is written on the sign in the image?
Assistant: The sign says "No Parking 8am-6pm, Mon-Fri". There is also a small arrow pointing to the left.
User: How many people are in the picture?
Assistant: There are three people: a woman holding an umbrella, a man with a backpack, and a child in a yellow coat.
User: Can you summarize this document in two sentences?
Assistant: The document describes the company's results for the third quarter. Revenue and margins improved, and
the board approved a dividend.
User: Convert the table to JSON.
Assistant: {"country": "France", "capital": "Paris", "population_m": 68.2}, {"country": "Japan", "capital": "Tokyo"}
User: What's the total on the receipt, and what was the tax rate?
Assistant: The total is $27.20, and the tax rate is 6.25%.
User: Describe the image in detail.
Assistant: The image shows a kitchen with white cabinets, a stainless steel refrigerator and a wooden table with four
chairs. A window on the right lets in natural light, and there is a plant on the windowsill.
User: Locate the red car.
Assistant: The red car is parked near the center of the image, at [[412, 305, 598, 472]].
User: Find all the people in the photo.
Assistant: person [[120, 80, 260, 940]], person [[540, 110, 700, 960]]

Math: 3 + 4 = 7; 12 * 8 = 96; 144 / 12 = 12; 2^10 = 1024; sqrt(81) = 9; 1/3 ~ 0.333; -5 < 0 <= 5.
Code: def area(w, h): return w * h  # width x height in pixels
Path: /home/user/data/images/photo_0001.jpg, C:\\Users\\Admin\\Documents\\report-2024.pdf
URL: https://www.example.com/products?id=42&sort=price#reviews
Email: support@example.org; phone +1 (800) 555-0142; order no. A-7731/B.
Dates: 2023-01-01, 12/31/2023, 1 Jan 2024, 09:00-17:30, Q1-Q4, 1st, 2nd, 3rd, 4th.
Punctuation: commas, periods. Question? Exclamation! Semi-colon; colon: dash - em dash -- ellipsis... (parentheses)
[brackets] {braces} "double quotes" 'single quotes' 50% off, #1 choice, @home, a & b, x_y, a|b, ~approx, `code`.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft zebras
jump! The five boxing wizards jump quickly. Sphinx of black quartz, judge my vow.
In the morning we walked to the old harbour, where the fishing boats were unloading their catch. The market opened at
seven, and by nine the stalls were busy with people buying bread, cheese, fruit and flowers. We stopped for coffee,
read the newspaper, and talked about the weather, which was cold but bright.
Instructions: 1. Remove the cover. 2. Insert two AA batteries (not included). 3. Close the cover until it clicks.
4. Press and hold the power button for 3 seconds. Warning: keep away from water and do not expose to heat above 40 C.
Ingredients: flour (200 g), sugar (100 g), butter (80 g), 2 eggs, 1 tsp vanilla, a pinch of salt. Bake at 180 C
for 25-30 minutes.
Invoice No. 2024-0917 | Due: 30 days | Amount due: EUR 1,250.00 | IBAN: DE89 3704 0044 0532 0130 00
Page 1 of 2. Confidential. Do not distribute without written permission.
"""
