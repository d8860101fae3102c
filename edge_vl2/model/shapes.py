"""The official checkpoint's tensor names and shapes, derived from a config (model-facts §2.3, §4.2, §8).

One table serves the strict loader (missing / extra / misshaped tensors are errors naming the tensor), the synthetic
checkpoint writer and the parameter-count tests.
"""

from __future__ import annotations

from .config import LanguageConfig, VisionConfig, VL2Config


def vision_shapes(v: VisionConfig, prefix: str = "vision.") -> dict[str, tuple[int, ...]]:
    """timm-named SigLIP tower, including the stored-but-unused attention-pool head."""
    w, m, p = v.width, v.mlp_hidden, v.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (w, 3, p, p), "patch_embed.proj.bias": (w,),
        "pos_embed": (1, v.grid * v.grid, w),
        "norm.weight": (w,), "norm.bias": (w,),
    }
    for i in range(v.layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
            b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
            b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "mlp.fc1.weight": (m, w), b + "mlp.fc1.bias": (m,),
            b + "mlp.fc2.weight": (w, m), b + "mlp.fc2.bias": (w,),
        })
    shapes.update({  # timm AttentionPoolLatent: built and stored, never executed (ignore_head)
        "attn_pool.latent": (1, 1, w),
        "attn_pool.q.weight": (w, w), "attn_pool.q.bias": (w,),
        "attn_pool.kv.weight": (2 * w, w), "attn_pool.kv.bias": (2 * w,),
        "attn_pool.proj.weight": (w, w), "attn_pool.proj.bias": (w,),
        "attn_pool.norm.weight": (w,), "attn_pool.norm.bias": (w,),
        "attn_pool.mlp.fc1.weight": (m, w), "attn_pool.mlp.fc1.bias": (m,),
        "attn_pool.mlp.fc2.weight": (w, m), "attn_pool.mlp.fc2.bias": (w,),
    })
    return {prefix + k: s for k, s in shapes.items()}


def _mlp(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def language_shapes(c: LanguageConfig, prefix: str = "language.") -> dict[str, tuple[int, ...]]:
    """DeepSeek-MoE decoder with either LlamaAttention-style q/k/v/o (Tiny) or MLA projections."""
    h = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (c.vocab_size, h),
    }
    for i in range(c.num_hidden_layers):
        b = f"model.layers.{i}."
        shapes[b + "input_layernorm.weight"] = (h,)
        shapes[b + "post_attention_layernorm.weight"] = (h,)
        a = b + "self_attn."
        if c.use_mla:
            n = c.num_attention_heads
            shapes.update({
                a + "q_proj.weight": (n * c.qk_head_dim, h),
                a + "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, h),
                a + "kv_a_layernorm.weight": (c.kv_lora_rank,),
                a + "kv_b_proj.weight": (n * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                a + "o_proj.weight": (h, n * c.v_head_dim),
            })
        else:
            kv = c.num_key_value_heads * c.head_dim
            shapes.update({a + "q_proj.weight": (h, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                           a + "o_proj.weight": (h, h)})
        if c.is_moe_layer(i):
            shapes[b + "mlp.gate.weight"] = (c.n_routed_experts, h)
            if c.topk_method == "noaux_tc":
                shapes[b + "mlp.gate.e_score_correction_bias"] = (c.n_routed_experts,)
            for e in range(c.n_routed_experts):
                shapes.update(_mlp(f"{b}mlp.experts.{e}.", h, c.moe_intermediate_size))
            shapes.update(_mlp(b + "mlp.shared_experts.", h, c.moe_intermediate_size * c.n_shared_experts))
        else:
            shapes.update(_mlp(b + "mlp.", h, c.intermediate_size))
    return {prefix + k: s for k, s in shapes.items()}


def projector_shapes(cfg: VL2Config) -> dict[str, tuple[int, ...]]:
    p = cfg.projector
    d_in = p.input_dim * p.downsample_ratio ** 2
    d_mid = p.n_embed * p.mlp_ratio
    shapes = {"projector.layers.0.weight": (d_mid, d_in), "projector.layers.0.bias": (d_mid,)}
    for k in range(1, p.depth - 1):  # official: extra [GELU, Linear] pairs for depth > 2
        shapes.update({f"projector.layers.{2 * k}.weight": (d_mid, d_mid), f"projector.layers.{2 * k}.bias": (d_mid,)})
    last = 2 * (p.depth - 1)
    shapes.update({f"projector.layers.{last}.weight": (p.n_embed, d_mid), f"projector.layers.{last}.bias": (p.n_embed,)})
    return shapes


def checkpoint_shapes(cfg: VL2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint for this config, name -> shape."""
    shapes = vision_shapes(cfg.vision)
    shapes.update(projector_shapes(cfg))
    shapes.update(language_shapes(cfg.language))
    shapes["image_newline"] = (cfg.projector.n_embed,)
    shapes["view_seperator"] = (cfg.projector.n_embed,)  # sic: the checkpoint's spelling
    return shapes


def parameter_count(cfg: VL2Config) -> int:
    total = 0
    for shape in checkpoint_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
