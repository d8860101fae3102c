"""Calibration inputs and statistics: prompts + images -> decoder input embeddings, and per-layer Hessians.

- `encode_samples` runs the processor and the (never quantized) vision tower once per sample and keeps the tile
  embeddings, so any number of models (full precision, quantized) can rebuild the same decoder inputs cheaply.
- `CalibrationSet` holds the decoder input embeddings [T_i, H] of each calibration sequence, each cut at
  `max_tokens` (a causal model's first T positions do not depend on what follows, so a cut loses nothing but data).
- `LinearHessians` accumulates the input Hessian of any set of nn.Linear modules through forward pre-hooks.
- `MoERouting` + `fill_expert_hessians` feed `ExpertHessians` from the router's (ids, weights) and its softmax
  probabilities: routed tokens weighted by their gate weight, and (modes "all-tokens"/"blend") a strided subsample of
  all calibration tokens weighted by each expert's router probability ("all tokens to all experts").

Memory stays bounded: sequences are processed one at a time; only hidden states [T, H] per sequence and the [in, in]
Hessians are kept, and the all-tokens statistics use at most `all_tokens_max` tokens per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .hessian import ExpertHessians, HessianAccumulator

MODES = ("routed", "all-tokens", "blend")


@dataclass
class EncodedSample:
    """A processed prompt and the vision tower's tile embeddings for its images (None without images)."""

    inputs: object  # edge_vl2.inputs.processor.ProcessorOutput
    tile_embeds: torch.Tensor | None


@torch.inference_mode()
def encode_samples(model, processor, samples: Iterable) -> list[EncodedSample]:
    """(prompt, images) pairs -> processor outputs + tile embeddings, one vision pass per image."""
    out = []
    for prompt, images in samples:
        inputs = processor.process_prompt(prompt, images)
        tiles = None
        if inputs.pixel_values.shape[0]:
            # Tiles whose image positions lie beyond the cut are still needed: layout checks every image's count.
            tiles = model.encode_tiles(inputs.pixel_values.to(model.language.lm_head.weight.device))
        out.append(EncodedSample(inputs, tiles))
    return out


@torch.inference_mode()
def decoder_inputs(model, sample: EncodedSample, max_tokens: int | None = None) -> torch.Tensor:
    """The model's own decoder inputs [T, H] for an encoded sample (its own token embeddings, shared image vectors)."""
    x = sample.inputs
    device = model.language.lm_head.weight.device
    embeds = model.input_embeddings(x.input_ids.to(device), x.images_seq_mask.to(device),
                                    x.pixel_values.to(device), x.images_spatial_crop, tile_embeds=sample.tile_embeds)
    return embeds[:max_tokens] if max_tokens else embeds


@dataclass
class CalibrationSet:
    """Decoder input embeddings per calibration sequence ([T_i, H] each, fp32)."""

    embeds: list[torch.Tensor]
    images: int = 0  # how many calibration images went in

    @property
    def tokens(self) -> int:
        return sum(int(e.shape[0]) for e in self.embeds)

    def __len__(self) -> int:
        return len(self.embeds)


def prepare_calibration(model, processor, samples: Iterable, max_tokens: int = 512,
                        max_total_tokens: int | None = None) -> CalibrationSet:
    """Encode calibration samples into decoder inputs, each cut at `max_tokens`, stopping at `max_total_tokens`."""
    embeds, images, total = [], 0, 0
    for sample in samples:
        if max_total_tokens is not None and total >= max_total_tokens:
            break
        enc = encode_samples(model, processor, [sample])[0]
        x = decoder_inputs(model, enc, max_tokens).float()
        if max_total_tokens is not None:
            x = x[:max_total_tokens - total]
        embeds.append(x.clone())
        images += len(sample[1])
        total += int(x.shape[0])
    if not embeds:
        raise ValueError("no calibration samples")
    return CalibrationSet(embeds, images)


# --- dense linears ------------------------------------------------------------------------------------------------

class LinearHessians:
    """Input Hessians of named nn.Linear modules, accumulated by forward pre-hooks while the context is open.

        with LinearHessians({"o_proj": attn.o_proj}) as hs:
            for x in inputs: attn(x, 0, None)
        h = hs["o_proj"].hessian()
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.acc = {n: HessianAccumulator(m.weight.shape[1], device=m.weight.device) for n, m in modules.items()}
        self.handles = []

    def __enter__(self) -> "LinearHessians":
        self.handles = [self.acc[n].attach(m) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __getitem__(self, name: str) -> HessianAccumulator:
        return self.acc[name]


# --- routed experts -----------------------------------------------------------------------------------------------

@dataclass
class MoERouting:
    """One MoE layer's routing on the calibration sequences: per sequence ids/weights [T, k] and probs [T, E]."""

    ids: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)

    def counts(self, n_experts: int) -> torch.Tensor:
        """Tokens routed to each expert [E]."""
        return sum((torch.bincount(i.reshape(-1), minlength=n_experts) for i in self.ids),
                   torch.zeros(n_experts, dtype=torch.long))

    def gate_mass(self, n_experts: int) -> torch.Tensor:
        """Sum of each expert's gate weights over the calibration tokens [E] (fp64)."""
        out = torch.zeros(n_experts, dtype=torch.float64)
        for i, w in zip(self.ids, self.weights):
            out.index_add_(0, i.reshape(-1).cpu(), w.reshape(-1).double().cpu())
        return out


@torch.inference_mode()
def route(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's (ids, weights) on x [T, H] and its affinities [T, E]: softmax probabilities (Tiny/Small) or
    sigmoid scores (base's sigmoid router), in fp32."""
    ids, weights = router(x)
    logits = F.linear(x.float(), router.weight.float())
    probs = logits.softmax(dim=-1) if router.scoring == "softmax" else logits.sigmoid()
    return ids, weights, probs


def route_all(router: nn.Module, xs: list[torch.Tensor]) -> MoERouting:
    """The router's choices and affinities on every calibration sequence's MoE inputs (per sequence [T, H])."""
    routing = MoERouting()
    for x in xs:
        ids, weights, probs = route(router, x)
        routing.ids.append(ids)
        routing.weights.append(weights)
        routing.probs.append(probs)
    return routing


def subsample(lengths: list[int], cap: int | None) -> list[torch.Tensor]:
    """Per-sequence token indices of an evenly strided subsample of at most `cap` tokens over all sequences."""
    total = sum(lengths)
    stride = 1 if not cap or total <= cap else math.ceil(total / cap)
    out, offset = [], 0
    for n in lengths:
        first = (-offset) % stride  # keep the global stride across sequence boundaries
        out.append(torch.arange(first, n, stride))
        offset += n
    return out


@torch.inference_mode()
def fill_expert_hessians(hessians: ExpertHessians, xs: list[torch.Tensor], routing: MoERouting, mode: str,
                         expert_inputs: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                         all_tokens_max: int | None = 2048) -> None:
    """Accumulate one MoE layer's expert Hessians from its inputs xs (per sequence [T, H]).

    Routed statistics use every routed (token, expert) pair weighted by the gate weight; the all-tokens statistics
    (skipped in mode "routed", which never reads them) use a strided subsample of `all_tokens_max` tokens per layer,
    each weighted by the expert's router probability. `expert_inputs(e, x)` maps MoE inputs to expert e's input for
    the projection being calibrated (None: x itself, i.e. gate_proj/up_proj).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n_experts = hessians.n_experts
    xs = [x.float() for x in xs]  # expert_inputs then multiplies in fp32 (bf16 with many rows is ~4x slower on CPU)
    for x, ids, w in zip(xs, routing.ids, routing.weights):
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        rows, gate_w = order // ids.shape[1], w.reshape(-1)[order]
        begin = 0
        for e, n in enumerate(counts):
            if n:
                r = x[rows[begin:begin + n]]
                hessians.routed[e].add(expert_inputs(e, r) if expert_inputs else r, gate_w[begin:begin + n])
                begin += n
    if mode == "routed":
        return
    picks = subsample([int(x.shape[0]) for x in xs], all_tokens_max)
    xs_sub = torch.cat([x[p] for x, p in zip(xs, picks)])  # [Ts, H]
    probs = torch.cat([pr[p] for pr, p in zip(routing.probs, picks)])  # [Ts, E]
    for e in range(n_experts):
        hessians.all_tokens[e].add(expert_inputs(e, xs_sub) if expert_inputs else xs_sub, probs[:, e])


@torch.inference_mode()
def routed_samples(xs: list[torch.Tensor], routing: MoERouting, n_experts: int, per_expert: int = 64,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, up to `per_expert` routed tokens (x [n, H], gate weights [n]), drawn without replacement."""
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.cat(xs)
    ids = torch.cat(routing.ids)
    w = torch.cat(routing.weights)
    out = []
    for e in range(n_experts):
        hit = ids == e  # [T, k]
        rows = hit.any(dim=-1).nonzero().squeeze(-1)
        if rows.numel() > per_expert:
            rows = rows[torch.randperm(rows.numel(), generator=gen)[:per_expert]].sort().values
        out.append((x_all[rows], (w * hit).sum(dim=-1)[rows]))
    return out
