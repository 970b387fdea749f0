"""What a backend gives the runtime loop: the one declared contract (`typing.Protocol`s).

The loop in `runtime/decoder.py` imports no backend; it calls only what is declared here.

`Backend` (every backend) -- static facts, the KV cache (reset / truncate for rollback) and a dense
prefill of the prompt that returns the last row's logits and the final-normed hidden states (what the
draft is reset with).

`Segments` (every model backend: eager, inductor) -- the decode step cut into per-layer segments over
a static KV cache (the KV contract of `model_step`). The loop composes a step from them, so every exit
policy and KV policy runs on every segment backend, backfill rows (q = 1 + pending) included.

`WholeStep` (optional, a backend that can run one whole decode step as one program: the CUDA-graph step
of the inductor backend, the conditional ONNX graph) -- the loop hands it a `StepPlan` (candidates,
active exit layers, thresholds, the exit policy) and gets a `StepOut` back. A backend says which
plans it can run (`can_run`); for the rest the loop composes the step from segments, so adding a whole
step never takes a mode away.

`PipelinedStep` (optional, a `WholeStep` that can launch a step before the previous one's token has
reached the host: the CUDA-graph step) -- `launch(plan)` enqueues the step and returns a `Launched`,
`collect(launched)` waits for it and returns its `StepOut`. A plan with `token_on_device` takes its input
token from the previous launched step, on the device; its candidates come from the device draft and its
active exit layers from the device copy of the online schedule (`DeviceSchedule`). So the loop keeps
one step in flight: it launches step t+1, then reads step t, and the GPU never waits for the host.

`Captures` (optional, a segment backend that can turn fixed-shape tensor code with no host read into
one replayable program: a CUDA graph on CUDA) -- the tree step's `FixedTree` (runtime/tree.py) asks
for one per attention bucket.

Shapes (batch 1): h [1, q, D]; pos [q] int64; candidates [k] int64; rows [k, D].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KVCacheLike(Protocol):
    def reset(self) -> None: ...

    def truncate(self, length: int) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """What every backend provides (see module docstring)."""

    name: str
    spec: object  # model_step.StepSpec (num_layers, vocab, hidden, ...)
    max_len: int
    device: torch.device
    cache: KVCacheLike

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]: ...  # -> (logits [V], hn [P, D])


@runtime_checkable
class Segments(Backend, Protocol):
    """Per-layer segments of the decode step (see module docstring)."""

    def attn_len(self, max_pos: int) -> int: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...  # ids [q] -> h [1, q, D]

    def layer(self, i: int, h: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor: ...

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # -> (hn, logits [1, q, V])

    def norm(self, h: torch.Tensor) -> torch.Tensor: ...

    def head_rows(self, candidates: torch.Tensor) -> torch.Tensor: ...  # [k] -> [k, D]

    def exit_score(self, i: int, h: torch.Tensor, rows: torch.Tensor, p_prev: torch.Tensor): ...


@dataclass(frozen=True)
class DeviceSchedule:
    """The online exit schedule (paper T2, predictors/schedule.py) in a form a whole step runs on the
    device: active = base | (eligible & {e + o : e in the last `window` exits, o in offsets})."""

    base: frozenset[int]  # always active (the offline layers that are exit points)
    eligible: frozenset[int]  # exit points a recent exit may activate
    window: int
    offsets: tuple[int, ...]


@dataclass
class StepPlan:
    """One decode step for the token at position `pos` (its id is `token`)."""

    token: int
    pos: int
    candidates: torch.Tensor | None = None  # [k]; None = dense step (no exit can happen)
    active: frozenset[int] = frozenset()  # layers whose exit point is evaluated this step
    thresholds: dict[int, float] = field(default_factory=dict)
    policy: object = None  # runtime.policies.ExitPolicy
    forced_exit: int | None = None  # TraceExits: exit after this layer (benchmark only)
    want_logits: bool = False  # the loop samples (--temperature): return the emitted row's logits
    draft: object = None  # a candidate source with a capturable `device_step`: the whole step runs the
    #                       draft on its new token, so the next step's candidates are ready on the device
    token_on_device: bool = False  # `token` is the previous launched step's output, not yet on the host
    schedule: DeviceSchedule | None = None  # the active set evolves on the device (PipelinedStep)
    history: tuple[int, ...] = ()  # the schedule's exit history, oldest first (host-token plans)


@dataclass
class StepOut:
    token: int
    exit_layer: int  # 0-based layer the step ended after (L - 1 = full depth)
    hn: torch.Tensor  # [D] final-normed hidden state at the exit (what the draft reads next)
    predictor_calls: int | None = 0  # None: the device chose the active set; the loop counts them
    head_calls: int = 0
    logits: torch.Tensor | None = None  # [V] float32 of the emitting head, when plan.want_logits
    draft_stepped: bool = False  # plan.draft.device_step ran: the next proposal is already on the device


@runtime_checkable
class Captures(Protocol):
    """See module docstring. `capture(fn, reset)` returns a callable that runs fn (on CUDA: replays the
    graph captured now, after warm-up runs, each preceded by `reset()`, so the caller can put its state
    where the runs may write; the caller then resets that state itself). Off CUDA it returns fn."""

    def capture(self, fn, reset) -> object: ...


@runtime_checkable
class WholeStep(Protocol):
    """A backend that runs a whole decode step as one program (see module docstring)."""

    def can_run(self, plan: StepPlan) -> bool: ...

    def prepare(self, plan: StepPlan, max_pos: int) -> None: ...  # compile/capture before the prefill

    def run_step(self, plan: StepPlan) -> StepOut: ...


@dataclass
class Launched:
    """A step a `PipelinedStep` has enqueued; `collect` turns it into a `StepOut`."""

    plan: StepPlan
    handle: object


@runtime_checkable
class PipelinedStep(WholeStep, Protocol):
    """A whole step that can run ahead of the host (see module docstring)."""

    def can_run_ahead(self, plan: StepPlan) -> bool: ...  # may the next plan take its token on the device

    def launch(self, plan: StepPlan) -> Launched: ...

    def collect(self, launched: Launched) -> StepOut: ...


__all__ = ["Backend", "DeviceSchedule", "KVCacheLike", "Launched", "PipelinedStep", "Segments", "StepOut", "StepPlan",
           "WholeStep"]
