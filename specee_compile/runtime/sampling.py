"""Next-token selection: greedy, or temperature + top-p with a seeded generator."""

from __future__ import annotations

import torch


def select_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    # logits [V]
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p.cpu() / sorted_p.sum().cpu(), 1, generator=gen)
        return int(idx[choice.to(idx.device)])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
