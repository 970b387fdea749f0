"""Exit predictors: features, stacked MLPs, data collection, fitting, and layer scheduling.

    features.exit_features      the 3k features of one exit point (shared with the exit_score op)
    mlp.PredictorBank           all layers' MLPs stacked; safetensors round-trip
    collect.collect_features    dense teacher-forced run -> FeatureDataset (features + labels)
    fit.fit_predictors          batched BCE/Adam training, per-layer thresholds for a target precision
    schedule                    offline layer selection, OnlineScheduler, exit simulation
    fit.train_predictors_command     the whole pipeline (collect -> fit -> schedule -> save)
"""

from .features import exit_features, features_from_zp, rms_norm
from .mlp import PredictorBank
from .schedule import OnlineScheduler, exit_distribution_from_dataset, offline_layers, simulate_exits

__all__ = [
    "exit_features", "features_from_zp", "rms_norm", "PredictorBank", "OnlineScheduler", "offline_layers",
    "simulate_exits", "exit_distribution_from_dataset",
]
