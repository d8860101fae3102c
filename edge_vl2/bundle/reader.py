"""Bundle schema v1: a folder with `manifest.json`, decoder safetensors, vision ONNX graphs and tokenizer files.

The runtime reads only the bundle. It validates strictly before loading anything big: the manifest itself (schema,
version, and a digest over its canonical JSON, so any changed byte of it is caught), every other file's size and
sha256 (the `--skip-verify` opt-out skips only the sha256 pass, for startup time), every decoder tensor's dtype and
shape against the manifest, and the processor file against the manifest's processor settings. Any mismatch is a
UserError naming the file or tensor.

Decoder tensors are memory-mapped (`mmap_tensors`): a bf16 tensor the runtime uses as it is costs no copy, and the
quantized ones are read once when the backend repacks them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .. import checks
from ..dtypes import SAFETENSORS_DTYPES, check_finite
from ..errors import UserError, one_line
from ..model.cache import cache_bytes
from ..model.config import VL2Config
from .manifest import MANIFEST, SCHEMA, SCHEMA_VERSION, Manifest, VisionGraph, canonical_json, manifest_digest


MAX_MANIFEST_BYTES = 64 << 20  # a full-size mixed Small manifest is ~2 MB


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle folder and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def config(self) -> VL2Config:
        cfg = VL2Config.from_dict(self.manifest.config)
        if cfg.language.vocab_from_checkpoint:  # small's config.json omits vocab_size: the embedding is the truth
            embed = "language.model.embed_tokens"
            quantized = self.manifest.decoder.quantized.get(embed)
            vocab = (quantized or self.manifest.decoder.tensors[f"{embed}.weight"]).shape[0]
            cfg = replace(cfg, language=cfg.language.with_vocab(vocab))
        return cfg

    @property
    def decoder_files(self) -> list[Path]:
        return [self.path / f for f in self.manifest.decoder.files]

    def vision_graph(self, precision: str | None = None) -> VisionGraph:
        """The vision graph entry for `precision` (fp32/fp16/int8), or the first one listed."""
        graph = self.manifest.graph(precision)
        if graph is None:
            have = ", ".join(g.precision for g in self.manifest.vision.graphs)
            raise UserError(f"{self.path}: no {precision} vision graph in this bundle (it has {have})")
        return graph

    @property
    def decoder_bytes(self) -> int:
        return self.manifest.file_bytes(self.manifest.decoder.files)

    def graph_bytes(self, graph: VisionGraph) -> int:
        return self.manifest.file_bytes(graph.files)

    @property
    def total_bytes(self) -> int:
        return self.manifest.file_bytes(self.manifest.files) + (self.path / MANIFEST).stat().st_size

    def cache_bytes(self, positions: int | None = None) -> int:
        return cache_bytes(self.config.language, positions)


def read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"{path}: no such bundle folder" if not path.exists() else f"{path}: not a bundle folder")
    if not file.exists():
        raise UserError(f"{path}: not a bundle (no {MANIFEST})")
    data = checks.read_bytes(file, "bundle manifest", MAX_MANIFEST_BYTES)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not ASCII (modified or corrupted: byte 0x{data[e.start]:02x} at {e.start})") from None
    raw = checks.parse_json(text, f"{file} (modified or corrupted)")
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise UserError(f"{file}: not an edge-vl2 bundle manifest")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{file}: schema version {raw.get('schema_version')!r}; this runtime reads version "
                        f"{SCHEMA_VERSION}")
    # Any changed byte either changes the content (digest) or leaves it equal but no longer canonical.
    if raw.get("digest") != manifest_digest(raw) or text != canonical_json(raw):
        raise UserError(f"{file}: modified (its content does not match its digest)")
    return Manifest.from_dict(raw, str(file))


def verify_files(path: Path, manifest: Manifest, hashes: bool = True) -> None:
    """Every listed file present with its size (and sha256); nothing referenced is unlisted."""
    for name in manifest.referenced_files():
        if name not in manifest.files:
            raise UserError(f"{path}: {name} is used but has no entry in the manifest's file list")
    for name, entry in manifest.files.items():
        file = checks.inside(path, name, f"{MANIFEST} file entry")  # a link out of the bundle is refused
        if not file.exists():
            raise UserError(f"{file}: missing from the bundle")
        checks.regular_file(file, "bundle file")  # before hashing: a FIFO would block
        if file.stat().st_size != entry.bytes:
            raise UserError(f"{file}: size {file.stat().st_size} differs from the manifest's {entry.bytes} "
                            "(truncated or modified)")
        if hashes and sha256_file(file) != entry.sha256:
            raise UserError(f"{file}: sha256 differs from the manifest (modified or corrupted)")


def verify_tensors(path: Path, manifest: Manifest) -> None:
    """Every decoder tensor in the safetensors headers has the manifest's dtype and shape, and none is extra."""
    expected = manifest.decoder.tensors
    seen = set()
    for name in manifest.decoder.files:
        try:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    meta = f.get_slice(key)
                    want = expected.get(key)
                    if want is None:
                        raise UserError(f"{path / name}: tensor {key!r} is not in the manifest")
                    got = (meta.get_dtype(), list(meta.get_shape()))
                    if got != (want.dtype, want.shape):
                        raise UserError(f"{path / name}: tensor {key!r} is {got[0]} {got[1]}, the manifest says "
                                        f"{want.dtype} {want.shape}")
                    if key in seen:
                        raise UserError(f"{path / name}: tensor {key!r} is also in another decoder file")
                    seen.add(key)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise UserError(f"{path / name}: not a readable safetensors file ({one_line(e)})") from None
    missing = [k for k in expected if k not in seen]
    if missing:
        raise UserError(f"{path}: decoder tensor {missing[0]!r} is in the manifest but in no file")


def verify_processor(path: Path, manifest: Manifest) -> None:
    """processor_config.json says what the manifest's processor settings say."""
    from ..inputs.processor import ProcessorConfig

    file = path / "processor_config.json"
    if ProcessorConfig.from_file(file).to_dict() != manifest.processor.config:
        raise UserError(f"{file}: differs from the manifest's processor settings")


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and validate a bundle; `verify=False` (`--skip-verify`) skips only the sha256 pass over the files."""
    path = checks.path_arg(path, "bundle")
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=verify)
    verify_tensors(path, manifest)
    verify_processor(path, manifest)
    return Bundle(path, manifest)


# --- memory-mapped decoder tensors -------------------------------------------------------------------------------

def mmap_tensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as views of one private (copy-on-write) memory map: nothing is read until
    used, and the file is never written. The header was checked by `verify_tensors`; float tensors (bf16 weights,
    fp16 scales) are refused when they hold NaN or infinity (`edge_vl2.dtypes.check_finite`: all values of small
    tensors, a sample of big ones)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        size = f.seek(0, 2)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    if mm is not None and hasattr(mmap, "MADV_WILLNEED"):
        # start reading the file into the page cache now, in the background: the first decode steps would otherwise
        # wait on a disk read per expert and embedding row they touch first (measured 10-20 ms each on a cold cache)
        mm.madvise(mmap.MADV_WILLNEED)
    base, out = 8 + n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        start, end = entry["data_offsets"]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end == start:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=(end - start) // itemsize, offset=base + start).view(shape)
        # tensors stay in the memory-mapped file (the cpu kernels read the codes in place: one copy of the weights);
        # only a start that is not a multiple of the element size is copied. Kernels that need more alignment ask
        # for it themselves (quant/ops/cpu.py).
        t = t if (base + start) % itemsize == 0 else t.clone()
        out[name] = check_finite(t, f"{file}: tensor {name!r}")
    return out
