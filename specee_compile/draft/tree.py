"""EAGLE-2-style dynamic draft tree from the EAGLE-1 draft head (`draft/eagle.py`).

`EagleTreeSource` is an `EagleSource` (same committed draft cache, same reset / observe / truncate,
so it still serves SpecEE's `propose()`), plus `propose_tree(budget, depth, topk)`:

  1. catch up: run the draft over the committed (feature, next token) pairs it has not seen; the
     last one (f_{p-1}, x_p) gives g ~ f_p and the log-probabilities of x_{p+1}: the root's
     children (top `topk`), scored by their draft log-probability;
  2. expand, depth by depth (EAGLE-2): the `topk` best nodes of the newest depth by *cumulative*
     draft log-probability (the product of the draft probabilities along the path) run the draft
     together, each as the pair (its parent's g, its token) at draft position p + depth - 1,
     attending to the committed draft cache, to its ancestors' tree K/V (a tree mask) and to itself;
     each proposes its `topk` children (score = parent score + log p);
  3. rerank: of every node generated, keep the `budget` best by cumulative score. A child never
     scores above its parent (log p <= 0), and ties break by depth, so the kept set is a tree.

Prompt lookup (`lookup`, on by default): the continuation after the most recent earlier occurrence of
the sequence's last 3 (else 2, else 1) tokens is merged into the tree as one more path (sharing nodes
where it agrees with the draft's), costing no draft compute: the model often repeats what it wrote or
read (lists, names, code). It has min(depth, budget) rows reserved: the draft keeps that many nodes
fewer, so the tree stays within `budget`; its nodes have no draft candidates (they cannot exit under
SpecEE). `lookup_device` is the same search as fixed-shape tensor code (the fixed tree program).

Lookup first (`lookup_first` = n > 0; the host step's CPU default, `Settings.tree_lookup_first`): when the last n
tokens occurred earlier, the step verifies the continuation that followed them as one path, and rows it leaves go
to the root's next-best draft children; the draft does not expand that step. Where rows are scarce (a CPU verifies
at most 3 rows in one weight pass), a recurring 3-gram's continuation beats the draft's 2-node tree
(benchmarks/RESULTS.md, session 10).

Nothing of the tree enters the committed draft cache: after verification the runtime observes the
accepted tokens with the target's features, and the next catch-up runs those pairs in one forward.

The returned `DraftTree` lists nodes parents-first (node i's parent index < i). `cands[j]` are the
draft's top-k ids for the token after node j (row 0 = root, row i + 1 = node i), the candidate set
SpecEE's exit predictors read; -1 where the node was never expanded (no draft output for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .eagle import DeviceEagleSource, EagleDraft, EagleSource


@dataclass
class DraftTree:
    tokens: list[int]  # [N] token of each node
    parents: list[int]  # [N] parent node index, -1 = the root (the last committed token)
    depths: list[int]  # [N] 1 .. depth
    scores: list[float]  # [N] cumulative draft log-probability
    cands: torch.Tensor  # [N + 1, k] int64: draft top-k after the root (row 0) and each node; -1 unknown

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self) -> list[dict[int, int]]:
        """Per row (0 = root, i + 1 = node i): token -> row of the child holding it."""
        out: list[dict[int, int]] = [{} for _ in range(len(self.tokens) + 1)]
        for i, (t, par) in enumerate(zip(self.tokens, self.parents)):
            out[par + 1].setdefault(t, i + 1)
        return out


def empty_tree(k: int) -> DraftTree:
    return DraftTree([], [], [], [], torch.full((1, k), -1, dtype=torch.long))


def _masked_draft_forward(d: EagleDraft, feats, next_ids, positions, past, tree_kv, tree_mask):
    """The draft's forward for T tree rows. feats [T, D], next_ids [T], positions [T];
    past: per layer (K, V) [1, kvh, C, hd] (committed draft positions, all visible);
    tree_kv: per layer (K, V) [1, kvh, B, hd] (expanded tree nodes); tree_mask [T, B] bool (ancestors).
    Each row also sees itself. Returns (g [T, D], per-layer (k, v) [1, kvh, T, hd])."""
    T = feats.shape[0]
    emb = F.embedding(next_ids, d.embed_weight).to(d.dtype)
    x = d.fc(torch.cat([emb, feats.to(d.dtype)], dim=-1))[None]  # [1, T, D]
    cos, sin = d.rotary(x, positions[None])
    C = past[0][0].shape[2]
    B = tree_kv[0][0].shape[2] if tree_kv else 0
    dev = x.device
    mask = torch.cat([torch.ones(T, C, dtype=torch.bool, device=dev),
                      tree_mask if B else torch.ones(T, 0, dtype=torch.bool, device=dev),
                      torch.eye(T, dtype=torch.bool, device=dev)], dim=1)  # [T, C + B + T]
    presents = []
    for i, layer in enumerate(d.layers):
        kp = torch.cat([past[i][0]] + ([tree_kv[i][0]] if B else []), dim=2)
        vp = torch.cat([past[i][1]] + ([tree_kv[i][1]] if B else []), dim=2)
        x, new = layer.forward_masked(x, cos, sin, kp, vp, mask)
        presents.append(new)
    return x[0], presents


class EagleTreeSource(EagleSource):
    """An EagleSource that can also propose a dynamic draft tree (see module docstring)."""

    lookup = True  # merge the prompt-lookup continuation into the tree
    lookup_ngram = (3, 2, 1)
    lookup_first = 0  # n > 0: when the last n tokens recur, the tree is their continuation (module docstring)

    def _lookup(self, length: int, ngrams=None) -> list[int]:
        """Up to `length` tokens that followed the most recent earlier occurrence of the last n tokens
        (n in `ngrams`, default `lookup_ngram`, the first that occurs wins)."""
        ids = self.ids
        for n in self.lookup_ngram if ngrams is None else ngrams:
            if len(ids) <= n:
                continue
            suffix = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == suffix:
                    return ids[start + n : start + n + length]
        return []

    def _vocab(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids of the logit columns [M], extra head rows of context tokens [E, D] or None)."""
        ne = len(self._extra_ids)
        ids = self.draft.vocab_ids
        if not ne:
            return ids, None
        extra = torch.tensor(self._extra_ids, dtype=torch.long, device=ids.device)
        return torch.cat([ids, extra]), self._extra_rows[:ne]

    def _logprobs(self, g: torch.Tensor, extra_rows) -> torch.Tensor:
        # g [T, D] -> log-probabilities [T, M] over the draft's vocabulary (+ context tokens)
        logits = self.draft.logits(g)
        if extra_rows is not None:
            logits = torch.cat([logits, g @ extra_rows.T], dim=-1)
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def propose_tree(self, budget: int, depth: int, topk: int) -> DraftTree:
        k = self.k
        if budget < 1 or depth < 1:
            self._catch_up()
            return empty_tree(k)
        g0 = self._catch_up()
        if g0 is None:
            return empty_tree(k)
        d = self.draft
        vocab, extra_rows = self._vocab()
        M = vocab.numel()
        kk = min(max(topk, 1), M)
        kc = min(k, M)
        n = len(self.ids)  # root = x_p, p = n - 1; its pair sits at draft position n - 2
        lp = self._logprobs(g0[None], extra_rows)[0]
        top = torch.topk(lp, max(kk, kc))
        cands = {0: vocab[top.indices[:kc]].tolist()}  # row -> draft top-k after that row
        if self.lookup_first:
            look = self._lookup(min(depth, budget), (self.lookup_first,))
            if look:
                return self._lookup_tree(look, budget, vocab[top.indices].tolist(), top.values.tolist(), cands[0], k)
        tokens = vocab[top.indices[:kk]].tolist()
        scores = top.values[:kk].tolist()
        parents = [-1] * kk
        depths = [1] * kk
        feat_of = {}  # node -> g of the draft step that proposed it (its pair's feature)
        for i in range(kk):
            feat_of[i] = g0
        newest = list(range(kk))
        L = len(d.layers)
        tree_k: list[list[torch.Tensor]] = [[] for _ in range(L)]
        tree_v: list[list[torch.Tensor]] = [[] for _ in range(L)]
        buf_of: dict[int, int] = {}  # expanded node -> its index in the tree K/V buffer
        nbuf = 0
        past = [(self._k[i][:, :, : self._cache_len], self._v[i][:, :, : self._cache_len]) for i in range(L)]
        for dep in range(1, depth):
            sel = sorted(newest, key=lambda j: -scores[j])[:kk]
            T = len(sel)
            feats = torch.stack([feat_of[j] for j in sel])  # [T, D]
            ids = torch.tensor([tokens[j] for j in sel], dtype=torch.long, device=self._dev)
            pos = torch.full((T,), n - 2 + dep, dtype=torch.long, device=self._dev)
            tmask = torch.zeros(T, nbuf, dtype=torch.bool)  # built on the host: one copy, not T x depth
            for r, j in enumerate(sel):
                a = parents[j]
                while a >= 0:
                    tmask[r, buf_of[a]] = True
                    a = parents[a]
            tmask = tmask.to(self._dev)
            tkv = [(torch.cat(tree_k[i], dim=2), torch.cat(tree_v[i], dim=2)) for i in range(L)] if nbuf else []
            g, presents = _masked_draft_forward(d, feats, ids, pos, past, tkv, tmask)
            for i, (kn, vn) in enumerate(presents):
                tree_k[i].append(kn)
                tree_v[i].append(vn)
            for r, j in enumerate(sel):
                buf_of[j] = nbuf + r
            nbuf += T
            lp = self._logprobs(g, extra_rows)  # [T, M]
            top = torch.topk(lp, max(kk, kc), dim=-1)
            top_ids = vocab[top.indices].tolist()
            top_lp = top.values.tolist()
            newest = []
            for r, j in enumerate(sel):
                cands[j + 1] = top_ids[r][:kc]
                for c in range(kk):
                    tokens.append(top_ids[r][c])
                    scores.append(scores[j] + top_lp[r][c])
                    parents.append(j)
                    depths.append(dep + 1)
                    feat_of[len(tokens) - 1] = g[r]
                    newest.append(len(tokens) - 1)
        look = self._lookup(min(depth, budget)) if self.lookup else []
        # rerank: the `budget` best by cumulative score; parents first (higher score, lower depth)
        # the lookup path's rows are reserved whether or not it found a continuation (the fixed program's
        # fixed shape does the same, so both build the same tree)
        reserve = min(depth, budget) if self.lookup else 0
        order = sorted(range(len(tokens)), key=lambda j: (-scores[j], depths[j], j))[: budget - reserve]
        keep = sorted(order, key=lambda j: (depths[j], j))
        new_idx = {j: i for i, j in enumerate(keep)}
        out_parents = []
        for j in keep:
            par = parents[j]
            if par >= 0 and par not in new_idx:  # unreachable: a parent always outranks its child
                raise AssertionError("draft tree rerank dropped a parent")
            out_parents.append(new_idx[par] if par >= 0 else -1)
        out_tokens = [tokens[j] for j in keep]
        out_depths = [depths[j] for j in keep]
        out_scores = [scores[j] for j in keep]
        # the lookup path: follow kept nodes while they agree, then new nodes
        par = -1
        for t in look:
            nxt = next((i for i, (tt, pp) in enumerate(zip(out_tokens, out_parents)) if tt == t and pp == par), None)
            if nxt is None:
                out_tokens.append(t)
                out_parents.append(par)
                out_depths.append(out_depths[par] + 1 if par >= 0 else 1)
                out_scores.append(out_scores[par] if par >= 0 else 0.0)
                keep.append(-1)  # no draft output for it
                nxt = len(out_tokens) - 1
            par = nxt
        cand_rows = torch.full((len(keep) + 1, k), -1, dtype=torch.long)
        cand_rows[0, :kc] = torch.tensor(cands[0])
        for i, j in enumerate(keep):
            if j >= 0 and j + 1 in cands:
                cand_rows[i + 1, :kc] = torch.tensor(cands[j + 1])
        return DraftTree(tokens=out_tokens, parents=out_parents, depths=out_depths, scores=out_scores,
                         cands=cand_rows)

    @staticmethod
    def _lookup_tree(look: list[int], budget: int, root_ids: list[int], root_lp: list[float], root_cands: list[int],
                     k: int) -> DraftTree:
        """Lookup first: the continuation `look` as a path from the root; rows the path leaves go to the root's
        best other draft children (no expansion). Nodes by depth, so every parent precedes its children."""
        sib = [(t, s) for t, s in zip(root_ids, root_lp) if t != look[0]][: budget - len(look)]
        tokens = [look[0]] + [t for t, _ in sib] + look[1:]
        path = [0] + list(range(len(sib) + 1, len(sib) + len(look)))  # rows of look[0], look[1], ...
        parents = [-1] * (1 + len(sib)) + path[:-1]
        depths = [1] * (1 + len(sib)) + list(range(2, len(look) + 1))
        cand_rows = torch.full((len(tokens) + 1, k), -1, dtype=torch.long)
        cand_rows[0, : len(root_cands)] = torch.tensor(root_cands)
        return DraftTree(tokens=tokens, parents=parents, depths=depths,
                         scores=[0.0] + [s for _, s in sib] + [0.0] * (len(look) - 1), cands=cand_rows)


def lookup_device(ids: torch.Tensor, p: torch.Tensor, length: int, ngrams=(3, 2, 1)):
    """`EagleTreeSource._lookup` as fixed-shape tensor code: ids [T] the sequence (valid up to p [1], the
    last position) -> (tokens [length], valid [length] bool): the continuation after the most recent
    earlier occurrence of the last n tokens (n in `ngrams` order), cut at the sequence's end."""
    T = ids.shape[0]
    ar = torch.arange(T, device=ids.device)
    start = torch.full((1,), -1, dtype=torch.long, device=ids.device)
    used = torch.zeros(1, dtype=torch.long, device=ids.device)
    for n in ngrams:
        suffix = ids.index_select(0, (p - n + 1 + torch.arange(n, device=ids.device)).clamp(min=0))
        ok = (ar <= p - n) & (p >= n)  # an earlier start; the sequence is longer than n
        for t in range(n):
            shifted = torch.cat([ids[t:], ids.new_zeros(t)]) if t else ids
            ok = ok & (shifted == suffix[t : t + 1])
        s_n = torch.where(ok, ar, -1).amax().view(1)
        take = (start < 0) & (s_n >= 0)
        start = torch.where(take, s_n, start)
        used = torch.where(take, n, used)
    at = start + used + torch.arange(length, device=ids.device)
    return ids.index_select(0, at.clamp(0, T - 1)), (start >= 0) & (at <= p)


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) along the last dim as the `specee::topk_rows` op: on CUDA one Triton kernel per call
    (`plugins/triton_topk.py`) instead of torch's radix select and sort (~14 us per call on the H200)."""
    from .. import ops  # noqa: F401  # defines torch.ops.specee.*

    return torch.ops.specee.topk_rows(x, k)


class DeviceEagleTreeSource(EagleTreeSource, DeviceEagleSource):
    """An EagleTreeSource on DeviceEagleSource's static buffers, which can also build its tree as
    fixed-shape tensor code (`fixed_expand`, `fixed_catch_up`): no host read anywhere, so the whole
    tree step (runtime/tree.py `FixedTree`) is one capturable program on CUDA. The same EAGLE-2 tree as
    `propose_tree` (expand the `topk` best nodes of each level by cumulative log-probability, keep the
    `budget` best of all), the prompt-lookup path included (`lookup_device`).

    Draft cache use during one step at root position p (pairs 0 .. p-1 committed): the expansion rows of
    level l (1 .. depth-1) sit at RoPE position p - 1 + l and at slots p + (l-1) topk + r, past the
    committed prefix; they attend to the committed pairs and to their ancestors' slots (a tree mask). The
    catch-up after verification overwrites those slots with the accepted pairs at positions p .. p + a."""

    def fixed_logprobs(self, g: torch.Tensor) -> torch.Tensor:
        """g [T, D] -> log-probabilities [T, Ms] over the static vocabulary then the context slots
        (`vocab_map` names each column's token; unused slots get the floor), clamped to [-30, 0]."""
        logits = self._linear(g[None], self._head_w())[0]  # [T, Vd]
        if self.context_vocab:
            ex = g @ self._extra_rows.T  # [T, max_extra]
            ex = torch.where((self._slot < self.n_extra)[None], ex, torch.full_like(ex, float("-inf")))
            logits = torch.cat([logits, ex], dim=-1)
        return torch.log_softmax(logits.float(), dim=-1).clamp(-30.0, 0.0)

    def fixed_width(self, topk: int) -> int:
        """The top-k the fixed tree can use (a tiny vocabulary bounds it)."""
        return max(1, min(int(topk), self._nstatic))

    def fixed_expand(self, g0: torch.Tensor, p: torch.Tensor, S: int, topk: int, depth: int):
        """The EAGLE-2 expansion from the root's draft state g0 [D] at root position p [1] (device).
        Returns every generated node, level by level (M = K + (depth-1) K^2, K = `fixed_width(topk)`):
        (tokens [M] int64, cumulative log-prob [M] float32, parent [M] int64 (-1 = root), depth [M], first
        child [M] int64: the node's K proposals, best first, are nodes first .. first + K - 1; -1 where the node
        was not expanded). The root's proposals are nodes 0 .. K - 1."""
        return self._run(f"expand{topk},{depth}", lambda g0, p, keys: self._expand(g0, p, keys, topk, depth),
                         self.keys_for(S), g0, p)

    def _expand(self, g0: torch.Tensor, p: torch.Tensor, keys: torch.Tensor, topk: int, depth: int):
        K = self.fixed_width(topk)
        dev = self._dev
        S = keys.shape[0]
        R = (depth - 1) * K  # tree slots of the draft cache used by the expansion rows
        M = K + R * K
        tok = torch.zeros(M, dtype=torch.long, device=dev)
        score = torch.zeros(M, dtype=torch.float32, device=dev)
        parent = torch.full((M,), -1, dtype=torch.long, device=dev)
        dep = torch.ones(M, dtype=torch.long, device=dev)
        kid0 = torch.full((M,), -1, dtype=torch.long, device=dev)
        v, ix = topk_rows(self.fixed_logprobs(g0[None])[0], K)
        tok[:K] = self.vocab_map[ix]
        score[:K] = v
        if R == 0:
            return tok, score, parent, dep, kid0
        keys = torch.arange(S, device=dev)  # (the argument only carries S)
        rel = (keys - p).clamp(0, R - 1)
        in_tree = (keys >= p) & (keys < p + R)
        committed = keys < p
        eye = torch.eye(R, dtype=torch.bool, device=dev)
        anc = torch.zeros(R, R, dtype=torch.bool, device=dev)  # per expansion slot: its ancestors' slots + itself
        slot_of = torch.zeros(M, dtype=torch.long, device=dev)  # expanded node -> its slot
        ar = torch.arange(K, device=dev)
        lo, feats_lvl = 0, g0[None].expand(K, -1)  # level 1: nodes 0 .. K-1, all proposed from g0
        for lev in range(1, depth):
            n_lvl = K if lev == 1 else K * K
            sel_local = topk_rows(score[lo : lo + n_lvl], K)[1]
            sel = lo + sel_local
            b = (lev - 1) * K + ar  # their slots
            par = parent[sel]
            a_rows = eye[b] | ((par >= 0)[:, None] & anc[slot_of[par.clamp(min=0)]])
            anc[(lev - 1) * K : lev * K] = a_rows
            slot_of.index_copy_(0, sel, b)
            mask = committed[None] | (in_tree[None] & a_rows[:, rel])  # [K, S]
            pos = (p - 1 + lev).expand(K)
            g = self._rows_forward(feats_lvl[sel_local], tok[sel], pos, S, slots=p + b, mask=mask)  # [K, D]
            v, ix = topk_rows(self.fixed_logprobs(g), K)  # [K, K]
            n0 = K + (lev - 1) * K * K
            tok[n0 : n0 + K * K] = self.vocab_map[ix].reshape(-1)
            score[n0 : n0 + K * K] = (score[sel][:, None] + v).reshape(-1)
            parent[n0 : n0 + K * K] = sel.repeat_interleave(K)
            dep[n0 : n0 + K * K] = lev + 1
            kid0.index_copy_(0, sel, n0 + ar * K)
            lo, feats_lvl = n0, g.repeat_interleave(K, dim=0)
        return tok, score, parent, dep, kid0

    def fixed_catch_up(self, feats: torch.Tensor, ids: torch.Tensor, p: torch.Tensor, a: torch.Tensor,
                       S: int) -> torch.Tensor:
        """The accepted pairs (feats [C, D] the target's features at positions p .. p+C-1, ids [C] the
        tokens after them), of which the first a + 1 are real: run the draft over them at draft positions
        p .. (the rest write slots past the new prefix, which nothing reads), add the real tokens to the
        context vocabulary, and return g [D] of pair a: the next step's root state."""
        return self._run("catch_up", self._catch_up_rows, self.keys_for(S), feats, ids, p, a)

    def _catch_up_rows(self, feats, ids, p, a, keys):
        S = keys.shape[0]
        C = ids.shape[0]
        pos = p + torch.arange(C, device=self._dev)
        g = self._rows_forward(feats, ids, pos, S)
        if self.context_vocab:
            for j in range(C):
                self._device_add_context(ids[j : j + 1], a >= j)
        return g.index_select(0, a.view(1))[0]

    def fixed_begin(self) -> torch.Tensor:
        """After reset + observe of the first token: the eager catch-up over the prompt's pairs; g [D]."""
        g = self._catch_up()
        if g is None:
            raise ValueError("the draft tree needs a prompt of at least one token before the first generated one")
        return g

    def observe_fixed(self, tokens: list[int]) -> None:
        """Host bookkeeping for tokens the fixed tree step accepted (its catch-up already ran on the device)."""
        for t in tokens:
            self.ids.append(int(t))
            self._note_context_token(int(t), len(self.ids) - 1)
        self._cache_len = len(self.ids) - 1
        self._proposal = None


def tree_source(draft: EagleDraft, k: int = 4, context_vocab: bool = True) -> EagleTreeSource:
    return EagleTreeSource(draft, k=k, context_vocab=context_vocab)


__all__ = ["DeviceEagleTreeSource", "DraftTree", "EagleTreeSource", "empty_tree", "lookup_device", "topk_rows",
           "tree_source"]
