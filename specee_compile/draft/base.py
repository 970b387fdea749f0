"""The candidate-source interface the runtime drives, plus small shared helpers.

Sequence bookkeeping (all sources follow it):

* ``reset(prompt_ids, prompt_hidden)``: the sequence is the prompt, x_0 .. x_{P-1}; ``prompt_hidden[t]``
  is f_t = final_norm(final-layer hidden) at position t (dense prefill).
* ``observe(token, hidden, layer)``: the step at the last position p = len(seq) - 1 emitted ``token``
  (x_{p+1}); ``hidden`` is f_p taken at the exit layer. f_p is recorded and x_{p+1} appended.
* ``propose()``: candidates for x_{len(seq)}, the token after the last one in the sequence.
* ``truncate(length)``: forget x_t and f_t for t >= length. f_{length-1} may be kept, but the runtime
  re-observes position length - 1 right away, which overwrites it.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class CandidateSource(abc.ABC):
    """Proposes ``k`` speculative candidate ids for the next token. Runtime calls, in order:
    reset, (propose, observe)*, with truncate + observe on rollbacks."""

    k: int

    @abc.abstractmethod
    def reset(self, prompt_ids: list[int], prompt_hidden: torch.Tensor) -> None:
        """New sequence. prompt_hidden [P, D] = final_norm(final-layer hidden) at each prompt position."""

    @abc.abstractmethod
    def propose(self) -> torch.Tensor:
        """LongTensor [k]: candidate ids for the NEXT token (the one after the last observed token)."""

    @abc.abstractmethod
    def observe(self, token: int, hidden: torch.Tensor, layer: int) -> None:
        """The step at the last position p emitted ``token`` (for position p+1); ``hidden`` [D] is
        final_norm(hidden) at the exit layer ``layer`` (0-based; L-1 = full depth)."""

    @abc.abstractmethod
    def truncate(self, length: int) -> None:
        """Lossless rollback: forget everything at sequence positions >= length."""

    # ---- conveniences shared by the sources ----
    def __len__(self) -> int:  # current sequence length
        return len(getattr(self, "ids", ()))


def as_token_list(ids: Any) -> list[int]:
    """Accept list / tuple / 1-D or [1, P] tensor of token ids."""
    if isinstance(ids, torch.Tensor):
        return [int(t) for t in ids.reshape(-1).tolist()]
    return [int(t) for t in ids]


def fill_unique(out: list[int], seen: set[int], ids, k: int) -> None:
    """Append ids not yet in ``seen`` to ``out`` until it holds k."""
    for t in ids:
        if len(out) >= k:
            return
        t = int(t)
        if t not in seen:
            seen.add(t)
            out.append(t)


def check_truncate(length: int, current: int) -> None:
    from ..errors import SpecEEError

    if length < 1 or length > current:
        raise SpecEEError(f"truncate(length={length}) needs 1 <= length <= current length {current}")


def unwrap_model(model):
    """Accept an HF causal LM or the package's LoadedModel (which has ``.model``)."""
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_output_embeddings"):
        return inner
    return model


def base_parts(model):
    """(config, embedding weight [V, D], lm_head weight [V, D], final norm module) of a Llama-family LM."""
    from ..errors import UnsupportedArchitecture

    hf = unwrap_model(model)
    cfg = hf.config
    head = hf.get_output_embeddings()
    embed = hf.get_input_embeddings()
    body = getattr(hf, "model", None)
    norm = getattr(body, "norm", None)
    if head is None or embed is None or norm is None:
        raise UnsupportedArchitecture(
            f"expected a Llama-family causal LM with embeddings, lm_head and model.norm; got {type(hf).__name__}"
        )
    return cfg, embed.weight, head.weight, norm
