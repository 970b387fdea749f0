"""Fit the exit predictors of every layer at once.

One MLP per predictor slot (Linear(3k, H) -> ReLU -> Linear(H, 1)), trained together as batched
matmuls over the slot dimension: BCE with logits, Adam (lr 1e-3, batch 1024, as in the paper). Two
CPU cores fit 29 slots x 16K positions in about a minute.

Choices:
- Inputs are standardised per slot and feature during training (the candidate logits z are O(10)
  while p and delta are O(0.1)); the scaling is folded back into W1/b1 afterwards, so the saved
  predictors read raw features and the runtime op needs no extra parameters.
- Plain (unweighted) BCE, no balancing: a false exit costs much more than a missed one, and
  upweighting positives would push scores up exactly where precision matters. Instead a per-slot
  threshold is chosen on a held-out split (split by calibration item, not by position) as the
  lowest threshold whose *exit precision* reaches `target_precision`; slots that cannot reach it get
  threshold 1.0 (never fire).
- Exit precision counts what an exit really does at inference: approximate mode exits only when the
  full-head token T is among the candidates and is right when T equals the dense token, so
  precision = P(T == dense | score > t, T in S). With label "cand_argmax" (lossless mode, exit token =
  best candidate) there is no gate and precision = P(best candidate == dense | score > t).
- Per-slot early stopping on validation loss: each slot keeps its best epoch's weights; training
  stops when the mean over slots has not dropped by `min_rel_improvement` (relative) for `patience`
  epochs, or after `max_seconds`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import SpecEEError
from .collect import FeatureDataset
from .mlp import PredictorBank


def _gate_and_correct(ds: FeatureDataset, label: str) -> tuple[Tensor, Tensor]:
    """(gate [N, Lp], correct [N, Lp]): when an exit can happen and whether its token is right."""
    if label == "cand_argmax":
        return torch.ones_like(ds.cand_match), ds.cand_match
    return ds.exit_in_cands, ds.label_match


def _stats(score: Tensor, y: Tensor, gate: Tensor, correct: Tensor, t: float) -> dict:
    fire = score > t
    tp = (fire & y).sum().item()
    precision = tp / max(1, fire.sum().item())
    recall = tp / max(1, y.sum().item())
    exits = fire & gate
    exit_precision = (exits & correct).sum().item() / max(1, exits.sum().item())
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "fire_rate": round(fire.float().mean().item(), 4),
        "exit_rate": round(exits.float().mean().item(), 4),
        "exit_precision": round(exit_precision, 4),
    }


def choose_threshold(score: Tensor, gate: Tensor, correct: Tensor, target_precision: float,
                     *, min_exits: int = 10, grid=None) -> float:
    """Lowest threshold whose exit precision on (score, gate, correct) reaches the target with at least
    `min_exits` exits; 1.0 (never fire) when none does."""
    grid = grid if grid is not None else [round(0.3 + 0.01 * i, 3) for i in range(70)] + [0.995, 0.999]
    for t in grid:
        exits = (score > t) & gate
        n = int(exits.sum())
        if n < min_exits:
            break  # higher thresholds only exit less
        if (exits & correct).sum().item() / n >= target_precision:
            return float(t)
    return 1.0


def fit_predictors(
    dataset: FeatureDataset,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch: int = 1024,
    hidden: int = 512,
    label: str = "match",
    val_fraction: float = 0.2,
    target_precision: float = 0.95,
    patience: int = 5,
    min_rel_improvement: float = 1e-3,
    slot_chunk: int = 2,
    evaluated_layers=None,
    delta_mix: float = 0.0,
    max_gap: int = 6,
    seed: int = 0,
    max_seconds: float | None = 180.0,
    progress: bool = True,
) -> tuple[PredictorBank, dict]:
    """Train one predictor per slot on `dataset` -> (PredictorBank with per-slot thresholds, report).

    label: "match" (paper), "match_in_cands" or "cand_argmax" (see FeatureDataset.labels).
    evaluated_layers: build delta against the previous evaluated layer of this subset (default:
        every layer, adjacent delta); slots outside the subset are not trained.
    delta_mix: share of training samples whose delta is taken against a random earlier layer
        (gap 2..max_gap, or delta = p when that falls below layer 0) instead of the adjacent one, so
        predictors tolerate scheduled inference, where the previous *evaluated* layer varies. 0 = the
        adjacent delta only (validation always uses the adjacent delta).
    """
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    train, val = dataset.split_by_text(val_fraction, seed)
    if len(train) == 0:
        raise SpecEEError("no training positions after the validation split; collect more calibration items")
    if len(val) == 0:
        val = train  # a single calibration item: validate on the training data (report says so)
    Lp, k = dataset.num_slots, dataset.k
    slots = list(range(Lp)) if evaluated_layers is None else sorted(int(s) for s in evaluated_layers)

    xtr = train.x(evaluated_layers)[:, slots]  # [Nt, S, F]
    ytr = train.labels(label)[:, slots].float()  # [Nt, S]
    xva = val.x(evaluated_layers)[:, slots]
    yva = val.labels(label)[:, slots].float()
    S = len(slots)

    # standardise (folded into W1/b1 at the end)
    mean = xtr.mean(0)  # [S, F]
    std = xtr.std(0).clamp_min(1e-4)
    xtr_n = ((xtr - mean) / std).transpose(0, 1).contiguous()  # [S, Nt, F]
    xva_n = ((xva - mean) / std).transpose(0, 1).contiguous()
    ytr_t = ytr.T.contiguous()  # [S, Nt]
    yva_t = yva.T.contiguous()

    init = PredictorBank.init(S, k, hidden, seed=seed)
    W1 = init.W1.clone().requires_grad_(True)  # [S, H, F]
    b1 = init.b1.clone().requires_grad_(True)
    W2 = init.W2.clone().requires_grad_(True)  # [S, H]
    prior = ytr.mean(0).clamp(1e-3, 1 - 1e-3)
    b2 = torch.log(prior / (1 - prior)).clone().requires_grad_(True)  # start at the base rate
    params = [W1, b1, W2, b2]
    opt = torch.optim.Adam(params, lr=lr)

    mixing = delta_mix > 0 and evaluated_layers is None
    if mixing:
        p_all = train.p.float().transpose(0, 1).contiguous()  # [Lp, Nt, k]
        z_all = train.z.float().transpose(0, 1).contiguous()
        slot_t = torch.tensor(slots).view(-1, 1)  # [S, 1]
        mean_t, std_t = mean.unsqueeze(1), std.unsqueeze(1)  # [S, 1, F]

    def batch_x(idx: Tensor) -> Tensor:  # standardised features [S, B, F]
        if not mixing:
            return xtr_n[:, idx]
        B = idx.shape[0]
        gap = torch.ones(len(slots), B, dtype=torch.long)
        mix = torch.rand(len(slots), B) < delta_mix
        gap[mix] = torch.randint(2, max_gap + 1, (int(mix.sum()),))
        prev = slot_t - gap  # [S, B]
        p_b = p_all[slot_t, idx.view(1, -1)]  # [S, B, k]
        p_prev = torch.where((prev >= 0).unsqueeze(-1), p_all[prev.clamp_min(0), idx.view(1, -1)], 0.0)
        x = torch.cat([z_all[slot_t, idx.view(1, -1)], p_b, p_b - p_prev], -1)
        return (x - mean_t) / std_t

    def forward(xs: Tensor, sl: slice) -> Tensor:  # xs [s, B, F] for slots sl -> logits [s, B]
        h = torch.baddbmm(b1[sl].unsqueeze(1), xs, W1[sl].transpose(1, 2)).relu_()  # [s, B, H]
        return torch.bmm(h, W2[sl].unsqueeze(-1)).squeeze(-1) + b2[sl].unsqueeze(1)

    # A few slots at a time: the [s, B, H] activations stay in cache, which is ~4x faster on CPU
    # than one bmm over all slots (the elementwise ReLU passes are memory-bound).
    chunks = [slice(c, min(c + slot_chunk, S)) for c in range(0, S, slot_chunk)]

    def val_loss() -> Tensor:  # [S]
        with torch.no_grad():
            return torch.cat([torch.nn.functional.binary_cross_entropy_with_logits(
                forward(xva_n[sl], sl), yva_t[sl], reduction="none").mean(1) for sl in chunks])

    best = val_loss()
    best_mean = best.mean().item()
    best_params = [p.detach().clone() for p in params]
    since_improved = 0
    Nt = xtr_n.shape[1]
    epochs_run = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="fit", unit="epoch")
    t_train = time.perf_counter()
    stop_reason = "epochs"
    for epoch in range(epochs):
        perm = torch.randperm(Nt)
        for s in range(0, Nt, batch):
            idx = perm[s : s + batch]
            xb, yb = batch_x(idx), ytr_t[:, idx]
            opt.zero_grad(set_to_none=True)
            for sl in chunks:
                # mean over the batch, summed over slots: each slot's gradient is its own BCE gradient
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    forward(xb[sl], sl), yb[sl], reduction="none").mean(1).sum()
                loss.backward()
            opt.step()
        epochs_run = epoch + 1
        vl = val_loss()
        improved = vl < best  # per-slot snapshot of any improvement
        if improved.any():
            with torch.no_grad():
                for bp, p in zip(best_params, params):
                    bp[improved] = p.detach()[improved]
            best = torch.where(improved, vl, best)
        # stopping looks at the mean over slots: one noisy slot should not keep all of them training
        if best.mean() < best_mean * (1 - min_rel_improvement):
            best_mean = best.mean().item()
            since_improved = 0
        else:
            since_improved += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val_loss=f"{best.mean().item():.4f}")
        if since_improved >= patience:
            stop_reason = f"early stop (mean val loss flat for {patience} epochs)"
            break
        if max_seconds is not None and time.perf_counter() - t_train > max_seconds:
            stop_reason = f"time limit {max_seconds}s"
            break
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_train

    # fold the standardisation into the first layer: W1 ((x - m) / s) + b1 = (W1 / s) x + (b1 - W1 (m / s))
    W1b, b1b, W2b, b2b = (p.detach() for p in best_params)
    W1f = W1b / std.unsqueeze(1)  # [S, H, F]
    b1f = b1b - torch.einsum("shf,sf->sh", W1b, mean / std)
    full = PredictorBank.init(Lp, k, hidden, seed=seed, layers=[])
    full.W1[slots], full.b1[slots], full.W2[slots], full.b2[slots] = W1f, b1f, W2b, b2b

    # slots with no positive (or no negative) training label are not real predictors
    pos_train = ytr.sum(0)
    trained = [slot for i, slot in enumerate(slots) if 0 < pos_train[i] < ytr.shape[0]]
    full.layers = trained

    # evaluation + thresholds on the held-out split, using the saved (folded) predictors on raw x
    t_eval = time.perf_counter()
    with torch.no_grad():
        score_va = torch.sigmoid(full.logits_all(xva, slots))  # [Nv, S]
    gate, correct = _gate_and_correct(val, label)
    gate, correct = gate[:, slots], correct[:, slots]
    yv = yva.bool()
    thresholds = torch.ones(Lp)
    per_layer = []
    for i, slot in enumerate(slots):
        row = {"layer": slot, "trained": slot in trained,
               "train_pos_rate": round(ytr[:, i].mean().item(), 4),
               "val_pos_rate": round(yva[:, i].mean().item(), 4),
               "val_loss": round(best[i].item(), 4)}
        if slot in trained:
            thresholds[slot] = choose_threshold(score_va[:, i], gate[:, i], correct[:, i], target_precision)
            row["at_0.5"] = _stats(score_va[:, i], yv[:, i], gate[:, i], correct[:, i], 0.5)
            row["threshold"] = round(float(thresholds[slot]), 3)
            row["at_threshold"] = _stats(score_va[:, i], yv[:, i], gate[:, i], correct[:, i],
                                         float(thresholds[slot]))
        per_layer.append(row)
    full.thresholds = thresholds
    eval_s = time.perf_counter() - t_eval

    report = {
        "label": label,
        "positions_train": len(train),
        "positions_val": len(val) if val is not train else 0,
        "epochs_run": epochs_run,
        "stop_reason": stop_reason,
        "hidden": hidden,
        "k": k,
        "lr": lr,
        "batch": batch,
        "target_precision": target_precision,
        "delta_mix": delta_mix if mixing else 0.0,
        "layers_trained": trained,
        "thresholds": [round(float(t), 3) for t in thresholds],
        "val_loss_mean": round(best.mean().item(), 4),
        "per_layer": per_layer,
        "times_s": {"train": round(train_s, 2), "eval": round(eval_s, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
    }
    full.meta = {"label": label, "target_precision": target_precision}
    if progress:
        print(f"fit: {epochs_run} epochs in {train_s:.1f}s ({stop_reason}); mean val loss "
              f"{best.mean().item():.4f}; {len(trained)}/{Lp} slots trained")
    return full, report


# ---------------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------------
def sharegpt_pairs(n: int, *, min_reply_chars: int = 40) -> list[tuple[str, str]]:
    """(first user turn, first assistant reply) of the first `n` usable ShareGPT conversations.
    ShareGPT is the calibration set; MT-Bench and SQuAD stay evaluation-only."""
    from ..data import sharegpt_conversations

    pairs: list[tuple[str, str]] = []
    scan = max(2 * n, n + 200)
    for conversation in sharegpt_conversations(scan):
        turns = conversation.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, reply = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
        if prompt and len(reply) >= min_reply_chars:
            pairs.append((prompt, reply))
            if len(pairs) >= n:
                break
    return pairs


def train_predictors_command(
    model_name,
    out_dir,
    *,
    num_texts: int = 160,
    candidate_fn=None,
    progress: bool = True,
    max_positions: int = 16384,
    k: int = 4,
    label: str = "match",
    target_precision: float = 0.95,
    epochs: int = 100,
    hidden: int = 512,
    coverage: float | None = None,
    max_layers: int | None = None,
    texts=None,
    dataset_path=None,
    draft_artifacts: dict | None = None,
    label_cache=None,
) -> dict:
    """Collect -> fit -> schedule -> save `predictors.safetensors` + `predictors_config.json` in out_dir.

    model_name: zoo alias / path / hub id, or an already loaded model (LoadedModel or HF module).
    candidate_fn: the candidate source used for labels and features (see collect.candidates_for_sequence):
        "eagle" (with draft_artifacts={"draft_path": DIR}), "ngram", "shallow", "layer:N", a callable or
        a CandidateSource. None = "layer:{L-3}", a stand-in whose top-4 recall of the dense token (~0.7
        on SmolLM2-135M) is what a trained draft should reach; train with the runtime's draft when you
        have it, so the features match what inference sees.
    label_cache: safetensors path caching the candidate-independent full-head labels between runs.
    texts: calibration items (default: `num_texts` ShareGPT first turns + replies).
    dataset_path: if given, the collected FeatureDataset is saved there (safetensors).
    Returns the config dict written (also holds the fit report and the simulated exit statistics).
    """
    from pathlib import Path

    from ..config import Settings
    from .collect import collect_features
    from .schedule import OnlineScheduler, offline_layers, simulate_exits

    defaults = Settings()
    coverage = defaults.offline_coverage if coverage is None else coverage
    max_layers = defaults.offline_max_layers if max_layers is None else max_layers
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    if isinstance(model_name, str) or isinstance(model_name, Path):
        from ..models import load_model

        loaded = load_model(str(model_name))
    else:
        loaded = model_name
    is_loaded = hasattr(loaded, "tokenizer") and hasattr(loaded, "fingerprint")  # a LoadedModel
    model = loaded.model if is_loaded else loaded
    tokenizer = loaded.tokenizer if is_loaded else None
    phases["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    items = sharegpt_pairs(num_texts) if texts is None else list(texts)
    phases["load_texts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if candidate_fn is None:
        candidate_fn = f"layer:{max(0, model.config.num_hidden_layers - 3)}"
    dataset = collect_features(model, tokenizer, items, candidate_fn, max_tokens=max_positions, k=k,
                               draft_artifacts=draft_artifacts, label_cache=label_cache, progress=progress)
    phases["collect"] = time.perf_counter() - t0
    if dataset_path is not None:
        dataset.save(dataset_path)

    t0 = time.perf_counter()
    bank, report = fit_predictors(dataset, epochs=epochs, hidden=hidden, label=label,
                                  target_precision=target_precision, progress=progress)
    phases["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, val = dataset.split_by_text(0.2, 0)  # the fit's held-out items
    mode = "lossless" if label == "cand_argmax" else "approximate"
    sim_half = simulate_exits(val, bank, 0.5, mode=mode)
    sim_tuned = simulate_exits(val, bank, None, mode=mode)
    # calibration exit counts (all predictors active, the thresholds the runtime applies by default)
    counts = simulate_exits(dataset, bank, None, mode=mode)["exit_counts"]
    offline = offline_layers(counts, coverage, max_layers)
    scheduler = OnlineScheduler(offline, defaults.online_window, defaults.online_offsets, bank.layers)
    sim_sched = simulate_exits(val, bank, None, mode=mode, scheduler=scheduler)
    phases["schedule"] = time.perf_counter() - t0

    times = {name: round(v, 2) for name, v in phases.items()}
    extra = {
        "model": getattr(loaded, "name", type(model).__name__),
        "fingerprint": getattr(loaded, "fingerprint", None),
        "label": label,
        "target_precision": target_precision,
        "candidate_source": dataset.meta.get("candidate_source"),
        "delta": "previous evaluated layer (collection evaluates every layer: adjacent; slot 0 delta = p)",
        "offline_layers": offline,
        "offline_coverage": coverage,
        "offline_max_layers": max_layers,
        "calibration_exit_counts": counts,
        "calibration": {
            "texts": dataset.meta.get("items"),
            "positions": len(dataset),
            "source": ("ShareGPT first turn + first reply (teacher forced)" if texts is None
                       else "caller's texts"),
            "dense_in_candidates": round(dataset.in_cands.float().mean().item(), 4),
            "dense_in_layer_topk": dataset.meta.get("dense_in_layer_topk"),
            "label_positive_rate": [round(v, 4) for v in dataset.labels(label).float().mean(0).tolist()],
            "settled_layer_mean": round(dataset.settled.float().mean().item(), 3),
            "settled_layer_hist": torch.bincount(dataset.settled, minlength=dataset.num_layers).tolist(),
        },
        "validation_simulation": {"threshold_0.5": sim_half, "per_layer_thresholds": sim_tuned,
                                  "scheduled_per_layer_thresholds": sim_sched},
        "fit": report,
        "times_s": {**times, "collect_phases": dataset.meta.get("times_s")},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bank.meta.update({"offline_layers": offline})
    config = bank.save(out / "predictors.safetensors", out / "predictors_config.json", extra_config=extra)
    if progress:
        print(f"predictors written to {out}: layers {bank.layers}, offline {offline}; "
              f"val @0.5: mean layers {sim_half['mean_layers']}, accuracy {sim_half['token_accuracy']}; "
              f"times {times}")
    return config


__all__ = ["fit_predictors", "choose_threshold", "train_predictors_command", "sharegpt_pairs"]
