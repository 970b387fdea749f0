"""`benchmarks/ship_draft.py`: a newly trained head replaces the shipped one in one step, the predictors and the
measured tree shapes kept, the manifest rewritten and verified."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ship_draft():
    spec = importlib.util.spec_from_file_location("ship_draft", ROOT / "benchmarks" / "ship_draft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_a_new_head_without_tree_shapes_keeps_the_shipped_ones(tmp_path, smollm2):
    from specee_compile.artifacts import read_manifest, shipped_dir

    shipped = shipped_dir("smollm2-135m")
    target = tmp_path / "arts"
    shutil.copytree(shipped, target)
    old_cfg = json.loads((target / "draft_config.json").read_text())
    assert old_cfg["tree_shapes"]  # (the shipped head carries its measured CUDA shape)
    # a head as `train-draft` writes it: weights and a config with no tree_shapes of its own
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(shipped / "draft.safetensors", new / "draft.safetensors")
    cfg = {k: v for k, v in old_cfg.items() if k != "tree_shapes"}
    (new / "draft_config.json").write_text(json.dumps(cfg))
    predictors = (target / "predictors.safetensors").read_bytes()

    assert _ship_draft().main(["--draft", str(new), "--target", str(target), "--note", "test"]) == 0
    m = read_manifest(target)  # every file verified against its checksum
    got = json.loads((target / "draft_config.json").read_text())
    assert got["tree_shapes"] == old_cfg["tree_shapes"] and m["draft"]["config"]["tree_shapes"] == got["tree_shapes"]
    assert (target / "predictors.safetensors").read_bytes() == predictors
    assert m["training"]["draft_note"] == "test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arts", "new"]  # no temporary directory left

    # a head that carries shapes of its own keeps them
    (new / "draft_config.json").write_text(json.dumps({**cfg, "tree_shapes": {"cuda": [24, 6, 8]}}))
    assert _ship_draft().main(["--draft", str(new), "--target", str(target)]) == 0
    read_manifest(target)
    assert json.loads((target / "draft_config.json").read_text())["tree_shapes"] == {"cuda": [24, 6, 8]}
