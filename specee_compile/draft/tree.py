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
read (lists, names, code). Its new nodes take the places of the lowest-scored draft nodes, so the
tree stays within `budget`; they have no draft candidates (they cannot exit under SpecEE).

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

from .eagle import EagleDraft, EagleSource


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

    def _lookup(self, length: int) -> list[int]:
        """Up to `length` tokens that followed the most recent earlier occurrence of the last n tokens."""
        ids = self.ids
        for n in self.lookup_ngram:
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
        order = sorted(range(len(tokens)), key=lambda j: (-scores[j], depths[j], j))[: budget - len(look)]
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


def tree_source(draft: EagleDraft, k: int = 4, context_vocab: bool = True) -> EagleTreeSource:
    return EagleTreeSource(draft, k=k, context_vocab=context_vocab)


__all__ = ["DraftTree", "EagleTreeSource", "empty_tree", "tree_source"]
