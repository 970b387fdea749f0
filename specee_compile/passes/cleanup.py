"""cleanup: dead-code elimination, lint and recompile of the graph and every segment.

Why: the passes before it copy nodes between graphs and add outputs; a node whose value nobody reads
any more (a shape computation recomputed inside a segment, an unused alias) costs tracing time in
every backend, and a graph that does not lint is a bug better caught here than in Inductor or the
ONNX exporter. It runs last so that backends always receive linted, recompiled GraphModules.

After it: no dead pure nodes in the top-level graph or any segment (in-place cache writes and other
impure ops are kept: `Node.is_impure` sees their schema), every graph passes `Graph.lint()`, and
each GraphModule's Python code matches its graph. Count: nodes removed (second run: 0, unmodified).
"""

from __future__ import annotations

import torch

from .result import PassError, PassResult, graph_modules


def cleanup(gm: torch.fx.GraphModule, settings=None) -> PassResult:
    removed = 0
    for name, mod in graph_modules(gm):
        before = len(mod.graph.nodes)
        mod.graph.eliminate_dead_code()
        removed += before - len(mod.graph.nodes)
        try:
            mod.graph.lint()
        except RuntimeError as e:
            raise PassError(f"graph {name or '<top>'} does not lint after the passes: {e}") from e
        mod.recompile()
    return PassResult(gm, {"removed_nodes": removed, "graphs": len(graph_modules(gm))}, modified=removed > 0)
