"""`specee-compile tune-tree`: draft-tree shapes timed with a head against dense in the same rounds; the fastest shape
that keeps dense's tokens is written with the head (draft_config.json `tree_shapes`), and `--speculate tree` takes it."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from specee_compile.cli import main


def _digests(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.mark.slow
def test_tune_tree_writes_the_fastest_identical_shape_with_the_head(tmp_path, smollm2):
    from specee_compile.api import build_decoder
    from specee_compile.artifacts import read_manifest, shipped_dir
    from specee_compile.config import Settings

    shipped = shipped_dir("smollm2-135m")
    before = _digests(shipped)
    out = tmp_path / "tuned"
    assert main(["tune-tree", "smollm2-135m", "-o", str(out), "--shapes", "2:2:2,2:1:2", "--prompts", "1",
                 "--max-new-tokens", "6"]) == 0
    rep = json.loads((out / "tree_tune.json").read_text())
    assert set(rep["shapes"]) == {"dense", "2:2:2", "2:1:2"} and rep["shape_key"] in ("cpu", "cpu-onednn")
    best = rep["best"]
    shapes = {n: f for n, f in rep["shapes"].items() if n != "dense"}
    assert all(f["identical"] == "1/1" and f["accepted_per_step"] >= 1 for f in shapes.values())
    assert shapes[best]["ratio"] == max(f["ratio"] for f in shapes.values())
    m = read_manifest(out)  # every file listed and verified, the report and the plot included
    assert {"tree_tune.json", "tree_tune.png", "draft_config.json", "draft.safetensors"} <= set(m["files"])
    cfg = json.loads((out / "draft_config.json").read_text())
    # this device's shape is set (keyed by the CPU's matmul library, as the defaults), the shipped CUDA shape kept
    assert cfg["tree_shapes"] == {rep["shape_key"]: [int(t) for t in best.split(":")], "cuda": [31, 4, 8]}
    assert m["draft"]["config"] == cfg and m["tree_tune"]["best"] == best
    dec = build_decoder(smollm2, Settings(speculate="tree", artifacts=str(out)))
    assert f"{dec.tree.budget}:{dec.tree.depth}:{dec.tree.topk}" == best
    assert _digests(shipped) == before  # the source artifacts are untouched
    # a head with no draft_config.json (a bare draft.safetensors loads without one): the copy gets one, holding the
    # shape alone, and the head loads with it
    bare = tmp_path / "bare"
    shutil.copytree(shipped, bare)
    (bare / "draft_config.json").unlink()
    mb = json.loads((bare / "manifest.json").read_text())
    del mb["files"]["draft_config.json"]
    (bare / "manifest.json").write_text(json.dumps(mb))
    # (and prompts of the user's own, as on a machine that cannot fetch MT-Bench)
    mine = tmp_path / "prompts.json"
    mine.write_text(json.dumps(["Name three colours.", "unused: --prompts 1 takes the first"]))
    assert main(["tune-tree", "smollm2-135m", "--artifacts", str(bare), "-o", str(tmp_path / "t2"), "--shapes",
                 "2:1:2", "--prompts", "1", "--max-new-tokens", "4", "--prompt-file", str(mine)]) == 0
    rep2 = json.loads((tmp_path / "t2" / "tree_tune.json").read_text())
    assert rep2["prompt_source"] == str(mine) and rep2["prompts"] == 1
    key = rep["shape_key"]
    assert json.loads((tmp_path / "t2" / "draft_config.json").read_text()) == {"tree_shapes": {key: [2, 1, 2]}}
    dec = build_decoder(smollm2, Settings(speculate="tree", artifacts=str(tmp_path / "t2")))
    assert (dec.tree.budget, dec.tree.depth, dec.tree.topk) == (2, 1, 2)


def test_tune_tree_refuses_bad_input_before_work(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = ((["--shapes", "24:6"], "--shapes 24:6: expected budget:depth:topk"),
             (["--prompts", "0"], "--prompts 0 / --max-new-tokens 64: expected positive integers"),
             (["--artifacts", str(tmp_path / "empty")], "tune-tree needs an EAGLE draft head, and there is none in"),
             (["--prompt-file", str(tmp_path / "none.json")], "--prompt-file "),
             (["--prompt-file", str(tmp_path / "bad.json")], "expected a non-empty JSON list of prompt strings"))
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": ["hi"]}))
    for extra, msg in cases:  # each before the model loads: one line on stderr
        assert main(["tune-tree", str(tiny_model_dir), "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    # no artifacts for this model at all: found out once it is loaded (its name picks the shipped ones); the error
    # is still one line, the last, with no traceback
    assert main(["tune-tree", str(tiny_model_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tune-tree needs an EAGLE draft head, and there is none for" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    f = tmp_path / "mine.txt"
    f.write_text("mine")
    assert main(["tune-tree", str(tiny_model_dir), "-o", str(f)]) == 2
    assert "is an existing file" in capsys.readouterr().err and f.read_text() == "mine"
    assert not out.exists()
