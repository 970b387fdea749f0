"""Two-level scheduling: which layers run their predictor for a token (SPECEE.md, "Two-level scheduling").

Offline: exits are skewed across layers, so the layers that take most exits in a calibration run
(every predictor active) are always active. `offline_layers` computes that set from exit counts;
nothing is hard-coded per model.

Online: the exit layer of a token is usually near the exit layers of the last few tokens, so the
layers e + o (o in offsets, e in the last N exit layers) are active too. `OnlineScheduler` keeps
that window.

Choices:
- Only real exits enter the online window. A token that ran to full depth says nothing about where
  exits happen; recording it as L-1 would pull the window towards layers where no predictor exists.
  With an empty window (start of a sequence, or no exit yet) only the offline set is active.
- Offline ranking breaks ties by the shallower layer first: an exit there saves more layers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import torch

from .features import features_from_zp


def offline_layers(exit_counts: Sequence[int], coverage: float, max_layers: int) -> list[int]:
    """The fewest most-frequent exit layers that together cover `coverage` of all calibration exits,
    at most `max_layers` of them. exit_counts[l] = exits at layer l (with every predictor active).

    Ranking: count descending, ties -> shallower layer first. Layers with no exits are never picked.
    Returns the chosen layers ascending. coverage <= 0 or no exits at all -> [].
    """
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    if max_layers < 0:
        raise ValueError(f"max_layers must be >= 0, got {max_layers}")
    counts = [int(c) for c in exit_counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"exit counts must be non-negative, got {counts}")
    total = sum(counts)
    if total == 0 or coverage <= 0.0:
        return []
    with_exits = [layer for layer, c in enumerate(counts) if c > 0]
    ranked = sorted(with_exits, key=lambda layer: (-counts[layer], layer))
    chosen: list[int] = []
    covered = 0
    need = coverage * total - 1e-9 * total  # tolerate float rounding in coverage * total
    for layer in ranked:
        if covered >= need or len(chosen) >= max_layers:
            break
        chosen.append(layer)
        covered += counts[layer]
    return sorted(chosen)


class OnlineScheduler:
    """Active predictor layers for the next token: offline set U {e + o : e in last N exits, o in offsets},
    clipped to valid predictor layers.

    offline: the offline layer set (from `offline_layers`).
    window: N, how many recent exit layers to remember.
    offsets: o values added to each remembered exit layer (paper: -2, 0, +2).
    valid_layers: layers that hold a trained predictor; None = any layer in range.
    """

    def __init__(
        self,
        offline: Iterable[int] = (),
        window: int = 5,
        offsets: Sequence[int] = (-2, 0, 2),
        valid_layers: Iterable[int] | None = None,
    ) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.offline = frozenset(int(layer) for layer in offline)
        self.window = int(window)
        self.offsets = tuple(int(o) for o in offsets)
        self.valid_layers = None if valid_layers is None else frozenset(int(layer) for layer in valid_layers)
        self._history: deque[int] = deque(maxlen=self.window) if self.window > 0 else deque(maxlen=0)

    @classmethod
    def from_settings(cls, settings, offline: Iterable[int], valid_layers: Iterable[int] | None = None):
        return cls(offline, settings.online_window, settings.online_offsets, valid_layers)

    @property
    def history(self) -> list[int]:
        """The remembered exit layers, oldest first."""
        return list(self._history)

    def reset(self) -> None:
        """Forget the exit history (new sequence)."""
        self._history.clear()

    def record_exit(self, layer: int) -> None:
        """Remember a real exit at `layer`. Full-depth tokens are not recorded (see module doc)."""
        if self.window > 0:
            self._history.append(int(layer))

    def active(self, num_layers: int | None = None) -> set[int]:
        """Layers whose predictor runs for the next token. num_layers: predictor slots (model layers - 1);
        layers outside [0, num_layers) are dropped, and so are layers without a trained predictor."""
        layers = set(self.offline)
        for e in self._history:
            for o in self.offsets:
                layers.add(e + o)
        if num_layers is not None:
            layers = {layer for layer in layers if 0 <= layer < num_layers}
        else:
            layers = {layer for layer in layers if layer >= 0}
        if self.valid_layers is not None:
            layers &= self.valid_layers
        return layers


# ---------------------------------------------------------------------------------------------
# simulation on a collected dataset (teacher-forced positions, so errors do not compound)
# ---------------------------------------------------------------------------------------------
def _threshold_vector(bank, threshold) -> torch.Tensor:
    if threshold is None:
        return bank.thresholds.float()
    if isinstance(threshold, (int, float)):
        return torch.full((bank.num_slots,), float(threshold))
    return torch.as_tensor(threshold, dtype=torch.float32)


def simulate_exits(dataset, bank, threshold=0.5, *, mode: str = "approximate", scheduler=None,
                   min_exit_layer: int = 0) -> dict:
    """Replay the exit rule over every dataset position.

    At each active layer l (ascending) the predictor fires when score > threshold[l]; in approximate
    mode the exit also needs the full-head token T_l in S (the paper's verification), emits T_l and is
    right when T_l == dense; in lossless mode it emits S[argmax z_l] (right when cand_match). The first
    firing layer is the exit; no exit = full depth.

    threshold: float (global), a per-slot sequence, or None (the bank's per-slot thresholds).
    scheduler: None = every trained predictor active (the calibration run for `offline_layers`);
        an OnlineScheduler = replay positions in order within each item (reset per item), with
        delta against the previous *active* layer, exactly as scheduled inference computes it.
    Returns exit_counts [Lp] (exits per layer), full_depth, mean_layers (layers executed per token),
    token_accuracy (emitted == dense), exit_rate, predictor_calls (mean per token), and
    exit_by_layer (cumulative share of positions that exited at or before each layer).
    """
    if mode not in ("approximate", "lossless"):
        raise ValueError(f"mode must be approximate or lossless, got {mode!r}")
    N, Lp = len(dataset), dataset.num_slots
    if bank.num_slots != Lp:
        raise ValueError(f"predictors have {bank.num_slots} slots, the dataset {Lp}")
    thr = _threshold_vector(bank, threshold)
    if mode == "approximate":
        gate, correct = dataset.exit_in_cands, dataset.label_match
    else:
        gate, correct = torch.ones_like(dataset.cand_match), dataset.cand_match
    trained = torch.zeros(Lp, dtype=torch.bool)
    trained[list(bank.layers)] = True
    trained[:min_exit_layer] = False

    exit_layer = torch.full((N,), Lp, dtype=torch.long)  # Lp = the last layer (full depth)
    calls = torch.zeros(N)
    if scheduler is None:
        with torch.no_grad():
            score = torch.sigmoid(bank.logits_all(dataset.x()))  # [N, Lp]
        fires = (score > thr) & gate & trained
        any_fire = fires.any(1)
        first = fires.float().argmax(1)
        exit_layer = torch.where(any_fire, first, exit_layer)
        # predictors evaluated: trained layers up to and including the exit layer
        cum_trained = torch.cumsum(trained.long(), 0)
        calls = torch.where(any_fire, cum_trained[first.clamp_max(Lp - 1)], cum_trained[-1]).float()
    else:
        order = torch.argsort(dataset.text_index * (1 << 32) + dataset.position)
        last_text = None
        valid = set(bank.layers) - set(range(min_exit_layer))
        for i in order.tolist():
            ti = int(dataset.text_index[i])
            if ti != last_text:
                scheduler.reset()
                last_text = ti
            active = sorted(scheduler.active(Lp) & valid)
            if not active:
                continue
            x = features_from_zp(dataset.z[i : i + 1], dataset.p[i : i + 1], active)[0, active]  # [a, 3k]
            with torch.no_grad():
                s = torch.sigmoid(bank.logits_all(x.unsqueeze(0), active))[0]  # [a]
            n_calls = len(active)
            for j, layer in enumerate(active):
                if s[j] > thr[layer] and gate[i, layer]:
                    exit_layer[i] = layer
                    scheduler.record_exit(layer)
                    n_calls = j + 1
                    break
            calls[i] = n_calls
    exited = exit_layer < Lp
    safe = exit_layer.clamp_max(Lp - 1)
    right = torch.where(exited, correct[torch.arange(N), safe], torch.ones(N, dtype=torch.bool))
    counts = torch.bincount(exit_layer[exited], minlength=Lp)[:Lp]
    cumulative = torch.cumsum(counts, 0).float() / max(1, N)
    return {
        "positions": N,
        "exit_counts": [int(c) for c in counts],
        "full_depth": int((~exited).sum()),
        "exit_rate": round(exited.float().mean().item(), 4),
        "mean_exit_layer": round(exit_layer.float().mean().item(), 3),  # 0-based; full depth = Lp
        "mean_layers": round((exit_layer + 1).float().mean().item(), 3),
        "token_accuracy": round(right.float().mean().item(), 4),
        "exit_precision": round(right[exited].float().mean().item(), 4) if exited.any() else 1.0,
        "predictor_calls": round(calls.mean().item(), 3),
        "exit_by_layer": [round(float(v), 4) for v in cumulative],
    }


def exit_distribution_from_dataset(dataset, bank, threshold=0.5, *, mode: str = "approximate") -> list[int]:
    """Calibration exit counts per predictor slot with every trained predictor active (the input of
    `offline_layers`)."""
    return simulate_exits(dataset, bank, threshold, mode=mode)["exit_counts"]


__all__ = ["OnlineScheduler", "exit_distribution_from_dataset", "offline_layers", "simulate_exits"]
