"""The canonical on-disk quantized weight formats (the ONNX `MatMulNBits` layout): what the runtime reads.

INT4, group-wise, for a weight [out, in] with groups of `g` consecutive input columns:
    qweight uint8 [out, in/g, g/2]   two 4-bit codes per byte, LOW nibble first (code 2j low, 2j+1 high)
    scales  fp16  [out, in/g]
    zeros   uint8 [out, ceil((in/g)/2)]   asymmetric only: 4-bit zero points packed low nibble first, high nibble of
                                          an odd last byte is 0 padding (MatMulNBits zero-point packing)
    value = (code - zero) * scale, zero = 8 when symmetric (no zeros tensor).
INT8, symmetric: qweight int8 [out, in], scales fp16 [out] (per channel) or [out, in/g] (per group);
    value = code * scale.
Routed experts add a leading expert axis to every tensor ([E, out, ...]); every class and function here takes any
number of leading axes.

This module is the runtime's half: containers, packing and loading. How weights are rounded onto the grid (RTN,
GPTQ) is toolchain work in `edge_vl2.quantize`, which a device never imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_SYMMETRIC_ZERO = 8

# --- packing ------------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., n] (n even) -> uint8 [..., n/2], element 2j in the low nibble, 2j+1 in the high."""
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int4 takes uint8 codes, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4 codes must be 0..15, got {int(q.max())}")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> uint8 codes [..., n], the inverse of pack_int4."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes uint8, got {packed.dtype}")
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """uint8 zero points [..., n_groups] -> [..., ceil(n_groups/2)], padding an odd count with a 0 nibble."""
    if zeros.shape[-1] % 2:
        zeros = torch.cat([zeros, zeros.new_zeros(*zeros.shape[:-1], 1)], dim=-1)
    return pack_int4(zeros)


# --- the formats --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int4Weight:
    """INT4 group-wise weight [..., out, in] in the MatMulNBits layout (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [..., out, in/g, g/2]
    scales: torch.Tensor  # fp16 [..., out, in/g]
    zeros: torch.Tensor | None = None  # uint8 [..., out, ceil(in/g / 2)] or None (symmetric, zero point 8)

    bits = 4

    def __post_init__(self):
        q, s, z = self.qweight, self.scales, self.zeros
        if q.dtype != torch.uint8 or q.dim() < 3:
            raise ValueError(f"INT4 qweight must be uint8 [..., out, in/g, g/2], got {q.dtype} {list(q.shape)}")
        if s.dtype != torch.float16 or s.shape != q.shape[:-1]:
            raise ValueError(f"INT4 scales must be fp16 {list(q.shape[:-1])}, got {s.dtype} {list(s.shape)}")
        if z is not None:
            want = (*q.shape[:-2], (q.shape[-2] + 1) // 2)
            if z.dtype != torch.uint8 or z.shape != want:
                raise ValueError(f"INT4 zeros must be uint8 {list(want)}, got {z.dtype} {list(z.shape)}")

    @property
    def group_size(self) -> int:
        return 2 * self.qweight.shape[-1]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized shape [..., out, in]."""
        q = self.qweight
        return (*q.shape[:-2], q.shape[-2] * self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def zero_points(self) -> torch.Tensor:
        """uint8 zero points [..., out, in/g] (8 everywhere when symmetric)."""
        n_groups = self.qweight.shape[-2]
        if self.zeros is None:
            return torch.full(self.scales.shape, INT4_SYMMETRIC_ZERO, dtype=torch.uint8, device=self.scales.device)
        return unpack_int4(self.zeros)[..., :n_groups]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> [..., out, in] = (code - zero) * scale, computed in fp32."""
        codes = unpack_int4(self.qweight).float()  # [..., out, in/g, g]
        w = (codes - self.zero_points().float()[..., None]) * self.scales.float()[..., None]
        return w.flatten(-2).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """{prefix}.qweight, {prefix}.scales (and {prefix}.zeros), contiguous, ready for safetensors."""
        return {f"{prefix}.{k}": v.contiguous() for k, v in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, prefix: str, tensors) -> "Int4Weight":
        """Read {prefix}.qweight/.scales (and .zeros when present: asymmetric) from a mapping of tensors."""
        return cls(_require(tensors, prefix, "qweight"), _require(tensors, prefix, "scales"),
                   tensors[f"{prefix}.zeros"] if f"{prefix}.zeros" in tensors else None)

    def expert(self, e: int) -> "Int4Weight":
        """One expert of a stacked weight [E, out, ...]."""
        return Int4Weight(self.qweight[e], self.scales[e], None if self.zeros is None else self.zeros[e])

    @staticmethod
    def stack(weights: list["Int4Weight"]) -> "Int4Weight":
        """Per-expert weights (same shape and symmetry) -> one stacked weight [E, out, ...]."""
        if len({w.symmetric for w in weights}) != 1:
            raise ValueError("cannot stack symmetric and asymmetric INT4 weights")
        zeros = None if weights[0].zeros is None else torch.stack([w.zeros for w in weights])
        return Int4Weight(torch.stack([w.qweight for w in weights]), torch.stack([w.scales for w in weights]), zeros)


@dataclass(frozen=True)
class Int8Weight:
    """Symmetric INT8 weight [..., out, in]: int8 codes and fp16 scales per channel [..., out] or per group."""

    qweight: torch.Tensor  # int8 [..., out, in]
    scales: torch.Tensor  # fp16 [..., out] or [..., out, in/g]

    bits = 8
    symmetric = True
    zeros = None

    def __post_init__(self):
        q, s = self.qweight, self.scales
        if q.dtype != torch.int8 or q.dim() < 2:
            raise ValueError(f"INT8 qweight must be int8 [..., out, in], got {q.dtype} {list(q.shape)}")
        per_channel = s.shape == q.shape[:-1]
        per_group = s.dim() == q.dim() and s.shape[:-1] == q.shape[:-1] and s.shape[-1] > 0 \
            and q.shape[-1] % s.shape[-1] == 0
        if s.dtype != torch.float16 or not (per_channel or per_group):
            raise ValueError(f"INT8 scales must be fp16 {list(q.shape[:-1])} or [..., out, in/g], "
                             f"got {s.dtype} {list(s.shape)} for qweight {list(q.shape)}")

    @property
    def group_size(self) -> int | None:
        """None when the scales are per output channel."""
        if self.scales.dim() < self.qweight.dim():
            return None
        return self.qweight.shape[-1] // self.scales.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> [..., out, in] = code * scale, computed in fp32."""
        q = self.qweight.float()
        if self.group_size is None:
            return (q * self.scales.float()[..., None]).to(dtype)
        g = self.group_size
        w = q.unflatten(-1, (q.shape[-1] // g, g)) * self.scales.float()[..., None]
        return w.flatten(-2).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v.contiguous() for k, v in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, prefix: str, tensors) -> "Int8Weight":
        return cls(_require(tensors, prefix, "qweight"), _require(tensors, prefix, "scales"))

    def expert(self, e: int) -> "Int8Weight":
        return Int8Weight(self.qweight[e], self.scales[e])

    @staticmethod
    def stack(weights: list["Int8Weight"]) -> "Int8Weight":
        return Int8Weight(torch.stack([w.qweight for w in weights]), torch.stack([w.scales for w in weights]))


QuantizedWeight = Int4Weight | Int8Weight


def _require(tensors, prefix: str, name: str) -> torch.Tensor:
    key = f"{prefix}.{name}"
    if key not in tensors:
        raise ValueError(f"missing quantized tensor {key}")
    return tensors[key]


def load_quantized(prefix: str, tensors) -> QuantizedWeight:
    """Read whichever format {prefix}.qweight holds: uint8 -> Int4Weight, int8 -> Int8Weight."""
    q = _require(tensors, prefix, "qweight")
    if q.dtype == torch.uint8:
        return Int4Weight.from_state_dict(prefix, tensors)
    if q.dtype == torch.int8:
        return Int8Weight.from_state_dict(prefix, tensors)
    raise ValueError(f"{prefix}.qweight has dtype {q.dtype}; expected uint8 (INT4) or int8 (INT8)")
