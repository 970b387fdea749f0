"""The compile caches a decoder's start reports (`plugins/compile_cache.py`): the tuners' picks kept on disk, and
`compile_cache` in the stats (Inductor's FX graph cache with them).

The tuners time kernels only on CUDA; the store itself is device-neutral, so it is checked here on the CPU with a
stand-in `tune`. A CUDA test checks that a second process reads the rows tuner's picks instead of timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specee_compile.errors import SettingError
from specee_compile.plugins import compile_cache as cc

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CANDS = [(4, 1024, 1, 4, 1), (8, 512, 2, 4, 1), "eager"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh cache root and a fresh process's view of it."""
    monkeypatch.setenv("SPECEE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setattr(cc, "_STORES", {})
    monkeypatch.setattr(cc, "COUNTS", {"hits": 0, "misses": 0})
    monkeypatch.setattr(cc, "_WARNED", [])
    return tmp_path / "cache" / "tune"


class Tuner:
    """A stand-in for a tuner: returns `pick` and counts its calls."""

    def __init__(self, pick):
        self.pick, self.calls = pick, 0

    def __call__(self):
        self.calls += 1
        return self.pick


def new_process():
    cc._STORES.clear()


def test_a_pick_is_kept_and_read_back_by_the_next_process(store):
    key = ("rows", 32, 12288, 4096, 0, False, torch.float16, torch.device("cpu"))
    t = Tuner((8, 512, 2, 4, 1))
    assert cc.pick("rows", key, CPU, CANDS, t) == (8, 512, 2, 4, 1) and t.calls == 1
    assert cc.COUNTS == {"hits": 0, "misses": 1}
    files = list(store.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary left beside it
    data = json.loads(files[0].read_text())
    assert data["picks"]["rows"] == {"rows|32|12288|4096|0|False|float16|cpu": [8, 512, 2, 4, 1]}
    assert data["fingerprint"] == cc.fingerprint_parts(CPU)
    assert oct(files[0].stat().st_mode & 0o777) == "0o644"
    new_process()
    t2 = Tuner((4, 1024, 1, 4, 1))
    assert cc.pick("rows", key, CPU, CANDS, t2) == (8, 512, 2, 4, 1)  # a tuple again, from disk
    assert t2.calls == 0 and cc.COUNTS == {"hits": 1, "misses": 1}
    new_process()  # a string pick (the eager reference) too
    assert cc.pick("tree_attention", (9, 3, 25, 256, 64), CPU, CANDS, Tuner("eager")) == "eager"
    new_process()
    assert cc.pick("tree_attention", (9, 3, 25, 256, 64), CPU, CANDS, Tuner((8, 512, 2, 4, 1))) == "eager"


def test_a_pick_outside_the_candidates_is_timed_again(store):
    cc.pick("gemv", (4096, 4096), CPU, CANDS, Tuner((4, 1024, 1, 4, 1)))
    new_process()
    t = Tuner((8, 512, 2, 4, 1))  # the kept pick is no longer a candidate (a config was dropped)
    assert cc.pick("gemv", (4096, 4096), CPU, CANDS[1:], t) == (8, 512, 2, 4, 1) and t.calls == 1
    new_process()
    assert cc.pick("gemv", (4096, 4096), CPU, CANDS[1:], Tuner("eager")) == (8, 512, 2, 4, 1)  # replaced


def test_another_fingerprint_starts_another_file(store, monkeypatch):
    cc.pick("gemv", (1, 2), CPU, CANDS, Tuner("eager"))
    new_process()
    monkeypatch.setattr(cc, "_sources_digest", lambda: "edited")  # a kernel or its candidates changed
    t = Tuner((4, 1024, 1, 4, 1))
    assert cc.pick("gemv", (1, 2), CPU, CANDS, t) == (4, 1024, 1, 4, 1) and t.calls == 1
    assert len(list(store.iterdir())) == 2


def test_a_corrupt_or_foreign_file_is_replaced(store):
    cc.pick("gemv", (1, 2), CPU, CANDS, Tuner("eager"))
    (path,) = store.iterdir()
    for text in ("{not json", json.dumps({"fingerprint": {"name": "other"}, "picks": {"gemv": {"1|2": "eager"}}})):
        path.write_text(text)
        new_process()
        t = Tuner((4, 1024, 1, 4, 1))
        assert cc.pick("gemv", (1, 2), CPU, CANDS, t) == (4, 1024, 1, 4, 1) and t.calls == 1
        assert json.loads(path.read_text())["picks"] == {"gemv": {"1|2": [4, 1024, 1, 4, 1]}}


def test_picks_of_two_processes_are_merged(store):
    cc.pick("gemv", (1, 2), CPU, CANDS, Tuner("eager"))
    other = dict(cc._STORES)  # a second process that loaded the file before the first wrote its next pick
    new_process()
    cc.pick("gemv", (3, 4), CPU, CANDS, Tuner((4, 1024, 1, 4, 1)))
    cc._STORES.clear()
    cc._STORES.update(other)
    cc.pick("rows", (5,), CPU, CANDS, Tuner("eager"))
    (path,) = store.iterdir()
    assert json.loads(path.read_text())["picks"] == {"gemv": {"1|2": "eager", "3|4": [4, 1024, 1, 4, 1]},
                                                     "rows": {"5": "eager"}}


def test_off_times_every_shape_and_writes_nothing(store, monkeypatch):
    monkeypatch.setenv(cc.ENV, "0")
    t = Tuner("eager")
    cc.pick("gemv", (1, 2), CPU, CANDS, t)
    cc.pick("gemv", (1, 2), CPU, CANDS, t)
    assert t.calls == 2 and not store.exists() and cc.COUNTS == {"hits": 0, "misses": 2}
    monkeypatch.setenv(cc.ENV, "yes")
    with pytest.raises(SettingError, match=r"SPECEE_TUNE_CACHE='yes': expected 0 .* or 1"):
        cc.enabled()


@pytest.mark.parametrize("var,bad", [(cc.ENV, "2"), ("SPECEE_PDL", "1"), ("SPECEE_TREE_LINEARS", "cublas"),
                                     ("SPECEE_GEMV_MAX_ROWS", "64"), ("SPECEE_GEMV_CONFIG", "4,1024")])
def test_settings_check_the_cuda_variables_before_a_model_loads(monkeypatch, var, bad):
    """Every variable of README's table that the CUDA kernels read is refused in one line by the settings, before
    any model loads (not at its first use, minutes into a start)."""
    from specee_compile.config import Settings

    monkeypatch.setenv(var, bad)
    with pytest.raises(SettingError, match=f"{var}={bad!r}: expected"):
        Settings(device="cuda")
    Settings(device="cpu")  # none of them is read on the CPU


def test_an_unwritable_cache_costs_only_the_time(store, capsys):
    store.parent.mkdir(parents=True)
    store.write_text("a file where the directory would go")
    t = Tuner("eager")
    assert cc.pick("gemv", (1, 2), CPU, CANDS, t) == "eager"
    assert cc.pick("gemv", (3, 4), CPU, CANDS, t) == "eager"
    assert cc.pick("gemv", (1, 2), CPU, CANDS, t) == "eager" and t.calls == 2  # kept for the process
    err = capsys.readouterr().err
    assert err.count("warning: the tuners' picks are not kept on disk") == 1 and "SPECEE_TUNE_CACHE=0" in err


def test_report_states():
    zero = {"inductor": {"hits": 0, "misses": 0}, "tuner": {"hits": 0, "misses": 0}}

    def after(ih, im, th, tm):
        return {"inductor": {"hits": ih, "misses": im}, "tuner": {"hits": th, "misses": tm}}

    assert cc.report(zero, zero)["state"] == "none"
    assert cc.report(zero, after(3, 0, 2, 0))["state"] == "hit"
    assert cc.report(zero, after(0, 3, 0, 1))["state"] == "miss"
    r = cc.report(after(1, 1, 0, 0), after(4, 1, 0, 2))
    assert r == {"inductor": {"hits": 3, "misses": 0}, "tuner": {"hits": 0, "misses": 2}, "state": "partial"}


def _generate(model_dir: Path, tmp: Path, stats: Path) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"), "SPECEE_CACHE": str(tmp / "cache"),
           "SPECEE_CPU_GEMM": "mkl"}  # pinned: where the CPU's timed choice flips, the next start compiles anew
    r = subprocess.run([sys.executable, "-m", "specee_compile.cli", "generate", str(model_dir), "hello there",
                        "--backend", "inductor", "--max-new-tokens", "3", "--max-context", "64",
                        "--stats-json", str(stats)], env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(stats.read_text()), r.stderr


def test_a_second_start_reads_inductors_cache_and_says_so(tiny_model_dir, tmp_path):
    """Two processes, one Inductor cache directory: the first compiles (a miss), the second reads every graph
    back (a hit); both say so in the stats and on generate's closing line, and decode the same tokens."""
    first, err1 = _generate(tiny_model_dir, tmp_path, tmp_path / "a.json")
    second, err2 = _generate(tiny_model_dir, tmp_path, tmp_path / "b.json")
    c1, c2 = first["compile_cache"], second["compile_cache"]
    assert c1["state"] == "miss" and c1["inductor"]["misses"] > 0, c1
    assert c2["state"] == "hit" and c2["inductor"]["hits"] == c1["inductor"]["misses"], c2
    assert "(cache miss)" in err1 and "(cache hit)" in err2
    assert first["token_ids"] == second["token_ids"]
    for stats in (first, second):  # the engine issue's timing fields, each its own phase
        assert all(stats[k] > 0 for k in ("load_s", "compile_s", "prefill_s", "decode_tokens_per_s")), stats
    assert second["compile_s"] < first["compile_s"]  # read back, not compiled


def test_eager_compiles_nothing(tiny_llama):
    from test_tree import PROMPT, dense

    res = dense(tiny_llama, PROMPT, 3).stats()
    assert res["compile_cache"]["state"] == "none"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuners run on CUDA")
def test_cuda_a_second_process_reads_the_rows_tuners_picks(tmp_path):
    code = ("import torch, json\n"
            "from specee_compile import ops\n"
            "from specee_compile.plugins import compile_cache as cc, triton_gemv\n"
            "triton_gemv.register_cuda_impl()\n"
            "x = torch.randn(1, 24, 576, device='cuda', dtype=torch.float16)\n"
            "w = torch.randn(1536, 576, device='cuda', dtype=torch.float16)\n"
            "with ops.multi_row_kernel():  # the rows kernel (and its tuner) serve the op only inside\n"
            "    y = torch.ops.specee.fused_linear(x, w, None, None, 0.0, 'none')\n"
            "ref = x @ w.T\n"
            "print(json.dumps({'counts': cc.COUNTS, 'err': float((y - ref).abs().max() / ref.abs().max())}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECEE_CACHE": str(tmp_path), cc.ENV: "1"}
    out = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                           check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert out[0]["counts"]["misses"] >= 1 and out[0]["counts"]["hits"] == 0
    assert out[1]["counts"] == {"hits": out[0]["counts"]["misses"], "misses": 0}
    assert out[0]["err"] < 1e-2 and out[1]["err"] < 1e-2
