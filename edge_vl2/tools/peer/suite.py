"""The peer set: one source GGUF of our decoder plus llama.cpp's Q8_0 / Q5_K_M / Q4_K_M / Q4_0 made from it, their
sizes, and llama.cpp's batch-1 prefill and decode speed on each.

    python -m edge_vl2.tools.peer.suite build --model CKPT --out DIR [--storage bf16]
    python -m edge_vl2.tools.peer.suite time --dir DIR [--threads 1,2] [--new-tokens 48] [--prompt-tokens 128]
    python -m edge_vl2.tools.peer.suite check --dir DIR [--gguf PATH] [--dtype bf16] [--prompt-tokens 64]

`build` writes DIR/tiny-{storage}.gguf, DIR/tiny-{TYPE}.gguf and DIR/peer.json (paths, bytes, llama.cpp system
info); `check` runs one GGUF in llama.cpp and our decoder on the same prose tokens and prints KL / top-1 / max
|diff| (a full-size sanity check of the writer; the exact proof is the f32 test on the test-size model); `time` prints one JSON line per (file, threads) and appends them to DIR/timings.jsonl. Heavy: run under
`flock /work/heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ...errors import UserError, one_line
from .gguf_writer import write_gguf
from .llama_runner import QUANT_TYPES, quantize_gguf, system_info, time_generation

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog. A small robot reads the morning paper, counts the "
               "birds on the wire and writes down what it saw. ")


def build_peer_set(model: str | Path, out_dir: str | Path, storage: str = "bf16",
                   types: tuple[str, ...] = tuple(QUANT_TYPES), threads: int = 0) -> dict:
    """Write the source GGUF and each llama.cpp type from it; returns (and writes to peer.json) their bytes."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    src = write_gguf(model, out_dir / f"tiny-{storage}.gguf", storage)
    record = {"model": str(model), "source": {"path": str(src.path), "storage": storage, "bytes": src.bytes,
                                              "write_s": round(time.perf_counter() - t0, 1)},
              "quantized": {}, "llama_cpp": system_info()}
    for q in types:
        t0 = time.perf_counter()
        path = quantize_gguf(src.path, out_dir / f"tiny-{q}.gguf", q, threads)
        record["quantized"][q] = {"path": str(path), "bytes": path.stat().st_size,
                                  "quantize_s": round(time.perf_counter() - t0, 1)}
    (out_dir / "peer.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def prompt_tokens(model_dir: str | Path, n: int) -> list[int]:
    """bos + `n - 1` ids of English prose through the checkpoint's own tokenizer."""
    from ...inputs.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    while len(ids) < n - 1:
        ids += tok.encode(PROMPT_TEXT)
    return [0] + ids[: n - 1]


def time_peer_set(out_dir: str | Path, threads: list[int], prompt: list[int], new_tokens: int) -> list[dict]:
    """llama.cpp prefill/decode timing of every GGUF in peer.json, files in order, each thread count back to back."""
    out_dir = Path(out_dir)
    record = json.loads((out_dir / "peer.json").read_text())
    files = [record["source"]["path"]] + [q["path"] for q in record["quantized"].values()]
    results = []
    for path in files:
        for n in threads:
            r = {**time_generation(path, prompt, new_tokens, n).as_dict(), "bytes": Path(path).stat().st_size}
            print(json.dumps(r), flush=True)
            with open(out_dir / "timings.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            results.append(r)
    return results


def compare_logits(model: str | Path, gguf_path: str | Path, tokens: list[int], dtype: str = "bf16",
                   threads: int = 2) -> dict:
    """KL(ours || llama.cpp) mean and max over positions, top-1 agreement and max |logit diff| on `tokens`."""
    import torch

    from ...model.vl2 import load_model
    from .llama_runner import LlamaCppModel

    m = LlamaCppModel(gguf_path, n_ctx=len(tokens), threads=threads, kv_type="f32", logits_all=True)
    try:
        theirs = torch.from_numpy(m.logits(tokens))
    finally:
        m.close()
    vl2, _ = load_model(model, dtype=getattr(torch, {"bf16": "bfloat16", "f32": "float32"}[dtype]))
    lm = vl2.language
    with torch.inference_mode():
        ours = lm.logits(lm(lm.model.embed_tokens(torch.tensor(tokens))))
    del vl2, lm
    lp, lq = ours.log_softmax(-1), theirs.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"gguf": str(gguf_path), "ours": dtype, "positions": len(tokens), "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(), "top1": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "max_abs_diff": (ours - theirs).abs().max().item(), "logit_absmax": ours.abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_vl2.tools.peer.suite")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--storage", default="bf16")
    t = sub.add_parser("time")
    t.add_argument("--dir", required=True)
    t.add_argument("--threads", default="1,2")
    t.add_argument("--new-tokens", type=int, default=48)
    t.add_argument("--prompt-tokens", type=int, default=128)
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--gguf", default=None, help="default: the source GGUF in peer.json")
    c.add_argument("--dtype", default="bf16", choices=("bf16", "f32"))
    c.add_argument("--prompt-tokens", type=int, default=64)
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            print(json.dumps(build_peer_set(args.model, args.out, args.storage), indent=1))
        elif args.cmd == "check":
            record = json.loads((Path(args.dir) / "peer.json").read_text())
            tokens = prompt_tokens(record["model"], args.prompt_tokens)
            print(json.dumps(compare_logits(record["model"], args.gguf or record["source"]["path"], tokens,
                                            args.dtype)), flush=True)
        else:
            model = json.loads((Path(args.dir) / "peer.json").read_text())["model"]
            print(json.dumps({"llama_cpp": system_info()}), flush=True)
            time_peer_set(args.dir, [int(x) for x in args.threads.split(",")],
                          prompt_tokens(model, args.prompt_tokens), args.new_tokens)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
