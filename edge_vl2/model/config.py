"""Frozen configuration read from an official DeepSeek-VL2 `config.json`.

The official configs are sparse: fields they leave out take the defaults of the official classes
(`VisionEncoderConfig`, `MlpProjectorConfig`, `DeepseekV2Config` in deepseek-ai/DeepSeek-VL2). Those defaults are
part of the checkpoint format, so they are written out once here, each with the variant that relies on it; every
other dimension must be present or loading fails with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checks
from ..checks import Fields
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

# Limits that keep a hostile config.json from asking for absurd allocations (the model is built from these numbers
# before any tensor is read) or overflowing index arithmetic. Each is far above the largest DeepSeek-VL2 value
# (model-facts §1, §2.1, §5: widths <= 12288, 72 experts, 30 layers, 32 heads, vocabulary 129,280, context 4,096,
# tile 384), so no real checkpoint comes near them.
MAX_DIM = 1 << 16  # any width: hidden, intermediate, head dims, LoRA rank, vision width
MAX_COUNT = 1024  # layers, heads, experts
MAX_VOCAB = 1 << 21  # embedding rows
MAX_CONTEXT = 1 << 17  # positions (32x the real 4,096): the full-context cache and the device fit check scale with it
MAX_TILE = 4096  # vision image_size (the tile side; 384 in every checkpoint)
CONFIG_BYTES = 1 << 20  # config.json is ~2 KB
# Fields that an explicit null sets to another value (the official classes treat them so; Tiny writes the MLA ones
# as null or 0).
NULL_MEANS = {"num_key_value_heads": "num_attention_heads", "kv_lora_rank": 0, "qk_nope_head_dim": 0,
              "qk_rope_head_dim": 0, "v_head_dim": 0, "n_group": 1, "topk_group": 1}
LANGUAGE_INTS = {  # field: (lowest, highest)
    "vocab_size": (1, MAX_VOCAB), "hidden_size": (1, MAX_DIM), "intermediate_size": (1, MAX_DIM),
    "moe_intermediate_size": (1, MAX_DIM), "num_hidden_layers": (1, MAX_COUNT), "num_attention_heads": (1, MAX_COUNT),
    "num_key_value_heads": (1, MAX_COUNT), "kv_lora_rank": (0, MAX_DIM), "qk_nope_head_dim": (0, MAX_DIM),
    "qk_rope_head_dim": (0, MAX_DIM), "v_head_dim": (0, MAX_DIM), "n_routed_experts": (1, MAX_COUNT),
    "n_shared_experts": (1, MAX_COUNT), "num_experts_per_tok": (1, MAX_COUNT), "n_group": (1, MAX_COUNT),
    "topk_group": (1, MAX_COUNT), "first_k_dense_replace": (0, MAX_COUNT), "moe_layer_freq": (1, MAX_COUNT),
    "max_position_embeddings": (1, MAX_CONTEXT), "bos_token_id": (0, MAX_VOCAB - 1),
    "eos_token_id": (0, MAX_VOCAB - 1),
}


def _need(section: dict, key: str, where: str, prefix: str) -> Any:
    if key not in section or (section[key] is None and key != "q_lora_rank"):
        raise UserError(f"{where}: {prefix}.{key} is missing")
    return section[key]


def _section(d, defaults: dict, where: str, prefix: str) -> Fields:
    """A config section with the official defaults filled in; an explicit null stays null, as in the official
    classes."""
    return Fields({**defaults, **Fields(d, where, prefix).data}, where, prefix)


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
    def from_dict(cls, d: dict, where: str = "config.json") -> "VisionConfig":
        f = _section(d, VISION_DEFAULTS, where, "vision_config.")
        size = f.int("image_size", 1, MAX_TILE)
        cfg = cls(image_size=size, patch_size=f.int("patch_size", 1, size), width=f.int("width", 1, MAX_DIM),
                  layers=f.int("layers", 1, MAX_COUNT), heads=f.int("heads", 1, MAX_COUNT),
                  mlp_ratio=f.float("mlp_ratio", 0, 64, lo_open=True))
        if cfg.width % cfg.heads or cfg.head_dim % 2:
            raise UserError(f"{where}: vision width {cfg.width} must split into {cfg.heads} heads of an even width")
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
    def from_dict(cls, d: dict, where: str = "config.json") -> "ProjectorConfig":
        f = _section(d, PROJECTOR_DEFAULTS, where, "projector_config.")
        if f.raw("projector_type") != "downsample_mlp_gelu":
            raise UserError(f"{where}: projector_type {f.raw('projector_type')!r} is not supported "
                            "(DeepSeek-VL2 uses downsample_mlp_gelu)")
        return cls(input_dim=f.int("input_dim", 1, MAX_DIM), n_embed=f.int("n_embed", 1, MAX_DIM),
                   depth=f.int("depth", 2, 16), mlp_ratio=f.int("mlp_ratio", 1, 64),
                   downsample_ratio=f.int("downsample_ratio", 1, 16))


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
    def from_dict(cls, d: dict, where: str = "config.json") -> "LanguageConfig":
        f = _section(d, LANGUAGE_DEFAULTS, where, "language_config.")
        for key in LANGUAGE_REQUIRED:
            _need(f.data, key, where, "language_config")
        for key, meaning in NULL_MEANS.items():
            if f.data[key] is None:
                f.data[key] = meaning if isinstance(meaning, int) else f.data[meaning]
        for key, why in (("q_lora_rank", "the q_a/q_b path is not supported"), ("rope_scaling", "YaRN is not supported")):
            if f.raw(key) is not None:
                raise UserError(f"{f.name(key)} is set; DeepSeek-VL2 checkpoints have none and {why}")
        f.str("hidden_act", options=("silu",))
        if f.bool("attention_bias") or f.bool("tie_word_embeddings"):
            raise UserError(f"{where}: attention_bias / tie_word_embeddings are not used by DeepSeek-VL2")
        cfg = cls(**{k: f.int(k, lo, hi) for k, (lo, hi) in LANGUAGE_INTS.items()},
                  use_mla=f.bool("use_mla"), norm_topk_prob=f.bool("norm_topk_prob"),
                  topk_method=f.str("topk_method", options=("greedy", "group_limited_greedy", "noaux_tc")),
                  scoring_func=f.str("scoring_func", options=("softmax", "sigmoid")),
                  routed_scaling_factor=f.float("routed_scaling_factor", 0, 1e6, lo_open=True),
                  rope_theta=f.float("rope_theta", 0, 1e12, lo_open=True),
                  rms_norm_eps=f.float("rms_norm_eps", 0, 1, lo_open=True),
                  vocab_from_checkpoint="vocab_size" not in d)
        cfg._check(where)
        return cfg

    def _check(self, where: str) -> None:
        """What the model's arithmetic needs beyond each field's own range."""
        heads = self.num_attention_heads
        if self.use_mla:
            if not (self.kv_lora_rank and self.qk_nope_head_dim and self.qk_rope_head_dim and self.v_head_dim):
                raise UserError(f"{where}: use_mla is true but kv_lora_rank / qk_*_head_dim / v_head_dim are not set")
            if self.qk_rope_head_dim % 2:
                raise UserError(f"{where}: qk_rope_head_dim {self.qk_rope_head_dim} must be even (RoPE pairs)")
        elif self.hidden_size % heads or self.head_dim % 2 or heads % self.num_key_value_heads:
            raise UserError(f"{where}: hidden_size {self.hidden_size} must split into num_attention_heads {heads} "
                            f"of an even width, in whole groups of num_key_value_heads {self.num_key_value_heads}")
        experts, k = self.n_routed_experts, self.num_experts_per_tok
        if experts % self.n_group or self.topk_group > self.n_group or k > experts or \
                (self.topk_method != "greedy" and k > self.topk_group * experts // self.n_group):
            raise UserError(f"{where}: {experts} routed experts in n_group {self.n_group}, topk_group "
                            f"{self.topk_group} cannot give num_experts_per_tok {k}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise UserError(f"{where}: first_k_dense_replace {self.first_k_dense_replace} is over num_hidden_layers "
                            f"{self.num_hidden_layers}")

    def with_vocab(self, vocab_size: int) -> "LanguageConfig":
        from dataclasses import replace

        return replace(self, vocab_size=checks.integer(vocab_size, "embedding rows", 1, MAX_VOCAB),
                       vocab_from_checkpoint=False)


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
    def from_dict(cls, d: dict, where: str = "config.json") -> "VL2Config":
        f = Fields(d, where)
        if f.raw("model_type", None) != "deepseek_vl_v2":
            raise UserError(f"{where}: model_type is {f.raw('model_type', None)!r}, expected 'deepseek_vl_v2'")
        tile_tag, pos = f.str("tile_tag", "2D"), f.str("global_view_pos", "head")
        if tile_tag != "2D" or pos not in ("head", "tail"):
            raise UserError(f"{where}: tile_tag {tile_tag!r} / global_view_pos {pos!r} not supported "
                            "(DeepSeek-VL2 uses 2D / head)")
        res = checks.int_pairs(f.raw("candidate_resolutions"), f.name("candidate_resolutions"), 1, MAX_DIM)
        cfg = cls(vision=VisionConfig.from_dict(f.raw("vision_config"), where),
                  projector=ProjectorConfig.from_dict(f.raw("projector_config"), where),
                  language=LanguageConfig.from_dict(f.raw("language_config"), where),
                  candidate_resolutions=res, tile_tag=tile_tag, global_view_pos=pos)
        if cfg.projector.input_dim != cfg.vision.width:
            raise UserError(f"{where}: projector input_dim {cfg.projector.input_dim} != vision width "
                            f"{cfg.vision.width}")
        if cfg.projector.n_embed != cfg.language.hidden_size:
            raise UserError(f"{where}: projector n_embed {cfg.projector.n_embed} != language hidden_size "
                            f"{cfg.language.hidden_size}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "VL2Config":
        path = Path(path)
        return cls.from_dict(checks.read_json(path, "config.json", CONFIG_BYTES), str(path))
