"""Candidate sources: where SpecEE's speculative token set S comes from.

``make_candidate_source(kind, model, artifacts, k)`` builds one of:

* ``eagle``   EAGLE-1 draft head (trained by ``train.train_draft``), the paper's source.
* ``ngram``   prompt lookup over the sequence so far; no weights.
* ``shallow`` LM head (restricted vocabulary) on the latest exit-layer hidden state; no training.

``artifacts`` (a dict, all keys optional except where said):

* ``draft``: an ``EagleDraft`` instance, or
* ``draft_path``: directory with draft.safetensors + draft_config.json (or the .safetensors file; with
  ``manifest_checked`` True the caller has just verified the directory's manifest, so the loader does not hash
  the draft again), or
* ``draft_state_dict`` (+ ``draft_config``): tensors as written by ``EagleDraft.save``, or
* ``eagle_checkpoint``: a public EAGLE-1 head (.safetensors / tensors-only pytorch_model.bin / dir).
  One of these is required for ``eagle``.
* ``context_vocab`` (bool, default True): EagleSource option (see its doc).
* ``ngram_assist`` (bool, default False): wrap the source in ``NgramAssist`` (see its doc).
* ``vocab_ids``: frequent-token vocabulary (most frequent first). Defaults to the draft's when a draft
  is given. ``shallow`` restricts its head to it (full vocabulary when absent); ``ngram`` uses it as
  the fallback fill.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArtifactError, SpecEEError
from .base import CandidateSource
from .eagle import EagleDraft, EagleSource, load_eagle_checkpoint, load_eagle_state_dict
from .ngram import NgramAssist, NgramDraft
from .shallow import ShallowDraft

KINDS = ("eagle", "ngram", "shallow")


def load_draft_from_artifacts(model, artifacts: dict[str, Any] | None) -> EagleDraft | None:
    """The EagleDraft named by ``artifacts`` (see module doc), or None when it names none."""
    a = artifacts or {}
    if a.get("draft") is not None:
        return a["draft"]
    if a.get("draft_state_dict") is not None:
        return EagleDraft.from_state_dict(model, a["draft_state_dict"], a.get("draft_config"))
    if a.get("draft_path") is not None:
        return EagleDraft.load(a["draft_path"], model, manifest_checked=bool(a.get("manifest_checked")))
    if a.get("eagle_checkpoint") is not None:
        return load_eagle_checkpoint(a["eagle_checkpoint"], model, a.get("vocab_ids"))
    return None


def make_candidate_source(
    kind: str, model, artifacts: dict[str, Any] | None = None, k: int = 4
) -> CandidateSource:
    if kind not in KINDS:
        raise SpecEEError(f"draft source {kind!r} is not one of {', '.join(KINDS)}")
    if k < 1:
        raise SpecEEError(f"number of candidates must be >= 1, got {k}")
    a = artifacts or {}
    draft = load_draft_from_artifacts(model, a) if kind == "eagle" or "vocab_ids" not in a else None
    vocab_ids = a.get("vocab_ids")
    if vocab_ids is None and draft is not None:
        vocab_ids = draft.vocab_ids
    if kind == "eagle":
        if draft is None:
            raise ArtifactError(
                "draft source 'eagle' needs a trained draft head, but the artifacts hold none; "
                "run `specee-compile train-draft MODEL`, or use --draft ngram / --draft shallow"
            )
        src: CandidateSource = EagleSource(draft, k=k, context_vocab=bool(a.get("context_vocab", True)))
    elif kind == "ngram":
        return NgramDraft(k=k, fallback_ids=vocab_ids[: 4 * k] if vocab_ids is not None else None)
    else:
        src = ShallowDraft(model, k=k, vocab_ids=vocab_ids)
    return NgramAssist(src) if a.get("ngram_assist") else src


__all__ = [
    "KINDS",
    "CandidateSource",
    "EagleDraft",
    "EagleSource",
    "NgramAssist",
    "NgramDraft",
    "ShallowDraft",
    "load_draft_from_artifacts",
    "load_eagle_checkpoint",
    "load_eagle_state_dict",
    "make_candidate_source",
]
