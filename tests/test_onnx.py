"""ONNX export + ONNX Runtime runner against the eager backend, token for token.

One tiny random Llama (6 layers, vocabulary 32 so that k = 4 candidates catch the exit-layer argmax
often enough for exits to happen) is exported once per session: prefill, the conditional decode step
with an exit after every layer but the last, and a random-weight EAGLE draft.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from transformers import LlamaConfig, LlamaForCausalLM

from specee_compile.backends import make_segments
from specee_compile.backends.onnx_export import (
    DECODE_OUTPUTS,
    count_if_nodes,
    decode_inputs,
    export_onnx,
    make_row_layer_fn,
)
from specee_compile.backends.onnx_runner import OnnxEagleSource, OnnxStep, make_session, open_artifact
from specee_compile.config import Settings
from specee_compile.draft import EagleDraft, EagleSource, NgramDraft
from specee_compile.errors import SpecEEError
from specee_compile.model_step import extract_weights, make_layer_fn
from specee_compile.predictors.schedule import OnlineScheduler
from specee_compile.program import ExitPoint, Predictors, SpecEEProgram
from specee_compile.runtime.decoder import Decoder

L, V, K = 6, 32, 4
CFG = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": L,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
PROMPTS = [[1, 2, 3, 4, 5], [7, 7, 8, 9, 7, 7, 8], [30, 2, 17]]


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CFG, **over})).eval()


def random_program(seed=0, hm=16, k=K):
    g = torch.Generator().manual_seed(seed)
    exits = list(range(L - 1))
    return SpecEEProgram(
        num_layers=L,
        exit_points=[ExitPoint(i, 0.3 + 0.1 * i) for i in exits],  # per-layer thresholds (threshold=None)
        predictors=Predictors(torch.randn(L, hm, 3 * k, generator=g), torch.randn(L, hm, generator=g),
                              torch.randn(L, hm, generator=g) * 0.5, torch.randn(L, 1, generator=g), exits),
        offline_layers=[1, 3],
        num_candidates=k,
        draft_kind="eagle" if k == K else "ngram",
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    torch.manual_seed(1)
    draft = EagleDraft(model)
    with torch.no_grad():  # a random draft of the default init proposes near-constant tokens; spread it
        for p in draft.parameters():
            p.normal_(0, 0.2)
    prog = random_program()
    out = tmp_path_factory.mktemp("onnx")
    t0 = time.perf_counter()
    info = export_onnx(model, prog, out, Settings(max_context=128), draft=draft, progress=True)
    info["export_s"] = time.perf_counter() - t0
    return model, prog, draft, out, info


@pytest.fixture(scope="module", params=["nested", "flat"])
def exported_all(request, tmp_path_factory):
    """The same model with k = V candidates (the whole vocabulary): the paper's check always passes, so
    an exit happens exactly where a predictor proposes one (scripted exits, skipped branches). Both
    graph structures (nested Ifs; flat sequence of If(alive) for TensorRT)."""
    model = tiny_model()
    prog = random_program(k=V)
    out = tmp_path_factory.mktemp(f"onnx_all_{request.param}")
    info = export_onnx(model, prog, out, Settings(max_context=128), progress=False, graphs=("prefill", "decode_step"),
                       structure=request.param)
    assert count_if_nodes(out / "decode_step.onnx") == 2 * len(prog.exit_points)
    assert info["graphs"]["decode_step.onnx"]["structure"] == request.param
    return model, prog, out


class AllCandidates:
    """Candidate source proposing the whole (tiny) vocabulary."""

    k = V

    def reset(self, prompt_ids, prompt_hidden):
        pass

    def propose(self):
        return torch.arange(V)

    def observe(self, token, hidden, layer):
        pass

    def truncate(self, length):
        pass


def eager_run(model, prog, settings, draft, ids, scheduler=None):
    seg = make_segments(model, settings, prog)
    return Decoder(seg, settings, program=prog, draft=draft, scheduler=scheduler).generate(ids), seg


def onnx_run(out, settings, ids, prog=None, **kw):
    """The runtime's Decoder over the ONNX backend of an exported directory (no tokenizer needed)."""
    run = open_artifact(out, settings, program=prog, tokenizer=None, **kw)
    return run.decoder().generate(ids)


# ------------------------------------------------------------------------------------- structure
def test_files_and_if_nodes(exported):
    _, prog, _, out, info = exported
    assert set(info["files"]) == {"weights.bin", "prefill.onnx", "decode_step.onnx", "draft.onnx"}
    assert info["draft_runtime"] == "onnx"
    n_exits = len(prog.exit_points)
    # one verification If + one exit If per exit point; the exit Ifs are nested in each other's else
    assert count_if_nodes(out / "decode_step.onnx") == 2 * n_exits == info["graphs"]["decode_step.onnx"]["if_nodes"]
    assert count_if_nodes(out / "prefill.onnx") == 0
    sess = make_session(out / "decode_step.onnx")
    assert [i.name for i in sess.get_inputs()] == decode_inputs(L)
    assert [o.name for o in sess.get_outputs()] == DECODE_OUTPUTS
    assert sess.get_inputs()[2].shape == [2, "T", 16]  # k_cache_0: dynamic cache length
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["exit_layers"]) == list(range(L - 1))


def test_row_layer_matches_model_step_layer():
    """The export's cache-free layer computes what `model_step.make_layer_fn` computes."""
    model = tiny_model(seed=3)
    w = extract_weights(model, 64)
    spec = w.spec
    ref_layer, row_layer = make_layer_fn(spec), make_row_layer_fn(spec)
    k = torch.randn(spec.num_kv_heads, 64, spec.head_dim)
    v = torch.randn_like(k)
    valid = torch.rand(64) > 0.3
    pos = torch.tensor([20])
    h = torch.randn(1, 1, spec.hidden)
    lw = w.layers[2].as_tuple()
    kc, vc, vm = k.clone(), v.clone(), valid.clone()
    ref = ref_layer(h, pos, vm, w.cos, w.sin, kc, vc, 64, *lw)
    ok = (valid & (torch.arange(64) < 20))[None]
    got, kr, vr = row_layer(h, pos, w.cos[pos], w.sin[pos], k, v, ok, *lw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kr[:, 0], kc[:, 20])
    torch.testing.assert_close(vr[:, 0], vc[:, 20])


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("threshold", [0.3, 0.85, None])  # None: each exit point's own threshold
def test_eagle_parity_real_predictors(exported, threshold):
    model, prog, draft, out, _ = exported
    s = Settings(max_new_tokens=24, max_context=128, specee=True, use_schedule=False, threshold=threshold)
    exits = 0
    for ids in PROMPTS:
        ref, _ = eager_run(model, prog, s, EagleSource(draft, K), ids)
        got = onnx_run(out, s, ids, prog)  # draft.onnx from the directory
        assert got.token_ids == ref.token_ids, ids
        assert got.exit_layers == ref.exit_layers
        assert (got.predictor_calls, got.head_calls, got.layer_passes, got.layer_rows) == (
            ref.predictor_calls, ref.head_calls, ref.layer_passes, ref.layer_rows)
        exits += sum(e < L - 1 for e in got.exit_layers)
    if threshold is None or threshold < 0.8:
        assert exits > 0, "the test should exercise exits"


def test_ngram_and_schedule_parity(exported):
    model, prog, _, out, _ = exported
    s = Settings(max_new_tokens=30, max_context=128, specee=True, threshold=0.4, min_exit_layer=1)
    total_exits = 0
    for ids in PROMPTS:
        mk = lambda: OnlineScheduler.from_settings(s, prog.offline_layers, prog.predictors.layers)
        ref, _ = eager_run(model, prog, s, NgramDraft(k=K), ids, scheduler=mk())
        got = onnx_run(out, s, ids, prog, draft=NgramDraft(k=K), scheduler=mk())
        assert got.token_ids == ref.token_ids
        assert got.exit_layers == ref.exit_layers
        assert got.predictor_calls == ref.predictor_calls
        assert 0 not in got.exit_layers  # min_exit_layer=1
        total_exits += sum(e < L - 1 for e in got.exit_layers)
    assert total_exits > 0


def test_dense_parity(exported):
    model, _, _, out, _ = exported
    s = Settings(max_new_tokens=20, max_context=128)
    for ids in PROMPTS + [[4]]:  # P = 1 exercises the dynamic prompt axis at its minimum
        ref = Decoder(make_segments(model, s), s).generate(ids)
        got = onnx_run(out, s, ids)
        assert got.token_ids == ref.token_ids
        assert got.avg_layers == L


def test_sampling_through_the_loop_equals_eager(exported):
    """--temperature on the ONNX backend: the loop samples from the logits the graph returns
    (StepPlan.want_logits), with the same seeded draws as the eager backend's composed steps."""
    model, _, _, out, _ = exported
    s = Settings(max_new_tokens=16, max_context=128, temperature=0.8, top_p=0.9, seed=3)
    differs = 0
    for ids in PROMPTS:
        ref = Decoder(make_segments(model, s), s).generate(ids)
        got = onnx_run(out, s, ids)
        assert got.token_ids == ref.token_ids
        differs += onnx_run(out, s.replace(temperature=0.0), ids).token_ids != got.token_ids
    assert differs  # sampling really sampled


def test_onnx_draft_matches_torch_draft(exported):
    _, _, draft, out, _ = exported
    a, b = EagleSource(draft, K), OnnxEagleSource(make_session(out / "draft.onnx"), K)
    rng = random.Random(0)
    ids = [3, 4, 5, 6]
    hid = torch.randn(4, 64)
    a.reset(ids, hid)
    b.reset(ids, hid)
    for step in range(12):
        assert a.propose().tolist() == b.propose().tolist(), step
        tok, h = rng.randrange(V), torch.randn(64)
        a.observe(tok, h, 3)
        b.observe(tok, h, 3)
        if step == 6:  # a rollback: truncate, then the runtime re-observes the last position
            a.truncate(7)
            b.truncate(7)
            a.observe(5, h, 3)
            b.observe(5, h, 3)


class _Scripted:
    """Exit proposals from a script: step -> the one layer whose predictor runs (threshold 0, so it
    proposes there); the paper's argmax-in-candidates check still decides."""

    def __init__(self, plan):
        self.plan, self.step = plan, 0

    def active(self):
        want = self.plan.get(self.step)
        self.step += 1
        return set() if want is None else {want}


def test_scripted_exits_kv_contract(exported_all):
    """Exits at hand-picked layers: tokens, exit layers, validity masks and K/V equal the eager run."""
    model, prog, out = exported_all
    s = Settings(max_new_tokens=20, max_context=128, specee=True, use_schedule=False, threshold=0.0)
    rng = random.Random(5)
    plan = {st: rng.choice([None, 0, 1, 2, 3, 4]) for st in range(40)}
    a, b = _Scripted(plan), _Scripted(plan)

    class EagerScripted(Decoder):
        def _active_layers(self):
            return a.active()

    class OnnxScripted(Decoder):  # the same loop; only the backend differs
        def _active_layers(self):
            return b.active()

    ids = [9, 8, 7, 6]
    seg = make_segments(model, s, prog)
    ref = EagerScripted(seg, s, program=prog, draft=AllCandidates()).generate(ids)
    onnx = OnnxStep(out, s)
    got = OnnxScripted(onnx, s, program=prog, draft=AllCandidates()).generate(ids)
    dec = onnx.cache
    want = [L - 1] + [L - 1 if plan[st] is None else plan[st] for st in range(len(got.token_ids) - 1)]
    assert got.exit_layers == ref.exit_layers == want
    assert got.token_ids == ref.token_ids
    n = len(ids) + len(got.token_ids) - 1  # the last token is never fed back
    valid = torch.from_numpy(dec.valid[:, :n])
    assert torch.equal(valid, seg.cache.valid[:, :n])
    for layer in range(L):  # skip policy: layer l holds K/V exactly where the step reached it
        cols = valid[layer].nonzero().flatten()
        torch.testing.assert_close(torch.from_numpy(dec.k[layer][:, cols]), seg.cache.k[layer][:, cols],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(dec.v[layer][:, cols]), seg.cache.v[layer][:, cols],
                                   rtol=1e-4, atol=1e-5)


def test_unsupported_modes_say_where_to_go(exported):
    *_, out, _ = exported
    s = Settings(specee=True, kv_policy="backfill")
    with pytest.raises(SpecEEError, match="eager or inductor"):
        OnnxStep(out, s)
    with pytest.raises(SpecEEError, match="eager or inductor"):
        open_artifact(out, Settings(specee=True, mode="lossless", kv_policy="backfill"), tokenizer=None)


def test_backend_contract_and_one_loop(exported):
    """The ONNX backend is a Backend + WholeStep of the runtime loop (not Segments), and the runner
    module has no decode loop of its own."""
    import inspect

    from specee_compile.backends import onnx_runner
    from specee_compile.runtime.contract import Backend, Segments, StepPlan, WholeStep
    from specee_compile.runtime.policies import LOSSLESS, trace_exits

    *_, out, _ = exported
    b = OnnxStep(out, Settings(max_context=128))
    assert isinstance(b, Backend) and isinstance(b, WholeStep) and not isinstance(b, Segments)
    assert not hasattr(onnx_runner, "OnnxDecoder")
    assert "def generate(" not in inspect.getsource(onnx_runner)
    cands = torch.arange(K)
    assert b.can_run(StepPlan(token=1, pos=3))
    assert not b.can_run(StepPlan(token=1, pos=3, candidates=cands, policy=LOSSLESS))
    assert not b.can_run(StepPlan(token=1, pos=3, candidates=cands, policy=trace_exits([2]), forced_exit=2))
    # a lossless plan reaching the loop says which backends can run it
    run = open_artifact(out, Settings(max_context=128, max_new_tokens=4), tokenizer=None)
    with pytest.raises(SpecEEError, match="eager or inductor"):
        run.decoder(policy=LOSSLESS)._whole_step(StepPlan(token=1, pos=3, candidates=cands, policy=LOSSLESS))


def test_sessions_share_one_copy_of_the_weights(exported):
    """prefill and decode sessions read the same mapped weights.bin buffers (one copy per process)."""
    from specee_compile.backends.onnx_runner import SharedWeights

    *_, out, _ = exported
    w = SharedWeights(out)
    a, b = w.initializers(out / "prefill.onnx"), w.initializers(out / "decode_step.onnx")
    common = set(a) & set(b)
    assert "layers.0.wqkv" in common and "embed" in common
    assert all(a[n].data_ptr() == b[n].data_ptr() for n in common)
    mm = next(iter(w._maps.values()))
    lo = mm.ctypes.data
    assert all(lo <= a[n].data_ptr() < lo + mm.size for n in a)  # views into the map, not copies


# ------------------------------------------------------------------------------------- skipped branch
def _step_inputs(active, T=64, k=V, thr=0.0):
    Hkv, hd = 2, 16
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((L, Hkv, T, hd)).astype(np.float32)
    valid = np.zeros((L, T), bool)
    valid[:, :10] = True
    kv = {f"k_cache_{i}": kc[i] for i in range(L)} | {f"v_cache_{i}": kc[i].copy() for i in range(L)}
    return {"token": np.array([5]), "position": np.array([10]), **kv, "valid": valid,
            "candidates": np.arange(k, dtype=np.int64), "active": active, "thresholds": np.full(L, thr, np.float32)}


def _profiled_nodes(path, x, prefix):
    sess = make_session(path, threads=1, profile_prefix=prefix)
    res = sess.run(None, x)
    prof = json.loads(Path(sess.end_profiling()).read_text())
    return res, [ev["args"]["op_name"] for ev in prof if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time")]


def test_skipped_branch_is_not_executed(exported_all, tmp_path):
    """A step that exits after layer 0 runs far fewer kernels than a full-depth one: ORT executes only the
    taken branch. (The time per step is a benchmark, not a test: see the report / benchmarks.)"""
    *_, out = exported_all
    path = out / "decode_step.onnx"
    first = np.zeros(L, bool)
    first[0] = True
    x_exit, x_full = _step_inputs(first), _step_inputs(np.zeros(L, bool))
    (_, e_exit, *_), ops_exit = _profiled_nodes(path, x_exit, str(tmp_path / "exit"))
    (_, e_full, *_), ops_full = _profiled_nodes(path, x_full, str(tmp_path / "full"))
    assert int(e_exit[0]) == 0 and int(e_full[0]) == L - 1
    mm = lambda ops: sum(op in ("MatMul", "FusedMatMul", "Gemm") for op in ops)
    # exit: 1 layer + 5 predictor blocks' worth of nothing + one head; full: 6 layers + 5 predictors + head
    assert mm(ops_exit) * 3 < mm(ops_full), (mm(ops_exit), mm(ops_full))
    assert len(ops_exit) * 2 < len(ops_full), (len(ops_exit), len(ops_full))


# ------------------------------------------------------------------------------------- memory
def _nested_if_model(depth: int, n: int):
    """h [1, n] -> per level: h @ outer(h, w_i) (an [n, n] float32 intermediate, 16 MiB at n = 2048),
    then If(c): else-branch = the next level. The exits' nesting in miniature (small weights)."""
    from onnx import TensorProto, helper, numpy_helper

    def level(i):
        h, o = f"h{i}", f"out{i}"
        nodes = [helper.make_node("Transpose", [h], [f"ht{i}"], perm=[1, 0]),
                 helper.make_node("Mul", [f"ht{i}", f"w{i}"], [f"big{i}"]),  # [n, 1] * [1, n]
                 helper.make_node("MatMul", [h, f"big{i}"], [f"h{i + 1}"])]
        vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n])
        if i + 1 < depth:
            then = helper.make_graph([helper.make_node("Identity", [f"h{i + 1}"], [f"t{i}"])], f"then{i}", [],
                                     [vi(f"t{i}")])
            nodes.append(helper.make_node("If", ["c"], [o], then_branch=then, else_branch=level(i + 1)))
        else:
            nodes.append(helper.make_node("Identity", [f"h{i + 1}"], [o]))
        return helper.make_graph(nodes, f"level{i}", [], [vi(o)])

    g = level(0)
    g.input.extend([helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, n]),
                    helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    g.initializer.extend(numpy_helper.from_array(np.full((1, n), 1.0 / n, np.float32), f"w{i}")
                         for i in range(depth))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def test_nested_if_branches_do_not_each_keep_a_block(tmp_path):
    """The decode graph's exits nest (layer e+1 runs in exit e's else-branch). With ORT's memory pattern
    (on by default) every branch frame got, from the second run on, one block for all its tensors, kept
    while the deeper branches ran: a float32 weight's worth per nested layer at once (+0.8 GB at 1.1B,
    +4.5 GB at 7B). `make_session` turns the pattern off for graphs with If nodes; peak memory of later
    runs then stays at the first run's (the arena hands a deeper frame what the outer one freed)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (peak RSS reset)")
    import onnx

    from specee_compile.backends.onnx_runner import has_subgraphs

    depth, n = 8, 2048
    path = tmp_path / "nested.onnx"
    onnx.save(_nested_if_model(depth, n), str(path))
    assert has_subgraphs(path)
    sess = make_session(path, threads=1)
    x = {"h0": np.ones((1, n), np.float32), "c": np.array(False)}
    sess.run(None, x)  # the first run records the pattern
    before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak
    for _ in range(2):
        sess.run(None, x)
    grown = _rss_mib("VmHWM") - before
    block = n * n * 4 / 2**20  # 16 MiB: one level's intermediate
    assert grown < 2 * block, \
        f"peak grew by {grown:.0f} MiB after the first run ({depth} nested levels x {block:.0f} MiB)"


def test_onnx_two_layer_draft_matches_torch_draft(tmp_path):
    """A head of two decoder layers (`train-draft --draft-layers 2`) exports as one draft graph with both layers'
    caches, and proposes what the torch draft proposes."""
    from specee_compile.backends.onnx_export import _export_draft
    from specee_compile.model_step import extract_weights

    model = tiny_model()
    torch.manual_seed(2)
    draft = EagleDraft(model, num_layers=2)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.2)
    spec = extract_weights(model, 128).spec
    meta = {"graph": "draft", "draft_config": draft.draft_config(), "draft_first_ids": draft.vocab_ids[:K].tolist(),
            "num_candidates": K, "vocab": V, "dtype": "float32"}
    files = _export_draft(draft.eval(), spec, 128, K, tmp_path, torch.float32, meta, progress=False)
    assert files == ["draft.onnx"]
    one = EagleDraft(model)  # the first layer alone: the second must change the proposals
    one.load_state_dict({k: v for k, v in draft.state_dict().items() if not k.startswith("layers.1.")})
    a, b = EagleSource(draft, K), OnnxEagleSource(make_session(tmp_path / "draft.onnx"), K)
    c = EagleSource(one.eval(), K)
    ids, hid = [3, 4, 5, 6], torch.randn(4, 64)
    for src in (a, b, c):
        src.reset(ids, hid)
    rng = random.Random(1)
    differs = 0
    for step in range(10):
        want = a.propose().tolist()
        assert b.propose().tolist() == want, step
        differs += c.propose().tolist() != want
        tok, h = rng.randrange(V), torch.randn(64)
        for src in (a, b, c):
            src.observe(tok, h, 3)
    assert differs
