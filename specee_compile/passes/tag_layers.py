"""tag_layers: say which decoder layer every node belongs to.

Why: everything after this pass (segmentation, exit points, the per-layer KV check) works on layers,
but an FX graph is one flat list of aten ops. torch.export and dynamo both record, per node, the
stack of modules it was traced under (`nn_module_stack`); the decoder layer is the module at a path
ending in `layers.<i>` (`layers.3` from capture, `L['self'].model.layers.3` from dynamo).

After it: every call_function node traced inside layer i has meta["specee_layer"] = i, nodes of the
embedding have "embed", those of the final norm / LM head have "head"; placeholders of one layer
(its weights, K/V cache and validity row, known from capture's meta["specee_input_layer"] or their
own module stack) carry the same tag. Nodes outside every module (symbolic sizes, shared RoPE
tables) stay untagged: they are shared, and segmentation recomputes them where needed.
Layer tags are 0..L-1 without gaps, and L matches the model's StepSpec when the graph carries one.

Skip case: a graph without module-stack metadata (hand-built, or captured without it) is left
alone (modified=False, tagged_nodes=0); `segment_layers` then says what is missing.
"""

from __future__ import annotations

import re

import torch

from .result import INPUT_LAYER, ROLE, SPEC, TAG, PassError, PassResult

LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)$")
EMBED_NAMES = frozenset({"embed", "embed_tokens", "wte"})
HEAD_NAMES = frozenset({"head", "lm_head", "norm"})
ROLE_TAGS = {"embed_weight": "embed", "norm_weight": "head", "head_weight": "head"}


def tag_of_stack(stack) -> int | str | None:
    """Layer index, "embed", "head" or None from an nn_module_stack (outermost first)."""
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    for path in paths:
        m = LAYER_PATH.search(path)
        if m:
            return int(m.group(1))
    for path in reversed(paths):  # innermost first
        leaf = path.rsplit(".", 1)[-1]
        if leaf in EMBED_NAMES:
            return "embed"
        if leaf in HEAD_NAMES:
            return "head"
    return None


def _tag_for(node: torch.fx.Node):
    if node.op == "placeholder":
        if INPUT_LAYER in node.meta:
            return node.meta[INPUT_LAYER]
        if node.meta.get(ROLE) in ROLE_TAGS:
            return ROLE_TAGS[node.meta[ROLE]]
    if node.op in ("placeholder", "call_function", "call_method", "call_module", "get_attr"):
        stack = node.meta.get("nn_module_stack")
        if stack:
            return tag_of_stack(stack)
    return None


def tag_layers(gm: torch.fx.GraphModule, settings=None) -> PassResult:
    changed = 0
    counts = {"tagged_nodes": 0, "layers": 0, "embed_nodes": 0, "head_nodes": 0, "shared_nodes": 0}
    layers = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        tag = _tag_for(node)
        if tag is None:
            if node.op == "call_function":
                counts["shared_nodes"] += 1
            continue
        if node.meta.get(TAG) != tag:
            node.meta[TAG] = tag
            changed += 1
        counts["tagged_nodes"] += 1
        if isinstance(tag, int):
            layers.add(tag)
        else:
            counts[f"{tag}_nodes"] += 1
    counts["layers"] = len(layers)
    if layers and sorted(layers) != list(range(len(layers))):
        raise PassError(
            f"decoder-layer tags should be 0..{len(layers) - 1}, found {sorted(layers)}: "
            "the graph lost a layer, or module paths are not `...layers.<i>`"
        )
    spec = gm.meta.get(SPEC)
    if layers and spec is not None and len(layers) != spec.num_layers:
        raise PassError(
            f"the model has {spec.num_layers} decoder layers but the graph has nodes of "
            f"{len(layers)}; was the graph traced from another model?"
        )
    return PassResult(gm, counts, modified=changed > 0)
