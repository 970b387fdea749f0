"""Bad input and faults (issue 12): nothing lost, nothing bypassed, no tracebacks.

One test per defect class of the issue, plus a fault test that sends SIGTERM to a running export.
Everything runs on the tiny random-weight Llama of conftest.py; one export is shared by the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from specee_compile.api import save_program_artifacts
from specee_compile.artifacts import atomic_directory, read_manifest
from specee_compile.cli import main
from specee_compile.config import Settings
from specee_compile.errors import ArtifactError, SpecEEError
from specee_compile.predictors.mlp import PredictorBank

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers and fixtures

def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("Loading weights", "Writing model"))]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("specee-compile: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def rehash(directory: Path) -> None:
    """Rewrite the manifest's checksums to match the files as they are now (what an attacker would do)."""
    m = json.loads((directory / "manifest.json").read_text())
    for rel in m["files"]:
        data = (directory / rel).read_bytes()
        m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(m))


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, artifact dir, exported dir) for the tiny Llama; exported once per module."""
    from specee_compile.export import export_command
    from specee_compile.models import load_model

    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir = root / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    loaded = load_model(str(model_dir))
    arts = root / "arts"
    write_arts(arts, loaded)
    exported = root / "exported"
    export_command(str(model_dir), str(exported), artifacts=str(arts), max_context=64)
    return model_dir, arts, exported, loaded


def write_arts(out: Path, loaded, seed: int = 1, **kw) -> dict:
    L = loaded.model.config.num_hidden_layers
    bank = PredictorBank.init(L - 1, k=4, hidden=16, seed=seed)
    bank.thresholds = torch.full((L - 1,), 0.4)
    return save_program_artifacts(out, loaded, bank, source="ngram", offline_layers=[1], **kw)


# ---------------------------------------------------------------- 1. -o never deletes what it did not write

def test_output_dir_never_loses_user_files(tiny, tmp_path, capsys, monkeypatch):
    model_dir, arts, _, loaded = tiny
    # a directory holding a user's file: refused (naming --force) before any work; the file stays
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep").write_text("x")
    with pytest.raises(ArtifactError, match="--force"):
        write_arts(d, loaded)
    rc, _, err = cli(capsys, "export", model_dir, "-o", d, "--artifacts", arts, "--max-context", "64")
    one_line_error(rc, err, "--force")
    assert (d / "keep").read_text() == "x" and sorted(os.listdir(d)) == ["keep"]
    # -o . (the current directory) likewise
    monkeypatch.chdir(d)
    rc, _, err = cli(capsys, "export", model_dir, "-o", ".", "--artifacts", arts)
    one_line_error(rc, err, "--force")
    assert sorted(os.listdir(d)) == ["keep"]
    # a file target is refused, even with --force, and is neither moved nor hidden
    f = tmp_path / "afile"
    f.write_text("mine")
    for extra in ([], ["--force"]):
        rc, _, err = cli(capsys, "export", model_dir, "-o", f, "--artifacts", arts, *extra)
        one_line_error(rc, err, "file")
    rc, _, err = cli(capsys, "train", model_dir, "-o", f, "--num-texts", "2")
    one_line_error(rc, err, "file")
    assert f.read_text() == "mine" and hidden(tmp_path) == []
    # --force adds the artifact beside the user's file, which is kept; the result loads
    write_arts(d, loaded, force=True)
    assert (d / "keep").read_text() == "x" and read_manifest(d)["fingerprint"] == loaded.fingerprint
    # a directory holding only our artifact is replaced as a whole once the new one is complete
    a = tmp_path / "a"
    first = write_arts(a, loaded, seed=1)
    second = write_arts(a, loaded, seed=2)
    assert first["files"] != second["files"] and read_manifest(a)["files"] == second["files"]
    # ... but not if the user put a file of their own into it (unless --force, which keeps it)
    (a / "notes.txt").write_text("n")
    with pytest.raises(ArtifactError, match="--force"):
        write_arts(a, loaded, seed=3)
    third = write_arts(a, loaded, seed=3, force=True)
    assert (a / "notes.txt").read_text() == "n" and read_manifest(a)["files"] == third["files"]
    # --force never overwrites a file the loader would read that we did not write
    e = tmp_path / "e"
    e.mkdir()
    (e / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="did not write"):
        write_arts(e, loaded, force=True)
    assert (e / "tokenizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------- 2. the manifest cannot be bypassed

def test_manifest_covers_every_file_the_loader_reads(tiny, tmp_path, capsys):
    from specee_compile.api import load_program

    _, arts, _, loaded = tiny
    d = tmp_path / "arts"
    shutil.copytree(arts, d)
    m = json.loads((d / "manifest.json").read_text())

    def with_files(files) -> None:
        (d / "manifest.json").write_text(json.dumps({**m, "files": files}))

    # an entry left out of `files`: the predictors it names are never read unchecked
    with_files({k: v for k, v in m["files"].items() if k != "predictors.safetensors"})
    with pytest.raises(ArtifactError, match="predictors.safetensors is present but not listed"):
        load_program(d, loaded, Settings())
    rc, _, err = cli(capsys, "generate", tiny[0], "hi", "--specee", "--artifacts", d, "--max-context", "64")
    one_line_error(rc, err, "not listed")
    # entries outside the directory: relative escapes, absolute paths, links out
    for bad, why in (("../../../../etc/passwd", "leaves the artifact directory"), ("/etc/passwd", "absolute"),
                     ("a/../../x", "leaves")):
        with_files({**m["files"], bad: {"sha256": "0" * 64, "bytes": 1}})
        with pytest.raises(ArtifactError, match=why):
            read_manifest(d)
    (d / "link").symlink_to("/etc/hostname")
    with_files({**m["files"], "link": {"sha256": "0" * 64, "bytes": 1}})
    with pytest.raises(ArtifactError, match="points outside"):
        read_manifest(d)
    # an entry that is not a regular file (a FIFO would block a reader like /dev/zero never ends): refused
    os.mkfifo(d / "fifo")
    with_files({**m["files"], "fifo": {"sha256": "0" * 64, "bytes": 0}})
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match="not a regular file"):
        read_manifest(d)
    assert time.perf_counter() - t0 < 5
    # unlisted files a loader never reads are ignored
    with_files(m["files"])
    (d / "link").unlink()
    (d / "fifo").unlink()
    (d / "README.txt").write_text("notes")
    assert read_manifest(d)["files"] == m["files"]
    # malformed manifests: one clear ArtifactError each
    for bad, why in (([1, 2], "JSON list"), ({**m, "files": ["predictors.safetensors"]}, "`files` is a JSON list"),
                     ({**m, "files": {"predictors.safetensors": {"sha256": "0" * 64}}}, "bytes"),
                     ({**m, "files": {"predictors.safetensors": "abc"}}, "expected {sha256, bytes}")):
        (d / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ArtifactError, match=why):
            read_manifest(d)
        rc, _, err = cli(capsys, "generate", tiny[0], "hi", "--specee", "--artifacts", d, "--max-context", "64")
        one_line_error(rc, err)


def test_exported_dir_cross_checks_graphs_and_tokenizer(tiny, tmp_path, capsys):
    _, _, exported, _ = tiny
    # the untouched export reads and generates
    rc, _out, err = cli(capsys, "generate", exported, "hi", "--backend", "onnx", "--specee", "--max-new-tokens", "3")
    assert rc == 0, err
    # graphs swapped (and the manifest re-hashed to match): refused
    d = tmp_path / "swapped"
    shutil.copytree(exported, d)
    os.replace(d / "prefill.onnx", d / "tmp.onnx")
    os.replace(d / "decode_step.onnx", d / "prefill.onnx")
    os.replace(d / "tmp.onnx", d / "decode_step.onnx")
    rehash(d)
    with pytest.raises(ArtifactError, match="swapped"):
        read_manifest(d)
    rc, _, err = cli(capsys, "generate", d, "hi", "--backend", "onnx", "--specee")
    one_line_error(rc, err, "swapped")
    # another tokenizer (re-hashed manifest): refused, it is not the one the graphs were exported with
    d = tmp_path / "tok"
    shutil.copytree(exported, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<pad>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    rehash(d)
    with pytest.raises(ArtifactError, match="tokenizer"):
        read_manifest(d)
    # a manifest claiming another model: the graphs' fingerprint disagrees
    d = tmp_path / "fp"
    shutil.copytree(exported, d)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "fingerprint": "cfg:000000000000-w:000000000000"}))
    with pytest.raises(ArtifactError, match="fingerprint"):
        read_manifest(d)


# ---------------------------------------------------------------- 3. temp directories never leak

def test_temp_dirs_cleaned_on_failure_rename_and_stale(tiny, tmp_path, monkeypatch):
    _, _, _, loaded = tiny
    out = tmp_path / "arts"
    write_arts(out, loaded)
    before = (out / "manifest.json").read_text()
    # the block fails: nothing left, old kept
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert hidden(tmp_path) == [] and (out / "manifest.json").read_text() == before
    # the final rename fails: the finished artifact is not left hidden, the old one is back
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(ArtifactError, match="No space left"):
        write_arts(out, loaded, seed=5)
    monkeypatch.setattr(os, "rename", real_rename)
    assert hidden(tmp_path) == [] and (out / "manifest.json").read_text() == before
    # stale temp dirs of killed runs are removed when the same target is written again; a live one stays
    dead = tmp_path / ".arts.tmp-999999999-abc"
    old_style = tmp_path / ".arts.tmp-k2j3h4"
    live = tmp_path / f".arts.tmp-{os.getppid()}-xyz"
    for p in (dead, old_style, live):
        p.mkdir()
        (p / "weights.bin").write_bytes(b"0" * 10)
    write_arts(out, loaded, seed=6)
    assert hidden(tmp_path) == [live.name]


def test_sigterm_during_export_leaves_no_temp_and_keeps_old(tiny, tmp_path):
    model_dir, arts, exported, _ = tiny
    out = tmp_path / "ex"
    shutil.copytree(exported, out)
    before = (out / "manifest.json").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "specee_compile.cli", "export", str(model_dir), "-o", str(out), "--artifacts",
         str(arts), "--max-context", "64"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".ex.tmp-")]
            if tmps and any(tmps[0].iterdir()):  # the export is writing into its temp dir
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "interrupted (SIGTERM)" in err
    assert hidden(tmp_path) == []
    assert (out / "manifest.json").read_text() == before
    read_manifest(out)


# ---------------------------------------------------------------- 4. outputs checked before any work

def test_outputs_checked_before_work(tiny, tmp_path, capsys, monkeypatch):
    model_dir, arts, _, _ = tiny
    from specee_compile import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = cli(capsys, "train", model_dir, "-o", f / "out", "--num-texts", "2")
    one_line_error(rc, err, "not a directory")
    rc, _, err = cli(capsys, "train-draft", model_dir, "-o", f / "out", "--steps", "1")
    one_line_error(rc, err)
    rc, _, err = cli(capsys, "export", model_dir, "-o", f / "out", "--artifacts", arts)
    one_line_error(rc, err)
    for bad, why in ((tmp_path / "missing" / "s.json", "does not exist"), (tmp_path, "is a directory"),
                     (f / "s.json", "does not exist")):
        rc, out, err = cli(capsys, "generate", model_dir, "hi", "--stats-json", bad)
        one_line_error(rc, err, why)
        assert out == ""
    rc, _, err = cli(capsys, "generate", model_dir, "hi", "--dump-graphs", f / "graphs")
    one_line_error(rc, err, "--dump-graphs")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if os.geteuid() != 0:  # root writes anywhere: a read-only directory only stops other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        rc, _, err = cli(capsys, "train", model_dir, "-o", ro / "out", "--num-texts", "2")
        one_line_error(rc, err, "not writable")


# ---------------------------------------------------------------- 5. bench and Ctrl-C

def test_bench_refuses_without_cuda_and_interrupt_is_one_line(capsys, monkeypatch):
    import specee_compile.cli as cli_mod
    from specee_compile.errors import Interrupted

    if not torch.cuda.is_available():
        rc, _, err = cli(capsys, "bench")
        one_line_error(rc, err, "--tiny")
    rc, _, err = cli(capsys, "bench", "--device", "cpu")
    one_line_error(rc, err, "--tiny")

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "_check_numbers", interrupt)
    rc, _, err = cli(capsys, "models")
    assert rc == 130 and err.strip() == "specee-compile: interrupted (Ctrl-C)"

    def term(args):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli_mod, "_check_numbers", term)
    rc, _, err = cli(capsys, "models")
    assert rc == 143 and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 6. one line, not a traceback

def test_bad_values_are_one_line_errors(tiny, tmp_path, capsys):
    model_dir, _, _, _ = tiny
    rc, _, err = cli(capsys, "generate", model_dir, "hi", "--max-context", "-5")
    one_line_error(rc, err, "--max-context")
    rc, _, err = cli(capsys, "export", model_dir, "--max-context", "-5")
    one_line_error(rc, err, "--max-context")
    for prompt in ("bad \udcff byte", "lone \ud800 surrogate"):
        rc, _, err = cli(capsys, "generate", model_dir, prompt, "--max-context", "64")
        one_line_error(rc, err, "UTF-8")
    # invalid UTF-8 bytes on a real command line
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable.encode(), b"-m", b"specee_compile.cli", b"generate", str(model_dir).encode(),
                        b"caf\xe9 \xff", b"--max-context", b"64"], env=env, capture_output=True, timeout=300,
                       check=False)
    one_line_error(r.returncode, r.stderr.decode(errors="replace"), "UTF-8")
    # a corrupt or truncated model.safetensors
    bad = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    for blob in (data[:100], data[: len(data) // 2], b"\xff" * 64):
        (bad / "model.safetensors").write_bytes(blob)
        rc, _, err = cli(capsys, "generate", bad, "hi", "--max-context", "64")
        one_line_error(rc, err, "corrupt")


# ---------------------------------------------------------------- 7. invalid numbers are refused

def test_invalid_numbers_are_refused(tiny, capsys):
    model_dir, arts, _, _ = tiny
    for argv, flag in ((["train", model_dir, "-o", "never", "--num-texts", "-5"], "--num-texts"),
                       (["train", model_dir, "-o", "never", "--target-precision", "0"], "--target-precision"),
                       (["train", model_dir, "-o", "never", "--target-precision", "1.5"], "--target-precision"),
                       (["train-draft", model_dir, "-o", "never", "--steps", "-5"], "--steps"),
                       (["train-draft", model_dir, "-o", "never", "--steps", "0"], "--steps"),
                       (["generate", model_dir, "hi", "--temperature", "-1"], "--temperature"),
                       (["generate", model_dir, "hi", "--temperature", "nan"], "--temperature"),
                       (["generate", model_dir, "hi", "--top-p", "5"], "--top-p"),
                       (["generate", model_dir, "hi", "--top-p", "0"], "--top-p"),
                       (["generate", model_dir, "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
                       (["generate", model_dir, "hi", "--max-pending", "-1"], "--max-pending"),
                       (["generate", model_dir, "hi", "--threshold", "1.5"], "--threshold"),
                       (["generate", model_dir, "hi", "--artifacts", arts], "--specee")):
        rc, _, err = cli(capsys, *argv)
        one_line_error(rc, err, flag)
    assert not Path("never").exists()
    for kw, what in (({"max_new_tokens": "8"}, "max_new_tokens"), ({"top_p": 5}, "top_p"),
                     ({"temperature": -1}, "temperature"), ({"max_context": 0}, "max_context"),
                     ({"specee": "yes"}, "specee"), ({"max_pending": 1.5}, "max_pending"),
                     ({"threshold": "0.5"}, "threshold"), ({"online_offsets": ("a",)}, "online_offsets")):
        with pytest.raises(SpecEEError, match=what):
            Settings(**kw)
    assert Settings(max_new_tokens=8, top_p=1, temperature=0).top_p == 1.0


# ---------------------------------------------------------------- 9. --backend onnx on a model, not an export

def test_onnx_backend_on_a_model_says_export(tiny, capsys):
    model_dir = tiny[0]
    rc, _, err = cli(capsys, "generate", model_dir, "hi", "--backend", "onnx")
    one_line_error(rc, err, f"specee-compile export {model_dir}")
    assert "train" not in err


@pytest.mark.parametrize("argv,says", [
    (["generate", "m", "p", "--draft-dtype", "float64"], "argument --draft-dtype: invalid choice: 'float64'"),
    (["generate"], "the following arguments are required: model, prompt"),
    (["bogus"], "argument command: invalid choice: 'bogus'"),
    (["export", "m", "-o", "d", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_usage_errors_are_one_line_with_where_the_help_is(capsys, argv, says):
    """argparse's own errors (bad choice, missing argument, unknown command or flag) as every other bad input: one
    line, exit code 2, no usage dump."""
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and says in err and "--help`" in err and len(err.strip().splitlines()) == 1


def test_artifact_draft_is_hashed_once_at_start_and_checked(tiny, tmp_path, monkeypatch):
    """load_program verifies the whole manifest, the draft included, so its draft loader does not hash the draft
    again (7B drafts are ~0.5 GB); a draft changed after the manifest was written is still refused."""
    from specee_compile import artifacts
    from specee_compile.api import load_program
    from specee_compile.draft import EagleDraft

    _, _, _, loaded = tiny
    arts = tmp_path / "arts"
    write_arts(arts, loaded, draft=EagleDraft(loaded.model))
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    _, draft, _, _ = load_program(arts, loaded, Settings(specee=True))
    assert draft is not None and hashed.count("draft.safetensors") == 1
    raw = bytearray((arts / "draft.safetensors").read_bytes())
    raw[-1] ^= 1
    (arts / "draft.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="draft.safetensors checksum differs"):
        load_program(arts, loaded, Settings(specee=True))
