"""Whole-decoder quantization under a recipe: round-to-nearest, or sequential layer-by-layer GPTQ.

With calibration data the decoder is walked one layer at a time (the reference GPTQ recipe, "true sequential"
inside a layer):

1. The calibration embeddings enter layer 0; every later layer receives the outputs of the previous layers *already
   quantized*: that is what the quantized model sees at run time, so each layer's GPTQ compensates part of the error
   the earlier layers made, and the routers see quantized-model hidden states, the routing the runtime will do.
   Cost: the statistics depend on the recipe, so two recipes' runs share nothing.
2. Inside a layer the sub-blocks are quantized in data-flow order, each from inputs produced by the already
   quantized sub-blocks before it: attention q/k/v (MLA: q_proj, kv_a_proj_with_mqa) -> o_proj -> the MLP's
   gate/up (dense, shared experts and every routed expert) -> down_proj (inputs recomputed with the quantized
   gate/up).
3. Routed experts get their Hessians from `ExpertHessians` in the chosen `mode` (routed / all-tokens / blend, see
   hessian.py); all experts of a layer that share a spec go through one batched GPTQ (`batched_gptq`). Router and
   norms are never quantized. lm_head last, from the final normed hidden states; embeddings by RTN (looked up, not
   multiplied: GPTQ has nothing to minimise there).
4. Each layer is worked on as an fp32 copy whose weights are replaced by their dequantized values as they are
   made; the input model (bf16 for full-size models) is never modified and at most one extra layer is held
   (full-size Tiny: ~0.9 GB). Hidden states and statistics are fp32: bf16 matmuls with many rows run ~4x slower
   on CPUs without bf16 units, and the Hessians need the precision anyway.

method "rtn" with calibration data walks the same way and rounds to nearest: the weights are exactly the data-free
RTN's, and the per-module Hessian-weighted errors are measured on the same kind of inputs as GPTQ's, so the two
reports compare directly. Without data, RTN just rounds every tensor.

Output: {tensor prefix: Int4Weight | Int8Weight}, prefixes as in the checkpoint (`language.model.layers.{i}.
self_attn.q_proj`, `language.lm_head`, ...). Routed experts are stacked under `...mlp.experts.{gate,up,down}_proj`
([E, out, ...]) when all experts of a projection share one spec; otherwise (per-expert overrides) each expert is
stored under the checkpoint's per-expert name `...mlp.experts.{e}.{proj}` (one format per tensor).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from edge_vl2.quant import naming
from edge_vl2.quant.naming import is_stacked, stacked_name

from .batched_gptq import gptq_batched, pack, stack_weights
from .calibration import MODES, CalibrationSet, LinearHessians, fill_expert_hessians, route_all, routed_samples
from .formats import QuantizedWeight, QuantSpec
from .hessian import ExpertHessians, HessianAccumulator, expert_intermediate, weighted_error
from .recipe import Recipe, fit_spec
from .rtn import quantize_rtn

METHODS = ("rtn", "gptq")
PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class QuantResult:
    """Quantized decoder tensors and how they were made."""

    recipe: Recipe
    method: str
    mode: str | None
    weights: dict[str, QuantizedWeight]
    errors: dict[str, dict] = field(default_factory=dict)  # prefix -> rel_fro, rel_weighted, bits, group_size
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)  # sequences, tokens, images
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # "...layers.{i}.mlp" -> routed tokens / expert

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def summary(self) -> dict:
        return {"recipe": self.recipe.name, "method": self.method, "mode": self.mode,
                "seconds": round(self.seconds, 2), "calibration": self.calibration,
                "quantized_bytes": self.nbytes, "tensors": len(self.weights)}


# GPTQ defaults: columns per lazy-update block, and the damping added to the Hessian diagonal as a fraction of its
# mean (the GPTQ paper's choices); tokens per layer kept for the all-token expert statistics (bounds their memory).
BLOCK_SIZE = 128
PERCDAMP = 0.01
ALL_TOKENS_MAX = 2048


def quantize_decoder(model, recipe: Recipe, calib: CalibrationSet | None = None, method: str = "gptq",
                     mode: str = "blend", *, all_tokens_max: int | None = ALL_TOKENS_MAX, prior_tokens: int | None = None,
                     block_size: int = BLOCK_SIZE, percdamp: float = PERCDAMP,
                     progress: Callable[[str], None] | None = None) -> QuantResult:
    """Quantize the decoder of a DeepseekVL2 `model` (left untouched) under `recipe`.

    method "gptq" needs `calib` (decoder input embeddings); "rtn" uses it, when given, only to measure errors.
    `mode` picks the routed-expert Hessians (routed / all-tokens / blend); `all_tokens_max` caps the tokens per layer
    of the all-tokens statistics; `prior_tokens` is the blend's n0 (default: in_features).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method == "gptq" and (calib is None or not len(calib)):
        raise ValueError("GPTQ needs calibration data")
    lm = model.language
    moe_layers = {i for i, layer in enumerate(lm.model.layers) if hasattr(layer.mlp, "experts")}
    if recipe.expert_overrides:
        recipe.check_overrides(moe_layers, lm.cfg.n_routed_experts)
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    q = DecoderQuantizer(recipe, method, mode, block_size=block_size, percdamp=percdamp,
                         all_tokens_max=all_tokens_max, prior_tokens=prior_tokens)
    calibration = {}
    if calib is None:
        q.rtn_all(lm)
    else:
        xs = [e.to(device=lm.lm_head.weight.device, dtype=torch.float32) for e in calib.embeds]
        for i, layer in enumerate(lm.model.layers):
            t1 = time.perf_counter()
            xs = q.layer(i, layer, xs)
            say(f"{method} layer {i}: {time.perf_counter() - t1:.1f} s")
        with torch.inference_mode():
            final = [lm.model.norm(x) for x in xs]
        del xs
        q.dense("language.lm_head", lm.lm_head, final, write=False)
        calibration = {"sequences": len(calib), "tokens": calib.tokens, "images": calib.images}
    q.embeddings(lm)
    return QuantResult(recipe, method, mode if calib is not None else None, q.out, q.errors,
                       time.perf_counter() - t0, calibration, q.expert_tokens)


class DecoderQuantizer:
    """The layer-by-layer walk of `quantize_decoder`: each method quantizes one part (a dense linear, a layer's
    experts, a whole layer) from its inputs and collects the weights in `out` and the errors in `errors`.
    `edge_vl2.quantize.allocate` drives `moe` directly to measure one format on one layer's experts."""

    def __init__(self, recipe: Recipe, method: str, mode: str, *, block_size: int = BLOCK_SIZE,
                 percdamp: float = PERCDAMP, all_tokens_max: int | None = ALL_TOKENS_MAX,
                 prior_tokens: int | None = None):
        self.recipe, self.method, self.mode = recipe, method, mode
        self.block_size, self.percdamp = block_size, percdamp
        self.all_tokens_max, self.prior_tokens = all_tokens_max, prior_tokens
        self.expert_batch = 16  # experts per batched GPTQ call: bounded working memory
        self.out: dict[str, QuantizedWeight] = {}
        self.errors: dict[str, dict] = {}
        self.expert_tokens: dict[str, list[int]] = {}

    def quantize(self, w: torch.Tensor, hessians: torch.Tensor | None, spec: QuantSpec) -> list[QuantizedWeight]:
        """B weights [B, out, in] (and their Hessians [B, in, in] for GPTQ) -> B quantized weights."""
        if self.method == "rtn":
            return [quantize_rtn(w[b], spec) for b in range(w.shape[0])]
        codes, scales, zeros, _ = gptq_batched(w, hessians, spec, block_size=self.block_size, percdamp=self.percdamp)
        return [pack(spec, codes[b], scales[b], zeros[b]) for b in range(w.shape[0])]

    # -- without data: RTN over every decoder tensor ------------------------------------------------------------

    @torch.inference_mode()
    def rtn_all(self, lm) -> None:
        for i, layer in enumerate(lm.model.layers):
            prefix = f"language.model.layers.{i}"
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    self.dense(f"{prefix}.{name}", mod, None, write=False)
            if hasattr(layer.mlp, "experts"):
                for projs in (("gate_proj", "up_proj"), ("down_proj",)):  # one in_features per call
                    self.experts(i, prefix + ".mlp.experts", layer.mlp.experts, projs, None, None, None, write=False)
        self.dense("language.lm_head", lm.lm_head, None, write=False)

    def embeddings(self, lm) -> None:
        name = "language.model.embed_tokens"
        w = lm.model.embed_tokens.weight.detach()
        spec = self.recipe.spec_for(name, w.shape[1])
        if spec is not None:
            qw = quantize_rtn(w, spec)
            self.out[name] = qw
            self.errors[name] = _errors(w, qw.dequantize(), spec)

    # -- one dense linear ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def dense(self, name: str, mod: nn.Linear, inputs: list[torch.Tensor] | None,
              hessian: torch.Tensor | None = None, write: bool = True) -> None:
        """Quantize one nn.Linear from `hessian` (or the Hessian of `inputs`; neither: RTN without statistics);
        with `write`, put the dequantized weight into `mod` (the working copy of a layer)."""
        w = mod.weight.detach()
        spec = self.recipe.spec_for(name, w.shape[1])
        if spec is None:
            return
        if hessian is None and inputs is not None:
            acc = HessianAccumulator(w.shape[1], device=w.device)
            for x in inputs:
                acc.add(x)
            hessian = acc.hessian()
        qw = self.quantize(w[None], None if hessian is None else hessian[None], spec)[0]
        w_hat = qw.dequantize(w.dtype)
        self.out[name] = qw
        self.errors[name] = _errors(w, w_hat, spec, hessian)
        if write:
            mod.weight.copy_(w_hat)

    # -- one decoder layer ---------------------------------------------------------------------------------------

    def layer(self, i: int, layer_fp: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Quantize layer i from its inputs xs (outputs of the quantized previous layers) -> its outputs."""
        prefix = f"language.model.layers.{i}"
        work = copy.deepcopy(layer_fp).float()  # receives dequantized weights as they are made
        attn = work.self_attn
        with torch.inference_mode():
            normed = [work.input_layernorm(x) for x in xs]
        for names in (("q_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa"), ("o_proj",)):
            self.stage(prefix + ".self_attn", attn, [n for n in names if hasattr(attn, n)], normed,
                       lambda x: attn(x, 0, None))
        with torch.inference_mode():
            hs = [x + attn(n, 0, None) for x, n in zip(xs, normed)]
            del normed
            ms = [work.post_attention_layernorm(h) for h in hs]
        mlp = work.mlp
        if hasattr(mlp, "experts"):
            self.moe(i, prefix + ".mlp", mlp, ms)
        else:
            self.stage(prefix + ".mlp", mlp, ["gate_proj", "up_proj"], ms, mlp)
            self.stage(prefix + ".mlp", mlp, ["down_proj"], ms, mlp)
        with torch.inference_mode():
            return [h + mlp(m) for h, m in zip(hs, ms)]

    def stage(self, prefix: str, parent: nn.Module, names: list[str], inputs: list[torch.Tensor],
              run: Callable) -> None:
        """Hook the named linears of `parent`, run `run(x)` for every input, quantize each from its input Hessian."""
        mods = {n: getattr(parent, n) for n in names
                if self.recipe.spec_for(f"{prefix}.{n}", getattr(parent, n).weight.shape[1]) is not None}
        if not mods:
            return
        with torch.inference_mode(), LinearHessians(mods) as hs:
            for x in inputs:
                run(x)
        for n, mod in mods.items():
            self.dense(f"{prefix}.{n}", mod, None, hs[n].hessian())

    def moe(self, i: int, prefix: str, mlp: nn.Module, ms: list[torch.Tensor]) -> None:
        experts, n_experts = mlp.experts, mlp.experts.gate_proj.shape[0]
        routing = route_all(mlp.gate, ms)
        self.expert_tokens[prefix] = routing.counts(n_experts).tolist()
        samples = routed_samples(ms, routing, n_experts)
        shared = mlp.shared_experts
        self.stage(prefix + ".shared_experts", shared, ["gate_proj", "up_proj"], ms, shared)
        self.experts(i, prefix + ".experts", experts, ("gate_proj", "up_proj"),
                     self.expert_hessians(experts.gate_proj.shape[2], ms, routing, None), samples, None)
        # down_proj: its inputs recomputed with the quantized gate/up
        self.stage(prefix + ".shared_experts", shared, ["down_proj"], ms, shared)
        fn = expert_intermediate(experts.gate_proj.detach(), experts.up_proj.detach())
        self.experts(i, prefix + ".experts", experts, ("down_proj",),
                     self.expert_hessians(experts.down_proj.shape[2], ms, routing, fn), samples, fn)

    def expert_hessians(self, in_features: int, ms, routing, fn) -> ExpertHessians | None:
        """GPTQ's per-expert Hessians (RTN needs none: expert errors are measured on sampled routed tokens)."""
        if self.method == "rtn":
            return None
        eh = ExpertHessians(routing.probs[0].shape[1], in_features, device=ms[0].device)
        fill_expert_hessians(eh, ms, routing, self.mode, fn, self.all_tokens_max)
        return eh

    # -- routed experts --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def experts(self, layer: int, prefix: str, experts: nn.Module, projs: tuple[str, ...],
                eh: ExpertHessians | None, samples, expert_inputs, write: bool = True) -> None:
        """Quantize the given projections of all experts, batched by spec; gate/up rows of an expert together."""
        n_experts, in_features = getattr(experts, projs[0]).shape[0], getattr(experts, projs[0]).shape[2]
        specs = {p: [fit_spec(s, in_features) for s in self.recipe.expert_specs(layer, p, n_experts)] for p in projs}
        groups: dict[tuple, list[int]] = defaultdict(list)  # (spec, projections) -> experts
        for e in range(n_experts):
            by_spec: dict[QuantSpec, list[str]] = defaultdict(list)
            for p in projs:
                if specs[p][e] is not None:
                    by_spec[specs[p][e]].append(p)
            for spec, ps in by_spec.items():
                groups[(spec, tuple(ps))].append(e)
        if not groups:
            return
        original = {p: getattr(experts, p).detach() for p in projs}
        if write:
            original = {p: w.clone() for p, w in original.items()}
        parts: dict[str, dict[int, QuantizedWeight]] = {p: {} for p in projs}
        for (spec, ps), members in groups.items():
            for chunk in range(0, len(members), self.expert_batch):
                ids = members[chunk:chunk + self.expert_batch]
                w = torch.stack([torch.cat([original[p][e] for p in ps]) for e in ids])  # [B, sum(out), in]
                h = None if eh is None else torch.stack([eh.hessian(e, self.mode, self.prior_tokens) for e in ids])
                made = self.quantize(w, h, spec)
                del w, h
                row = 0
                for p in ps:
                    rows = original[p].shape[1]
                    for e, qw in zip(ids, made):
                        parts[p][e] = _rows(qw, row, row + rows)
                    row += rows
        for p in projs:
            if not parts[p]:
                continue
            ordered = [parts[p].get(e) for e in range(n_experts)]
            w_hat = torch.stack([original[p][e] if q is None else q.dequantize(original[p].dtype)
                                 for e, q in enumerate(ordered)])
            if write:
                getattr(experts, p).copy_(w_hat)
            self._store_experts(layer, prefix, p, ordered, specs[p])
            err = _errors(original[p], w_hat, specs[p][0] if len(set(specs[p])) == 1 else None)
            if samples is not None:
                err["rel_weighted"] = _expert_output_error(original[p], w_hat, samples, expert_inputs)
            self.errors[f"{prefix}.{p}"] = err

    def _store_experts(self, layer: int, prefix: str, proj: str, parts: list, specs: list) -> None:
        """Stacked or per expert, by the one naming rule (edge_vl2.quant.naming)."""
        if is_stacked(specs):
            self.out[stacked_name(prefix, proj)] = stack_weights(parts)
        else:
            for e, part in enumerate(parts):
                if part is not None:
                    self.out[naming.expert_name(prefix, e, proj)] = part


def _rows(qw: QuantizedWeight, r0: int, r1: int) -> QuantizedWeight:
    """Output rows r0..r1 of a quantized weight [out, ...] (every tensor of the format is row-major in `out`)."""
    return type(qw)(**{k: v[r0:r1] for k, v in qw.tensors().items()})


# --- errors -----------------------------------------------------------------------------------------------------------

ERROR_ROWS = 8192  # the weighted error of a taller matrix (lm_head: 129k rows) is estimated from this many rows


def _errors(w: torch.Tensor, w_hat: torch.Tensor, spec: QuantSpec | None, hessian: torch.Tensor | None = None) -> dict:
    """Relative Frobenius error, and the relative Hessian-weighted error tr(D H D^T) / tr(W H W^T) when H is known
    (from a seeded sample of ERROR_ROWS output rows for taller matrices: a ratio of two sums over the same rows)."""
    if w.shape[0] > ERROR_ROWS and w.dim() == 2:
        rows = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:ERROR_ROWS].sort().values
        w, w_hat = w[rows.to(w.device)], w_hat[rows.to(w.device)]
    w, w_hat = w.float(), w_hat.float()
    out = {"rel_fro": float((w - w_hat).norm() / w.norm().clamp_min(1e-30)),
           "bits": spec.bits if spec else "mixed", "group_size": spec.group_size if spec else None,
           "rel_weighted": None}
    if hessian is not None and float(hessian.diagonal().sum()) > 0:
        h = hessian.float()
        out["rel_weighted"] = weighted_error(w, w_hat, h) / max(weighted_error(w, torch.zeros_like(w), h), 1e-30)
    return out


def _expert_output_error(w: torch.Tensor, w_hat: torch.Tensor, samples, expert_inputs) -> float | None:
    """Relative gate-weighted output error sum_t g_t |D_e x_t|^2 / sum_t g_t |W_e x_t|^2 over sampled routed tokens
    of every expert: the routed Hessian's weighted error, estimated from <= 64 tokens per expert."""
    num = den = 0.0
    for e, (x, g) in enumerate(samples):
        if x.shape[0] == 0:
            continue
        x = (expert_inputs(e, x) if expert_inputs is not None else x).float()
        num += float((((x @ (w[e].float() - w_hat[e].float()).T) ** 2).sum(-1) * g).sum())
        den += float((((x @ w[e].float().T) ** 2).sum(-1) * g).sum())
    return num / den if den > 0 else None
