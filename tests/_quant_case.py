"""One quantized-decoder check, shared by tests/test_quantized_model.py and its Triton-interpreter subprocess.

A case is (synthetic checkpoint, recipe, backend): RTN-quantize the decoder under the recipe, swap the quantized
layers in with the backend, and compare the decoder's logits at every prompt position with the same model whose
weights are replaced by their dequantized values (the "fake-quantized" fp32 model: the runtime's reference math).

    python tests/_quant_case.py RECIPE BACKEND PROMPTS CHECKPOINT...   # PROMPTS: short,long; one JSON line per
                                                                       # checkpoint: `compare` per prompt

(the subprocess form: TRITON_INTERPRET must be set before Triton is first imported, so the cuda backend's kernels
are checked in a fresh process rather than by changing the environment of the whole test session).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edge_vl2.inputs.processor import Processor, ProcessorOutput
from edge_vl2.model.moe import Router
from edge_vl2.model.vl2 import load_model
from edge_vl2.quant.experts import QuantExperts
from edge_vl2.quant.linear import QuantLinear
from edge_vl2.quant.ops import BnbOp, FloatOp
from edge_vl2.quant.swap import quantizable_modules, swap_in_quantized_
from edge_vl2.quantize.formats import QuantSpec
from edge_vl2.quantize.rtn import rtn_decoder_weights

RECIPES = ("int8", "int4", "mixed", "mixed-no-lm-head")
PROJS = ("gate_proj", "up_proj", "down_proj")


def recipe(name: str, model) -> Callable[[str], QuantSpec | None]:
    """spec_for(module or per-expert name) of a recipe, for rtn_decoder_weights.

    int8   INT8 per channel everywhere (attention, dense MLP, shared and routed experts, lm_head).
    int4   INT4 g32 asymmetric everywhere the cpu INT4 kernel takes it (out_features % 16 == 0); INT8 per channel
           for the rest: only the test-size Small's kv_a_proj_with_mqa (40 rows; the real one has 576).
    mixed  attention INT8 per channel, lm_head INT8 g32, dense MLP INT4 g32 sym, shared experts INT4 g32 asym;
           layer 1's routed experts all INT8 g32 (one stacked group), layer 2's per expert: e % 3 = 0 INT8 per
           channel, 1 INT4 g32 asym, 2 INT4 g32 sym, and expert 5's down_proj left in float.
    mixed-no-lm-head  mixed with lm_head left in float: for Triton's interpreter, which runs ~1 ms per 128-row
           weight tile (the test-size lm_head has 129,280 rows: ~2 minutes per call).
    """
    linears, _ = quantizable_modules(model)
    int8, int8_g32 = QuantSpec(8, None), QuantSpec(8, 32)
    int4_asym, int4_sym = QuantSpec(4, 32, symmetric=False), QuantSpec(4, 32, symmetric=True)

    def int4(name):
        return int8 if name in linears and linears[name].weight.shape[0] % 16 else int4_asym

    def mixed(name):
        if ".self_attn." in name:
            return int8
        if name.endswith("lm_head"):
            return int8_g32
        if ".shared_experts." in name:
            return int4_asym
        if ".experts." not in name:
            return int4_sym  # layer 0's dense MLP
        layer, expert, proj = int(name.split(".")[3]), int(name.split(".")[-2]), name.split(".")[-1]
        if layer == 1:
            return int8_g32
        if expert == 5 and proj == "down_proj":
            return None
        return (int8, int4_asym, int4_sym)[expert % 3]

    def mixed_no_lm_head(name):
        return None if name.endswith("lm_head") else mixed(name)

    return {"int8": lambda name: int8, "int4": int4, "mixed": mixed, "mixed-no-lm-head": mixed_no_lm_head}[name]


def fake_parameters(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{parameter name: new full tensor} putting `weights` ({quantized name: float tensor}, names as swap_in_quantized_
    takes them: module paths, `{experts}.{proj}` stacks, `{experts}.{e}.{proj}` single experts) into the model's
    float parameters, which are left as they are."""
    linears, experts = quantizable_modules(model)
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if name in linears:
            out[f"{name}.weight"] = w.clone()
            continue
        head, _, proj = name.rpartition(".")
        if head in experts:
            out[f"{head}.{proj}"] = w.clone()
        else:
            stack, _, e = head.rpartition(".")
            param = f"{stack}.{proj}"
            if param not in out:
                out[param] = getattr(experts[stack], proj).detach().clone()
            out[param][int(e)] = w
    return out


def canonical_weights(quantized: dict) -> dict[str, torch.Tensor]:
    """What the reference, cpu and cuda backends multiply by: our formats' dequantized values."""
    return {name: w.dequantize(torch.float32) for name, w in quantized.items()}


def bnb_weights(model) -> dict[str, torch.Tensor]:
    """What the bnb backend multiplies by: bitsandbytes' own NF4 / LLM.int8 re-quantization, read back per layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and isinstance(module.op, BnbOp):
            out[name] = module.op.dequantized()
        elif isinstance(module, QuantExperts):
            for group, ids in zip(module.groups, module.members):
                for local, e in enumerate(ids):
                    if group.fused:
                        gate, up = _held(group.gate_up, local).split(group.inter)
                    else:
                        gate, up = _held(group.gate, local), _held(group.up, local)
                    out[f"{name}.{e}.gate_proj"], out[f"{name}.{e}.up_proj"] = gate, up
                    out[f"{name}.{e}.down_proj"] = _held(group.down, local)
    return out


def _held(op, expert: int) -> torch.Tensor:
    return op.weight[expert] if isinstance(op, FloatOp) else op.dequantized(expert)


def prompts(checkpoint: Path) -> dict[str, ProcessorOutput]:
    """A short prompt (every quantized matmul takes its packed few-row path) and a long one (over
    PREFILL_DEQUANT_MIN_ROWS rows: the cpu backend's dense layers and lm_head take the fp32 dequantize path)."""
    processor = Processor.from_pretrained(checkpoint)
    long_text = " ".join(f"Item {i}: a crate of {i % 7 + 2} apples left at the harbour gate." for i in range(8))
    return {"short": processor.process_prompt("Write one sentence about a quiet harbour at dawn.", []),
            "long": processor.process_prompt(long_text, [])}


@torch.inference_mode()
def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """Decoder inputs [T, H] (token embeddings are never quantized: the same for every model of a checkpoint)."""
    return model.language.model.embed_tokens(ids)


class RouteRecorder:
    """While active, records the experts every MoE router chooses (routers are never quantized): `routes()` gives
    them sorted per token, [positions seen so far, MoE layers, k] (prefill chunks and decode steps in order)."""

    def __init__(self, model):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self.hooks = []

    def __enter__(self) -> "RouteRecorder":
        for router, calls in zip(self.routers, self.calls):
            self.hooks.append(router.register_forward_hook(
                lambda _m, _x, out, calls=calls: calls.append(out[0].sort(dim=-1).values)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def routes(self) -> torch.Tensor:
        return torch.stack([torch.cat(calls) for calls in self.calls], dim=1)


@torch.inference_mode()
def logits_and_routes(model, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, vocab] at every position of one causal pass (no cache), and the routes [T, layers, k]."""
    with RouteRecorder(model) as rec:
        lm = model.language
        logits = lm.logits(lm(embeds))
    return logits, rec.routes()


def compare(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """(logits, routes) of two models on the same positions. A position where any layer chose other experts
    ("rerouted") carries a whole expert's output of difference, so the error figures are over the positions routed
    alike: relative Frobenius error and the worst position's relative error; top-1 agreement is over all positions."""
    (got_logits, got_routes), (want_logits, want_routes) = got, want
    alike = (got_routes == want_routes).flatten(1).all(dim=1)  # [T]
    err2 = ref2 = worst = 0.0
    top1 = 0
    for a in range(0, want_logits.shape[0], 64):  # [64, vocab] temporaries: the logits are ~0.1 GB each
        g, w, keep = got_logits[a:a + 64], want_logits[a:a + 64], alike[a:a + 64]
        top1 += int((g.argmax(-1) == w.argmax(-1)).sum())
        if not keep.all():
            g, w = g[keep], w[keep]
        diff2 = torch.linalg.vector_norm(g - w, dim=-1).double().square()
        norm2 = torch.linalg.vector_norm(w, dim=-1).double().square()
        err2, ref2 = err2 + float(diff2.sum()), ref2 + float(norm2.sum())
        worst = max([worst, *(diff2 / norm2).sqrt().tolist()])
    n = want_logits.shape[0]
    return {"positions": n, "rerouted": int(n - alike.sum()), "top1": top1 / n,
            "rel": (err2 / ref2) ** 0.5 if ref2 else 0.0, "worst_pos_rel": worst}


def _copy_sharing(model, replace: dict[str, torch.Tensor] | None = None):
    """A copy of the model's modules sharing every parameter with it, except those in `replace` (by name): cheap,
    and safe because nothing here writes to a parameter."""
    replace = replace or {}
    memo = {id(p): nn.Parameter(replace[n], requires_grad=False) if n in replace else p
            for n, p in model.named_parameters()}
    return copy.deepcopy(model, memo)


def quantized_copy(model, quantized: dict, backend: str, **options):
    """The float model with the quantized layers swapped in, as a new model (the float model stays as it is)."""
    return swap_in_quantized_(_copy_sharing(model), quantized, backend, **options)


def fake_quantized_copy(model, weights: dict[str, torch.Tensor]):
    """The float model with `weights` in place of its float values, as a new model."""
    return _copy_sharing(model, fake_parameters(model, weights))


def run_case(checkpoint: Path, recipe_name: str, backend: str, prompt_names=("short", "long"), **options) -> dict:
    """Metrics per prompt of one case, from scratch (the subprocess form)."""
    model, _ = load_model(checkpoint, dtype=torch.float32)
    quantized = rtn_decoder_weights(model, recipe(recipe_name, model))
    qmodel = quantized_copy(model, quantized, backend, **options)
    fake = fake_quantized_copy(model, bnb_weights(qmodel) if backend == "bnb" else canonical_weights(quantized))
    metrics = {}
    for name, inputs in prompts(checkpoint).items():
        if name not in prompt_names:
            continue
        embeds = embed(model, inputs.input_ids)
        metrics[name] = compare(logits_and_routes(qmodel, embeds), logits_and_routes(fake, embeds))
    return metrics


if __name__ == "__main__":
    recipe_arg, backend_arg, prompts_arg = sys.argv[1:4]
    opts = {"kernel": "triton"} if backend_arg == "cuda" else {}
    for ckpt in sys.argv[4:]:
        metrics = run_case(Path(ckpt), recipe_arg, backend_arg, tuple(prompts_arg.split(",")), **opts)
        print(json.dumps({"checkpoint": ckpt, **metrics}))
