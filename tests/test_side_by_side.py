"""`edge-vl2 peer`'s llama.cpp rows (edge_vl2/tools/side_by_side.py) on a test-size synthetic Tiny.

What is proved: the GGUF that edge_vl2.tools.peer writes (f32) and llama.cpp evaluates gives, on the suite's text
sequences, the same next-token distributions as our fp32 reference (KL ~ 0, top-1 ~ 100 %): the comparison is on
the same decoder and the same tokens, on a photo prompt too when llama.cpp is fed the reference's image vectors;
llama.cpp's Q8_0 of it is scored on the same positions with KL > 0; without image vectors (`images=False`) the image
domain is left out. Skipped where llama-cpp-python is not installed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from edge_vl2.quantize.heldout.domains import heldout_items  # noqa: E402
from edge_vl2.quantize.heldout.suite import build_sequences, suite_reference  # noqa: E402
from edge_vl2.tools.peer.suite import build_peer_set  # noqa: E402
from edge_vl2.tools.side_by_side import format_table, llama_rows  # noqa: E402

from _toolchain import checkpoint, model  # noqa: E402


def test_llama_cpp_rows_on_the_same_tokens(tmp_path):
    vl2, processor = model("tiny")
    items = heldout_items(1, domains=("prose", "chat", "photo"))
    suite = suite_reference(vl2, build_sequences(vl2, processor, items, answer_tokens=6))
    build_peer_set(checkpoint("tiny"), tmp_path, storage="f32", types=("Q8_0",))
    source, q8 = llama_rows(suite, tmp_path, types=("Q8_0",), threads=1)
    assert set(source.domains) == {"prose", "chat", "photo"}
    for d, f in source.domains.items():
        # f32 GGUF vs our fp32 model: summation order only; llama.cpp's f16 KV cache adds ~1e-3 relative on
        # attention values, far below any quantizer's KL (Q8_0 here: > 1e-5)
        assert f["kl_mean"] < 1e-3 and f["top1"] > 0.95, (d, f)
        assert q8.domains[d]["kl_mean"] > f["kl_mean"]
    (text_only,) = llama_rows(suite, tmp_path, types=(), threads=1, images=False)
    assert set(text_only.domains) == {"prose", "chat"}
    assert "llama.cpp Q8_0" in format_table({"domains": ["prose", "chat", "photo"],
                                             "rows": [source.__dict__, q8.__dict__]})
