"""Generation: chunked prefill into a static cache, one-token decode steps, sampling, a token generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from . import checks
from .errors import UserError
from .model.cache import StaticCache
from .model.decoder import LanguageModel

MIN_SCALE = 1e-4  # smallest positive temperature / repetition penalty: logits divided by it stay finite in fp32
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters; repetition_penalty 1.0 disables it."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        """Checked once here (the API boundary; the CLI's option types give the same ranges). A temperature or
        penalty under 1e-4 could overflow fp32 logits, so positive values start there (0 = greedy)."""
        checks.integer(self.max_new_tokens, "max_new_tokens", lo=1)
        if 0 < checks.number(self.temperature, "temperature", lo=0) < MIN_SCALE:
            raise UserError(f"temperature must be 0 (greedy) or >= {MIN_SCALE}, got {self.temperature!r}")
        checks.number(self.top_p, "top_p", lo=0, hi=1, lo_open=True)
        checks.integer(self.top_k, "top_k", lo=0)
        checks.number(self.repetition_penalty, "repetition_penalty", lo=MIN_SCALE)
        if self.seed is not None:
            checks.integer(self.seed, "seed", lo=0, hi=MAX_SEED)


def plan_cache(lm: LanguageModel, prompt_len: int, max_new_tokens: int) -> int:
    """Cache capacity for a prompt: prompt + new tokens, capped at the context; a prompt over it is an error."""
    context = lm.cfg.max_position_embeddings
    if prompt_len >= context:
        raise UserError(f"prompt is {prompt_len} tokens (images included); the model context is {context}")
    return min(prompt_len + max_new_tokens, context)


@torch.inference_mode()
def prefill(lm: LanguageModel, embeds: torch.Tensor, cache: StaticCache, chunk: int = 512) -> torch.Tensor:
    """Run the prompt through the decoder in chunks (bounds attention-score memory); returns last-position logits."""
    hidden = None
    for begin in range(0, embeds.shape[0], chunk):
        hidden = lm(embeds[begin:begin + chunk], cache)
    return lm.logits(hidden[-1:])[0]


@torch.inference_mode()
def decode_step(lm: LanguageModel, token: int, cache: StaticCache) -> torch.Tensor:
    embed = lm.model.embed_tokens(torch.tensor([token], device=lm.lm_head.weight.device))
    return lm.logits(lm(embed, cache))[0]


def sample(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor,
           generator: torch.Generator | None) -> int:
    """One token id from fp32 logits [V]; the usual order: repetition penalty, temperature, top-k, top-p."""
    if params.repetition_penalty != 1.0 and previous.numel():
        logits = logits.clone()
        seen = logits[previous]
        logits[previous] = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_tokens(lm: LanguageModel, embeds: torch.Tensor, prompt_ids: torch.Tensor, params: SamplingParams,
                    eos_id: int, prefill_chunk: int = 512) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the logits it came from) until eos (not yielded), max_new_tokens or the context is full."""
    capacity = plan_cache(lm, embeds.shape[0], params.max_new_tokens)
    cache = StaticCache(lm.cfg, capacity, embeds.dtype, embeds.device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(params.seed)
    history = prompt_ids.to(embeds.device)
    logits = prefill(lm, embeds, cache, prefill_chunk)
    for step in range(params.max_new_tokens):
        token = sample(logits, params, history, generator)
        if token == eos_id:
            return
        yield token, logits
        if cache.length >= cache.capacity:
            return
        history = torch.cat([history, history.new_tensor([token])])
        logits = decode_step(lm, token, cache)
