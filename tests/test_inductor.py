"""The Inductor backend, token for token against eager (the `specee` torch.compile backend: test_dynamo_backend.py).

Compile time is the cost here (CPU Inductor compiles C++): every test uses the same tiny shapes so
Inductor's graph cache serves the later compiles, and prompts stay short enough that the attended
length stays one bucket (S = 64 < T = 128: no S == T specialisation).
"""

from __future__ import annotations

import random

import pytest
import torch
from test_runtime import run_forced, tiny
from transformers import Qwen2Config, Qwen2ForCausalLM

from specee_compile.backends import make_segments
from specee_compile.backends.inductor import InductorSegments
from specee_compile.config import Settings
from specee_compile.program import ExitPoint, Predictors, SpecEEProgram
from specee_compile.runtime.decoder import Decoder

L = 4
PROMPTS = ([5, 17, 42, 99, 3], [7, 7, 8, 200, 13, 1, 64])
BASE = {"max_context": 128, "max_new_tokens": 16}


def llama(seed=1):
    return tiny(num_hidden_layers=L, seed=seed)


def dense_tokens(seg, settings, ids):
    return Decoder(seg, settings).generate(ids).token_ids


class ScriptedInductor(InductorSegments):
    """As test_runtime.ScriptedExits: the compiled exit op runs, the script decides."""

    def __init__(self, *a, plan=None, **k):
        super().__init__(*a, **k)
        self.plan = plan

    def exit_score(self, i, h, rows, p_prev):
        _, z, p = super().exit_score(i, h, rows, p_prev)
        return torch.tensor([1.0 if self.plan(self.step) == i else 0.0]), z, p

    def can_run(self, plan):
        """The script decides on the host, so on CUDA a step with exits composes (per-layer graphs; the whole
        step would decide on the device, past the script). Dense steps still run whole."""
        return plan.candidates is None and super().can_run(plan)


class RecentTokens:
    """Candidates: the k most recent distinct tokens (deterministic; often holds the argmax)."""

    def __init__(self, k=4):
        self.k = k

    def reset(self, prompt_ids, prompt_hidden):
        self.seq = list(prompt_ids)

    def propose(self):
        out = []
        for t in reversed(self.seq):
            if t not in out:
                out.append(t)
            if len(out) == self.k:
                break
        out += [t for t in range(self.k + len(out)) if t not in out][: self.k - len(out)]
        return torch.tensor(out)

    def observe(self, token, hidden, layer):
        self.seq.append(token)

    def truncate(self, length):
        del self.seq[length:]


def random_program(k=4, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    preds = Predictors(
        torch.randn(L - 1, hidden, 3 * k, generator=g),
        torch.randn(L - 1, hidden, generator=g),
        torch.randn(L - 1, hidden, generator=g),
        torch.randn(L - 1, 1, generator=g),
        list(range(L - 1)),
    )
    return SpecEEProgram(
        num_layers=L,
        exit_points=[ExitPoint(i, 0.5) for i in range(L - 1)],
        predictors=preds,
        offline_layers=list(range(L - 1)),
        num_candidates=k,
    )


# ---------------------------------------------------------------- InductorSegments


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_tokens_equal_eager(arch):
    if arch == "llama":
        model = llama()
    else:
        torch.manual_seed(2)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
            )
        ).eval()
    s = Settings(**BASE)
    eager = make_segments(model, s)
    seg = make_segments(model, s.replace(backend="inductor"))
    assert isinstance(seg, InductorSegments)
    for ids in PROMPTS:
        assert dense_tokens(seg, s, ids) == dense_tokens(eager, s, ids)
    stats = seg.compile_stats()
    # prefill (q >= 2) and decode (q = 1): one compile each, shared by every layer
    assert stats["compiles"] == {"layer": 2, "head": 1}, stats


def test_cpu_rows_run_over_the_onednn_weights(monkeypatch):
    """Where the CPU probe picks oneDNN (pinned here), calls of several rows (the prefill) run the eager function over
    the oneDNN weights, as the eager backend does (Inductor would call MKL for them); one row stays compiled, with
    its matmuls as reductions (`inductor_cpu_gemv`). The tokens equal eager's; only the one-row shapes compile,
    before the prefill."""
    monkeypatch.setenv("SPECEE_CPU_GEMM", "onednn")
    model = llama()
    s = Settings(**BASE)
    eager = make_segments(model, s)
    seg = make_segments(model, s.replace(backend="inductor"))
    assert seg.gemm == eager.gemm == "onednn"
    for ids in PROMPTS:
        assert dense_tokens(seg, s, ids) == dense_tokens(eager, s, ids)
    assert seg.compile_stats()["compiles"] == {"layer": 1, "head": 1}


@pytest.mark.parametrize("kv_policy", ["skip", "backfill"])
def test_scripted_exits_equal_eager_tokens_and_cache(kv_policy):
    model = llama()
    s = Settings(**BASE, specee=True, kv_policy=kv_policy, use_schedule=False, max_pending=3)
    rng = random.Random(0)
    table = {st: rng.choice([None, 0, 1, 2]) for st in range(200)}
    ids = PROMPTS[0]
    got, gseg = run_forced(model, s.replace(backend="inductor"), table.get, ids, cls=ScriptedInductor)
    want, eseg = run_forced(model, s, table.get, ids)
    assert got.token_ids == want.token_ids
    assert got.exit_layers == want.exit_layers and any(e < L - 1 for e in got.exit_layers)
    if kv_policy == "backfill":
        assert got.pending_depths == want.pending_depths and got.pending_depths
    assert torch.equal(gseg.cache.valid, eseg.cache.valid)
    torch.testing.assert_close(gseg.cache.k, eseg.cache.k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gseg.cache.v, eseg.cache.v, rtol=1e-4, atol=1e-5)
    assert gseg.compile_stats()["compiles"]["layer"] <= 2


def test_predictor_exits_equal_eager():
    """Exit decisions from the compiled exit op itself (random predictors, a 4-token candidate set)."""
    model = llama(seed=3)
    prog = random_program(seed=1)
    s = Settings(**BASE, specee=True, kv_policy="backfill", use_schedule=False)
    results = []
    for backend in ("eager", "inductor"):
        seg = make_segments(model, s.replace(backend=backend), prog)
        results.append(Decoder(seg, s, program=prog, draft=RecentTokens()).generate(PROMPTS[0]))
    got, want = results[1], results[0]
    assert got.token_ids == want.token_ids
    assert got.exit_layers == want.exit_layers
    assert got.predictor_calls == want.predictor_calls > 0
    assert any(e < L - 1 for e in got.exit_layers)


# ---------------------------------------------------------------- torch.compile(backend="specee")


def hf_generate(model, ids, n):
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(ids) :].tolist()


# ---------------------------------------------------------------- GPU and the real model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_eager_on_gpu():
    model = llama()
    s = Settings(**BASE, device="cuda", specee=True, kv_policy="backfill", use_schedule=False, max_pending=3)
    rng = random.Random(1)
    table = {st: rng.choice([None, 0, 1, 2]) for st in range(200)}
    got, gseg = run_forced(model, s.replace(backend="inductor"), table.get, PROMPTS[0], cls=ScriptedInductor)
    want, _ = run_forced(model, s, table.get, PROMPTS[0])
    assert got.token_ids == want.token_ids and got.exit_layers == want.exit_layers
    assert gseg.compile_stats()["cuda_graphs"] > 0
    dense = s.replace(specee=False)
    seg = make_segments(model, dense.replace(backend="inductor"))
    for _ in range(2):  # second run replays the recorded graphs
        assert dense_tokens(seg, dense, PROMPTS[1]) == dense_tokens(
            make_segments(model, dense), dense, PROMPTS[1]
        )


@pytest.mark.slow
def test_smollm2_inductor_equals_eager():
    from specee_compile.models import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model
    ids = loaded.tokenizer("The capital of France is")["input_ids"]
    s = Settings(max_new_tokens=24, max_context=256)
    want = dense_tokens(make_segments(model, s), s, ids)
    seg = make_segments(model, s.replace(backend="inductor"))
    assert dense_tokens(seg, s, ids) == want
    model.forward = torch.compile(
        model.forward, backend="specee", options={"specee": False, "max_context": 256}
    )
    assert hf_generate(model, ids, 24) == want
