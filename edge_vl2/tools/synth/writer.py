"""Write a synthetic checkpoint in the exact official file layout (model-facts §8).

Shards are streamed tensor by tensor (the safetensors header is known from the shapes alone), so memory stays at one
tensor even for Small's 8 GB shards. The byte layout is what `safetensors.torch.save_file` writes: header with
`{"format": "pt"}` metadata and names sorted, space-padded to 8 bytes, data in header order.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from ...errors import UserError
from ...model.config import VL2Config
from ...model.shapes import checkpoint_shapes
from .configs import CANDIDATE_RESOLUTIONS, synthetic_config
from .tokenizer import PAD, write_tokenizer_files
from .weights import synth_tensor

SHARD_COUNT = {"tiny": 1, "small": 4, "base": 8}  # as published, at both sizes
BF16_BYTES = 2

PROCESSOR_CONFIG = {
    "add_special_token": False, "candidate_resolutions": [list(r) for r in CANDIDATE_RESOLUTIONS],
    "downsample_ratio": 2, "ignore_id": -100, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_token": "<image>", "mask_prompt": False, "normalize": True, "pad_token": PAD, "patch_size": 14,
    "processor_class": "DeepseekVLV2Processor", "sft_format": "deepseek",
}
GENERATION_CONFIG = {"_from_model_config": True, "transformers_version": "4.38.2"}


def shard_name(k: int, n: int) -> str:
    """The official pattern: five-digit index, six-digit total (`model-00001-of-000004.safetensors`)."""
    return f"model-{k:05d}-of-{n:06d}.safetensors"


def shard_plan(sizes: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Split (name, bytes) pairs, in checkpoint order, into `n` contiguous non-empty runs of about equal bytes:
    a tensor goes to the shard whose byte range holds its midpoint, without skipping or starving a shard."""
    if len(sizes) < n:
        raise ValueError(f"{len(sizes)} tensors cannot fill {n} shards")
    total = sum(b for _, b in sizes)
    shards: list[list[str]] = [[] for _ in range(n)]
    k, done = 0, 0
    for i, (name, nbytes) in enumerate(sizes):
        want = min(n - 1, (2 * done + nbytes) * n // (2 * total))
        if i:  # never skip a shard; the remaining tensors must cover the remaining shards
            k = min(k + 1, max(want, k, n - (len(sizes) - i)))
        shards[k].append(name)
        done += nbytes
    return shards


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], make: Callable[[str], torch.Tensor],
                 say: Callable[[str], None]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        reported = 0
        for name in sorted(shapes):
            t = make(name)
            if tuple(t.shape) != tuple(shapes[name]):
                raise AssertionError(f"{name}: made {tuple(t.shape)}, layout says {shapes[name]}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy())  # raw bf16 bytes, no copy
            if f.tell() - reported >= 1 << 30:  # a full shard takes minutes: say something every GiB
                reported = f.tell()
                say(f"  {path.name}: {reported / 1e9:.1f} / {(8 + len(blob) + offset) / 1e9:.1f} GB")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_checkpoint(out_dir: str | Path, variant: str, size: str, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Write a synthetic `variant` checkpoint at `size` ("test"/"full") into `out_dir` (must not exist or be empty).

    Files and names are the official ones: config.json, processor_config.json, generation_config.json, tokenizer
    files, model.safetensors.index.json and bf16 shards. Everything is written into a temporary sibling directory
    that is renamed into place at the end, so an interrupted write leaves no half checkpoint behind.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this writer copies native bytes")
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty directory")
    config = synthetic_config(variant, size)
    cfg = VL2Config.from_dict(config)
    shapes = checkpoint_shapes(cfg)
    n = SHARD_COUNT[variant]
    plan = shard_plan([(k, math.prod(s) * BF16_BYTES) for k, s in shapes.items()], n)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # normal umask permissions (mkdtemp would make the final directory 0700)
    try:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "processor_config.json", PROCESSOR_CONFIG)
        _write_json(tmp / "generation_config.json", GENERATION_CONFIG)
        write_tokenizer_files(tmp, variant)
        weight_map = {}
        for k, names in enumerate(plan, start=1):
            fname = shard_name(k, n)
            nbytes = sum(math.prod(shapes[x]) for x in names) * BF16_BYTES
            say(f"{variant}/{size}: writing {fname} ({len(names)} tensors, {nbytes / 1e9:.2f} GB)")
            _write_shard(tmp / fname, {x: shapes[x] for x in names}, lambda x: synth_tensor(x, shapes[x], cfg, seed),
                         say)
            weight_map.update({x: fname for x in names})
        total = sum(math.prod(s) for s in shapes.values()) * BF16_BYTES  # tensor bytes, as transformers counts
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory portably
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"{variant}/{size}: wrote {out} ({total / 1e9:.2f} GB in {n} shard(s))")
    return out
