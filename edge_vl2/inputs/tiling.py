"""Dynamic tiling, as the official processor does it: which grid an image gets, its tiles, its image-token count."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserError

if TYPE_CHECKING:
    from .processor import ProcessorConfig

# (width, height) pairs of the official processor_config.json, in its order (model-facts §3.2): every 384*m x 384*n
# with m*n <= 9. Checkpoints carry their own list; this one is for tools that need the official tiling without one.
OFFICIAL_CANDIDATE_RESOLUTIONS = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
)


def select_best_resolution(size: tuple[int, int], candidates) -> tuple[int, int]:
    """The official anyres rule (model-facts §3.3): the (W, H) candidate with the largest effective resolution after an
    aspect-preserving fit; ties go to the least wasted area, then to the first in list order."""
    w0, h0 = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in candidates:
        s = min(w / w0, h / h0)
        eff = min(int(w0 * s) * int(h0 * s), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    if best is None:
        raise UserError(f"no candidate resolution fits an image of size {w0}x{h0}")
    return best


def num_image_tokens(tw: int, th: int, image_size: int = 384, patch: int = 14, downsample: int = 2) -> int:
    """`<image>` positions for one image tiled tw x th (model-facts §4.4): global grid with a newline after each row,
    one view separator, then the stitched local grid with a newline after each row."""
    h = w = math.ceil((image_size // patch) / downsample)  # 14 for 384/14/2
    return h * (w + 1) + 1 + (th * h) * (tw * w + 1)


def tile_image(image: Image.Image, cfg: "ProcessorConfig", cropping: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tiles of one RGB image: [1 + tw*th, 3, S, S] float32 (global view first, then the local grid in raster order,
    each padded with the configured grey and normalised) and the grid (tw, th)."""
    S = cfg.image_size
    bw, bh = select_best_resolution(image.size, cfg.candidate_resolutions) if cropping else (S, S)
    global_view = ImageOps.pad(image, (S, S), color=cfg.pad_color)
    local_view = ImageOps.pad(image, (bw, bh), color=cfg.pad_color)
    tw, th = bw // S, bh // S
    g = torch.from_numpy(np.asarray(global_view, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, S, S]
    loc = torch.from_numpy(np.asarray(local_view, dtype=np.uint8).copy())  # [bh, bw, 3]
    # Raster order, like crop((j, i, j+S, i+S)) for i over rows, j over columns.
    loc = loc.view(th, S, tw, S, 3).permute(0, 2, 4, 1, 3).reshape(th * tw, 3, S, S)
    tiles = torch.cat([g.unsqueeze(0), loc], 0).to(torch.float32).div(255)  # ToTensor
    if cfg.normalize:  # torchvision Normalize: sub then div, float32
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        tiles = tiles.sub(mean).div(std)
    return tiles, (tw, th)
