"""Test-size models, calibration sets and held-out references shared by the quantization-toolchain tests.

Built once per test session (functools.cache) in one temporary folder: the synthetic checkpoints are written with
`edge_vl2.tools.synth` exactly as `edge-vl2 synth` writes them, and loaded in fp32 with the ordinary loader. Tests must not
modify what they get here (the quantization code only reads models; `swapped` restores what it changes).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from edge_vl2.inputs.processor import Processor
from edge_vl2.model.vl2 import load_model
from edge_vl2.quantize.calibration import CalibrationSet, encode_samples, prepare_calibration
from edge_vl2.quantize.calibration_data import calibration_samples, evaluation_samples
from edge_vl2.quantize.fidelity import Reference, reference_from_encoded
from edge_vl2.tools.synth import write_checkpoint

MAX_TILES = 3  # 1 global + 2 local tiles: 617 image tokens, so a 768-token cut keeps the prompt text after it
MAX_TOKENS = 768
N_EVAL = 5  # held-out samples: ~2,000 positions, each a softmax over the 129k vocabulary


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="edge-vl2-toolchain-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def checkpoint(variant: str) -> Path:
    """A test-size synthetic checkpoint ("tiny": plain attention, "small": MLA); 3 layers, 2 of them MoE with 8
    experts top-3, hidden 64, the real vocabulary."""
    return write_checkpoint(_root() / variant, variant, "test", seed=0)


@functools.cache
def model(variant: str):
    """(fp32 model, processor) of `checkpoint(variant)`."""
    vl2, model_dir = load_model(checkpoint(variant), dtype=torch.float32)
    return vl2, Processor.from_pretrained(model_dir)


@functools.cache
def calibration(variant: str, n: int = 12) -> CalibrationSet:
    """Decoder inputs of `n` rendered calibration samples (seed 0), each cut at MAX_TOKENS."""
    vl2, processor = model(variant)
    return prepare_calibration(vl2, processor, calibration_samples(n, seed=0, max_tiles=MAX_TILES),
                               max_tokens=MAX_TOKENS)


@functools.cache
def reference(variant: str, n: int = N_EVAL) -> Reference:
    """The fp model's log-probabilities and routing on `n` held-out samples (the evaluation seed); the [T, 129k]
    log-probabilities live on disk and are memory-mapped one sample at a time (~0.25 GB each in memory)."""
    vl2, processor = model(variant)
    encoded = encode_samples(vl2, processor, evaluation_samples(n, max_tiles=MAX_TILES))
    return reference_from_encoded(vl2, encoded, max_tokens=MAX_TOKENS, cache_dir=_root() / f"reference-{variant}")


def parameters_snapshot(vl2) -> dict[str, torch.Tensor]:
    """Copies of every parameter, to prove a function left a model untouched."""
    return {n: p.detach().clone() for n, p in vl2.named_parameters()}


def assert_unchanged(vl2, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(vl2.named_parameters())
    assert set(params) == set(snapshot)
    changed = [n for n, p in params.items() if not torch.equal(p, snapshot[n])]
    assert not changed, f"model parameters changed: {changed[:5]}"
