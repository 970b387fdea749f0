"""The SpecEE program: what the passes produce and every backend consumes. Plain dataclasses.

A program is the model's segments (embed, layer 0..L-1, final norm + head) plus, for early exit,
the exit points (one predictor per layer that has one), the candidate source, the schedule
(offline layer set + online window rule) and the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExitPoint:
    layer: int  # 0-based: the exit is evaluated after this layer
    threshold: float


@dataclass
class Predictors:
    """Stacked predictor MLPs for all layers: layer l uses w1[l], b1[l], w2[l], b2[l]."""

    w1: torch.Tensor  # [L, Hm, 3k]
    b1: torch.Tensor  # [L, Hm]
    w2: torch.Tensor  # [L, Hm]
    b2: torch.Tensor  # [L, 1]
    layers: list[int]  # layers with a trained predictor

    def to(self, device) -> "Predictors":
        return Predictors(*(t.to(device) for t in (self.w1, self.b1, self.w2, self.b2)), list(self.layers))


@dataclass
class SpecEEProgram:
    num_layers: int
    exit_points: list[ExitPoint]
    predictors: Predictors
    offline_layers: list[int]
    num_candidates: int = 4
    draft_kind: str = "eagle"
    draft_state: dict = field(default_factory=dict)  # tensors of the draft head, if any
    draft_config: dict = field(default_factory=dict)
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    exit_rates: dict[int, float] = field(default_factory=dict)  # share of tokens exiting at each layer
    #   (held-out simulation of the artifacts; what runtime/exit_costs.py weighs against measured costs)
    eval_share: dict[int, float] = field(default_factory=dict)  # share of tokens evaluating each point
    exit_precision: float | None = None  # held-out share of exits whose token is the dense token

    def threshold(self, layer: int) -> float | None:
        for ep in self.exit_points:
            if ep.layer == layer:
                return ep.threshold
        return None

    @property
    def exit_layers(self) -> list[int]:
        return [ep.layer for ep in self.exit_points]
