"""The llama.cpp peer: our Tiny decoder written as a GGUF, read back, run and quantized by llama.cpp.

The proof that the writer is right is independent of it: llama.cpp's own `deepseek` graph, reading the f32 GGUF,
must give the logits our fp32 decoder gives on the same token ids. The llama.cpp tests skip when llama-cpp-python is
not installed; the file-format tests run anyway.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_vl2.errors import UserError
from edge_vl2.model.layers import rope_angles, rope_rotate_half
from edge_vl2.model.vl2 import load_model
from edge_vl2.tools.peer.gguf_writer import permute_rope_rows, write_gguf
from edge_vl2.tools.synth import write_checkpoint

gguf = pytest.importorskip("gguf")

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA_CPP = True
except (ImportError, OSError):
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A test-size synthetic Tiny checkpoint: 3 layers (1 dense, 2 MoE with 8 experts top-3 + 2 shared), hidden 64,
    4 heads of 16, the real 129,280-row vocabulary."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", "test", seed=0)


@pytest.fixture(scope="module")
def f32_gguf(tiny, tmp_path_factory):
    return write_gguf(tiny, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32").path


@pytest.fixture(scope="module")
def tokens():
    """bos, then ids drawn over the whole vocabulary (specials included): 160 positions, so RoPE is exercised well
    past the first few angles."""
    g = torch.Generator().manual_seed(0)
    return [0] + torch.randint(0, 129280, (159,), generator=g).tolist()


@pytest.fixture(scope="module")
def our_logits(tiny, tokens):
    vl2, _ = load_model(tiny, dtype=torch.float32)
    lm = vl2.language
    with torch.inference_mode():
        return lm.logits(lm(lm.model.embed_tokens(torch.tensor(tokens)))).numpy()


def test_permuted_rows_with_adjacent_pair_rope_give_the_same_scores():
    """q·k after rotate-half RoPE on the checkpoint rows == q·k after adjacent-pair RoPE (llama.cpp NORM, written here
    from its definition) on the permuted rows, for every position pair."""
    heads, d, hidden, s = 2, 8, 16, 6
    g = torch.Generator().manual_seed(1)
    wq, wk, x = torch.randn(heads * d, hidden, generator=g), torch.randn(heads * d, hidden, generator=g), \
        torch.randn(s, hidden, generator=g)
    cos, sin = rope_angles(d, 10000.0, torch.arange(s))

    def split(w):
        return (x @ w.T).view(s, heads, d).transpose(0, 1)  # [n, S, d]

    def adjacent(v):  # pairs (2j, 2j+1) rotated by angle j
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    ours = rope_rotate_half(split(wq), cos, sin) @ rope_rotate_half(split(wk), cos, sin).transpose(1, 2)
    theirs = adjacent(split(permute_rope_rows(wq, heads))) @ adjacent(split(permute_rope_rows(wk, heads))).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # fp32, sums of 8 products in another order


def test_gguf_layout(tiny, f32_gguf):
    r = gguf.GGUFReader(f32_gguf)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "deepseek"
    assert field("deepseek.block_count") == 3 and field("deepseek.leading_dense_block_count") == 1
    assert field("deepseek.expert_count") == 8 and field("deepseek.expert_used_count") == 3
    assert field("deepseek.expert_shared_count") == 2 and field("deepseek.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "deepseek-v3"
    assert len(field("tokenizer.ggml.tokens")) == 129280
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 + 1 + 3 * 6 + 3 + 2 * (1 + 3 + 3)  # embed/norm/head, attn x3, dense, moe x2
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 32, 8]  # ggml order: in, out, expert
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [32, 64, 8]


def test_bf16_keeps_router_and_norms_f32(tiny, tmp_path):
    r = gguf.GGUFReader(write_gguf(tiny, tmp_path / "t.gguf", "bf16").path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.2.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_up_exps.weight"] == "BF16" and types["output.weight"] == "BF16"


def test_bad_storage_is_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match="storage"):
        write_gguf(tiny, tmp_path / "x.gguf", "q4")


@needs_llama_cpp
def test_llama_cpp_f32_logits_equal_our_fp32_decoder(f32_gguf, tokens, our_logits):
    """Same weights, same token ids, both in fp32 (llama.cpp's KV cache set to f32, flash attention off).

    What is left is fp32 rounding: other summation orders in every matmul (ggml's SIMD dot products vs oneDNN/MKL),
    ggml's own exp for SiLU and softmax and its RoPE angle tables; each ~1e-7 relative, carried through 3 layers.
    Measured: max |diff| 3.5e-5 on logits up to 60 in magnitude (5.9e-7 of the scale, a few fp32 ulps there). We
    allow 2e-5 x the largest |logit| (1.2e-3 here, 34x the measurement), still far below any real mistake: a wrong
    q/k permutation, a missing shared expert or a renormalised router moves logits by O(1). With llama.cpp's default
    f16 KV cache the same run differs by up to 3.4 (KL 1.3e-5): that is why the cache is f32 here.
    """
    from edge_vl2.tools.peer.llama_runner import LlamaCppModel

    m = LlamaCppModel(f32_gguf, n_ctx=len(tokens), kv_type="f32", logits_all=True)
    try:
        theirs = m.logits(tokens)
    finally:
        m.close()
    assert theirs.shape == our_logits.shape
    scale = float(np.abs(our_logits).max())
    err = float(np.abs(theirs - our_logits).max())
    assert err <= 2e-5 * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"
    assert (theirs.argmax(-1) == our_logits.argmax(-1)).all()


@needs_llama_cpp
def test_llama_cpp_with_our_embeddings_at_masked_positions(tiny, f32_gguf, tokens):
    """Image positions: vectors we pass in at masked positions, token ids elsewhere, in runs shorter and longer than
    llama.cpp's batch; the logits equal our fp32 decoder's on the same input embeddings (same bound and reason as
    the token-only test)."""
    from edge_vl2.tools.peer.llama_runner import LlamaCppModel

    vl2, _ = load_model(tiny, dtype=torch.float32)
    lm = vl2.language
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[3:40] = True  # one run longer than n_batch=16 below, so it is split
    mask[90:95] = True
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        embeds = lm.model.embed_tokens(torch.tensor(tokens))
        image = torch.randn(int(mask.sum()), embeds.shape[1], generator=g) * embeds.std()
        embeds[mask] = image
        ours = lm.logits(lm(embeds)).numpy()
    m = LlamaCppModel(f32_gguf, n_ctx=len(tokens), kv_type="f32", logits_all=True, n_batch=16)
    try:
        theirs = m.logits_with_embeddings(tokens, mask.numpy(), image.numpy())
    finally:
        m.close()
    err, scale = float(np.abs(theirs - ours).max()), float(np.abs(ours).max())
    assert err <= 2e-5 * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


@needs_llama_cpp
def test_quantized_ggufs(f32_gguf, tokens, our_logits, tmp_path):
    """llama.cpp's quantizer writes each type (router and norms kept F32); the files are smaller than f32, and
    Q8_0's logits stay close to the fp32 decoder's (measured KL 0.004 nats, top-1 96 %;
    deterministic: seeded checkpoint, deterministic quantizer). On this 64-wide model the K-quants fall back to
    Q5_0/Q5_1/Q8_0 (rows not a multiple of 256), so only Q8_0's types are checked exactly."""
    from edge_vl2.tools.peer.llama_runner import QUANT_TYPES, LlamaCppModel, quantize_gguf

    f32_size = f32_gguf.stat().st_size
    sizes = {}
    for q in QUANT_TYPES:
        out = quantize_gguf(f32_gguf, tmp_path / f"tiny-{q}.gguf", q)
        sizes[q] = out.stat().st_size
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["output_norm.weight"] == "F32"
        if q == "Q8_0":
            assert types["blk.1.ffn_up_exps.weight"] == "Q8_0"
    assert all(s < f32_size / 3 for s in sizes.values()), sizes
    assert sizes["Q8_0"] > sizes["Q5_K_M"] > sizes["Q4_0"], sizes
    m = LlamaCppModel(tmp_path / "tiny-Q8_0.gguf", n_ctx=len(tokens), kv_type="f32", logits_all=True)
    try:
        q8 = torch.from_numpy(m.logits(tokens))
    finally:
        m.close()
    ref = torch.from_numpy(our_logits)
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - q8.log_softmax(-1))).sum(-1).mean().item()
    assert 0 < kl < 0.01, kl
    assert math.isfinite(kl)


@needs_llama_cpp
def test_generation_timing_record(f32_gguf):
    """The timing path runs end to end (prefill, greedy decode through the last logits) and reports what it did;
    speeds themselves are measured by the suite's `time` command, not asserted here."""
    from edge_vl2.tools.peer.llama_runner import time_generation

    t = time_generation(f32_gguf, [0, 5, 17, 300, 4000, 9], new_tokens=4, threads=1)
    assert (t.prompt_tokens, t.new_tokens, t.threads) == (6, 4, 1)
    assert t.prefill_s > 0 and t.decode_ms_median > 0 and t.decode_ms_p90 >= t.decode_ms_median


def test_missing_llama_cpp_is_one_line(monkeypatch):
    import builtins

    from edge_vl2.tools.peer import llama_runner

    real_import = builtins.__import__

    def no_llama(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(UserError, match="llama-cpp-python"):
        llama_runner.llama_cpp_module()
