"""SpecEE on the fixed tree program (`runtime/tree.py` `FixedTree`): approximate exits decided on the device.

The host tree step's merged mapping (runtime/tree.py's docstring: each root-to-leaf path is one hyper-token that
leaves at the deepest exit of its tokens), with the same decisions, taken inside the captured program. The
verification is gated like the one-token whole step's (backends/cuda_step.py):

    the layers between two kept exit points   in a branch on `alive`, nested in the previous stretch's
    after exit point l                        in a branch on active[l] nested in that one: one batched score of
                                              every row and the predicted path's walk (`_decide`)
    where every row on the path exited        in a branch on `proposed` nested in that: the LM head on the
                                              path's rows and the paper's check (each row's argmax one of its
                                              candidates: `_commit`); where it holds the path leaves at l, its
                                              tokens and features are layer l's, `alive` drops
    the last stretch                          ends with the full head on every row (`_final`)
    after the acceptance                      layers past the exit forget the path's K/V (the skip KV policy)

The branches are `Captures.branch`: IF nodes of the CUDA graph inside `Segments.capture` (the warm-ups run every
branch), decided on the host off CUDA, so the CPU tests hold this program to the host step token for token.
Under the benchmark's exit trace (`policies.trace_exits` with an acceptance trace) the path is the acceptance
trace's, and it leaves at the first active point at or past the trace's layer; the scores still run.
"""

from __future__ import annotations

import torch


def tree_exit_scores(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float):
    """Exit scores of q rows in one call: h [q, D], rows [q, k, D], p_prev [q, k] ->
    (score [q], z [q, k], p [q, k]), float32; per row the math of `specee::exit_score`."""
    from ..model_step import rms_norm
    from ..predictors.features import exit_features

    hn = rms_norm(h, norm_w, eps)  # [q, D]
    x, z, p = exit_features(hn, rows, p_prev)  # x [q, 3k]
    hidden = torch.relu(torch.nn.functional.linear(x, w1.float(), b1.float()))  # [q, Hm]
    score = torch.sigmoid((hidden * w2.float()).sum(-1) + b2.float())  # [q]
    return score, z, p


class TreeExits:
    """The exit state and steps of one `FixedTree` (`tree`), over static buffers the captured program reads."""

    def __init__(self, tree, dec):
        seg, dev, L, q = tree.seg, tree.seg.device, tree.L, tree.q
        self.tree, self.seg, self.L, self.q, self.C = tree, seg, L, q, tree.C
        self.kc = tree.draft.k  # candidates per row the predictors score
        self.gates: list[int] = []  # the kept exit points (`bind`)
        self.forcing = dec.policy.forced  # an exit trace decides (benchmark only; with an acceptance trace)
        self.check = dec.policy.verify_in_candidates  # the paper's check on the path's head argmax
        self.ctl = torch.zeros(2, dtype=torch.uint8, device=dev)  # [alive, proposed]
        self.ctl0 = torch.tensor([1, 0], dtype=torch.uint8, device=dev)
        self.act = torch.zeros(L, dtype=torch.uint8, device=dev)  # exit points active this step (the schedule)
        self._act_set: frozenset | None = None
        # per-layer constants as tensors of their own: the compiled glue takes them without recompiling
        self.lids = [torch.full((1,), i, dtype=torch.long, device=dev) for i in range(L)]
        self.ths = [torch.full((1,), float(dec.thresholds.get(i, float("inf"))), device=dev) for i in range(L)]
        self.fexit = torch.full((1,), L, dtype=torch.long, device=dev)  # a forced exit layer (trace)
        self.p_prev = torch.zeros(q, self.kc, dtype=torch.float32, device=dev)
        self.path = torch.zeros(self.C, dtype=torch.long, device=dev)  # the predicted path's rows (padded)
        self.plen = torch.ones(1, dtype=torch.long, device=dev)
        self.top_b = torch.zeros(q, dtype=torch.long, device=dev)  # the target's token after each computed row
        self.comp_b = torch.zeros(q, dtype=torch.bool, device=dev)  # rows whose token is known
        self.hrows = torch.zeros(q, seg.spec.hidden, dtype=seg.dtype, device=dev)  # their final-normed states
        self.exit_b = torch.full((1,), L - 1, dtype=torch.long, device=dev)
        self.cnt = torch.zeros(2, dtype=torch.long, device=dev)  # [predictor calls, head calls]

    def bind(self, dec) -> None:
        """Before the first capture: the exit points the decoder kept (Decoder.start chose them), and the schedule's
        first active set (so that what the warm-ups and the tree guard time is a real step)."""
        self.gates = sorted(i for i in dec.exit_layers if dec.s.min_exit_layer <= i < self.L - 1)
        self._set_active(frozenset(i for i in dec._active_layers() if i >= dec.s.min_exit_layer))

    def set_step(self, forced_exit: int | None, active: frozenset) -> None:
        """Before a replay: an exit trace's layer for this step, and the schedule's active exit points."""
        if forced_exit is not None:
            self.fexit.fill_(forced_exit)
        self._set_active(active)

    def _set_active(self, active: frozenset) -> None:
        if active != self._act_set:  # (the schedule changes rarely: one small copy when it does)
            self.act.copy_(torch.tensor([i in active for i in range(self.L)], dtype=torch.uint8))
            self._act_set = active

    # ---------------------------------------------------------------- inside the program
    def verify(self, h, pos, S: int, slots, mask, rows: tuple, cands):
        """The verification gated by the exit points (module docstring). rows: (rtok, rpar, rdep, rscore, live,
        anc) of the plan; cands [q, k]. Returns (top [q], computed [q], hrows [q, D])."""
        tree, seg, L = self.tree, self.seg, self.L
        alive, proposed = self.ctl[0:1], self.ctl[1:2]
        self.ctl.copy_(self.ctl0)
        self.p_prev.zero_()
        self.exit_b.fill_(L - 1)
        self.cnt.zero_()
        has = (cands >= 0).all(-1)
        w_rows = seg.weights.head.index_select(0, cands.clamp(min=0).view(-1)).view(self.q, self.kc, -1)

        def stretch(h, first: int, last: int):
            """Layers first .. last, then (an exit point) the decision and, inside it, the check, or (the last
            layer) the full head. Nested branches: past a path's exit nothing below `alive` is even evaluated."""
            for i in range(first, last + 1):
                h = tree.layer(i, h, pos, S, slots, mask)
            if last == L - 1:
                self._final(h)
                return
            seg.branch(lambda: (self._decide_at(last, h, w_rows, cands, has, rows),
                                seg.branch(lambda: self._check_at(last, h, cands), proposed)), self.act[last:last + 1])
            return h

        ends = [*self.gates, L - 1]

        def from_stretch(j: int, first: int, h) -> None:
            """Stretch j, then the rest inside a branch on `alive` (the first stretch runs while alive is still set).
            Nested, as the one-token step's (backends/cuda_step.py): a path that left evaluates one IF node not
            taken, not one per later exit point."""
            h = stretch(h, first, ends[j])
            if j + 1 < len(ends):
                seg.branch(lambda: from_stretch(j + 1, ends[j] + 1, h), alive)

        from_stretch(0, 0, h)
        return self.top_b, self.comp_b, self.hrows

    def finish(self, valid, p, a, out) -> None:
        """After the acceptance (a [1] accepted depth at root p): layers past the exit forget the path's K/V in
        `valid` [L, T]; out [3] gets (exit layer, predictor calls, head calls)."""
        self.tree.glue("forget", self._forget_deep, valid, self.exit_b, p, a, self.tree.jj)
        out[:1].copy_(self.exit_b)
        out[1:].copy_(self.cnt)

    def _decide_at(self, i: int, h, w_rows, cands, has, rows) -> None:
        P, t = self.seg.predictors, self.tree
        t.glue("decide", self._decide, h, self.seg.weights.norm, w_rows, self.p_prev, P.w1, P.b1, P.w2, P.b2,
               self.lids[i], self.ths[i], cands, has, *rows, t.force, self.fexit, t.jj, self.path, self.plen,
               self.ctl, self.cnt)

    def _decide(self, h, norm_w, w_rows, p_prev, w1, b1, w2, b2, li, th, cands, has, rtok, rpar, rdep, rscore, live,
                anc, force, fexit, jj, path_out, plen_out, ctl, cnt):
        """At exit point li (while alive): score every row in one call (`tree_exit_scores`), then the predicted
        path as the host step's `_predict_path` walks it: from the root, follow the row's best candidate while it
        names a child and every row so far exited. Writes the path, its length, and `proposed` = the whole path
        exited (under an exit trace: li has reached the trace's layer, on the acceptance trace's path)."""
        pick = lambda w: w.index_select(0, li)[0]
        score, z, p_new = tree_exit_scores(h[0], norm_w, w_rows, p_prev, pick(w1), pick(b1), pick(w2), pick(b2),
                                           self.seg.spec.eps)
        p_prev.copy_(p_new)
        cnt[0:1].add_(1)
        if self.forcing:
            path, plen = self.tree._path_of(self.tree._forced_best(rdep, rscore, live, force), anc, rdep, jj)
            ok = li >= fexit
        else:
            exits = (score > th) & has
            best = torch.gather(cands, 1, torch.argmax(z, dim=-1, keepdim=True))[:, 0]  # [q] (-1: no candidates)
            nrows = torch.arange(self.q, device=h.device)
            r = torch.zeros(1, dtype=torch.long, device=h.device)
            ok, stopped, plen, cols = exits[0:1], torch.zeros_like(exits[0:1]), torch.ones_like(r), [r]
            for _ in range(self.C - 1):
                eq = (rpar == r) & (rtok == best.index_select(0, r)) & live & (nrows > 0)  # r's child holding it
                stop = stopped | ~eq.any().view(1) | ~ok
                r = torch.where(stop, r, torch.argmax(eq.long()).view(1))
                ok = ok & (stop | exits.index_select(0, r))
                plen = plen + (~stop).long()
                stopped = stop
                cols.append(r)
            path = torch.cat(cols)  # (past its end: its last row again)
        path_out.copy_(path)
        plen_out.copy_(plen)
        ctl[1:2].copy_(ok.to(torch.uint8))

    def _check_at(self, i: int, h, cands) -> None:
        t = self.tree
        hn, logits = t.head(h.index_select(1, self.path))
        t.glue("commit", self._commit, logits, hn, self.path, self.plen, cands, self.top_b, self.comp_b, self.hrows,
               self.exit_b, self.lids[i], t.jj, self.ctl, self.cnt)

    def _commit(self, logits, hn, path, plen, cands, top_b, comp_b, hrows, exit_b, li, jj, ctl, cnt):
        """The path exited at li: its rows' argmax through the full head. Where each is one of its row's
        candidates (the paper's check; an exit trace skips it) the path leaves here: its tokens, its rows and
        their features become the step's, `alive` drops. Else the verification goes on."""
        t = torch.argmax(logits[0], dim=-1)  # [C]
        ok = torch.ones(1, dtype=torch.bool, device=t.device)
        if self.check and not self.forcing:
            ok = ((cands.index_select(0, path) == t[:, None]).any(-1) | (jj >= plen)).all().view(1)
        top_b.copy_(torch.where(ok, top_b.index_copy(0, path, t), top_b))
        comp_b.copy_(torch.where(ok, torch.zeros_like(comp_b).index_fill(0, path, True), comp_b))
        hrows.copy_(torch.where(ok[:, None], hrows.index_copy(0, path, hn[0]), hrows))
        exit_b.copy_(torch.where(ok, li, exit_b))
        ctl[0:1].copy_((~ok).to(torch.uint8))
        ctl[1:2].zero_()
        cnt[1:2].add_(1)

    def _final(self, h) -> None:
        """No path left early: the full head on every row."""
        hn, logits = self.tree.head(h)
        self.top_b.copy_(torch.argmax(logits[0], dim=-1))
        self.comp_b.fill_(True)
        self.hrows.copy_(hn[0])

    @staticmethod
    def _forget_deep(valid, exit_b, p, a, jj):
        cols = p + jj
        deep = (torch.arange(valid.shape[0], device=valid.device) > exit_b)[:, None] & (jj <= a)[None]  # [L, C]
        valid.index_copy_(1, cols, valid.index_select(1, cols) & ~deep)


__all__ = ["TreeExits", "tree_exit_scores"]
