"""Artifact directories: round trip, atomic replace, and the errors for bad artifacts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from specee_compile.api import build_decoder, load_program, save_program_artifacts
from specee_compile.artifacts import atomic_directory, read_manifest
from specee_compile.config import Settings
from specee_compile.errors import ArtifactError
from specee_compile.models import LoadedModel, model_fingerprint
from specee_compile.predictors.mlp import PredictorBank


def loaded_tiny(seed=0):
    m = make_tiny_llama()
    if seed:
        with torch.no_grad():
            m.model.layers[0].mlp.down_proj.weight.add_(0.01 * seed)
    return LoadedModel(model=m, tokenizer=None, name="tiny", config=m.config, fingerprint=model_fingerprint(m))


def write(tmp_path, loaded, name="arts"):
    L = loaded.model.config.num_hidden_layers
    bank = PredictorBank.init(L - 1, k=4, hidden=16, seed=1)
    bank.thresholds = torch.full((L - 1,), 0.3)
    out = tmp_path / name
    manifest = save_program_artifacts(out, loaded, bank, source="ngram", offline_layers=[1])
    return out, manifest, bank


def test_round_trip(tmp_path):
    loaded = loaded_tiny()
    out, manifest, bank = write(tmp_path, loaded)
    assert set(manifest["files"]) == {"predictors.safetensors", "predictors_config.json"}
    assert manifest["fingerprint"] == loaded.fingerprint
    program, draft, _scheduler, _m2 = load_program(out, loaded, Settings())
    assert program.exit_layers == bank.layers
    assert program.offline_layers == [1]
    assert type(draft).__name__ == "NgramDraft"
    L = loaded.model.config.num_hidden_layers
    torch.testing.assert_close(program.predictors.w1[: L - 1], bank.W1)
    assert program.predictors.w1.shape[0] == L and not program.predictors.w1[L - 1].any()
    assert all(ep.threshold == pytest.approx(0.3) for ep in program.exit_points)


def test_specee_decoder_runs_from_artifacts(tmp_path):
    loaded = loaded_tiny()
    out, _, _ = write(tmp_path, loaded)
    s = Settings(max_new_tokens=12, max_context=64, specee=True, artifacts=str(out), threshold=0.0)
    res = build_decoder(loaded, s).generate([3, 4, 5, 6])
    assert len(res.token_ids) == 12 and res.predictor_calls > 0


def test_fingerprint_mismatch(tmp_path):
    out, _, _ = write(tmp_path, loaded_tiny(0))
    other = loaded_tiny(1)
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_program(out, other, Settings())


def test_corrupt_and_partial_files(tmp_path):
    loaded = loaded_tiny()
    out, _, _ = write(tmp_path, loaded)
    p = out / "predictors.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_program(out, loaded, Settings())
    p.write_bytes(bytes(data[:100]))
    with pytest.raises(ArtifactError, match="partial"):
        read_manifest(out)
    p.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(out)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    loaded = loaded_tiny()
    out, manifest, _ = write(tmp_path, loaded)
    before = (out / "manifest.json").read_text()
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert (out / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a successful rewrite replaces the directory as a whole
    write(tmp_path, loaded)
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == manifest["files"].keys()


def test_plan_output_modes(tmp_path, monkeypatch):
    from specee_compile.artifacts import plan_output

    loaded = loaded_tiny()
    assert plan_output(tmp_path / "new" / "deeper").mode == "new"
    (tmp_path / "empty").mkdir()
    assert plan_output(tmp_path / "empty").mode == "replace"
    out, manifest, _ = write(tmp_path, loaded)
    plan = plan_output(out)
    assert plan.mode == "replace" and plan.ours == {*manifest["files"], "manifest.json"}
    monkeypatch.chdir(out)  # the directory we stand in is written in place, never renamed away
    assert plan_output(".").mode == "merge"
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.csv").write_text("1")
    with pytest.raises(ArtifactError, match="--force"):
        plan_output(tmp_path / "user")
    assert plan_output(tmp_path / "user", force=True).mode == "merge"
    with pytest.raises(ArtifactError, match="not even with --force"):
        plan_output(tmp_path / "user" / "data.csv", force=True)


def test_raise_on_signals_restores_handlers():
    import os
    import signal

    from specee_compile.artifacts import raise_on_signals
    from specee_compile.errors import Interrupted

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e, raise_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the Python-level handler runs between bytecodes
            pass
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_result_files_never_replace_an_earlier_run(tmp_path):
    """bench and eval write their results under the first free "-N" suffix and through a temporary file
    beside the target (same extension, so matplotlib can infer the format), removed on every exit path."""
    from specee_compile.artifacts import atomic_file, free_suffix, write_file_atomic

    names = ["eval.json", "eval.md", "exit_histogram.png"]
    assert free_suffix(tmp_path, names) == ""
    (tmp_path / "eval.md").write_text("earlier")  # any one of the set taken moves the whole set
    assert free_suffix(tmp_path, names) == "-2"
    (tmp_path / "exit_histogram-2.png").write_bytes(b"x")
    assert free_suffix(tmp_path, names) == "-3"
    write_file_atomic(tmp_path / "eval-3.json", "{}\n")
    assert (tmp_path / "eval-3.json").read_text() == "{}\n" and (tmp_path / "eval.md").read_text() == "earlier"
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "exit_histogram-3.png") as tmp:
        assert tmp.name.startswith(".exit_histogram-3.png.") and tmp.suffix == ".png"
        tmp.write_bytes(b"half")
        raise RuntimeError("the plot failed")
    assert not (tmp_path / "exit_histogram-3.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-3.json", "eval.md", "exit_histogram-2.png"]


def test_safetensors_outputs_are_whole_and_readable_by_others(tmp_path):
    """Every safetensors file we write (weights of an AOTI export, a draft, predictors, caches) goes through
    `save_tensors`: safetensors' own `save_file` leaves mode 0600, which a deployment running as another user
    cannot read; a failed write leaves neither the file nor its temporary."""
    import stat

    from safetensors.torch import load_file

    from specee_compile.artifacts import save_tensors
    from specee_compile.draft import EagleDraft

    save_tensors({"w": torch.arange(6.0).view(2, 3)}, tmp_path / "w.safetensors", metadata={"format": "x"})
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.arange(6.0).view(2, 3))
    with pytest.raises((TypeError, ValueError, AttributeError)):
        save_tensors({"w": "not a tensor"}, tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    EagleDraft(make_tiny_llama()).save(tmp_path / "draft")
    (weights,) = (tmp_path / "draft").glob("*.safetensors")
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
