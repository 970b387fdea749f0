"""segment_layers: split the tagged flat graph into one GraphModule per segment.

Why: early exit means "stop calling segments"; a backend can only skip what is a separate callable.
After this pass the top-level graph is a short chain of call_module nodes

    embed(ids, embed_weight) -> h
    layer_i(h, pos, keys, valid_i, k_cache_i, v_cache_i, cos, sin, <layer i weights>) -> h    i = 0..L-1
    head(h, norm_weight, head_weight) -> (hn, logits)

and each segment is a GraphModule whose placeholders are exactly the values it reads, named by role
and ordered canonically (`capture.INPUT_ROLES`): hidden state, positions, S (as `keys`' length), its
own validity row and K/V cache, the shared RoPE tables, its weights. Weights are inputs, never
attributes, so every layer segment has the same code and one compiled layer serves all layers.
In-place cache writes stay in-place on the segment's own cache placeholders.

Shared untagged nodes (symbolic sizes) are recomputed inside each segment that needs them. Each
segment's body is copied in original order, so the top-level graph computes exactly what the flat
graph did (tests run both and compare).

Skip case: an already segmented graph (it has segment call_module nodes) is returned unchanged.
Error: a graph with no layer tags (run tag_layers on a graph from `capture`), a layer that reads
more than one value from earlier segments, or an untagged node computed from a tagged one.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch.fx.node import map_arg

from .result import ROLE, SEGMENT, TAG, PassError, PassResult, segment_calls


def _input_order():
    from ..capture import INPUT_ROLES

    return {r: i for i, r in enumerate(INPUT_ROLES)}


@dataclass
class SegmentModules:
    embed: torch.fx.GraphModule | None
    layers: list[torch.fx.GraphModule]
    head: torch.fx.GraphModule | None


def segments_of(gm: torch.fx.GraphModule) -> SegmentModules:
    """The segment GraphModules of a segmented graph, layers in order."""
    embed = head = None
    layers = {}
    for n in segment_calls(gm):
        mod = gm.get_submodule(n.target)
        kind = n.meta[SEGMENT]
        if kind == "embed":
            embed = mod
        elif kind == "head":
            head = mod
        else:
            layers[n.meta[TAG]] = mod
    return SegmentModules(embed, [layers[i] for i in sorted(layers)], head)


def segment_layers(gm: torch.fx.GraphModule, settings=None) -> PassResult:
    graph = gm.graph
    if segment_calls(gm):  # already segmented
        return PassResult(gm, _counts(gm), modified=False)
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    tagged = [n for n in body if n.op == "call_function" and TAG in n.meta]
    layer_ids = sorted({n.meta[TAG] for n in tagged if isinstance(n.meta[TAG], int)})
    if not layer_ids:
        raise PassError(
            "no decoder-layer tags in the graph: expected nodes with meta['specee_layer'] set by tag_layers "
            "from nn_module_stack (paths ending in `layers.<i>`); capture the model with "
            "`specee_compile.capture.capture_and_segment` or run tag_layers first"
        )
    unsupported = [n for n in body if n.op not in ("call_function", "get_attr")]
    if unsupported:
        raise PassError(
            f"segment_layers expects a flat aten graph; found {unsupported[0].op} node {unsupported[0]}"
        )

    groups: dict = {}
    for n in body:
        groups.setdefault(n.meta.get(TAG), []).append(n)
    shared = set(groups.pop(None, []))
    for n in shared:
        for a in n.all_input_nodes:
            if a.op != "placeholder" and a not in shared:
                raise PassError(
                    f"untagged node {n} reads {a} of segment {a.meta.get(TAG)!r}; "
                    "shared nodes must depend on graph inputs only"
                )
    order = (["embed"] if "embed" in groups else []) + layer_ids + (["head"] if "head" in groups else [])
    unknown = set(groups) - set(order)
    if unknown:
        raise PassError(f"unknown segment tags {sorted(map(str, unknown))}; expected ints, 'embed' or 'head'")

    member = {n: tag for tag, nodes in groups.items() for n in nodes}
    out_node = next(n for n in graph.nodes if n.op == "output")
    rank = _input_order()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ph_index = {p: i for i, p in enumerate(placeholders)}

    new = torch.fx.Graph()
    env = {}
    for p in placeholders:
        q = new.placeholder(p.name, type_expr=p.type)
        q.meta = copy.copy(p.meta)
        env[p] = q
    root = torch.nn.Module()
    for tag in order:
        nodes = groups[tag]
        sub, inputs, outputs = _build_segment(tag, nodes, member, shared, rank, ph_index)
        kind = tag if isinstance(tag, str) else "layer"
        name = kind if isinstance(tag, str) else f"layer_{tag}"
        sub_gm = torch.fx.GraphModule(torch.nn.Module(), sub, class_name=f"Segment_{name}")
        sub_gm.meta[SEGMENT] = kind
        sub_gm.meta[TAG] = tag
        sub_gm.meta["specee_inputs"] = [r for r, _ in inputs]
        root.add_module(name, sub_gm)
        call = new.call_module(name, tuple(env[o] for _, o in inputs))
        call.meta[SEGMENT] = kind
        call.meta[TAG] = tag
        vals = [o.meta.get("val") for o in outputs]
        if len(outputs) == 1:
            call.meta["val"] = vals[0]
            env[outputs[0]] = call
        else:
            call.meta["val"] = tuple(vals)
            for j, o in enumerate(outputs):
                g = new.call_function(operator.getitem, (call, j))
                g.meta["val"] = vals[j]
                g.meta[TAG] = tag
                env[o] = g
    missing = [a for a in out_node.all_input_nodes if a not in env]
    if missing:
        raise PassError(f"graph outputs {missing} are not produced by any segment")
    new.output(map_arg(out_node.args[0], env.__getitem__))
    new_gm = torch.fx.GraphModule(root, new, class_name="SegmentedStep")
    new_gm.meta.update(gm.meta)
    return PassResult(new_gm, _counts(new_gm), modified=True)


def _build_segment(tag, nodes, member, shared, rank, ph_index):
    """One segment's graph: (graph, [(role, outer input node)], [outer nodes it outputs])."""
    inside = set(nodes)
    need_shared = []
    ext_ph, carried = [], []

    def visit(a):
        if a in inside:
            return
        if a.op == "placeholder":
            if a not in ext_ph:
                ext_ph.append(a)
        elif a in shared:
            if a not in need_shared:
                for b in a.all_input_nodes:
                    visit(b)
                need_shared.append(a)
        elif a not in carried:
            carried.append(a)

    for n in nodes:
        for a in n.all_input_nodes:
            visit(a)
    if tag == "embed" and carried:
        raise PassError(f"the embedding segment reads {carried} from other segments")
    if tag != "embed" and len(carried) != 1:
        raise PassError(
            f"segment {tag!r} reads {len(carried)} values from earlier segments ({carried}); expected exactly "
            "one (the hidden state): is a layer reading another layer's cache or weights?"
        )
    roles = []
    for p in ext_ph:
        role = p.meta.get(ROLE, p.name)
        roles.append((rank.get(role, len(rank)), ph_index[p], role, p))
    roles.sort(key=lambda t: (t[0], t[1]))
    inputs = [("h", c) for c in carried] + [(r, p) for _, _, r, p in roles]
    seen_roles = [r for r, _ in inputs]
    if len(set(seen_roles)) != len(seen_roles):
        dup = sorted({r for r in seen_roles if seen_roles.count(r) > 1})
        raise PassError(
            f"segment {tag!r} reads several inputs of role {dup}: a layer may read only its own "
            "weights, cache and validity row"
        )

    sub = torch.fx.Graph()
    env = {}
    for role, outer in inputs:
        ph = sub.placeholder(role, type_expr=outer.type)
        ph.meta = {
            k: v for k, v in outer.meta.items() if k in ("val", "tensor_meta", ROLE, "specee_input_layer")
        }
        ph.meta[ROLE] = role
        env[outer] = ph
    position = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    for n in sorted(need_shared, key=position.__getitem__) + nodes:
        new = sub.create_node(
            n.op,
            n.target,
            map_arg(n.args, env.__getitem__),
            map_arg(n.kwargs, env.__getitem__),
            type_expr=n.type,
        )
        new.meta = copy.copy(n.meta)
        env[n] = new
    outputs = [n for n in nodes if any(member.get(u) != tag for u in n.users)]
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return sub, inputs, outputs


def _counts(gm) -> dict:
    segs = segments_of(gm)
    layer_ops = [tuple(str(n.target) for n in m.graph.nodes if n.op == "call_function") for m in segs.layers]
    return {
        "segments": len(segment_calls(gm)),
        "layer_segments": len(segs.layers),
        "ops_per_layer": len(layer_ops[0]) if layer_ops else 0,
        "uniform_layers": int(len(set(layer_ops)) <= 1),
    }
