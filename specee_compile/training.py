"""`specee-compile train`: candidate source -> features -> predictors -> schedule -> artifacts.

The phases live in draft/ and predictors/; this module only chains them and writes one artifact
directory (atomically, with the manifest) that `generate --specee --artifacts DIR` reads.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def train_command(model_name: str, out_dir, *, num_texts: int = 160, draft: str | None = "eagle",
                  draft_dir=None, progress: bool = True, force: bool = False, device: str = "cpu",
                  target_precision: float = 0.95, draft_options: dict | None = None) -> dict:
    """`device` (`train --device cuda`): where the model loads (float32) and collects the features (and
    the EAGLE draft trains, when one is trained here); the fit and the schedule run on the CPU.
    `target_precision`: each exit layer's threshold is the lowest whose held-out exit precision (the exit's
    token = the full model's) reaches it; a layer that cannot reach it gets no exit point.
    `draft_options`: keyword arguments for `train_draft_command` when the EAGLE draft is trained here
    (e.g. time_budget_s, conversations, self_generated); it reuses the model loaded here."""
    from .api import save_program_artifacts
    from .artifacts import plan_output
    from .draft import EagleDraft, make_candidate_source
    from .draft.train import train_draft_command
    from .errors import SpecEEError
    from .models import load_model
    from .predictors.fit import train_predictors_command
    from .predictors.mlp import PredictorBank

    source = draft or "eagle"
    # bad numbers and an unusable output directory fail before the model loads, not after training
    if isinstance(num_texts, bool) or not isinstance(num_texts, int) or num_texts < 1:
        raise SpecEEError(f"--num-texts must be an integer >= 1, got {num_texts!r}")
    from .config import check_device

    check_device(str(device))  # one clear line before anything loads
    plan_output(out_dir, force=force)
    times = {}
    t0 = time.perf_counter()
    loaded = load_model(model_name, device=device)
    times["load_model_s"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory(prefix="specee-train-") as tmp:
        tmp = Path(tmp)
        draft_obj = None
        if draft_dir is not None:
            draft_obj = EagleDraft.load(draft_dir, loaded.model)
        elif source == "eagle":
            t0 = time.perf_counter()
            print("phase 1/3: training the draft head (no --draft-dir given)", file=sys.stderr)
            train_draft_command(model_name, tmp / "draft", device=device, loaded=loaded, **(draft_options or {}))
            draft_obj = EagleDraft.load(tmp / "draft", loaded.model)
            times["train_draft_s"] = round(time.perf_counter() - t0, 1)
        artifacts = {"draft": draft_obj} if draft_obj is not None else {}
        cands = make_candidate_source(source, loaded.model, artifacts, k=4)
        t0 = time.perf_counter()
        print(f"phase 2/3: predictors with candidates from '{source}'", file=sys.stderr)
        cfg = train_predictors_command(loaded, tmp / "pred", num_texts=num_texts, candidate_fn=cands,
                                       progress=progress, target_precision=target_precision)
        times["train_predictors_s"] = round(time.perf_counter() - t0, 1)
        bank = PredictorBank.load(tmp / "pred" / "predictors.safetensors", tmp / "pred" / "predictors_config.json")
        print("phase 3/3: writing artifacts", file=sys.stderr)
        manifest = save_program_artifacts(
            out_dir, loaded, bank, source=source, draft=draft_obj, offline_layers=cfg["offline_layers"],
            extra_info={"training": {"times": times, "num_texts": num_texts,
                                     "command": f"specee-compile train {model_name} -o {out_dir}"}},
            extra_files={"predictors_config.json": tmp / "pred" / "predictors_config.json"}, force=force,
        )
    print(f"artifacts written to {out_dir}: exit layers {manifest['exit_layers']}, offline "
          f"{manifest['schedule']['offline_layers']}, times {times}", file=sys.stderr)
    return manifest
