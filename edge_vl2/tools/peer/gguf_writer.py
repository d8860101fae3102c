"""Write the DeepSeek-VL2 Tiny decoder as a llama.cpp GGUF (architecture `deepseek`, DeepSeek-MoE v1).

Only the language model goes in (vision, projector and the layout vectors stay ours): the GGUF is a peer of our
decoder for comparisons on token sequences, not a runnable VL2. Tiny's decoder is exactly llama.cpp's `deepseek`
graph: plain multi-head attention with RoPE, a dense first layer, then softmax top-k MoE (no renormalisation, scale
1) plus shared experts (model-facts §5, §7.3, §7.5). Small/base use MLA, which is llama.cpp's `deepseek2`; not written.

Two transforms, everything else is a rename (TENSORS):
- q/k rows are permuted per head from rotate-half pairs (j, j + d/2), our RoPE (`layers.rope_rotate_half`), to the
  adjacent pairs (2j, 2j + 1) of llama.cpp's NORM rope for this architecture. Scores q·k are unchanged because q and k
  are permuted alike, so logits match without touching anything else.
- routed experts are stacked per projection into [E, out, in] (`ffn_{gate,up,down}_exps`).
The router (`ffn_gate_inp`) and the norms stay F32 whatever the storage type (llama.cpp's quantizer keeps them so
too). Tensors are streamed: header and tensor infos first, then one tensor at a time, so memory is one tensor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...errors import UserError
from ...model.checkpoint import CheckpointReader, open_checkpoint
from ...model.config import LanguageConfig

ARCH = "deepseek"
STORAGE = ("f32", "f16", "bf16")
TOKENIZER_PRE = "deepseek-v3"  # the DeepSeek-V3-family split regex our tokenizer.json carries (model-facts §6.1)
LM = "language.model.layers"

# checkpoint name (under `language.`) -> GGUF name; {i} = layer. Experts and q/k are handled by named transforms.
TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.mlp.gate.weight": "blk.{i}.ffn_gate_inp.weight",
    "model.layers.{i}.mlp.shared_experts.gate_proj.weight": "blk.{i}.ffn_gate_shexp.weight",
    "model.layers.{i}.mlp.shared_experts.up_proj.weight": "blk.{i}.ffn_up_shexp.weight",
    "model.layers.{i}.mlp.shared_experts.down_proj.weight": "blk.{i}.ffn_down_shexp.weight",
}
EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
ALWAYS_F32 = re.compile(r"(norm\.weight|ffn_gate_inp\.weight)$")


@dataclass(frozen=True)
class GGUFResult:
    path: Path
    storage: str
    n_tensors: int
    bytes: int


def permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q_proj/k_proj [heads * d, in]: within each head, row j -> 2j and row j + d/2 -> 2j + 1 (rotate-half
    pairs become adjacent pairs)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def _ggml_type(gguf_name: str, storage: str):
    import gguf

    if storage == "f32" or ALWAYS_F32.search(gguf_name):
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.F16 if storage == "f16" else gguf.GGMLQuantizationType.BF16


def _as_numpy(t: torch.Tensor, gtype) -> np.ndarray:
    import gguf

    if gtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if gtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.float32).contiguous().numpy()


def tensor_plan(cfg: LanguageConfig, reader: CheckpointReader) -> list[tuple[str, tuple[int, ...], Callable]]:
    """(GGUF name, torch shape, maker) in file order; makers read the checkpoint lazily."""
    get = reader.get
    plan = []

    def add(src: str, dst: str, transform: Callable = lambda t: t):
        plan.append((dst, tuple(reader.shapes[f"language.{src}"]), lambda: transform(get(f"language.{src}"))))

    add("model.embed_tokens.weight", "token_embd.weight")
    for i in range(cfg.num_hidden_layers):
        for src, dst in TENSORS.items():
            if "{i}" not in src or f"language.{src.format(i=i)}" not in reader.shapes:
                continue
            heads = cfg.num_attention_heads if "q_proj" in src else cfg.num_key_value_heads
            rope = "q_proj" in src or "k_proj" in src
            add(src.format(i=i), dst.format(i=i), (lambda t, h=heads: permute_rope_rows(t, h)) if rope else
                (lambda t: t))
        if cfg.is_moe_layer(i):
            for proj, dst in EXPERT_GGUF.items():
                names = [f"{LM}.{i}.mlp.experts.{e}.{proj}.weight" for e in range(cfg.n_routed_experts)]
                shape = (cfg.n_routed_experts, *reader.shapes[names[0]])
                plan.append((f"blk.{i}.{dst}.weight", shape, lambda n=names: torch.stack([get(x) for x in n])))
    add("model.norm.weight", "output_norm.weight")
    add("lm_head.weight", "output.weight")
    return plan


def _check_consumed(reader: CheckpointReader, cfg: LanguageConfig) -> None:
    """Strict: every `language.` tensor of the checkpoint is written (the rest is vision, not the decoder's)."""
    known = {f"language.{s}" for s in TENSORS if "{i}" not in s}
    for i in range(cfg.num_hidden_layers):
        known |= {f"language.{s.format(i=i)}" for s in TENSORS if "{i}" in s}
        known |= {f"{LM}.{i}.mlp.experts.{e}.{p}.weight" for e in range(cfg.n_routed_experts) for p in EXPERT_GGUF}
    extra = [n for n in reader.shapes if n.startswith("language.") and n not in known]
    if extra:
        raise UserError(f"{reader.dir}: decoder tensor {extra[0]!r} has no GGUF name")


def _add_hparams(w, cfg: LanguageConfig, storage: str) -> None:
    import gguf

    w.add_name("deepseek-vl2-tiny decoder (edge-vl2 peer export)")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[storage]
    w.add_file_type(ftype)


def vocab_from_tokenizer_json(path: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict]:
    """tokens, token types, merges ("a b") and added tokens {content: id} of a byte-level BPE `tokenizer.json`,
    padded to the embedding's `vocab_size` with unused `[PAD{i}]` entries as llama.cpp's converter does."""
    import gguf

    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r} is not byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    added = {}
    for a in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        by_id[a["id"]] = (a["content"], kind)
        added[a["content"]] = a["id"]
    if max(by_id) >= vocab_size:
        raise UserError(f"{path}: token id {max(by_id)} does not fit the embedding's {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        tok, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, added


def _add_tokenizer(w, model_dir: Path, cfg: LanguageConfig) -> None:
    tokens, types, merges, added = vocab_from_tokenizer_json(model_dir / "tokenizer.json", cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    pad = next((i for t, i in added.items() if "pad" in t), None)
    if pad is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(True)  # the tokenizer's TemplateProcessing prepends bos
    w.add_add_eos_token(False)


def write_gguf(model: str | Path, out: str | Path, storage: str = "f32") -> GGUFResult:
    """Write the decoder of a Tiny checkpoint folder `model` to the GGUF file `out` in `storage` (f32, f16 or bf16;
    norms and router always F32). Written to `out.partial` and renamed when complete."""
    import gguf

    if storage not in STORAGE:
        raise UserError(f"unknown GGUF storage {storage!r}; expected one of {', '.join(STORAGE)}")
    model_dir, vl2_cfg, reader = open_checkpoint(model)
    cfg = vl2_cfg.language
    if cfg.use_mla:
        raise UserError(f"{model_dir}: MLA decoders (Small, base) map to llama.cpp's deepseek2; only Tiny "
                        "(plain attention, llama.cpp 'deepseek') is written")
    _check_consumed(reader, cfg)
    plan = tensor_plan(cfg, reader)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(partial, ARCH)
    _add_hparams(w, cfg, storage)
    _add_tokenizer(w, model_dir, cfg)
    for name, shape, _ in plan:
        gtype = _ggml_type(name, storage)
        itemsize = 4 if gtype == gguf.GGMLQuantizationType.F32 else 2
        np_dtype = {4: np.float32, 2: np.float16 if storage == "f16" else np.uint16}[itemsize]
        w.add_tensor_info(name, shape, np.dtype(np_dtype), int(np.prod(shape)) * itemsize,
                          raw_dtype=gtype if gtype == gguf.GGMLQuantizationType.BF16 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, make in plan:
        t = make()
        if tuple(t.shape) != shape:
            raise AssertionError(f"{name}: made {tuple(t.shape)}, planned {shape}")
        w.write_tensor_data(_as_numpy(t, _ggml_type(name, storage)))
    w.close()
    os.replace(partial, out)
    return GGUFResult(out, storage, len(plan), out.stat().st_size)
