"""Graph passes: one per file, each `(gm, settings) -> PassResult(gm, counts, modified)`.

`PASS_ORDER` is the pipeline; `run_passes` runs it, collects every pass's counts, names the pass that
failed, and with `dump_dir` writes each graph before and after each pass (`NN_<pass>_before.txt`,
`NN_<pass>_after.txt`). Every pass is idempotent: run twice, the second run reports modified=False
and leaves the graph as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cleanup import cleanup
from .insert_exit_predictors import insert_exit_predictors
from .kv_validity import kv_validity
from .result import PassError, PassResult
from .segment_layers import segment_layers
from .tag_layers import tag_layers

PASS_ORDER = [
    # 1. Everything after works per layer; tags come from nn_module_stack, which only the flat
    #    traced graph still has complete, so tagging is first.
    tag_layers,
    # 2. Needs the tags. Splits the graph into embed / layer_i / head segments; passes after it see
    #    segment boundaries as call_module nodes instead of re-deriving them from tags.
    segment_layers,
    # 3. Needs the segment boundaries: an exit point sits *between* two layer segments, on the
    #    hidden state one segment hands to the next. Before segmentation that edge is just one of
    #    hundreds of tensors; after it, it is the call_module output.
    insert_exit_predictors,
    # 4. Checks what segmentation produced (each segment's cache and validity inputs are its own
    #    layer's) after every pass that adds or moves inputs, so a later pass cannot break it unseen.
    kv_validity,
    # 5. Last: removes what the passes left dead, lints and recompiles every graph the backends get.
    cleanup,
]


def run_passes(gm: torch.fx.GraphModule, settings=None, dump_dir: str | Path | None = None):
    """Run PASS_ORDER on `gm`. Returns (new gm, {pass name: counts}); raises PassError naming the pass."""
    counts = {}
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    for idx, fn in enumerate(PASS_ORDER, start=1):
        name = fn.__name__
        if dump is not None:
            (dump / f"{idx:02d}_{name}_before.txt").write_text(graph_text(gm))
        try:
            result = fn(gm, settings)
        except Exception as e:
            raise PassError(f"graph pass {idx:02d} '{name}' failed: {e}") from e
        gm = result.gm
        counts[name] = dict(result.counts, modified=result.modified)
        if dump is not None:
            (dump / f"{idx:02d}_{name}_after.txt").write_text(graph_text(gm))
    return gm, counts


def graph_text(gm: torch.fx.GraphModule) -> str:
    """Readable code of the graph and its segments (what --dump-graphs writes)."""
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


__all__ = [
    "PASS_ORDER",
    "PassError",
    "PassResult",
    "cleanup",
    "graph_text",
    "insert_exit_predictors",
    "kv_validity",
    "run_passes",
    "segment_layers",
    "tag_layers",
]
