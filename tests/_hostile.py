"""Replaying the hostile-input corpus (tests/hostile/corpus.json, written by tests/hostile/make_corpus.py).

`prepare` damages a copy of a test-size artefact as a case's `setup` says (files hard-linked, and every change
written to a new file renamed into place, so the shared originals are never touched); `run_case` runs it in-process
(CliRunner or the Python API) or as a real process, time-bounded, and classifies what happened:

    error      one line "error: ..." (the API: a UserError without a newline), exit status 2
    ok         exit status 0 / the call returned
    traceback  any other exception, or a non-zero exit that is not a clean one-line error
    hang       still running after the time bound
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "hostile" / "corpus.json"
TIME_LIMIT_S = 180  # per case; a test-size load is ~1-10 s on the shared 2-core box


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran past TIME_LIMIT_S (a BaseException so no `except Exception` eats it)."""


@dataclass
class Outcome:
    kind: str  # error | ok | traceback | hang
    line: str = ""  # the error line, or the exception for a traceback
    stdout: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # expectation mismatches and leftovers


# --- values -----------------------------------------------------------------------------------------------------------

def decode(value, ctx: dict):
    """Tagged JSON values -> Python values, placeholders in strings (and bytes) filled in."""
    from PIL import Image

    if isinstance(value, str):
        for k, v in ctx.items():
            value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, list):
        return [decode(v, ctx) for v in value]
    if isinstance(value, dict):
        if value.get("$") == "delete":
            return value  # a setup instruction, not a value
        if "$" in value:
            return {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "none": None,
                    "object": object()}[value["$"]]
        if "$bytes" in value:
            raw = bytes.fromhex(value["$bytes"])
            for k, v in ctx.items():
                raw = raw.replace(b"{" + k.encode() + b"}", os.fsencode(v))
            return raw
        if "$tuple" in value:
            return tuple(decode(v, ctx) for v in value["$tuple"])
        if "$path" in value:
            return Path(decode(value["$path"], ctx))
        if "$pil" in value:
            mode, w, h = value["$pil"]
            return Image.new(mode, (w, h))
        return {k: decode(v, ctx) for k, v in value.items()}
    return value


# --- setup: damaging a copy ---------------------------------------------------------------------------------------------

def _replace(path: Path, data: bytes) -> None:
    """Write a new file and rename it over `path`: a hard-linked original keeps its bytes."""
    tmp = path.with_name(path.name + ".edit")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _walk(obj, path: str, create: bool = False):
    """(container, key) of a dotted path whose keys may themselves hold dots (tensor names, file names)."""
    rest = path
    while True:
        if isinstance(obj, list):
            head, _, tail = rest.partition(".")
            key = int(head)
            if not tail:
                return obj, key
            obj, rest = obj[key], tail
            continue
        keys = sorted((k for k in obj if rest == k or rest.startswith(k + ".")), key=len, reverse=True)
        if not keys:
            if create:
                return obj, rest
            raise KeyError(path)
        if keys[0] == rest:
            return obj, rest
        obj, rest = obj[keys[0]], rest[len(keys[0]) + 1:]


def _set(doc, path: str, value) -> None:
    obj, key = _walk(doc, path, create=True)
    if isinstance(value, dict) and value.get("$") == "delete":
        del obj[key]
    elif isinstance(value, dict) and "$ref" in value:
        src, skey = _walk(doc, value["$ref"])
        obj[key] = src[skey]
    else:
        obj[key] = value


def _image(path: Path, mode: str, w: int, h: int, fmt: str, frames: int = 1, orientation: int | None = None):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(w * 7 + h)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    im = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)) if mode == "I;16" else rgb.convert(mode)
    kwargs = {}
    if frames > 1:
        kwargs = {"save_all": True, "append_images": [rgb.convert(mode).rotate(90 * i) for i in range(1, frames)]}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    im.save(path, format=fmt, **kwargs)


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _shards(art: Path) -> list[Path]:
    if (art / "manifest.json").exists():
        return [art / f for f in json.loads((art / "manifest.json").read_text())["decoder"]["files"]]
    index = json.loads((art / "model.safetensors.index.json").read_text())
    return [art / f for f in sorted(set(index["weight_map"].values()))]


def _tensor_op(art: Path, name: str, op: str, arg) -> None:
    """Rewrite the shard holding `name` (the first shard for a new tensor) with the tensor changed."""
    import torch
    from safetensors.torch import load_file, save_file

    for shard in _shards(art):
        tensors = load_file(shard)
        if name in tensors or op == "add":
            break
    t = tensors.get(name)
    if op == "dtype":
        tensors[name] = t.to(getattr(torch, arg)) if arg != "bool" else t != 0
    elif op == "fill":
        tensors[name] = torch.full_like(t, float(arg))
    elif op == "shape":
        tensors[name] = torch.zeros(arg, dtype=t.dtype)
    elif op == "drop":
        del tensors[name]
    elif op == "add":
        tensors[name] = torch.ones(8, dtype=torch.bfloat16)
    save_file(tensors, str(shard) + ".edit", metadata={"format": "pt"})
    os.replace(str(shard) + ".edit", shard)
    index = art / "model.safetensors.index.json"
    if index.exists() and op in ("add", "drop"):
        doc = json.loads(index.read_text())
        if op == "add":
            doc["weight_map"][name] = shard.name
        else:
            del doc["weight_map"][name]
        _replace(index, json.dumps(doc).encode())


def reseal(art: Path, tensors: bool) -> None:
    """Make a damaged bundle consistent again, as a determined user would: the decoder tensor table from the shards'
    headers and every file's size and sha256 (with `tensors`), then the digest."""
    from safetensors import safe_open

    from edge_vl2.bundle.manifest import canonical_json, manifest_digest
    from edge_vl2.bundle.reader import sha256_file

    m = json.loads((art / "manifest.json").read_text())
    if tensors:
        table = {}
        for f in m["decoder"]["files"]:
            with safe_open(art / f, framework="pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    table[k] = {"dtype": s.get_dtype(), "shape": list(s.get_shape())}
        m["decoder"]["tensors"] = table
    files = m.get("files") if tensors else None
    if isinstance(files, dict):
        for name in files:
            p = art / name
            if isinstance(files[name], dict) and p.is_file() and "/" not in name:
                files[name] = {**files[name], "bytes": p.stat().st_size, "sha256": sha256_file(p)}
    m["digest"] = manifest_digest(m)
    _replace(art / "manifest.json", canonical_json(m).encode())


def prepare(case: dict, case_dir: Path, ctx: dict) -> dict:
    """Apply the case's setup inside `case_dir`; returns the placeholder values for this case."""
    ctx = {**ctx, "case": str(case_dir)}
    target = case_dir
    for op, *args in case["setup"]:
        args = [decode(a, ctx) for a in args]
        if op == "copy":
            target = case_dir / "art"
            shutil.copytree(ctx[args[0]], target, copy_function=os.link)
            ctx["art"] = str(target)
            continue
        p = target / os.fsdecode(args[0]) if args and isinstance(args[0], (str, bytes)) else None
        if op in ("write", "write_hex"):
            _unlink(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(args[1].encode() if op == "write" else bytes.fromhex(args[1]))
        elif op == "fifo":
            _unlink(p)
            os.mkfifo(p)
        elif op == "mkdir":
            _unlink(p)
            p.mkdir()
        elif op == "remove":
            _unlink(p)
        elif op == "truncate":
            _replace(p, p.read_bytes()[: args[1]])
        elif op == "flip":
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x01
            _replace(p, bytes(data))
        elif op == "truncate_copy":
            p = target / args[1]
            p.write_bytes(Path(args[0]).read_bytes()[: args[2]])
        elif op == "png_header":
            p.write_bytes(_png_header(args[1], args[2]))
        elif op == "image":
            _image(target / os.fsdecode(args[0]), *args[1:])
        elif op == "json_set":
            doc = json.loads(p.read_text())
            _set(doc, args[1], args[2])
            _replace(p, json.dumps(doc, ensure_ascii=False).encode())
        elif op == "json_text_replace":
            _replace(p, p.read_text().replace(args[1], args[2], 1).encode())
        elif op == "manifest_set":
            m = json.loads((target / "manifest.json").read_text())
            _set(m, args[0], args[1])
            _replace(target / "manifest.json", json.dumps(m).encode())
            reseal(target, tensors=False)
        elif op == "reseal":
            reseal(target, tensors=True)
        elif op == "tensor":
            _tensor_op(target, *args)
        else:
            _shard_op(op, args, target)
    return ctx


def _shard_op(op: str, args: list, art: Path) -> None:
    shard = _shards(art)[0] if op != "link_outside" else art / args[0]
    index = art / "model.safetensors.index.json"
    if op == "index_point":
        doc = json.loads(index.read_text())
        doc["weight_map"][args[0]] = args[1] if args[1] != "{shard}" else shard.name
        _replace(index, json.dumps(doc).encode())
    elif op == "copy_shard_outside":
        dst = art / args[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(shard, dst)
    elif op == "move_shard":
        (art / args[0]).parent.mkdir(parents=True, exist_ok=True)
        os.replace(shard, art / args[0])
    elif op == "link_shard":
        _unlink(shard)
        os.symlink(args[0], shard)
    elif op == "link_outside":
        outside = art.parent / "outside" / shard.name
        outside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(shard, outside)
        os.symlink(outside, shard)
    elif op == "shard_replace":
        head = shard.read_bytes()[:1000]
        _unlink(shard)
        if args[0] == "fifo":
            os.mkfifo(shard)
        elif args[0] == "mkdir":
            shard.mkdir()
        elif args[0] == "truncate":
            shard.write_bytes(head)
        elif args[0] == "garbage":
            shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    else:
        raise ValueError(f"unknown setup op {op!r}")


# --- running --------------------------------------------------------------------------------------------------------

def _alarm(signum, frame):
    raise CaseTimeout()


def _classify_cli(exit_code: int, stderr: str, stdout: str, exc) -> Outcome:
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if isinstance(exc, CaseTimeout):
        return Outcome("hang", stdout=stdout)
    if exc is not None and not isinstance(exc, SystemExit):
        return Outcome("traceback", f"{type(exc).__name__}: {exc}", stdout)
    if exit_code == 0:
        return Outcome("ok", stdout=stdout)
    if exit_code == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr:
        return Outcome("error", errors[0], stdout)
    return Outcome("traceback", f"exit {exit_code}: {stderr.strip()[-500:]}", stdout)


def _run_cli(argv: list[str]) -> Outcome:
    from click.testing import CliRunner

    from edge_vl2.cli import main

    result = CliRunner().invoke(main, argv, catch_exceptions=True)
    return _classify_cli(result.exit_code, result.stderr, result.stdout, result.exception)


def _run_process(argv: list, cwd: Path) -> Outcome:
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_vl2.cli", *argv], capture_output=True, cwd=cwd,
                              timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        return Outcome("hang")
    return _classify_cli(proc.returncode, proc.stderr.decode(errors="replace"), proc.stdout.decode(errors="replace"),
                         None)


def _api_call(call: str, args: list, kwargs: dict, ctx: dict, pipelines: dict):
    from edge_vl2.devices.profiles import load_device
    from edge_vl2.export.bundle_writer import ExportOptions, export_bundle
    from edge_vl2.generate import SamplingParams
    from edge_vl2.inputs.grounding import parse_grounding
    from edge_vl2.inputs.images import load_image
    from edge_vl2.pipeline import VL2Pipeline

    def tiny():
        if "tiny" not in pipelines:
            pipelines["tiny"] = VL2Pipeline.from_pretrained(ctx["tiny"], dtype="fp32")
        return pipelines["tiny"]

    if call == "SamplingParams":
        return SamplingParams(*args, **kwargs)
    if call == "from_pretrained":
        return VL2Pipeline.from_pretrained(**kwargs)
    if call == "from_bundle":
        return VL2Pipeline.from_bundle(**kwargs)
    if call == "prepare":
        return tiny().prepare(**kwargs)
    if call == "generate":
        kwargs.setdefault("inputs", tiny().prepare("hi"))
        kwargs.setdefault("sampling", SamplingParams(max_new_tokens=2))
        return tiny().generate(**kwargs)
    if call == "load_image":
        return load_image(*args)
    if call == "load_device":
        return load_device(*args)
    if call == "parse_grounding":
        return parse_grounding(args[0], tuple(args[1]))
    if call == "export_bundle":
        opts = {"model": ctx["tiny"], "out": f"{ctx['case']}/bundle", "method": "rtn", "fidelity_samples": 0,
                "vision": ("fp32",), **kwargs}
        return export_bundle(ExportOptions(**opts), log=lambda _m: None)
    raise ValueError(f"unknown api call {call!r}")


def _run_api(spec: dict, ctx: dict, pipelines: dict) -> Outcome:
    from edge_vl2.errors import UserError

    try:
        _api_call(spec["call"], decode(spec.get("args", []), ctx), decode(spec.get("kwargs", {}), ctx), ctx, pipelines)
    except CaseTimeout:
        return Outcome("hang")
    except UserError as e:
        text = str(e)
        return Outcome("error", f"error: {text}") if text and "\n" not in text else Outcome("traceback", text)
    except Exception as e:  # noqa: BLE001 - anything but a UserError is what the corpus hunts for
        return Outcome("traceback", f"{type(e).__name__}: {e}")
    return Outcome("ok")


def run_case(case: dict, ctx: dict, pipelines: dict) -> Outcome:
    """Run one prepared case with a time bound, in its own folder as the working directory."""
    import time

    old = os.getcwd()
    os.chdir(ctx["case"])
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    t0 = time.perf_counter()
    try:
        if "cli" in case:
            out = _run_cli(decode(case["cli"], ctx))
        elif "api" in case:
            out = _run_api(case["api"], ctx, pipelines)
        else:
            out = _run_process(decode(case["process"]["argv"], ctx), Path(ctx["case"]))
    except CaseTimeout:
        out = Outcome("hang")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old)
    out.seconds = time.perf_counter() - t0
    return out


def listing(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its type, size and mtime (symlinks not followed): what a case may not change."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_mode >> 12, st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out
