"""llama.cpp through llama-cpp-python: quantize a GGUF, full logits for a token sequence, prefill and decode timing.

Everything takes token ids, never text, so both sides of a comparison see exactly the same sequence (llama.cpp's
tokenizer is not involved). One model object per configuration; threads are fixed at load, as llama.cpp does.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import UserError

# llama.cpp's own names for the formats we compare against -> llama_ftype constant in llama_cpp
QUANT_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
               "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
# ggml_type ids of the KV cache (ggml.h: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1). llama.cpp's default is f16.
KV_TYPES = {"f32": 0, "f16": 1}


def llama_cpp_module():
    """The `llama_cpp` module, or a one-line UserError saying why it cannot be used."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # OSError: the package is there but its shared library does not load
        raise UserError(f"llama.cpp peer needs llama-cpp-python (pip install llama-cpp-python): {e}") from None
    return llama_cpp


def system_info() -> str:
    """llama.cpp's version and its CPU feature line (which SIMD paths the build uses)."""
    lc = llama_cpp_module()
    return f"llama-cpp-python {lc.__version__}; {lc.llama_print_system_info().decode().strip()}"


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, threads: int = 0) -> Path:
    """llama.cpp's quantizer (`llama-quantize` logic, default mixes of each type) from an f32/f16/bf16 GGUF."""
    lc = llama_cpp_module()
    if qtype not in QUANT_TYPES:
        raise UserError(f"unknown llama.cpp type {qtype!r}; expected one of {', '.join(QUANT_TYPES)}")
    # llama-cpp-python prints llama.cpp's log at its logger's level: keep the per-tensor quantize lines out
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, QUANT_TYPES[qtype])
    params.nthread = threads
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    rc = lc.llama_model_quantize(str(src).encode(), str(partial).encode(), params)
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantize {src} to {qtype} (llama_model_quantize returned {rc})")
    partial.replace(dst)
    return dst


class LlamaCppModel:
    """One GGUF loaded by llama.cpp on the CPU with a fixed context, thread count and KV-cache type."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int = 1, kv_type: str = "f16",
                 logits_all: bool = False, n_batch: int = 512):
        lc = llama_cpp_module()
        if not Path(path).is_file():
            raise UserError(f"{path}: no such GGUF file")
        self.path, self.threads, self.kv_type = Path(path), threads, kv_type
        self.llm = lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                            n_threads_batch=threads, logits_all=logits_all, type_k=KV_TYPES[kv_type],
                            type_v=KV_TYPES[kv_type], flash_attn=False, n_gpu_layers=0, verbose=False)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """fp32 logits [len(tokens), vocab] of one causal pass over `tokens` from position 0 (needs logits_all)."""
        if not self.llm._logits_all:
            raise ValueError("load with logits_all=True to read every position's logits")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def logits_with_embeddings(self, tokens: Sequence[int], mask: Sequence[bool], embeds: np.ndarray) -> np.ndarray:
        """fp32 logits [T, vocab] of one pass where position i reads token `tokens[i]` through the GGUF's own
        (possibly quantized) embedding table, or, where `mask[i]`, the next row of `embeds` [mask.sum(), hidden]
        (our image vectors: the same inputs reach both decoders). Runs of each kind go in as separate llama_decode
        calls on one sequence, positions continuing."""
        lc = llama_cpp_module()
        mask = np.asarray(mask, dtype=bool)
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        hidden = self.llm.n_embd()
        if len(mask) != len(tokens) or embeds.shape != (int(mask.sum()), hidden):
            raise ValueError(f"{len(tokens)} tokens, {len(mask)} mask entries, embeds {embeds.shape}: expected "
                             f"[{int(mask.sum())}, {hidden}]")
        ctx, n_batch, vocab = self.llm.ctx, self.llm.n_batch, self.llm.n_vocab()
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        self.llm.reset()
        out = np.empty((len(tokens), vocab), dtype=np.float32)
        row = 0
        for start, end, is_embed in _runs(mask, n_batch):
            n = end - start
            batch = lc.llama_batch_init(n, hidden if is_embed else 0, 1)
            try:
                batch.n_tokens = n
                for j in range(n):
                    batch.pos[j], batch.n_seq_id[j], batch.logits[j] = start + j, 1, True
                    batch.seq_id[j][0] = 0
                    if not is_embed:
                        batch.token[j] = int(tokens[start + j])
                if is_embed:
                    ctypes.memmove(batch.embd, embeds[row:row + n].ctypes.data, n * hidden * 4)
                    row += n
                rc = lc.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} at positions {start}..{end - 1}")
                out[start:end] = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n * vocab,)).reshape(n, vocab)
            finally:
                lc.llama_batch_free(batch)
        return out

    def last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))

    def close(self) -> None:
        self.llm.close()


def _runs(mask: np.ndarray, limit: int):
    """(start, end, value) of the maximal runs of equal `mask` values, each cut to at most `limit` positions."""
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start] or i - start == limit:
            yield start, i, bool(mask[start])
            start = i


@dataclass(frozen=True)
class Timing:
    """Batch-1 speed of one GGUF at one thread count (prefill of `prompt_tokens`, then greedy `new_tokens`)."""

    gguf: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_ms_median: float
    decode_ms_p90: float
    decode_tok_s: float
    load_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def time_generation(path: str | Path, prompt: Sequence[int], new_tokens: int = 48, threads: int = 1) -> Timing:
    """Prefill `prompt`, then decode `new_tokens` greedily one token at a time, timing each llama_decode call.

    A first untimed pass over the prompt warms the page cache and llama.cpp's buffers, as llama-bench's warm-up run
    does; decode tok/s is new_tokens over the summed per-token times.
    """
    t0 = time.perf_counter()
    m = LlamaCppModel(path, n_ctx=len(prompt) + new_tokens + 8, threads=threads, n_batch=max(32, len(prompt)))
    load_s = time.perf_counter() - t0
    try:
        m.llm.eval(list(prompt))  # warm-up
        m.llm.reset()
        t0 = time.perf_counter()
        m.llm.eval(list(prompt))
        prefill_s = time.perf_counter() - t0
        steps = []
        token = int(np.argmax(m.last_logits()))
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            m.llm.eval([token])
            token = int(np.argmax(m.last_logits()))
            steps.append(time.perf_counter() - t0)
    finally:
        m.close()
    ms = sorted(s * 1e3 for s in steps)
    return Timing(str(path), threads, len(prompt), new_tokens, prefill_s, len(prompt) / prefill_s,
                  statistics.median(ms), ms[min(len(ms) - 1, int(0.9 * len(ms)))], new_tokens / sum(steps), load_s)
