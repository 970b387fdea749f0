"""Which exit points pay for themselves on this device and model: the rule that SpecEE is never slower
than dense decoding.

Why: an exit point saves the layers after it, but only on the tokens that exit there, while the
machinery costs something on every token: the draft step, the gating of the layers after the first
exit point, and one predictor evaluation per active exit point. On a 7B model a layer is ~115 us and
exits pay; on SmolLM2-135M a layer is ~27 us and the same machinery can cost more than it saves
(benchmarks/RESULTS.md). So the backend measures its own step costs (`StepCosts`, at build time,
on the device) and this module keeps an exit point only where its expected saving exceeds its cost;
where the kept points together do not beat the fixed cost, none is kept and SpecEE decodes as dense.

Exit rates come from the artifacts' held-out simulation (`predictors_config.json`:
`validation_simulation`) or, for the benchmark's trace policy, from the trace itself. Without rates
nothing can be predicted: every point is kept (and the stats say why).

Inputs, per token:  layer_s   one decoder layer
                    fixed_s   running the exit program at all (draft, gating), no decision, no exit
                    decision_s one predictor evaluation at an active point
                    gate_s    one point's share of gating the layers (part of fixed_s: the whole step runs
                              the layers between two points as one conditional body, ~18-21 us a point on
                              the 7B, H200, benchmarks/GPU_NOTES.md session 21; 0 where not measured). The
                              bodies nest (each inside the previous one's), so a token that exited never
                              reaches a later point's node: a point's gating is paid by the tokens still
                              alive there, 1 - the exit rates of the kept points before it
                    check_s   the paper's full-head check when an exit is proposed (0 if none)
                    row_s     kv backfill: what one more row adds to a layer pass (the exited row is
                              pushed through the layers it skipped later, with another token's row)
                    step_s    a dense step (what a lossless rollback throws away)
                    miss      lossless: the share of exits whose token the dense model does not confirm
                              (1 - held-out exit precision); each costs a rollback of ~1 / (1 - exit
                              rate) steps (the exits in a row since the last full-depth step)
    point l saves   rate[l] * (L - 1 - l) * (layer_s - row_s)
    point l costs   alive[l] * gate_s + evals[l] * decision_s + rate[l] * check_s
                    + rate[l] * miss * step_s / (1 - total rate),   alive[l] = 1 - sum(rate[k], kept k < l)
keep l iff it saves more than it costs; keep none if the kept savings minus costs <= the rest of fixed_s
(measured again for the kept points: gating fewer points costs less).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCosts:
    layer_s: float
    fixed_s: float
    decision_s: float
    check_s: float = 0.0
    row_s: float = 0.0
    step_s: float = 0.0
    draft_s: float | None = None  # the draft step alone (part of fixed_s; reported, not used to decide)
    gate_s: float = 0.0  # one exit point's share of gating the layers (part of fixed_s)
    source: str = ""  # how they were measured

    def as_dict(self) -> dict:
        return {"layer_us": round(self.layer_s * 1e6, 2), "fixed_us": round(self.fixed_s * 1e6, 2),
                "decision_us": round(self.decision_s * 1e6, 2), "check_us": round(self.check_s * 1e6, 2),
                "row_us": round(self.row_s * 1e6, 2), "step_us": round(self.step_s * 1e6, 2),
                "draft_us": None if self.draft_s is None else round(self.draft_s * 1e6, 2),
                "gate_us": round(self.gate_s * 1e6, 2), "source": self.source}


def path_rates(rates: dict[int, float], tokens: float) -> dict[int, float]:
    """SpecEE on a tree (the merged mapping): a verify step's path leaves at the deepest exit of its ~`tokens`
    tokens. With each token exiting independently at layer l with rate[l], the path has left by layer l with
    probability (share of tokens out by l) ** tokens; its rate at l is the step of that between exit layers."""
    out, cdf, before = {}, 0.0, 0.0
    for layer in sorted(rates):
        cdf += float(rates[layer])
        now = min(1.0, cdf) ** max(1.0, float(tokens))
        out[layer] = now - before
        before = now
    return out


def select_exit_points(layers: list[int], num_layers: int, costs: StepCosts | None,
                       rates: dict[int, float] | None, evals: dict[int, float] | None = None,
                       remeasure=None, miss: float = 0.0, per: str = "token") -> tuple[list[int], dict[int, str]]:
    """(kept layers, {dropped layer: reason}). `evals[l]`: share of tokens on which point l is evaluated
    (scheduling), 1.0 where unknown. `remeasure(kept) -> StepCosts`: the fixed cost depends on how
    many points the program gates (one IF node each), so it is measured again for the points kept. `per`: what
    the rates and costs count ("token"; a tree's "verify step", whose rates are a path's: `path_rates`)."""
    if costs is None:
        return list(layers), {}
    if not rates:
        return list(layers), {}
    L = num_layers
    kept, dropped, net, gone = [], {}, 0.0, 0.0
    run = 1.0 / max(0.05, 1.0 - sum(float(rates.get(layer, 0.0)) for layer in layers))  # steps a rollback loses
    for layer in sorted(layers):
        r = float(rates.get(layer, 0.0))
        e = 1.0 if evals is None else float(evals.get(layer, 1.0))
        save = r * (L - 1 - layer) * max(0.0, costs.layer_s - costs.row_s)
        cost = (max(0.0, 1.0 - gone) * costs.gate_s + e * costs.decision_s + r * costs.check_s
                + r * miss * costs.step_s * run)
        if save > cost:
            kept.append(layer)
            net += save - cost
            gone += r
        else:
            dropped[layer] = (f"saves {save * 1e6:.1f} us/{per} (exit rate {r:.3f} x {L - 1 - layer} layers), "
                              f"costs {cost * 1e6:.1f} us/{per}")
    # (fixed_s holds every kept point's whole gating, timed with no token leaving; net paid only the alive share)
    gross = net + len(kept) * costs.gate_s
    if kept and remeasure is not None and len(kept) < len(layers):
        costs = remeasure(kept)
    if kept and gross <= costs.fixed_s:
        reason = (f"all kept points together save {gross * 1e6:.1f} us/{per}, less than the exit program's "
                  f"fixed cost {costs.fixed_s * 1e6:.1f} us/{per} (draft, gating): decoding as dense")
        dropped.update({layer: reason for layer in kept})
        kept = []
    return kept, dropped


__all__ = ["StepCosts", "path_rates", "select_exit_points"]
