"""kv_validity: check that each layer reads and writes only its own K/V cache and validity row.

Why: the KV contract (DESIGN.md) is per layer: layer i holds K/V for the positions where valid[i] is
True, and early exit works because a skipped layer's row is simply never written (the `skip`
policy), while `backfill` later writes it. That holds only if a layer segment touches no other
layer's cache or validity row: a graph that, say, read valid[0] in layer 3 would silently attend to
positions layer 3 has no K/V for. This pass proves it on the graph instead of trusting capture.

Checked, for every layer i (segment call in a segmented graph, or tagged nodes in a flat one):
  * the inputs of role valid / k_cache / v_cache it reads are layer i's (meta["specee_input_layer"]);
  * every in-place write (ops whose schema marks an argument as written) targets one of those
    three inputs, never a weight, another layer's input or a shared input.
After it: each layer segment call has meta["specee_kv"] = {"layer", "valid", "k_cache", "v_cache",
"writes"}, naming the outer placeholders it owns and the ops that write them.
Counts: layers checked, cache writes (K and V), validity writes, layers that read their validity row.

Skip case: a graph with no layer tags or segments is left unchanged (nothing to check).
Error: any violation, naming the layer, the node and the foreign input.
"""

from __future__ import annotations

import torch

from .result import CACHE_ROLES, INPUT_LAYER, ROLE, TAG, PassError, PassResult, mutated_args, segment_calls


def kv_validity(gm: torch.fx.GraphModule, settings=None) -> PassResult:
    calls = segment_calls(gm, "layer")
    units = _segmented_units(gm, calls) if calls else _flat_units(gm)
    counts = {"layers_checked": 0, "cache_writes": 0, "validity_writes": 0, "validity_reads": 0}
    changed = False
    for layer, nodes, outer_of, anchor in units:
        owned, inner = {}, {}
        writes = []
        for n in nodes:
            for a in n.all_input_nodes:
                outer = outer_of(a)
                if outer is None or outer.op != "placeholder":
                    continue
                role = outer.meta.get(ROLE)
                if role in CACHE_ROLES or INPUT_LAYER in outer.meta:
                    if outer.meta.get(INPUT_LAYER) != layer:
                        raise PassError(
                            f"layer {layer} reads {outer.name} (role {role!r}) of layer "
                            f"{outer.meta.get(INPUT_LAYER)} in node {n.name}: a layer may read only its own "
                            "cache, validity row and weights"
                        )
                    if role in CACHE_ROLES:
                        owned[role], inner[role] = outer, a
            for a in mutated_args(n):
                outer = outer_of(a)
                role = outer.meta.get(ROLE) if outer is not None else None
                if outer is None or outer.op != "placeholder" or role not in CACHE_ROLES:
                    raise PassError(
                        f"layer {layer} writes {a.name} in place ({n.name}: {n.target}); only its own "
                        f"{', '.join(CACHE_ROLES)} inputs may be written"
                    )
                writes.append((n.name, role))
                counts["validity_writes" if role == "valid" else "cache_writes"] += 1
        if "valid" in inner and _reads(inner["valid"], nodes):
            counts["validity_reads"] += 1
        counts["layers_checked"] += 1
        note = {
            "layer": layer,
            **{r: owned[r].name for r in CACHE_ROLES if r in owned},
            "writes": sorted(writes),
        }
        if anchor is not None and anchor.meta.get("specee_kv") != note:
            anchor.meta["specee_kv"] = note
            changed = True
    return PassResult(gm, counts, modified=changed)


def _segmented_units(gm, calls):
    for call in calls:
        sub = gm.get_submodule(call.target)
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        outer = dict(zip(phs, call.args))
        nodes = [n for n in sub.graph.nodes if n.op == "call_function"]
        yield call.meta[TAG], nodes, outer.get, call


def _flat_units(gm):
    by_layer = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.meta.get(TAG), int):
            by_layer.setdefault(n.meta[TAG], []).append(n)
    for layer in sorted(by_layer):
        yield layer, by_layer[layer], (lambda a: a), None


def _reads(valid, nodes) -> bool:
    """Does some node read the validity row (directly, or through the alias an in-place write returns)?"""
    aliases = {valid}
    for n in nodes:
        written = mutated_args(n)
        if any(a in aliases for a in written):
            aliases.add(n)
        if any(a in aliases and a not in written for a in n.all_input_nodes):
            return True
    return False
