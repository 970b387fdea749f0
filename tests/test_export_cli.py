"""`specee-compile export` end to end on a tiny model: artifact dir, manifest, ONNX runner parity."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")

from specee_compile.api import build_decoder, encode_prompt, save_program_artifacts  # noqa: E402
from specee_compile.backends.onnx_runner import generate_from_artifact  # noqa: E402
from specee_compile.cli import main  # noqa: E402
from specee_compile.config import Settings  # noqa: E402
from specee_compile.models import load_model  # noqa: E402
from specee_compile.predictors.mlp import PredictorBank  # noqa: E402


@pytest.fixture
def tiny_artifacts(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    L = loaded.model.config.num_hidden_layers
    bank = PredictorBank.init(L - 1, k=4, hidden=16, seed=3)
    bank.thresholds = torch.full((L - 1,), 0.45)
    arts = tmp_path / "arts"
    save_program_artifacts(arts, loaded, bank, source="ngram", offline_layers=[1, 2])
    return tiny_model_dir, arts


def test_export_then_generate_matches_eager(tiny_artifacts, tmp_path, capsys):
    model_dir, arts = tiny_artifacts
    out = tmp_path / "exported"
    assert main(["export", str(model_dir), "-o", str(out), "--artifacts", str(arts), "--max-context", "128"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["if_nodes"] >= 1 and "decode_step.onnx" in manifest["files"]
    assert manifest["fingerprint"] == load_model(str(model_dir)).fingerprint
    s = Settings(specee=True, max_new_tokens=16, max_context=128, threshold=0.45, artifacts=str(arts))
    res, _ = generate_from_artifact(out, "hello there", s)
    assert res.load_s > 0  # the manifest's checks and ONNX Runtime's sessions
    loaded = load_model(str(model_dir))
    ref = build_decoder(loaded, s).generate(encode_prompt(loaded.tokenizer, "hello there"))
    assert res.token_ids == ref.token_ids
    assert res.exit_layers == ref.exit_layers


def test_export_refuses_foreign_artifacts(tiny_artifacts, tmp_path, capsys):
    model_dir, arts = tiny_artifacts
    (model_dir / "other").mkdir()
    other = load_model(str(model_dir)).model
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(1.0)
    other.save_pretrained(model_dir / "other")
    for f in model_dir.glob("tokenizer*"):
        (model_dir / "other" / f.name).write_bytes(f.read_bytes())
    rc = main(["export", str(model_dir / "other"), "-o", str(tmp_path / "x"), "--artifacts", str(arts)])
    assert rc == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_streamed_model_matches_load_model(tiny_model_dir):
    """The export reads a safetensors directory lazily (layers stay on disk); its fingerprint is
    load_model's, so the same artifacts match; its own dtype is the checkpoint's."""
    from specee_compile.backends.onnx_export import own_dtype, stream_model

    loaded, streamed = load_model(str(tiny_model_dir)), stream_model(str(tiny_model_dir))
    assert streamed.fingerprint == loaded.fingerprint and streamed.name == loaded.name
    assert streamed.model.model.layers[0].mlp.up_proj.weight.is_meta  # layers never loaded
    assert own_dtype(streamed) == "float32"


def test_export_float16_runs_and_agrees(tiny_artifacts, tmp_path):
    """--dtype float16 halves weights.bin; ONNX Runtime runs it through the runtime loop (--specee), and
    its tokens agree with the float32 export's (random tiny weights: near ties may flip, so the
    agreement is reported rather than required to be total)."""
    model_dir, arts = tiny_artifacts
    outs = {}
    for dt in ("float32", "float16"):
        out = tmp_path / dt
        assert main(["export", str(model_dir), "-o", str(out), "--artifacts", str(arts), "--max-context", "128",
                     "--dtype", dt]) == 0
        assert json.loads((out / "manifest.json").read_text())["dtype"] == dt
        outs[dt] = out
    size = {dt: (o / "weights.bin").stat().st_size for dt, o in outs.items()}
    assert size["float16"] < 0.6 * size["float32"]
    s = Settings(specee=True, max_new_tokens=16, max_context=128, threshold=0.45, artifacts=str(arts))
    r32, _ = generate_from_artifact(outs["float32"], "hello there", s)
    r16, _ = generate_from_artifact(outs["float16"], "hello there", s)
    same = sum(a == b for a, b in zip(r16.token_ids, r32.token_ids)) / len(r32.token_ids)
    print(f"float16 vs float32 token agreement: {same:.2f}")
    assert len(r16.token_ids) == len(r32.token_ids) and r16.token_ids[:4] == r32.token_ids[:4]
