"""Calibration data and statistics.

What is proved: rendered samples are deterministic (same seed -> the same prompts and byte-identical images), held
out from calibration (a different seed), in the official template (one `<image>` tag per image, grounding prompts
included) and within the tile limit; a user image folder is used in order and cycled, and a bad folder or image is
one clear UserError; the calibration set holds exactly the model's own decoder inputs; and the two implementations
of the per-expert Hessians (the committed `ExpertHessians.add` and the sorted, subsampled `fill_expert_hessians`)
agree.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from edge_vl2.errors import UserError
from edge_vl2.quantize.calibration import (
    LinearHessians,
    decoder_inputs,
    encode_samples,
    fill_expert_hessians,
    route_all,
    routed_samples,
    subsample,
)
from edge_vl2.quantize.calibration_data import PROMPTS, calibration_samples, evaluation_samples, tiles_for
from edge_vl2.quantize.hessian import ExpertHessians, HessianAccumulator, expert_intermediate

from _toolchain import MAX_TILES, MAX_TOKENS, calibration, model


def fingerprint(samples) -> list[tuple[str, list[tuple[tuple[int, int], bytes]]]]:
    return [(s.prompt, [(im.size, im.tobytes()) for im in s.images]) for s in samples]


def test_rendered_samples_are_deterministic_and_held_out():
    a = fingerprint(calibration_samples(16, seed=3))
    assert a == fingerprint(calibration_samples(16, seed=3))  # byte-identical images, same prompts
    assert a != fingerprint(calibration_samples(16, seed=4))
    held_out = {img for _, imgs in fingerprint(evaluation_samples(16)) for _, img in imgs}
    calib = {img for _, imgs in fingerprint(calibration_samples(64, seed=0)) for _, img in imgs}
    assert held_out and not held_out & calib  # no evaluation image is a calibration image
    assert fingerprint(calibration_samples(8, seed=3)) == a[:8]  # a prefix does not depend on n


def test_samples_follow_the_template_and_tile_limit():
    samples = list(calibration_samples(48, seed=0, max_tiles=MAX_TILES))
    with_images = [s for s in samples if s.images]
    assert 0 < len(with_images) < len(samples)  # a mix of image and text-only prompts
    for s in samples:
        assert s.prompt.count("<image>") == len(s.images) <= 1
        assert all(im.mode == "RGB" and tiles_for(im.size) <= MAX_TILES for im in s.images)
    prompts = " ".join(s.prompt for s in samples)
    assert "<|ref|>" in prompts and "<|grounding|>" in prompts
    # every rendered task's prompts are tokenised by the real processor (special tokens recognised)
    _, processor = model("tiny")
    ref_id = processor.tokenizer.token_to_id("<|ref|>")
    s = next(s for s in samples if "<|ref|>" in s.prompt)
    assert ref_id in processor.process_prompt(s.prompt, s.images).input_ids.tolist()
    assert set(PROMPTS) >= {"document", "receipt", "table", "bar_chart", "line_chart", "form", "user"}


def test_user_image_folder(tmp_path):
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    for i, c in enumerate(colors):
        Image.new("RGB", (64 + 32 * i, 48), c).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    samples = [s for s in calibration_samples(20, seed=0, image_dir=tmp_path) if s.images]
    assert len(samples) >= 4
    # the folder's images in sorted order, cycled; the text file is ignored
    assert [s.images[0].getpixel((0, 0)) for s in samples] == [colors[i % 3] for i in range(len(samples))]
    assert all(s.prompt in PROMPTS["user"] for s in samples)
    assert fingerprint(samples) == fingerprint(s for s in calibration_samples(20, seed=0, image_dir=tmp_path)
                                               if s.images)


def test_user_images_are_shrunk_to_the_tile_limit(tmp_path):
    Image.new("RGB", (2000, 1500), (90, 90, 90)).save(tmp_path / "big.jpg")
    assert tiles_for((2000, 1500)) > MAX_TILES
    image = next(s for s in calibration_samples(4, seed=0, image_dir=tmp_path, max_tiles=MAX_TILES)
                 if s.images).images[0]
    assert tiles_for(image.size) <= MAX_TILES
    assert abs(image.width / image.height - 2000 / 1500) < 0.01  # aspect ratio kept


def test_bad_user_folders_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        list(calibration_samples(4, image_dir=tmp_path / "missing"))
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images"):
        list(calibration_samples(4, image_dir=tmp_path))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="broken.png"):
        list(calibration_samples(4, image_dir=tmp_path, image_fraction=1.0))


def test_calibration_set_holds_the_models_own_decoder_inputs():
    vl2, processor = model("tiny")
    samples = list(calibration_samples(6, seed=0, max_tiles=MAX_TILES))
    calib = calibration("tiny", 12)
    assert len(calib) == 12 and calib.images == sum(len(s.images) for s in calibration_samples(12, seed=0))
    encoded = encode_samples(vl2, processor, samples)
    for i, (s, enc) in enumerate(zip(samples, encoded)):
        inputs = processor.process_prompt(s.prompt, s.images)
        want = vl2.input_embeddings(inputs.input_ids, inputs.images_seq_mask, inputs.pixel_values,
                                    inputs.images_spatial_crop)[:MAX_TOKENS]
        assert calib.embeds[i].shape == (min(inputs.seq_len, MAX_TOKENS), vl2.cfg.language.hidden_size)
        # same vision tower and layout: equal to rounding of the batched tile encoding
        torch.testing.assert_close(calib.embeds[i], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoder_inputs(vl2, enc, MAX_TOKENS), want, rtol=1e-5, atol=1e-5)
    assert calib.tokens == sum(e.shape[0] for e in calib.embeds)


def test_linear_hessians_hook_and_unhook():
    layer = torch.nn.Linear(8, 4, bias=False)
    xs = [torch.randn(5, 8), torch.randn(7, 8)]
    with LinearHessians({"l": layer}) as hs:
        for x in xs:
            layer(x)
    layer(torch.randn(3, 8))  # after the block: not counted
    acc = HessianAccumulator(8)
    acc.add(torch.cat(xs))
    torch.testing.assert_close(hs["l"].hessian(), acc.hessian())
    assert hs["l"].tokens == 12 and not layer._forward_pre_hooks


def test_subsample_keeps_a_global_stride():
    picks = subsample([5, 7, 4], cap=6)  # 16 tokens, stride 3 over the concatenation
    flat = torch.cat([p + off for p, off in zip(picks, (0, 5, 12))])
    assert flat.tolist() == list(range(0, 16, 3))
    assert [p.tolist() for p in subsample([3, 2], cap=None)] == [[0, 1, 2], [0, 1]]


@pytest.mark.parametrize("proj", ["gate_up", "down"])
def test_expert_hessians_agree_with_the_reference_accumulation(proj):
    """fill_expert_hessians (sorted by expert, all tokens when uncapped) == ExpertHessians.add (a plain loop)."""
    vl2, _ = model("tiny")
    mlp = vl2.language.model.layers[1].mlp
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, vl2.cfg.language.hidden_size, generator=gen) for n in (40, 25)]
    routing = route_all(mlp.gate, xs)
    with torch.inference_mode():
        assert all(torch.equal(ids, mlp.gate(x)[0]) for x, ids in zip(xs, routing.ids))
    fn = None if proj == "gate_up" else expert_intermediate(mlp.experts.gate_proj.detach(),
                                                            mlp.experts.up_proj.detach())
    n_in = mlp.experts.gate_proj.shape[2] if proj == "gate_up" else mlp.experts.down_proj.shape[2]
    ours = ExpertHessians(8, n_in)
    fill_expert_hessians(ours, xs, routing, "blend", fn, all_tokens_max=None)
    ref = ExpertHessians(8, n_in)
    for x, ids, w, p in zip(xs, routing.ids, routing.weights, routing.probs):
        ref.add(x, p, ids, w, fn)
    assert ours.token_counts() == ref.token_counts() == routing.counts(8).tolist()
    for mode in ("routed", "all-tokens", "blend"):
        torch.testing.assert_close(ours.stacked(mode), ref.stacked(mode), rtol=1e-5, atol=1e-6)


def test_routed_samples_are_routed_tokens():
    vl2, _ = model("tiny")
    mlp = vl2.language.model.layers[2].mlp
    xs = [torch.randn(60, vl2.cfg.language.hidden_size, generator=torch.Generator().manual_seed(1))]
    routing = route_all(mlp.gate, xs)
    counts = routing.counts(8).tolist()
    for e, (x, g) in enumerate(routed_samples(xs, routing, 8, per_expert=10)):
        assert x.shape[0] == g.shape[0] == min(10, counts[e])
        if x.shape[0]:
            with torch.inference_mode():
                ids, weights = mlp.gate(x)
            hit = ids == e
            assert hit.any(dim=-1).all()  # every sampled token is routed to e
            torch.testing.assert_close(g, (weights * hit).sum(-1))  # with its gate weight
