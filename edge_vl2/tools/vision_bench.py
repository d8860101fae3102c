"""`edge-vl2 vision-bench`: the vision tower + projector per tile, PyTorch fp32 against ONNX Runtime at each
precision and graph recipe, in one run, on the processor's tiles of one image.

Steps: read only the tower + projector (fp32) from the checkpoint, time PyTorch and free it, export every graph to
a temporary folder in child processes (unvalidated: a benchmark reports the differences rather than refusing them),
then per graph open a session, warm it up, time it and compare it with the PyTorch outputs. Both sides use the same
threads (one per physical core) and tiles per run. Recipes (edge_vl2.export.vision_onnx.RECIPES): "fused" is what
export writes for the CPU graphs, "plain" what edge-vl2 0.1 wrote, so `--recipes plain,fused` is a before/after in
one run. `cpu_isa="avx2"` reruns the whole benchmark in a child process that sees an AVX2-only CPU
(edge_vl2.tools.cpu_isa); every result says which ISA it ran on. Timing hygiene (edge_vl2.tools.timing):
GOMP_SPINCOUNT is set before torch is first imported (small torch ops otherwise stall a flat 8 ms); the host is
noisy, so compare within one run: medians and ratios.

Only the standard library is imported at module level, so `run_vision_bench` can set the environment first.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from edge_vl2.errors import UserError
from edge_vl2.procinfo import peak_rss_bytes
from edge_vl2.tools import cpu_isa
from edge_vl2.tools.timing import set_timing_env


def generated_card(width: int = 1024, height: int = 704):
    """A generated image (gradients, bars, text-like strokes) for runs without --image: 3x2 local tiles."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for i in range(0, width, 64):
        draw.rectangle([i, height - 120, i + 30, height - 20], fill=(255 - i % 256, i % 256, 128))
    for row in range(8):
        draw.text((40, 40 + 40 * row), "edge-vl2 vision bench 0123456789 " * 3, fill=(0, 0, 0))
    return img


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _time_per_tile(fn, tiles, repeats: int, batch: int):
    """(median ms per tile over `repeats` runs over all tiles, every run's ms per tile, the last run's output),
    after one untimed run on a chunk of the timed shape (allocations, ORT's weight prepacking, lazy init)."""
    fn(tiles[:batch])
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(tiles)
        runs.append((time.perf_counter() - t0) * 1e3 / len(tiles))
    return sorted(runs)[len(runs) // 2], [round(r, 2) for r in runs], out


def run_vision_bench(model_dir: str | Path, image: str | Path | None = None,
                     precisions: tuple[str, ...] = ("fp32", "fp16", "int8"), repeats: int = 3,
                     max_tiles: int | None = None, threads: int | None = None, batch: int = 4,
                     progress=None, recipes: tuple[str, ...] | None = None, isa: str = "native",
                     graphs_dir: str | Path | None = None) -> dict:
    """Time and compare; returns {"setup": {...}, "records": [torch record, one per graph]}.

    Each record: backend, precision, recipe, ms_per_tile (median), runs_ms, ratio (PyTorch ms / this ms: above 1
    is faster than PyTorch), peak_rss_mb of this process so far, and for ONNX Runtime max_abs, max_rel, cosine_min,
    cosine_mean against PyTorch fp32, tolerance_ok (the export tolerance), providers, graph_mb and export_s.
    `recipes`: None times each precision's export default; else every precision in each recipe listed.
    `isa`: "native" or "avx2" (run in a child process that sees an AVX2-only CPU; setup["isa"] says what ran).
    `graphs_dir`: keep the graphs there instead of a temporary folder, and time the ones already there instead of
    exporting them again (the export does not depend on the ISA, so one export serves native and avx2 runs).
    """
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:  # the export toolchain is not part of a device install
        raise UserError(f"vision-bench needs the export toolchain: pip install {' '.join(missing)}")
    if isa != os.environ.get(cpu_isa.MARKER, "native"):
        return _run_capped(isa, progress, model_dir=str(model_dir), image=None if image is None else str(image),
                           precisions=list(precisions), repeats=repeats, max_tiles=max_tiles, threads=threads,
                           batch=batch, recipes=None if recipes is None else list(recipes),
                           graphs_dir=None if graphs_dir is None else str(graphs_dir))
    env = set_timing_env()
    import onnxruntime
    import torch

    from edge_vl2.bundle.vision_ort import OrtVisionRunner, physical_cores
    from edge_vl2.export.vision_onnx import DEFAULT_RECIPE, PRECISIONS, RECIPES, TOLERANCES, compare, \
        load_vision_graph, tolerance_failures
    from edge_vl2.inputs.images import load_image
    from edge_vl2.inputs.processor import Processor

    say = progress or (lambda msg: None)
    unknown = [p for p in precisions if p not in PRECISIONS] + [r for r in recipes or () if r not in RECIPES]
    if unknown or not precisions or (recipes is not None and not recipes):
        raise UserError(f"unknown precision(s) / recipe(s) {unknown}; choose from {', '.join(PRECISIONS)} and "
                        f"{', '.join(RECIPES)}")
    if repeats < 1 or batch < 1 or (max_tiles is not None and max_tiles < 1):
        raise UserError("--repeats, --tiles and the batch must be at least 1")
    graphs = _distinct_graphs([(p, r or DEFAULT_RECIPE[p]) for r in (recipes or [None]) for p in precisions])
    threads = threads or physical_cores()
    torch.set_num_threads(threads)

    processor = Processor.from_pretrained(model_dir)
    picture = load_image(image) if image is not None else generated_card()
    tiles = processor.tile_image(picture)[0][:max_tiles]  # [N, 3, 384, 384], global view first
    say(f"{len(tiles)} tiles of {image or 'a generated test card'}; reading the vision tower")
    graph = load_vision_graph(model_dir)
    params = sum(p.numel() for p in graph.parameters())

    def torch_encode(x):
        with torch.inference_mode():
            return torch.cat([graph(chunk) for chunk in x.split(batch)])

    say(f"PyTorch fp32, {repeats} runs")
    torch_ms, torch_runs, reference = _time_per_tile(torch_encode, tiles, repeats, batch)  # [N, 196, H]
    records = [{"backend": "torch", "precision": "fp32", "recipe": "", "ms_per_tile": round(torch_ms, 2),
                "runs_ms": torch_runs, "ratio": 1.0, "peak_rss_mb": round(peak_rss_bytes() / 2**20)}]
    del graph, torch_encode  # from here on only the ONNX Runtime sessions hold weights
    gc.collect()

    if graphs_dir is not None:
        Path(graphs_dir).mkdir(parents=True, exist_ok=True)
    folder = tempfile.TemporaryDirectory(prefix="vision-bench.") if graphs_dir is None else nullcontext(graphs_dir)
    with folder as tmp:
        say(f"exporting {', '.join(f'{p} {r}' for p, r in graphs)} in child processes")
        exported = _export_in_child(model_dir, tmp, graphs)
        for precision, recipe in graphs:
            runner = OrtVisionRunner(Path(tmp) / _graph_name(precision, recipe), threads=threads, batch=batch)
            say(f"ONNX Runtime {precision} {recipe} on {', '.join(runner.providers)}, {repeats} runs")
            ms, runs, got = _time_per_tile(runner.encode_tiles, tiles, repeats, batch)
            figures = compare(got, reference)
            records.append({"backend": "onnxruntime", "precision": precision, "recipe": recipe,
                            "ms_per_tile": round(ms, 2), "runs_ms": runs, "ratio": round(torch_ms / ms, 2),
                            **{k: figures[k] for k in ("max_abs", "max_rel", "cosine_min", "cosine_mean")},
                            "tolerance_ok": not tolerance_failures(figures, TOLERANCES[precision]),
                            "providers": runner.providers, **exported["graphs"][f"{precision} {recipe}"],
                            "peak_rss_mb": round(peak_rss_bytes() / 2**20)})
            del runner
            gc.collect()

    setup = {"model": str(model_dir), "image": str(image) if image else "generated test card",
             "tiles": len(tiles), "batch": batch, "threads": threads, "repeats": repeats,
             "vision_params": params, "cpu": _cpu_name(), "isa": cpu_isa.isa_report(), "timing_env": env,
             "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
             "export_peak_rss_mb": exported["peak_rss_mb"], "peak_rss_mb": round(peak_rss_bytes() / 2**20)}
    return {"setup": setup, "records": records}


def _distinct_graphs(graphs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(precision, recipe) pairs without the ones that would build the same file: recipes that differ only in
    their int8 weights give one fp32 and one fp16 graph, named "fused" or "plain"."""
    from edge_vl2.export.vision_onnx import RECIPES

    out = []
    for precision, recipe in graphs:
        if precision != "int8":
            recipe = "fused" if RECIPES[recipe].fused else "plain"
        if (precision, recipe) not in out:
            out.append((precision, recipe))
    return out


def _run_capped(isa: str, progress, **kwargs) -> dict:
    """The benchmark in a child process whose CPUID reports `isa` (its progress lines pass through stderr)."""
    env = cpu_isa.capped_env(isa)  # UserError where this machine cannot do it
    args = [sys.executable, "-m", "edge_vl2.tools.vision_bench", "--run", json.dumps(kwargs)]
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=None if progress else subprocess.DEVNULL, text=True,
                          env=env)
    if proc.returncode != 0:
        raise UserError(f"vision-bench on {isa} failed (exit {proc.returncode}; its error is above)")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if isa != "native" and not result["setup"]["isa"]["cpuid_capped"]:
        raise UserError(f"vision-bench on {isa}: the CPUID cap did not take effect; figures not reported")
    return result


def _graph_name(precision: str, recipe: str) -> str:
    return f"vision-{precision}-{recipe}.onnx"


def _export_in_child(model_dir: str | Path, out_dir: str, graphs: list[tuple[str, str]]) -> dict:
    """Export in child processes, so the export's peaks are returned to the system before the sessions are timed
    instead of stacking on them: one traces the plain fp32 graph (the exporter keeps the PyTorch weights alive until
    its process ends) and fuses it, a second converts it to the others (~3x the fp32 weights at peak) without
    them. `graphs`: (precision, recipe) pairs."""
    from edge_vl2.export.vision_onnx import RECIPES

    fp32 = [("fp32", "plain")] + ([("fp32", "fused")] if any(RECIPES[r].fused for _, r in graphs) else [])
    steps = [fp32] + ([[g for g in graphs if g[0] != "fp32"]] if any(p != "fp32" for p, _ in graphs) else [])
    done, peak = {}, 0
    for step in steps:
        kept = [g for g in step if (Path(out_dir) / _graph_name(*g)).exists()]  # from an earlier run (graphs_dir)
        done.update({f"{p} {r}": {"export_s": None, "graph_mb": _graph_mb(Path(out_dir) / _graph_name(p, r))}
                     for p, r in kept})
        step = [g for g in step if g not in kept]
        if not step:
            continue
        args = [sys.executable, "-m", "edge_vl2.tools.vision_bench", str(model_dir), out_dir,
                *(f"{p}:{r}" for p, r in step)]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"exporting the vision graphs failed: {tail}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        done.update(result["graphs"])
        peak = max(peak, result["peak_rss_mb"])
    return {"graphs": done, "peak_rss_mb": peak}


def _export_all(model_dir: str, out_dir: str, graphs: list[tuple[str, str]]) -> dict:
    """A child's work: each graph as `vision-<precision>-<recipe>.onnx` in `out_dir` (unvalidated), its size and
    time; the plain fp32 graph is traced, every other one derived from the fp32 graph of its recipe already there."""
    from edge_vl2.export.vision_onnx import RECIPES, load_vision_graph, write_vision_graph

    out, done = Path(out_dir), {}
    for precision, recipe in graphs:
        t0 = time.perf_counter()
        path = out / _graph_name(precision, recipe)
        if (precision, recipe) == ("fp32", "plain"):
            write_vision_graph(load_vision_graph(model_dir), path, "fp32", recipe="plain")
        else:
            fused = RECIPES[recipe].fused and precision != "fp32"
            base = out / _graph_name("fp32", "fused" if fused else "plain")
            write_vision_graph(None, path, precision, fp32_graph=base, recipe=recipe)
        done[f"{precision} {recipe}"] = {"export_s": round(time.perf_counter() - t0, 1), "graph_mb": _graph_mb(path)}
    return {"graphs": done, "peak_rss_mb": round(peak_rss_bytes() / 2**20)}


def _graph_mb(path: Path) -> float:
    """The graph's size with its external-data file."""
    return round(sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name)) / 2**20, 1)


def format_table(result: dict) -> str:
    """The human-readable report: one line per graph, ratios against PyTorch fp32."""
    s = result["setup"]
    lines = [f"vision-bench: {s['model']} ({s['vision_params'] / 1e6:.1f}M vision params), {s['image']}: "
             f"{s['tiles']} tiles, {s['batch']} per run, {s['threads']} threads, median of {s['repeats']}",
             f"  {s['cpu']}; {cpu_isa.describe(s['isa'])}",
             f"  torch {s['torch']}, onnxruntime {s['onnxruntime']}; {s['timing_env']}",
             f"  {'backend':<28}{'ms/tile':>10}{'vs torch':>10}{'max|ORT-torch|':>16}{'max_rel':>10}"
             f"{'1-cos(worst)':>14}{'tol':>5}  providers"]
    for r in result["records"]:
        name = f"{r['backend']} {r['precision']} {r.get('recipe', '')}".strip()
        if r["backend"] == "torch":
            lines.append(f"  {name:<28}{r['ms_per_tile']:>10.1f}{'1.00x':>10}")
            continue
        lines.append(f"  {name:<28}{r['ms_per_tile']:>10.1f}{r['ratio']:>9.2f}x{r['max_abs']:>16.3g}"
                     f"{r['max_rel']:>10.2g}{1 - r['cosine_min']:>14.2g}{'ok' if r['tolerance_ok'] else 'OVER':>5}  "
                     f"{','.join(p.replace('ExecutionProvider', '') for p in r['providers'])}")
    lines.append(f"  peak RSS {s['peak_rss_mb']:.0f} MB (during export {s['export_peak_rss_mb']:.0f} MB)")
    return "\n".join(lines)


if __name__ == "__main__":  # children: `--run KWARGS_JSON` (a capped benchmark) or MODEL_DIR OUT_DIR PREC:RECIPE...
    try:
        if sys.argv[1] == "--run":
            kwargs = json.loads(sys.argv[2])
            kwargs.update(precisions=tuple(kwargs["precisions"]),
                          recipes=None if kwargs["recipes"] is None else tuple(kwargs["recipes"]))
            report = run_vision_bench(**kwargs, isa=os.environ.get(cpu_isa.MARKER, "native"),
                                      progress=lambda msg: print(msg, file=sys.stderr, flush=True))
            print(json.dumps(report))
        else:
            print(json.dumps(_export_all(sys.argv[1], sys.argv[2], [tuple(g.split(":")) for g in sys.argv[3:]])))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
