"""The fidelity suite: KL(reference || quantized) and top-1 per held-out domain, at the positions that produce text.

    seqs = build_sequences(fp_model, processor, heldout_items(2))      # vision once, reference greedy answers
    ref = suite_reference(fp_model, seqs, cache_dir=tmp)                # reference log-probs at scored positions
    report = suite_compare(ref, q_model)                                # {"domains": {d: figures}, "overall": ...}

A sequence is the item's prompt followed by the reference model's own greedy answer (`answer_tokens`, eos not
allowed to end it early), fed teacher-forced to every model, so all see the same tokens. Scored positions are every
text position of the prompt (never an `<image>` position: their logits produce no text) and every answer position.
Position t's distribution is the prediction of token t+1. Figures per domain: KL mean / p99 / max in nats, top-1
agreement (the quantized argmax equals the reference's), routing overlap (|top-k(ref) & top-k(q)| / k at scored
positions, each model routing its own hidden states), positions. `score_external` scores logits computed by someone
else (llama.cpp) on the same token ids at the same positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..calibration import EncodedSample, decoder_inputs
from ..fidelity import RouterCapture, _n_experts, _overlap, keep_logprobs
from .domains import HeldOutItem

ANSWER_TOKENS = 32


@dataclass
class Sequence:
    """One teacher-forced held-out sequence: the encoded prompt + answer and the positions that are scored."""

    domain: str
    encoded: EncodedSample  # input_ids / images_seq_mask cover prompt + answer
    scored: torch.Tensor  # [n] long: positions whose next-token distribution is compared
    prompt_len: int
    image_embeds: torch.Tensor | None = None  # fp32 [image positions, H]: the decoder inputs there (for llama.cpp)

    @property
    def ids(self) -> torch.Tensor:
        return self.encoded.inputs.input_ids

    @property
    def has_images(self) -> bool:
        return bool(self.encoded.inputs.images_seq_mask.any())


def _raw_text(processor, text: str):
    from edge_vl2.inputs.processor import ProcessorOutput

    tok, size = processor.tokenizer, processor.config.image_size
    ids = [tok.bos_id] + tok.encode(text)
    return ProcessorOutput(torch.tensor(ids, dtype=torch.long), torch.zeros(len(ids), dtype=torch.bool),
                           torch.zeros((0, 3, size, size)), torch.zeros((0, 2), dtype=torch.long), text=text)


@torch.inference_mode()
def greedy_answer(model, embeds: torch.Tensor, n: int) -> list[int]:
    """The model's `n` greedy tokens after `embeds` (eos is taken like any token: the answer always has n)."""
    from edge_vl2.generate import SamplingParams, generate_tokens

    params = SamplingParams(temperature=0.0, max_new_tokens=n)
    return [t for t, _ in generate_tokens(model.language, embeds, torch.zeros(0, dtype=torch.long), params, -1)]


@torch.inference_mode()
def build_sequences(model, processor, items: list[HeldOutItem], answer_tokens: int = ANSWER_TOKENS,
                    progress: Callable[[str], None] = lambda _m: None) -> list[Sequence]:
    """Encode each item (vision once) and append the reference model's greedy answer."""
    out = []
    for item in items:
        if item.text is not None:
            enc = EncodedSample(_raw_text(processor, item.text), None)
        else:
            inputs = processor.process(item.conversation, item.images)
            tiles = model.encode_tiles(inputs.pixel_values.to(model.language.lm_head.weight.device)) \
                if inputs.pixel_values.shape[0] else None
            enc = EncodedSample(inputs, tiles)
        embeds = decoder_inputs(model, enc)
        answer = greedy_answer(model, embeds, answer_tokens) if answer_tokens else []
        x = enc.inputs
        image_embeds = embeds[x.images_seq_mask.to(embeds.device)].float().cpu() if enc.tile_embeds is not None \
            else None
        ids = torch.cat([x.input_ids, torch.tensor(answer, dtype=torch.long)])
        mask = torch.cat([x.images_seq_mask, torch.zeros(len(answer), dtype=torch.bool)])
        full = EncodedSample(replace(x, input_ids=ids, images_seq_mask=mask), enc.tile_embeds)
        out.append(Sequence(item.domain, full, torch.nonzero(~mask).flatten(), int(x.input_ids.shape[0]),
                            image_embeds))
        progress(f"held-out {item.domain}: {len(ids)} tokens, {len(out[-1].scored)} scored")
    return out


@dataclass
class SuiteReference:
    """The reference model's log-probabilities [n, V] (memory or disk), argmax and routing at scored positions."""

    sequences: list[Sequence]
    logprobs: list  # per sequence: fp32 [n, V] or a path to one
    top1: list[torch.Tensor]
    routing: list[dict[str, torch.Tensor]]
    top_k: int

    def sequence_logprobs(self, i: int) -> torch.Tensor:
        item = self.logprobs[i]
        return torch.load(item, mmap=True, weights_only=True) if isinstance(item, (str, Path)) else item


@torch.inference_mode()
def _run(model, seq: Sequence) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [n, V] (fp32) and routing ids at the scored positions."""
    lm = model.language
    with RouterCapture(model) as cap:
        hidden = lm(decoder_inputs(model, seq.encoded))
        logits = lm.logits(hidden[seq.scored]).float().cpu()
    return logits, {k: v[seq.scored] for k, v in cap.ids.items()}


def suite_reference(model, sequences: list[Sequence], cache_dir: str | Path | None = None) -> SuiteReference:
    """Run the reference model once over every sequence."""
    logprobs, top1, routing = [], [], []
    for i, seq in enumerate(sequences):
        logits, ids = _run(model, seq)
        lp = torch.log_softmax(logits, dim=-1)
        top1.append(logits.argmax(-1))
        logprobs.append(keep_logprobs(lp, cache_dir, f"suite-logprobs-{i}.pt"))
        routing.append(ids)
    return SuiteReference(sequences, logprobs, top1, routing, RouterCapture(model).top_k)


def kl_top1(logp: torch.Tensor, ref_top1: torch.Tensor, q_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(ref || q) in nats (float64, >= 0) and top-1 agreement (0/1) from reference log-probs [n, V]
    and the other model's logits [n, V]."""
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1).double().clamp_min(0)  # rounding can give -1e-9
    return kl, (ref_top1 == q_logits.argmax(-1)).double()


def _figures(kl: list[torch.Tensor], agree: list[torch.Tensor], overlap: list[torch.Tensor], n_seq: int) -> dict:
    k, a = torch.cat(kl), torch.cat(agree)
    out = {"sequences": n_seq, "positions": int(k.numel()), "kl_mean": float(k.mean()),
           "kl_p99": float(torch.quantile(k.float(), 0.99)), "kl_max": float(k.max()), "top1": float(a.mean())}
    out["routing_overlap"] = float(torch.cat(overlap).mean()) if overlap else None
    return out


def _summarise(per_seq: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> dict:
    """[(domain, kl, agree, overlap)] -> {"domains": {d: figures}, "overall": mean of the domain means}."""
    domains: dict[str, dict] = {}
    for d in dict.fromkeys(x[0] for x in per_seq):
        rows = [x for x in per_seq if x[0] == d]
        domains[d] = _figures([r[1] for r in rows], [r[2] for r in rows],
                              [r[3] for r in rows if r[3] is not None], len(rows))
    means = [f["kl_mean"] for f in domains.values()]
    return {"domains": domains, "overall": {"kl_mean_of_domains": sum(means) / len(means) if means else math.nan,
                                            "kl_max_domain": max(means) if means else math.nan,
                                            "top1_mean_of_domains": sum(f["top1"] for f in domains.values())
                                            / max(1, len(domains))}}


def suite_compare(ref: SuiteReference, q_model) -> dict:
    """Per-domain figures of `q_model` against the reference (see the module docstring)."""
    n_experts = _n_experts(q_model)
    rows = []
    for i, seq in enumerate(ref.sequences):
        q_logits, q_ids = _run(q_model, seq)
        kl, agree = kl_top1(ref.sequence_logprobs(i), ref.top1[i], q_logits)
        ov = [_overlap(a, q_ids[n], n_experts(n)) for n, a in ref.routing[i].items()]
        rows.append((seq.domain, kl, agree, torch.stack(ov).mean(0) if ov else None))
    return _summarise(rows)


def score_external(ref: SuiteReference, logits_fn: Callable[[Sequence], torch.Tensor],
                   domains: tuple[str, ...] | None = None) -> dict:
    """Per-domain figures of logits computed elsewhere: `logits_fn(seq)` -> [n scored, V] for the sequence's token
    ids at `seq.scored` (text-only sequences unless `domains` says otherwise). No routing figures."""
    rows = []
    for i, seq in enumerate(ref.sequences):
        if (domains is not None and seq.domain not in domains) or (domains is None and seq.has_images):
            continue
        kl, agree = kl_top1(ref.sequence_logprobs(i), ref.top1[i], logits_fn(seq))
        rows.append((seq.domain, kl, agree, None))
    return _summarise(rows)


def format_suite(report: dict, label: str = "") -> str:
    """One line per domain."""
    lines = [f"{label:14s} {'domain':12s} {'seqs':>4s} {'pos':>5s} {'KL mean':>9s} {'KL p99':>8s} {'top-1 %':>7s} "
             f"{'routing':>7s}"]
    for d, f in report["domains"].items():
        ro = f"{f['routing_overlap']:7.4f}" if f.get("routing_overlap") is not None else "      -"
        lines.append(f"{label:14s} {d:12s} {f['sequences']:4d} {f['positions']:5d} {f['kl_mean']:9.5f} "
                     f"{f['kl_p99']:8.4f} {100 * f['top1']:7.2f} {ro}")
    return "\n".join(lines)


SUITE_FILE = "suite.pt"


def save_suite(ref: SuiteReference, folder: str | Path) -> Path:
    """Keep a reference for later scoring (`load_suite`): sequences, argmax and routing in `suite.pt`, the
    log-probabilities as one file per sequence beside it (written there when they are not already)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(len(ref.sequences)):
        item = ref.logprobs[i]
        if isinstance(item, (str, Path)) and Path(item).parent.resolve() == folder.resolve():
            names.append(Path(item).name)
        else:
            names.append(f"suite-logprobs-{i}.pt")
            torch.save(ref.sequence_logprobs(i), folder / names[-1])
    torch.save({"sequences": ref.sequences, "logprobs": names, "top1": ref.top1, "routing": ref.routing,
                "top_k": ref.top_k}, folder / SUITE_FILE)
    return folder / SUITE_FILE


def load_suite(folder: str | Path) -> SuiteReference:
    """A reference kept by `save_suite` (a file this project wrote: unpickled with weights_only=False)."""
    from edge_vl2.errors import UserError

    folder = Path(folder)
    if not (folder / SUITE_FILE).is_file():
        raise UserError(f"{folder}: no {SUITE_FILE} (write one with `edge-vl2 quantize --suite-dir {folder}`)")
    d = torch.load(folder / SUITE_FILE, weights_only=False)
    return SuiteReference(d["sequences"], [folder / n for n in d["logprobs"]], d["top1"], d["routing"], d["top_k"])
