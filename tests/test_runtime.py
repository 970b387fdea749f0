"""The runtime against Hugging Face generate() and against hand computations of exits and masks."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specee_compile.backends import make_segments
from specee_compile.backends.eager import EagerSegments
from specee_compile.config import Settings
from specee_compile.errors import InputError, SpecEEError
from specee_compile.program import ExitPoint, Predictors, SpecEEProgram
from specee_compile.runtime.decoder import Decoder

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny(cls=LlamaForCausalLM, cfg_cls=LlamaConfig, seed=0, **over):
    torch.manual_seed(seed)
    return cls(cfg_cls(**{**SMALL, **over})).eval()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize(
    "cls,cfg_cls,over",
    [
        (LlamaForCausalLM, LlamaConfig, {}),
        (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 4, "tie_word_embeddings": True}),
        (MistralForCausalLM, MistralConfig, {}),
        (Qwen2ForCausalLM, Qwen2Config, {}),
    ],
)
def test_dense_greedy_matches_hf_generate(cls, cfg_cls, over):
    model = tiny(cls, cfg_cls, **over)
    s = Settings(max_new_tokens=24, max_context=128)
    seg = make_segments(model, s)
    dec = Decoder(seg, s)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 256, (5 + 4 * seed,), generator=g).tolist()
        assert dec.generate(ids).token_ids == hf_greedy(model, ids, 24)


def test_dense_stats_and_eos():
    model = tiny()
    s = Settings(max_new_tokens=20, max_context=128)
    ids = [3, 4, 5, 6]
    ref = hf_greedy(model, ids, 20)
    res = Decoder(make_segments(model, s), s, eos_ids={ref[5]}).generate(ids)
    assert res.token_ids == ref[: ref.index(ref[5]) + 1]
    assert res.avg_layers == 4.0
    assert set(res.exit_layers) == {3}


def test_streaming_emits_every_token_once():
    model = tiny()
    s = Settings(max_new_tokens=12, max_context=64)
    seen = []
    res = Decoder(make_segments(model, s), s).generate([1, 2, 3], on_token=seen.append)
    assert seen == res.token_ids


def test_sampling_is_seeded():
    model = tiny()
    s = Settings(max_new_tokens=16, max_context=64, temperature=0.9, top_p=0.9, seed=7)
    a = Decoder(make_segments(model, s), s).generate([1, 2, 3]).token_ids
    b = Decoder(make_segments(model, s), s).generate([1, 2, 3]).token_ids
    c = Decoder(make_segments(model, s.replace(seed=8)), s.replace(seed=8)).generate([1, 2, 3]).token_ids
    assert a == b and a != c


def test_bad_prompts():
    model = tiny()
    s = Settings(max_new_tokens=8, max_context=32)
    dec = Decoder(make_segments(model, s), s)
    with pytest.raises(InputError, match="empty"):
        dec.generate([])
    with pytest.raises(InputError, match="exceeds the context of 32"):
        dec.generate(list(range(30)))


def test_settings_reject_lossless_skip():
    with pytest.raises(SpecEEError, match="backfill"):
        Settings(mode="lossless", kv_policy="skip")


# ---------------------------------------------------------------- forced exits

class AllCandidates:
    """Candidate source proposing the whole (tiny) vocabulary, so the paper's check always passes."""

    def __init__(self, vocab):
        self.k = vocab
        self.seen = []

    def reset(self, prompt_ids, prompt_hidden):
        self.seen = list(prompt_ids)

    def propose(self):
        return torch.arange(self.k)

    def observe(self, token, hidden, layer):
        self.seen.append(token)

    def truncate(self, length):
        del self.seen[length:]


class ScriptedExits(EagerSegments):
    """Exit decisions come from a script: layer at which each predictor call says 'exit'."""

    def __init__(self, *a, plan=None, **k):
        super().__init__(*a, **k)
        self.plan = plan  # callable(step_index) -> exit layer or None

    def exit_score(self, i, h, rows, p_prev):
        score, z, p = super().exit_score(i, h, rows, p_prev)
        want = self.plan(self.step)
        return torch.tensor([1.0 if want == i else 0.0]), z, p


def forced_program(L, k):
    return SpecEEProgram(
        num_layers=L,
        exit_points=[ExitPoint(i, 0.5) for i in range(L - 1)],
        predictors=Predictors(torch.zeros(L, 8, 3 * k), torch.zeros(L, 8), torch.zeros(L, 8), torch.zeros(L, 1),
                              list(range(L - 1))),
        offline_layers=list(range(L - 1)),
        num_candidates=k,
    )


def run_forced(model, settings, plan, ids, cls=None):
    """Decode `ids` with exits forced by plan(step) -> exit layer (or None); cls: the scripted
    segments class (ScriptedExits, or a compiled backend's scripted subclass)."""
    L = model.config.num_hidden_layers
    prog = forced_program(L, 256)
    seg = (cls or ScriptedExits)(model, settings, prog, plan=plan)
    dec = Decoder(seg, settings, program=prog, draft=AllCandidates(256))
    seg.step = 0
    orig = dec._step

    def counted(current):
        orig(current)
        seg.step += 1

    dec._step = counted
    return dec.generate(ids), seg


def test_skip_policy_masks_match_hand_computation():
    model = tiny(num_hidden_layers=6)
    s = Settings(max_new_tokens=8, max_context=64, specee=True, use_schedule=False)
    script = {0: 1, 1: 3, 2: None, 3: 0, 4: 4, 5: None, 6: 2}
    res, seg = run_forced(model, s, lambda st: script.get(st), [5, 6, 7])
    P = 3
    # token i (generated) came from step i-1 at position P + i - 1; prefill wrote every layer for 0..P-1
    assert res.exit_layers[1:] == [1, 3, 5, 0, 4, 5, 2]
    valid = seg.cache.valid
    assert valid[:, :P].all()
    for step, layer in enumerate(res.exit_layers[1:]):
        p = P + step
        assert valid[: layer + 1, p].all() and not valid[layer + 1 :, p].any(), (step, layer)
    assert res.avg_layers == pytest.approx(sum(e + 1 for e in res.exit_layers[1:]) / 7)


def dense_reference(model, ids, n, settings):
    seg = make_segments(model, settings.replace(specee=False))
    res = Decoder(seg, settings.replace(specee=False)).generate(ids)
    return res, seg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lossless_backfill_equals_dense_tokens_and_cache(seed):
    model = tiny(num_hidden_layers=6, seed=seed)
    s = Settings(max_new_tokens=20, max_context=64, specee=True, mode="lossless", kv_policy="backfill",
                 use_schedule=False, max_pending=3)
    rng = random.Random(seed)
    plan_table = {st: rng.choice([None, 0, 1, 2, 3, 4]) for st in range(200)}
    ids = [9, 8, 7, 6]
    res, seg = run_forced(model, s, lambda st: plan_table[st], ids)
    dense, dseg = dense_reference(model, ids, 20, s)
    assert res.token_ids == dense.token_ids
    assert res.rollbacks > 0 or any(e < 5 for e in res.exit_layers)
    # every token gets every layer eventually (rows), but in fewer weight passes
    assert res.avg_layer_rows >= 6 - 1e-9 and res.avg_layers <= res.avg_layer_rows
    n = len(ids) + len(res.token_ids) - 1  # the last token is never fed back
    assert seg.cache.valid[:, :n].all()
    torch.testing.assert_close(seg.cache.k[:, :, :n], dseg.cache.k[:, :, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seg.cache.v[:, :, :n], dseg.cache.v[:, :, :n], rtol=1e-4, atol=1e-5)


def test_approximate_backfill_cache_equals_dense_cache_for_same_tokens():
    model = tiny(num_hidden_layers=6, seed=3)
    s = Settings(max_new_tokens=16, max_context=64, specee=True, kv_policy="backfill", use_schedule=False)
    rng = random.Random(0)
    plan_table = {st: rng.choice([None, 1, 2, 4]) for st in range(200)}
    ids = [1, 2, 3]
    res, seg = run_forced(model, s, lambda st: plan_table[st], ids)
    # a dense prefill over the same token sequence gives the dense cache
    seq = ids + res.token_ids
    dseg = make_segments(model, s.replace(specee=False))
    n = len(seq) - 1
    pos = torch.arange(n)
    h = dseg.embed(torch.tensor(seq[:n]))
    for i in range(6):
        h = dseg.layer(i, h, pos, dseg.attn_len(n - 1))
    covered = seg.cache.valid[:, :n]
    # rows still pending at the end lack deep K/V; everything the cache claims to hold must be dense
    for layer in range(6):
        cols = covered[layer].nonzero().flatten()
        torch.testing.assert_close(seg.cache.k[layer][:, cols], dseg.cache.k[layer][:, cols], rtol=1e-4, atol=1e-5)
    assert covered[:, : len(ids)].all()


def test_pending_cap_forces_full_depth():
    model = tiny(num_hidden_layers=4)
    s = Settings(max_new_tokens=10, max_context=64, specee=True, kv_policy="backfill", use_schedule=False,
                 max_pending=2)
    res, _ = run_forced(model, s, lambda st: 0, [1, 2])
    # always-exit plan: every third step must be deep (2 pending -> forced full depth)
    assert res.exit_layers[1:] == [0, 0, 3, 0, 0, 3, 0, 0, 3]
    assert res.stats()["pending_depth_histogram"] == {"2": 3}


def test_draft_eager_path_warms_once_before_the_first_token_and_changes_nothing():
    """Decoder.start runs the draft's eager path (reset over the prompt, one proposal) once, before the prefill:
    its first run in a process cost 657 ms on the first decode step on the H200 (benchmarks/GPU_NOTES.md,
    session 8). The tokens and exits equal those of a decoder that skips it, and later calls do not repeat it."""
    from specee_compile.draft import EagleDraft, EagleSource
    from specee_compile.draft.train import _init_draft

    class Counted(EagleSource):
        resets = 0

        def reset(self, prompt_ids, prompt_hidden):
            self.resets += 1
            super().reset(prompt_ids, prompt_hidden)

    model = tiny()
    L = model.config.num_hidden_layers
    draft = EagleDraft(model)
    _init_draft(draft, 0)  # untrained: proposes the model's own top-k, so the paper's check lets exits stand
    s = Settings(specee=True, max_new_tokens=12, exit_cost_check=False, threshold=0.0)
    prog = forced_program(L, 4)
    outs = []
    for warm in (True, False):
        src = Counted(draft.eval(), 4)
        dec = Decoder(make_segments(model, s, prog), s, program=prog, draft=src)
        dec._draft_warm = not warm  # False: start() warms the draft
        first = dec.generate([5, 9, 2, 7])
        assert src.resets == (2 if warm else 1)  # the warm-up's reset, then the prompt's
        again = dec.generate([5, 9, 2, 7])
        assert src.resets == (3 if warm else 2) and again.token_ids == first.token_ids
        outs.append((first.token_ids, first.exit_layers))
    assert outs[0] == outs[1]
    assert min(outs[0][1]) < L - 1  # exits were taken: the draft's candidates mattered


def test_junk_left_by_warm_ups_is_cleared_before_the_prefill():
    """CUDA-graph warm-ups, captures and cost replays run the step on whatever state the buffers hold, and in
    fp16 they can leave inf / NaN in slots no position holds yet (session 17: a 7B tree replay's verification
    turned NaN mid-generation). A masked attention still multiplies a masked slot by zero, so NaN there poisons
    the output: the decoder zeroes the values (target cache and draft) once such runs flagged the cache."""
    from specee_compile.draft import EagleDraft, EagleSource
    from specee_compile.draft.train import _init_draft

    model = tiny()
    L = model.config.num_hidden_layers
    draft = EagleDraft(model)
    _init_draft(draft, 0)
    s = Settings(specee=True, max_new_tokens=12, max_context=64, exit_cost_check=False, threshold=0.0)
    prog = forced_program(L, 4)
    src = EagleSource(draft.eval(), 4)
    seg = make_segments(model, s, prog)
    dec = Decoder(seg, s, program=prog, draft=src)
    ids = [5, 9, 2, 7, 11, 3]
    ref = dec.generate(ids).token_ids
    c = seg.cache
    for junk in (False, True):
        for t in (c.k, c.v, src._feats, *src._k, *src._v):
            t.fill_(float("nan"))
        c.valid.zero_()
        c.junk = junk
        out = dec.generate(ids).token_ids
        if junk:  # cleared: the reference tokens, and nothing non-finite left anywhere
            assert out == ref and not c.junk
            assert all(bool(torch.isfinite(t).all()) for t in (c.k, c.v, src._feats, *src._k, *src._v))
        else:  # (the hazard is real: the prefill's masked attention reads the NaN slots)
            assert out != ref
