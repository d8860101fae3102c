"""Validation primitives shared by every boundary (options, API arguments, config files, manifests, paths).

A value a user or a file supplies is checked once, where it enters, and a bad one becomes a `UserError` whose one
line names the value and says what was expected. Nothing is coerced: `64.7` is not an integer, `"false"` is not a
boolean, NaN is not a number in any range. Standard library only (the CLI imports this before torch).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import UserError

MISSING = object()


def show(value, limit: int = 60) -> str:
    """A value as the error line shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(name: str, expected: str, value) -> UserError:
    return UserError(f"{name} must be {expected}, got {show(value)}")


def _bounds(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f" {'<' if hi_open else '<='} {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def integer(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """A true integer (not a bool, not 64.0, not "64") within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        raise _fail(name, "an integer" + _bounds(lo, hi), value)
    return value


def number(value, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> float:
    """A finite int or float (not a bool, not a string) within the bounds; returned as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = not (lo is not None and (value <= lo if lo_open else value < lo)) and \
            not (hi is not None and (value >= hi if hi_open else value > hi))
    if not ok:
        raise _fail(name, "a finite number" + _bounds(lo, hi, lo_open, hi_open), value)
    return float(value)


def boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def text(value, name: str, nonempty: bool = False) -> str:
    """A str that is valid Unicode (no lone surrogates, which is how Python carries undecodable argv bytes)."""
    if not isinstance(value, str) or (nonempty and not value):
        raise _fail(name, "a non-empty string" if nonempty else "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{name} is not valid UTF-8 text (undecodable byte at character {e.start})") from None
    return value


def choice(value, name: str, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise _fail(name, "one of " + ", ".join(options), value)
    return value


def int_pairs(value, name: str, lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """A non-empty list of [a, b] integer pairs, each in [lo, hi] (candidate resolutions)."""
    ok = isinstance(value, list) and value and all(isinstance(p, list) and len(p) == 2 for p in value)
    if not ok:
        raise _fail(name, "a non-empty list of [width, height] pairs", value)
    return tuple((integer(a, name, lo, hi), integer(b, name, lo, hi)) for a, b in value)


def numbers(value, name: str, count: int, lo: float, hi: float, lo_open: bool = False) -> tuple[float, ...]:
    """A list of exactly `count` finite numbers in the bounds (per-channel mean / std)."""
    if not isinstance(value, list) or len(value) != count:
        raise _fail(name, f"a list of {count} numbers", value)
    return tuple(number(v, name, lo, hi, lo_open) for v in value)


class Fields:
    """Typed reads from one parsed JSON / TOML object; every error names `where` and the field."""

    def __init__(self, data, where: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise UserError(f"{where}: {prefix.rstrip('.') or 'the file'} must be an object, got {show(data)}")
        self.data, self.where, self.prefix = data, where, prefix

    def name(self, key: str) -> str:
        return f"{self.where}: {self.prefix}{key}"

    def raw(self, key: str, default=MISSING):
        if key not in self.data:
            if default is MISSING:
                raise UserError(f"{self.name(key)} is missing")
            return default
        return self.data[key]

    def int(self, key: str, lo: int | None = None, hi: int | None = None, default=MISSING):
        v = self.raw(key, default)
        return v if v is None and default is None else integer(v, self.name(key), lo, hi)

    def float(self, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
              default=MISSING) -> float:
        return number(self.raw(key, default), self.name(key), lo, hi, lo_open)

    def bool(self, key: str, default=MISSING) -> bool:
        return boolean(self.raw(key, default), self.name(key))

    def str(self, key: str, default=MISSING, options=None, nonempty: bool = False) -> str:
        v = self.raw(key, default)
        return choice(v, self.name(key), options) if options else text(v, self.name(key), nonempty)

    def section(self, key: str) -> "Fields":
        return Fields(self.raw(key), self.where, f"{self.prefix}{key}.")


# --- paths ----------------------------------------------------------------------------------------------------------

def path_arg(value, name: str) -> Path:
    """A path an API caller passes: a str or Path, not empty, without NUL (undecodable bytes are fine: Linux names)."""
    if not isinstance(value, (str, Path)) or not str(value) or "\0" in str(value):
        raise _fail(name, "a path", value)
    return Path(value).expanduser()


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file (symlinks followed); a FIFO, device or socket is refused before anything opens
    it (opening a FIFO blocks forever)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except ValueError:  # an embedded NUL byte
        raise UserError(f"{show(str(path))}: not a valid file name") from None
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file (a FIFO, device or socket), expected a {what}")
    return path


def read_bytes(path: str | Path, what: str = "file", max_bytes: int = 64 << 20) -> bytes:
    """The bytes of a regular file no larger than `max_bytes` (metadata files: a limit far above any real one)."""
    path = regular_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"{path}: {size} bytes, over the {max_bytes >> 20} MiB a {what} may have")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror})") from None


def read_text(path: str | Path, what: str = "file", max_bytes: int = 64 << 20) -> str:
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json(path: str | Path, what: str = "JSON file", max_bytes: int = 64 << 20):
    return parse_json(read_text(path, what, max_bytes), str(path))


def parse_json(text_: str, where: str):
    """Strict JSON: Python's NaN / Infinity extensions refused, and nesting too deep for the parser an error too."""
    try:
        return json.loads(text_, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where}: not valid JSON ({' '.join(str(e).split())[:200]})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def inside(root: Path, name, what: str, allowed: tuple[Path, ...] = ()) -> Path:
    """`root / name` for a file name taken from a file (an index, a manifest): a relative path without `..` whose
    real location (symlinks resolved) stays under `root` or one of `allowed`; anything else is refused unopened."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\0" in name:
        raise UserError(f"{root}: {what} {show(name)} is not a relative file name")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UserError(f"{root}: {what} {show(name)} points outside its folder")
    if any(p in ("", ".") for p in parts):
        raise UserError(f"{root}: {what} {show(name)} is not a plain relative path")
    path = root / name
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(Path(os.path.realpath(r))) for r in (root, *allowed)):
        raise UserError(f"{root}: {what} {name} is a link to {real}, outside its folder")
    return path


def torch_device(value, name: str = "device") -> str:
    """`cpu`, `cuda` or `cuda:N` that this torch build and machine can use, as a string."""
    import torch

    if isinstance(value, torch.device):
        value = str(value)
    text(value, name, nonempty=True)
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise _fail(name, "cpu, cuda or cuda:N", value) from None
    if dev.type == "cpu" and not dev.index:
        return "cpu"
    if dev.type != "cuda":
        raise _fail(name, "cpu, cuda or cuda:N", value)
    if torch.version.cuda is None:
        raise UserError(f"{name} {value}: this torch build has no CUDA support (torch {torch.__version__})")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (dev.index or 0) >= count:
        raise UserError(f"{name} {value}: {count} CUDA device(s) visible")
    return str(dev)
