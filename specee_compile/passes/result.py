"""What every pass returns, the error a failing pass raises, and the graph facts passes share.

Metadata keys the passes read and write (one place, so they cannot drift apart):
    node.meta["specee_layer"]        int i (decoder layer i), "embed", "head"; absent = shared
    node.meta["specee_role"]         placeholders: "ids", "pos", "keys", "valid", "k_cache", "wqkv", ...
    node.meta["specee_input_layer"]  placeholders of one layer (its weights, cache, validity row)
    node.meta["specee_segment"]      call_module nodes of a segmented graph: "embed" | "layer" | "head"
    node.meta["specee_exit"]         nodes inserted for the exit point after layer i
    gm.meta["specee_step_spec"]      the model's StepSpec (eps, shapes), set by capture
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SpecEEError

TAG = "specee_layer"
ROLE = "specee_role"
INPUT_LAYER = "specee_input_layer"
SEGMENT = "specee_segment"
EXIT = "specee_exit"
SPEC = "specee_step_spec"
CACHE_ROLES = ("valid", "k_cache", "v_cache")


class PassError(SpecEEError):
    """A graph pass could not run (or `run_passes` names the pass that failed)."""


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    counts: dict = field(default_factory=dict)
    modified: bool = False


def graph_modules(gm: torch.fx.GraphModule) -> list[tuple[str, torch.fx.GraphModule]]:
    """The graph module itself ("") and every GraphModule submodule, by qualified name."""
    out = [("", gm)]
    for name, mod in gm.named_modules():
        if name and isinstance(mod, torch.fx.GraphModule):
            out.append((name, mod))
    return out


def segment_calls(gm: torch.fx.GraphModule, kind: str | None = None) -> list[torch.fx.Node]:
    """call_module nodes of a segmented graph (optionally of one kind), in graph order."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and n.meta.get(SEGMENT) and (kind is None or n.meta[SEGMENT] == kind)
    ]


def mutated_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Argument nodes an aten/custom op writes in place (from its schema's alias annotations)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, torch.fx.Node):
                out.append(value)
    return out
