"""The Python API: one object holding processor + model, used by the CLI and by applications alike.

    vl2 = VL2Pipeline.from_pretrained("path/to/deepseek-vl2-tiny")
    inputs = vl2.prepare("<image>\\nDescribe this.", images=["photo.jpg"])
    inputs.input_ids, inputs.images_seq_mask, inputs.pixel_values, inputs.images_spatial_crop   # processor output
    logits = vl2.prompt_logits(inputs)                                                             # [T, vocab] fp32
    for piece in vl2.stream(inputs, SamplingParams(max_new_tokens=64)):                            # streamed text
        print(piece, end="")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .devices.profiles import DeviceProfile, check_fit, load_device
from .dtypes import resolve_dtypes
from .generate import SamplingParams, generate_tokens
from .inputs.grounding import parse_grounding
from .inputs.processor import Processor, ProcessorOutput
from .model.vl2 import DeepseekVL2, load_model
from .vision_cache import DEFAULT_CACHE_MB, VisionCache


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    boxes: list = field(default_factory=list)  # grounding boxes mapped to original-image pixels
    timings: dict = field(default_factory=dict)


class VL2Pipeline:
    """Processor + model for one checkpoint; every method works on a ProcessorOutput from `prepare`."""

    def __init__(self, model: DeepseekVL2, processor: Processor, model_dir: Path,
                 tile_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None, info: dict | None = None):
        """`tile_encoder` maps tiles [N, 3, 384, 384] to projector outputs [N, 196, H]; by default the model's own
        PyTorch tower (reference mode), for bundles the ONNX Runtime graph. `info` says what runs it (for /health
        and logs); its "vision" entry names the tile encoder for the vision cache's keys."""
        self.model, self.processor, self.model_dir = model, processor, model_dir
        self.tokenizer = processor.tokenizer
        self.tile_encoder = tile_encoder or model.encode_tiles
        self.info = dict(info or {"checkpoint": str(model_dir), "backend": "reference", "vision": "pytorch"})
        self.vision_cache: VisionCache | None = None

    def enable_vision_cache(self, limit_mb: float = DEFAULT_CACHE_MB) -> VisionCache:
        """Keep encoded images (LRU, `limit_mb`) so later prompts about the same image skip the vision tower."""
        self.vision_cache = VisionCache(limit_mb)
        return self.vision_cache

    @classmethod
    def from_pretrained(cls, model: str | Path, dtype: str = "auto", device: str = "cpu",
                        device_profile: str | DeviceProfile | None = None) -> "VL2Pipeline":
        """Reference mode: `model` is a local checkpoint folder in the official layout, or a Hub id (downloaded where
        a network exists). With `device_profile`, a model that cannot fit it is refused from its headers first."""
        decoder_dtype, vision_dtype = resolve_dtypes(dtype, device)
        if device_profile is not None:
            _check_reference_fit(model, device_profile, decoder_dtype, vision_dtype)
        vl2, model_dir = load_model(model, dtype=decoder_dtype, vision_dtype=vision_dtype, device=device)
        return cls(vl2, Processor.from_pretrained(model_dir), model_dir,
                   info={"checkpoint": str(model_dir), "variant": vl2.cfg.variant, "backend": "reference",
                         "dtype": str(decoder_dtype).removeprefix("torch."),
                         "vision": f"pytorch {str(vision_dtype).removeprefix('torch.')}", "device": device,
                         "device_profile": getattr(device_profile, "name", device_profile)})

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str | None = None,
                    device_profile: str | DeviceProfile | None = None, verify: bool = True,
                    dtype: str = "bf16") -> "VL2Pipeline":
        """An exported bundle, validated (sha256 unless `verify=False`), checked against `device_profile`, decoder
        repacked for `backend`, vision in ONNX Runtime (see edge_vl2.bundle.loader)."""
        from .bundle.loader import load_bundle

        parts = load_bundle(path, backend=backend, device_profile=device_profile, verify=verify, dtype=dtype)
        return cls(parts.model, parts.processor, parts.path, tile_encoder=parts.tile_encoder, info=parts.info)

    def prepare(self, prompt: str, images=(), system: str | None = None,
                history: list[tuple[str, str]] | None = None, auto_image_tags: bool = False) -> ProcessorOutput:
        """Tokenise a prompt in the official template and tile its images (no model compute)."""
        return self.processor.process_prompt(prompt, images, system=system, history=history,
                                             auto_image_tags=auto_image_tags)

    def embeddings(self, inputs: ProcessorOutput, stats: dict | None = None) -> torch.Tensor:
        """[T, H] decoder inputs: token embeddings with the image vectors in the `<image>` positions. `stats` gets
        the tile counts (`vision_tiles`, `vision_tiles_cached`)."""
        device = self.model.image_newline.device
        pixels = inputs.pixel_values

        def encode(px: torch.Tensor) -> torch.Tensor:
            return self.tile_encoder(px).to(device=device, dtype=self.model.dtype)

        tiles = None
        if pixels.shape[0] and self.vision_cache is not None:
            tiles = self.vision_cache.encode(pixels, inputs.images_spatial_crop, encode, self.info.get("vision", ""),
                                             stats)
        elif pixels.shape[0]:
            tiles = encode(pixels)
            if stats is not None:
                stats.update(vision_tiles=pixels.shape[0], vision_tiles_cached=0)
        return self.model.input_embeddings(inputs.input_ids.to(device), inputs.images_seq_mask.to(device),
                                           pixels, inputs.images_spatial_crop, tile_embeds=tiles)

    @torch.inference_mode()
    def prompt_logits(self, inputs: ProcessorOutput) -> torch.Tensor:
        """fp32 logits [T, vocab] at every prompt position (one causal pass, no cache)."""
        lm = self.model.language
        return lm.logits(lm(self.embeddings(inputs)))

    def tokens(self, inputs: ProcessorOutput, sampling: SamplingParams = SamplingParams(),
               timings: dict | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(token id, logits) pairs as they are generated; stops on eos, max_new_tokens or the context end."""
        t0 = time.perf_counter()
        embeds = self.embeddings(inputs, timings)
        if timings is not None:
            timings["vision_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, item in enumerate(generate_tokens(self.model.language, embeds, inputs.input_ids, sampling,
                                                 self.tokenizer.eos_id)):
            if timings is not None and i == 0:
                timings["prefill_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
            yield item
            if timings is not None:
                timings["decode_s"] = time.perf_counter() - t0
                timings["decode_tokens"] = i + 1

    def stream(self, inputs: ProcessorOutput, sampling: SamplingParams = SamplingParams(),
               timings: dict | None = None) -> Iterator[str]:
        """Text pieces as they complete (never half a UTF-8 character)."""
        detok = self.tokenizer.stream()
        for token, _ in self.tokens(inputs, sampling, timings):
            piece = detok.add(token)
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail

    def generate(self, inputs: ProcessorOutput, sampling: SamplingParams = SamplingParams()) -> GenerationResult:
        """The whole answer, its ids and its grounding boxes in original-image pixels."""
        timings: dict = {}
        ids = [t for t, _ in self.tokens(inputs, sampling, timings)]
        text = self.tokenizer.decode(ids)
        return GenerationResult(text=text, token_ids=ids, prompt_tokens=inputs.seq_len,
                                boxes=self.boxes(text, inputs), timings=timings)

    @staticmethod
    def boxes(text: str, inputs: ProcessorOutput) -> list:
        """Grounding boxes in `text`, mapped to pixels of the last image (the one the official demo draws on:
        with two images, grounding prompts ask about the second)."""
        return parse_grounding(text, inputs.image_sizes[-1] if inputs.image_sizes else None)


def _check_reference_fit(model: str | Path, device_profile: str | DeviceProfile, decoder_dtype: torch.dtype,
                         vision_dtype: torch.dtype) -> None:
    """Refuse, from the checkpoint's headers alone, a model whose weights in the dtypes it would run in plus a
    full-context cache exceed the profile's budget."""
    from .model.cache import cache_bytes
    from .model.checkpoint import open_checkpoint

    profile = load_device(device_profile) if isinstance(device_profile, str) else device_profile
    _, cfg, _ = open_checkpoint(model)
    with torch.device("meta"):
        vl2 = DeepseekVL2(cfg)
    weights = sum(p.numel() * (vision_dtype if n.startswith(("vision.", "projector.")) else decoder_dtype).itemsize
                  for n, p in vl2.named_parameters())
    check_fit(profile, weights, cache_bytes(cfg.language, itemsize=decoder_dtype.itemsize),
              f"{model} in reference mode ({cfg.variant}, unquantized)")
