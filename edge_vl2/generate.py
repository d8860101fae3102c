"""Generation: chunked prefill into a static cache, one-token decode steps, sampling, a token generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from . import checks
from .decode_graph import DecodeStep
from .errors import UserError
from .model.cache import StaticCache
from .model.config import LanguageConfig
from .model.decoder import LanguageModel

if TYPE_CHECKING:
    from .constrain import TokenConstraint

MIN_SCALE = 1e-4  # smallest positive temperature / repetition penalty: logits divided by it stay finite in fp32
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


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
        """Checked once here (the API boundary; the CLI's option types give the same ranges). A temperature or
        penalty under 1e-4 could overflow fp32 logits, so positive values start there (0 = greedy)."""
        if self.choices is not None and not isinstance(self.choices, str):
            object.__setattr__(self, "choices", tuple(self.choices))
        if sum(x is not None for x in (self.json_schema, self.regex, self.choices)) > 1:
            raise UserError("sampling: give at most one of json_schema, regex, choices")
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


def finish_reason(n_tokens: int, prompt_len: int, max_new: int, context: int) -> str:
    """Why `generate_tokens` stopped after yielding n_tokens (no grammar): "length" when it ran out of room, "stop"
    when the model ended (eos). It ends at max_new_tokens, or once the cache (prompt + new, capped at the context)
    is full, which is after capacity - prompt_len + 1 tokens (the last one is never fed back)."""
    capacity = min(prompt_len + max_new, context)
    return "length" if n_tokens >= min(max_new, capacity - prompt_len + 1) else "stop"


PREFILL_CHUNK = 512  # tokens per prefill pass when no memory budget is given
PREFILL_CHUNK_RANGE = (64, 4096)


def prefill_chunk_tokens(cfg: LanguageConfig, budget_bytes: int, keys: int) -> int:
    """The longest prefill chunk (a multiple of 64 in PREFILL_CHUNK_RANGE) whose activations fit `budget_bytes`
    when each query attends over up to `keys` positions. Per query token, at the peak of a layer: the attention
    scores and their fp32 softmax copies (heads x keys x 16 bytes: bf16 scores, three fp32 tensors, bf16 probs), the
    MoE's routed rows (k x (3 hidden + 3 expert width) fp32), the dense MLP's hidden (3 x width fp32) and a few
    hidden-state copies (8 x hidden fp32). MLA's expanded K/V is per key, not per query: counted once."""
    per_query = (16 * cfg.num_attention_heads * keys
                 + 4 * cfg.num_experts_per_tok * (3 * cfg.hidden_size + 3 * cfg.moe_intermediate_size)
                 + 12 * cfg.intermediate_size + 32 * cfg.hidden_size)
    fixed = 2 * 2 * cfg.num_attention_heads * keys * (cfg.qk_nope_head_dim + cfg.v_head_dim) if cfg.use_mla else 0
    lo, hi = PREFILL_CHUNK_RANGE
    return max(lo, min(hi, (max(budget_bytes - fixed, 0) // per_query) // 64 * 64))


@torch.inference_mode()
def prefill(lm: LanguageModel, embeds: torch.Tensor, cache: StaticCache, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
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
                    eos_id: int, prefill_chunk: int = PREFILL_CHUNK, prefill_budget: int | None = None,
                    cuda_graphs: bool = False, info: dict | None = None,
                    constraint: "TokenConstraint | None" = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the logits it came from) until eos (not yielded), max_new_tokens or the context is full.

    `prefill_budget`: bytes the prefill's activations may take (a device profile's working memory): the chunk is
    `prefill_chunk_tokens` for this prompt's cache, else `prefill_chunk`. `cuda_graphs`: decode through a captured
    `DecodeStep` (eager where it cannot capture). `info`, when given, receives the chunk and the decode mode.
    With a `constraint`, tokens are sampled from the grammar's allowed set (the yielded logits are the model's,
    unmasked) and generation also ends as soon as the grammar is finished (nothing but eos could follow)."""
    capacity = plan_cache(lm, embeds.shape[0], params.max_new_tokens)
    cache = StaticCache(lm.cfg, capacity, embeds.dtype, embeds.device)
    if prefill_budget is not None:
        prefill_chunk = prefill_chunk_tokens(lm.cfg, prefill_budget, capacity)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(params.seed)
    history = prompt_ids.to(embeds.device)
    logits = prefill(lm, embeds, cache, prefill_chunk)
    step = DecodeStep(lm, cache, cuda_graph=True) if cuda_graphs else None
    if info is not None:
        info.update(prefill_chunk=prefill_chunk, decode=step.mode if step else "eager")
    if step is not None and not step.captures:
        step = None  # run eagerly, the dynamic-shape step is the faster one (it attends only to what is written)
    for _ in range(params.max_new_tokens):
        token = sample(logits if constraint is None else constraint.mask(logits), params, history, generator)
        if token == eos_id:
            return
        if constraint is not None:
            constraint.accept(token)  # starts the next mask, computed beside the next decode step
        yield token, logits
        if cache.length >= cache.capacity or (constraint is not None and constraint.finished):
            return
        history = torch.cat([history, history.new_tensor([token])])
        # the step's logits are a static buffer the next replay overwrites: consumers get their own copy
        if step is None:
            logits = decode_step(lm, token, cache)
            continue
        logits = step(token, cache.length).clone()
        if info is not None:
            info["capture_s"] = step.capture_s  # 0 until the first step captures
