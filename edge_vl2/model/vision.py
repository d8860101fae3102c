"""SigLIP-SO400M tower, the downsample-MLP projector and the 2D image-token layout (model-facts §2, §4).

Module and parameter names follow the checkpoint (timm naming under `vision.`, `projector.layers.{0,2}`), so weights
load by name. The attention-pool head stored under `vision.attn_pool` is never run (official `ignore_head`), so it
is not built here; the loader still checks it is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig, VisionConfig


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        # fused qkv laid out as [q | k | v], each split into heads in order
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # [N, h, T, d]
        out = F.scaled_dot_product_attention(q, k, v)  # full, non-causal; scale 1/sqrt(d)
        return self.proj(out.transpose(1, 2).reshape(n, t, w))


class SiglipMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP uses the tanh GELU


class SiglipBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = SiglipAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = SiglipMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [N, 729, W], row-major patches


class SiglipTower(nn.Module):
    """pixels [N, 3, 384, 384] -> features [N, 729, W] (last block + final LayerNorm; no pooling)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """features [N, 729, C] -> [N, 196, n_embed]: zero-pad 27->28, 2x2 unfold (channel-major), MLP with GELU."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        d_in, d_mid = cfg.input_dim * cfg.downsample_ratio ** 2, cfg.n_embed * cfg.mlp_ratio
        layers: list[nn.Module] = [nn.Linear(d_in, d_mid)]
        for _ in range(1, cfg.depth - 1):
            layers += [nn.GELU(), nn.Linear(d_mid, d_mid)]
        layers += [nn.GELU(), nn.Linear(d_mid, cfg.n_embed)]  # exact (erf) GELU here, unlike the tower
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, hw, c = x.shape
        side = int(hw ** 0.5)
        pad = (-side) % self.ratio
        x = x.view(n, side, side, c)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # one zero row at the bottom, one column at the right
        x = x.permute(0, 3, 1, 2)  # [N, C, 28, 28]
        # unfold gives index c*4 + (dy*2 + dx): the 4 positions of one channel are adjacent
        x = F.unfold(x, kernel_size=self.ratio, stride=self.ratio).transpose(1, 2)  # [N, 196, 4C]
        return self.layers(x)


def layout_image(tiles: torch.Tensor, width_tiles: int, height_tiles: int, newline: torch.Tensor,
                 separator: torch.Tensor, global_first: bool = True) -> torch.Tensor:
    """One image's token vectors: global 14x14 grid + newlines, separator, stitched local canvas + newlines.

    tiles: [1 + th*tw, 196, D] projector output (global tile first, then local tiles in raster order).
    Returns [211 + 14*th*(14*tw + 1), D].
    """
    _, hw, d = tiles.shape
    side = int(hw ** 0.5)
    glob = torch.cat([tiles[0].view(side, side, d), newline.expand(side, 1, d)], dim=1).reshape(-1, d)
    local = tiles[1:].view(height_tiles, width_tiles, side, side, d)
    local = local.permute(0, 2, 1, 3, 4).reshape(height_tiles * side, width_tiles * side, d)  # (th h) (tw w) d
    local = torch.cat([local, newline.expand(height_tiles * side, 1, d)], dim=1).reshape(-1, d)
    parts = [glob, separator.view(1, d), local] if global_first else [local, separator.view(1, d), glob]
    return torch.cat(parts, dim=0)
