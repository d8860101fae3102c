"""How quantized routed-expert weights are named: the one rule the toolchain writes and the runtime reads.

A layer's routed experts live in one module (`language.model.layers.{i}.mlp.experts`, a stack of E experts). For
each projection (gate_proj, up_proj, down_proj):
    `{stack}.{proj}`        one stacked weight [E, out, in] when every expert has the same format (the common case);
    `{stack}.{e}.{proj}`    one weight per expert otherwise (a mixed recipe), the checkpoint's own per-expert name.
An expert projection named neither way keeps its float weight.
"""

from __future__ import annotations

from typing import Hashable, Sequence

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def stacked_name(stack: str, proj: str) -> str:
    return f"{stack}.{proj}"


def expert_name(stack: str, e: int, proj: str) -> str:
    return f"{stack}.{e}.{proj}"


def layer_experts(layer: int) -> str:
    """The expert-stack module of decoder layer `layer`."""
    return f"language.model.layers.{layer}.mlp.experts"


def is_stacked(specs: Sequence[Hashable | None]) -> bool:
    """Experts with these formats (None = left in float) are stored as one stack: all equal and quantized."""
    return None not in specs and len(set(specs)) == 1


def parse_expert_name(name: str, stack_sizes: dict[str, int]) -> tuple[str, int | None, str] | None:
    """`{stack}.{proj}` -> (stack, None, proj); `{stack}.{e}.{proj}` -> (stack, e, proj) for a known stack of
    `stack_sizes[stack]` experts; anything else None."""
    head, _, proj = name.rpartition(".")
    if proj not in EXPERT_PROJS:
        return None
    if head in stack_sizes:
        return head, None, proj
    stack, _, index = head.rpartition(".")
    if stack in stack_sizes and index.isdigit() and int(index) < stack_sizes[stack]:
        return stack, int(index), proj
    return None
