"""The bnb backend: bitsandbytes NF4 / LLM.int8, for comparison (its fast CPU kernels need AVX-512)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..formats import QuantizedWeight
from .base import WeightOp


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise RuntimeError("the bnb backend needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes


class BnbOp(WeightOp):
    """bitsandbytes layers: NF4 Linear4bit or LLM.int8 Linear8bitLt (threshold 0: no fp16 outlier decomposition, a
    plain row-wise int8 weight), one per expert for stacks. bitsandbytes quantizes from a float weight: `matrix(e)`
    gives expert e's [N, K] (e is None for a plain weight), one at a time so no whole float stack is ever made."""

    def __init__(self, kind: str, shape: tuple[int, ...], matrix: Callable[[int | None], torch.Tensor],
                 blocksize: int = 64):
        bnb = _bnb()
        if kind not in ("nf4", "int8"):
            raise ValueError(f"bnb kind must be 'nf4' or 'int8', got {kind!r}")
        super().__init__(tuple(shape), "NF4" if kind == "nf4" else "LLM.int8")
        self.kernel = "bitsandbytes " + ("NF4 Linear4bit" if kind == "nf4" else "LLM.int8 Linear8bitLt")
        # LLM.int8 casts its input to fp16 (warning each call when given bf16): hand it fp16 in the first place
        self.compute_dtype = torch.bfloat16 if kind == "nf4" else torch.float16
        # bitsandbytes' AVX-512-BF16 CPU repacking needs whole blocks along the input: halve the block for narrow
        # weights (test-size models; the real dimensions are multiples of 64)
        while blocksize > 32 and shape[-1] % blocksize:
            blocksize //= 2
        layers = []
        for e in range(self.n_experts or 1):
            m = matrix(None if self.n_experts is None else e)
            n, k = m.shape
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                          device=m.device)
                layer.weight = bnb.nn.Params4bit(m.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                                 blocksize=blocksize)
            else:
                layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0, device=m.device)
                layer.weight = bnb.nn.Int8Params(m.to(torch.bfloat16), requires_grad=False, has_fp16_weights=False)
            layers.append(layer.to(m.device))  # moving to the device is what quantizes
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_quantized(cls, w: QuantizedWeight, kind: str) -> "BnbOp":
        """Re-quantize our weight (dequantized one expert at a time: a whole fp32 stack is ~0.6 GB at Tiny's size)."""
        return cls(kind, w.shape, lambda e: (w if e is None else w.expert(e)).dequantize(torch.float32))

    @classmethod
    def from_float(cls, dense: torch.Tensor, kind: str, blocksize: int = 64) -> "BnbOp":
        """Quantize a float weight [N, K] or stack [E, N, K] straight away (the benchmark's baseline)."""
        return cls(kind, tuple(dense.shape), lambda e: dense if e is None else dense[e], blocksize)

    def forward(self, x, expert=None):
        self._check_expert(expert)
        return self.layers[0 if expert is None else expert](x.to(self.compute_dtype))

    @property
    def nbytes(self) -> int:
        """Packed weights plus bitsandbytes' side tensors (NF4 block absmax, LLM.int8 row scales), which are plain
        attributes rather than parameters or buffers."""
        held = {}
        for layer in self.layers:
            w = layer.weight
            state = getattr(w, "quant_state", None)
            extra = [getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None),
                     getattr(w, "SCB", None), getattr(getattr(layer, "state", None), "SCB", None)]
            held.update({id(t): t for t in [w, *extra] if isinstance(t, torch.Tensor)})  # SCB may sit in both
        return sum(t.numel() * t.element_size() for t in held.values())

    def dequantized(self, expert: int | None = None) -> torch.Tensor:
        """The weight bitsandbytes actually multiplies by, in fp32 (for tests)."""
        bnb = _bnb()
        layer = self.layers[0 if expert is None else expert]
        if isinstance(layer, bnb.nn.Linear4bit):
            return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moved there by a forward
        return layer.weight.data.float() * scb.float()[:, None] / 127
