"""quantize/noise_sensitivity.py on the tiny-like official checkpoint (fp32): zero noise changes nothing, more noise
moves the logits further, and the model is left as it was found (noise added then the same noise subtracted: fp32
rounding of w + n - n only, ~1 ulp of each weight, hence 1e-5 relative on the logits)."""

from __future__ import annotations

import torch

from edge_vl2.pipeline import VL2Pipeline
from edge_vl2.quantize.noise_sensitivity import noise_sensitivity

from conftest import TINY_LIKE


def test_noise_sensitivity_grows_with_eps_and_restores_the_weights():
    pipe = VL2Pipeline.from_pretrained(TINY_LIKE, dtype="fp32")
    lm = pipe.model.language
    embeds = pipe.embeddings(pipe.prepare("Please read the invoice and list every item with its price."))
    with torch.inference_mode():
        before = lm.logits(lm(embeds))
    zero, small, large = noise_sensitivity(lm, embeds, [0.0, 0.01, 0.1])
    assert zero["kl_mean"] == 0.0 and zero["top1"] == 1.0 and max(zero["residual_divergence"]) == 0.0
    assert 0 < small["kl_mean"] < large["kl_mean"]
    assert len(large["residual_divergence"]) == len(lm.model.layers)
    assert all(0 < s < b for s, b in zip(small["residual_divergence"], large["residual_divergence"]))
    with torch.inference_mode():
        after = lm.logits(lm(embeds))
    assert ((after - before).norm() / before.norm()).item() < 1e-5
