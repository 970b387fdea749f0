"""Functions compiled by Inductor once per name, with their eager form as the fallback.

The device draft's step and expansion (`draft/eagle.py`, `draft/tree.py`) and the fixed tree program's glue
(`runtime/tree.py`) are fixed-shape tensor code that a CUDA graph records; compiled, each is a few fused
kernels instead of dozens of launches. One attended length S enters as the length of a `keys` tensor marked
as a dynamic dimension, so one compile serves every attention bucket. A compiler failure must not stop a
generation: the eager function is the same math, so from the first failure on every function runs eagerly
and `error` says why (printed once).
"""

from __future__ import annotations

import sys

import torch

RECOMPILE_LIMIT = 64  # compiles of one code object per process (Dynamo's default: 8)


def allow_recompiles() -> None:
    """Let a process build many decoders. Each decoder compiles the same functions (`model_step`'s layer, the
    draft's step) with its own constants (the model's shapes in closures, attention buckets, row counts), and
    Dynamo counts every such compile against one limit per code object: past 8 a `fullgraph=True` compile
    raises (the CUDA tree test on the H200 hit it at its third decoder, session 18) and the others would run
    eagerly. Raised once, never lowered."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)


class CompiledFns:
    def __init__(self, what: str, enabled: bool):
        self.what = what  # named in the fallback's message: "the draft", "the tree step's glue"
        self.enabled = bool(enabled)
        self.error: str | None = None
        self.fns: dict = {}  # name -> compiled function

    def __call__(self, name: str, fn, *args, keys: torch.Tensor | None = None, tune: bool = False):
        """fn(*args[, keys]), compiled (once per name) while `enabled` and no compile has failed; `tune`:
        Inductor's coordinate-descent tuning."""
        if keys is not None:
            args = (*args, keys)
        if self.enabled and self.error is None:
            f = self.fns.get(name)
            if f is None:
                from .plugins import pdl

                allow_recompiles()
                f = self.fns[name] = torch.compile(fn, fullgraph=True, dynamic=False,
                                                   options={"coordinate_descent_tuning": tune,
                                                            **pdl.inductor_options()})
            if keys is not None:
                torch._dynamo.maybe_mark_dynamic(keys, 0)
            try:
                return f(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function is the same math
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.fns.clear()
                print(f"specee: {self.what} runs eagerly (compile failed: {self.error})", file=sys.stderr)
        return fn(*args)
