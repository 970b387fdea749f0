"""The CLI: one clear line and exit code 2 on bad input, no traceback; stats JSON on success."""

from __future__ import annotations

import json

from specee_compile.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_models_lists_the_zoo(capsys):
    rc, out, _ = run(capsys, "models")
    assert rc == 0 and "smollm2-135m" in out and "meta-llama/Llama-2-7b-chat-hf" in out


def test_unknown_model(capsys):
    rc, _, err = run(capsys, "generate", "no-such-model", "hi")
    assert rc == 2 and "unknown model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_path(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", str(tmp_path / "missing" / "dir"), "hi")
    assert rc == 2 and "no such file or directory" in err


def test_wrong_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    rc, _, err = run(capsys, "generate", str(tmp_path), "hi")
    assert rc == 2 and "GPT2LMHeadModel" in err


def test_empty_prompt_and_too_long_context(capsys, tiny_model_dir):
    rc, _, err = run(capsys, "generate", str(tiny_model_dir), "   ")
    assert rc == 2 and "prompt is empty" in err
    rc, _, err = run(capsys, "generate", str(tiny_model_dir), "x" * 200, "--max-context", "64")
    assert rc == 2 and "exceeds the context of 64" in err


def test_generate_writes_stats(capsys, tiny_model_dir, tmp_path):
    stats = tmp_path / "s.json"
    rc, out, err = run(capsys, "generate", str(tiny_model_dir), "hello", "--max-new-tokens", "5",
                       "--stats-json", str(stats), "--max-context", "64")
    assert rc == 0 and "tok/s" in err
    data = json.loads(stats.read_text())
    assert len(data["token_ids"]) <= 5 and data["num_layers"] == 4 and data["avg_layers"] == 4.0
    assert data["tokens_per_s"] > 0


def test_specee_without_artifacts_says_what_to_do(capsys, tiny_model_dir):
    rc, _, err = run(capsys, "generate", str(tiny_model_dir), "hello", "--specee", "--max-context", "64")
    assert rc == 2 and "specee-compile train" in err


def test_unusable_device(capsys, tiny_model_dir, tmp_path):
    import pytest
    import torch

    rc, _, err = run(capsys, "generate", str(tiny_model_dir), "hi", "--device", "tpu9")
    assert rc == 2 and "unknown device 'tpu9'" in err and "Traceback" not in err
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run(capsys, "generate", str(tiny_model_dir), "hi", "--device", "cuda")
    assert rc == 2 and "no usable CUDA device" in err and "--device cpu" in err
    rc, _, err = run(capsys, "eval", str(tiny_model_dir), "--mtbench", "1", "--squad", "0", "--device", "cuda",
                     "--out", str(tmp_path / "ev"))
    assert rc == 2 and "no usable CUDA device" in err and not (tmp_path / "ev").exists()


def test_summary_line_counts_tokens_not_steps():
    """A tree step emits several tokens: the closing line's decode rate is tokens per second (it was verify steps
    per second), and a tree the guard declined says so."""
    from specee_compile.cli import summary_line
    from specee_compile.runtime.decoder import GenerationResult

    res = GenerationResult(prompt_len=3, token_ids=list(range(11)), num_layers=4, exit_layers=[3] * 11,
                           decode_steps=6, verify_steps=4, accepted_tokens=8, decode_s=1.0, layer_passes=24)
    line = summary_line(res)
    assert "decode 10.0 tok/s" in line and "2.00 tokens/verify step" in line and "declined" not in line
    res.tree_guard = {"declined": "after 8 verify steps the tree accepted 1.20 tokens per step"}
    assert "tree declined: after 8 verify steps" in summary_line(res)
