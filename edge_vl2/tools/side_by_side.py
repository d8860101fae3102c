"""Our recipes and llama.cpp's quantizers side by side, on the same token sequences against the same reference.

    result = side_by_side(load_suite("suite/"), reports=["q.json"], peer_dir="peer/", types=("Q4_0", "Q8_0"))
    print(format_table(result))

- the reference and the sequences are the held-out suite kept by `edge-vl2 quantize --suite-dir` (the bf16
  checkpoint's log-probabilities at every scored position: prompt text + its own teacher-forced greedy answer);
- our rows come from `edge-vl2 quantize --report` files (each configuration's suite figures, measured on those same
  sequences in that run) and from bundles (`export --fidelity-samples`: the manifest's `fidelity_domains`);
- llama.cpp's rows: each GGUF of `peer_dir/peer.json` (the source GGUF and llama.cpp's quantizations of it,
  `edge_vl2.tools.peer`) evaluated by llama.cpp on the suite's token ids, logits at the scored positions scored by
  `score_external`. llama.cpp has no vision tower for this model: on image domains it is fed the reference's own
  image vectors at the `<image>` positions (`logits_with_embeddings`), the same inputs our rows get, so its row
  measures its decoder's quantization only. The source GGUF's row checks that the GGUF is our decoder (KL ~ 0).

Bytes: the decoder as stored (our quantize reports: quantized tensors + bf16 rest; bundles: the decoder files;
llama.cpp: the GGUF file, embeddings included in the file's own format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

GB = 1e9


@dataclass
class Row:
    label: str
    source: str  # "ours (quantize report)", "ours (bundle)", "llama.cpp"
    bytes: int
    domains: dict = field(default_factory=dict)  # {domain: {"kl_mean", "kl_p99", "top1", ...}}


def report_rows(path: str | Path) -> list[Row]:
    """Rows of an `edge-vl2 quantize --report` file (configurations measured on the suite)."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read a quantize report ({e})") from None
    rows = [Row(run["config"], "ours", run["bytes"]["total"], run["suite"]["domains"])
            for run in report.get("runs", []) if run.get("suite")]
    if not rows:
        raise UserError(f"{path}: no configuration with held-out suite figures (run quantize with --suite N)")
    return rows


def bundle_row(path: str | Path) -> Row:
    """A bundle's decoder bytes and the per-domain figures its export measured."""
    from dataclasses import asdict

    from ..bundle.manifest import MANIFEST, Manifest

    try:
        m = Manifest.from_dict(json.loads((Path(path) / MANIFEST).read_text()), str(Path(path) / MANIFEST))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the bundle manifest ({e})") from None
    if not m.fidelity_domains:
        raise UserError(f"{path}: the bundle has no per-domain fidelity (export it with --fidelity-samples N)")
    return Row(f"{Path(path).name} ({m.recipe.get('name')} {m.recipe.get('method')})", "ours (bundle)",
               m.decoder.bytes, {d: asdict(f) for d, f in m.fidelity_domains.items()})


def llama_rows(suite, peer_dir: str | Path, types: tuple[str, ...] | None = None, threads: int = 2,
               include_source: bool = True, images: bool = True, progress=lambda _m: None) -> list[Row]:
    """llama.cpp's logits on the suite's sequences for the GGUFs of `peer_dir/peer.json` (image sequences with the
    reference's image vectors, unless `images` is False)."""
    from edge_vl2.quantize.heldout.suite import score_external

    from .peer.llama_runner import LlamaCppModel

    try:
        record = json.loads((Path(peer_dir) / "peer.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{peer_dir}: no readable peer.json (build it with edge_vl2.tools.peer.suite) ({e})") from None
    files = {q: v["path"] for q, v in record["quantized"].items() if types is None or q in types}
    missing = set(types or ()) - set(files)
    if missing:
        raise UserError(f"{peer_dir}: peer.json has no {', '.join(sorted(missing))}")
    if include_source:
        files = {f"source {record['source']['storage']}": record["source"]["path"], **files}
    domains = tuple(dict.fromkeys(s.domain for s in suite.sequences if not s.has_images or
                                  (images and s.image_embeds is not None)))
    n_ctx = max(len(s.ids) for s in suite.sequences if s.domain in domains) + 8
    rows = []
    for label, path in files.items():
        llm = LlamaCppModel(path, n_ctx=n_ctx, threads=threads, logits_all=True)
        try:
            figures = score_external(suite, lambda s: torch.from_numpy(_llama_logits(llm, s))[s.scored],
                                     domains=domains)
        finally:
            llm.close()
        rows.append(Row(f"llama.cpp {label}", "llama.cpp", Path(path).stat().st_size, figures["domains"]))
        progress(f"{label}: " + ", ".join(f"{d} KL {f['kl_mean']:.4f}" for d, f in figures["domains"].items()))
    return rows


def _llama_logits(llm, seq):
    if not seq.has_images:
        return llm.logits(seq.ids.tolist())
    mask = seq.encoded.inputs.images_seq_mask
    return llm.logits_with_embeddings(seq.ids.tolist(), mask.numpy(), seq.image_embeds.numpy())


def side_by_side(suite, reports: list[str] = (), bundles: list[str] = (), peer_dir: str | None = None,
                 types: tuple[str, ...] | None = None, threads: int = 2, source: bool = True,
                 progress=lambda _m: None) -> dict:
    """Every row (ours, then llama.cpp's) with its bytes and per-domain figures, and the domains in suite order."""
    rows: list[Row] = []
    for r in reports:
        rows += report_rows(r)
    rows += [bundle_row(b) for b in bundles]
    if peer_dir is not None:
        rows += llama_rows(suite, peer_dir, types, threads, include_source=source, progress=progress)
    domains = list(dict.fromkeys(s.domain for s in suite.sequences))
    return {"domains": domains, "sequences": {d: sum(s.domain == d for s in suite.sequences) for d in domains},
            "rows": [r.__dict__ for r in rows]}


def format_table(result: dict) -> str:
    """KL mean / top-1 % per domain, one row per configuration; '-' where a row has no figure (llama.cpp on images)."""
    domains = result["domains"]
    head = f"{'configuration':34s} {'GB':>7s} " + " ".join(f"{d:>17s}" for d in domains)
    lines = [head, f"{'':34s} {'':>7s} " + " ".join(f"{'KL mean (top-1 %)':>17s}" for _ in domains)]
    for r in result["rows"]:
        cells = []
        for d in domains:
            f = r["domains"].get(d)
            cells.append(f"{f['kl_mean']:8.4f} ({100 * f['top1']:4.1f})" if f else "-")
        lines.append(f"{r['label'][:34]:34s} {r['bytes'] / GB:7.3f} " + " ".join(f"{c:>17s}" for c in cells))
    return "\n".join(lines)
