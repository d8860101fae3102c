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

from . import checks
from .constrain import constraint_for
from .cuda_memory import cap_cuda_memory
from .devices.profiles import DeviceProfile, as_profile, check_fit, prefill_budget
from .dtypes import resolve_dtypes
from .errors import UserError
from .generate import SamplingParams, finish_reason, generate_tokens
from .inputs.grounding import Grounding, find_grounding
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
    skipped_boxes: list = field(default_factory=list)  # box text that was not a valid box, with the reason
    finish_reason: str = "stop"  # or "length": cut by max_new_tokens / the context before it ended

    def grounding(self) -> dict:
        """{"boxes": [{label, box (pixels), image, box_999}], "skipped": [{label, text, reason}]} (`run --boxes`)."""
        return Grounding(self.boxes, self.skipped_boxes).to_dict()


class VL2Pipeline:
    """Processor + model for one checkpoint; every method works on a ProcessorOutput from `prepare`."""

    def __init__(self, model: DeepseekVL2, processor: Processor, model_dir: Path,
                 tile_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None, cuda_graphs: bool = False,
                 prefill_budget: int | None = None, info: dict | None = None):
        """`tile_encoder` maps tiles [N, 3, 384, 384] to projector outputs [N, 196, H]; by default the model's own
        PyTorch tower (reference mode), for bundles the ONNX Runtime graph. `cuda_graphs`: decode through a
        captured step (edge_vl2.decode_graph) when the decoder is on CUDA; `prefill_budget`: bytes of activations a
        prefill chunk may take (else 512-token chunks). `info` says what runs it (for /health and logs); its
        "vision" entry names the tile encoder for the vision cache's keys."""
        self.model, self.processor, self.model_dir = model, processor, model_dir
        self.tokenizer = processor.tokenizer
        self.tile_encoder = tile_encoder or model.encode_tiles
        on_cuda = model.image_newline.device.type == "cuda"
        self.cuda_graphs = cuda_graphs and on_cuda  # elsewhere the dynamic-shape decode is the faster eager path
        self.prefill_budget = prefill_budget
        vocab = model.cfg.language.vocab_size
        if len(self.tokenizer) > vocab:  # ids past the embedding would fail inside the first forward pass
            raise UserError(f"{self.tokenizer.source}: {len(self.tokenizer)} tokens, more than the model's {vocab} "
                            "embedding rows")
        self.info = dict(info or {"checkpoint": str(model_dir), "backend": "reference", "vision": "pytorch"})
        self.vision_cache: VisionCache | None = None

    def enable_vision_cache(self, limit_mb: float = DEFAULT_CACHE_MB) -> VisionCache:
        """Keep encoded images (LRU, `limit_mb`) so later prompts about the same image skip the vision tower."""
        self.vision_cache = VisionCache(limit_mb)
        return self.vision_cache

    @classmethod
    def from_pretrained(cls, model: str | Path, dtype: str = "auto", device: str = "cpu",
                        device_profile: str | DeviceProfile | None = None, cuda_graphs: bool = False,
                        memory_cap_gb: float | None = None) -> "VL2Pipeline":
        """Reference mode: `model` is a local checkpoint folder in the official layout, or a Hub id (downloaded where
        a network exists). With `device_profile`, a model that cannot fit it is refused from its headers first.
        `memory_cap_gb` caps PyTorch's CUDA memory before anything loads (edge_vl2.cuda_memory)."""
        device = checks.torch_device(device)
        decoder_dtype, vision_dtype = resolve_dtypes(dtype, device)
        budget = None
        profile = as_profile(device_profile)
        if profile is not None:
            budget = _check_reference_fit(model, profile, decoder_dtype, vision_dtype)
        if memory_cap_gb is not None:
            cap_cuda_memory(memory_cap_gb, device)
        vl2, model_dir = load_model(model, dtype=decoder_dtype, vision_dtype=vision_dtype, device=device)
        return cls(vl2, Processor.from_pretrained(model_dir), model_dir, cuda_graphs=cuda_graphs,
                   prefill_budget=budget,
                   info={"checkpoint": str(model_dir), "variant": vl2.cfg.variant, "backend": "reference",
                         "dtype": str(decoder_dtype).removeprefix("torch."),
                         "vision": f"pytorch {str(vision_dtype).removeprefix('torch.')}", "device": device,
                         "device_profile": profile.name if profile else None})

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str | None = None,
                    device_profile: str | DeviceProfile | None = None, verify: bool = True,
                    dtype: str = "bf16", cuda_graphs: bool = False,
                    memory_cap_gb: float | None = None) -> "VL2Pipeline":
        """An exported bundle, validated (sha256 unless `verify=False`), checked against `device_profile`, decoder
        repacked for `backend`, vision in ONNX Runtime (see edge_vl2.bundle.loader). `cuda_graphs`, `memory_cap_gb`:
        as in `from_pretrained`."""
        from .bundle.loader import load_bundle

        if memory_cap_gb is not None:
            cap_cuda_memory(memory_cap_gb)
        parts = load_bundle(path, backend=backend, device_profile=device_profile, verify=verify, dtype=dtype)
        return cls(parts.model, parts.processor, parts.path, tile_encoder=parts.tile_encoder,
                   cuda_graphs=cuda_graphs, prefill_budget=parts.prefill_budget, info=parts.info)

    def prepare(self, prompt: str, images=(), system: str | None = None,
                history: list[tuple[str, str]] | None = None, auto_image_tags: bool = False) -> ProcessorOutput:
        """Tokenise a prompt in the official template and tile its images (no model compute)."""
        return self.processor.process_prompt(prompt, images, system=system, history=history,
                                             auto_image_tags=auto_image_tags)

    def embeddings(self, inputs: ProcessorOutput, stats: dict | None = None) -> torch.Tensor:
        """[T, H] decoder inputs: token embeddings with the image vectors in the `<image>` positions. `stats` gets
        the tile counts (`vision_tiles`, `vision_tiles_cached`)."""
        if not isinstance(inputs, ProcessorOutput):
            raise UserError(f"inputs must be the ProcessorOutput of prepare(), got {checks.show(inputs)}")
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
        """(token id, logits) pairs as they are generated; stops on eos, max_new_tokens, the context end or, under
        a json_schema / regex / choices constraint, when the answer is complete. `timings` also gets
        `finish_reason` ("stop" or "length") and, when constrained, the grammar's `mask` statistics."""
        if not isinstance(sampling, SamplingParams):
            raise UserError(f"sampling must be a SamplingParams, got {checks.show(sampling)}")
        constraint = constraint_for(sampling, self.tokenizer, self.model.language.cfg.vocab_size)  # fails early
        t0 = time.perf_counter()
        embeds = self.embeddings(inputs, timings)
        if timings is not None:
            timings["vision_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = timings if timings is not None else {}
        n = 0
        try:
            for n, item in enumerate(generate_tokens(self.model.language, embeds, inputs.input_ids, sampling,
                                                     self.tokenizer.eos_id, prefill_budget=self.prefill_budget,
                                                     cuda_graphs=self.cuda_graphs, info=info, constraint=constraint),
                                     start=1):
                if timings is not None and n == 1:
                    timings["prefill_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                yield item
                if timings is not None:
                    timings["decode_s"] = time.perf_counter() - t0
                    timings["decode_tokens"] = n
        finally:
            if constraint is not None:
                constraint.close()
        if timings is not None:
            timings["finish_reason"] = _finish_reason(n, inputs.seq_len, sampling, constraint,
                                                      self.model.language.cfg.max_position_embeddings)
            if constraint is not None:
                timings["mask"] = dict(constraint.stats)

    def stream(self, inputs: ProcessorOutput, sampling: SamplingParams = SamplingParams(),
               timings: dict | None = None) -> Iterator[str]:
        """Text pieces as they complete (never half a UTF-8 character). A constrained answer starts with its value:
        the one space the grammar allows first (edge_vl2.constrain) is not part of it."""
        detok = self.tokenizer.stream()
        strip = _constrained(sampling)
        for token, _ in self.tokens(inputs, sampling, timings):
            piece = detok.add(token)
            if strip and piece:
                piece, strip = piece.removeprefix(" "), False
            if piece:
                yield piece
        tail = detok.flush()
        if tail:
            yield tail

    def generate(self, inputs: ProcessorOutput, sampling: SamplingParams = SamplingParams()) -> GenerationResult:
        """The whole answer, its ids, its grounding boxes in original-image pixels (and what was skipped), and why
        it ended ("stop", or "length" when max_new_tokens or the context cut it)."""
        timings: dict = {}
        ids = [t for t, _ in self.tokens(inputs, sampling, timings)]
        text = self.tokenizer.decode(ids)
        if _constrained(sampling):
            text = text.removeprefix(" ")
        grounding = self.grounding(text, inputs)
        return GenerationResult(text=text, token_ids=ids, prompt_tokens=inputs.seq_len, boxes=grounding.boxes,
                                timings=timings, skipped_boxes=grounding.skipped,
                                finish_reason=timings["finish_reason"])

    @staticmethod
    def grounding(text: str, inputs: ProcessorOutput) -> Grounding:
        """Grounding boxes in `text` on the last image of the prompt (the one the official demo draws on: with two
        images, grounding prompts ask about the second), in its original pixels, and the box text skipped."""
        return find_grounding(text, inputs.image_sizes)

    @classmethod
    def boxes(cls, text: str, inputs: ProcessorOutput) -> list:
        """The boxes of `grounding`."""
        return cls.grounding(text, inputs).boxes


def _constrained(sampling: SamplingParams) -> bool:
    return any(x is not None for x in (sampling.json_schema, sampling.regex, sampling.choices))


def _finish_reason(n_tokens: int, prompt_len: int, sampling: SamplingParams, constraint, context: int) -> str:
    """"length" when the answer was cut by max_new_tokens or the context (a constrained one: when the grammar was
    not complete), else "stop" (eos, or the grammar finished)."""
    if constraint is not None:
        return "stop" if constraint.complete else "length"
    return finish_reason(n_tokens, prompt_len, sampling.max_new_tokens, context)


def _check_reference_fit(model: str | Path, profile: DeviceProfile, decoder_dtype: torch.dtype,
                         vision_dtype: torch.dtype) -> int:
    """Refuse, from the checkpoint's headers alone, a model whose weights in the dtypes it would run in plus a
    full-context cache exceed the profile's budget; returns the prefill's activation budget in bytes."""
    from .model.cache import cache_bytes
    from .model.checkpoint import open_checkpoint

    _, cfg, _ = open_checkpoint(model)
    with torch.device("meta"):
        vl2 = DeepseekVL2(cfg)
    weights = sum(p.numel() * (vision_dtype if n.startswith(("vision.", "projector.")) else decoder_dtype).itemsize
                  for n, p in vl2.named_parameters())
    cache = cache_bytes(cfg.language, itemsize=decoder_dtype.itemsize)
    check_fit(profile, weights, cache, f"{model} in reference mode ({cfg.variant}, unquantized)")
    return prefill_budget(profile, weights, cache)
