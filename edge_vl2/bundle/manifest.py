"""Bundle schema v1 as types: the export writes a `Manifest`, the runtime reads one, nobody indexes raw JSON.

`Manifest.from_json` checks the type of every field it declares (a list where an object belongs, a string where a
count belongs, a missing key) and says which field is wrong, so a hand-edited or damaged manifest is one clear line,
never an AttributeError later. Field by field: docs/bundle-format.md. Free-form records that only people read
(`config` is the checkpoint's own config.json; recipe, fidelity, export figures) stay JSON objects.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace

from ..errors import UserError

SCHEMA = "edge-vl2-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors code: BF16, U8, I8, F16, ...
    shape: list[int]


@dataclass(frozen=True)
class QuantEntry:
    """One quantized weight: the parameter it replaces and its format."""

    param: str
    bits: int
    group_size: int | None
    symmetric: bool
    shape: list[int]


@dataclass(frozen=True)
class Decoder:
    files: list[str]
    dtype: str
    tensors: dict[str, TensorEntry]
    quantized: dict[str, QuantEntry]  # tensor prefix -> format
    high_precision: list[str]
    bytes: int


@dataclass(frozen=True)
class VisionGraph:
    file: str
    files: list[str]  # the graph first, then its external weights if any
    precision: str
    opset: int
    ir_version: int
    exporter: str | None
    inputs: dict
    outputs: dict
    dynamic_axes: dict
    bytes: int
    validation: dict = field(default_factory=dict)
    quantization: str | None = None


@dataclass(frozen=True)
class Vision:
    graphs: list[VisionGraph]


@dataclass(frozen=True)
class Tokens:
    bos: int
    eos: int
    pad: int
    image: int
    special: dict[str, int]


@dataclass(frozen=True)
class ProcessorFiles:
    config: dict  # processor_config.json as the processor reads it
    template: str
    files: list[str]


@dataclass(frozen=True)
class Source:
    model: str
    path: str
    revision: str | None
    config_sha256: str


@dataclass(frozen=True)
class DomainFidelity:
    """Held-out fidelity of the written decoder on one domain of the suite (`edge_vl2.quantize.heldout`), at the
    positions that produce text (prompt text + the reference's teacher-forced answer)."""

    sequences: int
    positions: int
    kl_mean: float  # KL(reference || bundle), nats
    kl_p99: float
    kl_max: float
    top1: float  # fraction of positions where both argmaxes agree
    routing_overlap: float | None  # mean |top-k(ref) & top-k(bundle)| / k


@dataclass(frozen=True)
class Manifest:
    schema: str
    schema_version: int
    toolchain_version: str
    source: Source
    variant: str
    config: dict
    tokens: Tokens
    processor: ProcessorFiles
    recipe: dict
    decoder: Decoder
    vision: Vision
    fidelity: dict
    files: dict[str, FileEntry]
    export: dict | None = None
    fidelity_domains: dict[str, DomainFidelity] | None = None  # absent when fidelity was skipped
    digest: str = ""

    # -- (de)serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return _plain(self)

    def with_digest(self) -> "Manifest":
        return replace(self, digest=manifest_digest(self.to_dict()))

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d, where: str = MANIFEST) -> "Manifest":
        return _build(cls, d, where, "manifest")

    # -- what the runtime asks ------------------------------------------------------------------------------------

    def graph(self, precision: str | None = None) -> VisionGraph | None:
        """The vision graph of `precision`, the first one listed for None, None when absent."""
        for g in self.vision.graphs:
            if precision is None or g.precision == precision:
                return g
        return None

    def file_bytes(self, names) -> int:
        return sum(self.files[n].bytes for n in names)

    def referenced_files(self) -> list[str]:
        return [*self.decoder.files, *(f for g in self.vision.graphs for f in g.files), *self.processor.files]


def _plain(obj):
    """A dataclass tree as JSON values; optional fields left at a None default are omitted (absent in the file)."""
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)
                if not (f.default is None and getattr(obj, f.name) is None)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def canonical_json(obj) -> str:
    """The one serialisation a manifest is written in (sorted keys, ASCII, one-space indent, trailing newline)."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of everything but the digest field."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


# --- typed reading ------------------------------------------------------------------------------------------------

_JSON_NAMES = {int: "an integer", str: "a string", bool: "true or false", float: "a number", dict: "an object",
               list: "a list"}


def _build(tp, value, where: str, path: str):
    """`value` (parsed JSON) as type `tp`, or UserError naming the field `path` and what it should be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, where, path)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong(where, path, "an object", value)
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in fields(tp):
            if f.name not in value:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue  # optional in the schema
                raise UserError(f"{where}: {path} lacks {f.name!r}")
            kwargs[f.name] = _build(hints[f.name], value[f.name], where, f"{path}.{f.name}")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong(where, path, "a list", value)
        return [_build(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(where, path, "an object", value)
        return {k: _build(args[1], v, where, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise _wrong(where, path, _JSON_NAMES.get(tp, tp.__name__), value)
    return value


def _wrong(where: str, path: str, expected: str, value) -> UserError:
    got = "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)
    return UserError(f"{where}: {path} must be {expected}, got {got}")
