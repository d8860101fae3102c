"""Prompt + images -> token ids, image mask and pixel tiles, exactly as the official `DeepseekVLV2Processor`.

Official behaviour reproduced here (model-facts §3, §4.4, §6.2; `format_messages_v2` + `tokenize_with_images`):
- bos once; each user turn is `"<|User|>: " + content.strip() + "\\n\\n<|Assistant|>:"`, split at `<image>` and
  each text segment tokenised on its own; each image becomes `n_img` copies of the `<image>` id, marked in
  `images_seq_mask`; a past assistant answer is `content.strip()` + eos; a leading system message is its raw
  stripped text. The final eos of a conversation ending with an assistant message is dropped (inference mode).
- Tiling only when the whole conversation has <= 2 images; tiles = global 384 view, then the local grid in raster
  order, `ImageOps.pad` with grey (127) padding, normalised with the configured mean/std.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from .. import checks
from ..checks import Fields
from ..errors import UserError
from .images import load_image
from .template import PromptBuilder, check_policy, content_items, count_images
from .tiling import num_image_tokens, tile_image
from .tokenizer import PAD_TOKEN, Tokenizer

USER_ROLES = ("<|User|>", "user")
ASSISTANT_ROLES = ("<|Assistant|>", "assistant")
SYSTEM_ROLES = ("system",)
# A hostile processor_config.json must not ask for giant canvases: a tile side of at most 4096 px (384 in every
# checkpoint) and grids of at most 64 tiles (the official maximum is 9; 64 tiles of 384 px are 113 MB of float32).
MAX_TILE_SIDE, MAX_GRID = 4096, 64


@dataclass(frozen=True)
class ProcessorConfig:
    """`processor_config.json` of a DeepSeek-VL2 checkpoint."""

    candidate_resolutions: tuple[tuple[int, int], ...]
    patch_size: int
    downsample_ratio: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_token: str = "<image>"
    normalize: bool = True
    pad_token: str = "<｜▁pad▁｜>"
    sft_format: str = "deepseek"

    @property
    def image_size(self) -> int:
        """Tile side: the official processor takes it from the first candidate (384)."""
        return self.candidate_resolutions[0][0]

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Background of padded views: int(mean * 255) per channel (127 for mean 0.5)."""
        return tuple(int(x * 255) for x in self.image_mean)

    def num_image_tokens(self, tw: int, th: int) -> int:
        return num_image_tokens(tw, th, self.image_size, self.patch_size, self.downsample_ratio)

    def to_dict(self) -> dict:
        return {"candidate_resolutions": [list(r) for r in self.candidate_resolutions],
                "patch_size": self.patch_size, "downsample_ratio": self.downsample_ratio,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "image_token": self.image_token, "normalize": self.normalize, "pad_token": self.pad_token,
                "sft_format": self.sft_format}

    @classmethod
    def from_dict(cls, d: dict, source: str = "processor_config.json") -> "ProcessorConfig":
        f = Fields(d, source)
        res = checks.int_pairs(f.raw("candidate_resolutions"), f.name("candidate_resolutions"), 1, 1 << 16)
        size = res[0][0]
        if res[0][1] != size or size > MAX_TILE_SIDE:
            raise UserError(f"{source}: the first candidate resolution must be the square tile size (at most "
                            f"{MAX_TILE_SIDE}), got {list(res[0])}")
        bad = [list(r) for r in res if r[0] % size or r[1] % size or (r[0] // size) * (r[1] // size) > MAX_GRID]
        if bad:
            raise UserError(f"{source}: candidate resolutions {bad[:3]} must be multiples of the {size} px tile, "
                            f"at most {MAX_GRID} tiles each")
        return cls(candidate_resolutions=res, patch_size=f.int("patch_size", 1, size),
                   downsample_ratio=f.int("downsample_ratio", 1, 16),
                   image_mean=checks.numbers(f.raw("image_mean"), f.name("image_mean"), 3, 0, 1),
                   image_std=checks.numbers(f.raw("image_std"), f.name("image_std"), 3, 0, 1e3, lo_open=True),
                   image_token=f.str("image_token", nonempty=True), normalize=f.bool("normalize", True),
                   pad_token=f.str("pad_token", PAD_TOKEN, nonempty=True),
                   sft_format=f.str("sft_format", "deepseek", options=("deepseek",)))

    @classmethod
    def from_file(cls, path: str | Path) -> "ProcessorConfig":
        return cls.from_dict(checks.read_json(path, "processor config", 1 << 20), source=str(path))


@dataclass
class ProcessorOutput:
    """Everything the model needs for one conversation; the token count is known before any compute."""

    input_ids: torch.Tensor  # [T] long
    images_seq_mask: torch.Tensor  # [T] bool, True at every <image> position
    pixel_values: torch.Tensor  # [n_tiles, 3, S, S] float32: per image its global tile, then local raster order
    images_spatial_crop: torch.Tensor  # [n_images, 2] long: (width tiles, height tiles)
    num_image_tokens: list[int] = field(default_factory=list)  # per image
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # original (w, h) per image, for grounding
    text: str = ""  # the formatted text that was tokenised, for display ("<image>" once per image)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.seq_len


class Processor:
    """Official-equivalent DeepSeek-VL2 processor (tokenizer + tiling), no transformers needed."""

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.image_id = tokenizer.token_to_id(config.image_token)
        if self.image_id is None:
            raise UserError(f"{tokenizer.source}: the tokenizer has no image token {config.image_token!r}")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Processor":
        """Read `tokenizer.json` and `processor_config.json` (and check `config.json` agrees when present)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UserError(f"{model_dir}: not a directory")
        config = ProcessorConfig.from_file(model_dir / "processor_config.json")
        if (model_dir / "config.json").exists():
            _check_model_config(model_dir / "config.json", config)
        tokenizer = Tokenizer.from_pretrained(model_dir, image_token=config.image_token)
        return cls(tokenizer, config)

    def max_tiles(self) -> int:
        """Most tiles one image can produce: the global view plus the largest candidate grid."""
        S = self.config.image_size
        return 1 + max((w // S) * (h // S) for w, h in self.config.candidate_resolutions)

    def capped_at(self, max_tiles: int) -> "Processor":
        """This processor with the candidate grids limited to `max_tiles` tiles per image (global view included).

        A device profile's cap: on a CPU kiosk one tile is seconds of compute, so a wide photo is read at 2x1 tiles
        instead of up to 9. Images then get fewer image tokens than the official processor gives them (documented
        deviation, only when a profile asks for it); the tile side stays the first candidate's.
        """
        S = self.config.image_size
        kept = tuple((w, h) for w, h in self.config.candidate_resolutions if 1 + (w // S) * (h // S) <= max_tiles)
        if not kept or kept[0][0] != S:
            raise UserError(f"a cap of {max_tiles} tiles per image leaves no candidate grid (the smallest needs "
                            f"{1 + min((w // S) * (h // S) for w, h in self.config.candidate_resolutions)})")
        return Processor(self.tokenizer, replace(self.config, candidate_resolutions=kept))

    # ---- pixels -------------------------------------------------------------------------------------------------

    def tile_image(self, image: Image.Image, cropping: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tiles of one RGB image: [1 + tw*th, 3, S, S] float32 and (tw, th)."""
        return tile_image(image, self.config, cropping)

    # ---- conversations ------------------------------------------------------------------------------------------

    def process(self, conversation: list[dict], images: list | None = None, max_tokens: int | None = None,
                special_tokens: str = "parse") -> ProcessorOutput:
        """Tokenise a conversation and tile its images.

        `conversation`: messages {"role": "<|User|>"|"user"|"<|Assistant|>"|"assistant"|"system", "content": str or
        a list of text strings and {"type": "image"} parts, optional "images": [...]}. It may end with a user message
        or with an assistant message (empty for a fresh answer; non-empty to continue that answer). `images`: paths
        or PIL images in the order of the image slots (`<image>` tags under policy "parse", image parts under the
        others); when None, the messages' "images" lists are used. Slots and images must match one to one.
        `max_tokens`: raise a UserError when the prompt is longer. `special_tokens`: what special-token strings in
        message text do, "parse" (official), "grounding" or "escape" (see inputs/template.py).
        """
        msgs = self._check_conversation(conversation, check_policy(special_tokens))
        pil = [load_image(x) for x in self._images_for(msgs, images)]
        cropping = len(pil) <= 2  # official: tiling only with <= 2 images in the whole conversation
        out = PromptBuilder(self.tokenizer, special_tokens)
        tag, pending = self.config.image_token, iter(pil)

        def add_image(builder: PromptBuilder) -> None:
            tiles, (tw, th) = self.tile_image(next(pending), cropping)
            builder.image(tiles, tw, th, self.config.num_image_tokens(tw, th), self.image_id, tag)

        for m in msgs:
            if m["role"] == "user":
                out.user_turn(m["content"], tag, add_image)
            elif m["role"] == "assistant":
                out.answer(m["content"])
            else:  # system: raw text, no template (official)
                out.plain_turn(m["content"])
        if msgs[-1]["role"] == "assistant":  # inference mode strips the answer's closing eos
            out.drop_last()
        if max_tokens is not None and len(out.ids) > max_tokens:
            raise UserError(f"the prompt is {len(out.ids)} tokens ({sum(out.counts)} for images), over the limit "
                            f"of {max_tokens}; use fewer or smaller images or a shorter history")
        return _finish(out, [im.size for im in pil], self.config.image_size)

    def _images_for(self, msgs: list[dict], images) -> list:
        """The images in `<image>` tag order: the given list, or the messages' own "images" lists."""
        tag = self.config.image_token
        tags_per_msg = [count_images(m["content"], tag) for m in msgs]
        if images is None:
            images = []
            for m, n in zip(msgs, tags_per_msg):
                own = list(m.get("images") or [])
                if len(own) != n:
                    raise UserError(f"a {m['role']} message has {n} {tag} tag(s) but lists {len(own)} image(s)")
                images += own
        else:
            images = _as_list(images)
        if sum(tags_per_msg) != len(images):
            raise UserError(f"the prompt has {sum(tags_per_msg)} {tag} tag(s) or image part(s) but "
                            f"{len(images)} image(s) were given; put one {tag} where each image belongs")
        return images

    def process_prompt(self, prompt: str, images=(), system: str | None = None,
                       history: list[tuple[str, str]] | None = None, auto_image_tags: bool = False,
                       max_tokens: int | None = None, special_tokens: str = "parse") -> ProcessorOutput:
        """The CLI form: one prompt, its images, an optional system text and past (user, assistant) turns.

        `images` follow the `<image>` tags of the history and then of the prompt. With `auto_image_tags`, a prompt
        with fewer tags than images gets the missing `"<image>\\n"` lines prepended (the official web demo's
        convention); otherwise any mismatch is a UserError.
        """
        checks.text(prompt, "the prompt")
        images = _as_list(images)
        conv: list[dict] = []
        if system is not None and checks.text(system, "the system text"):
            conv.append({"role": "system", "content": system})
        if history is not None and not isinstance(history, (list, tuple)):
            raise UserError(f"history must be a list of (user, assistant) pairs, got {checks.show(history)}")
        for turn in history or []:
            if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
                raise UserError(f"history must be a list of (user, assistant) pairs, got {checks.show(turn)}")
            conv.append({"role": "user", "content": turn[0]})
            conv.append({"role": "assistant", "content": turn[1]})
        tag = self.config.image_token
        n_tags = prompt.count(tag) + sum(str(m["content"]).count(tag) for m in conv if m["role"] == "user")
        if auto_image_tags and n_tags < len(images):
            prompt = f"{tag}\n" * (len(images) - n_tags) + prompt
        conv.append({"role": "user", "content": prompt})
        conv.append({"role": "assistant", "content": ""})
        return self.process(conv, images, max_tokens=max_tokens, special_tokens=special_tokens)

    def _check_conversation(self, conversation, policy: str) -> list[dict]:
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise UserError("the conversation must be a non-empty list of messages")
        tag = self.config.image_token
        out = []
        for i, m in enumerate(conversation):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"message {i} must be a dict with 'role' and 'content'")
            if isinstance(m["content"], str):
                checks.text(m["content"], f"message {i}: content")
            content = content_items(m["content"], policy, tag, f"message {i}")
            role = m["role"]
            if role in USER_ROLES:
                norm = "user"
            elif role in ASSISTANT_ROLES:
                norm = "assistant"
            elif role in SYSTEM_ROLES:
                norm = "system"
                if i != 0:
                    raise UserError(f"message {i}: a system message may only come first")
            else:
                raise UserError(f"message {i}: unknown role {role!r} (use user, assistant or system)")
            if norm != "user" and count_images(content, tag):
                raise UserError(f"message {i}: images ({tag} tags or image parts) may only be in user messages")
            out.append({**m, "role": norm, "content": content})
        if not any(m["role"] == "user" for m in out):
            raise UserError("the conversation has no user message")
        if out[-1]["role"] == "system":
            raise UserError("the conversation ends with a system message; add a user message")
        return out


def _finish(b: PromptBuilder, image_sizes: list[tuple[int, int]], tile_size: int) -> ProcessorOutput:
    empty = torch.zeros((0, 3, tile_size, tile_size), dtype=torch.float32)
    return ProcessorOutput(
        input_ids=torch.tensor(b.ids, dtype=torch.long),
        images_seq_mask=torch.tensor(b.mask, dtype=torch.bool),
        pixel_values=torch.cat(b.tiles, 0) if b.tiles else empty,
        images_spatial_crop=torch.tensor(b.crops, dtype=torch.long).reshape(-1, 2),
        num_image_tokens=b.counts, image_sizes=image_sizes, text="".join(b.parts))


def _as_list(images) -> list:
    """A single path or image is one image, not a sequence of characters."""
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, (bytes, bytearray, dict)) or not isinstance(images, Iterable):
        raise UserError(f"images must be a list of paths or PIL images, got {checks.show(images)}")
    return list(images)


def _check_model_config(path: Path, config: ProcessorConfig) -> None:
    """config.json repeats candidate_resolutions and the vision tile and patch sizes: they must agree."""
    from ..model.config import VL2Config

    cfg = VL2Config.from_file(path)
    if cfg.candidate_resolutions != config.candidate_resolutions:
        raise UserError(f"{path}: candidate_resolutions differ from processor_config.json")
    if (cfg.vision.patch_size, cfg.vision.image_size) != (config.patch_size, config.image_size):
        raise UserError(f"{path}: vision patch_size / image_size {cfg.vision.patch_size} / {cfg.vision.image_size} "
                        f"!= processor_config.json's {config.patch_size} / {config.image_size}")
