"""Mixed precision per routed expert: spend a byte budget where it removes the most error per byte.

Each routed expert gets one format from a list of candidates (INT4 at several group sizes, INT8), MxMoE-style
(hot experts and sensitive ones deserve more bytes). Two steps:

1. `measure_sensitivity` runs the full-precision decoder over the calibration set once, layer by layer. At every
   MoE layer, for every routed expert e and candidate spec s, it measures what quantizing the whole expert (gate,
   up, down) costs at the MoE output, per calibration token:

       err_e(s) = (1 / T) sum_{t routed to e} g_te^2 |E_e(x_t) - E_e^s(x_t)|^2

   (the MoE output is sum_k g_k E_k(x), so expert e's error enters it scaled by its gate weight g_te; T counts all
   calibration tokens, so the figure already folds in how often the expert is routed to). Every layer writes into
   the same residual stream, so the figures add up across layers and compare across experts. E^s is the expert
   quantized the way the real run will do it: method "gptq" runs the same batched GPTQ (with the same expert
   Hessians) as `quantize_decoder`, once per INT4 candidate; "rtn" rounds to nearest, a cheap proxy that
   overstates INT4's error on hot experts (GPTQ fits them best: they have the most calibration tokens). INT8
   candidates are always measured by RTN: their error is ~1/200 of INT4's either way. At most `per_expert` routed
   tokens per expert are evaluated (a seeded random sample, scaled back up).
2. `allocate` is a multiple-choice knapsack solved greedily: every expert starts at its cheapest candidate, then
   the upgrade with the largest error decrease per extra byte (along each expert's lower convex hull of
   (bytes, error)) is taken while it fits. The uniform recipe at any candidate is a feasible point, so under the
   additive error model the allocation is never worse than the uniform recipe of the same bytes.

The allocation unit is a whole expert (gate, up and down in one format), so a runtime keeps one format per expert.
`mixed_recipe` writes the choice as per-expert overrides of the base recipe.
"""

from __future__ import annotations

import copy
import heapq
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .calibration import CalibrationSet, route_all, routed_samples
from .formats import QuantSpec
from .recipe import Recipe, expert_name, fit_spec, spec_nbytes
from .rtn import quantize_rtn

PROJS = ("gate_proj", "up_proj", "down_proj")
SENSITIVITY_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class ExpertSensitivity:
    """One routed expert: how often it is routed to, and its MoE-output error and bytes under each candidate."""

    layer: int
    expert: int
    tokens: int  # calibration tokens routed to it
    share: float  # tokens / (T * k): its fraction of the layer's routed (token, slot) pairs
    errors: dict[QuantSpec, float]  # err_e(spec)
    nbytes: dict[QuantSpec, int]


@dataclass
class Allocation:
    """The format chosen for every expert, what it costs and the error the additive model predicts."""

    choice: dict[tuple[int, int], QuantSpec]  # (layer, expert) -> spec
    budget_bytes: int
    expert_bytes: int  # routed-expert bytes of the allocation
    expected_error: float  # sum of err_e over experts at their chosen spec
    uniform: dict[QuantSpec, tuple[int, float]]  # candidate -> (bytes, error) with every expert at it

    def overrides(self, default: QuantSpec) -> dict[str, QuantSpec]:
        """Per-expert recipe overrides for every expert whose spec is not `default`."""
        return {expert_name(layer, e, p): s for (layer, e), s in sorted(self.choice.items()) if s != default
                for p in PROJS}

    def counts(self) -> dict[str, int]:
        """How many experts got each spec (spec written as e.g. `int4-g64`, `int8`)."""
        out: dict[str, int] = {}
        for s in self.choice.values():
            out[spec_label(s)] = out.get(spec_label(s), 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "expert_bytes": self.expert_bytes,
                "expected_error": self.expected_error, "experts_per_spec": self.counts(),
                "uniform": {spec_label(s): {"bytes": b, "expected_error": e} for s, (b, e) in self.uniform.items()},
                "choice": {f"{layer}.{e}": spec_label(s) for (layer, e), s in sorted(self.choice.items())}}


def spec_label(spec: QuantSpec) -> str:
    """`int4-g64`, `int4-g64-asym`, `int8`, `int8-g128`."""
    label = f"int{spec.bits}" + (f"-g{spec.group_size}" if spec.group_size else "")
    return label + ("" if spec.symmetric else "-asym")


def expert_bytes(spec: QuantSpec, hidden: int, inter: int) -> int:
    """On-disk bytes of one routed expert (gate, up [inter, hidden], down [hidden, inter]) under `spec`."""
    return 2 * spec_nbytes(spec, inter, hidden) + spec_nbytes(spec, hidden, inter)


def routed_expert_bytes(model, spec: QuantSpec) -> int:
    """Bytes of all routed experts of the decoder, every one under `spec` (the uniform recipe's expert bytes)."""
    c = model.language.cfg
    n_moe = sum(1 for layer in model.language.model.layers if hasattr(layer.mlp, "experts"))
    return n_moe * c.n_routed_experts * expert_bytes(spec, c.hidden_size, c.moe_intermediate_size)


# --- 1. sensitivity -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def measure_sensitivity(model, calib: CalibrationSet, candidates: list[QuantSpec], *, method: str = "gptq",
                        mode: str = "blend", per_expert: int = 256, all_tokens_max: int | None = 2048,
                        progress: Callable[[str], None] | None = None) -> list[ExpertSensitivity]:
    """Per-expert routing frequency and MoE-output error under each candidate (see the module docstring).

    One full-precision pass over the calibration set, a layer at a time; the model is only read.
    """
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity method must be one of {SENSITIVITY_METHODS}, got {method!r}")
    say = progress or (lambda _m: None)
    lm = model.language
    xs = [e.to(device=lm.lm_head.weight.device, dtype=torch.float32) for e in calib.embeds]
    total = sum(int(x.shape[0]) for x in xs)
    out: list[ExpertSensitivity] = []
    for i, layer_fp in enumerate(lm.model.layers):
        t0 = time.perf_counter()
        layer = copy.deepcopy(layer_fp).float()  # one layer at a time in fp32, as quantize_decoder works
        hs = [x + layer.self_attn(layer.input_layernorm(x), 0, None) for x in xs]
        ms = [layer.post_attention_layernorm(h) for h in hs]
        if hasattr(layer.mlp, "experts"):
            dequantized = {s: _quantized_experts(i, layer.mlp, ms, s, mode, all_tokens_max)
                           for s in candidates if method == "gptq" and s.bits == 4}
            out += _layer_sensitivity(i, layer.mlp, ms, total, candidates, dequantized, per_expert)
            say(f"sensitivity layer {i}: {time.perf_counter() - t0:.1f} s")
        xs = [h + layer.mlp(m) for h, m in zip(hs, ms)]
    return out


def _quantized_experts(i: int, mlp, ms: list[torch.Tensor], spec: QuantSpec, mode: str,
                       all_tokens_max: int | None) -> dict[str, torch.Tensor]:
    """The layer's routed experts GPTQ-quantized under `spec` exactly as `quantize_decoder` does it (from these
    inputs), dequantized: {proj: [E, out, in]}."""
    from .model_gptq import DecoderQuantizer

    work = copy.deepcopy(mlp)
    q = DecoderQuantizer(Recipe("probe", routed_experts=spec), "gptq", mode, all_tokens_max=all_tokens_max)
    q.moe(i, f"language.model.layers.{i}.mlp", work, ms)
    return {p: getattr(work.experts, p).detach() for p in PROJS}


def _layer_sensitivity(i: int, mlp, ms: list[torch.Tensor], total: int, candidates: list[QuantSpec],
                       dequantized: dict[QuantSpec, dict[str, torch.Tensor]], per_expert: int
                       ) -> list[ExpertSensitivity]:
    experts = mlp.experts
    n_experts, inter, hidden = experts.gate_proj.shape
    routing = route_all(mlp.gate, ms)
    counts = routing.counts(n_experts).tolist()
    k = routing.ids[0].shape[1]
    samples = routed_samples(ms, routing, n_experts, per_expert)
    nbytes = {s: expert_bytes(s, hidden, inter) for s in candidates}
    out = []
    for e, (x, g) in enumerate(samples):
        weights = {p: getattr(experts, p)[e].detach().float() for p in PROJS}
        errors = dict.fromkeys(candidates, 0.0)
        if x.shape[0]:
            x = x.float()
            ref = _expert(x, weights)
            scale = counts[e] / x.shape[0] / total  # the sample stands for all counts[e] routed tokens
            for spec in candidates:
                if spec in dequantized:
                    q = {p: dequantized[spec][p][e].float() for p in PROJS}
                else:
                    q = {p: quantize_rtn(w, fit_spec(spec, w.shape[1])).dequantize() for p, w in weights.items()}
                errors[spec] = float(((_expert(x, q) - ref).square().sum(-1) * g.float().square()).sum()) * scale
        out.append(ExpertSensitivity(i, e, counts[e], counts[e] / max(1, total * k), errors, nbytes))
    return out


def _expert(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T) @ w["down_proj"].T


# --- 2. allocation ----------------------------------------------------------------------------------------------------

def allocate(sensitivities: list[ExpertSensitivity], budget_bytes: int) -> Allocation:
    """Choose one candidate per expert within `budget_bytes` of routed-expert bytes (module docstring, step 2).

    A budget below the bytes of every expert at its cheapest candidate is a ValueError.
    """
    if not sensitivities:
        raise ValueError("no routed experts to allocate")
    choice, hulls, heap = {}, {}, []
    for s in sensitivities:
        key = (s.layer, s.expert)
        hulls[key] = hull = _lower_hull(s)
        choice[key] = 0
        _push_upgrade(heap, key, hull, 0)
    spent = sum(hulls[k][0][1] for k in hulls)
    if budget_bytes < spent:
        raise ValueError(f"byte budget {budget_bytes} is below the {spent} bytes of every expert at its cheapest "
                         "candidate")
    while heap:
        _, key, step = heapq.heappop(heap)
        hull = hulls[key]
        cost = hull[step + 1][1] - hull[step][1]
        if spent + cost > budget_bytes:
            continue  # this expert's further upgrades cost more still: drop it
        spent += cost
        choice[key] = step + 1
        _push_upgrade(heap, key, hull, step + 1)
    uniform = {}
    for spec in sensitivities[0].errors:
        uniform[spec] = (sum(s.nbytes[spec] for s in sensitivities), sum(s.errors[spec] for s in sensitivities))
    chosen = {key: hulls[key][i][0] for key, i in choice.items()}
    error = sum(hulls[key][i][2] for key, i in choice.items())
    return Allocation(chosen, budget_bytes, spent, error, uniform)


def _lower_hull(s: ExpertSensitivity) -> list[tuple[QuantSpec, int, float]]:
    """The expert's candidates as (spec, bytes, error) on the lower convex hull, cheapest first: a candidate that
    costs more without a steeper error decrease than a later one is never worth taking on the way."""
    points = sorted(((spec, s.nbytes[spec], s.errors[spec]) for spec in s.errors), key=lambda p: (p[1], p[2]))
    hull: list[tuple[QuantSpec, int, float]] = []
    for p in points:
        if hull and p[2] >= hull[-1][2]:
            continue  # costs at least as much, no better
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], p):
            hull.pop()  # hull[-1] lies above the segment hull[-2] -> p
        hull.append(p)
    return hull


def _slope(a, b) -> float:
    """Error decrease per byte from a to b (b costs more)."""
    return (a[2] - b[2]) / (b[1] - a[1]) if b[1] > a[1] else float("inf")


def _push_upgrade(heap: list, key: tuple[int, int], hull: list, step: int) -> None:
    if step + 1 < len(hull):
        heapq.heappush(heap, (-_slope(hull[step], hull[step + 1]), key, step))


def mixed_recipe(base: Recipe, allocation: Allocation, name: str | None = None) -> Recipe:
    """`base` with the allocation as per-expert overrides; the base's routed spec becomes the most common choice
    (fewest overrides)."""
    counts: dict[QuantSpec, int] = {}
    for s in allocation.choice.values():
        counts[s] = counts.get(s, 0) + 1
    default = max(counts, key=lambda s: (counts[s], -s.bits, -(s.group_size or 0)))
    recipe = replace(base, routed_experts=default, expert_overrides={})
    label = ",".join(f"{n}x{k}" for k, n in allocation.counts().items())
    return recipe.with_overrides(allocation.overrides(default), name=name or f"{base.name}[{label}]")
