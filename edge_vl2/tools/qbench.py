"""`edge-vl2 qbench`: one MoE layer at the real size, full precision vs quantized vs bitsandbytes, in one run.

One decoder MoE block (fp32 top-6 softmax router, 64 routed experts, the shared experts) with the variant's real
dimensions and the synthetic generator's weights (no checkpoint is read), timed in one process as bf16, INT8 and
INT4 on the cpu backend, and bitsandbytes NF4 / LLM.int8: a decode step (1 token) and a prefill (1,024 tokens).
The host is noisy, so all configurations stay resident and are timed in interleaved rounds (medians); decode tokens
come from a pool of distinct hidden states so consecutive steps route to different experts, as a real decode does.
Each record gives the weight bytes, the bytes one decode step reads and the bandwidth that implies, and the
prefill output's error against bf16. Figures: README "Quantized layers".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..model.config import VL2Config
from ..model.layers import RMSNorm, SwiGLU
from ..model.moe import MoE
from ..quant.experts import QuantExperts
from ..quant.linear import QuantLinear, available_backends
from .synth import synth_tensor, synthetic_config

CONFIGS = ("bf16", "int8", "int4", "nf4", "llm.int8")
LAYER = 1  # the first MoE layer (layer 0 is dense in every variant)
PREFIX = f"language.model.layers.{LAYER}."
PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Layer:
    """One configuration: the MoE block to time and what to call it."""

    config: str
    moe: nn.Module
    detail: str


def build_float_moe(cfg: VL2Config, seed: int) -> MoE:
    """The variant's MoE block at layer 1 in bf16 (router in fp32), weights from the synthetic generator."""
    lang = cfg.language
    with torch.device("meta"):
        moe = MoE(lang)
    e, h, i = lang.n_routed_experts, lang.hidden_size, lang.moe_intermediate_size
    stacks = {"gate_proj": torch.empty(e, i, h, dtype=torch.bfloat16),
              "up_proj": torch.empty(e, i, h, dtype=torch.bfloat16),
              "down_proj": torch.empty(e, h, i, dtype=torch.bfloat16)}
    for proj, stack in stacks.items():
        for k in range(e):  # one expert at a time: the generator works in fp32
            stack[k] = synth_tensor(f"{PREFIX}mlp.experts.{k}.{proj}.weight", stack.shape[1:], cfg, seed)
    state = {f"experts.{p}": t for p, t in stacks.items()}
    state["gate.weight"] = synth_tensor(f"{PREFIX}mlp.gate.weight", (e, h), cfg, seed).float()
    for p in PROJS:
        shape = tuple(getattr(moe.shared_experts, p).weight.shape)
        state[f"shared_experts.{p}.weight"] = synth_tensor(f"{PREFIX}mlp.shared_experts.{p}.weight", shape, cfg, seed)
    moe.load_state_dict({k: nn.Parameter(v, requires_grad=False) for k, v in state.items()}, strict=True, assign=True)
    return moe.eval()


def hidden_states(cfg: VL2Config, n: int, seed: int) -> torch.Tensor:
    """[n, H] bf16 inputs like the MoE's: unit-RMS vectors through the layer's post-attention RMSNorm (whose weight
    carries the outlier channels)."""
    h = cfg.language.hidden_size
    norm = RMSNorm(h, cfg.language.rms_norm_eps)
    norm.weight.data = synth_tensor(f"{PREFIX}post_attention_layernorm.weight", (h,), cfg, seed)
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return norm(x.to(torch.bfloat16))


def _moe_with(cfg: VL2Config, float_moe: MoE, experts: nn.Module, shared: nn.Module) -> MoE:
    """A MoE block sharing float_moe's router, with other experts (built on the meta device: every part is replaced)."""
    with torch.device("meta"):
        moe = MoE(cfg.language)
    moe.gate, moe.experts, moe.shared_experts = float_moe.gate, experts, shared
    return moe.eval()


def _shared(float_moe: MoE, make: Callable[[torch.Tensor], nn.Module]) -> SwiGLU:
    """The shared-experts MLP with each projection replaced by make(its float weight)."""
    src = float_moe.shared_experts
    with torch.device("meta"):
        out = SwiGLU(src.gate_proj.in_features, src.gate_proj.out_features)
    for p in PROJS:
        setattr(out, p, make(getattr(src, p).weight.detach()))
    return out


def build_layer(config: str, cfg: VL2Config, float_moe: MoE) -> Layer:
    """The configuration's MoE block (sharing the router and, for bf16, everything with float_moe)."""
    from edge_vl2.quantize.formats import QuantSpec  # toolchain: the benchmark quantizes its own weights

    from ..quantize.rtn import quantize_rtn

    experts = float_moe.experts
    stacks = [getattr(experts, p).detach() for p in PROJS]
    if config == "bf16":
        return Layer(config, float_moe, "bf16 StackedExperts + SwiGLU (fp32 GEMMs for > 16 rows)")
    if config in ("int8", "int4"):
        inner = min(float_moe.experts.down_proj.shape[2], float_moe.experts.gate_proj.shape[2])
        group = 128 if inner % 128 == 0 else 32  # 32: test-size layers (inputs of 32 / 64)
        spec = QuantSpec(8, None) if config == "int8" else QuantSpec(4, group, symmetric=True)
        routed = QuantExperts.stacked(*(quantize_rtn(w, spec) for w in stacks), "cpu")
        shared = _shared(float_moe, lambda w: QuantLinear(quantize_rtn(w, spec), "cpu", torch.bfloat16))
        return Layer(config, _moe_with(cfg, float_moe, routed, shared), routed.describe())
    kind = "nf4" if config == "nf4" else "int8"
    routed = QuantExperts.bnb_from_float(*stacks, kind=kind)
    shared = _shared(float_moe, lambda w: QuantLinear.bnb_from_float(w, kind))
    return Layer(config, _moe_with(cfg, float_moe, routed, shared), routed.describe())


def _weight_bytes(moe: nn.Module) -> tuple[int, int]:
    """(expert and shared weight bytes held, bytes one decode token reads: shared + k of E routed + router; copies
    only the prefill path uses, like the cpu INT4 op's canonical tensors, are held but not read)."""
    def size(m: nn.Module, decode: bool) -> int:
        if hasattr(m, "nbytes"):
            return m.decode_nbytes if decode else m.nbytes
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    shared = [getattr(moe.shared_experts, p) for p in PROJS]
    held = size(moe.experts, False) + sum(size(m, False) for m in shared)
    router = moe.gate.weight.numel() * moe.gate.weight.element_size()
    k, e = moe.gate.top_k, moe.gate.weight.shape[0]
    read = sum(size(m, True) for m in shared) + router + size(moe.experts, True) * k // e
    return held, read


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Timings:
    decode_s: list[float]
    prefill_s: list[float]


def _time_rounds(layers: list[Layer], pool: torch.Tensor, prefill_x: torch.Tensor, rounds: int, decode_steps: int,
                 say: Callable[[str], None]) -> dict[str, Timings]:
    """Each round runs every layer in turn: decode_steps single tokens (the next hidden states of the pool), then one
    prefill. Interleaving spreads the host's slow spells over all configurations alike."""
    out = {layer.config: Timings([], []) for layer in layers}
    step = 0
    for r in range(rounds):
        for layer in layers:
            for _ in range(decode_steps):
                x = pool[step % len(pool)][None]  # [1, H]
                step += 1
                t = time.perf_counter()
                layer.moe(x)
                out[layer.config].decode_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            layer.moe(prefill_x)
            out[layer.config].prefill_s.append(time.perf_counter() - t)
        say(f"round {r + 1}/{rounds}: {', '.join(layer.config for layer in layers)}")
    return out


def _record(layer: Layer, t: Timings, rel_err: float, prefill_tokens: int, common: dict) -> dict:
    total, per_token = _weight_bytes(layer.moe)
    decode_ms = _quantile(t.decode_s, 0.5) * 1e3
    prefill_s = _quantile(t.prefill_s, 0.5)
    return {**common, "config": layer.config, "detail": layer.detail,
            "weight_bytes": total, "weight_mb": round(total / 2**20, 1),
            "decode_ms_median": round(decode_ms, 2), "decode_ms_p10": round(_quantile(t.decode_s, 0.1) * 1e3, 2),
            "decode_ms_p90": round(_quantile(t.decode_s, 0.9) * 1e3, 2), "decode_samples": len(t.decode_s),
            "decode_read_bytes": per_token, "decode_read_mb": round(per_token / 2**20, 1),
            "decode_gb_s": round(per_token / decode_ms / 1e6, 2),
            "prefill_tokens": prefill_tokens, "prefill_ms_median": round(prefill_s * 1e3, 1),
            "prefill_tok_s": round(prefill_tokens / prefill_s, 1), "prefill_samples": len(t.prefill_s),
            "rel_err_vs_bf16": round(rel_err, 5)}


@torch.inference_mode()
def run_qbench(variant: str, configs: list[str], prefill_tokens: int = 1024, rounds: int = 5,
               decode_steps: int = 20, seed: int = 0, interleave: bool = True, threads: int | None = None,
               size: str = "full", progress: Callable[[str], None] | None = None) -> list[dict]:
    """Build the layer in each configuration and time decode and prefill; one record per configuration, in order
    (ratios against bf16 when it was measured; a skipped configuration says why).

    interleave=True keeps every configuration resident and alternates them round by round (fairest on a noisy host;
    Tiny needs ~1.5 GB); False builds, times and frees one at a time (Small: all five at once would need ~4 GB).
    `rel_err_vs_bf16` is the prefill output's relative error against the bf16 layer on the same routed tokens.
    size="test" takes the synthetic test checkpoints' dimensions (hidden 64, 8 experts): a quick check of the command.
    """
    say = progress or (lambda _msg: None)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(variant, configs, prefill_tokens, rounds, decode_steps, seed, interleave, size, say)
    finally:
        torch.set_num_threads(previous_threads)


def _run(variant: str, configs: list[str], prefill_tokens: int, rounds: int, decode_steps: int, seed: int,
         interleave: bool, size: str, say: Callable[[str], None]) -> list[dict]:
    cfg = VL2Config.from_dict(synthetic_config(variant, size))
    t0 = time.perf_counter()
    float_moe = build_float_moe(cfg, seed)
    say(f"{variant} MoE layer built in {time.perf_counter() - t0:.1f} s")
    pool = hidden_states(cfg, 64, seed)  # decode tokens, used in turn
    prefill_x = hidden_states(cfg, prefill_tokens, seed + 7)
    reference = float_moe(prefill_x).float()
    lang = cfg.language
    common = {"variant": variant, "size": size, "hidden": lang.hidden_size, "experts": lang.n_routed_experts,
              "expert_intermediate": lang.moe_intermediate_size, "shared_experts": lang.n_shared_experts,
              "top_k": lang.num_experts_per_tok, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "interleaved": interleave,
              "env": {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}}

    bnb = available_backends()["bnb"]
    records: dict[str, dict] = {}
    ready: list[tuple[Layer, float]] = []

    def build(config: str) -> tuple[Layer, float]:
        t1 = time.perf_counter()
        layer = build_layer(config, cfg, float_moe)
        layer.moe(pool[:1])  # first-call allocations
        out = layer.moe(prefill_x).float()
        say(f"{config}: built in {time.perf_counter() - t1:.1f} s")
        return layer, float((out - reference).norm() / reference.norm())

    for config in configs:
        if config in ("nf4", "llm.int8") and not bnb.available:
            records[config] = {**common, "config": config, "skipped": bnb.detail}
        elif interleave:
            ready.append(build(config))
        else:
            layer, err = build(config)
            timings = _time_rounds([layer], pool, prefill_x, rounds, decode_steps, say)
            records[config] = _record(layer, timings[config], err, prefill_tokens, common)
            del layer  # frees this configuration's weights before the next is built
    if ready:
        timings = _time_rounds([layer for layer, _ in ready], pool, prefill_x, rounds, decode_steps, say)
        for layer, err in ready:
            records[layer.config] = _record(layer, timings[layer.config], err, prefill_tokens, common)

    base = records.get("bf16")
    if base and "skipped" not in base:
        for rec in records.values():
            if "skipped" not in rec:
                rec["decode_speedup_vs_bf16"] = round(base["decode_ms_median"] / rec["decode_ms_median"], 2)
                rec["prefill_speedup_vs_bf16"] = round(base["prefill_ms_median"] / rec["prefill_ms_median"], 2)
                rec["weight_ratio_vs_bf16"] = round(rec["weight_bytes"] / base["weight_bytes"], 3)
    return [records[c] for c in configs]
