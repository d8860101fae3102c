"""`edge-vl2 inspect`: what a bundle is, how faithful it measured at export, and where it can run."""

from __future__ import annotations

from ..devices.profiles import available_devices, check_fit, load_device
from ..errors import UserError
from .loader import fit_bytes
from .reader import Bundle

GB = 1e9


def inspect_lines(bundle: Bundle) -> list[str]:
    """A human summary of a bundle: model, recipe, sizes, vision graphs, fidelity, what can run it and where."""
    m = bundle.manifest
    lines = [f"bundle {bundle.path} (schema {m.schema_version}, toolchain {m.toolchain_version})",
             f"model: {m.variant} from {m.source.model} (config sha256 {m.source.config_sha256[:12]})",
             _recipe_line(m.recipe),
             f"size: {bundle.total_bytes / GB:.3f} GB; decoder {bundle.decoder_bytes / GB:.3f} GB in "
             f"{len(m.decoder.files)} file(s) ({len(m.decoder.quantized)} quantized weights, "
             f"{len(m.decoder.high_precision)} bf16 tensors)"]
    for g in m.vision.graphs:
        v = g.validation
        lines.append(f"vision: {g.precision} {g.file} {bundle.graph_bytes(g) / GB:.3f} GB, opset {g.opset}, "
                     f"{(g.graph or 'plain').split(':')[0]} graph, "
                     f"max |ORT - torch| {v.get('max_abs', float('nan')):.3g}, worst tile cosine "
                     f"{v.get('cosine_min', float('nan')):.6f} on {v.get('tiles', 0)} tiles")
    lines += fidelity_lines(m.fidelity)
    for d, f in (m.fidelity_domains or {}).items():
        lines.append(f"  held-out {d:12s} KL mean {f.kl_mean:.5f}, p99 {f.kl_p99:.5f}, top-1 {100 * f.top1:.2f} % "
                     f"({f.sequences} sequences, {f.positions} text positions)")
    e = m.export or {}
    if e:
        lines.append(f"export: {e.get('seconds', 0):.0f} s, peak RSS {e.get('peak_rss_bytes', 0) / GB:.2f} GB "
                     f"(planned {e.get('planned_peak_bytes', 0) / GB:.1f} GB)")
    return lines + [_runs_here_line(), _fits_line(bundle)]


def _spec(d: dict | None) -> str:
    if d is None:
        return "bf16"
    return f"int{d['bits']}" + (f" g{d['group_size']}" if d.get("group_size") else " per-channel") + \
        ("" if d.get("symmetric", True) else " asym")


def _recipe_line(recipe: dict) -> str:
    modules = ", ".join(f"{k} {_spec(v)}" for k, v in (recipe.get("modules") or {}).items())
    overrides = len(recipe.get("expert_overrides") or {})
    return (f"recipe: {recipe.get('name')} by {recipe.get('method')}"
            + (f" ({recipe['mode']})" if recipe.get("mode") else "") + f": {modules}"
            + (f"; {overrides} per-expert overrides" if overrides else ""))


def fidelity_lines(f: dict) -> list[str]:
    """The export's fidelity record: skipped, or KL / top-1 / routing overlap figures."""
    if "skipped" in f:
        return [f"fidelity: not measured ({f['skipped']})"]
    if "kl_mean" not in f:
        return [f"fidelity: {sorted(f)}"]
    return [f"fidelity ({f.get('samples')} held-out samples, {f.get('positions')} positions): KL mean "
            f"{f['kl_mean']:.5f}, p99 {f.get('kl_p99', float('nan')):.5f}; top-1 agreement "
            f"{100 * f.get('top1_agreement', float('nan')):.2f} %"
            + (f"; top-{f.get('top_k')} routing overlap {f['routing_overlap_mean']:.4f}"
               if f.get("routing_overlap_mean") is not None else "")]


def _runs_here_line() -> str:
    from ..quant.linear import available_backends
    from .vision_ort import ort

    installed = ort.get_available_providers() if ort is not None else []
    backends = [n for n, b in available_backends().items() if b.available]
    return (f"runs here with: ONNX Runtime providers {', '.join(installed) or 'none (onnxruntime missing)'}; "
            f"decoder backends {', '.join(backends)}")


def _fits_line(bundle: Bundle) -> str:
    fits, too_big = [], []
    for name in available_devices():
        profile = load_device(name)
        try:
            need = check_fit(profile, *fit_bytes(bundle, profile), "")
            fits.append(f"{name} ({need:.1f}/{profile.memory_budget_gb:.1f} GB)")
        except UserError:
            too_big.append(name)
    return ("fits: " + (", ".join(fits) or "no shipped device profile")
            + (f"; too big for: {', '.join(too_big)}" if too_big else ""))
