"""The grammar-engine comparison behind README "Constrained decoding": llguidance (chosen) vs xgrammar vs
outlines-core on our own tokenizer.json, one JSON Schema, the same token sequence for every engine.

Not part of the package (it needs the two engines we do not ship); run it in a throwaway venv:

    python -m venv --system-site-packages /tmp/engines
    /tmp/engines/bin/pip install --no-deps xgrammar apache-tvm-ffi outlines-core
    edge-vl2 synth --variant tiny --size test --out /tmp/vl2-tiny-test       # the real 128,823-id vocabulary
    /tmp/engines/bin/python docs/grammar_engines.py /tmp/vl2-tiny-test/tokenizer.json

Per engine, one JSON line: import, vocabulary and compile seconds, mean / max ms per mask along a valid receipt
(every token of it must be allowed), and whether integer bounds and a date pattern are enforced (an answer that
breaks them must be refused).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = json.loads((Path(__file__).parents[1] / "tests/fixtures/documents/receipt.schema.json").read_text())
SCHEMA["properties"]["items"]["items"]["properties"]["qty"] = {"type": "integer", "minimum": 1, "maximum": 99}
GOOD = ('{"vendor": "Café 東京", "date": "2026-12-03", "currency": "EUR", "total": 12.5, '
        '"items": [{"name": "Tea 🍵", "price": 4.5, "qty": 2}]}')
BAD = {"integer bounds": GOOD.replace('"qty": 2', '"qty": 500'), "date pattern": GOOD.replace("2026-12-03", "3 Dec"),
       "multipleOf": GOOD.replace("12.5", "12.345"), "maxLength": GOOD.replace("Café 東京", "x" * 41)}


def byte_vocab(spec: dict) -> tuple[list[bytes], list[int]]:
    """Token id -> raw bytes (byte-level BPE stand-ins undone); added/special tokens get b"" and are listed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    stand_in = {chr(b): b for b in printable}
    stand_in.update({chr(256 + i): b for i, b in enumerate(sorted(set(range(256)) - set(printable)))})
    vocab = spec["model"]["vocab"]
    added = {t["id"]: t["content"] for t in spec["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [b""] * n
    for text, i in vocab.items():
        if i not in added:
            tokens[i] = bytes(stand_in[c] for c in text)
    return tokens, sorted(added)


# Each runner: (import s, vocabulary s, compile() -> new-matcher factory, mask(m) -> int32 bits, accept(m, t) -> ok).
def run_llguidance(spec, ids, eos, n):
    t0 = time.perf_counter()
    import llguidance as llg
    t1 = time.perf_counter()
    for a in spec["added_tokens"]:
        a["special"] = True
    tok = llg.LLTokenizer(json.dumps(spec), n_vocab=n, eos_token=eos)
    t2 = time.perf_counter()
    schema = {**SCHEMA, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}

    def compile_():
        grammar = llg.LLMatcher.grammar_from_json_schema(schema)
        llg.LLMatcher(tok, grammar, log_level=0)  # the lexer is built here
        return lambda: llg.LLMatcher(tok, grammar, log_level=0)

    bitmask = np.zeros((n + 31) // 32, dtype=np.int32)

    def mask(m):
        m.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        return bitmask

    return (t1 - t0, t2 - t1, compile_, mask, lambda m, t: m.consume_token(t) and not m.is_error())


def run_xgrammar(spec, ids, eos, n):
    t0 = time.perf_counter()
    import xgrammar as xgr
    t1 = time.perf_counter()
    tokens, _ = byte_vocab(spec)
    info = xgr.TokenizerInfo(tokens + [b""] * (n - len(tokens)), xgr.VocabType.RAW, vocab_size=n,
                             stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    t2 = time.perf_counter()

    def compile_():
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        return lambda: xgr.GrammarMatcher(compiled)

    bitmask = xgr.allocate_token_bitmask(1, n)

    def mask(m):
        m.fill_next_token_bitmask(bitmask)
        return bitmask[0].numpy()

    return (t1 - t0, t2 - t1, compile_, mask, lambda m, t: m.accept_token(t))


def run_outlines(spec, ids, eos, n):
    t0 = time.perf_counter()
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t1 = time.perf_counter()
    tokens, _ = byte_vocab(spec)
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(tokens):
        if b:
            by_bytes.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, by_bytes)
    t2 = time.perf_counter()

    def compile_():
        index = Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r" ?"), vocab)
        return lambda: Guide(index)

    bitmask = np.zeros((n + 31) // 32, dtype=np.int32)

    def mask(g):
        g.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
        return bitmask

    def accept(g, t):
        try:
            g.advance(t)
            return True
        except Exception:
            return False

    return (t1 - t0, t2 - t1, compile_, mask, accept)


def measure(name, runner, spec, tokenizer, n):
    eos = tokenizer.token_to_id("<｜end▁of▁sentence｜>")
    ids = tokenizer.encode(GOOD, add_special_tokens=False).ids
    import_s, vocab_s, compile_, mask, accept = runner(spec, ids, eos, n)
    t0 = time.perf_counter()
    matcher = compile_()
    compile_s = time.perf_counter() - t0
    m = matcher()
    step_ms, refused = [], None
    for k, t in enumerate(ids):
        s = time.perf_counter()
        bits = mask(m)
        step_ms.append((time.perf_counter() - s) * 1e3)
        if not (int(bits[t // 32]) >> (t % 32)) & 1 or not accept(m, t):
            refused = tokenizer.decode(ids[:k]) + " >>" + tokenizer.decode([t])
            break
    enforced = {}
    for what, text in BAD.items():
        m, ok = matcher(), True
        for t in tokenizer.encode(text, add_special_tokens=False).ids:
            bits = mask(m)
            if not (int(bits[t // 32]) >> (t % 32)) & 1 or not accept(m, t):
                ok = False
                break
        enforced[what] = not ok
    return {"engine": name, "import_s": round(import_s, 2), "vocabulary_s": round(vocab_s, 2),
            "compile_s": round(compile_s, 3), "tokens": len(ids),
            "mask_mean_ms": round(sum(step_ms) / len(step_ms), 3), "mask_max_ms": round(max(step_ms), 3),
            "valid_receipt_allowed": refused is None,
            **({"refused_at": refused[-40:]} if refused else {}), "refuses": enforced}


def main(path: str) -> None:
    from tokenizers import Tokenizer
    spec = json.loads(Path(path).read_text())
    tokenizer = Tokenizer.from_file(path)
    n = 129_280  # Tiny's lm_head rows
    engines = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}
    for name in sys.argv[2:] or engines:
        runner = engines[name]
        try:
            t0 = time.perf_counter()
            out = measure(name, runner, json.loads(json.dumps(spec)), tokenizer, n)
            out["total_s"] = round(time.perf_counter() - t0, 2)
        except Exception as e:  # an engine that cannot run here is a finding, not a crash of the comparison
            out = {"engine": name, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(out, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
