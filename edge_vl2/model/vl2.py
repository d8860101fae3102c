"""DeepSeek-VL2 in plain PyTorch: vision tower + projector + image layout + MoE decoder, and its strict loader.

The model is built on the meta device and its parameters are assigned from the memory-mapped checkpoint through a
short declarative table: names match the checkpoint except for two named transforms (stack routed experts, split
`kv_b_proj` into per-head W_UK / W_UV).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointReader, open_checkpoint
from .config import VL2Config
from .decoder import LanguageModel
from .vision import Projector, SiglipTower, layout_image


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: VL2Config, with_vision: bool = True):
        """`with_vision=False` builds only the decoder side, for bundles whose tower runs in ONNX Runtime."""
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipTower(cfg.vision) if with_vision else None
        self.projector = Projector(cfg.projector) if with_vision else None
        self.image_newline = nn.Parameter(torch.empty(cfg.projector.n_embed))
        self.view_seperator = nn.Parameter(torch.empty(cfg.projector.n_embed))  # sic: checkpoint spelling
        self.language = LanguageModel(cfg.language)

    @property
    def dtype(self) -> torch.dtype:
        return self.language.lm_head.weight.dtype

    @torch.inference_mode()
    def encode_tiles(self, pixel_values: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """Normalised tiles [N, 3, 384, 384] -> projector output [N, 196, H] in the decoder's dtype."""
        vision_dtype = self.vision.pos_embed.dtype
        out = []
        for chunk in pixel_values.split(batch):
            feats = self.vision(chunk.to(vision_dtype))
            out.append(self.projector(feats.to(self.projector.layers[0].weight.dtype)).to(self.dtype))
        return torch.cat(out) if out else pixel_values.new_zeros(0, 0, self.cfg.projector.n_embed, dtype=self.dtype)

    def image_embeddings(self, tile_embeds: torch.Tensor, spatial_crop: torch.Tensor) -> torch.Tensor:
        """Per-tile embeddings of all images -> the vectors for every `<image>` position, in order."""
        parts, tile = [], 0
        for tw, th in spatial_crop.tolist():
            if tw == 0 or th == 0:
                break
            n = 1 + tw * th
            parts.append(layout_image(tile_embeds[tile:tile + n], tw, th, self.image_newline.to(self.dtype),
                                      self.view_seperator.to(self.dtype), self.cfg.global_view_pos == "head"))
            tile += n
        return torch.cat(parts) if parts else tile_embeds.new_zeros(0, self.cfg.projector.n_embed)

    @torch.inference_mode()
    def input_embeddings(self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor, pixel_values: torch.Tensor,
                         spatial_crop: torch.Tensor, tile_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [T, H] with the image vectors scattered into the `<image>` positions."""
        embeds = self.language.model.embed_tokens(input_ids)
        if pixel_values.shape[0] == 0:
            return embeds
        if tile_embeds is None:
            if self.vision is None:
                raise ValueError("this model has no vision tower: pass tile_embeds from the ONNX vision graph")
            tile_embeds = self.encode_tiles(pixel_values)
        image = self.image_embeddings(tile_embeds, spatial_crop)
        if image.shape[0] != int(images_seq_mask.sum()):
            raise ValueError(f"{image.shape[0]} image vectors for {int(images_seq_mask.sum())} image positions")
        embeds = embeds.clone()
        embeds[images_seq_mask] = image
        return embeds


# --- loading ----------------------------------------------------------------------------------------------------

def _stack_experts(reader: CheckpointReader, m: re.Match, cfg: VL2Config) -> torch.Tensor:
    prefix, proj = m.group(1), m.group(2)
    return torch.stack([reader.get(f"{prefix}.{e}.{proj}.weight") for e in range(cfg.language.n_routed_experts)])


def _split_kv_b(reader: CheckpointReader, m: re.Match, cfg: VL2Config) -> torch.Tensor:
    c = cfg.language
    w = reader.get(f"{m.group(1)}.kv_b_proj.weight").view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                                          c.kv_lora_rank)
    return w[:, :c.qk_nope_head_dim] if m.group(2) == "w_uk" else w[:, c.qk_nope_head_dim:]


# module parameter name pattern -> how to build it from checkpoint tensors; anything else has the checkpoint's name
TRANSFORMS: list[tuple[re.Pattern, Callable]] = [
    (re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$"), _stack_experts),
    (re.compile(r"^(.*\.self_attn)\.(w_uk|w_uv)$"), _split_kv_b),
]


def source_tensor(reader: CheckpointReader, name: str, cfg: VL2Config) -> torch.Tensor:
    for pattern, build in TRANSFORMS:
        m = pattern.match(name)
        if m:
            return build(reader, m, cfg)
    return reader.get(name)


def load_model(model: str | Path, dtype: torch.dtype = torch.bfloat16, vision_dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> tuple[DeepseekVL2, Path]:
    """Read an official checkpoint folder (or Hub id) strictly and return the model in eval mode.

    `vision_dtype` defaults to `dtype`; on a CPU without fast bf16 matmuls, fp32 vision is much faster.
    """
    model_dir, cfg, reader = open_checkpoint(model)
    with torch.device("meta"):
        vl2 = DeepseekVL2(cfg)
    vision_names = {n for n, _ in vl2.named_parameters() if n.startswith(("vision.", "projector."))}
    state = {}
    for name, param in vl2.named_parameters():
        tensor = source_tensor(reader, name, cfg)
        if tuple(tensor.shape) != tuple(param.shape):  # a transform met a shape config.json did not imply
            raise ValueError(f"{name}: built {list(tensor.shape)}, expected {list(param.shape)}")
        target = (vision_dtype or dtype) if name in vision_names else dtype
        state[name] = nn.Parameter(tensor.to(device=device, dtype=target), requires_grad=False)
    vl2.load_state_dict(state, strict=True, assign=True)
    return vl2.eval(), model_dir
