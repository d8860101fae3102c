"""The decode step with static shapes, captured once in a CUDA graph and replayed per token.

    step = DecodeStep(lm, cache)            # on CUDA: captured at the first call (after a warm-up); else eager
    logits = step(token, position)          # token/position go into the static inputs; logits is a static buffer

Why: at batch 1 a decode step is some hundreds of small kernels (per layer: norms, attention, router, the chosen
experts' matmuls); on a fast GPU launching them one by one from Python costs more than running them. A graph
launches them all at once.

The contract capture needs, which `DecodeStep(..., cuda_graph=False)` runs eagerly on any device (tests check it on
CPU, tests/test_decode_graph.py):
- fixed buffers: token [1] int64, pos [1] int64, logits [vocab] fp32 and the StaticCache's tensors, allocated once
  and written in place (their addresses never change);
- the same kernels on the same shapes at every position: attention spans the cache's whole capacity with the later
  positions masked (`LanguageModel.step`, edge_vl2.model.attention);
- no host sync inside the step: nothing reads a device value back to the host. The MoE's expert choice stays on the
  device because quantized experts of one format per layer run all (token, expert) rows in one kernel that picks the
  expert per row (`WeightOp.sync_free_rows`: the cuda backend's Triton kernels, the reference backend's gather).
`capture_blocker(lm)` names what breaks the last rule (float experts, mixed-format expert layers, kernels that loop
over chosen experts on the host); such a model decodes eagerly and says why.
"""

from __future__ import annotations

import time

import torch

from .errors import UserError, one_line
from .model.cache import StaticCache
from .model.decoder import LanguageModel
from .model.moe import MoE

WARMUP_STEPS = 2  # Triton compiles and cuBLAS sets up its workspace before capture, never during


def capture_blocker(lm: LanguageModel) -> str | None:
    """Why this model's decode step cannot be captured without a host sync, or None when it can."""
    from .quant.experts import QuantExperts

    for name, module in lm.named_modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        if not isinstance(experts, QuantExperts):
            return f"{name}: float routed experts pick their weights on the host (quantize them, or use eager decode)"
        if len(experts.groups) > 1:
            return f"{name}: experts in {len(experts.groups)} formats are dispatched per format on the host"
        slow = [op for op in experts.groups[0].ops if not op.sync_free_rows]
        if slow:
            return f"{name}: {slow[0].describe()} runs the chosen experts one by one from the host"
    return None


class DecodeStep:
    """One decode step over a fixed-capacity cache; `cuda_graph=True` captures it when the model is on CUDA and
    nothing blocks capture (`mode` says what runs: "cuda graph", or "eager: <why>")."""

    def __init__(self, lm: LanguageModel, cache: StaticCache, cuda_graph: bool = True):
        device = cache.layers[0].tensors[next(iter(cache.layers[0].tensors))].device
        self.lm, self.cache = lm, cache
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(lm.cfg.vocab_size, dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s = 0.0
        why = None
        if not cuda_graph:
            why = "CUDA graphs off"
        elif device.type != "cuda":
            why = f"the model is on {device.type}, not CUDA"
        else:
            why = capture_blocker(lm)
        self._capture_pending = why is None
        self.mode = "cuda graph" if why is None else f"eager: {why}"

    @property
    def captures(self) -> bool:
        """True when steps replay (or the first one will capture) a CUDA graph."""
        return self._capture_pending or self.graph is not None

    @torch.inference_mode()
    def _run(self) -> None:
        """The static step: reads token/pos, writes the cache slot at pos and the logits buffer."""
        hidden = self.lm.step(self.lm.model.embed_tokens(self.token), self.pos, self.cache)  # [1, H]
        self.logits.copy_(self.lm.logits(hidden)[0])

    def _capture(self) -> None:
        """Warm up on a side stream (as PyTorch requires before capture) with PyTorch's sync debug mode set to
        "error", so a host sync in the step is an exception here rather than a silently wrong graph; then record
        one step. The warm-up writes the cache slot at the current position, which the first real step writes again
        before anything reads it."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        debug = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._run()
        finally:
            torch.cuda.set_sync_debug_mode(debug)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run()
        torch.cuda.synchronize()
        self.graph, self.capture_s = graph, time.perf_counter() - t0

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] fp32 after `token` at `position` (the static buffer: the next call overwrites it)."""
        if not 0 <= position < self.cache.capacity:
            raise UserError(f"decode position {position} is outside the cache of {self.cache.capacity}")
        self.token.fill_(token)  # a fill kernel with the value as its argument: no sync
        self.pos.fill_(position)
        if self._capture_pending:
            self._capture_pending = False
            try:
                self._capture()
            except RuntimeError as e:  # a sync or an op capture refuses: decode eagerly and say why
                self.graph, self.mode = None, f"eager: capture failed ({one_line(e)})"
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        self.cache.length = position + 1
        return self.logits
