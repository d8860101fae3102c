"""Frozen configuration read from an official DeepSeek-VL2 `config.json`.

The official configs are sparse: fields they leave out take the defaults of the official classes
(`VisionEncoderConfig`, `MlpProjectorConfig`, `DeepseekV2Config` in deepseek-ai/DeepSeek-VL2). Those defaults are
part of the checkpoint format, so they are written out once here, each with the variant that relies on it; every
other dimension must be present or loading fails with a message naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

# Official defaults the real checkpoints rely on (model-facts §2.1, §4.1, §5).
VISION_DEFAULTS = {"image_size": 384, "heads": 16}
PROJECTOR_DEFAULTS = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "depth": 2, "mlp_ratio": 1,
                      "downsample_ratio": 2}
LANGUAGE_DEFAULTS = {
    "vocab_size": 102400,  # small leaves it out; the loader prefers the embedding's shape when absent
    "num_hidden_layers": 30,  # base
    "num_attention_heads": 32,  # base
    "num_key_value_heads": None,  # -> num_attention_heads
    "use_mla": True,  # small, base
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "n_group": 1, "topk_group": 1, "moe_layer_freq": 1, "first_k_dense_replace": 0,
    "hidden_act": "silu", "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001,
}
LANGUAGE_REQUIRED = ("hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                     "n_shared_experts", "num_experts_per_tok", "q_lora_rank")


def _need(section: dict, key: str, where: str) -> Any:
    if key not in section or (section[key] is None and key != "q_lora_rank"):
        raise UserError(f"config.json: {where}.{key} is missing")
    return section[key]


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP tower (timm-style ViT, no class token, final LayerNorm, attn_pool stored but unused)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)  # timm: int(embed_dim * mlp_ratio); 1152*3.7362 -> 4304

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # 27: the last 6 pixel rows/cols are never seen

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        v = {**VISION_DEFAULTS, **d}
        cfg = cls(image_size=int(v["image_size"]), patch_size=int(_need(v, "patch_size", "vision_config")),
                  width=int(_need(v, "width", "vision_config")), layers=int(_need(v, "layers", "vision_config")),
                  heads=int(v["heads"]), mlp_ratio=float(_need(v, "mlp_ratio", "vision_config")))
        if cfg.width % cfg.heads:
            raise UserError(f"config.json: vision width {cfg.width} is not divisible by {cfg.heads} heads")
        return cfg


@dataclass(frozen=True)
class ProjectorConfig:
    """`downsample_mlp_gelu`: zero-pad to even, 2x2 unfold (channel-major), Linear-GELU-Linear."""

    input_dim: int
    n_embed: int
    depth: int
    mlp_ratio: int
    downsample_ratio: int

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectorConfig":
        v = {**PROJECTOR_DEFAULTS, **d}
        if v["projector_type"] != "downsample_mlp_gelu":
            raise UserError(f"config.json: projector_type {v['projector_type']!r} is not supported "
                            "(DeepSeek-VL2 uses downsample_mlp_gelu)")
        return cls(input_dim=int(v["input_dim"]), n_embed=int(_need(v, "n_embed", "projector_config")),
                   depth=int(v["depth"]), mlp_ratio=int(v["mlp_ratio"]), downsample_ratio=int(v["downsample_ratio"]))


@dataclass(frozen=True)
class LanguageConfig:
    """DeepSeek-MoE decoder: plain MHA (`use_mla: false`, Tiny) or MLA (Small, base)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    use_mla: bool
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    rope_theta: float
    max_position_embeddings: int
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    vocab_from_checkpoint: bool = False  # vocab_size was absent: the loader takes it from the embedding shape

    @property
    def head_dim(self) -> int:
        """Per-head width of the plain-attention (Tiny) path: LlamaAttention uses hidden_size // heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @classmethod
    def from_dict(cls, d: dict) -> "LanguageConfig":
        for key in LANGUAGE_REQUIRED:
            _need(d, key, "language_config")
        v = {**LANGUAGE_DEFAULTS, **d}  # an explicit null stays null, as in the official class
        if v["q_lora_rank"] is not None:
            raise UserError("config.json: q_lora_rank is set; DeepSeek-VL2 checkpoints have none and the "
                            "q_a/q_b path is not supported")
        if v["rope_scaling"] is not None:
            raise UserError("config.json: rope_scaling is set; DeepSeek-VL2 uses plain RoPE and YaRN is not supported")
        if v["hidden_act"] != "silu":
            raise UserError(f"config.json: hidden_act {v['hidden_act']!r} is not supported (expected silu)")
        if v["attention_bias"] or v["tie_word_embeddings"]:
            raise UserError("config.json: attention_bias / tie_word_embeddings are not used by DeepSeek-VL2")
        if v["topk_method"] not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise UserError(f"config.json: topk_method {v['topk_method']!r} is not supported")
        if v["scoring_func"] not in ("softmax", "sigmoid"):
            raise UserError(f"config.json: scoring_func {v['scoring_func']!r} is not supported")
        heads = int(v["num_attention_heads"])
        cfg = cls(
            vocab_size=int(v["vocab_size"]), hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]), moe_intermediate_size=int(v["moe_intermediate_size"]),
            num_hidden_layers=int(v["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(v["num_key_value_heads"] or heads), use_mla=bool(v["use_mla"]),
            kv_lora_rank=int(v["kv_lora_rank"] or 0), qk_nope_head_dim=int(v["qk_nope_head_dim"] or 0),
            qk_rope_head_dim=int(v["qk_rope_head_dim"] or 0), v_head_dim=int(v["v_head_dim"] or 0),
            n_routed_experts=int(v["n_routed_experts"]), n_shared_experts=int(v["n_shared_experts"]),
            num_experts_per_tok=int(v["num_experts_per_tok"]), topk_method=v["topk_method"],
            scoring_func=v["scoring_func"], norm_topk_prob=bool(v["norm_topk_prob"]),
            routed_scaling_factor=float(v["routed_scaling_factor"]), n_group=int(v["n_group"] or 1),
            topk_group=int(v["topk_group"] or 1), first_k_dense_replace=int(v["first_k_dense_replace"]),
            moe_layer_freq=int(v["moe_layer_freq"]), rope_theta=float(v["rope_theta"]),
            max_position_embeddings=int(v["max_position_embeddings"]), rms_norm_eps=float(v["rms_norm_eps"]),
            bos_token_id=int(v["bos_token_id"]), eos_token_id=int(v["eos_token_id"]),
            vocab_from_checkpoint="vocab_size" not in d,
        )
        if cfg.use_mla and not (cfg.kv_lora_rank and cfg.qk_nope_head_dim and cfg.qk_rope_head_dim and cfg.v_head_dim):
            raise UserError("config.json: use_mla is true but kv_lora_rank / qk_*_head_dim / v_head_dim are not set")
        if not cfg.use_mla and cfg.hidden_size % heads:
            raise UserError(f"config.json: hidden_size {cfg.hidden_size} is not divisible by {heads} heads")
        if cfg.n_routed_experts % cfg.n_group or cfg.num_experts_per_tok > cfg.n_routed_experts:
            raise UserError("config.json: n_routed_experts / n_group / num_experts_per_tok are inconsistent")
        return cfg

    def with_vocab(self, vocab_size: int) -> "LanguageConfig":
        from dataclasses import replace

        return replace(self, vocab_size=vocab_size, vocab_from_checkpoint=False)


@dataclass(frozen=True)
class VL2Config:
    """The whole `config.json` of a `deepseek_vl_v2` checkpoint."""

    vision: VisionConfig
    projector: ProjectorConfig
    language: LanguageConfig
    candidate_resolutions: tuple[tuple[int, int], ...]
    tile_tag: str
    global_view_pos: str

    @property
    def variant(self) -> str:
        """tiny (plain attention), small (MLA, softmax routing) or base (MLA, sigmoid/noaux_tc): for display."""
        if not self.language.use_mla:
            return "tiny"
        return "base" if self.language.topk_method == "noaux_tc" else "small"

    @classmethod
    def from_dict(cls, d: dict) -> "VL2Config":
        if d.get("model_type") != "deepseek_vl_v2":
            raise UserError(f"config.json: model_type is {d.get('model_type')!r}, expected 'deepseek_vl_v2'")
        for key in ("vision_config", "projector_config", "language_config", "candidate_resolutions"):
            if not isinstance(d.get(key), (dict, list)):
                raise UserError(f"config.json: {key} is missing")
        tile_tag = d.get("tile_tag", "2D")
        pos = d.get("global_view_pos", "head")
        if tile_tag != "2D" or pos not in ("head", "tail"):
            raise UserError(f"config.json: tile_tag {tile_tag!r} / global_view_pos {pos!r} not supported "
                            "(DeepSeek-VL2 uses 2D / head)")
        try:
            res = tuple((int(w), int(h)) for w, h in d["candidate_resolutions"])
        except (TypeError, ValueError):
            raise UserError("config.json: candidate_resolutions must be a list of [width, height] pairs") from None
        cfg = cls(vision=VisionConfig.from_dict(d["vision_config"]),
                  projector=ProjectorConfig.from_dict(d["projector_config"]),
                  language=LanguageConfig.from_dict(d["language_config"]),
                  candidate_resolutions=res, tile_tag=tile_tag, global_view_pos=pos)
        if cfg.projector.input_dim != cfg.vision.width:
            raise UserError(f"config.json: projector input_dim {cfg.projector.input_dim} != vision width "
                            f"{cfg.vision.width}")
        if cfg.projector.n_embed != cfg.language.hidden_size:
            raise UserError(f"config.json: projector n_embed {cfg.projector.n_embed} != language hidden_size "
                            f"{cfg.language.hidden_size}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "VL2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: not found") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_dict(d)
