"""Quantized token embeddings: a lookup gives exactly the dequantized table's rows, and a model with its table
swapped for a QuantEmbedding embeds prompts exactly as the fake-quantized model (the toolchain's reference math)."""

from __future__ import annotations

import pytest
import torch

from edge_vl2.quant.embedding import QuantEmbedding
from edge_vl2.quant.swap import describe_quantized, swap_in_quantized_
from edge_vl2.quantize.formats import QuantSpec
from edge_vl2.quantize.rtn import quantize_rtn

SPECS = [QuantSpec(4, 32, symmetric=False), QuantSpec(4, 64), QuantSpec(8, 32), QuantSpec(8, None)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_is_the_dequantized_tables_rows(spec, dtype):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 128, generator=gen)
    q = quantize_rtn(table, spec)
    emb = QuantEmbedding(q, dtype)
    full = q.dequantize(torch.float64)  # float64: the rows themselves, rounded once to dtype below
    for ids in (torch.tensor([3, 999, 0, 3]), torch.randint(0, 1000, (2, 7), generator=gen),
                torch.tensor([], dtype=torch.long)):
        got = emb(ids)
        assert got.dtype == dtype and got.shape == (*ids.shape, 128)
        # exact: dequantizing a row is elementwise (code - zero) * scale, the same fp32 operations for a row alone
        assert torch.equal(got, full[ids].float().to(dtype))
    assert emb.nbytes == q.nbytes and "embedding INT" in emb.describe()


def test_swapped_table_embeds_like_the_fake_quantized_model(tmp_path):
    """A test-size Tiny: input embeddings (tokens and image vectors) through a swapped-in QuantEmbedding equal the
    model whose table holds the dequantized values (fake quantization), bit for bit."""
    from edge_vl2.model.vl2 import load_model
    from edge_vl2.quantize.fake_quant import fake_quantize
    from edge_vl2.tools.synth import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "tiny", "tiny", "test")
    name = "language.model.embed_tokens"
    model, _ = load_model(ckpt, dtype=torch.float32)
    weights = {name: quantize_rtn(model.language.model.embed_tokens.weight.detach(), QuantSpec(4, 32, False))}
    ids = torch.tensor([0, 5, 129279, 42, 42])
    want = fake_quantize(model, weights).language.model.embed_tokens(ids)
    model, _ = load_model(ckpt, dtype=torch.float32)
    swap_in_quantized_(model, weights, "reference")
    assert isinstance(model.language.model.embed_tokens, QuantEmbedding)
    assert torch.equal(model.language.model.embed_tokens(ids), want)
    assert any(line.startswith("embedding INT4 g32 asym") for line in describe_quantized(model))
    with pytest.raises(ValueError, match="quantized table"):
        swap_in_quantized_(load_model(ckpt, dtype=torch.float32)[0],
                           {name: quantize_rtn(torch.zeros(10, 64), QuantSpec(8, 32))}, "reference")
