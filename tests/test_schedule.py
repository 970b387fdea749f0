"""Two-level scheduling: the offline layer rule and the online window."""

from __future__ import annotations

import pytest
import torch

from specee_compile.config import Settings
from specee_compile.predictors.collect import FeatureDataset
from specee_compile.predictors.mlp import PredictorBank
from specee_compile.predictors.schedule import OnlineScheduler, offline_layers, simulate_exits


# ---------------------------------------------------------------------------------------------
# offline
# ---------------------------------------------------------------------------------------------
def test_offline_fewest_layers_covering_the_share():
    counts = [0, 5, 40, 10, 30, 15]  # total 100
    assert offline_layers(counts, 0.4, 8) == [2]  # 40 covers 40%
    assert offline_layers(counts, 0.5, 8) == [2, 4]  # 40 + 30
    assert offline_layers(counts, 0.7, 8) == [2, 4]  # exactly 70%
    assert offline_layers(counts, 0.71, 8) == [2, 4, 5]
    assert offline_layers(counts, 1.0, 8) == [1, 2, 3, 4, 5]  # every layer with an exit, never layer 0


def test_offline_max_layers_caps_the_set():
    counts = [10, 10, 10, 10, 10]
    assert offline_layers(counts, 1.0, 2) == [0, 1]
    assert offline_layers(counts, 1.0, 0) == []


def test_offline_tie_break_prefers_shallower_layer():
    counts = [0, 20, 0, 20, 20, 10]
    assert offline_layers(counts, 0.2, 8) == [1]
    assert offline_layers(counts, 0.3, 8) == [1, 3]
    # ranking does not depend on list order tricks: same counts, deterministic output
    assert offline_layers(counts, 0.3, 8) == offline_layers(list(counts), 0.3, 8)


def test_offline_skip_cases():
    assert offline_layers([0, 0, 0], 0.6, 8) == []
    assert offline_layers([], 0.6, 8) == []
    assert offline_layers([3, 4], 0.0, 8) == []
    with pytest.raises(ValueError):
        offline_layers([1, 2], 1.5, 8)
    with pytest.raises(ValueError):
        offline_layers([1, -2], 0.5, 8)


# ---------------------------------------------------------------------------------------------
# online
# ---------------------------------------------------------------------------------------------
def test_empty_history_gives_offline_only():
    s = OnlineScheduler(offline=[10, 14], window=5, offsets=(-2, 0, 2))
    assert s.active(29) == {10, 14}
    assert OnlineScheduler().active(29) == set()


def test_online_offsets_around_recent_exits():
    s = OnlineScheduler(offline=[20], window=5, offsets=(-2, 0, 2))
    s.record_exit(10)
    assert s.active(29) == {8, 10, 12, 20}
    s.record_exit(15)
    assert s.active(29) == {8, 10, 12, 13, 15, 17, 20}


def test_online_window_forgets_old_exits():
    s = OnlineScheduler(offline=[], window=3, offsets=(0,))
    for layer in (1, 2, 3, 4):
        s.record_exit(layer)
    assert s.history == [2, 3, 4]
    assert s.active(29) == {2, 3, 4}
    s.reset()
    assert s.history == [] and s.active(29) == set()


def test_online_clips_to_range_and_trained_layers():
    s = OnlineScheduler(offline=[0], window=5, offsets=(-2, 0, 2), valid_layers=[0, 1, 2, 3, 5])
    s.record_exit(1)  # -> -1, 1, 3
    s.record_exit(5)  # -> 3, 5, 7
    assert s.active(6) == {0, 1, 3, 5}
    assert s.active(4) == {0, 1, 3}
    s2 = OnlineScheduler(offline=[], window=5, offsets=(-2, 0, 2))
    s2.record_exit(28)
    assert s2.active(29) == {26, 28}


def test_window_zero_disables_online():
    s = OnlineScheduler(offline=[4], window=0)
    s.record_exit(7)
    assert s.active(29) == {4}


def test_from_settings():
    settings = Settings(online_window=2, online_offsets=(-1, 1))
    s = OnlineScheduler.from_settings(settings, offline=[3])
    s.record_exit(10)
    s.record_exit(12)
    s.record_exit(20)
    assert s.active(29) == {3, 11, 13, 19, 21}


# ---------------------------------------------------------------------------------------------
# simulation
# ---------------------------------------------------------------------------------------------
def _dataset(N=40, Lp=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, Lp, k, generator=g)
    return FeatureDataset(
        z=z, p=torch.softmax(z, -1), exit_token=torch.zeros(N, Lp, dtype=torch.long),
        dense=torch.zeros(N, dtype=torch.long), cands=torch.zeros(N, k, dtype=torch.long),
        label_match=torch.ones(N, Lp, dtype=torch.bool), exit_in_cands=torch.ones(N, Lp, dtype=torch.bool),
        cand_match=torch.ones(N, Lp, dtype=torch.bool), in_cands=torch.ones(N, dtype=torch.bool),
        settled=torch.zeros(N, dtype=torch.long), text_index=torch.arange(N) // 10,
        position=torch.arange(N) % 10,
    )


def _bank_firing_at(Lp, fire_layers, k=4):
    """Predictors that always fire at fire_layers and never elsewhere."""
    bank = PredictorBank.init(Lp, k=k, hidden=4)
    bank.W1.zero_()
    bank.W2.zero_()
    bank.b2.fill_(-20.0)
    bank.b2[list(fire_layers)] = 20.0
    return bank


def test_simulate_all_active_exits_at_first_firing_layer():
    ds = _dataset()
    sim = simulate_exits(ds, _bank_firing_at(6, [3, 5]), 0.5)
    assert sim["exit_counts"] == [0, 0, 0, 40, 0, 0]
    assert sim["mean_layers"] == 4.0 and sim["token_accuracy"] == 1.0
    assert sim["predictor_calls"] == 4.0


def test_simulate_gate_blocks_exit_and_wrong_exits_count():
    ds = _dataset()
    ds.exit_in_cands[:20, 3] = False  # verification fails at layer 3 for half -> they go on to 5
    ds.label_match[20:, 3] = False  # the other half exits at 3 with a wrong token
    sim = simulate_exits(ds, _bank_firing_at(6, [3, 5]), 0.5)
    assert sim["exit_counts"][3] == 20 and sim["exit_counts"][5] == 20
    assert sim["token_accuracy"] == 0.5


def test_simulate_with_scheduler_only_evaluates_active_layers():
    ds = _dataset()
    sched = OnlineScheduler(offline=[1], window=5, offsets=(0,))
    sim = simulate_exits(ds, _bank_firing_at(6, [3]), 0.5, scheduler=sched)
    assert sim["full_depth"] == 40  # layer 3 never active: offline {1}, no exits to learn from
    sched = OnlineScheduler(offline=[3], window=5, offsets=(-2, 0, 2))
    sim = simulate_exits(ds, _bank_firing_at(6, [1, 3]), 0.5, scheduler=sched)
    # first token of each item: only {3} active -> exit 3; then {1, 3, 5} -> exit at 1, and so on
    assert sim["exit_counts"][3] == 4 and sim["exit_counts"][1] == 36
