"""The whole decode step as CUDA graphs: the inductor backend's `WholeStep` on CUDA.

Why: replaying one CUDA graph per layer, copying inputs in and outputs out, and reading every exit
decision on the host costs more than the layers themselves on small models; the product decoded 7B
shapes at 13.8 tok/s that way, and at 255-260 with this step (benchmarks/RESULTS.md). Here one graph
holds the whole step, and the exit is decided on the device.

One graph per (step kind, attention bucket S); all share one memory pool and static buffers:

    dense   tok -> embed -> layer 0..L-1 -> head -> argmax -> out[0]
    exits   tok, cands -> embed, W_S = head[cands] -> layers, where the layers after each exit point
            up to the next run inside one IF(alive); after an exit layer l, inside IF(alive and
            active[l]), the fused exit kernel scores the state (`triton_exit_decide`) and, on exit,
            clears `alive` (or, with the paper's check, raises `proposed`: the full head runs inside
            IF(proposed) and the exit stands only if its argmax is a candidate); the exit state goes
            to `hexit`
            -> if no exit emitted a token: head(hexit) -> argmax -> out[0]; out[1] = exit layer,
            out[2] = head calls of the check; hn = final_norm(hexit) for the draft
            -> the draft's step on (out[0], hn) (`DeviceEagleSource.device_step`): the next step's
            candidates are on the device before the host has read this step's token
IF nodes come from `plugins/cuda_graph_if.py`. Where no full-head check follows a decision, the exit
kernel itself is predicated on (alive, active) instead of sitting in an IF node (an IF node costs more
than the early-returning launch).

Run ahead (`launch` / `collect`, runtime/contract.py PipelinedStep): each graph starts with a prologue
kernel (plugins/triton_step_ctrl.py) that takes the input token from the host's record or, for a plan
with `token_on_device`, from the token the previous step wrote, and resets the control block's header;
it ends with an epilogue that feeds its token forward and, with the online schedule on the device,
pushes the exit into the device history and writes the next step's active flags. The host's per-step
record (position, a trace's forced exit) goes up with one async copy from a pinned ring; the outputs
come back the same way. So the loop launches step t+1 before it reads step t: one host sync per token,
none per decision, and the GPU does not idle while the host runs the loop.

Runs: greedy plans without pending rows whose policy emits the full-head token (dense, approximate /
paper, the benchmark's trace). Lossless + backfill steps carry pending rows (variable row counts)
and run through the loop's composed path with per-layer graphs (backends/inductor.py).

Graphs are captured before the first token (`prepare`, with a progress bar): every bucket up to the
longest sequence the generate call can reach. Warm-up runs write K/V at the last cache slot, which
`prepare`'s cache reset then invalidates.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from ..runtime.contract import Launched, StepOut, StepPlan

# control block (uint8): flags the IF nodes and the exit kernel read and write
ALIVE, FORCED, EXIT, PROPOSED, NEEDHEAD, HEADS, ACT0 = 0, 1, 2, 3, 4, 5, 8
CTRL_OFFS = {"ALIVE": ALIVE, "FORCED": FORCED, "EXIT": EXIT, "PROPOSED": PROPOSED, "NEEDHEAD": NEEDHEAD, "HEADS": HEADS}
NO_EXIT = 255
RING = 3  # per-step host records / outputs in flight (the loop keeps at most 2 steps launched)
NO_HIST = -1000  # an empty slot of the device schedule's exit history


class CudaWholeStep:
    def __init__(self, seg):
        from ..plugins.cuda_graph_if import cond_backend

        self.seg = seg
        spec = seg.spec
        self.L, self.D = spec.num_layers, spec.hidden
        dev, dt = seg.device, seg.dtype
        self.dev = dev
        self.cond = cond_backend()  # "torch" | "ext" | None (then only dense steps run here)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}
        self.capture_s = 0.0
        self.steps_run = 0  # whole steps replayed (tests check the loop really used them)
        self._kinds: dict = {}  # kind() memo (see there)
        from ..plugins.triton_step_ctrl import REC_LEN

        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.rec = torch.zeros(REC_LEN, dtype=torch.long, device=dev)  # pos, forced, token, host-token flag
        self.pos = self.rec[0:1]
        self.out = torch.zeros(3, dtype=torch.long, device=dev)  # token, exit layer, head calls
        self.rec_host = torch.zeros(RING, REC_LEN, dtype=torch.long).pin_memory()
        self.rec_rows = [self.rec_host[j] for j in range(RING)]
        self.rec_np = self.rec_host.numpy()
        self.out_host = torch.zeros(RING, 3, dtype=torch.long).pin_memory()
        self.out_rows = [self.out_host[j] for j in range(RING)]
        self.out_np = self.out_host.numpy()
        self.hn_ring = torch.zeros(RING, self.D, dtype=dt, device=dev)
        self.events = [torch.cuda.Event() for _ in range(RING)]
        # steps replay on a stream of their own: work the caller enqueues on its stream while a step runs
        # ahead (HF generate() turning the token into logits under torch.compile) is not queued behind it
        self.stream = torch.cuda.Stream(dev)
        self.slot = 0
        self.flip = 0
        self.scheds: dict = {}  # DeviceSchedule -> its device buffers (history, masks, offsets)
        self.k = 0
        self.ctrl = torch.zeros(ACT0 + self.L, dtype=torch.uint8, device=dev)
        self.ctrl_host = torch.zeros(ACT0 + self.L, dtype=torch.uint8).pin_memory()
        self.ctrl_np = self.ctrl_host.numpy()  # host writes through numpy: no torch op per flag
        self.hexit = torch.zeros(1, 1, self.D, dtype=dt, device=dev)
        self.hn = torch.zeros(self.D, dtype=dt, device=dev)
        self.score = torch.zeros(1, dtype=torch.float32, device=dev)

    # ------------------------------------------------------------------ which plans run here
    def kind(self, plan: StepPlan):
        """Graph kind for a plan, or None if the plan must run through the composed path."""
        if plan.want_logits:  # sampling: the graphs emit argmax tokens only
            return None
        if plan.candidates is None:
            return ("dense",)
        pol = plan.policy
        # the loop hands the same thresholds / policy / draft objects every step: derive the kind once
        key = (id(plan.thresholds), id(pol), int(plan.candidates.numel()), id(plan.draft), id(plan.schedule))
        hit = self._kinds.get(key)
        if (hit is not None and hit[0] is plan.thresholds and hit[1] is pol and hit[2] is plan.draft
                and hit[3] is plan.schedule):
            return hit[4]
        kind = self._exits_kind(plan, pol)
        self._kinds[key] = (plan.thresholds, pol, plan.draft, plan.schedule, kind)
        return kind

    def _exits_kind(self, plan: StepPlan, pol):
        if self.cond is None or pol is None or pol.exit_token != "full_head" or self.seg.predictors is None:
            return None
        gates = tuple(sorted(i for i in plan.thresholds if i < self.L - 1))
        if not gates:
            return None
        ths = tuple(float(plan.thresholds[i]) for i in gates)
        draft = plan.draft if getattr(plan.draft, "capturable", False) else None
        sched = plan.schedule if draft is not None and plan.schedule is not None and plan.schedule.window > 0 else None
        return ("exits", int(plan.candidates.numel()), gates, ths, bool(pol.forced), bool(pol.verify_in_candidates),
                draft, sched)

    def can_run_ahead(self, plan: StepPlan) -> bool:
        """Can the step after `plan` be launched before plan's token reaches the host? Dense steps can;
        exit steps when the draft runs on the device and the active set needs no host (static, or the
        device schedule)."""
        kind = self.kind(plan)
        if kind is None or (kind, self.seg.attn_len(plan.pos + 1)) not in self.graphs:
            return False  # (a capture now would run warm-up steps over the device state the chain carries)
        if kind[0] == "dense":
            return True
        return kind[6] is not None and (plan.schedule is None or kind[7] is not None)

    def can_run(self, plan: StepPlan) -> bool:
        return self.kind(plan) is not None

    # ------------------------------------------------------------------ capture
    def prepare(self, plan: StepPlan, max_pos: int) -> None:
        """Capture every bucket this plan kind can need up to position max_pos (before prefill)."""
        kind = self.kind(plan)
        if kind is None:
            return
        buckets = sorted({self.seg.attn_len(p) for p in range(0, max_pos + 1, self.seg.attn_bucket)}
                         | {self.seg.attn_len(max_pos)})
        todo = [S for S in buckets if (kind, S) not in self.graphs]
        if not todo:
            return
        t0 = time.perf_counter()
        self.seg.cache.junk = True  # the warm-ups run at the last slot of a cache nothing fills (KVCache.junk)
        bar = _progress(len(todo), f"capturing {kind[0]} decode step graphs ({self.seg.name}, CUDA)")
        for S in todo:
            self.graphs[(kind, S)] = self._capture(kind, S)
            bar.update(1)
        bar.close()
        self.seg.cache.reset()  # warm-up runs wrote the last slot; the prefill starts from nothing
        self.capture_s += time.perf_counter() - t0

    def _capture(self, kind, S: int):
        seg = self.seg
        if kind[0] == "exits":
            k = kind[1]
            if self.k != k:
                self.k = k
                self.cands = torch.zeros(k, dtype=torch.long, device=self.dev)
                self.rows = torch.zeros(k, self.D, dtype=seg.dtype, device=self.dev)
                self.p_prev = torch.zeros(k, dtype=torch.float32, device=self.dev)
                self.z = torch.zeros(k, dtype=torch.float32, device=self.dev)
            from ..plugins.cuda_graph_if import reserve_nesting

            reserve_nesting(len(kind[2]) + 4, self.cond)  # the stretches' nested IFs, the check's two, the head's
        # warm-up (compiles, autotunes, allocator) at the last cache slot, outside any graph
        self._set_rec(seg.max_len - 1, None, 0)
        self._reset_ctrl(kind, frozenset(kind[2]) if kind[0] == "exits" else frozenset(), None)
        self.ctrl.copy_(self.ctrl_host)
        torch.cuda.synchronize(self.dev)
        for _ in range(2):
            self._body(kind, S, None)
        torch.cuda.synchronize(self.dev)
        pair = []
        for _ in range(2):  # two instances, replayed alternately (see launch)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._body(kind, S, g)
            pair.append(g)
        for g in pair:  # a graph's first launch uploads it to the device: pay that here, not on a token
            g.replay()
        torch.cuda.synchronize(self.dev)
        return pair

    def _if(self, g, a, b=None):
        if g is None:  # warm-up: run every body
            return contextlib.nullcontext()
        from ..plugins.cuda_graph_if import if_node

        return if_node(g, a, b, backend=self.cond, pool=self.pool)

    def _body(self, kind, S: int, g) -> None:
        from ..plugins.triton_step_ctrl import step_epilogue, step_prologue

        seg, L = self.seg, self.L
        W = seg.weights
        exits = kind[0] == "exits"
        c = self.ctrl
        step_prologue(self.rec, self.tok, c if exits else None, L, CTRL_OFFS)
        h = W.embed.index_select(0, self.tok).view(1, 1, self.D)
        if not exits:
            for i in range(L):
                h = seg.layer_direct(i, h, self.pos, S)
            _, logits = seg.head_direct(h)
            self.out[0:1].copy_(torch.argmax(logits[0, -1], dim=-1, keepdim=True))
            step_epilogue(self.out, self.tok, L)
            return
        _, _k, gates, ths, forced, verify, draft, sched = kind
        from ..plugins.triton_exit_score import triton_exit_decide

        if draft is not None:  # the previous step's draft wrote this step's candidates
            self.cands.copy_(draft.next_cands)
        torch.index_select(W.head, 0, self.cands, out=self.rows)
        self.p_prev.zero_()
        P = seg.predictors
        th = dict(zip(gates, ths))
        # `alive` can only drop at an exit point, so one IF(alive) per stretch of layers between two exit points
        # gates them all: one IF node per exit point, not one per layer. Each stretch's IF sits inside the previous
        # one's body, so a token that exits evaluates one node not taken, not one per later point (each ~6 us on the
        # H100, ~8 with its decision kernel; an entered one ~10: plugins/cuda_graph_if.py)
        ends = [*gates, L - 1]
        start = 0
        with contextlib.ExitStack() as nest:
            for j, end in enumerate(ends):
                if j > 0:
                    nest.enter_context(self._if(g, c[ALIVE:ALIVE + 1]))
                for i in range(start, end + 1):
                    h = seg.layer_direct(i, h, self.pos, S)
                if end == L - 1:
                    self.hexit.copy_(h)
                start = end + 1
                i = end
                if i not in th:
                    continue
                args = (h, W.norm, self.rows, self.p_prev, P.w1[i], P.b1[i], P.w2[i], P.b2[i], seg.spec.eps)
                kw = {"layer": i, "ctrl": c, "hexit": self.hexit.view(-1), "score": self.score, "z": self.z,
                      "threshold": th[i], "forced": forced, "forced_off": FORCED, "exit_off": EXIT}
                if verify:  # the full-head check follows: decision and check inside IF(alive, active)
                    with self._if(g, c[ALIVE:ALIVE + 1], c[ACT0 + i:ACT0 + i + 1]):
                        triton_exit_decide(*args, **kw, alive_off=PROPOSED)
                        self._verify(g, i, h)
                else:  # the kernel is predicated on (alive, active): no IF node
                    triton_exit_decide(*args, **kw, alive_off=ALIVE, gate_off=ACT0 + i)
        with self._if(g, c[NEEDHEAD:NEEDHEAD + 1]):
            _, logits = seg.head_direct(self.hexit)
            self.out[0:1].copy_(torch.argmax(logits[0, -1], dim=-1, keepdim=True))
        self.hn.copy_(seg.norm(self.hexit).view(-1))
        self.out[1:2].copy_(c[EXIT:EXIT + 1])
        self.out[2:3].copy_(c[HEADS:HEADS + 1])
        if draft is not None:  # the next step's candidates, from this step's token and exit state
            draft.device_step(self.out[0:1], self.hn, self.pos, S)
        step_epilogue(self.out, self.tok, L, self._sched_bufs(sched) if sched is not None else None)

    def _sched_bufs(self, sched):
        """Device buffers of an online schedule: history [window], base / eligible masks [L], offsets."""
        b = self.scheds.get(sched)
        if b is None:
            dev = self.dev
            base = torch.zeros(self.L, dtype=torch.uint8, device=dev)
            elig = torch.zeros(self.L, dtype=torch.uint8, device=dev)
            base[sorted(sched.base)] = 1
            elig[sorted(sched.eligible)] = 1
            b = self.scheds[sched] = (torch.full((sched.window,), NO_HIST, dtype=torch.long, device=dev), base, elig,
                                      torch.tensor(sched.offsets or (0,), dtype=torch.long, device=dev), self.ctrl,
                                      ACT0)
        return b

    def _verify(self, g, i: int, h) -> None:
        """The paper's check, on the device: the kernel raised `proposed` (wrote PROPOSED = 0); run the
        full head; the exit stands (alive = 0, token emitted) only if its argmax is a candidate."""
        c = self.ctrl
        if not hasattr(self, "_chk"):
            self._chk = torch.zeros(1, dtype=torch.uint8, device=self.dev)
        self._chk.copy_(1 - c[PROPOSED:PROPOSED + 1])  # 1 where an exit was proposed
        with self._if(g, self._chk):
            _, logits = self.seg.head_direct(h)
            t = torch.argmax(logits[0, -1], dim=-1, keepdim=True)  # [1]
            ok = (self.cands == t).any().view(1)
            c[HEADS:HEADS + 1].add_(1)
            c[ALIVE:ALIVE + 1].copy_(torch.where(ok, 0, 1).to(torch.uint8))
            c[NEEDHEAD:NEEDHEAD + 1].copy_(torch.where(ok, 0, 1).to(torch.uint8))
            c[EXIT:EXIT + 1].copy_(torch.where(ok, i, self.L - 1).to(torch.uint8))
            self.out[0:1].copy_(torch.where(ok, t, self.out[0:1]))
            c[PROPOSED:PROPOSED + 1].fill_(1)

    def _reset_ctrl(self, kind, active: frozenset, forced: int | None) -> None:
        hc = self.ctrl_np
        hc[:] = 0
        hc[ALIVE] = 1
        hc[PROPOSED] = 1
        hc[NEEDHEAD] = 1
        hc[EXIT] = self.L - 1
        hc[FORCED] = NO_EXIT if forced is None or forced >= self.L - 1 else forced
        for i in active:
            hc[ACT0 + i] = 1

    def _set_rec(self, pos: int, forced: int | None, token: int | None, slot: int | None = None) -> None:
        """The per-step record the prologue reads; slot None writes the device copy directly (warm-up,
        timing), else a pinned ring row that the caller copies up."""
        f = NO_EXIT if forced is None or forced >= self.L - 1 else forced
        if slot is None:
            self.rec.copy_(torch.tensor([pos, f, token or 0, token is not None], dtype=torch.long))
            return
        r = self.rec_np[slot]
        r[0], r[1] = pos, f
        r[2], r[3] = (0, 0) if token is None else (token, 1)

    # ------------------------------------------------------------------ costs (runtime/exit_costs.py)
    def step_costs(self, plan: StepPlan):
        """Measure, on this device, what the exit program of `plan` costs per token beside the dense
        step: graph replays timed with CUDA events at one attention bucket (runtime/exit_costs.py)."""
        from ..runtime.exit_costs import StepCosts
        from ..runtime.policies import trace_exits

        kind = self.kind(plan)
        if kind is None:  # the loop composes this plan's steps: it measures that path itself
            return None
        seg = self.seg
        W = seg.weights
        S = seg.attn_len(min(seg.max_len - 1, 255))
        layer_b = sum(t.numel() * t.element_size() for t in W.layers[0].as_tuple() if t is not None)
        head_b = W.head.numel() * W.head.element_size()
        t_dense = self._time(("dense",), S, frozenset(), None)
        share = layer_b / (self.L * layer_b + head_b)
        layer_s = t_dense * share
        check_s = t_dense * head_b / (self.L * layer_b + head_b)
        gates = kind[2]
        kind = kind[:7] + (None,)  # timed with a static active set (the schedule's kernel is one launch)
        t_gate = self._time(kind, S, frozenset(), None)
        never = self.kind(StepPlan(token=0, pos=0, candidates=plan.candidates, thresholds=plan.thresholds,
                                   policy=trace_exits([self.L]), draft=plan.draft))
        t_all = self._time(never, S, frozenset(gates), None)
        t_draft = self._time_draft(kind[6], S) if kind[6] is not None else None
        self.seg.cache.reset()
        self.seg.cache.junk = True  # the timed replays ran on junk state (KVCache.junk)
        fixed = max(0.0, t_gate - t_dense)
        return StepCosts(layer_s=layer_s, fixed_s=fixed, decision_s=max(0.0, (t_all - t_gate) / len(gates)),
                         gate_s=max(0.0, fixed - (t_draft or 0.0)) / len(gates),
                         check_s=check_s if kind[5] else 0.0, draft_s=t_draft,
                         source=f"CUDA graph replays at S={S}: dense {t_dense * 1e6:.0f} us, exit program with no "
                                f"decision {t_gate * 1e6:.0f} us, with all {len(gates)} decisions {t_all * 1e6:.0f} us"
                                + (f", the draft step alone {t_draft * 1e6:.0f} us" if t_draft is not None else ""))

    def _time_draft(self, draft, S: int, reps: int = 20) -> float:
        """The draft's device step alone, as its own graph (the part of the fixed cost that is the draft;
        its writes land at the last cache slot, which the decoder's draft reset forgets)."""
        self._set_rec(self.seg.max_len - 1, None, 0)
        for _ in range(2):
            draft.device_step(self.out[0:1], self.hn, self.pos, S)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            draft.device_step(self.out[0:1], self.hn, self.pos, S)
        return replay_time(g.replay, reps)

    def dense_step_time(self, S: int) -> float:
        """Seconds per dense step at attention bucket S (its graph replayed; the tree guard's measure,
        runtime/tree.py). The replays run on junk state: the cache is flagged (KVCache.junk)."""
        t = self._time(("dense",), S, frozenset(), None)
        self.seg.cache.junk = True
        return t

    def _time(self, kind, S: int, active: frozenset, forced, reps: int = 20) -> float:
        g = self.graphs.get((kind, S))
        if g is None:
            g = self.graphs[(kind, S)] = self._capture(kind, S)
        g = g[0]
        self._set_rec(self.seg.max_len - 1, forced, 0)
        if kind[0] == "exits":
            self._reset_ctrl(kind, active, forced)
            self.ctrl.copy_(self.ctrl_host)
        return replay_time(g.replay, reps)

    # ------------------------------------------------------------------ run
    def run_step(self, plan: StepPlan) -> StepOut:
        return self.collect(self.launch(plan))

    def launch(self, plan: StepPlan) -> Launched:
        """Enqueue the step (no sync). A plan with `token_on_device` follows the previous launched step."""
        kind = self.kind(plan)
        S = self.seg.attn_len(plan.pos)
        pair = self.graphs.get((kind, S))
        if pair is None:  # a bucket prepare() did not foresee (generate() always prepares)
            self.graphs[(kind, S)] = pair = self._capture(kind, S)
        # consecutive steps alternate between two instances of the graph: a launch of an executable
        # graph is ordered behind its own previous launch, so with one instance the host's launch of
        # step t+1 can wait for step t (benchmarks/GPU_NOTES.md)
        self.flip ^= 1
        g = pair[self.flip]
        slot = self.slot = (self.slot + 1) % RING
        self._set_rec(plan.pos, plan.forced_exit, None if plan.token_on_device else plan.token, slot)
        exits = kind[0] == "exits"
        caller = torch.cuda.current_stream(self.dev)
        if not plan.token_on_device:  # a chain starts: the caller's work (prefill, a composed step) comes first
            self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            self.rec.copy_(self.rec_rows[slot], non_blocking=True)
            if exits and not plan.token_on_device:  # (re)start a chain: active flags, history, candidates
                self._reset_ctrl(kind, plan.active, plan.forced_exit)
                self.ctrl.copy_(self.ctrl_host, non_blocking=True)
                draft, sched = kind[6], kind[7]
                if sched is not None:
                    hist = [NO_HIST] * sched.window + list(plan.history)
                    self._sched_bufs(sched)[0].copy_(torch.tensor(hist[len(hist) - sched.window:], dtype=torch.long))
                dst = draft.next_cands if draft is not None else self.cands
                if plan.candidates is not dst:
                    dst.copy_(plan.candidates, non_blocking=True)
            g.replay()
            self.steps_run += 1
            self.out_rows[slot].copy_(self.out, non_blocking=True)
            if exits:
                self.hn_ring[slot].copy_(self.hn)
            self.events[slot].record()
        return Launched(plan, (kind, slot))

    def collect(self, launched: Launched) -> StepOut:
        kind, slot = launched.handle
        self.events[slot].synchronize()
        o = self.out_np[slot]
        tok, layer, heads = int(o[0]), int(o[1]), int(o[2])
        if kind[0] == "dense":
            return StepOut(token=tok, exit_layer=self.L - 1, hn=self.hn)
        if kind[7] is not None:  # the device chose the active set: the loop counts the predictor calls
            calls = None
        else:
            calls = sum(1 for i in launched.plan.active if i <= layer and i in kind[2])
        if not kind[5] and layer < self.L - 1:  # no check: the exit's head is the step's one head
            heads += 1
        return StepOut(token=tok, exit_layer=layer, hn=self.hn_ring[slot], predictor_calls=calls, head_calls=heads,
                       draft_stepped=kind[6] is not None)


def replay_time(run, reps: int) -> float:
    """Seconds per call of `run` (a graph's replay): CUDA events around `reps` calls after 3 warm ones."""
    for _ in range(3):
        run()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        run()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=total < 2)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
