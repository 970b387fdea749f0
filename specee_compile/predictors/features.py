"""The exit-predictor features: what a predictor at layer l reads (SPECEE.md, "Per decode step" 3).

At an evaluated layer l, with S the k speculative candidate tokens of this step:

    hn    = final_norm(h_l)                      # [..., D]   the model's own final RMSNorm
    z     = hn @ lm_head.weight[S]^T             # [..., k]   k logits instead of V
    p     = softmax(z)                           # [..., k]   over the k candidates only
    delta = p - p_prev                           # [..., k]   p_prev from the previous *evaluated*
                                                 #            layer; zeros at the first (delta = p)
    x     = cat[z, p, delta]                     # [..., 3k]

Everything is computed in float32 whatever the model dtype, so training (float32 dense run) and
inference (any dtype) see the same numbers up to the hidden state's own rounding.

This module is the single definition of that math: the `specee::exit_score` op's eager reference
calls `exit_features`, and data collection (`collect.py`) calls it too, so labels and inference
cannot drift apart (the paper's code normed the hidden state in one place and not the other).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm in float32: `weight * h / sqrt(mean(h^2) + eps)`. h [..., D] -> [..., D]."""
    h32 = h.float()
    variance = h32.pow(2).mean(-1, keepdim=True)
    return weight.float() * (h32 * torch.rsqrt(variance + eps))


def exit_features(hn: Tensor, rows: Tensor, p_prev: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Features of one exit point.

    hn:     [..., D]     the *normed* hidden state (final_norm(h_l)).
    rows:   [..., k, D]  LM-head rows of the k candidate tokens (lm_head.weight[S]); leading dims
                         broadcast against hn's, so one [k, D] slice serves a whole batch of layers.
    p_prev: [..., k]     p of the previous evaluated layer; None or zeros at the first evaluated
                         layer (then delta = p).
    Returns x [..., 3k] = cat[z, p, p - p_prev], z [..., k], p [..., k], all float32.
    """
    hn32 = hn.float()
    rows32 = rows.float()
    # z: [..., k] = sum_d hn[..., d] * rows[..., k, d]
    z = torch.matmul(rows32, hn32.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(z, dim=-1)
    delta = p if p_prev is None else p - p_prev.float()
    x = torch.cat([z, p, delta], dim=-1)
    return x, z, p


def features_from_zp(z: Tensor, p: Tensor, evaluated_layers=None) -> Tensor:
    """Assemble x from stored per-layer z, p with delta against the previous *evaluated* layer.

    z, p: [N, Lp, k] for predictor layers 0..Lp-1 (every layer evaluated during collection).
    evaluated_layers: None = every layer (delta against the adjacent layer, layer 0 gets delta = p);
        otherwise the ascending layers that run a predictor: each gets delta against the previous
        listed layer (the first listed gets delta = p). Rows of layers not listed are left as the
        adjacent-delta features (callers index only the listed layers).
    Returns x [N, Lp, 3k] float32.
    """
    z = z.float()
    p = p.float()
    p_prev = torch.zeros_like(p)
    if evaluated_layers is None:
        p_prev[:, 1:] = p[:, :-1]
    else:
        layers = sorted(int(layer) for layer in evaluated_layers)
        p_prev[:, 1:] = p[:, :-1]
        previous = None
        for layer in layers:
            p_prev[:, layer] = 0.0 if previous is None else p[:, previous]
            previous = layer
    return torch.cat([z, p, p - p_prev], dim=-1)


__all__ = ["rms_norm", "exit_features", "features_from_zp"]
