"""How close a quantized model is to the full-precision one, on held-out prompts and images.

    report = fidelity_report(fp_model, q_model, processor, evaluation_samples(8), quant=result)
    print(format_report(report))

Figures (all positions of every held-out prompt, images included, each sequence cut at `max_tokens`):
- next-token KL(fp || q) per position, in nats: mean, max, 99th percentile; mean over text positions only;
- top-1 agreement: argmax of q equals argmax of fp;
- routing overlap per MoE layer: |top-k(fp) & top-k(q)| / k averaged over tokens. Each model routes its *own*
  hidden states (the quantized model's routers see the quantized model's activations, which is what the runtime does),
  captured by forward hooks on every `mlp.gate`;
- per-module reconstruction error: relative Frobenius ||W - W_q|| / ||W||, and the relative Hessian-weighted error
  when the quantization had calibration statistics (`QuantResult.errors`);
- bytes of the quantized decoder (quantized tensors + the rest of `language.*` in bf16) against bf16.

For full-size models that cannot sit in memory twice, `reference_run` runs the fp model once (log-probabilities
optionally cached on disk) and `compare` measures any number of quantized models against it.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .calibration import EncodedSample, decoder_inputs, encode_samples


@dataclass
class Reference:
    """The fp model's outputs on the held-out samples: next-token log-probabilities (memory or disk) and their
    argmax, and top-k routing per MoE layer. Log-probabilities rather than logits: the log-softmax over the
    vocabulary (129k) is done once here, not once per compared model."""

    samples: list[EncodedSample]
    max_tokens: int | None
    logprobs: list  # per sample: fp32 tensor [T, V] or a path to one
    top1: list[torch.Tensor]  # per sample: argmax token ids [T]
    routing: list[dict[str, torch.Tensor]]  # per sample: {router name: ids [T, k]}
    top_k: int = 0

    def sample_logprobs(self, i: int) -> torch.Tensor:
        item = self.logprobs[i]
        return torch.load(item, mmap=True, weights_only=True) if isinstance(item, (str, Path)) else item

    def subset(self, indices: list[int]) -> "Reference":
        """The reference restricted to some samples."""
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return Reference(pick(self.samples), self.max_tokens, pick(self.logprobs), pick(self.top1),
                         pick(self.routing), self.top_k)


class RouterCapture:
    """Forward hooks on every router (`...mlp.gate`) of a model, keeping the expert ids of the last pass."""

    def __init__(self, model: nn.Module):
        self.routers = {n: m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")}
        self.ids: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> "RouterCapture":
        def hook(name):
            def fn(_module, _args, out):
                self.ids[name] = out[0].detach().cpu()
            return fn
        self.handles = [m.register_forward_hook(hook(n)) for n, m in self.routers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    @property
    def top_k(self) -> int:
        return next(iter(self.routers.values())).top_k if self.routers else 0


@torch.inference_mode()
def _run(model, sample: EncodedSample, max_tokens: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lm = model.language
    with RouterCapture(model) as cap:
        logits = lm.logits(lm(decoder_inputs(model, sample, max_tokens)))
    return logits.cpu(), dict(cap.ids)


def reference_run(fp_model, processor, samples: Iterable, *, max_tokens: int | None = 512,
                  cache_dir: str | Path | None = None) -> Reference:
    """Encode the held-out samples (vision runs here, once) and record the fp model's log-probabilities and routing.

    With `cache_dir`, they go to `{cache_dir}/logprobs-{i}.pt` and are memory-mapped back one sample at a time.
    """
    return reference_from_encoded(fp_model, encode_samples(fp_model, processor, samples), max_tokens=max_tokens,
                                  cache_dir=cache_dir)


def reference_from_encoded(fp_model, encoded: list[EncodedSample], *, max_tokens: int | None = 512,
                           cache_dir: str | Path | None = None) -> Reference:
    """`reference_run` for samples already encoded (`calibration.encode_samples`): no vision tower needed."""
    logprobs, top1, routing = [], [], []
    for i, s in enumerate(encoded):
        logits, ids = _run(fp_model, s, max_tokens)
        lp = torch.log_softmax(logits, dim=-1)
        top1.append(logits.argmax(-1))
        del logits
        logprobs.append(keep_logprobs(lp, cache_dir, f"logprobs-{i}.pt"))
        routing.append(ids)
    return Reference(encoded, max_tokens, logprobs, top1, routing, RouterCapture(fp_model).top_k)


def keep_logprobs(lp: torch.Tensor, cache_dir: str | Path | None, name: str):
    """`lp` itself, or the path it was saved to under `cache_dir` (memory-mapped back when read)."""
    if cache_dir is None:
        return lp
    path = Path(cache_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lp, path)
    return path


def _overlap(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Per token |set(a) & set(b)| / k for expert ids a, b [T, k] -> [T]."""
    ma = torch.zeros(a.shape[0], n_experts, dtype=torch.bool).scatter_(1, a.long(), True)
    mb = torch.zeros(b.shape[0], n_experts, dtype=torch.bool).scatter_(1, b.long(), True)
    return (ma & mb).sum(dim=1).double() / a.shape[1]


class _Tally:
    """Per-position figures pooled over samples."""

    def __init__(self):
        self.kl: list[torch.Tensor] = []
        self.text: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.overlap: dict[str, list[torch.Tensor]] = {}

    def add(self, logp, fp_top1, q_logits, fp_ids, q_ids, text_mask, n_experts_of) -> None:
        """fp log-probabilities [T, V] and argmax [T], the q model's logits [T, V], both models' routing."""
        logq = torch.log_softmax(q_logits.float(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(dim=-1).double().clamp_min(0)  # [T]; rounding can give -1e-9
        self.kl.append(kl)
        self.text.append(text_mask[:kl.shape[0]])
        self.agree.append((fp_top1 == q_logits.argmax(-1)).double())
        for name, a in fp_ids.items():
            self.overlap.setdefault(name, []).append(_overlap(a, q_ids[name], n_experts_of(name)))

    def result(self) -> dict:
        kl = torch.cat(self.kl)
        text = torch.cat(self.text)
        per_layer = {n: float(torch.cat(v).mean()) for n, v in self.overlap.items()}
        return {
            "positions": int(kl.numel()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "kl_p99": float(torch.quantile(kl.float(), 0.99)) if kl.numel() else math.nan,
            "kl_mean_text": float(kl[text].mean()) if text.any() else None,
            "top1_agreement": float(torch.cat(self.agree).mean()),
            "routing_overlap": per_layer,
            "routing_overlap_mean": sum(per_layer.values()) / len(per_layer) if per_layer else None,
            "routing_overlap_min": min(per_layer.values()) if per_layer else None,
        }


def _n_experts(model):
    routers = {n: m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")}
    return lambda name: routers[name].weight.shape[0]


def _text_mask(sample: EncodedSample) -> torch.Tensor:
    return ~sample.inputs.images_seq_mask


def compare(reference: Reference, q_model, *, quant=None, fp_model=None) -> dict:
    """Fidelity of `q_model` against a recorded reference (see the module docstring for the fields)."""
    tally = _Tally()
    n_experts = _n_experts(q_model)
    for i, s in enumerate(reference.samples):
        q_logits, q_ids = _run(q_model, s, reference.max_tokens)
        tally.add(reference.sample_logprobs(i), reference.top1[i], q_logits, reference.routing[i], q_ids,
                  _text_mask(s), n_experts)
    return _finish(tally, reference, q_model, quant, fp_model)


def fidelity_report(fp_model, q_model, processor, samples: Iterable, *, quant=None,
                    max_tokens: int | None = 512) -> dict:
    """Compare a quantized (or fake-quantized) model with the full-precision one on the same held-out inputs.

    Runs both models on each sample in turn (nothing stored across samples). `quant`: the QuantResult, for bytes and
    per-module errors; without it the errors are measured from the two models' parameters (relative Frobenius only).
    """
    encoded = encode_samples(fp_model, processor, samples)
    ref = Reference(encoded, max_tokens, [], [], [], RouterCapture(fp_model).top_k)
    tally = _Tally()
    n_experts = _n_experts(q_model)
    for s in encoded:
        fp_logits, fp_ids = _run(fp_model, s, max_tokens)
        q_logits, q_ids = _run(q_model, s, max_tokens)
        tally.add(torch.log_softmax(fp_logits, dim=-1), fp_logits.argmax(-1), q_logits, fp_ids, q_ids,
                  _text_mask(s), n_experts)
    return _finish(tally, ref, q_model, quant, fp_model)


def _finish(tally: _Tally, ref: Reference, q_model, quant, fp_model) -> dict:
    from .fake_quant import decoder_bytes

    report = tally.result()
    report["samples"] = len(ref.samples)
    report["images"] = sum(len(s.inputs.images_spatial_crop) for s in ref.samples)
    report["top_k"] = ref.top_k
    report["bytes"] = decoder_bytes(q_model, quant.weights if quant is not None else None)
    if quant is not None:
        report["modules"] = quant.errors
        report["quantization"] = quant.summary()
        report["recipe"] = quant.recipe.to_dict()
    elif fp_model is not None:
        report["modules"] = parameter_errors(fp_model, q_model)
    return report


@torch.inference_mode()
def parameter_errors(fp_model, q_model) -> dict:
    """Relative Frobenius error of every decoder parameter that differs between the two models."""
    q_params = dict(q_model.named_parameters())
    out = {}
    for name, p in fp_model.named_parameters():
        qp = q_params.get(name)
        if not name.startswith("language.") or qp is None or qp is p or torch.equal(qp, p):
            continue
        w, w_q = p.float(), qp.float()
        out[name.removesuffix(".weight")] = {"rel_fro": float((w - w_q).norm() / w.norm().clamp_min(1e-30)),
                                             "rel_weighted": None}
    return out


# --- presentation -----------------------------------------------------------------------------------------------------

def _kind_summary(modules: dict) -> dict:
    """Mean errors per module kind (attention, dense MLP, shared experts, routed experts, lm_head...)."""
    from .recipe import module_kind

    acc: dict[str, list] = {}
    for name, e in modules.items():
        kind = module_kind(name) or "other"
        acc.setdefault(kind, []).append(e)
    out = {}
    for kind, errs in sorted(acc.items()):
        fro = [e["rel_fro"] for e in errs]
        wtd = [e["rel_weighted"] for e in errs if e.get("rel_weighted") is not None]
        out[kind] = {"tensors": len(errs), "rel_fro_mean": sum(fro) / len(fro),
                     "rel_weighted_mean": sum(wtd) / len(wtd) if wtd else None}
    return out


def format_report(report: dict) -> str:
    """A human-readable summary of a fidelity report."""
    b = report["bytes"]
    lines = []
    q = report.get("quantization")
    if q:
        lines.append(f"recipe {q['recipe']}  method {q['method']}" + (f"  mode {q['mode']}" if q["mode"] else "")
                     + f"  quantization {q['seconds']:.1f} s  calibration {q['calibration'] or '-'}")
    lines += [
        f"held-out: {report['samples']} samples, {report['images']} images, {report['positions']} positions",
        f"KL(fp||q) nats: mean {report['kl_mean']:.5f}  p99 {report['kl_p99']:.5f}  max {report['kl_max']:.5f}"
        + (f"  (text positions: mean {report['kl_mean_text']:.5f})" if report.get("kl_mean_text") is not None
           else ""),
        f"top-1 agreement: {100 * report['top1_agreement']:.2f} %",
    ]
    if report.get("routing_overlap"):
        per = "  ".join(f"{n.split('.')[3]}:{v:.3f}" for n, v in report["routing_overlap"].items())
        lines.append(f"top-{report['top_k']} routing overlap: mean {report['routing_overlap_mean']:.4f}  "
                     f"min {report['routing_overlap_min']:.4f}  per layer {per}")
    lines.append(f"decoder bytes: {b['total'] / 1e9:.3f} GB ({b['quantized'] / 1e9:.3f} GB quantized + "
                 f"{b['high_precision'] / 1e9:.3f} GB bf16) vs {b['bf16_total'] / 1e9:.3f} GB bf16 "
                 f"({b['total'] / b['bf16_total']:.3f}x)")
    if report.get("modules"):
        lines.append("reconstruction error by module kind (relative Frobenius / Hessian-weighted):")
        for kind, s in _kind_summary(report["modules"]).items():
            wtd = f"{s['rel_weighted_mean']:.5f}" if s["rel_weighted_mean"] is not None else "-"
            lines.append(f"  {kind:15s} {s['tensors']:4d} tensors  {s['rel_fro_mean']:.5f} / {wtd}")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    """Write the report atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
        tmp = Path(f.name)
    tmp.replace(path)
