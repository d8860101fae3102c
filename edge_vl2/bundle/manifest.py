"""Bundle schema v1 as types: the export writes a `Manifest`, the runtime reads one, nobody indexes raw JSON.

`Manifest.from_dict` checks the type of every field it declares (a list where an object belongs, a string where a
count belongs, a missing key) and then what the values mean (`check_manifest`: ranges, file names, the dtype and shape
every quantized or high-precision tensor must have, the config and processor settings), and says which field is
wrong, so a hand-edited or damaged manifest is one clear line, never an AttributeError later. Field by field: docs/bundle-format.md. Free-form records that only people read
(`config` is the checkpoint's own config.json; recipe, fidelity, export figures) stay JSON objects.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace

from .. import checks
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
    graph: str | None = None  # "plain", or "fused: 27 MultiHeadAttention, ..." (ONNX Runtime contrib ops)


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
        """Typed (every field's JSON type) and then checked for meaning (`check_manifest`)."""
        manifest = _build(cls, d, where, "manifest")
        check_manifest(manifest, where)
        return manifest

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
        unknown = sorted(set(value) - set(hints), key=str)
        if unknown:  # sealed schema version: a field this runtime does not know would be silently dropped
            raise UserError(f"{where}: {path} has an unknown field {unknown[0]!r} (schema version {SCHEMA_VERSION} "
                            "has no such field)")
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


# --- what the values mean -----------------------------------------------------------------------------------------

VARIANTS = ("tiny", "small", "base")
PRECISIONS = ("fp32", "fp16", "int8")
TENSOR_CODES = ("BF16", "F16", "F32", "U8", "I8", "I32", "I64")  # edge_vl2.dtypes.SAFETENSORS_DTYPES
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_manifest(m: Manifest, where: str) -> None:
    """Beyond types: every value in range, every file name a bare name in the folder, and every decoder tensor the
    dtype and shape its role requires (quantized codes U8 / I8, fp16 scales, bf16 for the rest)."""
    from ..inputs.processor import ProcessorConfig
    from ..model.config import VL2Config

    checks.choice(m.variant, f"{where}: variant", VARIANTS)
    variant = VL2Config.from_dict(m.config, f"{where}: config").variant
    if variant != m.variant:
        raise UserError(f"{where}: variant {m.variant!r} but its config is a {variant} model")
    ids = {k: checks.integer(getattr(m.tokens, k), f"{where}: tokens.{k}", 0) for k in ("bos", "eos", "pad", "image")}
    if len(set(ids.values())) < len(ids):
        raise UserError(f"{where}: tokens {ids} must be four different ids")
    ProcessorConfig.from_dict(m.processor.config, f"{where}: processor.config")
    checks.choice(m.processor.template, f"{where}: processor.template", ("deepseek",))
    for name, entry in m.files.items():
        _bare_name(name, where, "files")
        checks.integer(entry.bytes, f"{where}: files.{name}.bytes", 0)
        if not _SHA256.fullmatch(entry.sha256):
            raise UserError(f"{where}: files.{name}.sha256 must be 64 lowercase hex digits, got "
                            f"{checks.show(entry.sha256)}")
    for name in m.processor.files:
        _bare_name(name, where, "processor.files")
    _check_vision(m, where)
    _check_decoder(m, where)


def _bare_name(name: str, where: str, field_: str) -> None:
    if not name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"{where}: {field_} entry {checks.show(name)} is not a plain file name in the bundle")


def _check_vision(m: Manifest, where: str) -> None:
    if not m.vision.graphs:
        raise UserError(f"{where}: vision.graphs lists no vision graph")
    seen = set()
    for i, g in enumerate(m.vision.graphs):
        at = f"{where}: vision.graphs[{i}]"
        checks.choice(g.precision, f"{at}.precision", PRECISIONS)
        if g.precision in seen:
            raise UserError(f"{at}: a second {g.precision} graph")
        seen.add(g.precision)
        if not g.files or g.files[0] != g.file:
            raise UserError(f"{at}: files must list the graph {g.file!r} first")
        for name in g.files:
            _bare_name(name, where, f"vision.graphs[{i}].files")
        checks.integer(g.opset, f"{at}.opset", 1, 1000)
        checks.integer(g.bytes, f"{at}.bytes", 0)


def _check_decoder(m: Manifest, where: str) -> None:
    d = m.decoder
    if not d.files or len(set(d.files)) < len(d.files):
        raise UserError(f"{where}: decoder.files must list each decoder file once")
    for name in d.files:
        _bare_name(name, where, "decoder.files")
    checks.choice(d.dtype, f"{where}: decoder.dtype", ("bf16",))
    for name, t in d.tensors.items():
        checks.choice(t.dtype, f"{where}: decoder.tensors.{name}.dtype", TENSOR_CODES)
        for n in t.shape:
            checks.integer(n, f"{where}: decoder.tensors.{name}.shape", 0, 1 << 31)
    expected = {name: ("BF16", None) for name in d.high_precision}
    for prefix, q in d.quantized.items():
        expected.update(_quantized_tensors(prefix, q, f"{where}: decoder.quantized.{prefix}"))
    for name, (dtype, shape) in expected.items():
        t = d.tensors.get(name)
        if t is None:
            raise UserError(f"{where}: decoder tensor {name!r} is implied by decoder.quantized / high_precision but "
                            "not in decoder.tensors")
        if t.dtype != dtype or (shape is not None and t.shape != shape):
            raise UserError(f"{where}: decoder tensor {name!r} is {t.dtype} {t.shape}, its role needs {dtype}"
                            f"{'' if shape is None else ' ' + str(shape)}")
    extra = sorted(set(d.tensors) - set(expected))
    if extra:
        raise UserError(f"{where}: decoder tensor {extra[0]!r} is neither quantized nor high precision")


def _quantized_tensors(prefix: str, q: QuantEntry, at: str) -> dict[str, tuple[str, list[int]]]:
    """The tensors a quantized weight is stored as (docs/bundle-format.md: INT4 / INT8 layout): name -> dtype, shape."""
    checks.text(q.param, f"{at}.param", nonempty=True)
    if q.bits not in (4, 8):
        raise UserError(f"{at}.bits must be 4 or 8, got {q.bits}")
    if len(q.shape) not in (2, 3):
        raise UserError(f"{at}.shape must be [out, in] or [experts, out, in], got {q.shape}")
    *lead, out, cols = (checks.integer(n, f"{at}.shape", 1, 1 << 20) for n in q.shape)
    g = q.group_size
    if q.bits == 4:
        if g is None or checks.integer(g, f"{at}.group_size", 2) % 2 or cols % g:
            raise UserError(f"{at}: INT4 needs an even group_size dividing the {cols} input columns, got {g}")
        groups = cols // g
        found = {"qweight": ("U8", [*lead, out, groups, g // 2]), "scales": ("F16", [*lead, out, groups])}
        if not checks.boolean(q.symmetric, f"{at}.symmetric"):
            found["zeros"] = ("U8", [*lead, out, (groups + 1) // 2])
    else:
        if not q.symmetric or (g is not None and (checks.integer(g, f"{at}.group_size", 1) > cols or cols % g)):
            raise UserError(f"{at}: INT8 is symmetric with no group_size or one dividing {cols}")
        per_group = [] if g is None else [cols // g]
        found = {"qweight": ("I8", [*lead, out, cols]), "scales": ("F16", [*lead, out, *per_group])}
    return {f"{prefix}.{k}": v for k, v in found.items()}
