"""insert_exit_predictors: put an exit point after every layer segment but the last.

Why: the exit decision is part of the program, not of the runtime's Python: every backend must lower
the same `specee::exit_score` op (ops.py), and the ONNX/TensorRT form needs it in the graph to build
its `If` branches. After layer i the op scores the current token's row (the last row of the layer's
output) against the k candidate LM-head rows:

    h_last = h_i[:, -1:]                                             # [1, 1, D]
    score_i, z_i, p_i = specee.exit_score(h_last, norm_weight, exit_rows, exit_p_prev_i,
                                          exit_w1_i, exit_b1_i, exit_w2_i, exit_b2_i, eps)

`exit_rows` [k, D] (shared by all exit points of a step) and, per layer, `exit_p_prev_i` [k] and the
predictor MLP `exit_w1_i` [Hm, 3k], `exit_b1_i` [Hm], `exit_w2_i` [Hm], `exit_b2_i` [1] are new
placeholders; score/z/p of every exit point are appended to the graph outputs (after hn, logits),
so the whole program can be run and compared as dataflow. Which exits are *taken* is control flow:
the runtime (or the ONNX If) decides from the scores; this graph computes all of them.

After it: L - 1 exit_score nodes with meta["specee_exit"] = i; `exit_point_module` gives the one
GraphModule (h, norm_weight, rows, p_prev, w1, b1, w2, b2) -> (score, z, p) that serves every layer.

Skip case: a graph without layer segments (run segment_layers first) or one whose exit points are
already in place is left unchanged. Error: no final-norm placeholder or no StepSpec (eps).
"""

from __future__ import annotations

import operator

import torch

from .result import EXIT, ROLE, SPEC, TAG, PassError, PassResult, segment_calls

PREDICTOR_HIDDEN = 512  # only for the fake-tensor metadata of the new placeholders; any width runs
EXIT_INPUTS = ("h", "norm_weight", "rows", "p_prev", "w1", "b1", "w2", "b2")


def exit_points_of(gm: torch.fx.GraphModule) -> list[int]:
    return sorted(n.meta[EXIT] for n in gm.graph.nodes if n.op == "call_function" and n.target == _op())


def _op():
    from .. import ops  # noqa: F401  (registers specee::exit_score)

    return torch.ops.specee.exit_score.default


def insert_exit_predictors(gm: torch.fx.GraphModule, settings=None) -> PassResult:
    layers = segment_calls(gm, "layer")
    if not layers:
        return PassResult(gm, {"exit_points": 0, "inserted": 0}, modified=False)
    done = set(exit_points_of(gm))
    todo = [n for n in layers[:-1] if n.meta[TAG] not in done]
    if not todo:
        return PassResult(gm, {"exit_points": len(done), "inserted": 0}, modified=False)
    spec = gm.meta.get(SPEC)
    if spec is None:
        raise PassError(
            "the graph carries no StepSpec (gm.meta['specee_step_spec']); the exit op needs the "
            "model's RMSNorm eps: capture the graph with specee_compile.capture"
        )
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    norm = next((p for p in placeholders if p.meta.get(ROLE) == "norm_weight"), None)
    if norm is None:
        raise PassError("no placeholder with role 'norm_weight' (the model's final norm) for the exit op")
    k = getattr(settings, "num_candidates", 4)
    fake = _fake_mode(placeholders)
    D, dev = spec.hidden, norm.meta["val"].device if "val" in norm.meta else None

    def add_input(name, role, shape, layer=None):
        with graph.inserting_after(_last_placeholder(graph)):
            p = graph.placeholder(name)
        p.meta[ROLE] = role
        p.meta[EXIT] = layer
        if fake is not None:
            with fake:
                p.meta["val"] = torch.empty(
                    shape, dtype=torch.float32 if role != "rows" else norm.meta["val"].dtype, device=dev
                )
        return p

    rows = next((p for p in placeholders if p.meta.get(ROLE) == "rows"), None)
    if rows is None:
        rows = add_input("exit_rows", "rows", (k, D))
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
    for call in todo:
        i = call.meta[TAG]
        p_prev = add_input(f"exit_p_prev_{i}", "p_prev", (k,), i)
        w1 = add_input(f"exit_w1_{i}", "w1", (PREDICTOR_HIDDEN, 3 * k), i)
        b1 = add_input(f"exit_b1_{i}", "b1", (PREDICTOR_HIDDEN,), i)
        w2 = add_input(f"exit_w2_{i}", "w2", (PREDICTOR_HIDDEN,), i)
        b2 = add_input(f"exit_b2_{i}", "b2", (1,), i)
        with graph.inserting_after(call):
            last = graph.call_function(torch.ops.aten.slice.Tensor, (call, 1, -1, 9223372036854775807))
        with graph.inserting_after(last):
            node = graph.call_function(_op(), (last, norm, rows, p_prev, w1, b1, w2, b2, spec.eps))
        parts = []
        prev = node
        for j in range(3):
            with graph.inserting_after(prev):
                prev = graph.call_function(operator.getitem, (node, j))
            parts.append(prev)
        for n in (last, node, *parts):
            n.meta[EXIT] = i
        if fake is not None and isinstance(call.meta.get("val"), torch.Tensor):
            with fake:
                last.meta["val"] = call.meta["val"][:, -1:]
                vals = _op()(
                    last.meta["val"],
                    norm.meta["val"],
                    rows.meta["val"],
                    p_prev.meta["val"],
                    w1.meta["val"],
                    b1.meta["val"],
                    w2.meta["val"],
                    b2.meta["val"],
                    spec.eps,
                )
            node.meta["val"] = vals
            for j, part in enumerate(parts):
                part.meta["val"] = vals[j]
        outputs.extend(parts)
    out_node.args = (tuple(outputs),)
    gm.meta["specee_outputs"] = ["hn", "logits"] + [
        f"{w}_{i}" for i in exit_points_of(gm) for w in ("score", "z", "p")
    ]
    gm.recompile()
    return PassResult(gm, {"exit_points": len(done) + len(todo), "inserted": len(todo)}, modified=True)


def exit_point_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The first exit point of `gm` as its own GraphModule; every exit point has the same code."""
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == _op())
    last, norm, rows, p_prev, w1, b1, w2, b2, eps = node.args
    sub = torch.fx.Graph()
    phs = {name: sub.placeholder(name) for name in EXIT_INPUTS}
    for name, outer in zip(EXIT_INPUTS[1:], (norm, rows, p_prev, w1, b1, w2, b2)):
        if "val" in outer.meta:
            phs[name].meta["val"] = outer.meta["val"]
    h_last = sub.call_function(last.target, (phs["h"], *last.args[1:]))
    op = sub.call_function(node.target, (h_last, *(phs[n] for n in EXIT_INPUTS[1:]), eps))
    sub.output(tuple(sub.call_function(operator.getitem, (op, j)) for j in range(3)))
    mod = torch.fx.GraphModule(torch.nn.Module(), sub, class_name="Segment_exit")
    mod.meta["specee_segment"] = "exit"
    mod.meta["specee_inputs"] = list(EXIT_INPUTS)
    return mod


def _last_placeholder(graph):
    last = None
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


def _fake_mode(placeholders):
    from torch._guards import detect_fake_mode

    vals = [p.meta["val"] for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals) if vals else None
