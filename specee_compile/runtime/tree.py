"""Tree speculative decoding: the decode loop's second step shape (`Settings.speculate = "tree"`).

`Decoder.step` calls `TreeStep.step` instead of its one-token step; everything else (prefill, the
KV cache, streaming, stop rules, the result record) is the Decoder's own. One tree step:

  1. draft: `EagleTreeSource.propose_tree` (draft/tree.py) builds an EAGLE-2 dynamic tree of at most
     `tree_budget` nodes and `tree_depth` levels below the root (the last committed token x_p);
  2. verify in ONE forward through the layer segments: the root and every node are rows of one layer
     call per layer. Row r has RoPE position p + depth(r) and writes its K/V at its own cache slot
     p + r (slots p .. p + N, right after the committed prefix), and attends through an explicit
     [q, S] mask to the committed prefix (as `valid` allows) and to its ancestors' slots and its own
     (the `slots` / `mask` arguments of `model_step`'s layer; without them the layer is the
     traced decode step, unchanged);
  3. accept: walk from the root; greedy: descend while the target's argmax at the current row is one
     of its children; the argmax where the walk stops is the bonus token. Sampling (temperature > 0):
     the speculative-sampling rule for a tree whose children are deterministic (top-k, not sampled),
     i.e. a point-mass draft q per child: child c is accepted with probability min(1, r(c)/q(c)) =
     r(c), where r is the target distribution with the children already rejected removed and
     renormalised (the residual norm(max(r - q, 0))); when every child is rejected the bonus is drawn
     from r. Each emitted token is thus an exact sample of the target's (temperature, top-p)
     distribution given the tokens before it;
  4. compact: the accepted rows' K/V (and validity) move from their slots to positions p+1 .. p+a in
     every layer; everything after is truncated. The draft observes the accepted tokens with the
     target's final-normed hidden states; its next catch-up runs those pairs in one forward.

SpecEE on the tree (`--specee`; the paper's "context-aware merged mapping", SPECEE.md): each
root-to-leaf path is one hyper-token that exits at the deepest exit among its tokens. Here:

  * at every scheduled exit layer (the Decoder's scheduler and thresholds), all rows with candidates
    are scored in ONE batched exit-score call (same features and predictor MLP as `specee::exit_score`,
    `predictors/features.py`): row r's candidates are the draft's top-k after r (`DraftTree.cands`),
    p_prev is per row;
  * the predicted path: from the root, follow the candidate argmax while it names a child; the path
    has *exited* once every row on it scores above its layer's threshold (the merged mapping: the path
    leaves at the first layer where its last-to-exit token has exited);
  * approximate mode (the paper's trade): verification stops at that layer. The LM head runs on the
    path's rows at that layer; the paper's check (each row's argmax is one of its candidates) must hold,
    else the forward continues. The tokens are accepted as in step 3, with those layer-l logits, and the
    deeper layers never get K/V for them (the `skip` KV policy). Output may differ from dense; the
    tree benchmark reports agreement;
  * lossless mode: an exited path *prunes* the tree. Deeper layers run only the predicted path's rows
    (q drops from N + 1 to the path length), which still reach the last layer, and step 3 runs on them
    with full-depth logits. Every emitted token is the dense model's: a wrong prediction costs accepted
    length (the walk stops where the pruned branch would have continued, and the bonus is still the
    target's argmax there), never correctness. It saves layer-rows (the arithmetic: what a CPU, or a GPU
    with a large tree, pays for), not layer passes.

Two ways to run a step (`Settings.tree_program`): the host step above (`TreeStep.step`: every mode,
sampling, SpecEE on the tree; the host reads the tree and the acceptance), and `FixedTree`: the greedy step
as one fixed-shape program with no host read (the draft's EAGLE-2 expansion, rerank and prompt lookup on the
device, verification, acceptance, compaction, the draft's catch-up), which a CUDA backend captures as one
graph per attention bucket; `auto` runs it on CUDA. Both build the same tree and emit the same tokens
(tests/test_tree.py); on a CPU the host step is slightly faster (no capture to gain, and the fixed
program computes its full fixed shapes). The fixed program also runs approximate SpecEE on the tree, with the
same decisions as the host step but taken on the device: branches of the captured graph (`Captures.branch`,
IF nodes on CUDA) gate the layers after each exit point, the batched decision, and the head on the path's rows
(runtime/tree_exits.py). Its exit points are the decoder's that pay for themselves (`Decoder._select_exit_points`,
the draft's step not charged to them). Lossless pruning stays on the host step: on a device it saves rows, not
layer passes.

Never slower than dense (`Settings.tree_guard`, `TreeGuard`): where the fixed program runs beside a whole-step
dense program (CUDA, inductor), one step of each is timed before the first token; once the decoder's verify steps
accept fewer tokens on average than a tree step costs dense steps, it decodes densely from the next step on.

Work counted: `layer_passes` per verify step (avg_layers), `layer_rows`, `verify_steps`,
`accepted_tokens` (bonus included; `accepted_per_step` in the stats), `tree_nodes`.
"""

from __future__ import annotations

import torch

from ..compiled_fns import CompiledFns, allow_recompiles
from ..config import TREE_GUARD_STEPS
from ..errors import SpecEEError
from ..model_step import make_head_fn, make_layer_fn, rows_fused
from .contract import StepPlan
from .tree_exits import TreeExits, tree_exit_scores


class TreeGuard:
    """Never slower than dense, for the tree (the engine issue's rule for exits, applied to `--speculate tree`).

    A tree step costs `tree_s`, a dense step `dense_s`, both timed on this device at one attention bucket, so
    the tree pays only while its verify steps accept more than `break_even` = tree_s / dense_s tokens on
    average. `observe` takes each verify step's tokens; once at least `min_steps` steps have run and their mean
    is under the break-even, the guard declines the tree for the rest of the decoder's life (`declined` says
    why) and the decoder decodes densely: the same tokens, greedy either way. On the H200 a SmolLM2 tree step
    cost 5.4 dense steps and accepted 2.6 tokens (0.48x dense), a 7B one 1.7 dense steps for 3.5 (2.0x)."""

    def __init__(self, tree_s: float, dense_s: float, source: str, min_steps: int = TREE_GUARD_STEPS):
        if tree_s <= 0 or dense_s <= 0:
            raise ValueError(f"TreeGuard: step times must be positive, got tree {tree_s}, dense {dense_s}")
        self.tree_s, self.dense_s, self.source = float(tree_s), float(dense_s), source
        self.min_steps = int(min_steps)
        self.steps = 0
        self.accepted = 0
        self.declined: str | None = None

    @property
    def break_even(self) -> float:
        return self.tree_s / self.dense_s

    def observe(self, accepted: int) -> None:
        if self.declined is not None:
            return
        self.steps += 1
        self.accepted += int(accepted)
        mean = self.accepted / self.steps
        if self.steps >= self.min_steps and mean < self.break_even:
            self.declined = (f"after {self.steps} verify steps the tree accepted {mean:.2f} tokens per step; a step "
                             f"costs {self.break_even:.2f} dense steps ({self.tree_s * 1e6:.0f} vs "
                             f"{self.dense_s * 1e6:.0f} us): decoding densely")

    def record(self) -> dict:
        return {"tree_step_us": round(self.tree_s * 1e6, 1), "dense_step_us": round(self.dense_s * 1e6, 1),
                "break_even_tokens_per_step": round(self.break_even, 3), "steps_seen": self.steps,
                "accepted_per_step_seen": round(self.accepted / self.steps, 3) if self.steps else None,
                "declined": self.declined, "source": self.source}


class TreeStep:
    """The tree step of a `Decoder` (see module docstring). `dec` is the Decoder that owns it."""

    def __init__(self, dec):
        from ..draft.tree import EagleTreeSource

        self.dec = dec
        s = dec.s
        seg = dec.seg
        if not all(hasattr(seg, a) for a in ("weights", "cache", "spec")):
            raise SpecEEError(f"backend {seg.name!r} cannot verify a tree; use --backend eager or inductor")
        if not isinstance(dec.draft, EagleTreeSource):
            raise SpecEEError("--speculate tree needs an EAGLE draft head (artifacts with draft.safetensors)")
        # the flags, else the shape measured best with this head (its draft_config.json), else the device's
        self.budget, self.depth, self.topk = s.tree_shape(getattr(seg, "gemm", None), dec.draft.draft.tree_shapes)
        self._layer = self._make_layer(seg)
        self.accepted_log: list[int] = []
        # an acceptance trace's cursor: verify steps over this decoder's life, not per generation, so that a
        # trace recorded over many prompts is replayed whole (not its first prompt's steps on every call)
        self.trace_steps = 0
        self.exit_cursor = 0  # a forced exit trace's cursor (benchmark only): tokens emitted over the decoder's life
        # approximate SpecEE on the tree (either program) runs the decoder's exit points that pay for themselves,
        # chosen in Decoder.start as a one-token step's are, with a path's exit rates (exit_costs.py; a 25-row layer
        # at 7B widths costs about a one-row layer, on a CPU more: the rule errs towards dropping a point); the fixed
        # program gates only those (`FixedTree.prepare`). Lossless pruning on the host step saves rows, not layer
        # passes, and keeps every point.
        self.selects_exits = bool(s.specee and dec.program is not None and not dec.policy.needs_rollback)
        self.fixed = self._fixed_program(dec)
        self._fixed_on = False  # this generation runs the fixed program (set in prepare)
        self.guard: TreeGuard | None = None  # measured in prepare where it applies (Settings.tree_guard)
        if self.fixed is not None and s.specee and not self.fixed.exits:
            dec.selection = {"exit_points_kept": [], "exit_points_dropped": {
                str(i): "lossless SpecEE on the tree prunes rows, not layer passes: the fixed tree program "
                        "verifies every node through every layer (--tree-program host prunes)"
                for i in dec.exit_layers}, "step_costs": None, "note": "tree speculation, fixed program"}

    def _fixed_program(self, dec) -> FixedTree | None:
        """The fixed tree program, where it applies (Settings.tree_program)."""
        from ..draft.tree import DeviceEagleTreeSource
        from .contract import Captures

        s, seg = dec.s, dec.seg
        exits = self.selects_exits  # (approximate SpecEE: the program gates its verification)
        why = None
        if s.temperature > 0:
            why = "it decodes greedily (sampling runs the host tree step)"
        elif not isinstance(dec.draft, DeviceEagleTreeSource):
            why = "it needs the draft on the device (api.tree_draft builds one)"
        elif not isinstance(seg, Captures):
            why = f"backend {seg.name!r} cannot capture it"
        elif exits and dec.draft.fixed_width(self.topk) < dec.draft.k:
            why = (f"its exits score the draft's {dec.draft.k} candidates per node, more than the tree's top-k "
                   f"({self.topk}) proposes (--tree-topk {dec.draft.k} or more would)")
        elif exits and seg.branches() is None:
            why = "its exits need conditional nodes in the CUDA graph, unavailable here (plugins/cuda_graph_if.py)"
        if exits and dec.policy.forced and not dec.accept.trace:
            raise SpecEEError("an exit trace on the tree needs an acceptance trace too (benchmark only)")
        wanted = s.tree_program == "fixed" or (s.tree_program == "auto" and seg.device.type == "cuda")
        if why is not None and s.tree_program == "fixed":
            raise SpecEEError(f"--tree-program fixed cannot run here: {why}; use --tree-program host")
        if dec.accept.trace and (why is not None or not wanted):
            raise SpecEEError("an acceptance trace needs the fixed tree program: "
                              + (why or "set tree_program='fixed' (auto picks it on CUDA only)"))
        if why is not None or not wanted:
            return None
        return FixedTree(dec, self.budget, self.depth, self.topk, self._layer, exits)

    def prepare(self, prompt_len: int, max_new_tokens: int) -> None:
        """Before the prefill: capture the fixed program for every bucket this generation can reach (or
        decide that it cannot fit in the context, and run the host step)."""
        f = self.fixed
        first, last = prompt_len, prompt_len + max_new_tokens - 1
        self._fixed_on = f is not None and f.fits(last)
        if f is None:
            return
        if not self._fixed_on and self.dec.s.tree_program == "fixed":
            raise SpecEEError(f"--tree-program fixed: {prompt_len} prompt + {max_new_tokens} new tokens leave "
                              f"no room for the tree's {f.margin} slots in the context; raise --max-context")
        if self._fixed_on:
            if self.on:  # (a declined tree's decoder only needs the dense graphs, which the guard prepares)
                f.prepare(first, last)
            self._prepare_guard(first, last)

    def tokens_per_path(self) -> float:
        """Tokens a verify step is expected to emit, for weighing the exit points of SpecEE on the tree: an
        acceptance trace's mean (the benchmark), else `TREE_PATH_TOKENS` (nothing measured before the first step)."""
        from ..config import TREE_PATH_TOKENS

        trace = self.dec.accept.trace
        return sum(trace) / len(trace) if trace else TREE_PATH_TOKENS

    @property
    def on(self) -> bool:
        """Whether the decoder's steps are tree steps (False once the guard has declined the tree)."""
        return self.guard is None or self.guard.declined is None

    def _prepare_guard(self, first: int, last: int) -> None:
        """Where the backend also runs a whole-step dense program that it can time (CUDA, inductor): capture
        its graphs for the same positions (a declined tree decodes densely from any step on, and no capture
        may run during a generation: its warm-ups write the cache) and, once per decoder, time a step of
        each at the first bucket. The runs leave junk state, which the decoder's start clears."""
        dec = self.dec
        whole = dec.whole
        if (not dec.s.tree_guard or whole is None or not hasattr(whole, "dense_step_time")
                or not whole.can_run(StepPlan(token=0, pos=0))):  # (a whole dense step: CUDA, inductor)
            return
        # the dense step's plan, whatever the decoder's own template (with --specee it is the exit program's,
        # while a declined tree decodes plain dense steps: `Decoder._dense_step`)
        whole.prepare(StepPlan(token=0, pos=0), last)
        if self.guard is not None:
            return
        f = self.fixed
        S = f.bucket(first)
        program = f.programs[S]

        def tree_step():  # every replay from the same root position: p advances on the device
            f.p.fill_(S - f.margin - 1)
            program()

        t_tree = whole.program_time(tree_step, 10)
        t_dense = whole.dense_step_time(S)
        dec.seg.cache.junk = True  # (the tree program's replays; dense_step_time flags its own)
        self.guard = TreeGuard(t_tree, t_dense, f"CUDA graph replays at S={S}: the fixed tree program ({f.N} nodes, "
                                                f"depth {f.depth}) and the dense whole step")

    # ---------------------------------------------------------------- the tree-verify layer
    @staticmethod
    def _make_layer(seg):
        """`model_step`'s layer, called with tree slots and mask. A backend may bring its own
        (`tree_layer(i, h, pos, S, slots, mask)`); otherwise the eager function, compiled by
        torch.compile for the inductor backend on CUDA (its traced segment has no mask input)."""
        own = getattr(seg, "tree_layer", None)
        if own is not None:
            return own
        # `model_step.rows_fused`: the norms, SiLU and the o-projection's residual plain, for Inductor to fuse
        # (H200, SmolLM2 shapes, 25 rows x 30 layers: 2.32 ms plain vs 3.03 ms with the norms inside the fused
        # ops, session 4); the 16-bit matmuls as `specee::fused_linear` with no prologue, where the rows tuner
        # picks cuBLAS or the turned rows kernel per shape (benchmarks/rows_gemm_sweep.py), the down projection
        # with the layer's last residual add. On CUDA the rows' RoPE and cache write are one `rope_append` launch
        # at the tree's slots, where Inductor's plain index_copy kernel took ~7 us per 7B layer (session-13
        # profile), and the masked attention one `tree_attention` launch, where cuDNN's flash kernel took 9.4 us
        # and a mask kernel ran before it (session-18 profile); it writes rows-major, so the o-projection reads
        # it as a view.
        # On a CPU the layer stays eager for the inductor backend too: its matmuls take the backend's oneDNN
        # weights (`Segments.layer_weights`), which Inductor cannot compile, and MKL, which it would call for
        # several rows, runs them several times slower there (`InductorSegments._rows_eager`).
        fn = make_layer_fn(seg.spec, fused=rows_fused(seg.dtype) if seg.device.type == "cuda" else ())
        if seg.name == "inductor" and seg.device.type == "cuda":
            fn = TreeStep._compile(fn)
        w, c = seg.weights, seg.cache

        def tree_layer(i, h, pos, S, slots, mask):
            return fn(h, pos, c.valid[i], w.cos, w.sin, c.k[i], c.v[i], S, *seg.layer_weights(i), slots=slots,
                      mask=mask)

        return tree_layer

    @staticmethod
    def _compile(fn):
        """The tree verification's functions (its layer, its head) as Inductor compiles them on CUDA."""
        from ..plugins import pdl

        allow_recompiles()  # every tree decoder of the process compiles this same code
        return torch.compile(fn, fullgraph=True, dynamic=None, options=pdl.inductor_options() or None)

    @staticmethod
    def _make_head(seg):
        """The verification's final norm and LM head, `head(h) -> (hn, logits)`: the backend's own, except with the
        inductor backend on CUDA, where the LM head takes the layers' form (`rows_fused`'s "matmul": the rows tuner
        picks cuBLAS or a rows kernel for the tree's rows) and is compiled like the tree layer."""
        if seg.name != "inductor" or seg.device.type != "cuda" or "matmul" not in rows_fused(seg.dtype):
            return getattr(seg, "head_direct", seg.head)
        fn = TreeStep._compile(make_head_fn(seg.spec, matmul=True))
        w = seg.weights

        def tree_head(h):  # the rows dynamic, as `head_direct`'s: all q rows, and a path's rows in `tree_exits`
            torch._dynamo.maybe_mark_dynamic(h, 1)
            return fn(h, w.norm, w.head)

        return tree_head

    # ---------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self) -> None:
        if self.dec.res.verify_steps == 0:
            self.accepted_log = []  # tokens per verify step of this generation (the bench records them)
        if self._fixed_on:
            return self._fixed_step()
        dec = self.dec
        s, seg, res, L = dec.s, dec.seg, dec.res, dec.L
        dev = seg.device
        p = len(dec.seq) - 1
        budget = min(self.budget, seg.max_len - 1 - p)  # slots p .. p + N must fit the cache
        tree = dec.draft.propose_tree(budget, self.depth, self.topk)
        N = len(tree)
        q = N + 1
        depth = [0] + tree.depths
        parent = [-1] + [par + 1 for par in tree.parents]  # row indices (0 = root)
        kids = tree.children()
        tokens = [dec.seq[-1]] + tree.tokens

        # tree positions, cache slots and the [q, S] mask
        pos = torch.tensor([p + d for d in depth], device=dev)
        slots = torch.arange(p, p + q, device=dev)
        S = seg.attn_len(p + N)
        anc = torch.eye(q, dtype=torch.bool)
        for r in range(1, q):
            anc[r] |= anc[parent[r]]
        mask = torch.zeros(q, S, dtype=torch.bool)
        mask[:, :p] = True
        mask[:, p : p + q] = anc
        mask = mask.to(dev)

        specee = s.specee and dec.program is not None
        active = frozenset()
        if specee:
            active = frozenset(i for i in dec._active_layers() if i >= s.min_exit_layer)
            cands = tree.cands.to(dev)  # [q, k]
            has = (cands >= 0).all(-1)  # rows that can be scored
            safe = torch.where(cands >= 0, cands, torch.zeros_like(cands))
            w_rows = seg.head_rows(safe.reshape(-1)).reshape(q, -1, seg.spec.hidden)  # [q, k, D]
            p_prev = torch.zeros(cands.shape, device=dev, dtype=torch.float32)

        rows = torch.arange(q)  # rows still computed (lossless pruning narrows this)
        h = seg.embed(torch.tensor(tokens, device=dev))  # [1, q, D]
        exit_layer = None
        logits = None
        for i in range(L):
            h = self._layer(i, h, pos, S, slots, mask)
            res.layer_passes += 1
            res.layer_rows += h.shape[1]
            if i not in active or len(rows) < q:
                continue
            path, exited, _z, p_prev = self._predict_path(i, h, w_rows, cands, p_prev, has, kids)
            res.predictor_calls += 1
            if not exited:
                continue
            if dec.policy.needs_rollback:  # lossless: prune to the predicted path
                rows = torch.tensor(path)
                keep = rows.to(dev)
                h, pos, slots, mask = h[:, keep], pos[keep], slots[keep], mask[keep]
                if dec.scheduler is not None:
                    dec.scheduler.record_exit(i)
                continue
            # approximate: the path's rows at layer i through the full head; the paper's check
            hn_i, lg = seg.head(h[:, path])
            res.head_calls += 1
            top = torch.argmax(lg[0], dim=-1)  # [len(path)]
            ok = all(bool((cands[r] == top[j]).any()) for j, r in enumerate(path))
            if ok:
                exit_layer = i
                rows = torch.tensor(path)
                h, logits, hn = h[:, path], lg, hn_i
                break
        if logits is None:
            hn, logits = seg.head(h)
        # acceptance over the computed rows (`rows` maps local index -> tree row)
        local = {int(r): j for j, r in enumerate(rows.tolist())}
        acc_rows, emitted = self._accept(logits[0], local, kids)
        layer = L - 1 if exit_layer is None else exit_layer
        if exit_layer is not None and dec.scheduler is not None:
            dec.scheduler.record_exit(exit_layer)

        # compact: accepted rows' K/V from slots p + r to positions p + 1 .. p + a (root stays at p)
        a = len(acc_rows) - 1
        cache = seg.cache
        if a:
            src = torch.tensor([p + r for r in acc_rows[1:]], device=dev)
            dst = torch.arange(p + 1, p + 1 + a, device=dev)
            cache.k[:, :, dst] = cache.k[:, :, src]
            cache.v[:, :, dst] = cache.v[:, :, src]
            cache.valid[:, dst] = cache.valid[:, src]
        cache.truncate(p + 1 + a)
        if exit_layer is not None:  # skip policy: deeper layers hold nothing for these positions
            cache.valid[exit_layer + 1 :, p : p + 1 + a] = False

        res.decode_steps += 1
        res.verify_steps += 1
        res.tree_nodes += N
        n_before = len(dec.seq)
        for j, (r, tok) in enumerate(zip(acc_rows, emitted)):
            if dec._finished():
                break
            dec.draft.observe(tok, hn[0, local[r]], layer)
            dec._append(tok, layer)
        self._count(len(dec.seq) - n_before)

    def _count(self, n: int) -> None:
        """A verify step emitted n tokens: the stats, the bench's log, the guard."""
        dec = self.dec
        dec.res.accepted_tokens += n
        self.accepted_log.append(n)
        if self.guard is not None:
            self.guard.observe(n)
            dec.res.tree_guard = self.guard.record()

    def _fixed_step(self) -> None:
        dec, f, res = self.dec, self.fixed, self.dec.res
        p = len(dec.seq) - 1
        if res.verify_steps == 0:  # the first step of this generation: the root's draft state
            f.begin(dec.seq)
        forced = dec.accept.forced_tokens(self.trace_steps)
        active = forced_exit = None
        if f.exits:
            active = frozenset(i for i in dec._active_layers() if i >= dec.s.min_exit_layer)
            forced_exit = dec.policy.forced_path_layer(self.exit_cursor, forced or 1)
        emitted, layer, decisions, heads = f.run(p, forced, forced_exit, active)
        layer = layer if f.gated else dec.L - 1
        self.trace_steps += 1
        self.exit_cursor += len(emitted)
        res.layer_passes += layer + 1
        res.layer_rows += (layer + 1) * f.q
        res.predictor_calls += decisions
        res.head_calls += heads
        res.decode_steps += 1
        res.verify_steps += 1
        res.tree_nodes += f.N
        if layer < dec.L - 1 and dec.scheduler is not None:
            dec.scheduler.record_exit(layer)
        n_before = len(dec.seq)
        for tok in emitted:
            if dec._finished():
                break
            dec._append(tok, layer)
        dec.draft.observe_fixed(emitted)
        self._count(len(dec.seq) - n_before)

    # ---------------------------------------------------------------- helpers
    def _predict_path(self, i, h, w_rows, cands, p_prev, has, kids):
        """Score every row at exit layer i in one batched call; return (predicted path rows, whether
        every row on it exited, candidate logits z [q, k], new p_prev [q, k])."""
        dec = self.dec
        seg = dec.seg
        P = seg.predictors
        score, z, p_new = tree_exit_scores(h[0], seg.weights.norm, w_rows, p_prev, P.w1[i], P.b1[i],
                                           P.w2[i], P.b2[i], seg.spec.eps)
        th = dec.thresholds[i]
        exits = ((score > th) & has).tolist()
        best = torch.gather(cands, 1, torch.argmax(z, dim=-1, keepdim=True))[:, 0].tolist()
        path, r, ok = [0], 0, True
        while True:
            ok = ok and exits[r]
            nxt = kids[r].get(best[r])
            if nxt is None or not ok:
                break
            path.append(nxt)
            r = nxt
        return path, ok, z, p_new

    def _accept(self, logits, local, kids):
        """Walk the tree from the root with the target's logits [rows, V]; return (accepted rows
        (root first), emitted tokens: the accepted children then the bonus)."""
        s = self.dec.s
        rows, out, r = [0], [], 0
        greedy = s.temperature <= 0
        if greedy:
            top = torch.argmax(logits, dim=-1).tolist()
        while True:
            children = {t: c for t, c in kids[r].items() if c in local}
            if greedy:
                t = top[local[r]]
                nxt = children.get(t)
            else:
                t, nxt = self._sample_accept(logits[local[r]], children)
            out.append(t)
            if nxt is None:
                return rows, out
            rows.append(nxt)
            r = nxt

    def _sample_accept(self, logits, children: dict[int, int]):
        """Speculative sampling at one row with point-mass drafts (see module docstring):
        returns (token, child row or None)."""
        s, gen = self.dec.s, self.dec.gen
        r = target_probs(logits, s.temperature, s.top_p).cpu()
        for t, c in children.items():
            pt = float(r[t])
            if pt > 0 and float(torch.rand((), generator=gen)) < pt:
                return t, c
            r[t] = 0.0
            tot = float(r.sum())
            if tot <= 0:  # numerically all mass was on rejected children: cannot happen exactly
                break
            r = r / tot
        return int(torch.multinomial(r, 1, generator=gen)), None


class FixedTree:
    """The greedy tree step as one fixed-shape program over static buffers, with no host read inside:
    on CUDA the backend captures it as a CUDA graph per attention bucket (`Segments.capture`, the
    contract's `Captures`), so a tree step costs one replay and one read of its tokens, not hundreds of
    launches and a dozen host syncs.

    Same algorithm as `TreeStep.step` (greedy): with root position p and token x_p on the device, (1) the
    draft's `fixed_expand` builds every candidate node, (2) the `budget` best by cumulative log-probability
    are kept (a child always ranks strictly below its parent: a depth penalty of 1e-4 breaks ties, so the
    kept set is a tree), ordered parents first, less the rows reserved for the prompt-lookup path
    (`lookup_device` over the sequence kept on the device), which is merged in as the host step merges it: it
    shares the kept nodes it agrees with, its other tokens become rows of their own, and reserved rows it
    does not use are dead (verified, never accepted), (3) the tree is verified in one forward (rows at slots
    p .. p + N, tree positions and ancestor mask), (4) the deepest node whose path matches the target's
    argmax is accepted, plus the bonus token, (5) the accepted rows' K/V move to p + 1 .., the rest of the
    tree's slots are invalidated, (6) the draft catches up over the accepted pairs and leaves the next root's
    state; p and x_p advance on the device. Output: `out` = [emitted tokens (C = min(depth, budget) + 1
    slots), count, exit layer, predictor calls, head calls].

    With `exits` (SpecEE on the tree, approximate mode: the host step's merged mapping) the verification is
    gated by the kept exit points, decided on the device (`TreeExits`, runtime/tree_exits.py)."""

    def __init__(self, dec, budget: int, depth: int, topk: int, layer, exits: bool = False):
        """layer: the tree-verify layer (`TreeStep._make_layer`), shared with the host step."""
        seg, draft = dec.seg, dec.draft
        self.dec, self.seg, self.draft = dec, seg, draft
        self.K = draft.fixed_width(topk)
        self.depth = depth
        M = self.K + (depth - 1) * self.K * self.K
        self.N = min(budget, M)
        self.Dl = min(depth, self.N) if getattr(draft, "lookup", False) else 0  # rows of the lookup path
        self.Dq = min(depth, self.N)
        self.C = self.Dq + 1
        self.q = self.N + 1
        self.L = seg.spec.num_layers
        # slots a step needs past p: the verified rows, the draft's expansion rows, the catch-up pairs
        self.margin = max(self.N, (depth - 1) * self.K, self.C) + 1
        dev = seg.device
        self.p = torch.zeros(1, dtype=torch.long, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.g0 = torch.zeros(draft.draft.hidden_size, dtype=draft._dt, device=dev)
        self.out = torch.zeros(self.C + 4, dtype=torch.long, device=dev)
        self.ids = torch.zeros(seg.max_len, dtype=torch.long, device=dev)  # the sequence (prompt lookup)
        self.eye = torch.eye(self.q, dtype=torch.bool, device=dev)
        self.layer = layer
        self.head = TreeStep._make_head(seg)  # (the gated path, `tree_exits`, calls it too)
        self.programs: dict[int, object] = {}  # attention bucket S -> replayable program
        self.forcing = bool(dec.accept.trace)  # an acceptance trace decides the path (benchmark only)
        self.force = torch.zeros(1, dtype=torch.long, device=dev)  # its accepted length this step
        # the step's glue between its compiled parts (the tree's plan, the acceptance), compiled too where the
        # layers are: CUDA with the inductor backend (~150 small eager kernels per step otherwise,
        # benchmarks/GPU_NOTES.md session 12); S enters as the length of `keys`
        self.glue = CompiledFns("the tree step's glue", dev.type == "cuda" and seg.name == "inductor")
        self.jj = torch.arange(self.C, device=dev)
        self.rows_ar = torch.arange(self.q, device=dev)
        self.all_rows = torch.ones(self.q, dtype=torch.bool, device=dev)
        self.exits = bool(exits)  # SpecEE on the tree wanted (approximate mode: runtime/tree_exits.py)
        self.ex: TreeExits | None = TreeExits(self, dec) if self.exits else None

    @property
    def gated(self) -> bool:
        """The program gates its verification by exit points (wanted, and some point was kept)."""
        return self.ex is not None and bool(self.ex.gates)

    def fits(self, max_pos: int) -> bool:
        return max_pos + self.margin < min(self.seg.max_len, self.draft.max_len)

    def bucket(self, p: int) -> int:
        return self.seg.attn_len(p + self.margin)

    def prepare(self, first_pos: int, max_pos: int) -> None:
        """Compile and capture the program for every bucket positions first_pos .. max_pos reach (before
        the prefill: the warm-up runs write junk state that the caller's reset clears)."""
        from ..ops import multi_row_kernel

        seg = self.seg
        if self.ex is not None and not self.programs:  # the exit points the decoder kept (Decoder.start chose them)
            self.ex.bind(self.dec)
        todo = sorted({self.bucket(x) for x in range(first_pos, max_pos + 1)} - set(self.programs))
        for S in todo:  # warm-up / upload runs start where this bucket's last position would
            with multi_row_kernel():  # the verification rows and the draft's levels: the rows GEMV on CUDA
                self.programs[S] = seg.capture(lambda S=S: self.body(S), lambda S=S: self.p.fill_(S - self.margin - 1))
        seg.cache.reset()

    def begin(self, seq: list[int]) -> None:
        p = len(seq) - 1
        token = seq[-1]
        self.ids[: p + 1].copy_(torch.tensor(seq, dtype=torch.long))
        self.p.fill_(p)
        self.last.fill_(token)
        self.g0.copy_(self.draft.fixed_begin())

    def run(self, p: int, forced: int | None = None, forced_exit: int | None = None,
            active: frozenset | None = None) -> tuple[list[int], int, int, int]:
        """One step at root position p (the device holds the same p): (the emitted tokens, the exit layer (L - 1:
        none), predictor calls, head calls). `forced`: the tokens an acceptance trace emits this step;
        `forced_exit`: the layer an exit trace leaves at; `active`: the exit points the schedule evaluates."""
        if self.forcing:
            self.force.fill_(min(max(forced - 1, 0), self.Dq))
        if self.gated:
            self.ex.set_step(forced_exit, active)
        self.programs[self.bucket(p)]()
        out = self.out.tolist()
        C = self.C
        return out[: out[C]], out[C + 1], out[C + 2], out[C + 3]

    @torch.no_grad()
    def body(self, S: int) -> None:
        seg, draft, K, C, p = self.seg, self.draft, self.K, self.C, self.p
        tok, score, parent, dep, kid0 = draft.fixed_expand(self.g0, p, S, K, self.depth)
        rpar, rtok, rdep, anc, mask, live, rscore, cands, pos, slots, h = self.glue(
            "plan", self._plan, tok, score, parent, dep, kid0, p, self.last, self.ids, self.eye, self.rows_ar,
            keys=draft.keys_for(S))
        if self.gated:
            top, computed, hrows = self.ex.verify(h, pos, S, slots, mask, (rtok, rpar, rdep, rscore, live, anc), cands)
        else:
            for i in range(self.L):
                h = self.layer(i, h, pos, S, slots, mask)
            hn, top = self.head(h)  # (the logits: the acceptance takes their argmax)
            computed, hrows = self.all_rows, hn[0]
        cache = seg.cache
        a, emit, out, feats, src, dst, tree_slots, kept, ids_at, last, p_next = self.glue(
            "accept", self._settle, top, computed, rtok, rpar, rdep, rscore, live, anc, self.force, self.jj, p, hrows,
            self.rows_ar, cache.valid.shape[0])
        self.out[: C + 1].copy_(out)
        # compact: the path's K/V to p + 1 .. p + a; every other slot of the tree forgets its rows
        cache.k.index_copy_(2, dst, cache.k.index_select(2, src))
        cache.v.index_copy_(2, dst, cache.v.index_select(2, src))
        cache.valid.index_copy_(1, tree_slots, kept)
        if self.gated:  # the skip KV policy: layers past the exit hold nothing for p .. p + a; the step's counts
            self.ex.finish(cache.valid, p, a, self.out[C + 1 :])
        # the draft over the accepted pairs: (f_{p+j}, x_{p+j+1}), j = 0 .. a
        self.g0.copy_(draft.fixed_catch_up(feats, emit, p, a, S))
        self.last.copy_(last)
        self.ids.index_copy_(0, ids_at, emit)  # (slots past the new end are rewritten before they are read)
        p.copy_(p_next)

    def _plan(self, tok, score, parent, dep, kid0, p, last, ids, eye, rows_ar, keys):
        """The verified tree from the expansion: rows (root, the Nd best-scored nodes parents first, the lookup
        rows), their parents, tokens, depths, ancestors, the [q, S] attention mask (S = len(keys)), for the
        exits the draft's candidates after each row ([q, k]; -1 where the draft proposed nothing there), and the
        verification's inputs: positions, cache slots (rows_ar = arange(q)) and the rows' embeddings. One
        compiled glue on CUDA, so the index math around it costs no launches of its own."""
        dev, q, M = tok.device, self.q, tok.shape[0]
        keys = torch.arange(keys.shape[0], device=dev)  # (the argument only carries S)
        Nd, Dl = self.N - self.Dl, self.Dl  # draft rows 1 .. Nd, lookup rows Nd + 1 .. N
        kept = torch.topk(score - dep.float() * 1e-4, Nd).indices
        kept = kept[torch.argsort(dep[kept] * M + kept)]  # parents first
        rmap = torch.zeros(M, dtype=torch.long, device=dev)
        rmap.index_copy_(0, kept, torch.arange(1, Nd + 1, device=dev))
        par = parent[kept]
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        pad = torch.zeros(Dl, dtype=torch.long, device=dev)
        rpar = torch.cat([zero, torch.where(par >= 0, rmap[par.clamp(min=0)], 0), pad])  # [q] row of each parent
        rtok = torch.cat([last, tok[kept], pad])
        rdep = torch.cat([zero, dep[kept], pad + 1])
        rscore = torch.cat([zero.float(), score[kept], pad.float() - 100.0])
        live = torch.cat([torch.ones(Nd + 1, dtype=torch.bool, device=dev), pad.bool()])
        if Dl:
            self._merge_lookup(ids, p, Nd, Dl, rpar, rtok, rdep, live)
        anc = eye
        for _ in range(self.depth):
            anc = eye | anc[rpar]  # ancestors (and self) of each row
        rel = (keys - p).clamp(0, q - 1)
        mask = (keys < p)[None] | (((keys >= p) & (keys < p + q))[None] & anc[:, rel])  # [q, S]
        cands = None  # (only the exits score candidates)
        if self.exits:
            first = torch.cat([zero, kid0[kept], pad - 1])  # [q] first proposal of each row (the root's: node 0)
            at = (first.clamp(min=0)[:, None] + torch.arange(self.ex.kc, device=dev)).clamp(max=M - 1)
            cands = torch.where((first >= 0)[:, None], tok[at], -1)
        return rpar, rtok, rdep, anc, mask, live, rscore, cands, p + rdep, p + rows_ar, self.seg.embed(rtok)

    def _forced_best(self, rdep, rscore, live, force):
        """An acceptance trace's row: the best-scored at the trace's depth (or the deepest the tree has below it)."""
        return torch.argmax(torch.where((rdep <= force) & live, rdep * 1000.0 + rscore + 500.0, -1.0)).view(1)

    @staticmethod
    def _path_of(best, anc, rdep, jj):
        """Row `best`'s path: (its row at each depth [C], root past the end; its length [1], root included)."""
        on_path = anc.index_select(0, best) & (rdep[None] == jj[:, None])  # [C, q]
        return torch.argmax(on_path.long(), dim=1), rdep.index_select(0, best) + 1

    def _settle(self, top, computed, rtok, rpar, rdep, rscore, live, anc, force, jj, p, hrows, rows_ar,
                n_layers: int):
        """The acceptance (`_accept`) and every index the step's bookkeeping takes from it, in one compiled glue on
        CUDA (each was a small eager kernel of its own): (a, emit, the output's head [emit, a + 1], the path's
        features for the draft's catch-up, the K/V move's source and destination slots, the tree's slots p + 1 ..
        p + N and their validity [n_layers, N] (the moved path's first a, none of the rest), the slots of `ids` to
        write, the next root token, p + a + 1)."""
        a, prow, emit = self._accept(top, computed, rtok, rpar, rdep, rscore, live, anc, force, jj)
        j = rows_ar[1:]  # the tree's slots p + j, j = 1 .. N
        kept = (j <= a)[None].expand(n_layers, j.shape[0]).contiguous()
        return (a, emit, torch.cat([emit, a + 1]), hrows.index_select(0, prow), p + prow[1:], p + 1 + jj[: self.Dq],
                p + j, kept, p + 1 + jj, emit.index_select(0, a), p + a + 1)

    def _accept(self, top, computed, rtok, rpar, rdep, rscore, live, anc, force, jj):
        """The deepest row whose path the target confirms (or a trace's forced depth): (a [1] its depth,
        prow [C] the path's row at each depth, emit [C] the tokens it emits, bonus included); jj = arange(C).
        top: the target's token after each row [q] (or the logits [1, q, V]); computed [q]: rows it holds."""
        q = self.q
        if top.dim() == 3:
            top = torch.argmax(top[0], dim=-1)  # [q]
        first = torch.arange(q, device=top.device) == 0
        match = ((rtok == top[rpar]) & live & computed) | first
        acc = match
        for _ in range(self.depth):
            acc = match & acc[rpar]
        if self.forcing:
            best = self._forced_best(rdep, rscore, live, force)
        else:  # the deepest accepted row (unique: siblings differ); a [1] index, not 0-d (a host read)
            best = torch.argmax(acc.long() * (rdep + 1)).view(1)
        prow, n = self._path_of(best, anc, rdep, jj)
        a = n - 1
        bonus = top.index_select(0, best)
        emit = torch.where(jj < a, torch.cat([rtok[prow[1:]], bonus]), bonus)  # [C]
        return a, prow, emit

    def _merge_lookup(self, ids, p, Nd: int, Dl: int, rpar, rtok, rdep, live) -> None:
        """Merge the prompt-lookup continuation into rows Nd + 1 .. Nd + Dl, in place: each of its tokens
        follows the kept child of the previous one that holds it, or takes its own (live) row."""
        from ..draft.tree import lookup_device

        look, ok = lookup_device(ids, p, Dl, self.draft.lookup_ngram)
        q, dev = self.q, ids.device
        rows = torch.arange(q, device=dev)
        prev = torch.zeros(1, dtype=torch.long, device=dev)  # the path so far ends at the root
        for j in range(Dl):
            r = Nd + 1 + j
            t, okj = look[j : j + 1], ok[j : j + 1]
            same = (rpar == prev) & (rtok == t) & live & (rows > 0) & (rows < r)
            has = same.any().view(1)
            new = okj & ~has
            rtok[r : r + 1] = torch.where(new, t, 0)
            rpar[r : r + 1] = torch.where(new, prev, 0)
            rdep[r : r + 1] = torch.where(new, rdep.index_select(0, prev) + 1, 1)
            live[r : r + 1] = new
            prev = torch.where(okj, torch.where(has, torch.argmax(same.long()).view(1), r), prev)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `runtime/sampling.select_token` samples from: softmax(logits / T), top-p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, idx, torch.where(keep, sorted_p, torch.zeros_like(sorted_p)))
        probs = probs / probs.sum()
    return probs


__all__ = ["FixedTree", "TreeStep", "target_probs", "tree_exit_scores"]
