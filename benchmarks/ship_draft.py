"""Replace the draft head of a shipped artifact directory with a newly trained one, keeping its predictors.

    python benchmarks/ship_draft.py --draft /tmp/draftcpu/draft --note "..." [--target DIR] [--model smollm2-135m]

The new head is loaded through ``EagleDraft.load`` against the base model (so it is checked to fit it)
and written back with ``EagleDraft.save`` (the shipped config format: no training report); the
predictor files are carried over unchanged; the manifest is rewritten by ``artifacts.write_manifest``
(checksums and sizes of every file) inside ``artifacts.atomic_directory``, so the directory changes in
one step and only when complete. A new head with no ``tree_shapes`` of its own keeps the previous head's
(the shapes ``tune-tree`` measured with it; re-run ``tune-tree`` for the new head). Everything else in the old
manifest (thresholds, schedule, ...) is kept; ``draft.config`` becomes the new head's config and ``training``
records the new head's origin.

The predictors were calibrated with the previous head's candidates: check SpecEE after shipping.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specee_compile.artifacts import MANIFEST, atomic_directory, read_manifest, write_manifest
from specee_compile.draft import EagleDraft
from specee_compile.draft.eagle import CONFIG_NAME, WEIGHTS_NAME, tree_shapes_from_config

SHIPPED = ROOT / "specee_compile" / "shipped" / "smollm2-135m"
MAX_DRAFT_BYTES = 20 * 1000 * 1000
OWN_KEYS = ("format_version", "tool", "model", "fingerprint", "created", "files")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", required=True, help="directory with the new draft.safetensors + draft_config.json")
    ap.add_argument("--target", default=str(SHIPPED))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--command", action="append", default=[], help="training command(s) to record")
    ap.add_argument("--note", default="", help="recorded under training.draft_note")
    args = ap.parse_args(argv)

    from specee_compile.api import load_model

    target = Path(args.target)
    old = read_manifest(target)  # verifies the current files against their checksums
    loaded = load_model(args.model, dtype="float32", device="cpu")
    if loaded.fingerprint != old["fingerprint"]:
        print(f"ship_draft: {args.model} has fingerprint {loaded.fingerprint}, {target} is for {old['fingerprint']}",
              file=sys.stderr)
        return 2
    draft = EagleDraft.load(args.draft, loaded.model)
    if not draft.tree_shapes:  # the shapes measured with the previous head stand until `tune-tree` re-measures
        old_shapes = old.get("draft", {}).get("config", {}).get("tree_shapes")  # (the verified manifest's copy)
        draft.tree_shapes = tree_shapes_from_config(old_shapes, str(target))
    new_cfg = json.loads((Path(args.draft) / CONFIG_NAME).read_text())
    train = new_cfg.get("train", {})

    info = {k: v for k, v in old.items() if k not in OWN_KEYS}
    with atomic_directory(target, force=True) as tmp:
        for rel in old["files"]:
            if rel not in (WEIGHTS_NAME, CONFIG_NAME):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target / rel, tmp / rel)
        cfg = draft.save(tmp)
        size = (tmp / WEIGHTS_NAME).stat().st_size
        if size > MAX_DRAFT_BYTES:
            raise SystemExit(f"ship_draft: the new draft is {size} bytes (> {MAX_DRAFT_BYTES}); not shipping")
        info["draft"] = {**old.get("draft", {}), "kind": "eagle", "config": cfg}
        training = dict(old.get("training", {}))
        prev_cmds = training.get("commands", [])
        training["commands"] = (args.command or prev_cmds[:1]) + prev_cmds[1:]
        training["draft_train_s"] = train.get("total_seconds", training.get("draft_train_s"))
        training["draft_train"] = {k: train[k] for k in (
            "device", "data", "sequences", "self_generated", "tokens", "steps", "batch_size", "unroll", "exit_mix",
            "lr", "gen_seconds", "collect_seconds", "train_seconds", "val_final_layer", "val_exit_layer")
            if k in train}
        if args.note:
            training["draft_note"] = args.note
        info["training"] = training
        manifest = write_manifest(tmp, model=old["model"], fingerprint=old["fingerprint"], info=info)
    read_manifest(target)  # the landed directory verifies
    print(json.dumps({k: manifest["files"][k] for k in manifest["files"]}, indent=1))
    print(f"shipped {args.draft} into {target} ({MANIFEST} rewritten)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
