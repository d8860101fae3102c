"""`config.json` dicts for synthetic checkpoints, shaped exactly like the official ones (model-facts §1, §2.1, §4.1, §5).

`full` reproduces the real sparse configs key for key: a key the official config leaves out (small's `use_mla`,
`bos_token_id`; base's `num_hidden_layers`) is left out here too, so the synthetic checkpoints exercise the same
default handling as the real ones. `test` keeps the structure, the real vocabulary sizes and special-token ids (so
the tokenizer is the real one's shape) but shrinks every other dimension so a whole checkpoint is a few tens of MB.
"""

from __future__ import annotations

import copy

from ...inputs.tiling import OFFICIAL_CANDIDATE_RESOLUTIONS

VARIANTS = ("tiny", "small", "base")
SIZES = ("test", "full")

CANDIDATE_RESOLUTIONS = OFFICIAL_CANDIDATE_RESOLUTIONS

_VISION_FULL = {"layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
                "patch_size": 14, "width": 1152}
# Test tower: real 384/14 geometry (27x27 patches, 196 tokens per tile), narrow and shallow. `heads` is explicit
# because the official default (16) does not divide 144 -- the official fixture does the same.
_VISION_TEST = {**_VISION_FULL, "layers": 2, "width": 144, "heads": 2}

_LANGUAGE_COMMON = {"architectures": ["DeepseekV2ForCausalLM"], "first_k_dense_replace": 1,
                    "max_position_embeddings": 4096, "model_type": "deepseek_v2", "n_group": 1, "n_shared_experts": 2,
                    "num_experts_per_tok": 6, "q_lora_rank": None, "topk_group": 1, "torch_dtype": "bfloat16"}

_LANGUAGE_FULL = {
    # Plain multi-head attention: the MLA fields are present and null/0 (sglang #5537 crashes on exactly this).
    "tiny": {**_LANGUAGE_COMMON, "bos_token_id": 0, "eos_token_id": 1, "hidden_size": 1280, "intermediate_size": 6848,
             "kv_lora_rank": None, "lm_head": True, "moe_intermediate_size": 896, "n_routed_experts": 64,
             "num_attention_heads": 10, "num_hidden_layers": 12, "num_key_value_heads": 10, "qk_nope_head_dim": 0,
             "qk_rope_head_dim": 0, "rm_head": False, "topk_method": "greedy", "use_mla": False, "v_head_dim": 0,
             "vocab_size": 129280},
    # MLA by default (use_mla absent); no bos/eos keys -> DeepSeek-V2 defaults 100000/100001.
    "small": {**_LANGUAGE_COMMON, "hidden_size": 2048, "intermediate_size": 10944, "lm_head": True,
              "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_attention_heads": 16,
              "num_hidden_layers": 27, "num_key_value_heads": 16, "rm_head": False, "topk_method": "greedy",
              "vocab_size": 102400},
    # Verbatim key set of the published base config: layers/heads come from the defaults (30/32), and it is the
    # only view of a real config that shows `auto_map`.
    "base": {**_LANGUAGE_COMMON, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                                              "AutoModel": "modeling_deepseek.DeepseekV2Model",
                                              "AutoModelForCausalLM": "modeling_deepseek.CustomDeepseekV2ForCausalLM"},
             "bos_token_id": 0, "eos_token_id": 1, "hidden_size": 2560, "intermediate_size": 12288, "lm_head": False,
             "moe_intermediate_size": 1536, "n_routed_experts": 72, "norm_topk_prob": True, "rm_head": False,
             "routed_scaling_factor": 2.0, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "vocab_size": 129280},
}

# Test dimensions: layer 0 dense, layers 1-2 MoE with 8 experts top-3 (+2 shared), 4 heads over hidden 64.
_LANGUAGE_TEST = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 3}
# The MLA dims differ from the defaults (512/128/64/128), so the test configs must state them.
_MLA_TEST = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
_LANGUAGE_TEST_EXTRA = {"tiny": {"num_key_value_heads": 4}, "small": {"num_key_value_heads": 4, **_MLA_TEST},
                        "base": dict(_MLA_TEST)}


def synthetic_config(variant: str, size: str) -> dict:
    """The complete `config.json` dict of a synthetic `variant` checkpoint ("tiny"/"small"/"base") at `size`
    ("full": the real dimensions, "test": tiny dimensions with the real vocabulary and special-token ids)."""
    if variant not in VARIANTS or size not in SIZES:
        raise ValueError(f"unknown variant/size {variant!r}/{size!r}; expected one of {VARIANTS} / {SIZES}")
    language = copy.deepcopy(_LANGUAGE_FULL[variant])
    vision = dict(_VISION_FULL)
    if size == "test":
        language.update(_LANGUAGE_TEST, **_LANGUAGE_TEST_EXTRA[variant])
        vision = dict(_VISION_TEST)
    projector = {"model_type": "mlp_projector", "n_embed": language["hidden_size"]}
    if vision["width"] != _VISION_FULL["width"]:
        projector["input_dim"] = vision["width"]  # the official default input_dim is 1152
    return {
        "candidate_resolutions": [list(r) for r in CANDIDATE_RESOLUTIONS],
        "global_view_pos": "head",
        "language_config": language,
        "model_type": "deepseek_vl_v2",
        "projector_config": projector,
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": vision,
    }
