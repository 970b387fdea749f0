"""runtime/exit_costs.py: exit points are kept only where they pay for themselves; the loop decodes as
dense when none does, and says why."""

from __future__ import annotations

import pytest
import torch
from test_inductor import BASE, PROMPTS, L, RecentTokens, llama, random_program

from specee_compile.backends.eager import EagerSegments
from specee_compile.config import Settings
from specee_compile.runtime.decoder import Decoder
from specee_compile.runtime.exit_costs import StepCosts, path_rates, select_exit_points

US = 1e-6


def test_no_measurement_or_no_rates_keeps_every_point():
    assert select_exit_points([1, 2, 3], 8, None, {1: 0.5}) == ([1, 2, 3], {})
    costs = StepCosts(layer_s=100 * US, fixed_s=0, decision_s=5 * US)
    assert select_exit_points([1, 2, 3], 8, costs, {}) == ([1, 2, 3], {})


def test_points_that_save_less_than_they_cost_are_dropped():
    costs = StepCosts(layer_s=100 * US, fixed_s=50 * US, decision_s=10 * US)
    # layer 2 exits 30%: saves 0.3 * 5 * 100 = 150 us; layer 6 exits 5%: saves 0.05 * 1 * 100 = 5 us < 10 us
    kept, dropped = select_exit_points([2, 6], 8, costs, {2: 0.3, 6: 0.05})
    assert kept == [2] and list(dropped) == [6] and "costs 10.0 us" in dropped[6]
    # evaluated on 10% of tokens only, layer 6 costs 1 us and pays
    kept, _ = select_exit_points([2, 6], 8, costs, {2: 0.3, 6: 0.05}, evals={2: 1.0, 6: 0.1})
    assert kept == [2, 6]


def test_each_point_pays_its_share_of_the_gating():
    """A point's gating (the layers after it run as one more conditional body) is its cost on every token still
    alive there, beside its decisions: a point that saves more than its decisions but less than both is dropped. The kept points'
    gating is paid once: the final check weighs the net against the rest of the fixed cost (the draft)."""
    rates = {2: 0.3, 5: 0.04}  # layer 5 saves 0.04 * 2 * 100 = 8 us
    plain = StepCosts(layer_s=100 * US, fixed_s=100 * US, decision_s=5 * US)
    gated = StepCosts(layer_s=100 * US, fixed_s=100 * US, decision_s=5 * US, gate_s=20 * US)
    assert select_exit_points([2, 5], 8, plain, rates)[0] == [2, 5]
    kept, dropped = select_exit_points([2, 5], 8, gated, rates)
    assert kept == [2] and "costs 19.0 us" in dropped[5]  # 5 us + 20 us x the 70% still alive past point 2
    # layer 2 nets 150 - 25 = 125 us; with its 20 us of gating added back, 145 us against a fixed cost of 140 us
    # (its gating and 120 us of draft): kept; against 150 us: dense
    assert select_exit_points([2], 8, StepCosts(layer_s=100 * US, fixed_s=140 * US, decision_s=5 * US,
                                                 gate_s=20 * US), rates)[0] == [2]
    assert select_exit_points([2], 8, StepCosts(layer_s=100 * US, fixed_s=150 * US, decision_s=5 * US,
                                                gate_s=20 * US), rates)[0] == []
    # remeasured for the kept point alone (its gate_s changes with the count): the gating added back is the one
    # the net was charged (20 us: 145 us), weighed against the new fixed cost
    again = StepCosts(layer_s=100 * US, fixed_s=144 * US, decision_s=5 * US, gate_s=2 * US)
    wide = StepCosts(layer_s=100 * US, fixed_s=300 * US, decision_s=5 * US, gate_s=20 * US)
    assert select_exit_points([2, 5], 8, wide, rates, remeasure=lambda kept: again)[0] == [2]


def test_a_point_pays_gating_only_for_the_tokens_still_alive_there():
    """The stretches' IF nodes nest (backends/cuda_step.py), so a token that exited at an earlier kept point never
    evaluates a later point's node: point 5 pays its 20 us of gating on the 40% of tokens that did not leave at
    point 2, and then saves more than it costs; had point 2 been dropped, every token would pay it."""
    costs = StepCosts(layer_s=100 * US, fixed_s=100 * US, decision_s=5 * US, gate_s=20 * US)
    rates = {2: 0.6, 5: 0.07}  # layer 5 saves 0.07 * 2 * 100 = 14 us; costs 5 + 0.4 * 20 = 13 us
    assert select_exit_points([2, 5], 8, costs, rates)[0] == [2, 5]
    kept, dropped = select_exit_points([2, 5], 8, costs, {2: 0.0, 5: 0.07})
    assert kept == [] and "costs 25.0 us" in dropped[5]


def test_fixed_cost_above_all_savings_means_dense():
    costs = StepCosts(layer_s=30 * US, fixed_s=400 * US, decision_s=4 * US)
    kept, dropped = select_exit_points([5, 6], 8, costs, {5: 0.2, 6: 0.3})
    assert kept == [] and set(dropped) == {5, 6}
    assert "decoding as dense" in dropped[5]


class CostlyExits(EagerSegments):
    """Eager segments that report a measured exit program far dearer than any saving."""

    def can_run(self, plan):
        return False

    def prepare(self, plan, max_pos):
        pass

    def run_step(self, plan):  # pragma: no cover - can_run is False
        raise AssertionError

    def step_costs(self, plan):
        return StepCosts(layer_s=10 * US, fixed_s=1.0, decision_s=1 * US, source="test")


class CheapExits(CostlyExits):
    """The same, reporting an exit program that costs nothing (the outcome must not hang on this
    machine's timings)."""

    def step_costs(self, plan):
        return StepCosts(layer_s=10 * US, fixed_s=0.0, decision_s=0.0, source="test")


def test_loop_decodes_as_dense_when_no_point_pays():
    model = llama(seed=3)
    prog = random_program(seed=1)
    prog.exit_rates = {i: 0.2 for i in range(L - 1)}
    s = Settings(**BASE, specee=True, use_schedule=False, threshold=0.3)
    dense = Decoder(EagerSegments(model, Settings(**BASE)), Settings(**BASE)).generate(PROMPTS[0])
    res = Decoder(CostlyExits(model, s, prog), s, program=prog, draft=RecentTokens()).generate(PROMPTS[0])
    assert res.token_ids == dense.token_ids
    assert set(res.exit_layers) == {L - 1} and res.predictor_calls == 0
    st = res.stats()
    assert st["exit_points_kept"] == [] and len(st["exit_points_dropped"]) == L - 1
    assert st["exit_program"]["step_costs"]["source"] == "test"
    # the same program where exits are cheap keeps its points and exits
    cheap = Decoder(CheapExits(model, s, prog), s, program=prog, draft=RecentTokens()).generate(PROMPTS[0])
    assert any(e < L - 1 for e in cheap.exit_layers) and torch.is_tensor(prog.predictors.w1)


def test_backfill_rows_and_lossless_rollbacks_are_costs():
    """A point that pays in approximate / skip mode stops paying when its skipped layers come back as
    extra rows (backfill) or its misses cost rollbacks of whole steps (lossless)."""
    costs = StepCosts(layer_s=100 * US, fixed_s=10 * US, decision_s=5 * US, step_s=3300 * US)
    rates = {4: 0.2}
    assert select_exit_points([4], 32, costs, rates)[0] == [4]  # saves 0.2 * 27 * 100 = 540 us
    rows = StepCosts(layer_s=100 * US, fixed_s=10 * US, decision_s=5 * US, row_s=99.5 * US, step_s=3300 * US)
    kept, dropped = select_exit_points([4], 32, rows, rates)  # the row costs almost what the layer saved
    assert kept == [] and "saves 2.7 us/token" in dropped[4]
    kept, dropped = select_exit_points([4], 32, costs, rates, miss=0.5)  # 0.2 * 0.5 * 3300 / 0.8 = 412 us
    assert kept == [4]
    kept, dropped = select_exit_points([4], 32, costs, rates, miss=0.8)  # 660 us of rollbacks > 540 saved
    assert kept == [] and "costs 665.0 us/token" in dropped[4]


def test_a_tree_path_leaves_where_every_token_on_it_has():
    rates = {10: 0.25, 20: 0.25, 30: 0.25}  # a quarter of the tokens never exit
    assert path_rates(rates, 1.0) == pytest.approx(rates)
    two = path_rates(rates, 2.0)  # out by l: 0.25, 0.5, 0.75 -> squared 0.0625, 0.25, 0.5625
    assert two == pytest.approx({10: 0.0625, 20: 0.1875, 30: 0.3125})
    assert sum(two.values()) == pytest.approx(0.75**2)  # the path leaves at all only where every token does
    deep = path_rates(rates, 3.5)
    assert deep[10] < two[10] and deep[30] / sum(deep.values()) > two[30] / sum(two.values())  # later, rarer
