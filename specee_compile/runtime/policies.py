"""Exit policies and KV policies as objects that declare what they need.

The loop (`runtime/decoder.py`) and whole-step backends read these declarations; nothing compares
mode strings. A new policy is one class here plus one entry in its table.

Exit policy: what happens when a predictor proposes an exit after layer l.
    exit_token    "full_head": run the full LM head on the exit state, emit its argmax T
                  "candidates": emit the argmax over the k candidate logits (no full head)
    verify_in_candidates  exit only if T is one of the candidates (the paper's check)
    needs_rollback        the emitted token is checked later (by backfill) and may be replaced
    needs_kv              the KV policy it requires (None = any)
    forced                the decision comes from StepPlan.forced_exit, not from the predictor

KV policy: what deeper layers hold for an exited token.
    keeps_pending   the exited row waits with its hidden state and is pushed through the skipped
                    layers with the next deep token (backfill); False = never written (skip)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExitPolicy:
    name: str
    exit_token: str
    verify_in_candidates: bool
    needs_rollback: bool
    needs_kv: str | None
    forced: bool = False
    trace: tuple[int, ...] = ()  # forced policies: exit layer per decode step (L - 1 or more = none)

    def forced_layer(self, step: int) -> int | None:
        """Forced policies: at decode step `step` the token exits at the first evaluated (active) exit
        layer >= this one (None: no exit this step)."""
        if not self.forced or not self.trace:
            return None
        return self.trace[step % len(self.trace)]

    def forced_path_layer(self, start: int, n: int) -> int | None:
        """Forced policies on a tree (runtime/tree.py `FixedTree`): a verify step that emits n tokens takes the
        trace's entries start .. start + n - 1 and exits where the deepest of them does (SpecEE's merged
        mapping: a path leaves at its last-to-exit token's layer). None for unforced policies."""
        if not self.forced or not self.trace:
            return None
        return max(self.trace[(start + j) % len(self.trace)] for j in range(max(1, n)))

    def exit_rates(self, layers) -> dict[int, float] | None:
        """Forced policies know where tokens exit: the share of trace steps at each layer (for
        runtime/exit_costs.py); None for policies whose rates come from the artifacts."""
        if not self.forced or not self.trace:
            return None
        return {layer: self.trace.count(layer) / len(self.trace) for layer in layers}


APPROXIMATE = ExitPolicy("approximate", exit_token="full_head", verify_in_candidates=True,
                         needs_rollback=False, needs_kv=None)
LOSSLESS = ExitPolicy("lossless", exit_token="candidates", verify_in_candidates=False,
                      needs_rollback=True, needs_kv="backfill")
# benchmark only: random weights cannot exit, so an exit-layer trace decides; the head still runs on
# the exit state (the paper's cost), the predictor still runs at every active layer
def trace_exits(trace) -> ExitPolicy:
    """TraceExits: exit after layer trace[n] at decode step n (the trace repeats)."""
    return ExitPolicy("trace", exit_token="full_head", verify_in_candidates=False, needs_rollback=False,
                      needs_kv="skip", forced=True, trace=tuple(int(t) for t in trace))


@dataclass(frozen=True)
class AcceptPolicy:
    """Tree steps (runtime/tree.py): which path a verify step accepts. "greedy" walks the tree with the
    target's argmax (the output is dense greedy). A trace (benchmark only: random weights accept nothing)
    forces the tokens per verify step, bonus included; the step accepts the best-scored path of that length
    (or the deepest the tree has), so the verification and the cache work are the real ones."""

    name: str
    trace: tuple[int, ...] = ()

    def forced_tokens(self, step: int) -> int | None:
        return self.trace[step % len(self.trace)] if self.trace else None


GREEDY_ACCEPT = AcceptPolicy("greedy")


def trace_accepts(trace) -> AcceptPolicy:
    """TraceAccepts: verify step n emits trace[n] tokens (bonus included; the trace repeats). n counts the
    decoder's verify steps across generate calls (`TreeStep.trace_steps`)."""
    if not trace or min(trace) < 1:
        raise ValueError("an acceptance trace needs lengths >= 1 (the bonus token is always emitted)")
    return AcceptPolicy("trace", trace=tuple(int(t) for t in trace))


@dataclass(frozen=True)
class KVPolicy:
    name: str
    keeps_pending: bool


SKIP = KVPolicy("skip", keeps_pending=False)
BACKFILL = KVPolicy("backfill", keeps_pending=True)

EXIT_POLICIES: dict[str, ExitPolicy] = {p.name: p for p in (APPROXIMATE, LOSSLESS)}  # user-selectable
KV_POLICIES: dict[str, KVPolicy] = {p.name: p for p in (SKIP, BACKFILL)}


def exit_policy(name: str) -> ExitPolicy:
    return EXIT_POLICIES[name]


def kv_policy(name: str) -> KVPolicy:
    return KV_POLICIES[name]


__all__ = ["APPROXIMATE", "BACKFILL", "GREEDY_ACCEPT", "AcceptPolicy", "EXIT_POLICIES", "KV_POLICIES", "LOSSLESS", "SKIP",
           "ExitPolicy", "KVPolicy", "exit_policy", "kv_policy", "trace_accepts", "trace_exits"]
