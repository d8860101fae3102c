"""Bounded-time fuzzing of the readers that take files from outside: safetensors (checkpoint shards and bundle
decoder files), the bundle manifest, and the tokenizer files. Not run by the test suite; a developer runs

    edge-vl2 fuzz --seconds 60 [--targets safetensors,manifest,tokenizer] [--seed N]

Each target starts from a small valid seed made here (no checkpoint needed) and lets hypothesis damage it: JSON
values replaced, deleted or added anywhere in a header / manifest / tokenizer file, bytes flipped, inserted or cut.
The reader must return or raise a UserError (one line for the user). Anything else, or a call running past
`--case-seconds`, is a crash: hypothesis shrinks it and the command prints the smallest input's error, exit status 1.
Needs hypothesis (`pip install hypothesis`).
"""

from __future__ import annotations

import json
import signal
import struct
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

TARGETS = ("safetensors", "manifest", "tokenizer")


class CaseTimeout(BaseException):
    """One input ran past --case-seconds (a BaseException so the readers' `except Exception` cannot hide it)."""


# --- seeds: small valid inputs ----------------------------------------------------------------------------------------

def safetensors_seed(quantized: bool = True) -> bytes:
    """A file with a tensor of every float dtype a checkpoint holds, an empty one and metadata; with `quantized`, also
    the integer code tensors of a bundle (which a checkpoint refuses)."""
    import torch
    from safetensors.torch import save

    tensors = {"language.model.norm.weight": torch.linspace(-1, 1, 8).to(torch.bfloat16),
               "scales": torch.ones(2, 3, dtype=torch.float16), "f32": torch.zeros(3),
               "empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    if quantized:
        tensors |= {"codes": torch.arange(5, dtype=torch.uint8),
                    "int8": torch.arange(-8, 8, dtype=torch.int8).view(4, 4)}
    return save(tensors, metadata={"format": "pt"})


def manifest_seed() -> dict:
    """A small manifest that passes every check of `Manifest.from_dict` (its files are not there: only the manifest
    reader is exercised)."""
    from ..bundle.manifest import MANIFEST, SCHEMA, SCHEMA_VERSION, manifest_digest
    from ..inputs.processor import ProcessorConfig
    from .synth.configs import synthetic_config
    from .synth.writer import PROCESSOR_CONFIG

    cfg = synthetic_config("tiny", "test")
    vocab, hidden = cfg["language_config"]["vocab_size"], cfg["language_config"]["hidden_size"]
    files = ["decoder-00001.safetensors", "vision-fp32.onnx", "tokenizer.json"]
    m = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "toolchain_version": "0.1.0",
         "source": {"model": "m", "path": "/m", "revision": None, "config_sha256": "0" * 64}, "variant": "tiny",
         "config": cfg, "tokens": {"bos": 0, "eos": 1, "pad": 2, "image": 3, "special": {"<image>": 3}},
         "processor": {"config": ProcessorConfig.from_dict(PROCESSOR_CONFIG).to_dict(), "template": "deepseek",
                       "files": ["tokenizer.json"]},
         "recipe": {"name": "int8"},
         "decoder": {"files": files[:1], "dtype": "bf16", "bytes": 0, "high_precision": ["language.model.norm.weight"],
                     "tensors": {"language.model.norm.weight": {"dtype": "BF16", "shape": [hidden]},
                                 "language.lm_head.qweight": {"dtype": "I8", "shape": [vocab, hidden]},
                                 "language.lm_head.scales": {"dtype": "F16", "shape": [vocab]}},
                     "quantized": {"language.lm_head": {"param": "language.lm_head.weight", "bits": 8,
                                                        "group_size": None, "symmetric": True,
                                                        "shape": [vocab, hidden]}}},
         "vision": {"graphs": [{"file": files[1], "files": files[1:2], "precision": "fp32", "opset": 18,
                                "ir_version": 10, "exporter": None, "inputs": {}, "outputs": {}, "dynamic_axes": {},
                                "bytes": 0, "validation": {}}]},
         "fidelity": {"skipped": "seed"}, "files": {f: {"bytes": 0, "sha256": "0" * 64} for f in files}}
    assert MANIFEST
    m["digest"] = manifest_digest(m)
    return m


def tokenizer_seed() -> dict[str, str]:
    """A byte-level BPE with no merges and the DeepSeek-VL2 special tokens: tokenizer.json and special_tokens_map."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ..inputs.tokenizer import (
        ASSISTANT_TOKEN,
        BOS_TOKEN,
        DET_END_TOKEN,
        DET_TOKEN,
        EOS_TOKEN,
        GROUNDING_TOKEN,
        IMAGE_TOKEN,
        PAD_TOKEN,
        REF_END_TOKEN,
        REF_TOKEN,
        USER_TOKEN,
    )

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, REF_TOKEN, REF_END_TOKEN, DET_TOKEN,
                            DET_END_TOKEN, GROUNDING_TOKEN, USER_TOKEN, ASSISTANT_TOKEN])
    stm = {"bos_token": BOS_TOKEN, "eos_token": {"content": EOS_TOKEN, "lstrip": False}, "pad_token": PAD_TOKEN}
    return {"tokenizer.json": tok.to_str(), "special_tokens_map.json": json.dumps(stm)}


# --- the readers under test -----------------------------------------------------------------------------------------

def read_checkpoint_shard(data: bytes, folder: Path) -> None:
    """A checkpoint's single `model.safetensors`: header, dtypes, every tensor read and checked for NaN."""
    from ..model.checkpoint import CheckpointReader, check_dtypes

    (folder / "model.safetensors").write_bytes(data)
    reader = CheckpointReader(folder)
    check_dtypes(reader.dtypes, folder)
    for name in reader.weight_map:
        reader.get(name)


def read_bundle_shard(data: bytes, folder: Path) -> None:
    """A bundle decoder file: `verify_tensors` against a manifest that agrees with safetensors' own reading of the
    header (what check_manifest lets through), then the runtime's own memory-mapped reader."""
    from safetensors import safe_open

    from ..bundle.manifest import TENSOR_CODES, TensorEntry
    from ..bundle.reader import mmap_tensors, verify_tensors
    from ..errors import UserError

    (folder / "decoder.safetensors").write_bytes(data)
    try:
        with safe_open(folder / "decoder.safetensors", framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            table = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in names}
    except Exception:  # noqa: BLE001 - a file safetensors refuses is refused by verify_tensors too (checked below)
        table = {}
    if any(dtype not in TENSOR_CODES for dtype, _ in table.values()):
        raise UserError("a dtype no manifest can hold")  # check_manifest refuses it before any file is read
    entries = {k: TensorEntry(d, s) for k, (d, s) in table.items()}
    manifest = SimpleNamespace(decoder=SimpleNamespace(files=["decoder.safetensors"], tensors=entries))
    verify_tensors(folder, manifest)
    for t in mmap_tensors(folder / "decoder.safetensors").values():
        t.float().sum()  # the bytes are really there


def read_manifest_text(text: bytes, folder: Path) -> None:
    from ..bundle.manifest import MANIFEST
    from ..bundle.reader import read_manifest

    (folder / MANIFEST).write_bytes(text)
    read_manifest(folder)


def read_tokenizer(files: dict[str, bytes], folder: Path) -> None:
    from ..inputs.tokenizer import Tokenizer

    for name, data in files.items():
        (folder / name).write_bytes(data)
    tok = Tokenizer.from_pretrained(folder)
    ids = tok.encode("Grüße <image> 123 \U0001f642 <|ref|>x<|/ref|>")
    stream = tok.stream()
    text = "".join(stream.add(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids), "streamed text differs from decode"


# --- mutations ----------------------------------------------------------------------------------------------------

def _strategies():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
               | st.text(max_size=12) | st.sampled_from(["BF16", "F16", "U8", "I8", "BOOL", "F64", "Q4", "", "int8"]))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                        max_size=4), max_leaves=8)
    return st, values


def json_paths(doc, prefix=()) -> list[tuple]:
    """Where a JSON document can be edited: the root and every key and list item (the first 8), as key paths."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            out += json_paths(v, (*prefix, i))
    return out


def mutate_json(data, doc, paths: list[tuple]):
    """Up to three edits of a JSON document: a value replaced, a key deleted or a key added, at any depth."""
    import copy

    st, values = _strategies()
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        parent, key = doc, None
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1] if path else None
            if key is None:
                doc = data.draw(values, label="document")
            elif action == "replace":
                parent[key] = data.draw(values, label="value")
            elif action == "delete" and isinstance(parent, dict):
                del parent[key]
            elif isinstance(parent[key], dict):
                parent[key][data.draw(st.text(max_size=8), label="new key")] = data.draw(values, label="value")
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
    return doc


def mutate_bytes(data, blob: bytes) -> bytes:
    st, _ = _strategies()
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 4), label="byte edits")):
        if not out:
            break
        pos = data.draw(st.integers(0, len(out) - 1), label="position")
        kind = data.draw(st.sampled_from(["flip", "insert", "cut"]), label="byte edit")
        if kind == "flip":
            out[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif kind == "insert":
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
        else:
            del out[pos:pos + data.draw(st.integers(1, 64), label="cut")]
    return bytes(out)


def _safetensors_input(data, seeds: list[bytes], paths) -> bytes:
    """Either seed (a checkpoint's floats only, or a bundle's with integer codes), its header damaged, then bytes."""
    st, _ = _strategies()
    k = data.draw(st.integers(0, len(seeds) - 1), label="seed")
    seed, paths = seeds[k], paths[k]
    (n,) = struct.unpack("<Q", seed[:8])
    header = json.loads(seed[8:8 + n])
    body = seed[8 + n:]
    text = json.dumps(mutate_json(data, header, paths)).encode()
    text += b" " * (-len(text) % 8)
    return mutate_bytes(data, struct.pack("<Q", len(text)) + text + body)


def _manifest_input(data, seed: dict, paths) -> bytes:
    from ..bundle.manifest import canonical_json, manifest_digest

    doc = mutate_json(data, seed, paths)
    try:
        if isinstance(doc, dict) and data.draw(_strategies()[0].booleans(), label="reseal"):
            doc["digest"] = manifest_digest(doc)  # most damage is sealed again, as a determined user would
        text = canonical_json(doc).encode()
    except (TypeError, ValueError):  # values canonical JSON cannot write (huge floats are fine; keys are not)
        text = json.dumps(doc).encode()
    return mutate_bytes(data, text)


def _tokenizer_input(data, seed: dict[str, str], paths) -> dict[str, bytes]:
    st, _ = _strategies()
    name = data.draw(st.sampled_from(sorted(seed)), label="file")
    out = {k: v.encode() for k, v in seed.items()}
    out[name] = mutate_bytes(data, json.dumps(mutate_json(data, json.loads(seed[name]), paths[name])).encode())
    return out


# --- the loop -------------------------------------------------------------------------------------------------------

def _target(name: str):
    """(seed, its JSON paths, input strategy, the readers that get each input) of one target."""
    if name == "safetensors":
        seeds = [safetensors_seed(quantized=False), safetensors_seed(quantized=True)]
        paths = [json_paths(json.loads(s[8:8 + struct.unpack("<Q", s[:8])[0]])) for s in seeds]
        return seeds, paths, _safetensors_input, (read_checkpoint_shard, read_bundle_shard)
    if name == "manifest":
        seed = manifest_seed()
        return seed, json_paths(seed), _manifest_input, (read_manifest_text,)
    seed = tokenizer_seed()
    return seed, {k: json_paths(json.loads(v)) for k, v in seed.items()}, _tokenizer_input, (read_tokenizer,)


def _alarm(signum, frame):
    raise CaseTimeout()


def fuzz(name: str, seconds: float, case_seconds: int, seed: int | None, log=print) -> dict:
    """Run one target until `seconds` have passed; returns {target, seconds, inputs, user_errors, crashes, crash}."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    from ..errors import UserError

    stats = {"target": name, "inputs": 0, "reads": 0, "accepted": 0, "user_errors": 0, "crashes": 0, "crash": None}
    seed_value, paths, make_input, readers = _target(name)
    start = time.perf_counter()  # after the imports and the seed: the time is the fuzzing's

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate, Phase.shrink], derandomize=False)
    @given(st.data())
    def one(data):
        value = make_input(data, seed_value, paths)
        stats["inputs"] += 1
        for reader in readers:
            stats["reads"] += 1
            with tempfile.TemporaryDirectory() as tmp:
                signal.alarm(case_seconds)
                try:
                    reader(value, Path(tmp))
                    stats["accepted"] += 1
                except UserError as e:
                    stats["user_errors"] += 1
                    if "\n" in str(e):
                        raise AssertionError(f"{reader.__name__}: a UserError of several lines: {e!r}") from None
                except CaseTimeout:
                    raise AssertionError(f"{reader.__name__}: ran past {case_seconds} s") from None
                finally:
                    signal.alarm(0)

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        round_ = 0
        while time.perf_counter() - start < seconds:
            test = hseed(seed + round_)(one) if seed is not None else one
            round_ += 1
            try:
                test()
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                stats["crashes"] += 1
                stats["crash"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
                log(f"{name}: CRASH {stats['crash']}")
                break
    finally:
        signal.signal(signal.SIGALRM, previous)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    return stats


def run_fuzz(targets: list[str], seconds: float, case_seconds: int = 20, seed: int | None = None,
             log=print) -> tuple[list[dict], str]:
    """Fuzz each target for an equal share of `seconds`; returns the per-target records and a summary line."""
    results = [fuzz(t, seconds / len(targets), case_seconds, seed, log) for t in targets]
    line = (f"fuzz: {sum(r['seconds'] for r in results):.0f} s, {sum(r['inputs'] for r in results)} inputs, "
            f"{sum(r['reads'] for r in results)} reads ({sum(r['accepted'] for r in results)} accepted, "
            f"{sum(r['user_errors'] for r in results)} refused with a one-line error), "
            f"{sum(r['crashes'] for r in results)} crashes")
    return results, line
