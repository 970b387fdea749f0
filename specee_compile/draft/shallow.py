"""Cheap baseline: candidates straight from the latest observed hidden state.

The newest feature f (final_norm of the exit layer's hidden, as passed to ``observe``, or the prompt's
last row right after ``reset``) goes through the LM head restricted to a frequent-token vocabulary;
the top-k are the candidates. After an ``observe`` the newest feature is the one that *emitted* the last
token, so that token (its own top-1, almost always) is dropped and the runners-up are proposed.
No training, one [V_r x d] mat-vec per step.
"""

from __future__ import annotations

import torch

from .base import CandidateSource, as_token_list, base_parts, check_truncate, fill_unique


class ShallowDraft(CandidateSource):
    def __init__(self, model, k: int = 4, vocab_ids: torch.Tensor | None = None):
        _cfg, _embed, head_w, _norm = base_parts(model)
        self.k = int(k)
        if vocab_ids is None:
            self.vocab_ids = torch.arange(head_w.shape[0], device=head_w.device)
            self.head_rows = head_w.detach()
        else:
            self.vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).reshape(-1).to(head_w.device)
            self.head_rows = head_w.detach()[self.vocab_ids].clone()
        self.ids: list[int] = []
        self._feats: list[torch.Tensor] = []  # f_0 .. (at most len(ids) entries)
        self._proposal: torch.Tensor | None = None

    def reset(self, prompt_ids, prompt_hidden: torch.Tensor) -> None:
        self.ids = as_token_list(prompt_ids)
        hid = prompt_hidden.reshape(len(self.ids), -1)
        # only the newest feature is ever read; keep the last two for truncate(len) after reset
        self._feats = [None] * max(0, len(self.ids) - 2) + [h for h in hid[-2:]]
        self._proposal = None

    @torch.inference_mode()
    def propose(self) -> torch.Tensor:
        if self._proposal is not None:
            return self._proposal
        n = len(self.ids)
        have = len(self._feats)  # features known for positions < have (have == n or n - 1)
        f = self._feats[have - 1] if have else None
        if f is None:
            self._proposal = self.vocab_ids[: self.k].clone()
            return self._proposal
        logits = self.head_rows @ f.to(self.head_rows.dtype)
        emitted = self.ids[have] if have < n else None  # token f already produced
        kk = min(self.k + 1, logits.shape[0])
        top = self.vocab_ids[torch.topk(logits, kk).indices].tolist()
        out: list[int] = []
        seen = {emitted} if emitted is not None else set()
        fill_unique(out, seen, top, self.k)
        if len(out) < self.k:
            fill_unique(out, seen, self.vocab_ids.tolist(), self.k)
        self._proposal = torch.tensor(out, dtype=torch.long, device=self.vocab_ids.device)
        return self._proposal

    def observe(self, token: int, hidden: torch.Tensor, layer: int) -> None:
        p = len(self.ids) - 1
        del self._feats[p:]
        self._feats.extend([None] * (p - len(self._feats)))
        self._feats.append(hidden.reshape(-1))
        self.ids.append(int(token))
        self._proposal = None

    def truncate(self, length: int) -> None:
        check_truncate(length, len(self.ids))
        del self.ids[length:]
        del self._feats[length:]
        self._proposal = None


__all__ = ["ShallowDraft"]
