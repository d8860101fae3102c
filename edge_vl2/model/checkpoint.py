"""Finding and reading an official checkpoint folder: index-driven, memory-mapped, strict.

A `--model` argument is either a local folder or a Hugging Face Hub id. Shards are read lazily through safetensors'
memory map, so only the tensors we ask for are paged in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .. import checks
from ..dtypes import FLOAT_CODES, check_finite
from ..errors import UserError
from .config import VL2Config
from .shapes import checkpoint_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (or found in the local Hub cache) with huggingface_hub."""
    path = checks.path_arg(model, "model (a checkpoint folder or Hub id)")
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{model}: expected a checkpoint folder, got a file")
    if not HUB_ID.match(str(model)):
        raise UserError(f"{model}: no such folder")
    return _download(str(model))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id}: not a local folder, and huggingface_hub is not installed to fetch it "
                        "(pip install 'edge-vl2[hub]', or pass a local checkpoint folder)") from None
    patterns = ["*.json", "*.safetensors"]
    try:  # the local cache first: works offline once downloaded
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss falls through to a real download
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end the same way
        text = " ".join(str(e).split())
        if "ConnectError" in text or "Name or service not known" in text or "offline" in text.lower():
            reason = "the Hugging Face Hub cannot be reached (no network)"
        else:
            reason = f"{type(e).__name__}: {text[:160]}"
        raise UserError(f"{repo_id}: not a local folder, and it could not be downloaded: {reason}; "
                        "pass a local checkpoint folder") from None


class CheckpointReader:
    """The tensors of one checkpoint folder, found through its index (or a single `model.safetensors`)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self._handles: dict[str, object] = {}
        self.weight_map = self._read_weight_map()
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors codes, from the headers
        for shard in sorted(set(self.weight_map.values())):
            handle = self._open(shard)
            for name in handle.keys():
                meta = handle.get_slice(name)
                self._shapes[name], self.dtypes[name] = tuple(meta.get_shape()), meta.get_dtype()
        unlisted = [n for n, s in self.weight_map.items() if n not in self._shapes]
        if unlisted:
            raise UserError(f"{self.dir}: {INDEX_FILE} lists {unlisted[0]!r} in {self.weight_map[unlisted[0]]}, "
                            "which does not hold it")

    def _read_weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.exists():
            weight_map = checks.Fields(checks.read_json(index, "checkpoint index"), str(index)).raw("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
            for shard in set(weight_map.values()):  # names from a downloaded file: never outside the checkpoint
                checks.inside(self.dir, shard, f"{INDEX_FILE} shard", _hub_blobs(self.dir))
            return weight_map
        if (self.dir / SINGLE_FILE).exists():
            return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        raise UserError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}: not a checkpoint folder")

    def _open(self, shard: str):
        if shard not in self._handles:
            path = checks.regular_file(self.dir / shard, f"shard listed in {INDEX_FILE}")
            try:
                self._handles[shard] = safe_open(path, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[shard]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (its dtype was checked with the layout), refused if it holds NaN or infinity."""
        try:
            tensor = self._open(self.weight_map[name]).get_tensor(name)
        except KeyError:
            raise UserError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None
        except Exception as e:  # noqa: BLE001 - a truncated shard fails only when the bytes are read
            raise UserError(f"{self.dir / self.weight_map[name]}: cannot read {name!r} ({e})") from None
        return check_finite(tensor, f"{self.dir / self.weight_map[name]}: tensor {name!r}")


def _hub_blobs(model_dir: Path) -> tuple[Path, ...]:
    """The Hugging Face cache keeps a snapshot's files as links into the repository's `blobs` folder: links there
    are the checkpoint's own."""
    real = Path(os.path.realpath(model_dir))
    return (real.parent.parent / "blobs",) if real.parent.name == "snapshots" else ()


def check_dtypes(dtypes: dict[str, str], where: Path) -> None:
    """Every checkpoint tensor is a float (a bool embedding or an int32 expert would otherwise be cast and run)."""
    wrong = [n for n, d in dtypes.items() if d not in FLOAT_CODES]
    if wrong:
        raise UserError(f"{where}: tensor {wrong[0]!r} is {dtypes[wrong[0]]}, expected a float type "
                        f"({', '.join(FLOAT_CODES)})")


def check_layout(cfg: VL2Config, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Strict: every expected tensor present with its shape, nothing extra."""
    expected = checkpoint_shapes(cfg)
    missing = [n for n in expected if n not in shapes]
    extra = [n for n in shapes if n not in expected]
    wrong = [n for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{where}: checkpoint is missing tensor {missing[0]!r}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{where}: checkpoint has unexpected tensor {extra[0]!r}{more}")
    if wrong:
        n = wrong[0]
        raise UserError(f"{where}: tensor {n!r} has shape {list(shapes[n])}, config.json implies {list(expected[n])}")


def open_checkpoint(model: str | Path) -> tuple[Path, VL2Config, CheckpointReader]:
    """Resolve, read config.json, open the shards and check the layout strictly."""
    model_dir = resolve_model_dir(model)
    cfg = VL2Config.from_file(model_dir / "config.json")
    reader = CheckpointReader(model_dir)
    if cfg.language.vocab_from_checkpoint:  # small's config omits vocab_size: the embedding is the truth
        embed = reader.shapes.get("language.model.embed_tokens.weight")
        if embed:
            from dataclasses import replace

            cfg = replace(cfg, language=cfg.language.with_vocab(embed[0]))
    check_layout(cfg, reader.shapes, model_dir)
    check_dtypes(reader.dtypes, model_dir)
    return model_dir, cfg, reader
