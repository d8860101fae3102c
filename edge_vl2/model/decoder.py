"""The DeepSeek-MoE language model: embeddings, decoder layers, final norm, untied lm_head (model-facts §7).

Names follow the checkpoint under `language.` (`model.layers.{i}.self_attn`, `.mlp.gate`, `.mlp.shared_experts`...).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MLAttention, MultiHeadAttention
from .cache import StaticCache
from .config import LanguageConfig
from .layers import Linear, RMSNorm, SwiGLU
from .moe import MoE


class DecoderLayer(nn.Module):
    """h = x + Attn(norm(x)); y = h + FFN(norm(h)); FFN is dense for the first layers, MoE after."""

    def __init__(self, cfg: LanguageConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg) if cfg.use_mla else MultiHeadAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """Hidden states for positions start..start+S-1 of one sequence, reading and writing a StaticCache."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, cache: StaticCache | None = None, start: int | None = None) -> torch.Tensor:
        """embeds [S, H] -> final-normed hidden states [S, H]. Without a cache: one causal pass from position 0."""
        if cache is not None:
            start = cache.length if start is None else start
            cache.check_room(embeds.shape[0])
        start = start or 0
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, start, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length = start + embeds.shape[0]
        return self.model.norm(x)

    def step(self, embeds: torch.Tensor, pos: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """The static-shape form of `forward` for S tokens at device positions pos.. (pos: [1] int64 on the model's
        device): the same shapes and no host sync at every position, so a CUDA graph can capture it. The caller
        tracks `cache.length` (this never reads `pos` back)."""
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, pos, cache.layers[i])
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
