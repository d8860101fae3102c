"""Encoded image tiles kept between requests, so a second question about the same photo skips the vision tower.

On a CPU kiosk the vision tower is most of the time to first token (seconds per tile), and a conversation or a
client asks several questions about one photo. `VisionCache` keeps each image's projector output [tiles, 196, H]
keyed by

- the sha256 of that image's normalised tiles: the tiles are a function of the image's pixels and of its tiling
  (the grid the processor chose, which a device profile's tile cap and the official "<= 2 images" rule change), so
  one digest covers "same image bytes, same tiling" whatever the file name or how the image arrived, and
- the encoder's identity (the bundle's vision graph and precision, or the PyTorch tower and its dtype),

and evicts the least recently used images when the total passes its size in MB. One cache belongs to one
`VL2Pipeline` (`vl2.enable_vision_cache(mb)`); the server's requests and a chat's turns share it. Thread-safe.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError

DEFAULT_CACHE_MB = 256  # ~500 full-size Tiny tiles in bf16 (196 x 1280 x 2 bytes each)


@dataclass
class CacheStats:
    entries: int
    bytes: int
    limit_bytes: int
    hits: int  # images served from the cache
    misses: int  # images encoded

    def as_dict(self) -> dict:
        return {"entries": self.entries, "mb": round(self.bytes / 2**20, 2), "limit_mb": self.limit_bytes / 2**20,
                "hits": self.hits, "misses": self.misses}


def image_spans(spatial_crop: torch.Tensor) -> list[int]:
    """Tiles per image in `pixel_values` order: the global view plus the local grid (model-facts §3)."""
    return [1 + tw * th for tw, th in spatial_crop.tolist() if tw and th]


def tiles_digest(tiles: torch.Tensor) -> str:
    """sha256 of one image's tiles [n, 3, S, S] (float32, contiguous bytes) and their shape."""
    t = tiles.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class VisionCache:
    """LRU of per-image tile embeddings, bounded in bytes. `limit_mb=0` keeps nothing (every image is encoded)."""

    def __init__(self, limit_mb: float = DEFAULT_CACHE_MB):
        if isinstance(limit_mb, bool) or not isinstance(limit_mb, (int, float)) or not 0 <= limit_mb < math.inf:
            raise UserError(f"the vision cache size must be a number of MB >= 0, got {limit_mb!r}")
        self.limit_bytes = int(limit_mb * 2**20)
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    def encode(self, pixel_values: torch.Tensor, spatial_crop: torch.Tensor, encoder: Callable[[torch.Tensor],
               torch.Tensor], encoder_id: str, stats: dict | None = None) -> torch.Tensor:
        """Embeddings of all tiles [N, 196, H], encoding (in one call, each distinct image once) only the images the
        cache does not hold. `stats` gets `vision_tiles` (all) and `vision_tiles_cached` (not encoded) added."""
        spans = image_spans(spatial_crop)
        chunks = pixel_values.split(spans)
        keys = [(tiles_digest(c), encoder_id) for c in chunks]
        with self._lock:
            known = {k: self._get(k) for k in dict.fromkeys(keys)}
        todo = [k for k, v in known.items() if v is None]
        encoded_tiles = 0
        if todo:
            first = {k: keys.index(k) for k in todo}
            batch = encoder(torch.cat([chunks[first[k]] for k in todo]))
            for k, emb in zip(todo, batch.split([spans[first[k]] for k in todo])):
                known[k] = emb
                encoded_tiles += spans[first[k]]
                with self._lock:
                    self._put(k, emb)
        if stats is not None:
            stats["vision_tiles"] = stats.get("vision_tiles", 0) + sum(spans)
            stats["vision_tiles_cached"] = stats.get("vision_tiles_cached", 0) + sum(spans) - encoded_tiles
        return torch.cat([known[k] for k in keys])

    def _get(self, key):
        emb = self._entries.get(key)
        if emb is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return emb

    def _put(self, key, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.limit_bytes or key in self._entries:
            return
        emb = emb.clone()  # own the memory: a view would keep the whole batch's output alive
        self._entries[key] = emb
        self._bytes += size
        while self._bytes > self.limit_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self.limit_bytes, self._hits, self._misses)
