"""Prompt-lookup candidates: no weights, pure Python.

For n = 3, 2, 1: find earlier occurrences of the sequence's last n tokens and propose the tokens that
followed them (more frequent first, ties by most recent). Longer matches rank first. The rest is
filled with the context's most frequent tokens, then a fixed fallback list (e.g. the draft's frequent
vocabulary). Index updates are O(1) per token; truncate pops exactly what the removed tokens added.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .base import CandidateSource, as_token_list, check_truncate, fill_unique


class NgramDraft(CandidateSource):
    def __init__(self, k: int = 4, max_n: int = 3, fallback_ids=None, min_n: int = 1):
        self.k = int(k)
        self.max_n = int(max_n)
        self.min_n = int(min_n)
        self.fallback = as_token_list(fallback_ids) if fallback_ids is not None else []
        if len(self.fallback) < self.k:  # always able to return k distinct ids
            extra = [t for t in range(self.k + len(self.fallback)) if t not in set(self.fallback)]
            self.fallback = self.fallback + extra[: self.k]
        self.ids: list[int] = []
        self._index: dict[tuple, list[int]] = defaultdict(list)  # n-gram -> positions of following tokens
        self._counts: dict[int, int] = defaultdict(int)
        self._proposal: torch.Tensor | None = None

    # index: when token at position j is appended, for each n the n-gram ending at j-1 gains follower j
    def _add(self, j: int) -> None:
        ids = self.ids
        self._counts[ids[j]] += 1
        for n in range(self.min_n, self.max_n + 1):
            if j - n < 0:
                break
            self._index[tuple(ids[j - n : j])].append(j)

    def _remove(self, j: int) -> None:
        ids = self.ids
        c = self._counts[ids[j]] - 1
        if c:
            self._counts[ids[j]] = c
        else:
            del self._counts[ids[j]]
        for n in range(self.min_n, self.max_n + 1):
            if j - n < 0:
                break
            key = tuple(ids[j - n : j])
            lst = self._index[key]
            lst.pop()  # j is the latest follower of key
            if not lst:
                del self._index[key]

    def reset(self, prompt_ids, prompt_hidden=None) -> None:
        self.ids = as_token_list(prompt_ids)
        self._index = defaultdict(list)
        self._counts = defaultdict(int)
        for j in range(len(self.ids)):
            self._add(j)
        self._proposal = None

    def candidates(self) -> list[int]:
        ids = self.ids
        L = len(ids)
        out: list[int] = []
        seen: set[int] = set()
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            followers = self._index.get(tuple(ids[L - n :]))
            if not followers:
                continue
            score: dict[int, tuple[int, int]] = {}
            for j in followers:
                t = ids[j]
                c, _ = score.get(t, (0, 0))
                score[t] = (c + 1, j)  # followers ascend, so j ends as the most recent
            ranked = sorted(score, key=lambda t: score[t], reverse=True)
            fill_unique(out, seen, ranked, self.k)
            if len(out) >= self.k:
                return out
        if len(out) < self.k and self._counts:
            freq = sorted(self._counts.items(), key=lambda kv: kv[1], reverse=True)[: 2 * self.k]
            fill_unique(out, seen, (t for t, _ in freq), self.k)
        fill_unique(out, seen, self.fallback, self.k)
        return out

    def propose(self) -> torch.Tensor:
        if self._proposal is None:
            self._proposal = torch.tensor(self.candidates(), dtype=torch.long)
        return self._proposal

    def observe(self, token: int, hidden=None, layer: int = -1) -> None:
        self.ids.append(int(token))
        self._add(len(self.ids) - 1)
        self._proposal = None

    def truncate(self, length: int) -> None:
        check_truncate(length, len(self.ids))
        for j in range(len(self.ids) - 1, length - 1, -1):
            self._remove(j)
        del self.ids[length:]
        self._proposal = None


__all__ = ["NgramDraft"]
