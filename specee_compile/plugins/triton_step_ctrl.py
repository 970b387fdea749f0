"""The first and last kernels of a captured decode step (backends/cuda_step.py): what lets the host
launch step t+1 before it has read step t's token.

    step_prologue   tok := rec[TOKEN] when the host supplied the token (rec[HOST_TOKEN] != 0), else the
                    token the previous step wrote; with a control block, reset its per-step header
                    (alive, proposed, need-head = 1, exit layer = L - 1, head calls = 0) and copy the
                    forced exit layer of a trace from the record
    step_epilogue   tok := out[0] (the next step reads it); with an online schedule (the paper's T2,
                    predictors/schedule.py: offline layers U {e + o : e in the last N exits}), push a real
                    exit (layer < L - 1) into the device history and rewrite the active flags the next
                    step's exit kernels read

The record `rec` is int64 [4] = (pos, forced exit layer, token, host token flag), copied from pinned host
memory before each launch (the host knows these ahead of the tokens). One program each, a few hundred
bytes: latency only.
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, tl, triton

# rec fields (int64)
POS, FORCED_REC, TOKEN, HOST_TOKEN = 0, 1, 2, 3
REC_LEN = 4

if HAVE_TRITON:

    @triton.jit
    def _prologue_kernel(rec_ptr, tok_ptr, ctrl_ptr, last_layer,
                         HAS_CTRL: tl.constexpr, ALIVE: tl.constexpr, FORCED: tl.constexpr, EXIT: tl.constexpr,
                         PROPOSED: tl.constexpr, NEEDHEAD: tl.constexpr, HEADS: tl.constexpr):
        host = tl.load(rec_ptr + 3)
        t = tl.where(host != 0, tl.load(rec_ptr + 2), tl.load(tok_ptr))
        tl.store(tok_ptr, t)
        if HAS_CTRL:
            one = tl.full((), 1, tl.uint8)
            tl.store(ctrl_ptr + ALIVE, one)
            tl.store(ctrl_ptr + PROPOSED, one)
            tl.store(ctrl_ptr + NEEDHEAD, one)
            tl.store(ctrl_ptr + HEADS, tl.full((), 0, tl.uint8))
            tl.store(ctrl_ptr + EXIT, last_layer.to(tl.uint8))
            tl.store(ctrl_ptr + FORCED, tl.load(rec_ptr + 1).to(tl.uint8))

    @triton.jit
    def _epilogue_kernel(out_ptr, tok_ptr, hist_ptr, base_ptr, elig_ptr, offs_ptr, ctrl_ptr, last_layer,
                         L: tl.constexpr, LP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                         O: tl.constexpr, OP: tl.constexpr, ACT0: tl.constexpr, HAS_SCHED: tl.constexpr):
        tl.store(tok_ptr, tl.load(out_ptr))
        if HAS_SCHED:
            e = tl.load(out_ptr + 1)
            real = e < last_layer
            j = tl.arange(0, NP)
            jm = j < N
            hist = tl.load(hist_ptr + j, mask=jm, other=-1000)
            shifted = tl.load(hist_ptr + j + 1, mask=j + 1 < N, other=0)
            new = tl.where(j == N - 1, e, shifted)
            hist = tl.where(real, new, hist)
            tl.debug_barrier()
            tl.store(hist_ptr + j, hist, mask=jm)
            o = tl.arange(0, OP)
            off = tl.load(offs_ptr + o, mask=o < O, other=0)
            hist = tl.where(jm, hist, -1000)
            cand = hist[:, None] + off[None, :]  # [NP, OP]
            cand = tl.where((o < O)[None, :], cand, -1000)
            lyr = tl.arange(0, LP)
            hit = tl.sum(tl.sum((cand[None, :, :] == lyr[:, None, None]).to(tl.int32), axis=2), axis=1) > 0
            lm = lyr < L
            base = tl.load(base_ptr + lyr, mask=lm, other=0) != 0
            elig = tl.load(elig_ptr + lyr, mask=lm, other=0) != 0
            act = base | (elig & hit)
            tl.store(ctrl_ptr + ACT0 + lyr, act.to(tl.uint8), mask=lm)


def step_prologue(rec: torch.Tensor, tok: torch.Tensor, ctrl: torch.Tensor | None, num_layers: int,
                  offsets: dict[str, int] | None = None) -> None:
    """See the module docstring. offsets: the control block's ALIVE/FORCED/EXIT/PROPOSED/NEEDHEAD/HEADS."""
    o = offsets or {}
    _prologue_kernel[(1,)](rec, tok, ctrl if ctrl is not None else rec, num_layers - 1,
                           HAS_CTRL=ctrl is not None, ALIVE=o.get("ALIVE", 0), FORCED=o.get("FORCED", 0),
                           EXIT=o.get("EXIT", 0), PROPOSED=o.get("PROPOSED", 0), NEEDHEAD=o.get("NEEDHEAD", 0),
                           HEADS=o.get("HEADS", 0), num_warps=1)


def step_epilogue(out: torch.Tensor, tok: torch.Tensor, num_layers: int, sched=None) -> None:
    """See the module docstring. sched: None, or (hist int64 [N], base uint8 [L], elig uint8 [L],
    offsets int64 [O], ctrl uint8, act0) for the online schedule."""
    L = num_layers
    if sched is None:
        _epilogue_kernel[(1,)](out, tok, out, out, out, out, out, L - 1, L=L, LP=triton.next_power_of_2(L),
                               N=1, NP=2, O=1, OP=2, ACT0=0, HAS_SCHED=False, num_warps=1)
        return
    hist, base, elig, offs, ctrl, act0 = sched
    N, O = hist.numel(), offs.numel()
    _epilogue_kernel[(1,)](out, tok, hist, base, elig, offs, ctrl, L - 1, L=L, LP=triton.next_power_of_2(L),
                           N=N, NP=max(2, triton.next_power_of_2(N)), O=O, OP=max(2, triton.next_power_of_2(O)),
                           ACT0=act0, HAS_SCHED=True, num_warps=1)


def reference_schedule(hist: list[int], exit_layer: int, last_layer: int, base: set[int], elig: set[int],
                       offsets: tuple[int, ...]) -> tuple[list[int], set[int]]:
    """What step_epilogue computes, in Python (tests compare the kernel with it)."""
    h = list(hist)
    if exit_layer < last_layer and h:
        h = h[1:] + [exit_layer]
    hit = {e + o for e in h for o in offsets}
    return h, set(base) | (set(elig) & hit)


__all__ = ["FORCED_REC", "HOST_TOKEN", "POS", "REC_LEN", "TOKEN", "reference_schedule", "step_epilogue", "step_prologue"]
