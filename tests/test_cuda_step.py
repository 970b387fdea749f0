"""The whole-step CUDA graph of the inductor backend (backends/cuda_step.py) against the eager backend,
token for token and exit for exit, through the one decode loop. GPU only (skips without CUDA).

Every test checks that the whole step really ran (graphs captured, no per-layer graph replays), so a
silent fallback to the composed path cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from test_inductor import BASE, PROMPTS, L, RecentTokens, llama, random_program

from specee_compile.backends import make_segments
from specee_compile.config import Settings
from specee_compile.runtime.decoder import Decoder
from specee_compile.runtime.policies import trace_exits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def whole_graphs(seg) -> int:
    return len(seg._whole_step.graphs) if seg._whole_step is not None else 0


def test_dense_whole_step_equals_eager():
    model = llama()
    s = Settings(**BASE, device="cuda")
    want = Decoder(make_segments(model, s), s).generate(PROMPTS[1])
    seg = make_segments(model, s.replace(backend="inductor"))
    got = Decoder(seg, s).generate(PROMPTS[1])
    assert got.token_ids == want.token_ids
    assert whole_graphs(seg) > 0 and seg._whole_step.steps_run == got.decode_steps  # every step was whole
    assert got.compile_s > 0
    again = Decoder(seg, s).generate(PROMPTS[1])  # graphs reused: nothing to prepare the second time
    assert again.token_ids == want.token_ids and again.compile_s < got.compile_s


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_paper_mode_exits_on_device_equal_eager(threshold):
    """Approximate + skip: predictor decisions and the paper's full-head check, all on the device."""
    model = llama(seed=3)
    prog = random_program(seed=1)
    s = Settings(**BASE, device="cuda", specee=True, use_schedule=False, threshold=threshold)
    want = Decoder(make_segments(model, s, prog), s, program=prog, draft=RecentTokens()).generate(PROMPTS[0])
    seg = make_segments(model, s.replace(backend="inductor"), prog)
    got = Decoder(seg, s, program=prog, draft=RecentTokens()).generate(PROMPTS[0])
    assert got.token_ids == want.token_ids
    assert got.exit_layers == want.exit_layers
    assert got.head_calls == want.head_calls and got.predictor_calls == want.predictor_calls
    assert whole_graphs(seg) > 0 and seg._whole_step.steps_run == got.decode_steps


def test_trace_exits_on_device_equal_composed():
    model = llama(seed=4)
    prog = random_program(seed=2)
    trace = [1, 3, 0, 2, 3, 1, 1, 0]
    s = Settings(**BASE, device="cuda", specee=True, use_schedule=False, exit_cost_check=False)
    pol = trace_exits(trace)
    want = Decoder(make_segments(model, s, prog), s, program=prog, draft=RecentTokens(), policy=pol)
    want = want.generate(PROMPTS[1])
    seg = make_segments(model, s.replace(backend="inductor"), prog)
    got = Decoder(seg, s, program=prog, draft=RecentTokens(), policy=pol).generate(PROMPTS[1])
    assert got.exit_layers == want.exit_layers
    assert [e for e in got.exit_layers[1:]] == [min(t, L - 1) for t in (trace * 4)[: len(got.exit_layers) - 1]]
    assert got.token_ids == want.token_ids
    assert whole_graphs(seg) > 0


def test_cost_check_keeps_paying_points_and_says_why():
    """With the cost check on, the kept points and the reasons for the dropped ones are reported,
    and the tokens still equal the composed path's with the same points."""
    model = llama(seed=4)
    prog = random_program(seed=2)
    s = Settings(**BASE, device="cuda", specee=True, use_schedule=False)
    seg = make_segments(model, s.replace(backend="inductor"), prog)
    res = Decoder(seg, s, program=prog, draft=RecentTokens(), policy=trace_exits([0, 1, 2, 3])).generate(PROMPTS[1])
    ep = res.exit_program
    assert ep["step_costs"]["layer_us"] > 0 and "CUDA graph replays" in ep["step_costs"]["source"]
    assert sorted(ep["exit_points_kept"] + [int(k) for k in ep["exit_points_dropped"]]) == list(range(L - 1))
    assert all(isinstance(v, str) and "us/token" in v for v in ep["exit_points_dropped"].values())


def _eagle(model):
    from specee_compile.draft.eagle import EagleDraft

    torch.manual_seed(2)
    d = EagleDraft(model, torch.arange(model.config.vocab_size)).to("cuda").eval()
    with torch.no_grad():  # non-trivial weights: proposals depend on the context
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return d


@pytest.mark.parametrize("paper", [True, False])
def test_run_ahead_with_device_draft_and_schedule_equals_eager(paper):
    """The pipelined loop (step t+1 launched before step t's token is read): the EAGLE draft and the
    online schedule run on the device; tokens, exits and call counts equal the eager backend's, also
    for a generate that starts after a run-ahead step was dropped at EOS."""
    from specee_compile.draft.eagle import DeviceEagleSource, EagleSource
    from specee_compile.predictors.schedule import OnlineScheduler

    model = llama(seed=3).to("cuda")
    prog = random_program(seed=1)
    d = _eagle(model)
    s = Settings(**BASE, device="cuda", specee=True, use_schedule=True, exit_cost_check=False)
    pol = None if paper else trace_exits([1, 3, 0, 2, 3, 1, 1, 0])

    def pair(eos=None):
        sched = lambda: OnlineScheduler(offline=[1], window=2, offsets=(-1, 0, 1))
        want = Decoder(make_segments(model, s, prog), s, eos_ids=eos, program=prog, draft=EagleSource(d, k=4),
                       scheduler=sched(), policy=pol)
        dev = DeviceEagleSource.from_source(EagleSource(d, k=4), seg.max_len, compile=True)
        return want, Decoder(seg, s, eos_ids=eos, program=prog, draft=dev, scheduler=sched(), policy=pol), dev

    seg = make_segments(model, s.replace(backend="inductor"), prog)
    want, got, dev = pair()
    first = None
    for ids in (*PROMPTS, PROMPTS[0]):
        w, g = want.generate(ids), got.generate(ids)
        first = first or w
        assert g.token_ids == w.token_ids and g.exit_layers == w.exit_layers
        assert g.predictor_calls == w.predictor_calls and g.head_calls == w.head_calls
    assert dev.compile_error is None, dev.compile_error
    assert any(e < L - 1 for e in first.exit_layers), "no exit happened: the test would not test exits"
    runs = seg._whole_step.steps_run
    want, got, dev = pair(eos={first.token_ids[6]})  # stops early: the step launched ahead is dropped
    for ids in (PROMPTS[0], PROMPTS[1]):
        w, g = want.generate(ids), got.generate(ids)
        assert g.token_ids == w.token_ids and g.exit_layers == w.exit_layers
    assert seg._whole_step.steps_run > runs


def test_dense_run_ahead_stops_at_eos_and_restarts_clean():
    model = llama()
    s = Settings(**BASE, device="cuda")
    ref = Decoder(make_segments(model, s), s).generate(PROMPTS[1]).token_ids
    eos = {ref[5]}
    want = Decoder(make_segments(model, s), s, eos_ids=eos)
    seg = make_segments(model, s.replace(backend="inductor"))
    got = Decoder(seg, s, eos_ids=eos)
    for ids in (PROMPTS[1], PROMPTS[0], PROMPTS[1]):
        assert got.generate(ids).token_ids == want.generate(ids).token_ids
