"""Random JSON Schemas of the kinds document extraction uses, for the constrained-decoding tests.

Objects with required and optional fields, string enums (ASCII, CJK, emoji), numbers (amounts, measurements),
integers, booleans, dates and codes as strings with a pattern, short free strings, nested objects, arrays of objects
and of strings. Every value has a bounded length: free strings a maxLength, arrays a maxItems, numbers a range and a
multipleOf (0.01 for money: what an extraction schema should say anyway), integers a range. A random-weight model
has no reason to ever close a string or stop writing digits, so without bounds a test would measure patience, not
the constraint (test_constrain covers unbounded values cut by the token budget separately).
"""

from __future__ import annotations

import random

DATE = r"^\d{4}-\d{2}-\d{2}$"
PATTERNS = (DATE, r"^[A-Z]{3}-\d{4}$", r"^\+?\d{2,3} \d{3} \d{4}$", r"^\d{2}:\d{2}$")
FIELDS = ("vendor", "date", "total", "subtotal", "tax", "currency", "items", "name", "qty", "price", "address",
          "phone", "invoice_number", "due_date", "customer", "status", "paid", "discount", "notes", "city",
          "country", "category", "unit", "amount", "merchant", "card_last4", "title", "page", "label", "count")
ENUMS = (("USD", "EUR", "GBP", "JPY", "CNY"), ("paid", "unpaid", "overdue"), ("cash", "card", "transfer"),
         ("東京", "大阪", "北京", "서울"), ("😀 happy", "😢 sad", "😐 neutral"), ("yes", "no"))

RECEIPT = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 32},
        "date": {"type": "string", "pattern": DATE},
        "currency": {"enum": ["USD", "EUR", "GBP"]},
        "total": {"type": "number", "minimum": 0, "maximum": 100_000, "multipleOf": 0.01},
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "price"],
            "properties": {"name": {"type": "string", "maxLength": 16},
                           "price": {"type": "number", "minimum": 0, "maximum": 10_000, "multipleOf": 0.01}}}},
    },
    "required": ["vendor", "date", "total"],
    "additionalProperties": False,
}


def _string(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.3:
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if r < 0.55:
        return {"type": "string", "enum": list(rng.choice(ENUMS))}
    s = {"type": "string", "maxLength": rng.choice((4, 8, 16, 24))}
    if rng.random() < 0.3:
        s["minLength"] = 1
    return s


def _value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "string", "number", "integer", "boolean"] + (["object", "objects", "strings"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return _string(rng)
    if kind == "number":
        low = rng.choice((0, 0, -100))
        return {"type": "number", "minimum": low, "maximum": rng.choice((100, 10_000, 1_000_000)),
                "multipleOf": rng.choice((0.01, 0.01, 0.1, 0.001))}
    if kind == "integer":
        low = rng.choice((0, 1, -10))
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice((9, 100, 9999))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "object":
        return _object(rng, depth + 1)
    if kind == "objects":
        return {"type": "array", "items": _object(rng, depth + 1, max_fields=3), "maxItems": rng.choice((2, 3)),
                **({"minItems": 1} if rng.random() < 0.5 else {})}
    return {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}


def _object(rng: random.Random, depth: int = 0, max_fields: int = 6) -> dict:
    names = rng.sample(FIELDS, rng.randint(1, max_fields))
    schema = {"type": "object", "properties": {n: _value(rng, depth) for n in names}, "additionalProperties": False}
    required = [n for n in names if rng.random() < 0.7]
    if required:
        schema["required"] = required
    return schema


def random_schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_object(rng) for _ in range(n)]
