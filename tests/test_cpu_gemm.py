"""The eager backend's CPU matmul library (backends/cpu_gemm.py): MKL or oneDNN, timed on this machine before
the first token; `SPECEE_CPU_GEMM` pins it. Both give dense greedy's tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from specee_compile.backends import cpu_gemm, make_segments
from specee_compile.config import Settings
from specee_compile.errors import SettingError
from specee_compile.model_step import plain_linear
from specee_compile.runtime.decoder import Decoder

PROMPT = [1, 5, 9, 33, 70, 12]
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3])
def test_onednn_linear_is_f_linear(rows):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, rows, 96, generator=g), torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    ow = cpu_gemm.onednn_form(w)
    assert ow.is_mkldnn and cpu_gemm.onednn_form(b) is b and cpu_gemm.onednn_form(None) is None
    for bias in (None, b):
        want = torch.nn.functional.linear(x, w, bias)
        got = plain_linear(x, ow, bias)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pick_follows_the_setting_and_times_both_on_auto(monkeypatch):
    seg = make_segments(make_tiny_llama(), Settings(max_new_tokens=4))
    monkeypatch.setenv("SPECEE_CPU_GEMM", "mkl")
    assert cpu_gemm.pick(seg.weights) == ("mkl", {"setting": "mkl"})
    monkeypatch.setenv("SPECEE_CPU_GEMM", "bogus")
    with pytest.raises(SettingError, match="SPECEE_CPU_GEMM='bogus': expected one of auto, mkl, onednn"):
        cpu_gemm.pick(seg.weights)
    if not torch.backends.mkldnn.is_available():
        return
    monkeypatch.setenv("SPECEE_CPU_GEMM", "onednn")
    assert cpu_gemm.pick(seg.weights)[0] == "onednn"
    monkeypatch.setenv("SPECEE_CPU_GEMM", "auto")
    choice, info = cpu_gemm.pick(seg.weights)
    ms = info["lm_head_ms"]
    assert set(ms) == {"mkl_1", "mkl_3", "onednn_1", "onednn_3"} and all(v > 0 for v in ms.values())
    assert choice == ("onednn" if ms["onednn_1"] + ms["onednn_3"] < ms["mkl_1"] + ms["mkl_3"] else "mkl")
    timed = []  # a second decoder of the same shape in this process: the same times, not timed again
    monkeypatch.setattr(cpu_gemm, "_best_ms", lambda fn, reps=5: timed.append(fn) or 1.0)
    assert cpu_gemm.pick(seg.weights) == (choice, info) and not timed
    monkeypatch.setattr(cpu_gemm, "_available_bytes", lambda: 1000)  # the copy would not fit: MKL, no timing
    choice, info = cpu_gemm.pick(seg.weights)
    assert choice == "mkl" and "would not fit" in info["reason"]


@needs_onednn
def test_both_libraries_give_dense_greedy_tokens_dense_and_tree(monkeypatch):
    from test_tree import eagle_tree

    model = make_tiny_llama()
    out = {}
    for lib in ("mkl", "onednn"):
        monkeypatch.setenv("SPECEE_CPU_GEMM", lib)
        s = Settings(max_new_tokens=30)
        seg = make_segments(model, s)
        assert seg.gemm == lib and isinstance(seg.layer_weights(0)[1], torch.Tensor)
        assert seg.layer_weights(0)[1].is_mkldnn == (lib == "onednn")
        dense = Decoder(seg, s).generate(PROMPT)
        assert dense.stats()["gemm"]["choice"] == lib
        st = s.replace(speculate="tree")
        tree = Decoder(make_segments(model, st), st, draft=eagle_tree(model)).generate(PROMPT)
        assert tree.token_ids == dense.token_ids
        out[lib] = dense.token_ids
    assert out["mkl"] == out["onednn"]


def test_a_bad_setting_is_one_line_and_exit_2(capsys, monkeypatch, tiny_model_dir):
    from specee_compile.cli import main

    capsys.readouterr()
    monkeypatch.setenv("SPECEE_CPU_GEMM", "fast")
    assert main(["generate", str(tiny_model_dir), "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "SPECEE_CPU_GEMM='fast'" in err and len(err.strip().splitlines()) == 1


@needs_onednn
def test_the_draft_follows_the_cpu_choice_and_its_copies_follow_the_weights():
    """A draft told to use oneDNN proposes what it proposes with F.linear; its copies are made again when the
    weights change in place (quantization) or are replaced (a new head), and training keeps F.linear."""
    from test_draft_quant import _fresh

    from specee_compile.draft.eagle import EagleSource

    model = make_tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (20,), generator=g).tolist()
    hid = torch.randn(20, 64, generator=g)

    def proposals(d):
        src = EagleSource(d, k=4)
        src.reset(ids[:8], hid[:8])
        out = [src.propose().tolist()]
        for t in range(8, 16):
            src.observe(ids[t], hid[t - 1], 3)
            out.append(src.propose().tolist())
        return out

    d = _fresh(model, torch.arange(128), scale=0.2)
    want = proposals(d)
    d.use_cpu_gemm("onednn")
    with torch.no_grad():
        assert proposals(d) == want
        x = torch.randn(2, 64)
        assert torch.allclose(d.logits(x), x @ d.head_rows.T, rtol=1e-5, atol=1e-5)
        d.quantize("int8")  # in place: the copies must follow
        fc_in = torch.randn(1, 2, 128)
        assert torch.allclose(d.fc(fc_in), torch.nn.functional.linear(fc_in, d.fc.weight, d.fc.bias), atol=1e-5)
        assert torch.allclose(d.logits(x), x @ d.head_rows.T, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # training: F.linear, gradients flow
        y = d.fc(fc_in.requires_grad_())
        assert y.requires_grad
    d.use_cpu_gemm("mkl")
    assert d.fc.gemm is None
