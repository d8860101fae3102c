"""The on-disk quantized formats: exact nibble packing, RTN error within its bound, stacked experts, safetensors I/O."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edge_vl2.quantize.formats import (
    Int4Weight,
    Int8Weight,
    QuantSpec,
    int4_params,
    load_quantized,
    pack_int4,
    quantize_rtn_int4,
    quantize_rtn_int8,
    unpack_int4,
)
from edge_vl2.quantize.rtn import quantize_module_rtn, quantize_rtn


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    """Student-t (3 dof) weights with a few large outliers, like trained LLM weights."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    chi2 = (torch.randn(*shape, 3, generator=gen, dtype=torch.float64) ** 2).sum(-1) / 3
    return (0.02 * z / chi2.sqrt()).float()


def expanded_scales(q: Int4Weight | Int8Weight) -> torch.Tensor:
    """Each element's scale, [..., out, in]."""
    s = q.scales.float()
    if q.group_size is None:
        return s[..., None].expand(q.shape)
    return s.repeat_interleave(q.group_size, dim=-1)


# --- packing ------------------------------------------------------------------------------------------------------

def test_pack_low_nibble_first():
    assert pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]


def test_pack_unpack_exact():
    gen = torch.Generator().manual_seed(0)
    patterns = [
        torch.randint(0, 16, (3, 5, 64), generator=gen, dtype=torch.uint8),
        torch.zeros(4, 32, dtype=torch.uint8),
        torch.full((4, 32), 15, dtype=torch.uint8),
        torch.tensor([0, 15] * 16, dtype=torch.uint8),  # alternating extremes
        torch.tensor([15, 0] * 16, dtype=torch.uint8),
        torch.arange(16, dtype=torch.uint8).repeat(2),  # every code in both nibble positions
    ]
    for q in patterns:
        assert torch.equal(unpack_int4(pack_int4(q)), q)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))


# --- RTN: shapes and the error bound |w - dequant(quant(w))| <= scale / 2 --------------------------------------------

@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_rtn_within_half_step(group_size, symmetric):
    w = heavy_tailed(48, 256)
    q = quantize_rtn_int4(w, group_size, symmetric)
    n_groups = 256 // group_size
    assert q.qweight.shape == (48, n_groups, group_size // 2) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == (48, n_groups) and q.scales.dtype == torch.float16
    assert (q.zeros is None) == symmetric
    if not symmetric:
        assert q.zeros.shape == (48, (n_groups + 1) // 2)
    assert (q.bits, q.group_size, q.symmetric, q.shape) == (4, group_size, symmetric, (48, 256))
    err = (w - q.dequantize()).abs()
    if symmetric:  # value = (code - 8) * scale with scale = max|w| / 7: codes 1..15, nothing clipped
        assert (err <= expanded_scales(q) * (0.5 + 1e-5)).all()  # rounding to the nearest step
        assert int(unpack_int4(q.qweight).min()) >= 1
        assert torch.allclose(q.scales.float(), w.view(48, n_groups, -1).abs().amax(-1) / 7, rtol=1e-3)
    else:  # the searched range never loses to min-max (its first candidate), group by group, and wins on average
        groups = w.double().view(48, n_groups, group_size)
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        step = ((hi - lo) / 15).float()  # min-max with the format's fp16 scale (rounded up), the rest in float64
        s16 = step.half()
        step = torch.where(s16.float() < step, torch.nextafter(s16, torch.full_like(s16, 1e4)), s16).double()
        zero = torch.round(-lo / step)
        minmax = ((torch.round(groups / step[..., None]) + zero[..., None]).clamp(0, 15) - zero[..., None]) \
            * step[..., None]
        minmax_sse = (minmax - groups).square().sum(-1)
        searched_sse = (q.dequantize().double().view(48, n_groups, group_size) - groups).square().sum(-1)
        # 1e-6 relative: float32 (library) vs float64 (here) sums of the same squared errors
        assert (searched_sse <= minmax_sse * (1 + 1e-6)).all()
        assert float(searched_sse.sum()) < 0.97 * float(minmax_sse.sum())  # heavy tails: clipping pays (measured 0.8x)


def test_int4_zero_points_odd_group_count_and_padding():
    w = heavy_tailed(8, 48)  # 3 groups of 16: three zero points in two bytes
    q = quantize_rtn_int4(w, 16, symmetric=False)
    assert q.zeros.shape == (8, 2)
    assert int((q.zeros[:, -1] >> 4).max()) == 0  # the odd last zero point's high nibble is padding
    assert torch.equal(q.zero_points(), int4_params(w.view(8, 3, 16), symmetric=False)[1])


@pytest.mark.parametrize("group_size", [None, 64])
def test_int8_rtn_within_half_step(group_size):
    w = heavy_tailed(32, 256, seed=1)
    q = quantize_rtn_int8(w, group_size)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (32, 256)
    assert q.scales.shape == ((32,) if group_size is None else (32, 4)) and q.group_size == group_size
    err = (w - q.dequantize()).abs()
    assert (err <= expanded_scales(q) * (0.5 + 1e-5)).all()
    assert int(q.qweight.abs().max()) == 127  # scale = max|w| / 127


def test_all_zero_group_and_tiny_weights():
    w = torch.zeros(4, 64)
    w[1, 32:] = 1e-7  # below fp16's normal range: the scale is rounded up, never to 0
    q = quantize_rtn_int4(w, 32, symmetric=True)
    assert q.scales[0, 0] == 1.0  # all-zero group: scale 1, decodes to exact zeros
    assert (q.scales > 0).all()
    d = q.dequantize()
    assert torch.equal(d[0], torch.zeros(64))
    assert ((w - d).abs() <= expanded_scales(q) * 0.5 + 1e-12).all()
    assert torch.equal(quantize_rtn_int8(torch.zeros(2, 32)).dequantize(), torch.zeros(2, 32))


def test_bad_group_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        quantize_rtn_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="power of two"):
        quantize_rtn_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="INT4 needs a group size"):
        QuantSpec(bits=4, group_size=None)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(bits=8, group_size=None, symmetric=False)


def test_formats_validate_their_tensors():
    q = quantize_rtn_int4(heavy_tailed(8, 64), 32)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(q.qweight, q.scales.float())
    with pytest.raises(ValueError, match="zeros"):
        Int4Weight(q.qweight, q.scales, torch.zeros(8, 2, dtype=torch.uint8))  # 2 groups pack into 1 byte
    with pytest.raises(ValueError, match="scales"):
        Int8Weight(torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 3, dtype=torch.float16))


# --- stacked experts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False), QuantSpec(8, None),
                                  QuantSpec(8, 32)])
def test_stacked_experts_match_per_expert(spec):
    w = heavy_tailed(3, 16, 128, seed=2)  # [E, out, in]
    q = quantize_rtn(w, spec)
    assert q.shape == (3, 16, 128)
    deq = q.dequantize()
    for e in range(3):
        single = quantize_rtn(w[e], spec)
        assert all(torch.equal(a, b) for a, b in zip(q.expert(e).tensors().values(), single.tensors().values()))
        assert torch.equal(deq[e], single.dequantize())
    if spec.bits == 8 or spec.symmetric:  # asymmetric INT4 may clip a tail (test_int4_rtn_within_half_step)
        assert ((w - deq).abs() <= expanded_scales(q) * (0.5 + 1e-5)).all()
    # a stacked tensor quantized in one call (all leading axes at once) is the same bytes
    direct = quantize_rtn_int4(w, spec.group_size, spec.symmetric) if spec.bits == 4 \
        else quantize_rtn_int8(w, spec.group_size)
    assert all(torch.equal(a, b) for a, b in zip(q.tensors().values(), direct.tensors().values()))


# --- state dict / safetensors ---------------------------------------------------------------------------------------

def test_state_dict_round_trip_through_safetensors(tmp_path):
    w = heavy_tailed(2, 16, 128, seed=3)
    weights = {
        "layers.1.mlp.experts.gate_proj": quantize_rtn(w, QuantSpec(4, 64)),
        "layers.1.mlp.experts.up_proj": quantize_rtn(w, QuantSpec(4, 32, symmetric=False)),
        "layers.0.self_attn.q_proj": quantize_rtn(w[0], QuantSpec(8, None)),
        "layers.0.self_attn.o_proj": quantize_rtn(w[1], QuantSpec(8, 64)),
    }
    state = {}
    for prefix, q in weights.items():
        state.update(q.to_state_dict(prefix))
    assert "layers.1.mlp.experts.up_proj.zeros" in state and "layers.1.mlp.experts.gate_proj.zeros" not in state
    save_file(state, tmp_path / "decoder.safetensors")
    loaded = load_file(tmp_path / "decoder.safetensors")
    assert set(loaded) == set(state)
    for prefix, q in weights.items():
        back = load_quantized(prefix, loaded)
        assert type(back) is type(q) and back.shape == q.shape and back.group_size == q.group_size
        assert back.symmetric == q.symmetric and back.nbytes == q.nbytes
        assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), q.tensors().values()))
    with pytest.raises(ValueError, match="missing quantized tensor layers.9.q.qweight"):
        load_quantized("layers.9.q", loaded)


def test_nbytes_is_about_half_a_byte_per_weight():
    q = quantize_rtn_int4(heavy_tailed(64, 256), 128, symmetric=False)
    assert q.nbytes == 64 * 256 // 2 + 64 * 2 * 2 + 64 * 1  # codes + fp16 scales + packed zero points


def test_module_walk_quantizes_planned_weights_only():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(64, 32, bias=False)
            self.norm = nn.LayerNorm(64)
            self.experts = nn.Parameter(heavy_tailed(2, 32, 64))
    torch.manual_seed(0)
    block = Block()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    out = quantize_module_rtn(block, lambda name: QuantSpec(4, 32) if name == "experts" else QuantSpec(8, None))
    assert set(out) == {"q_proj", "experts"}
    assert isinstance(out["q_proj"], Int8Weight) and out["experts"].shape == (2, 32, 64)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())  # the module is not written to
