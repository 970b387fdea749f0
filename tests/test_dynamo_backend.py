"""`torch.compile(model.forward, backend="specee")` under Hugging Face `generate()`.

Token for token against the runtime's own Decoder (dense, approximate exits) and against dense
greedy (lossless exits, which the backend verifies before handing a token to generate()); one runner
per model and options, and no dynamo recompile on a second generate(); option errors reach the caller
as SpecEEError, not wrapped by dynamo. Tiny random-weight Llamas; the eager segment backend except
where the Inductor segments are the point (the default backend), to keep compile time down.
"""

from __future__ import annotations

import pytest
import torch
from test_inductor import BASE, PROMPTS, L, RecentTokens, dense_tokens, llama, random_program
from torch._dynamo.utils import counters

from specee_compile.backends import dynamo_backend as db
from specee_compile.backends import make_segments
from specee_compile.backends.dynamo_backend import last_result
from specee_compile.config import Settings
from specee_compile.errors import ArtifactError, SpecEEError
from specee_compile.runtime.decoder import Decoder


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def hf_generate(model, ids, n, **kw):
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw
    )
    return out[0, len(ids) :].tolist()


def compiled(model, **options):
    model.forward = torch.compile(model.forward, backend="specee", options=options)
    return model


def test_specee_is_a_registered_dynamo_backend():
    assert "specee" in torch._dynamo.list_backends()


# ---------------------------------------------------------------- tokens


def test_generate_through_backend_dense_equals_eager_decoder():
    """The default segment backend (Inductor) behind generate()."""
    model = llama()
    s = Settings(**BASE)
    want = [dense_tokens(make_segments(model, s), s, ids) for ids in PROMPTS]
    assert hf_generate(model, PROMPTS[0], 16) == want[0]  # plain HF
    compiled(model, specee=False, max_context=128)
    assert hf_generate(model, PROMPTS[0], 16) == want[0]
    assert hf_generate(model, PROMPTS[1], 16) == want[1]
    assert last_result(model).exit_layers == [L - 1] * 16


def test_generate_through_backend_with_exits_equals_eager_decoder():
    model = llama(seed=3)
    prog, draft = random_program(seed=1), RecentTokens()
    opts = {"kv_policy": "backfill", "use_schedule": False, "backend": "eager"}
    s = Settings(**BASE, specee=True, **opts)
    want = Decoder(make_segments(model, s, prog), s, program=prog, draft=draft).generate(PROMPTS[0])
    compiled(model, program=prog, draft=draft, max_context=128, **opts)
    assert hf_generate(model, PROMPTS[0], 16) == want.token_ids
    got = last_result(model)
    assert got.exit_layers == want.exit_layers and any(e < L - 1 for e in got.exit_layers)


class Clock:
    """A generate() streamer: what generate() appended, in order (put #1 is the prompt)."""

    def __init__(self):
        self.seen = []

    def put(self, value):
        self.seen.extend(value.reshape(-1).tolist())

    def end(self):
        pass


def test_lossless_through_generate_equals_dense_greedy():
    """Lossless exits roll back; generate() must only ever see verified tokens (a streamer sees each
    token as generate() appends it), so it gets the dense greedy output, while exits and rollbacks did
    happen behind it."""
    model = llama(seed=3)
    n = 24
    want = {tuple(ids): hf_generate(model, ids, n) for ids in PROMPTS}  # plain HF greedy
    compiled(model, program=random_program(seed=1), draft=RecentTokens(), mode="lossless", use_schedule=False,
             backend="eager", max_pending=3, max_context=128)
    rollbacks = 0
    for ids in PROMPTS:
        streamer = Clock()
        assert hf_generate(model, ids, n, streamer=streamer) == want[tuple(ids)]
        assert streamer.seen == list(ids) + want[tuple(ids)]
        res = last_result(model)
        assert res.token_ids == want[tuple(ids)] and len(res.exit_layers) == n
        assert any(e < L - 1 for e in res.exit_layers)
        rollbacks += res.rollbacks
    assert rollbacks > 0  # verification was exercised


# ---------------------------------------------------------------- reuse, recompiles


def test_second_generate_reuses_runner_and_does_not_recompile():
    model = llama(seed=3)
    prog, draft = random_program(seed=1), RecentTokens()
    compiled(model, program=prog, draft=draft, kv_policy="backfill", use_schedule=False, backend="eager",
             max_context=128)
    first = hf_generate(model, PROMPTS[0], 16)
    runners = list(db._RUNNERS[model].values())
    seg, dec = runners[0].seg, runners[0].dec
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs >= 2  # prefill and decode graphs were traced by the first call
    for _ in range(2):
        assert hf_generate(model, PROMPTS[0], 16) == first
    assert counters["stats"]["unique_graphs"] == graphs, "a second generate() recompiled"
    assert counters["frames"]["total"] == frames
    assert list(db._RUNNERS[model].values()) == runners and len(runners) == 1
    assert runners[0].seg is seg and runners[0].dec is dec  # segments and decoder reused


def test_logits_output_is_one_hot():
    t = db._one_hot_logits([1, 2, 70000], torch.float32, torch.device("cpu"), 65000)
    assert t.shape == (1, 2, 70000)
    assert (t[..., 65000] == 0).all() and torch.isinf(t).sum() == 2 * 69999
    assert int(t[0, -1].argmax()) == 65000


# ---------------------------------------------------------------- errors


def _error_of(model, n=2) -> SpecEEError:
    with pytest.raises(SpecEEError) as info:
        hf_generate(model, PROMPTS[0], n)
    err = info.value
    assert "BackendCompilerFailed" not in str(err) and "\n" not in str(err)
    assert not isinstance(err, torch._dynamo.exc.BackendCompilerFailed)
    return err


def test_option_errors_are_specee_errors_not_dynamo_wrapped():
    model = compiled(llama(), specee=False, treshold=0.3)
    assert "unknown specee backend option(s) ['treshold']" in str(_error_of(model))
    torch._dynamo.reset()
    model = compiled(llama(), specee=False, backend="onnx")
    assert "exported artifact directory" in str(_error_of(model))
    torch._dynamo.reset()
    model = compiled(llama(), program=random_program(), draft=RecentTokens(), mode="lossless", kv_policy="skip")
    assert "backfill" in str(_error_of(model))
    torch._dynamo.reset()
    model = compiled(llama(), specee=False, max_new_tokens="8")
    assert "max_new_tokens" in str(_error_of(model))


def test_backend_needs_artifacts_or_dense():
    model = compiled(llama(), max_context=128)
    err = _error_of(model)
    assert isinstance(err, ArtifactError) and "options={'specee': False}" in str(err)


def test_token_forcing_processor_is_detected():
    model = llama()
    first = hf_generate(model, PROMPTS[0], 1)[0]
    compiled(model, specee=False, backend="eager", max_context=128)
    with pytest.raises(SpecEEError, match="a logits processor changed the token"):
        hf_generate(model, PROMPTS[0], 6, suppress_tokens=[first])


def test_decoder_cap_is_reported():
    model = compiled(llama(), specee=False, backend="eager", max_context=128, max_new_tokens=4)
    assert len(hf_generate(model, PROMPTS[0], 4)) == 4
    with pytest.raises(SpecEEError, match=r"options\['max_new_tokens'\]"):
        hf_generate(model, PROMPTS[0], 8)


def test_shipped_artifacts_found_by_fingerprint(monkeypatch, tmp_path):
    """A zoo model loaded from a path (config._name_or_path = the path, or the CLI's MODEL given as the .gguf
    file) still finds its shipped artifacts, in every entry point (`api.default_artifacts_dir`): the manifest's
    fingerprint names it."""
    import json
    from types import SimpleNamespace

    from specee_compile import artifacts

    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / artifacts.MANIFEST).write_text(json.dumps({"fingerprint": "cfg:aa-w:bb"}))
    monkeypatch.setattr(artifacts, "SHIPPED_ROOT", tmp_path)
    from specee_compile.api import default_artifacts_dir

    found = default_artifacts_dir(SimpleNamespace(name="/somewhere/model.gguf", fingerprint="cfg:aa-w:bb"))
    assert found == tmp_path / "smollm2-135m"
    assert default_artifacts_dir(SimpleNamespace(name="/somewhere/model.gguf", fingerprint="cfg:aa-w:cc")) is None
    assert default_artifacts_dir(SimpleNamespace(name="/somewhere/model.gguf", fingerprint="")) is None


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_without_artifacts_option_uses_shipped_artifacts(smollm2):
    """Issue 12, defect 8: SmolLM2 loads from a cache path, so the shipped artifacts are found by
    fingerprint; SpecEE through generate() equals the runtime's own generate()."""
    from specee_compile.api import build_decoder

    model = smollm2.model
    ids = smollm2.tokenizer("The capital of France is")["input_ids"]
    s = Settings(specee=True, backend="eager", max_new_tokens=6, max_context=256)
    want = build_decoder(smollm2, s).generate(ids).token_ids
    orig = model.forward
    try:
        compiled(model, backend="eager", max_context=256)
        assert hf_generate(model, ids, 6) == want
    finally:
        model.forward = orig
