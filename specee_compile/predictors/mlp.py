"""All exit predictors of one model, stored stacked.

The paper's predictor is one small MLP per layer: Linear(3k, H) -> ReLU -> Linear(H, 1) -> Sigmoid
(k = 4, H = 512: 7,169 parameters). Here the MLPs of all predictor slots live in four stacked tensors
so they train as one batched matmul and export as plain tensors (safetensors, never pickle):

    W1 [Lp, H, 3k]   b1 [Lp, H]   W2 [Lp, H]   b2 [Lp]   thresholds [Lp]

Slot i is the predictor that runs after decoder layer i (0-based); Lp = num_layers - 1 because after
the last layer the model is at full depth anyway. `layers` lists the slots that hold a trained
predictor (a slot with no positive training examples is left untrained and never fires).
`thresholds` are the per-layer cut-offs chosen for a target precision at fit time; the paper uses a
global 0.5 (Settings.threshold), so the runtime decides which one it applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ArtifactError

FORMAT_VERSION = 1
TENSOR_NAMES = ("W1", "b1", "W2", "b2", "thresholds", "layers")


@dataclass
class PredictorBank:
    W1: Tensor  # [Lp, H, 3k]
    b1: Tensor  # [Lp, H]
    W2: Tensor  # [Lp, H]
    b2: Tensor  # [Lp]
    layers: list[int]  # slots with a trained predictor, ascending
    thresholds: Tensor | None = None  # [Lp] per-layer thresholds; None = 0.5 everywhere
    meta: dict = field(default_factory=dict)  # free-form (training report, model id...), JSON-able

    def __post_init__(self) -> None:
        Lp, H, F = self.W1.shape
        if F % 3 != 0:
            raise ArtifactError(f"predictor input width must be 3k, found W1 of shape {tuple(self.W1.shape)}")
        expected = {"b1": (Lp, H), "W2": (Lp, H), "b2": (Lp,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ArtifactError(
                    f"predictor tensor {name} should have shape {shape} to match W1 {tuple(self.W1.shape)}, "
                    f"found {tuple(getattr(self, name).shape)}"
                )
        if self.thresholds is None:
            self.thresholds = torch.full((Lp,), 0.5)
        if tuple(self.thresholds.shape) != (Lp,):
            raise ArtifactError(f"thresholds should have shape ({Lp},), found {tuple(self.thresholds.shape)}")
        self.layers = sorted(int(layer) for layer in self.layers)
        if any(not 0 <= layer < Lp for layer in self.layers):
            raise ArtifactError(f"predictor layers {self.layers} fall outside the {Lp} slots")

    # ---- shape facts ----
    @property
    def num_slots(self) -> int:
        return self.W1.shape[0]

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model these predictors belong to (slots + the final layer)."""
        return self.num_slots + 1

    @property
    def hidden(self) -> int:
        return self.W1.shape[1]

    @property
    def k(self) -> int:
        return self.W1.shape[2] // 3

    @classmethod
    def init(cls, num_slots: int, k: int = 4, hidden: int = 512, *, seed: int = 0,
             layers=None) -> "PredictorBank":
        """Fresh predictors with nn.Linear's default init (uniform +-1/sqrt(fan_in))."""
        g = torch.Generator().manual_seed(seed)
        f_in = 3 * k

        def uniform(shape, fan_in):
            bound = 1.0 / fan_in**0.5
            return (torch.rand(shape, generator=g) * 2 - 1) * bound

        return cls(
            W1=uniform((num_slots, hidden, f_in), f_in),
            b1=uniform((num_slots, hidden), f_in),
            W2=uniform((num_slots, hidden), hidden),
            b2=uniform((num_slots,), hidden),
            layers=list(range(num_slots)) if layers is None else list(layers),
        )

    # ---- scoring ----
    def logit(self, layer: int, x: Tensor) -> Tensor:
        """Pre-sigmoid output of the predictor at `layer`. x [..., 3k] -> [...] float32."""
        h = torch.relu(x.float() @ self.W1[layer].T + self.b1[layer])  # [..., H]
        return h @ self.W2[layer] + self.b2[layer]

    def score(self, layer: int, x: Tensor) -> Tensor:
        """Exit probability at `layer`: sigmoid(W2 relu(W1 x + b1) + b2). x [..., 3k] -> [...].
        A slot without a trained predictor scores 0 (never exits)."""
        if layer not in self.layers:
            return torch.zeros(x.shape[:-1])
        return torch.sigmoid(self.logit(layer, x))

    def logits_all(self, x: Tensor, layers=None) -> Tensor:
        """Batched form. x [..., n, 3k] holds features for the slots `layers` (default: all Lp slots,
        n = Lp) -> logits [..., n]. One bmm over the slot dimension."""
        if layers is None:
            idx = torch.arange(self.num_slots)
        else:
            idx = torch.as_tensor(list(layers), dtype=torch.long)
        W1, b1, W2, b2 = self.W1[idx], self.b1[idx], self.W2[idx], self.b2[idx]
        lead = x.shape[:-2]
        xs = x.float().reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)  # [n, B, 3k]
        h = torch.relu(torch.baddbmm(b1.unsqueeze(1), xs, W1.transpose(1, 2)))  # [n, B, H]
        out = torch.bmm(h, W2.unsqueeze(-1)).squeeze(-1) + b2.unsqueeze(1)  # [n, B]
        return out.transpose(0, 1).reshape(*lead, len(idx))

    def score_all(self, x: Tensor, layers=None) -> Tensor:
        """Batched `score`: x [..., n, 3k] -> [..., n]; untrained slots score 0."""
        idx = list(range(self.num_slots)) if layers is None else [int(layer) for layer in layers]
        s = torch.sigmoid(self.logits_all(x, idx))
        trained = torch.tensor([layer in self.layers for layer in idx], dtype=torch.bool)
        return torch.where(trained, s, torch.zeros_like(s))

    def with_thresholds_folded(self) -> "PredictorBank":
        """A copy whose score crosses 0.5 exactly where this bank's crosses its per-layer threshold
        (b2 shifted by -logit(threshold)), for runtimes that apply one global threshold of 0.5."""
        t = self.thresholds.clamp(1e-6, 1 - 1e-6)
        shift = torch.log(t / (1 - t))
        return PredictorBank(
            self.W1.clone(), self.b1.clone(), self.W2.clone(), self.b2 - shift, list(self.layers),
            torch.full_like(self.thresholds, 0.5), dict(self.meta, thresholds_folded=True),
        )

    # ---- serialisation (plain tensors + a JSON-able config) ----
    def config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "num_slots": self.num_slots,
            "num_layers": self.num_layers,
            "hidden": self.hidden,
            "k": self.k,
            "layers": list(self.layers),
            "thresholds": [round(float(t), 6) for t in self.thresholds],
        }

    def to_state_dict(self) -> dict[str, Tensor]:
        return {
            "W1": self.W1.contiguous().float(),
            "b1": self.b1.contiguous().float(),
            "W2": self.W2.contiguous().float(),
            "b2": self.b2.contiguous().float(),
            "thresholds": self.thresholds.contiguous().float(),
            "layers": torch.tensor(self.layers, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], config: dict | None = None) -> "PredictorBank":
        missing = [name for name in TENSOR_NAMES if name not in state]
        if missing:
            raise ArtifactError(
                f"predictor weights lack tensors {missing} (found {sorted(state)}); re-run training "
                "(`specee-compile train-predictors`) or re-export the artifacts"
            )
        bank = cls(
            W1=state["W1"].float(), b1=state["b1"].float(), W2=state["W2"].float(), b2=state["b2"].float(),
            layers=[int(v) for v in state["layers"].tolist()], thresholds=state["thresholds"].float(),
        )
        if config is not None:
            for key in ("hidden", "k", "num_slots"):
                if key in config and int(config[key]) != getattr(bank, key):
                    raise ArtifactError(
                        f"predictor config says {key}={config[key]} but the weights have "
                        f"{key}={getattr(bank, key)}; the two files come from different trainings"
                    )
            if "layers" in config and [int(v) for v in config["layers"]] != bank.layers:
                raise ArtifactError(
                    f"predictor config lists layers {config['layers']} but the weights hold {bank.layers}"
                )
            bank.meta = {k: v for k, v in config.items() if k not in bank.config()}
        return bank

    def save(self, weights_path, config_path=None, extra_config: dict | None = None) -> dict:
        """Write `predictors.safetensors` (+ `predictors_config.json` when config_path is given).
        Returns the config dict written."""
        from ..artifacts import save_tensors

        save_tensors(self.to_state_dict(), weights_path, metadata={"format": "specee-predictors"})
        config = dict(self.config())
        config.update(extra_config or {})
        if config_path is not None:
            with open(config_path, "w") as f:
                json.dump(config, f, indent=1)
                f.write("\n")
        return config

    @classmethod
    def load(cls, weights_path, config_path=None) -> "PredictorBank":
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights_path))
        except FileNotFoundError:
            raise ArtifactError(f"predictor weights {weights_path} not found") from None
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ArtifactError(
                f"predictor weights {weights_path} could not be read ({exc}); re-train or re-export"
            ) from None
        config = None
        if config_path is not None:
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise ArtifactError(f"predictor config {config_path} not found") from None
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"predictor config {config_path} is not valid JSON ({exc})") from None
        return cls.from_state_dict(state, config)


__all__ = ["PredictorBank", "FORMAT_VERSION"]
