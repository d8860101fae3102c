"""Generation: chunked prefill into a static cache, one-token decode steps, sampling, a token generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .errors import UserError
from .model.cache import StaticCache
from .model.decoder import LanguageModel

if TYPE_CHECKING:
    from .constrain import TokenConstraint


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters; repetition_penalty 1.0 disables it.
    At most one of json_schema (a dict or JSON text), regex, choices constrains the answer (edge_vl2.constrain)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    json_schema: dict | str | None = None
    regex: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.choices is not None and not isinstance(self.choices, str):
            object.__setattr__(self, "choices", tuple(self.choices))
        if sum(x is not None for x in (self.json_schema, self.regex, self.choices)) > 1:
            raise UserError("sampling: give at most one of json_schema, regex, choices")
        if self.max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise UserError("sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")


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
                    eos_id: int, prefill_chunk: int = 512,
                    constraint: "TokenConstraint | None" = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the logits it came from) until eos (not yielded), max_new_tokens or the context is full.
    With a `constraint`, tokens are sampled from the grammar's allowed set (the yielded logits are the model's,
    unmasked) and generation also ends as soon as the grammar is finished (nothing but eos could follow)."""
    capacity = plan_cache(lm, embeds.shape[0], params.max_new_tokens)
    cache = StaticCache(lm.cfg, capacity, embeds.dtype, embeds.device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(params.seed)
    history = prompt_ids.to(embeds.device)
    logits = prefill(lm, embeds, cache, prefill_chunk)
    for step in range(params.max_new_tokens):
        token = sample(logits if constraint is None else constraint.mask(logits), params, history, generator)
        if token == eos_id:
            return
        if constraint is not None:
            constraint.accept(token)  # starts the next mask, computed beside the next decode step
        yield token, logits
        if cache.length >= cache.capacity or (constraint is not None and constraint.finished):
            return
        history = torch.cat([history, history.new_tensor([token])])
        logits = decode_step(lm, token, cache)
