"""Predictors: feature math, the stacked MLP bank, data collection on a tiny random Llama, fitting."""

from __future__ import annotations

import time

import pytest
import torch

from specee_compile.errors import ArtifactError
from specee_compile.predictors.collect import FeatureDataset, TokenizedItem, collect_features
from specee_compile.predictors.features import exit_features, features_from_zp, rms_norm
from specee_compile.predictors.fit import choose_threshold, fit_predictors
from specee_compile.predictors.mlp import PredictorBank
from specee_compile.predictors.schedule import offline_layers, simulate_exits


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def _features_f64(hn, rows, p_prev):
    z = (rows.double() @ hn.double().unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(z, -1)
    delta = p - (p_prev.double() if p_prev is not None else 0.0)
    return torch.cat([z, p, delta], -1), z, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exit_features_match_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    hn = torch.randn(3, 5, 64, generator=g).to(dtype)
    rows = (torch.randn(3, 5, 4, 64, generator=g) * 0.2).to(dtype)
    p_prev = torch.softmax(torch.randn(3, 5, 4, generator=g), -1)
    x, z, p = exit_features(hn, rows, p_prev)
    assert x.shape == (3, 5, 12) and z.shape == (3, 5, 4) and p.shape == (3, 5, 4)
    assert x.dtype == torch.float32
    x_ref, z_ref, p_ref = _features_f64(hn, rows, p_prev)
    torch.testing.assert_close(x.double(), x_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z.double(), z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.double(), p_ref, atol=1e-5, rtol=1e-5)


def test_exit_features_first_layer_delta_is_p_and_rows_broadcast():
    g = torch.Generator().manual_seed(1)
    hn = torch.randn(7, 32, generator=g)  # 7 layers' hidden states, one candidate slice
    rows = torch.randn(4, 32, generator=g)
    x, z, p = exit_features(hn, rows, None)
    torch.testing.assert_close(x[..., 8:], p)
    x0, _, _ = exit_features(hn, rows, torch.zeros(4))
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(z, hn @ rows.T)


def test_rms_norm_matches_llama_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    h = torch.randn(3, 16)
    torch.testing.assert_close(rms_norm(h, norm.weight, 1e-5), norm(h))


def test_features_from_zp_delta_against_previous_evaluated_layer():
    z = torch.randn(2, 6, 4)
    p = torch.softmax(z, -1)
    x = features_from_zp(z, p)
    torch.testing.assert_close(x[:, 0, 8:], p[:, 0])
    torch.testing.assert_close(x[:, 3, 8:], p[:, 3] - p[:, 2])
    xs = features_from_zp(z, p, [1, 4, 5])
    torch.testing.assert_close(xs[:, 1, 8:], p[:, 1])  # first evaluated: delta = p
    torch.testing.assert_close(xs[:, 4, 8:], p[:, 4] - p[:, 1])
    torch.testing.assert_close(xs[:, 5, 8:], p[:, 5] - p[:, 4])
    torch.testing.assert_close(xs[:, :, :8], x[:, :, :8])


# ---------------------------------------------------------------------------------------------
# PredictorBank
# ---------------------------------------------------------------------------------------------
def _reference_mlp(bank: PredictorBank, layer: int) -> torch.nn.Sequential:
    mlp = torch.nn.Sequential(torch.nn.Linear(3 * bank.k, bank.hidden), torch.nn.ReLU(),
                              torch.nn.Linear(bank.hidden, 1), torch.nn.Sigmoid())
    with torch.no_grad():
        mlp[0].weight.copy_(bank.W1[layer])
        mlp[0].bias.copy_(bank.b1[layer])
        mlp[2].weight.copy_(bank.W2[layer].unsqueeze(0))
        mlp[2].bias.copy_(bank.b2[layer : layer + 1])
    return mlp


def test_bank_score_matches_reference_mlp_and_batched_form():
    bank = PredictorBank.init(5, k=4, hidden=32, seed=3)
    x = torch.randn(10, 5, 12)
    all_scores = bank.score_all(x)
    assert all_scores.shape == (10, 5)
    for layer in range(5):
        ref = _reference_mlp(bank, layer)(x[:, layer]).squeeze(-1)
        torch.testing.assert_close(bank.score(layer, x[:, layer]), ref)
        torch.testing.assert_close(all_scores[:, layer], ref)
    torch.testing.assert_close(bank.score_all(x[:, [1, 3]], [1, 3]), all_scores[:, [1, 3]])


def test_bank_untrained_slot_never_fires():
    bank = PredictorBank.init(4, k=4, hidden=8, layers=[0, 2])
    x = torch.randn(3, 4, 12)
    assert (bank.score(1, x[:, 1]) == 0).all()
    assert (bank.score_all(x)[:, [1, 3]] == 0).all()


def test_bank_state_dict_round_trip(tmp_path):
    bank = PredictorBank.init(6, k=4, hidden=16, seed=5, layers=[1, 2, 4])
    bank.thresholds = torch.tensor([1.0, 0.6, 0.5, 1.0, 0.7, 1.0])
    config = bank.save(tmp_path / "predictors.safetensors", tmp_path / "predictors_config.json",
                       extra_config={"offline_layers": [2, 4]})
    assert config["layers"] == [1, 2, 4] and config["hidden"] == 16 and config["k"] == 4
    loaded = PredictorBank.load(tmp_path / "predictors.safetensors", tmp_path / "predictors_config.json")
    for name in ("W1", "b1", "W2", "b2", "thresholds"):
        torch.testing.assert_close(getattr(loaded, name), getattr(bank, name))
    assert loaded.layers == [1, 2, 4]
    assert loaded.meta["offline_layers"] == [2, 4]
    again = PredictorBank.from_state_dict(bank.to_state_dict())
    x = torch.randn(4, 6, 12)
    torch.testing.assert_close(again.score_all(x), bank.score_all(x))
    # the safetensors file holds plain tensors only
    raw = (tmp_path / "predictors.safetensors").read_bytes()
    assert b"pickle" not in raw[:200]


def test_bank_rejects_mismatched_config(tmp_path):
    bank = PredictorBank.init(3, k=4, hidden=8)
    with pytest.raises(ArtifactError, match="hidden"):
        PredictorBank.from_state_dict(bank.to_state_dict(), {"hidden": 16})
    with pytest.raises(ArtifactError, match="lack"):
        PredictorBank.from_state_dict({"W1": bank.W1})
    with pytest.raises(ArtifactError, match="not found"):
        PredictorBank.load(tmp_path / "missing.safetensors")


def test_folded_thresholds_move_the_decision_to_half():
    bank = PredictorBank.init(3, k=4, hidden=8, seed=2)
    bank.thresholds = torch.tensor([0.5, 0.8, 0.3])
    folded = bank.with_thresholds_folded()
    x = torch.randn(200, 3, 12) * 3
    torch.testing.assert_close(folded.score_all(x) > 0.5, bank.score_all(x) > bank.thresholds)


# ---------------------------------------------------------------------------------------------
# collection on a tiny random Llama
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    return model


def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TokenizedItem(torch.randint(0, 256, (5 + i % 3,), generator=g).tolist(),
                          torch.randint(0, 256, (12,), generator=g).tolist()) for i in range(n)]


def _cands_fn(outs, ids, k):
    # deterministic, model-independent candidates: the next k ids after the current token
    return (ids.unsqueeze(1) + torch.arange(k)) % 256


def test_collect_shapes_and_hand_computed_label(tiny_llama):
    items = _items(3)
    ds = collect_features(tiny_llama, None, items, _cands_fn, max_tokens=1000, k=4, progress=False)
    n_expected = sum(len(it.reply_ids) + 1 for it in items)  # last prompt position + reply positions
    L = 4
    assert len(ds) == n_expected
    assert ds.z.shape == (n_expected, L - 1, 4) and ds.p.shape == (n_expected, L - 1, 4)
    assert ds.x().shape == (n_expected, L - 1, 12)
    assert ds.label.shape == (n_expected, L - 1) and ds.label.dtype == torch.bool
    assert ds.settled.min() >= 0 and ds.settled.max() <= L - 1

    # hand computation for one position of item 1 via HF's own hidden states
    i = int((ds.text_index == 1).nonzero()[4])
    t, item = int(ds.position[i]), items[1]
    ids = torch.tensor(item.prompt_ids + item.reply_ids)
    with torch.no_grad():
        out = tiny_llama(ids.unsqueeze(0), output_hidden_states=True)
        dense = int(out.logits[0, t].argmax())
        assert int(ds.dense[i]) == dense
        cands = _cands_fn(None, ids, 4)[t]
        assert ds.cands[i].tolist() == cands.tolist()
        layer_tokens = []
        for layer in range(L - 1):
            h = out.hidden_states[layer + 1][0, t]  # output of decoder layer `layer`
            hn = tiny_llama.model.norm(h)
            logits = tiny_llama.lm_head(hn)
            token = int(logits.argmax())
            layer_tokens.append(token)
            assert int(ds.exit_token[i, layer]) == token
            assert bool(ds.label_match[i, layer]) == (token == dense)
            assert bool(ds.exit_in_cands[i, layer]) == (token in cands.tolist())
            z = hn @ tiny_llama.lm_head.weight[cands].T
            torch.testing.assert_close(ds.z[i, layer], z, atol=1e-5, rtol=1e-5)
            assert bool(ds.cand_match[i, layer]) == (int(cands[z.argmax()]) == dense)
        assert bool(ds.in_cands[i]) == (dense in cands.tolist())
        matches = layer_tokens + [dense]
        settled = next(layer for layer in range(L) if all(tok == dense for tok in matches[layer:]))
        assert int(ds.settled[i]) == settled


def test_collect_default_layer_candidates_and_budget(tiny_llama, tmp_path):
    ds = collect_features(tiny_llama, None, _items(5), None, max_tokens=20, k=4, progress=False)
    assert len(ds) == 20
    assert ds.meta["candidate_source"].startswith("layer:1")
    # layer candidates are the top-k of layer L//3 = 1: its own full-head token is always among them
    assert ds.exit_in_cands[:, 1].all()
    ds.save(tmp_path / "ds.safetensors")
    back = FeatureDataset.load(tmp_path / "ds.safetensors")
    torch.testing.assert_close(back.z, ds.z)
    assert back.label_match.dtype == torch.bool and torch.equal(back.label_match, ds.label_match)
    assert back.meta["positions"] == 20


def test_collect_drives_a_candidate_source(tiny_llama):
    class Recorder:
        """Proposes the last token + 0..k-1; checks the reset/propose/observe protocol."""

        def reset(self, prompt_ids, prompt_hidden):
            assert prompt_hidden.shape == (len(prompt_ids), 64)
            self.ids = list(prompt_ids)

        def propose(self):
            return (torch.tensor(self.ids[-1]) + torch.arange(4)) % 256

        def observe(self, token, hidden, layer):
            assert hidden.shape == (64,) and layer == 3
            self.ids.append(token)

    items = _items(2, seed=4)
    a = collect_features(tiny_llama, None, items, Recorder(), max_tokens=100, progress=False)
    b = collect_features(tiny_llama, None, items, _cands_fn, max_tokens=100, progress=False)
    assert torch.equal(a.cands, b.cands)


# ---------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------
def _toy_dataset(n=3000, Lp=4, k=4, seed=0):
    """z random; label = a linear rule on the candidate logits (separable)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, Lp, k, generator=g) * 2
    p = torch.softmax(z, -1)
    label = (z[..., 0] - z[..., 1] + 0.5 * z[..., 2]) > 0.5
    N = n
    return FeatureDataset(
        z=z, p=p, exit_token=torch.zeros(N, Lp, dtype=torch.long), dense=torch.zeros(N, dtype=torch.long),
        cands=torch.zeros(N, k, dtype=torch.long), label_match=label,
        exit_in_cands=torch.ones(N, Lp, dtype=torch.bool), cand_match=label,
        in_cands=torch.ones(N, dtype=torch.bool), settled=torch.zeros(N, dtype=torch.long),
        text_index=torch.arange(N) // 10, position=torch.arange(N) % 10,
    )


def test_fit_learns_separable_signal_quickly():
    ds = _toy_dataset(n=2000)
    t0 = time.perf_counter()
    bank, report = fit_predictors(ds, epochs=40, hidden=32, batch=512, lr=1e-2, progress=False)
    assert time.perf_counter() - t0 < 60
    _, val = ds.split_by_text(0.2, 0)
    score = bank.score_all(val.x())
    acc = ((score > 0.5) == val.label_match).float().mean().item()
    assert acc > 0.95, report
    assert bank.layers == [0, 1, 2, 3]
    assert len(report["per_layer"]) == 4 and "at_0.5" in report["per_layer"][0]
    # the thresholds reach the target precision on the validation split
    for row in report["per_layer"]:
        if row["threshold"] < 1.0:
            assert row["at_threshold"]["exit_precision"] >= 0.95


def test_fit_skips_slots_without_positives():
    ds = _toy_dataset(n=600)
    ds.label_match[:, 2] = False
    bank, report = fit_predictors(ds, epochs=3, hidden=16, progress=False)
    assert 2 not in bank.layers and report["per_layer"][2]["trained"] is False
    assert (bank.score_all(ds.x())[:, 2] == 0).all()


def test_choose_threshold_lowest_reaching_target():
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.4] * 10)
    correct = torch.tensor([True, True, True, False, False] * 10)
    gate = torch.ones_like(correct)
    t = choose_threshold(score, gate, correct, 0.95)
    assert 0.6 <= t < 0.7
    assert choose_threshold(score, gate, torch.zeros_like(correct), 0.95) == 1.0


def test_simulated_exits_and_offline_layers_on_toy_data():
    ds = _toy_dataset(n=500)
    bank, _ = fit_predictors(ds, epochs=20, hidden=32, progress=False)
    sim = simulate_exits(ds, bank, 0.5)
    assert sum(sim["exit_counts"]) + sim["full_depth"] == len(ds)
    assert sim["exit_by_layer"][-1] == pytest.approx(sim["exit_rate"], abs=1e-3)
    chosen = offline_layers(sim["exit_counts"], 0.6, 8)
    assert chosen and all(sim["exit_counts"][layer] > 0 for layer in chosen)


def test_label_cache_reuses_full_head_results(tiny_llama, tmp_path):
    items = _items(3, seed=7)
    cache = tmp_path / "labels.safetensors"
    a = collect_features(tiny_llama, None, items, _cands_fn, max_tokens=100, label_cache=cache,
                         progress=False)
    assert cache.exists() and a.meta["label_cache_hits"] == 0
    b = collect_features(tiny_llama, None, items, "layer:2", max_tokens=100, label_cache=cache,
                         progress=False)
    assert b.meta["label_cache_hits"] == 3
    assert torch.equal(a.exit_token, b.exit_token) and torch.equal(a.settled, b.settled)
    assert b.exit_in_cands[:, 2].all()  # layer-2 candidates hold layer 2's own argmax


def test_collect_with_runtime_ngram_draft(tiny_llama):
    ds = collect_features(tiny_llama, None, _items(2), "ngram", max_tokens=100, progress=False)
    assert ds.meta["candidate_source"] == "draft:ngram" and ds.cands.shape == (len(ds), 4)


def test_train_predictors_command_on_tiny_model(tiny_llama, tmp_path):
    from specee_compile.predictors.fit import train_predictors_command

    config = train_predictors_command(tiny_llama, tmp_path, texts=_items(12, seed=3), candidate_fn="layer:2",
                                      epochs=5, hidden=16, progress=False, coverage=1.0, max_layers=3)
    bank = PredictorBank.load(tmp_path / "predictors.safetensors", tmp_path / "predictors_config.json")
    assert bank.num_layers == 4 and bank.hidden == 16
    assert len(config["calibration_exit_counts"]) == 3
    assert set(config["offline_layers"]) <= set(range(3))
    assert config["times_s"]["collect"] >= 0 and "fit" in config


def test_fit_with_delta_mixing_still_learns():
    ds = _toy_dataset(n=1000)
    bank, report = fit_predictors(ds, epochs=15, hidden=32, batch=128, lr=3e-3, delta_mix=0.5, progress=False)
    _, val = ds.split_by_text(0.2, 0)
    acc = ((bank.score_all(val.x()) > 0.5) == val.label_match).float().mean().item()
    assert acc > 0.9 and report["delta_mix"] == 0.5


def test_train_passes_the_target_precision_to_the_fit(tiny_model_dir, tmp_path, monkeypatch):
    """`train --target-precision P` reaches the threshold choice (the fit's `target_precision`)."""
    import specee_compile.predictors.fit as fit
    from specee_compile.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(fit, "train_predictors_command", fake)
    with pytest.raises(Stop):
        main(["train", str(tiny_model_dir), "-o", str(tmp_path / "a"), "--draft", "ngram", "--num-texts", "2",
              "--target-precision", "0.7"])
    assert seen["target_precision"] == 0.7
