"""Quantization recipes: which decoder tensors get which format, as data that lives in the bundle manifest.

A recipe gives one `QuantSpec` (or None = keep bf16) per module kind:

    attention       self_attn.{q,k,v,o}_proj (Tiny), MLA q_proj / kv_a_proj_with_mqa / o_proj
                    (MLA's w_uk / w_uv, the split kv_b_proj, always stay high precision)
    dense_mlp       the first_k_dense_replace layers' mlp.{gate,up,down}_proj
    shared_experts  mlp.shared_experts.{gate,up,down}_proj
    routed_experts  mlp.experts.{gate,up,down}_proj (stacked [E, out, in]), plus per-expert overrides keyed by the
                    checkpoint's per-expert name `language.model.layers.{i}.mlp.experts.{e}.{proj}`
    lm_head         language.lm_head
    embeddings      language.model.embed_tokens (read one row per token: its bytes are size, not bandwidth; its
                    rounding error enters every position, so the presets give it INT8 g32 or keep it bf16)

The router (`mlp.gate`), norms and the vision tower are never quantized: the router is tiny and its top-k choice is
what routing fidelity measures: a small error in its logits swaps experts, an error no later layer can undo.

Group sizes are the recipe's intent; `fit_spec` shrinks a group to the largest power of two >= 16 that divides the
tensor's in_features (Tiny's dense down_proj has in = 6848 = 64 x 107, so "g128" becomes g64 there; test-size models
have in = 32/64). The quantized tensor records the group it really got.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from edge_vl2.quant import naming

from .formats import QuantSpec

KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "lm_head", "embeddings")
PRESETS = ("int4", "int8", "bf16", "mixed", "int8-channel", "int4-g128")
RECIPE_FORMAT = "edge-vl2-recipe"
RECIPE_VERSION = 1

_LAYER = r"language\.model\.layers\.(\d+)\."
_PATTERNS: list[tuple[re.Pattern, str | None]] = [
    (re.compile(_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj|kv_a_proj_with_mqa)$"), "attention"),
    (re.compile(_LAYER + r"self_attn\.(w_uk|w_uv|kv_b_proj)$"), None),
    (re.compile(_LAYER + r"mlp\.gate$"), None),
    (re.compile(_LAYER + r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)$"), "shared_experts"),
    (re.compile(_LAYER + r"mlp\.experts\.(gate_proj|up_proj|down_proj)$"), "routed_experts"),
    (re.compile(_LAYER + r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$"), "routed_experts"),
    (re.compile(_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)$"), "dense_mlp"),
    (re.compile(r"language\.lm_head$"), "lm_head"),
    (re.compile(r"language\.model\.embed_tokens$"), "embeddings"),
]
_EXPERT = re.compile(_LAYER + r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def module_kind(name: str) -> str | None:
    """The recipe kind of a decoder tensor prefix (with or without `.weight`); None for what never gets quantized."""
    name = name.removesuffix(".weight")
    for pattern, kind in _PATTERNS:
        if pattern.match(name):
            return kind
    return None


def expert_name(layer: int, expert: int, proj: str) -> str:
    """The checkpoint's per-expert name, used for per-expert overrides and per-expert quantized tensors."""
    return naming.expert_name(naming.layer_experts(layer), expert, proj)


def fit_spec(spec: QuantSpec | None, in_features: int) -> QuantSpec | None:
    """The spec with its group shrunk to the largest power of two >= 16 dividing in_features (None stays None)."""
    if spec is None or spec.group_size is None or in_features % spec.group_size == 0:
        return spec
    g = spec.group_size
    while g >= 16 and in_features % g:
        g //= 2
    if g < 16:
        raise ValueError(f"no group size >= 16 divides in_features {in_features} (spec {spec})")
    return replace(spec, group_size=g)


def spec_nbytes(spec: QuantSpec | None, out_features: int, in_features: int) -> int:
    """Bytes of one [out, in] tensor in the spec's on-disk format (None: bf16)."""
    if spec is None:
        return 2 * out_features * in_features
    spec = fit_spec(spec, in_features)
    groups = 1 if spec.group_size is None else in_features // spec.group_size
    if spec.bits == 8:
        return out_features * in_features + 2 * out_features * groups
    zeros = 0 if spec.symmetric else out_features * ((groups + 1) // 2)
    return out_features * in_features // 2 + 2 * out_features * groups + zeros


def spec_to_dict(spec: QuantSpec | None) -> dict | None:
    return None if spec is None else {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric}


def spec_from_dict(d, where: str) -> QuantSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict) or set(d) - {"bits", "group_size", "symmetric"} or "bits" not in d:
        raise ValueError(f"recipe {where}: expected null or {{bits, group_size, symmetric}}, got {d!r}")
    bits, group, symmetric = d["bits"], d.get("group_size"), d.get("symmetric", True)
    if not _is_int(bits) or not (group is None or _is_int(group)) or not isinstance(symmetric, bool):
        raise ValueError(f"recipe {where}: bits and group_size must be integers (group_size may be null), "
                         f"symmetric a boolean; got {d!r}")
    try:
        return QuantSpec(bits=bits, group_size=group, symmetric=symmetric)
    except ValueError as e:
        raise ValueError(f"recipe {where}: {e}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Recipe:
    """Per-module-kind specs (None = bf16) plus per-expert overrides {per-expert name: spec}."""

    name: str
    attention: QuantSpec | None = None
    dense_mlp: QuantSpec | None = None
    shared_experts: QuantSpec | None = None
    routed_experts: QuantSpec | None = None
    lm_head: QuantSpec | None = None
    embeddings: QuantSpec | None = None
    expert_overrides: dict[str, QuantSpec] = field(default_factory=dict)

    def __post_init__(self):
        for key in self.expert_overrides:
            if not _EXPERT.match(key):
                raise ValueError(f"recipe {self.name}: override key {key!r} is not "
                                 "language.model.layers.{i}.mlp.experts.{e}.{gate_proj|up_proj|down_proj}")
        if self.expert_overrides and self.routed_experts is None:
            raise ValueError(f"recipe {self.name}: per-expert overrides need a routed_experts spec")

    def spec_for(self, name: str, in_features: int | None = None) -> QuantSpec | None:
        """The spec of a tensor prefix (`.weight` optional), None to keep it high precision.

        A stacked routed-expert name gets the default routed spec; per-expert names get their override if any.
        With `in_features`, the group is fitted to the tensor (`fit_spec`).
        """
        name = name.removesuffix(".weight")
        kind = module_kind(name)
        if kind is None:
            return None
        spec = self.expert_overrides.get(name, getattr(self, kind))
        return fit_spec(spec, in_features) if in_features is not None else spec

    def check_overrides(self, moe_layers: set[int], n_experts: int) -> None:
        """Raise ValueError for an override naming a layer without routed experts or an expert that does not exist."""
        for key in self.expert_overrides:
            m = _EXPERT.match(key)
            layer, expert = int(m.group(1)), int(m.group(2))
            if layer not in moe_layers or expert >= n_experts:
                raise ValueError(f"recipe {self.name}: override {key} names no routed expert of this model "
                                 f"(MoE layers {min(moe_layers)}-{max(moe_layers)}, {n_experts} experts)")

    def expert_specs(self, layer: int, proj: str, n_experts: int) -> list[QuantSpec | None]:
        """Per-expert specs of one stacked projection (overrides applied)."""
        return [self.spec_for(expert_name(layer, e, proj)) for e in range(n_experts)]

    def with_overrides(self, overrides: dict[str, QuantSpec], name: str | None = None) -> "Recipe":
        """A copy with these per-expert overrides added (same-spec-as-default entries dropped)."""
        merged = {**self.expert_overrides, **overrides}
        merged = {k: v for k, v in sorted(merged.items()) if v != self.routed_experts}
        return replace(self, name=name or self.name, expert_overrides=merged)

    # --- JSON ---------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "name": self.name,
                "modules": {k: spec_to_dict(getattr(self, k)) for k in KINDS},
                "expert_overrides": {k: spec_to_dict(v) for k, v in sorted(self.expert_overrides.items())},
                "high_precision": ["router (mlp.gate)", "norms", "MLA w_uk/w_uv", "vision tower", "projector"]}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or d.get("format") != RECIPE_FORMAT:
            raise ValueError(f"not an {RECIPE_FORMAT} object")
        if d.get("version") != RECIPE_VERSION:
            raise ValueError(f"recipe version {d.get('version')!r}; this toolchain reads {RECIPE_VERSION}")
        modules = d.get("modules")
        if not isinstance(modules, dict) or set(modules) != set(KINDS):
            raise ValueError(f"recipe modules must name exactly {list(KINDS)}")
        overrides = d.get("expert_overrides", {})
        if not isinstance(overrides, dict):
            raise ValueError("recipe expert_overrides must be an object")
        parsed = {}
        for k, v in overrides.items():
            spec = spec_from_dict(v, k)
            if spec is None:
                raise ValueError(f"recipe override {k}: null is not allowed (routed experts are quantized)")
            parsed[k] = spec
        return cls(name=str(d.get("name", "custom")), expert_overrides=parsed,
                   **{k: spec_from_dict(modules[k], k) for k in KINDS})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))


INT8 = QuantSpec(8, None)  # per output channel
INT8_G32 = QuantSpec(8, 32)  # llama.cpp Q8_0's grid: 8.5 bits per weight
INT4_G128 = QuantSpec(4, 128)
INT4_G64 = QuantSpec(4, 64)
INT4_G32_ASYM = QuantSpec(4, 32, symmetric=False)  # 4.625 bits per weight; each group's range searched (formats.py)


def preset(name: str) -> Recipe:
    """The named recipes.

    int4      the default: routed experts INT4 g32 asymmetric; attention, dense MLP and shared experts INT8 g32 (every
              token reads them: INT8 there costs little size and cuts their error ~150x); lm_head and the embedding
              table INT8 g32. 1.946 GB on full-size Tiny, under llama.cpp Q4_K_M's 1.949 GB, and below its KL on every
              held-out domain (README "Held-out domains"). The embedding table is the most sensitive tensor we
              measured: the same recipe with it at INT4 g32 had 5x the KL on prose.
    int8      every decoder tensor, embeddings included, INT8 g32: 3.119 GB on full-size Tiny, under Q8_0's 3.124 GB;
              the per-32 scale holds the heavy-tailed rows that one scale per row cannot (issue 9: per-channel RTN
              KL 0.216 vs Q8_0's 0.057 on prose).
    int8-channel  every decoder linear INT8 per channel, embeddings bf16 (the earlier int8).
    int8-gN   int8 with one fp16 scale per N weights.
    int4-gN   the earlier, leaner int4 (1.84 GB, fastest decode: 386 MB read per token on full-size Tiny):
              routed experts INT4 g<N> symmetric, attention / dense MLP / shared experts INT4 g64, lm_head INT8 per
              channel, embeddings bf16; int4-g128 is that recipe, the other N its uniform baselines for `mixed`.
    mixed     int4-g128 as the base; `allocate.allocate` picks each routed expert's format (INT4 group sizes, INT8)
              under a byte budget and `allocate.mixed_recipe` writes the choice as per-expert overrides.
    bf16      nothing quantized (the reference).
    """
    if name == "bf16":
        return Recipe("bf16")
    if name == "int4":
        return Recipe("int4", attention=INT8_G32, dense_mlp=INT8_G32, shared_experts=INT8_G32,
                      routed_experts=INT4_G32_ASYM, lm_head=INT8_G32, embeddings=INT8_G32)
    if name == "int8-channel":
        return Recipe(name, attention=INT8, dense_mlp=INT8, shared_experts=INT8, routed_experts=INT8, lm_head=INT8)
    if name == "mixed":
        return replace(preset("int4-g128"), name=name)
    m = re.fullmatch(r"int8(?:-g(\d+))?", name)
    if m:
        spec = QuantSpec(8, int(m.group(1) or 32))
        return Recipe(name, attention=spec, dense_mlp=spec, shared_experts=spec, routed_experts=spec, lm_head=spec,
                      embeddings=spec)
    m = re.fullmatch(r"int4-g(\d+)", name)
    if m:
        return Recipe(name, attention=INT4_G64, dense_mlp=INT4_G64, shared_experts=INT4_G64,
                      routed_experts=QuantSpec(4, int(m.group(1))), lm_head=INT8)
    raise ValueError(f"unknown recipe preset {name!r}; expected one of {', '.join(PRESETS)}, int4-g<N> "
                     "or int8-g<N>")


def load_recipe(name_or_path: str) -> Recipe:
    """A preset name, or the path of a recipe JSON file (`Recipe.to_json`). Bad input raises ValueError."""
    from pathlib import Path

    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        path = Path(name_or_path)
        try:
            return Recipe.from_json(path.read_text())
        except OSError as e:
            raise ValueError(f"{path}: cannot read recipe ({e.strerror})") from None
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: {e}") from None
    return preset(name_or_path)
