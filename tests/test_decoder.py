"""The language model with its static cache (model-facts §7.1, §7.2, §7.7, §9.3): chunked prefill + cached decode give the
full forward's logits at every position, the cache refuses what does not fit, and the MLA cache is compressed."""

from __future__ import annotations

import pytest
import torch

from edge_vl2.errors import UserError
from edge_vl2.generate import decode_step, prefill
from edge_vl2.model.cache import StaticCache
from edge_vl2.model.decoder import LanguageModel

from _random_weights import fill_, language_config

BASE_RULE = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
             "routed_scaling_factor": 2.0}
VARIANTS = {"tiny": dict(use_mla=False), "small": dict(use_mla=True), "base": dict(use_mla=True, **BASE_RULE)}
TOTAL = 30

# float64 weights and activations, but RMSNorm, the router, the attention softmax and the returned logits round
# through fp32 as the official code does, and chunked vs full runs multiply matrices of different shapes, so a value
# can land on a neighbouring fp32 number. Measured max 6e-7 (1-2 fp32 ulps) on logits up to ~3.7; 1e-5 leaves
# margin for a few such flips, while a wrong cache slot, position or mask changes logits by O(0.1).
ATOL = 1e-5


def _model(variant: str) -> tuple[LanguageModel, torch.Tensor]:
    lm = fill_(LanguageModel(language_config(**VARIANTS[variant])), seed=80).double().eval()
    ids = torch.randint(0, lm.cfg.vocab_size, (TOTAL,), generator=torch.Generator().manual_seed(81))
    return lm, ids


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_every_position_of_chunked_prefill_and_decode_equals_full_forward(variant):
    lm, ids = _model(variant)
    embeds = lm.model.embed_tokens(ids)
    full = lm.logits(lm(embeds))  # no cache: one causal pass over all 30 positions
    cache = StaticCache(lm.cfg, TOTAL, embeds.dtype)
    pieces, start = [], 0
    for n in [5, 7, 11] + [1] * 7:  # uneven prefill chunks (MLA: absorbed form below 16 queries), then decode steps
        pieces.append(lm.logits(lm(embeds[start:start + n], cache)))
        start += n
    assert cache.length == TOTAL
    torch.testing.assert_close(torch.cat(pieces), full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_generate_prefill_and_decode_step_equal_full_forward(variant):
    lm, ids = _model(variant)
    full = lm.logits(lm(lm.model.embed_tokens(ids)))
    prompt = 17
    cache = StaticCache(lm.cfg, TOTAL, torch.float64)
    last = prefill(lm, lm.model.embed_tokens(ids[:prompt]), cache, chunk=5)  # chunks 5, 5, 5, 2
    torch.testing.assert_close(last, full[prompt - 1], rtol=0, atol=ATOL)
    for t in range(prompt, TOTAL):  # one token at a time, reading everything cached so far
        torch.testing.assert_close(decode_step(lm, int(ids[t]), cache), full[t], rtol=0, atol=ATOL)
    assert cache.length == TOTAL


@torch.no_grad()
def test_cache_rejects_a_sequence_beyond_its_capacity():
    lm, ids = _model("small")
    embeds = lm.model.embed_tokens(ids)
    cache = StaticCache(lm.cfg, 8, embeds.dtype)
    with pytest.raises(UserError):
        lm(embeds[:9], cache)  # too long from the start
    assert cache.length == 0  # refused before anything was written
    prefill(lm, embeds[:6], cache, chunk=4)
    with pytest.raises(UserError):
        lm(embeds[6:9], cache)  # 6 + 3 > 8
    assert cache.length == 6
    decode_step(lm, int(ids[6]), cache)
    decode_step(lm, int(ids[7]), cache)
    with pytest.raises(UserError):
        decode_step(lm, int(ids[8]), cache)  # full


def test_cache_beyond_the_model_context_is_rejected():
    cfg = language_config(use_mla=True, max_position_embeddings=64)
    StaticCache(cfg, 64, torch.float32)  # exactly the context is fine
    with pytest.raises(UserError):
        StaticCache(cfg, 65, torch.float32)


def test_mla_cache_holds_only_the_latent_and_the_rope_key():
    cfg, cap = language_config(use_mla=True), 100
    # kv_lora_rank 32 + qk_rope_head_dim 8 values per token per layer, bf16 (2 bytes): the real model's 512 + 64
    expected = cfg.num_hidden_layers * cap * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert StaticCache(cfg, cap, torch.bfloat16).nbytes == expected
    tiny = language_config(use_mla=False)  # for contrast: plain MHA keeps K and V, n_kv * head_dim each
    assert StaticCache(tiny, cap, torch.bfloat16).nbytes == tiny.num_hidden_layers * cap * 2 * tiny.hidden_size * 2
