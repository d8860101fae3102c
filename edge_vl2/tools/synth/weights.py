"""Synthetic tensor values that "look trained" enough for quantization-quality measurements.

Every tensor comes from its own generator seeded by (seed, tensor name), so any tensor can be made alone, in any
order, and a shard is reproducible byte for byte. What makes them look trained:

* Linear weights are heavy-tailed (Tukey-h, h = 0.15: tails like a Student-t with ~6 dof, kurtosis ~10) with
  std 1/sqrt(fan_in), so every projection maps unit-RMS inputs to unit-RMS outputs.
* A few hidden channels are outliers: the RMSNorms feeding attention and MLP are 2-4x larger there, and about half
  of the matrices reading the normalised hidden state have those input columns scaled 5-20x. Each such matrix is
  then rescaled so its output variance (given the norm in front of it) stays 1: outliers, but no explosion.
* Routers (`mlp.gate.weight`) have log-normal row norms, so a few experts are hot and some are cold; base's
  `e_score_correction_bias` leans against the hot ones, as the trained bias does.
* Norm weights are 1 + small noise, biases small noise, position embeddings small.
* `lm_head` is scaled by bisection so the mean next-token entropy on hidden vectors drawn like the final normalised
  hidden state (unit RMS times the final-norm weight) is 1.5 nats.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ...model.config import VL2Config

TUKEY_H = 0.15
_TUKEY_STD = (1 - 2 * TUKEY_H) ** -0.75  # std of z*exp(h z^2 / 2) for z ~ N(0, 1)
NORM_NOISE = 0.05  # norm weights 1 + N(0, 0.05)
BIAS_STD = 0.02
POS_STD = 0.02
EMBED_STD = 1.0  # token rows (and the two layout vectors) at unit RMS, like the projector's image embeddings
OUTLIER_NORM = (2.0, 4.0)  # RMSNorm weight multiplier on outlier channels
OUTLIER_COLUMN = (5.0, 20.0)  # weight-column multiplier on outlier channels, in about half the matrices
ROUTER_GAIN = 2.0  # router logit std for a unit-RMS input and an average expert
EXPERT_HEAT_SIGMA = 0.5  # log-normal spread of router row norms
TARGET_ENTROPY = 1.5  # nats, mean next-token entropy the lm_head scale is calibrated to
CALIBRATION_BATCH = 64

_HIDDEN_INPUT = ("q_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa", "gate_proj", "up_proj")


def generator(seed: int, name: str) -> torch.Generator:
    """The generator for `name`: a 63-bit seed from sha256 of (seed, name), stable across runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def heavy_tailed(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """Tukey-h samples z*exp(h z^2/2) with the given std (float32): one normal draw per value, so it is fast."""
    z = torch.randn(shape, generator=gen)
    return z.square().mul_(TUKEY_H / 2).exp_().mul_(z).mul_(std / _TUKEY_STD)


def _uniform(n: int, lo_hi: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def outlier_channels(seed: int, hidden: int) -> torch.Tensor:
    """The hidden channels that carry outliers in every layer (about one per 320 channels, at least one)."""
    return torch.randperm(hidden, generator=generator(seed, "language#outlier_channels"))[: max(1, hidden // 320)]


def _norm_weight(name: str, n: int, seed: int, with_outliers: bool) -> torch.Tensor:
    gen = generator(seed, name)
    w = 1 + NORM_NOISE * torch.randn(n, generator=gen)
    if with_outliers:
        idx = outlier_channels(seed, n)
        w[idx] *= _uniform(len(idx), OUTLIER_NORM, gen)
    return w


def _hidden_input_linear(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A matrix reading the normalised hidden state: maybe outlier columns, then unit output variance."""
    gen = generator(seed, name)
    w = heavy_tailed(shape, 1 / math.sqrt(shape[1]), gen)
    col_scale = torch.ones(shape[1])
    if torch.rand(1, generator=gen).item() < 0.5:
        idx = outlier_channels(seed, shape[1])
        col_scale[idx] = _uniform(len(idx), OUTLIER_COLUMN, gen)
    layer = name.split(".")[3]  # language.model.layers.{i}.(self_attn|mlp)....
    norm = "input_layernorm" if ".self_attn." in name else "post_attention_layernorm"
    norm_name = f"language.model.layers.{layer}.{norm}.weight"
    g = _norm_weight(norm_name, shape[1], seed, with_outliers=True)
    # E[(W x)_i^2] for x = unit-RMS * g is mean_j (s_j g_j)^2 times the base variance: divide it out.
    return w.mul_(col_scale / (col_scale * g).square().mean().sqrt())


def _expert_heat(seed: int, layer_prefix: str, n_experts: int) -> torch.Tensor:
    """Per-expert router row norm (log-normal): shared by the router weight and base's correction bias."""
    gen = generator(seed, layer_prefix + "mlp.gate#heat")
    return torch.exp(EXPERT_HEAT_SIGMA * torch.randn(n_experts, generator=gen))


def sample_final_hidden(norm_weight: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, H] vectors drawn like the final normalised hidden state: unit RMS, times the final-norm weight."""
    z = torch.randn(n, norm_weight.numel(), generator=gen)
    return z / z.square().mean(dim=-1, keepdim=True).sqrt() * norm_weight.float()


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean softmax entropy in nats over the rows of `logits` [N, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum(dim=-1).mean())


def _entropy_at(base: torch.Tensor, scale: float, x: torch.Tensor, e: torch.Tensor) -> float:
    """mean_entropy(base * scale) in preallocated buffers (33 MB each at full vocab; called 16 times)."""
    torch.mul(base, scale, out=x)
    x.sub_(x.amax(dim=-1, keepdim=True))
    torch.exp(x, out=e)
    z = e.sum(dim=-1)
    return float((z.log() - e.mul_(x).sum(dim=-1) / z).mean())  # H = log Z - E_p[x]


def _lm_head(name: str, shape: tuple[int, int], cfg: VL2Config, seed: int) -> torch.Tensor:
    w = heavy_tailed(shape, 1 / math.sqrt(shape[1]), generator(seed, name))  # [V, H]
    g = synth_tensor("language.model.norm.weight", (shape[1],), cfg, seed)
    h = sample_final_hidden(g, CALIBRATION_BATCH, generator(seed, name + "#calibration"))  # [B, H]
    base = h @ w.T  # [B, V] logits at scale 1; entropy falls monotonically as the scale grows
    x, e = torch.empty_like(base), torch.empty_like(base)
    lo, hi = math.log(0.5), math.log(50.0)  # bisect the log-scale; 16 halvings leave ~1e-4 relative error
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _entropy_at(base, math.exp(mid), x, e) > TARGET_ENTROPY else (lo, mid)
    scale = math.exp((lo + hi) / 2)
    if abs(_entropy_at(base, scale, x, e) - TARGET_ENTROPY) > 0.01:  # target outside the bracket
        raise AssertionError(f"lm_head calibration did not converge (scale {scale:.3g})")
    return w.mul_(scale)


def synth_tensor(name: str, shape: tuple[int, ...], cfg: VL2Config, seed: int) -> torch.Tensor:
    """The bf16 value of checkpoint tensor `name` (shape from `edge_vl2.model.shapes.checkpoint_shapes`)."""
    shape = tuple(shape)
    gen = generator(seed, name)
    leaf = name.split(".")[-2] if "." in name else ""  # module name, e.g. "q_proj"
    if name == "language.lm_head.weight":
        t = _lm_head(name, shape, cfg, seed)
    elif name in ("language.model.embed_tokens.weight", "image_newline", "view_seperator"):
        t = heavy_tailed(shape, EMBED_STD, gen)
    elif name.endswith("layernorm.weight"):  # input_/post_attention_layernorm carry outliers; kv_a_layernorm not
        t = _norm_weight(name, shape[0], seed, with_outliers="kv_a_layernorm" not in name)
    elif name == "language.model.norm.weight" or (name.startswith("vision.") and len(shape) == 1
                                                    and name.endswith(".weight")):  # final RMSNorm, LayerNorms
        t = _norm_weight(name, shape[0], seed, with_outliers=False)
    elif name.endswith(".bias") and not name.endswith("e_score_correction_bias"):
        t = BIAS_STD * torch.randn(shape, generator=gen)
    elif name.endswith(("pos_embed", "attn_pool.latent")):
        t = POS_STD * torch.randn(shape, generator=gen)
    elif name.endswith("mlp.gate.weight"):  # router [E, H]
        heat = _expert_heat(seed, name[: -len("mlp.gate.weight")], shape[0])
        t = heavy_tailed(shape, ROUTER_GAIN / math.sqrt(shape[1]), gen) * heat[:, None]
    elif name.endswith("e_score_correction_bias"):  # trained bias pushes hot experts down
        heat = _expert_heat(seed, name[: -len("mlp.gate.e_score_correction_bias")], shape[0])
        t = -0.1 * heat.log() + 0.01 * torch.randn(shape, generator=gen)
    elif name.startswith("language.model.layers.") and leaf in _HIDDEN_INPUT:
        t = _hidden_input_linear(name, shape, seed)
    elif len(shape) >= 2:  # every other Linear / conv: fan_in = product of the input dims
        t = heavy_tailed(shape, 1 / math.sqrt(math.prod(shape[1:])), gen)
    else:
        raise ValueError(f"no synthetic rule for tensor {name!r} {shape}")
    return t.to(torch.bfloat16)
