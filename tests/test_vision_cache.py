"""The vision cache: cached embeddings are the encoder's own (bit for bit), a repeated image never reaches the tower,
the key changes with the tiling and the encoder, and the LRU stays within its size. Reference mode on the official
fixture checkpoint (PyTorch tower, fp32), counting what the real tower is asked to encode."""

import pytest
import torch
from PIL import Image

from edge_vl2.errors import UserError
from edge_vl2.pipeline import VL2Pipeline
from edge_vl2.vision_cache import VisionCache, image_spans, tiles_digest

from conftest import IMAGES, TINY_LIKE

A, B = IMAGES / "monday.jpg", IMAGES / "visual_grounding_1.jpeg"


class CountingEncoder:
    """The real tower, plus a count of the tiles it was given (what the cache must avoid)."""

    def __init__(self, encode):
        self.encode, self.calls, self.tiles = encode, 0, 0

    def __call__(self, pixels):
        self.calls += 1
        self.tiles += pixels.shape[0]
        return self.encode(pixels)


@pytest.fixture(scope="module")
def vl2():
    return VL2Pipeline.from_pretrained(TINY_LIKE, dtype="fp32")


@pytest.fixture
def counted(vl2):
    original = vl2.tile_encoder
    vl2.tile_encoder = counter = CountingEncoder(original)
    vl2.enable_vision_cache(64)
    yield vl2, counter
    vl2.tile_encoder, vl2.vision_cache = original, None


def test_a_repeated_image_skips_the_tower_and_gives_the_same_embeddings(counted):
    vl2, counter = counted
    first = vl2.prepare("<image>\nWhat is this?", [A])
    fresh = vl2.model.input_embeddings(first.input_ids, first.images_seq_mask, first.pixel_values,
                                       first.images_spatial_crop)  # no cache involved
    stats: dict = {}
    assert vl2.embeddings(first, stats).equal(fresh)
    assert counter.tiles == first.pixel_values.shape[0] and stats["vision_tiles_cached"] == 0
    second = vl2.prepare("<image>\nAnd what colour is it?", [Image.open(A)])  # same pixels, another question
    stats = {}
    assert vl2.embeddings(second, stats)[second.images_seq_mask].equal(fresh[first.images_seq_mask])
    assert counter.calls == 1, "the second question reached the vision tower"
    assert stats["vision_tiles"] == stats["vision_tiles_cached"] == second.pixel_values.shape[0]
    timings: dict = {}
    next(vl2.tokens(second, timings=timings))
    assert counter.calls == 1 and timings["vision_tiles_cached"] == timings["vision_tiles"]


def test_only_the_new_image_is_encoded(counted):
    vl2, counter = counted
    vl2.embeddings(vl2.prepare("<image>\nOne.", [A]))
    before = counter.tiles
    both = vl2.prepare("<image><image>\nTwo.", [A, B])
    stats: dict = {}
    vl2.embeddings(both, stats)
    spans = image_spans(both.images_spatial_crop)
    assert counter.tiles - before == spans[1] and stats["vision_tiles_cached"] == spans[0]


def test_the_key_follows_the_tiling_and_the_encoder(counted):
    """With three images the official processor does not tile: the same photo is other tiles, so a miss."""
    vl2, counter = counted
    vl2.embeddings(vl2.prepare("<image>\nOne.", [A]))
    stats: dict = {}
    vl2.embeddings(vl2.prepare("<image><image><image>\nThree.", [A, B, A]), stats)
    assert stats["vision_tiles_cached"] == 2  # A untiled is global + one tile: encoded once, reused once
    cache = VisionCache(64)
    pixels = vl2.prepare("<image>\nOne.", [A])
    calls = []

    def enc(p):
        calls.append(p.shape[0])
        return torch.zeros(p.shape[0], 2, 2)

    for encoder_id in ("vision-int8.onnx", "vision-fp16.onnx", "vision-int8.onnx"):
        cache.encode(pixels.pixel_values, pixels.images_spatial_crop, enc, encoder_id)
    assert len(calls) == 2


def test_lru_stays_within_its_size():
    cache = VisionCache(limit_mb=1)
    crop = torch.tensor([[1, 1]])
    encoded = []

    def enc(p):
        encoded.append(float(p[0, 0, 0, 0]))
        return torch.zeros(p.shape[0], 128, 128)  # 2 tiles x 64 KB: 128 KB per image

    for i in [*range(10), 9, 0]:
        cache.encode(torch.full((2, 3, 8, 8), float(i)), crop, enc, "enc")
    stats = cache.stats()
    assert stats.bytes <= 2**20 and stats.entries == 8
    assert encoded == [*map(float, range(10)), 0.0]  # 9 was still there; 0 had been evicted (least recent)
    assert stats.hits == 1 and stats.misses == 11


def test_digest_depends_on_every_value():
    t = torch.zeros(2, 3, 4, 4)
    u = t.clone()
    u[1, 2, 3, 3] = 1e-7
    assert tiles_digest(t) != tiles_digest(u) and tiles_digest(t) == tiles_digest(t.clone())
    assert tiles_digest(t) != tiles_digest(t.reshape(1, 6, 4, 4))


@pytest.mark.parametrize("size", [-1, float("nan"), float("inf"), "64", True])
def test_a_bad_size_is_one_clear_error(size):
    with pytest.raises(UserError, match="vision cache size"):
        VisionCache(size)
