"""The decode loop: dense, or with speculative early exits. The one loop for every backend: it calls
only the contract of `runtime/contract.py` (a backend's `Segments`, and its `WholeStep` where it has
one) and reads the exit / KV policy objects of `runtime/policies.py`.

Per step the loop builds a `StepPlan` (token, candidates, active exit layers, thresholds, policy). A
backend with a whole-step program that can run the plan (the CUDA-graph step of the inductor backend:
dense, and exits without pending rows) runs it in one call; otherwise the loop composes the step from
the backend's segments, as below. Both give the same tokens (tests/test_runtime.py, test_inductor.py).

One step emits one token. With early exit (greedy, batch 1) a step for the token at position p:
  1. candidates S (k tokens) from the candidate source; their LM-head rows W_S [k, D], gathered once;
  2. layers run in order; after an *active* layer (scheduler) the exit op scores the state;
  3. exit when score > threshold and
       approximate mode: the full-head argmax T is in S (the paper's verification; T is emitted);
       lossless mode:    always; T = argmax over the k candidate logits (no full head);
  4. KV policy:
       skip:     deeper layers never get K/V for p; their validity mask leaves p out (the paper);
       backfill: p stays *pending* with its hidden state; the next step that goes deeper pushes the
                 pending rows through the layers they skipped together with its own row, so the
                 cache ends equal to the dense cache. At most `max_pending` rows wait; then the step
                 runs at full depth;
  5. lossless: a backfilled row that reaches the last layer yields the dense model's token for the
     position after it. If it differs from the token emitted there, everything after is rolled back
     (K/V validity, tokens, draft state) and the dense token is emitted instead. Output = dense greedy.

Work is counted two ways, backfill and rolled-back work included:
  layer passes: one per layer call, whatever its rows. At batch 1 decode is memory-bound: a pass
                reads the layer's weights once, so 1 + pending rows cost about one row. This is
                `avg_layers` (passes per decode step); dense gives exactly num_layers.
  layer rows:   every (layer, row) computed, `avg_layer_rows`: the arithmetic. With backfill
                every token eventually gets all layers, so this stays >= num_layers; it shows what
                backfill costs where compute, not memory, is the limit.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..config import Settings
from ..errors import InputError, SpecEEError
from ..program import SpecEEProgram
from .contract import Backend, DeviceSchedule, Launched, PipelinedStep, Segments, StepOut, StepPlan, WholeStep
from .exit_costs import StepCosts, path_rates, select_exit_points
from .policies import GREEDY_ACCEPT, AcceptPolicy, ExitPolicy, exit_policy, kv_policy
from .sampling import select_token


@dataclass
class GenerationResult:
    prompt_len: int
    token_ids: list[int]  # generated ids (prompt excluded)
    num_layers: int
    exit_layers: list[int]  # per generated token: 0-based layer its step exited after (L-1 = full)
    layer_passes: int = 0  # decode work, see module docstring
    layer_rows: int = 0
    decode_steps: int = 0
    rollbacks: int = 0
    predictor_calls: int = 0
    head_calls: int = 0
    pending_depths: list[int] = field(default_factory=list)  # pending rows joined at each deep step
    verify_steps: int = 0  # tree steps (--speculate tree; runtime/tree.py): one verify forward each
    accepted_tokens: int = 0  # tokens the tree steps emitted (accepted path + bonus)
    tree_nodes: int = 0  # draft-tree nodes verified, over all tree steps
    load_s: float = 0.0  # loading the model (set by whoever loaded it: the CLI)
    compile_s: float = 0.0  # compile + graph capture before the prefill (0 when everything was ready)
    compile_cache: dict | None = None  # what that compile found on disk (plugins/compile_cache.py `report`)
    exit_program: dict | None = None  # exit points kept / dropped (with reasons) and the measured costs
    tree_guard: dict | None = None  # the tree's costs and whether it was declined (runtime/tree.py TreeGuard)
    draft_quant: str | None = None  # the EAGLE draft's weights ("none", "int8"; None: no EAGLE draft)
    draft_dtype: str | None = None  # what the EAGLE draft computes in ("float32", "float16", ...; None: no EAGLE draft)
    gemm: dict | None = None  # the CPU matmul library the backend timed and chose (eager, inductor; backends/cpu_gemm.py)
    pdl: str | None = None  # SPECEE_PDL on CUDA (plugins/pdl.py: programmatic dependent launch); None off CUDA
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def avg_layers(self) -> float:
        return self.layer_passes / self.decode_steps if self.decode_steps else float(self.num_layers)

    @property
    def avg_layer_rows(self) -> float:
        return self.layer_rows / self.decode_steps if self.decode_steps else float(self.num_layers)

    @property
    def accepted_per_step(self) -> float | None:
        """Mean tokens per tree verify step, bonus included (None without tree steps)."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else None

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode phase (a tree step emits several; a declined tree's steps after it,
        one each)."""
        n = self.accepted_tokens + self.decode_steps - self.verify_steps
        return n / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids)
        total = self.prefill_s + self.decode_s
        return n / total if total > 0 else 0.0

    def exit_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.exit_layers).items()))

    def stats(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "prompt_len": self.prompt_len,
            "num_layers": self.num_layers,
            "avg_layers": self.avg_layers,
            "avg_layer_rows": self.avg_layer_rows,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tok_s,
            "load_s": self.load_s,
            "compile_s": self.compile_s,
            "compile_cache": self.compile_cache,
            "exit_points_kept": (self.exit_program or {}).get("exit_points_kept"),
            "exit_points_dropped": (self.exit_program or {}).get("exit_points_dropped"),
            "exit_program": self.exit_program,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "exit_layers": self.exit_layers,
            "exit_histogram": {str(k): v for k, v in self.exit_histogram().items()},
            "layer_passes": self.layer_passes,
            "layer_rows": self.layer_rows,
            "decode_steps": self.decode_steps,
            "rollbacks": self.rollbacks,
            "predictor_calls": self.predictor_calls,
            "pending_depth_histogram": {str(k): v for k, v in sorted(Counter(self.pending_depths).items())},
            "verify_steps": self.verify_steps,
            "accepted_per_step": self.accepted_per_step,
            "avg_tree_nodes": self.tree_nodes / self.verify_steps if self.verify_steps else None,
            "tree_guard": self.tree_guard,
            "draft_quant": self.draft_quant,
            "draft_dtype": self.draft_dtype,
            "gemm": self.gemm,
            "pdl": self.pdl,
        }


def _pdl_mode() -> str:
    from ..plugins import pdl

    return pdl.mode()


def _dtype_name(dtype) -> str | None:
    """"float16" for torch.float16; None for None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def check_prompt(prompt_ids: list[int], max_new_tokens: int, max_len: int, remedy: str) -> None:
    """Refuse an empty prompt, or one that with max_new_tokens does not fit the static cache."""
    if not prompt_ids:
        raise InputError("the prompt is empty: pass some text to generate from")
    need = len(prompt_ids) + max_new_tokens
    if need > max_len:
        raise InputError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
            f"context of {max_len} tokens; shorten the prompt, lower --max-new-tokens, or {remedy}"
        )


@dataclass
class _Row:
    pos: int  # sequence position of the row
    done: int  # last layer computed for it
    h: torch.Tensor  # [1, 1, D] hidden state after layer `done`


class Decoder:
    def __init__(
        self,
        segments: Backend,
        settings: Settings,
        eos_ids: set[int] | None = None,
        program: SpecEEProgram | None = None,
        draft=None,
        scheduler=None,
        policy: ExitPolicy | None = None,
        accept: AcceptPolicy | None = None,
    ):
        self.seg = segments
        self.s = settings
        self.L = segments.spec.num_layers
        self.eos = set(eos_ids or ())
        self.program = program
        self.draft = draft
        self.scheduler = scheduler
        self.policy = policy or exit_policy(settings.mode)
        self.accept = accept or GREEDY_ACCEPT  # tree steps: which path a verify step accepts
        self.kv = kv_policy(settings.kv_policy)
        self.whole = segments if isinstance(segments, WholeStep) else None
        self.pipelined = segments if isinstance(segments, PipelinedStep) else None
        self._ahead: Launched | None = None  # a step launched before the previous one's token was read
        self.dev_schedule: DeviceSchedule | None = None
        self.composable = isinstance(segments, Segments)
        self.as_dense = not settings.specee  # True also once no exit point pays for itself (exit_costs.py)
        self.selection: dict | None = None
        self._draft_warm = False  # the draft's eager path has run once (`_warm_draft`)
        self.tree = None  # the tree step (runtime/tree.py), set below for --speculate tree
        if settings.specee:
            if program is None or draft is None:
                raise SpecEEError("--specee needs artifacts (predictors and a candidate source)")
            if settings.temperature > 0:
                raise SpecEEError("--specee decodes greedily (as the paper); drop --temperature or --specee")
            if self.policy.needs_kv is not None and self.policy.needs_kv != self.kv.name:
                raise SpecEEError(f"exit policy {self.policy.name} needs kv_policy={self.policy.needs_kv}")
            self.exit_layers = sorted(ep.layer for ep in program.exit_points if ep.layer < self.L - 1)
            self.thresholds = {
                ep.layer: ep.threshold if settings.threshold is None else settings.threshold
                for ep in program.exit_points
            }
        if settings.speculate == "tree":
            from .tree import TreeStep

            self.tree = TreeStep(self)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompt_ids: list[int], on_token: Callable[[int], None] | None = None) -> GenerationResult:
        """Prefill, then decode until EOS or max_new_tokens; `on_token` streams final tokens."""
        self.start(prompt_ids, on_token)
        t0 = time.perf_counter()
        while not self.done():
            self.step()
        self._drain()
        self._sync()
        self.res.decode_s = time.perf_counter() - t0
        self._stream(len(self.seq))
        self.res.token_ids = self.seq[self.res.prompt_len :]
        return self.res

    @torch.no_grad()
    def start(self, prompt_ids: list[int], on_token: Callable[[int], None] | None = None) -> int:
        """Dense prefill of the prompt; returns the first generated token."""
        s, seg = self.s, self.seg
        check_prompt(prompt_ids, s.max_new_tokens, seg.max_len, "raise --max-context")
        from ..plugins import compile_cache

        self._drain()
        cache0 = compile_cache.counts()
        t0 = time.perf_counter()
        if s.specee and self.selection is None and (self.tree is None or self.tree.selects_exits):
            self._select_exit_points()
        self.dev_schedule = self._device_schedule()
        last_pos = len(prompt_ids) + s.max_new_tokens - 1
        if self.tree is not None:  # compile + capture before the first token
            self.tree.prepare(len(prompt_ids), s.max_new_tokens)
        elif self.whole is not None and s.temperature <= 0:
            self.whole.prepare(self._template_plan(), last_pos)
        if self.whole is not None and (self.tree is not None or s.temperature > 0):
            dense = StepPlan(token=0, pos=0)
            if not self.whole.can_run(dense):  # no whole step to capture (a CPU): its segments still compile now
                self.whole.prepare(dense, last_pos)
        if s.specee and self.tree is None and not self.as_dense and not self._draft_warm:
            self._warm_draft(prompt_ids)
        if getattr(seg.cache, "junk", False):  # warm-ups / captures / cost replays ran on junk state
            seg.cache.clear()
            if self.draft is not None and hasattr(self.draft, "clear"):
                self.draft.clear()
        compile_s = time.perf_counter() - t0
        cache = compile_cache.report(cache0, compile_cache.counts())
        seg.cache.reset()
        self.gen = torch.Generator().manual_seed(s.seed)
        guard = None if self.tree is None or self.tree.guard is None else self.tree.guard.record()
        res = GenerationResult(prompt_len=len(prompt_ids), token_ids=[], num_layers=self.L, exit_layers=[],
                               compile_s=compile_s, compile_cache=cache, exit_program=self.selection,
                               tree_guard=guard,
                               draft_quant=getattr(getattr(self.draft, "draft", None), "quant", None),
                               draft_dtype=_dtype_name(getattr(getattr(self.draft, "draft", None), "dtype", None)),
                               gemm=({"choice": seg.gemm, **(seg.gemm_probe or {})}
                                     if getattr(seg, "gemm_probe", None) is not None else None),
                               pdl=_pdl_mode() if seg.device.type == "cuda" else None)
        self.seq: list[int] = list(prompt_ids)
        self.pending: list[_Row] = []
        self.res = res
        self._streamed = len(prompt_ids)
        self._on_token = on_token

        t0 = time.perf_counter()
        logits, hn = seg.prefill(list(prompt_ids))  # logits [V] of the last row, hn [P, D]
        first = select_token(logits, s.temperature, s.top_p, self.gen)
        if s.specee or (self.tree is not None and self.tree.on):  # (a declined tree runs no draft)
            self.draft.reset(list(prompt_ids), hn)
            self.draft.observe(first, hn[-1], self.L - 1)
            if self.scheduler is not None:
                self.scheduler.reset()
        self._sync()
        res.prefill_s = time.perf_counter() - t0
        self._append(first, self.L - 1)
        return first

    def done(self) -> bool:
        """True once EOS or max_new_tokens is reached and nothing awaits verification."""
        return self._finished() and not (self.pending and self.policy.needs_rollback)

    @torch.no_grad()
    def step(self) -> None:
        """Advance by one decode step (appends to `self.seq`; lossless may roll back instead)."""
        if self._finished():
            if self.pending and self.policy.needs_rollback:
                self._step(current=False)  # flush: verify pending exits before stopping
            return
        if self.tree is not None and self.tree.on:
            self.tree.step()  # one tree verify step: appends the accepted tokens + bonus
        elif self.as_dense or self.tree is not None:  # (a tree the guard declined: dense steps)
            self._dense_step(self.gen)
        else:
            self._step(current=True)

    # ------------------------------------------------------------------ helpers
    def _sync(self):
        if self.seg.device.type == "cuda":
            torch.cuda.synchronize()

    def _finished(self) -> bool:
        n = len(self.seq) - self.res.prompt_len
        return n >= self.s.max_new_tokens or self.seq[-1] in self.eos

    def _append(self, tok: int, layer: int) -> None:
        self.seq.append(tok)
        self.res.exit_layers.append(layer)
        # stream only what can no longer be rolled back
        if self.policy.needs_rollback and self.pending:
            self._stream(min(r.pos for r in self.pending) + 1)
        else:
            self._stream(len(self.seq))

    def _stream(self, upto: int) -> None:
        if self._on_token is not None:
            for t in self.seq[self._streamed : upto]:
                self._on_token(t)
        self._streamed = max(self._streamed, upto)

    def _whole_step(self, plan: StepPlan | None) -> StepOut | None:
        """Run this step as the backend's whole-step program, if it has one that can run `plan`
        (None: the step was already launched, see below). None = compose it from segments.

        Run ahead: on a `PipelinedStep` (the CUDA-graph step) the next step is launched, with its token
        taken on the device, before this step's token is read; the host's loop work for this token
        (streaming, the draft's and the scheduler's bookkeeping) then overlaps the GPU's next step. If
        this token ends the sequence (EOS), that step is dropped (`_drain`): it wrote only a cache slot
        past the end and device state that the next `start` resets."""
        launched, self._ahead = self._ahead, None
        if launched is None:
            if self.whole is None or not self.whole.can_run(plan):
                if not self.composable:
                    raise SpecEEError(
                        f"backend {self.seg.name!r} cannot run this step (mode {self.policy.name}, kv "
                        f"{self.kv.name}); use --backend eager or inductor"
                    )
                return None
            if self.pipelined is None:
                return self.whole.run_step(plan)
            launched = self.pipelined.launch(plan)
        nxt = self._next_plan(launched.plan)
        if nxt is not None:
            self._ahead = self.pipelined.launch(nxt)
        return self.pipelined.collect(launched)

    def _next_plan(self, plan: StepPlan) -> StepPlan | None:
        """The plan of the step after `plan`, if it can be launched before plan's token is known."""
        if len(self.seq) - self.res.prompt_len + 1 >= self.s.max_new_tokens:
            return None  # plan's token is the last one
        if not self.pipelined.can_run_ahead(plan):
            return None
        if plan.candidates is None:
            return StepPlan(token=-1, pos=plan.pos + 1, token_on_device=True)
        if self.kv.keeps_pending:
            return None  # an exit leaves a pending row: whether the next step composes is known after the token
        return StepPlan(token=-1, pos=plan.pos + 1, candidates=plan.candidates, active=plan.active,
                        thresholds=plan.thresholds, policy=plan.policy,
                        forced_exit=self.policy.forced_layer(self.res.decode_steps + 1), draft=plan.draft,
                        token_on_device=True, schedule=plan.schedule)

    def _drain(self) -> None:
        """Drop a step launched ahead that the sequence no longer needs (it ended at EOS)."""
        if self._ahead is not None:
            self.pipelined.collect(self._ahead)
            self._ahead = None

    def _dense_step(self, gen) -> None:
        seg, p = self.seg, len(self.seq) - 1
        res = self.res
        res.layer_passes += self.L
        res.layer_rows += self.L
        res.decode_steps += 1
        sample = self.s.temperature > 0
        out = self._whole_step(None if self._ahead is not None else
                               StepPlan(token=self.seq[-1], pos=p, want_logits=sample))
        if out is not None:  # a whole-step backend: its token, or (sampling) a token from its logits
            tok = select_token(out.logits, self.s.temperature, self.s.top_p, gen) if sample else out.token
            self._append(tok, self.L - 1)
            return
        pos = torch.tensor([p], device=seg.device)
        h = seg.embed(pos.new_tensor([self.seq[-1]]))
        S = seg.attn_len(p)
        for i in range(self.L):
            h = seg.layer(i, h, pos, S)
        _, logits = seg.head(h)
        self._append(select_token(logits[0, -1], self.s.temperature, self.s.top_p, gen), self.L - 1)

    def _active_layers(self) -> set[int]:
        if self.scheduler is None or not self.s.use_schedule:
            return set(self.exit_layers)
        return set(self.scheduler.active(self.L)) & set(self.exit_layers)

    def _plan(self, cands: torch.Tensor, active: set[int]) -> StepPlan:
        forced = self.policy.forced_layer(self.res.decode_steps)
        sched = self.dev_schedule
        return StepPlan(token=self.seq[-1], pos=len(self.seq) - 1, candidates=cands,
                        active=frozenset(i for i in active if i >= self.s.min_exit_layer),
                        thresholds=self.thresholds, policy=self.policy, forced_exit=forced,
                        draft=self.draft if getattr(self.draft, "capturable", False) else None,
                        schedule=sched, history=tuple(self.scheduler.history) if sched is not None else ())

    def _device_schedule(self) -> DeviceSchedule | None:
        """The online schedule as the device runs it (a whole step launched ahead picks its own active
        layers): the same set as `_active_layers` + the min_exit_layer filter of `_plan`."""
        sch = self.scheduler
        if not self.s.specee or sch is None or not self.s.use_schedule or sch.window <= 0:
            return None
        valid = sch.valid_layers
        elig = frozenset(i for i in self.exit_layers
                         if i >= self.s.min_exit_layer and 0 <= i < self.L and (valid is None or i in valid))
        return DeviceSchedule(base=frozenset(sch.offline) & elig, eligible=elig, window=sch.window,
                              offsets=tuple(sch.offsets))

    def _count_calls(self, exit_layer: int) -> int:
        """Predictor calls of a step whose active set the device chose (the host's mirror of it)."""
        return sum(1 for i in self._active_layers() if self.s.min_exit_layer <= i <= exit_layer)

    def _select_exit_points(self) -> None:
        """Keep the exit points that pay for themselves on this backend and device (exit_costs.py)."""
        rates = self.policy.exit_rates(self.exit_layers)  # a trace knows; else the artifacts' held-out rates
        if rates is None:
            rates = self.program.exit_rates
        path_tokens = None
        if rates and self.tree is not None:  # a tree's step leaves where every token on its path has
            path_tokens = self.tree.tokens_per_path()
            rates = path_rates(rates, path_tokens)
        costs = whole_costs = None

        def own(c):  # a tree step runs its draft anyway: not a cost of its exits
            if c is None or self.tree is None or not c.draft_s:
                return c
            return replace(c, fixed_s=max(0.0, c.fixed_s - c.draft_s),
                           source=c.source + "; the draft's step left out of the fixed cost (the tree runs it anyway)")

        if self.s.exit_cost_check and self.s.temperature <= 0 and rates:  # without rates nothing to weigh
            if self.whole is not None and hasattr(self.whole, "step_costs"):
                costs = whole_costs = own(self.whole.step_costs(self._template_plan()))  # None: it cannot run it
            if costs is None and self.composable and self.exit_layers:
                costs = own(self._composed_costs())
        measured = [costs]

        def remeasure(kept):  # the whole step gates each kept point: fewer points, a smaller fixed cost
            self.thresholds = {layer: th for layer, th in self.thresholds.items() if layer in kept}
            self.exit_layers = list(kept)
            measured.append(own(self.whole.step_costs(self._template_plan())))
            return measured[-1]

        miss = 0.0
        if self.policy.needs_rollback:  # lossless: a token the dense model does not confirm is rolled back
            prec = self.program.exit_precision
            miss = 1.0 - prec if prec is not None else 0.0
        kept, dropped = select_exit_points(self.exit_layers, self.L, costs, rates, self.program.eval_share,
                                           remeasure=remeasure if whole_costs is not None else None, miss=miss,
                                           per="token" if path_tokens is None else "verify step")
        costs = measured[-1]
        self.exit_layers = kept
        self.thresholds = {layer: th for layer, th in self.thresholds.items() if layer in kept}
        self.as_dense = not kept
        note = None
        if not self.s.exit_cost_check:
            note = "the cost check is off (exit_cost_check=False): every exit point kept"
        elif not rates:
            note = "the artifacts carry no exit rates: every exit point kept"
        elif costs is None:
            note = "no cost measurement on this backend/device: every exit point kept"
        self.selection = {"exit_points_kept": kept, "exit_points_dropped": {str(k): v for k, v in dropped.items()},
                          "step_costs": costs.as_dict() if costs is not None else None, "note": note}
        if path_tokens is not None:
            self.selection["path_tokens"] = round(path_tokens, 3)  # the exit rates above are a path's of this many

    def _composed_costs(self) -> StepCosts:
        """What the composed step's exit machinery costs on this backend and device (no whole step runs
        the plan: the CPU, the eager backend, host-side policies), timed through the Segments contract at
        the last cache slot: the layers of a dense step, one predictor decision read on the host, the
        draft's step for one new token, the full head of the paper's check. The prompt's prefill and the
        draft's reset in `start` come after, so nothing measured here stays."""
        seg, L, dev = self.seg, self.L, self.seg.device
        pos = torch.tensor([seg.max_len - 1], device=dev)
        S = seg.attn_len(seg.max_len - 1)

        def best(fn, reps: int = 3) -> float:
            vals = []
            for _ in range(reps + 1):  # the first call warms up (allocations, lazy compiles)
                self._sync()
                t = time.perf_counter()
                fn()
                self._sync()
                vals.append(time.perf_counter() - t)
            return min(vals[1:])

        h0 = seg.embed(torch.zeros(1, dtype=torch.long, device=dev))

        def layers():
            h = h0
            for i in range(L):
                h = seg.layer(i, h, pos, S)
            return h

        t_layers = best(layers)
        h = layers()
        t_head = best(lambda: seg.head(h))
        row_s = 0.0
        if self.kv.keeps_pending:  # backfill: an exited row rides along a later pass
            pos2 = torch.tensor([seg.max_len - 2, seg.max_len - 1], device=dev)
            h2 = seg.embed(torch.zeros(2, dtype=torch.long, device=dev))

            def layers2():
                x = h2
                for i in range(L):
                    x = seg.layer(i, x, pos2, S)

            row_s = max(0.0, best(layers2) - t_layers) / L
        k = self.program.num_candidates
        rows = seg.head_rows(torch.arange(k, device=dev))
        p0 = torch.zeros(k, device=dev, dtype=torch.float32)
        t_dec = best(lambda: float(seg.exit_score(self.exit_layers[0], h, rows, p0)[0]))
        hn = torch.zeros(8, seg.spec.hidden, dtype=h.dtype, device=dev)
        self.draft.reset(list(range(8)), hn)

        def draft_step():
            self.draft.observe(0, hn[0], L - 1)
            self.draft.propose()

        t_draft = best(draft_step)
        seg.cache.reset()
        check = t_head if self.policy.verify_in_candidates else 0.0
        return StepCosts(layer_s=t_layers / L, fixed_s=t_draft, decision_s=t_dec, check_s=check, row_s=row_s,
                         step_s=t_layers + t_head, draft_s=t_draft,
                         source=f"the composed step on {dev.type}: {L} layers {t_layers * 1e6:.0f} us, one decision "
                                f"{t_dec * 1e6:.0f} us, the draft's step {t_draft * 1e6:.0f} us, the full head "
                                f"{t_head * 1e6:.0f} us" + (f", one more row {row_s * 1e6:.0f} us per layer"
                                                             if self.kv.keeps_pending else ""))

    def _warm_draft(self, prompt_ids: list[int]) -> None:
        """Run the draft's eager path once (a reset over the prompt, one proposal) before the first token.
        Its first run in a process compiles or loads its kernels: 657 ms on the H200 at 7B shapes (less
        with warm compile caches), all of it on the first decode step of the first call
        (benchmarks/GPU_NOTES.md, session 8). The real reset follows the prefill and replaces everything
        this one wrote."""
        seg = self.seg  # (the contract's Backend has no dtype: a draft converts the states it is given)
        hn = torch.zeros(len(prompt_ids), seg.spec.hidden, device=seg.device)
        self.draft.reset(list(prompt_ids), hn)
        self.draft.observe(prompt_ids[-1], hn[-1], self.L - 1)
        self.draft.propose()
        self._sync()
        self._draft_warm = True

    def _template_plan(self) -> StepPlan:
        """A plan of the shape this decoder's steps will have (what a whole-step backend prepares for)."""
        if self.as_dense:
            return StepPlan(token=0, pos=0)
        k = self.program.num_candidates
        return StepPlan(token=0, pos=0, candidates=torch.zeros(k, dtype=torch.long, device=self.seg.device),
                        active=frozenset(self.exit_layers), thresholds=self.thresholds, policy=self.policy,
                        draft=self.draft if getattr(self.draft, "capturable", False) else None,
                        schedule=self.dev_schedule)

    def _emit(self, token: int, hn: torch.Tensor, layer: int, draft_stepped: bool = False) -> None:
        if draft_stepped:  # the whole step ran the draft on this token already
            self.draft.observe_device(token, hn, layer)
        else:
            self.draft.observe(token, hn, layer)
        if self.scheduler is not None and layer < self.L - 1:
            self.scheduler.record_exit(layer)
        self._append(token, layer)

    def _step(self, current: bool) -> None:
        """One early-exit step for the last token (or, current=False, a flush of pending rows)."""
        s, seg, res, L = self.s, self.seg, self.res, self.L
        dev = seg.device
        p = len(self.seq) - 1
        backfill = self.kv.keeps_pending
        policy = self.policy
        rows: list[_Row] = []
        plan = None
        if current:
            if self._ahead is not None:  # launched ahead by the previous step (no pending rows then)
                self._account(self._whole_step(None))
                return
            cands = self.draft.propose().to(dev)  # [k]
            may_exit = len(self.pending) < s.max_pending
            plan = self._plan(cands, self._active_layers() if may_exit else set())
            if not self.pending:
                out = self._whole_step(plan)
                if out is not None:
                    self._account(out)
                    return
            rows.append(_Row(p, -1, seg.embed(torch.tensor([self.seq[-1]], device=dev))))
            w_rows = seg.head_rows(cands)  # [k, D]
            p_prev = torch.zeros(cands.numel(), device=dev, dtype=torch.float32)
        waiting = sorted(self.pending, key=lambda r: r.done) if backfill else []
        joined = 0
        S = seg.attn_len(p)
        exit_layer, token, hn_cur = None, None, None
        active = plan.active if plan is not None else frozenset()
        pos_key, pos = None, None
        for i in range(L):
            while waiting and waiting[0].done == i - 1:  # pending rows that skipped layer i join here
                rows.insert(0, waiting.pop(0))
                joined += 1
            if not rows:
                continue
            h = torch.cat([r.h for r in rows], dim=1) if len(rows) > 1 else rows[0].h
            key = tuple(r.pos for r in rows)
            if key != pos_key:  # the positions change only when rows join: one tensor per change
                pos_key, pos = key, torch.tensor(key, device=dev)
            h = seg.layer(i, h, pos, S)
            res.layer_passes += 1
            res.layer_rows += len(rows)
            if len(rows) == 1:
                rows[0].h, rows[0].done = h, i
            else:
                for j, r in enumerate(rows):
                    r.h, r.done = h[:, j : j + 1], i
            if i in active:
                score, z, p_prev = seg.exit_score(i, rows[-1].h, w_rows, p_prev)
                res.predictor_calls += 1
                if policy.forced:
                    proposed = plan.forced_exit is not None and i >= plan.forced_exit
                else:
                    proposed = float(score) > self.thresholds[i]
                if proposed:
                    if policy.exit_token == "candidates":
                        exit_layer, token = i, int(cands[int(torch.argmax(z))])
                        hn_cur = seg.norm(rows[-1].h)[0, 0]
                        break
                    hn, logits = seg.head(rows[-1].h)
                    res.head_calls += 1
                    t = int(torch.argmax(logits[0, 0]))
                    if not policy.verify_in_candidates or bool((cands == t).any()):
                        exit_layer, token, hn_cur = i, t, hn[0, 0]
                        break
        if current:
            res.decode_steps += 1
        if joined:
            res.pending_depths.append(joined)

        if exit_layer is not None:  # early exit: rows stay pending (backfill) or are dropped (skip)
            if backfill:
                self.pending = rows + waiting
            self._emit(token, hn_cur, exit_layer)
            return

        # full depth: every row in `rows` reached the last layer
        self.pending = []
        hn, logits = seg.head(torch.cat([r.h for r in rows], dim=1))
        dense = torch.argmax(logits[0], dim=-1).tolist()  # dense token after each row
        if policy.needs_rollback:
            checked = [(r.pos, j) for j, r in enumerate(rows[:-1] if current else rows)]
            for rpos, j in sorted(checked):  # earliest disagreement wins
                if self.seq[rpos + 1] != dense[j]:
                    self._rollback(rpos, dense[j], hn[0, j])
                    return
        if current:
            self._emit(dense[-1], hn[0, -1], L - 1)

    def _account(self, out: StepOut) -> None:
        """Count and emit a whole step's token."""
        res = self.res
        res.decode_steps += 1
        res.layer_passes += out.exit_layer + 1
        res.layer_rows += out.exit_layer + 1
        res.predictor_calls += out.predictor_calls if out.predictor_calls is not None else self._count_calls(out.exit_layer)
        res.head_calls += out.head_calls
        self._emit(out.token, out.hn, out.exit_layer, out.draft_stepped)

    def _rollback(self, pos: int, token: int, hn: torch.Tensor) -> None:
        """The dense model disagrees with the token emitted after `pos`: drop everything after."""
        keep = pos + 1
        self.res.rollbacks += 1
        self.seg.cache.truncate(keep)
        del self.seq[keep:]
        del self.res.exit_layers[keep - self.res.prompt_len :]
        self.draft.truncate(keep)
        self.draft.observe(token, hn, self.L - 1)
        self._append(token, self.L - 1)
