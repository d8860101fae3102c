"""The CUDA-graph decode path and the budgeted prefill (edge_vl2.decode_graph, LanguageModel.step, generate), checked
on CPU where the same static step runs eagerly:

- the static step (attention over the whole cache capacity, later positions masked, cache written with index_copy_)
  gives the eager decode's logits, for plain attention (Tiny) and MLA (Small);
- the contract a CUDA graph needs: the same ops on the same shapes at every position, no op that reads a device
  value back to the host, fixed buffers and cache tensors written in place at the step's slot only;
- the MoE's expert choice stays on the device: the cuda backend's Triton row kernel (Triton's CPU interpreter here)
  decodes the same greedy tokens as the reference backend, through the static step;
- what cannot be captured is refused with its reason, and a request for graphs off CUDA decodes eagerly;
- the prefill chunk follows the device profile's memory budget, and chunking does not change the answer.

Tolerances: everything runs in fp32; the static step sums over extra masked keys whose probability is exactly 0,
so it differs from the eager step by summation order only (measured ~1e-7 of the logits' scale): bound 1e-5.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edge_vl2.decode_graph import DecodeStep, capture_blocker
from edge_vl2.devices.profiles import PREFILL_MAX_GB, load_device, prefill_budget
from edge_vl2.generate import PREFILL_CHUNK_RANGE, SamplingParams, decode_step, generate_tokens, prefill, \
    prefill_chunk_tokens
from edge_vl2.model.cache import StaticCache
from edge_vl2.model.vl2 import load_model
from edge_vl2.quant.swap import swap_in_quantized_
from edge_vl2.quantize.rtn import rtn_decoder_weights

import _bundles
import _quant_case as qc

TRITON = importlib.util.find_spec("triton") is not None
# ops that make the host wait for the device (a value read back, or an output whose size depends on values)
HOST_SYNC_OPS = {"Tensor.tolist", "Tensor.numpy", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
                 "aten::equal", "aten::nonzero",
                 "aten::nonzero_static", "aten::masked_select", "aten::unique_consecutive", "aten::_unique2",
                 "aten::bincount", "aten::repeat_interleave"}


class OpLog(TorchDispatchMode):
    """Every aten op run under it, with the shapes and dtypes of its tensor inputs and outputs. `Tensor.tolist` and
    `Tensor.numpy` read values without an aten op: they are wrapped while the log is open and logged as host reads."""

    HOST_READS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self._saved = {}

    def __enter__(self):
        for name in self.HOST_READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def read(t, *args, _original=original, _name=name, **kwargs):
                self.calls.append((f"Tensor.{_name}", ((tuple(t.shape), t.dtype),)))
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        sig = tuple((tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor))
        self.calls.append((func._schema.name, sig))
        return out

    def syncs(self) -> list[str]:
        return sorted({name for name, _ in self.calls if name in HOST_SYNC_OPS})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # test-size matrices: see tests/test_quantized_model.py
    yield
    torch.set_num_threads(threads)


def quantized_model(tmp_path_factory, variant: str, backend: str, lm_head: bool = True):
    """Test-size `variant`, every decoder layer RTN INT4 (g32; INT8 where the INT4 kernels need it) on `backend`."""
    ckpt = _bundles.checkpoint(tmp_path_factory, variant)
    model, _ = load_model(ckpt, dtype=torch.float32)
    spec = qc.recipe("int4", model)
    weights = rtn_decoder_weights(model, lambda n: None if n == "language.lm_head" and not lm_head else spec(n))
    return swap_in_quantized_(model, weights, backend), ckpt


def prompt_embeds(model, n: int = 24) -> torch.Tensor:
    ids = torch.arange(100, 100 + n)
    return model.language.model.embed_tokens(ids)  # [n, H]


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_static_step_gives_the_eager_decode_logits(tmp_path_factory, variant):
    model, _ = quantized_model(tmp_path_factory, variant, "reference")
    lm, embeds = model.language, prompt_embeds(model)
    eager_cache, static_cache = (StaticCache(lm.cfg, 40, torch.float32) for _ in range(2))
    logits = prefill(lm, embeds, eager_cache)
    prefill(lm, embeds, static_cache)
    step = DecodeStep(lm, static_cache, cuda_graph=False)
    assert step.mode == "eager: CUDA graphs off" and step.graph is None
    for _ in range(6):
        token = int(logits.argmax())
        position = eager_cache.length
        logits = decode_step(lm, token, eager_cache)
        got = step(token, position)
        assert static_cache.length == eager_cache.length == position + 1
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-5 * float(logits.abs().max()))


def _step_and_log(step: DecodeStep, token: int, position: int) -> OpLog:
    with OpLog() as log:
        step(token, position)
    return log


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_static_step_keeps_the_capture_contract(tmp_path_factory, variant):
    """Same ops on the same shapes at every position, no host sync, fixed buffers, the cache written in place at the
    step's slot and nowhere else."""
    model, _ = quantized_model(tmp_path_factory, variant, "reference")
    lm = model.language
    cache = StaticCache(lm.cfg, 40, torch.float32)
    prefill(lm, prompt_embeds(model), cache)
    step = DecodeStep(lm, cache, cuda_graph=False)
    buffers = [step.token, step.pos, step.logits, *(t for layer in cache.layers for t in layer.tensors.values())]
    addresses = [t.data_ptr() for t in buffers]
    before = [t.clone() for layer in cache.layers for t in layer.tensors.values()]
    logs = [_step_and_log(step, 7, 24), _step_and_log(step, 9, 25), _step_and_log(step, 11, 31)]
    assert [t.data_ptr() for t in buffers] == addresses
    assert logs[0].syncs() == [] and logs[0].calls == logs[1].calls == logs[2].calls
    assert any(name == "aten::index_copy_" for name, _ in logs[0].calls)  # the in-place cache write
    after = [t for layer in cache.layers for t in layer.tensors.values()]
    for old, new in zip(before, after):
        slot_dim = 1 if old.dim() == 3 else 0  # MHA k/v [n_kv, cap, d]; MLA latent / k_pe [cap, c]
        changed = (old != new).movedim(slot_dim, 0).flatten(1).any(1)  # [cap]
        assert changed.nonzero().flatten().tolist() == [24, 25, 31]


@pytest.mark.skipif(not TRITON, reason="triton is not installed: the cuda backend cannot run here")
def test_triton_moe_decode_gives_the_reference_tokens(tmp_path_factory):
    """The cuda backend (Triton's interpreter on CPU, conftest sets TRITON_INTERPRET) through the static step: the
    routed experts of every decode step run in one row kernel per projection that reads each row's expert on the
    device; the same greedy tokens as the reference backend's eager decode, and no host sync in the step. lm_head
    stays float (the interpreter would spend minutes on its 129,280 rows)."""
    cuda_model, _ = quantized_model(tmp_path_factory, "tiny", "cuda", lm_head=False)
    ref_model, _ = quantized_model(tmp_path_factory, "tiny", "reference", lm_head=False)
    assert capture_blocker(cuda_model.language) is None
    embeds, ids = prompt_embeds(ref_model), torch.arange(100, 124)
    info: dict = {}
    want = [t for t, _ in generate_tokens(ref_model.language, embeds, ids, SamplingParams(max_new_tokens=5),
                                          eos_id=-1, cuda_graphs=True, info=info)]
    assert info["decode"] == "eager: the model is on cpu, not CUDA"  # capture itself needs a GPU (gpu-check.sh)
    lm = cuda_model.language
    cache = StaticCache(lm.cfg, 30, torch.float32)
    logits = prefill(lm, embeds, cache)
    step = DecodeStep(lm, cache, cuda_graph=False)
    got, syncs = [], set()
    for _ in range(5):
        got.append(int(logits.argmax()))
        log = _step_and_log(step, got[-1], cache.length)
        logits, syncs = step.logits, syncs | set(log.syncs())
    assert got == want and not syncs


def test_capture_blocker_names_what_needs_the_host(tmp_path_factory, monkeypatch):
    # the cpu backend on PyTorch's packed ops, which pick experts with a host read (qkern reads the ids in C, where
    # the op log cannot see it)
    monkeypatch.setenv("EDGE_VL2_CPU_KERNEL", "torch")
    ckpt = _bundles.checkpoint(tmp_path_factory, "tiny")
    model, _ = load_model(ckpt, dtype=torch.float32)
    assert "float routed experts" in capture_blocker(model.language)
    cpu, _ = quantized_model(tmp_path_factory, "tiny", "cpu")
    assert "one by one from the host" in capture_blocker(cpu.language)
    # ...and the op log sees that host read in its step (the contract test's "no sync" can fail)
    cache = StaticCache(cpu.language.cfg, 30, torch.float32)
    prefill(cpu.language, prompt_embeds(cpu).to(torch.float32), cache)
    assert "Tensor.tolist" in _step_and_log(DecodeStep(cpu.language, cache, cuda_graph=False), 5, 24).syncs()
    mixed = swap_in_quantized_(load_model(ckpt, dtype=torch.float32)[0],
                               rtn_decoder_weights(model, qc.recipe("mixed", model)), "reference")
    assert "formats are dispatched per format" in capture_blocker(mixed.language)


def test_prefill_chunk_follows_the_memory_budget():
    from edge_vl2.model.config import VL2Config
    from edge_vl2.tools.synth.configs import synthetic_config

    tiny = VL2Config.from_dict(synthetic_config("tiny", "full")).language
    small = VL2Config.from_dict(synthetic_config("small", "full")).language
    lo, hi = PREFILL_CHUNK_RANGE
    assert prefill_chunk_tokens(tiny, 0, 4096) == lo and prefill_chunk_tokens(tiny, 10**12, 4096) == hi
    chunks = [prefill_chunk_tokens(tiny, int(gb * 1e9), 4096) for gb in (0.2, 0.4, 0.8, 1.6)]
    assert chunks == sorted(chunks) and all(c % 64 == 0 for c in chunks)
    assert prefill_chunk_tokens(tiny, int(4e8), 1024) > prefill_chunk_tokens(tiny, int(4e8), 4096)
    assert prefill_chunk_tokens(small, int(4e8), 4096) < prefill_chunk_tokens(tiny, int(4e8), 4096)  # more heads
    # Tiny at the full 4,096-token context: ~0.94 MB of activations per query token, so 0.4 GB -> 384 tokens
    assert prefill_chunk_tokens(tiny, int(4e8), 4096) == 384
    # the profile's budget: half of what weights and a full cache leave, at least 0.4 GB, at most 4 GB
    kiosk, orin = load_device("cpu-kiosk"), load_device("orin-nano-8gb")
    assert prefill_budget(kiosk, int(5e9), int(1e9)) == int(0.5 * (12e9 - 6e9))
    assert prefill_budget(orin, int(6e9), int(1e9)) == int(0.4e9)  # nothing left: the floor
    assert prefill_budget(kiosk, 0, 0) == int(PREFILL_MAX_GB * 1e9)


def test_budgeted_chunks_give_the_same_answer(tmp_path_factory):
    """A 150-token prompt prefilled in 64-token chunks (the smallest budget) answers as in one pass."""
    model, _ = quantized_model(tmp_path_factory, "tiny", "reference")
    lm, embeds = model.language, prompt_embeds(model, 150)
    ids, params = torch.arange(100, 250), SamplingParams(max_new_tokens=4)
    info: dict = {}
    small = list(generate_tokens(lm, embeds, ids, params, eos_id=-1, prefill_budget=0, info=info))
    whole = list(generate_tokens(lm, embeds, ids, params, eos_id=-1, prefill_chunk=4096))
    assert info["prefill_chunk"] == 64 and info["decode"] == "eager"
    assert [t for t, _ in small] == [t for t, _ in whole]
    torch.testing.assert_close(small[0][1], whole[0][1], rtol=0, atol=1e-5 * float(whole[0][1].abs().max()))
