"""Tree speculative decoding (runtime/tree.py, draft/tree.py): greedy = dense, cache compaction,
speculative sampling follows the target distribution, SpecEE on the tree, settings and stats."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import make_tiny_llama

from specee_compile.backends import make_segments
from specee_compile.config import Settings
from specee_compile.draft.eagle import EagleDraft
from specee_compile.draft.train import _init_draft
from specee_compile.draft.tree import DraftTree, EagleTreeSource
from specee_compile.errors import SpecEEError
from specee_compile.program import ExitPoint, Predictors, SpecEEProgram
from specee_compile.runtime.decoder import Decoder
from specee_compile.runtime.tree import target_probs, tree_exit_scores

PROMPT = [1, 5, 9, 33, 70, 12]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is ~20x faster than two on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def eagle_tree(model, k=4) -> EagleTreeSource:
    draft = EagleDraft(model)
    _init_draft(draft, 0)  # untrained: proposes the base model's own top-k at f_t
    return EagleTreeSource(draft.eval(), k=k)


class OracleTree(EagleTreeSource):
    """Deterministic tree from the target itself: at each expanded node its `width` most likely next
    tokens (full forward of the HF model), `depth` levels. Any deterministic draft keeps the tree step
    exact, and this one makes long accepted paths (and sibling decoys) certain."""

    def __init__(self, model, width=2, k=4):
        super().__init__(EagleDraft(model).eval(), k=k)
        self.model, self.width = model, width

    @torch.no_grad()
    def propose_tree(self, budget, depth, topk):
        tokens, parents, depths, cands = [], [], [], {}
        frontier = [(-1, list(self.ids))]
        for d in range(1, depth + 1):
            nxt = []
            for par, seq in frontier:
                logits = self.model(torch.tensor([seq])).logits[0, -1]
                top = torch.topk(logits, max(self.width, self.k)).indices.tolist()
                cands[par + 1] = top[: self.k]
                for t in top[: self.width]:
                    if len(tokens) >= budget:
                        break
                    tokens.append(t)
                    parents.append(par)
                    depths.append(d)
                    nxt.append((len(tokens) - 1, seq + [t]))
            frontier = nxt
        rows = torch.full((len(tokens) + 1, self.k), -1, dtype=torch.long)
        for r, c in cands.items():
            rows[r] = torch.tensor(c)
        self._catch_up()
        return DraftTree(tokens, parents, depths, [0.0] * len(tokens), rows)


def dense(model, ids, n, **over):
    s = Settings(max_new_tokens=n, **over)
    return Decoder(make_segments(model, s), s).generate(ids)


def tree_dec(model, source, n, program=None, **over):
    s = Settings(max_new_tokens=n, speculate="tree", **over)
    return Decoder(make_segments(model, s, program), s, program=program, draft=source)


# ---------------------------------------------------------------- greedy
@pytest.mark.parametrize("budget,depth,topk", [(12, 4, 4), (1, 1, 1), (30, 6, 8)])
def test_greedy_tree_equals_dense(budget, depth, topk):
    model = make_tiny_llama()
    ref = dense(model, PROMPT, 40)
    res = tree_dec(model, eagle_tree(model), 40, tree_budget=budget, tree_depth=depth, tree_topk=topk).generate(PROMPT)
    assert res.token_ids == ref.token_ids
    st = res.stats()
    assert st["verify_steps"] == res.verify_steps > 0
    assert st["accepted_per_step"] == pytest.approx((len(res.token_ids) - 1) / res.verify_steps)
    assert st["avg_layers"] == pytest.approx(model.config.num_hidden_layers)
    assert st["avg_tree_nodes"] <= budget


def test_oracle_tree_accepts_long_paths_and_compacts_cache():
    model = make_tiny_llama()
    n = 30
    s = Settings(max_new_tokens=n)
    dseg = make_segments(model, s)
    ref = Decoder(dseg, s).generate(PROMPT)
    dec = tree_dec(model, OracleTree(model, width=2), n, tree_budget=30, tree_depth=4)
    res = dec.generate(PROMPT)
    assert res.token_ids == ref.token_ids
    assert res.accepted_per_step > 4.0  # depth 4 + bonus, except where the run stops
    # the compacted cache holds the dense cache's K/V at every committed position
    end = len(PROMPT) + n - 1  # the last token's K/V is never computed
    c, d = dec.seg.cache, dseg.cache
    assert torch.equal(c.valid[:, :end], d.valid[:, :end])
    assert not c.valid[:, end + 4 :].any()
    torch.testing.assert_close(c.k[:, :, :end], d.k[:, :, :end], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c.v[:, :, :end], d.v[:, :, :end], atol=1e-5, rtol=1e-4)


def test_tree_stops_at_eos_and_max_new_tokens():
    model = make_tiny_llama()
    ref = dense(model, PROMPT, 20)
    eos = ref.token_ids[9]
    first = ref.token_ids.index(eos)
    s = Settings(max_new_tokens=20, speculate="tree", tree_budget=14, tree_depth=4)
    res = Decoder(make_segments(model, s), s, eos_ids={eos}, draft=OracleTree(model)).generate(PROMPT)
    assert res.token_ids == ref.token_ids[: first + 1]
    res = tree_dec(model, OracleTree(model), 7, tree_budget=14, tree_depth=5).generate(PROMPT)
    assert res.token_ids == ref.token_ids[:7]


def test_draft_tree_shape():
    model = make_tiny_llama()
    src = eagle_tree(model)
    src.lookup = False  # the draft's own tree (the lookup path is tested below)
    hid, obs = torch.randn(len(PROMPT), 64), torch.randn(64)
    src.reset(PROMPT, hid)
    src.observe(7, obs, 3)
    tree = src.propose_tree(budget=20, depth=5, topk=3)
    assert 0 < len(tree) <= 20
    assert max(tree.depths) <= 5
    for i, par in enumerate(tree.parents):
        assert par < i
        if par >= 0:
            assert tree.depths[i] == tree.depths[par] + 1
            assert tree.scores[i] <= tree.scores[par] + 1e-6
        else:
            assert tree.depths[i] == 1
    pairs = list(zip(tree.parents, tree.tokens))  # siblings are distinct tokens
    assert len(pairs) == len(set(pairs))
    assert tree.cands.shape == (len(tree) + 1, 4) and (tree.cands[0] >= 0).all()
    # the tree's first level is the draft's own top-k proposal
    flat = EagleTreeSource(src.draft, k=3)
    flat.reset(PROMPT, hid)
    flat.observe(7, obs, 3)
    assert set(flat.propose().tolist()) == {t for t, d in zip(tree.tokens, tree.depths) if d == 1}


def test_draft_tree_merges_the_lookup_path():
    model = make_tiny_llama()
    src = eagle_tree(model)
    ids = [1, 40, 41, 42, 43, 44, 45, 9, 40, 41]  # ... 40 41 -> lookup continues 42 43 44
    src.reset(ids[:-1], torch.randn(len(ids) - 1, 64))
    src.observe(ids[-1], torch.randn(64), 3)
    tree = src.propose_tree(budget=10, depth=3, topk=3)
    assert len(tree) <= 10
    r, path = -1, []
    for t in (42, 43, 44):  # the lookup path is in the tree, parents first
        r = next(i for i, (tt, p) in enumerate(zip(tree.tokens, tree.parents)) if tt == t and p == r)
        path.append(r)
    assert path == sorted(path) and [tree.depths[i] for i in path] == [1, 2, 3]
    pairs = list(zip(tree.parents, tree.tokens))
    assert len(pairs) == len(set(pairs))



def test_lookup_first_verifies_the_recurring_continuation():
    """lookup_first = n: a recurring n-gram's continuation is the tree's path (the draft does not expand); rows
    it leaves go to the root's other draft children; without a recurrence, the draft's own tree."""
    model = make_tiny_llama()
    torch.manual_seed(0)
    hid, obs = torch.randn(16, 64), torch.randn(64)

    def tree(ids, first, budget, depth=3):
        src = eagle_tree(model)
        src.lookup, src.lookup_first = False, first
        src.reset(ids[:-1], hid[: len(ids) - 1])
        src.observe(ids[-1], obs, 3)
        return src.propose_tree(budget=budget, depth=depth, topk=2)

    ids = [1, 40, 41, 42, 43, 44, 45, 9, 40, 41, 42]  # ... 40 41 42 -> 43 44 45
    t = tree(ids, 3, 4)
    assert t.tokens[0] == 43 and t.tokens[2:] == [44, 45] and t.tokens[1] != 43
    assert t.parents == [-1, -1, 0, 2] and t.depths == [1, 1, 2, 3]
    assert (t.cands[0] >= 0).all() and (t.cands[1:] == -1).all()
    # no recurring 3-gram: the draft's own tree, as without lookup first
    plain = [1, 40, 41, 42, 43, 44, 45, 9, 40, 41, 7]
    assert tree(plain, 3, 4).tokens == tree(plain, 0, 4).tokens
    # one token of continuation (the text ends there): a 1-node path, the other row to the draft
    t = tree([1, 9, 9, 9], 2, 2)
    assert t.tokens[0] == 9 and t.tokens[1] != 9 and t.parents == [-1, -1] and t.depths == [1, 1]


@pytest.mark.parametrize("first", [1, 3])
def test_lookup_first_tree_equals_dense(first):
    """Greedy tree decoding with lookup first gives the dense tokens on a repetitive prompt, where it is taken."""
    model = make_tiny_llama()
    prompt = PROMPT * 3
    ref = dense(model, prompt, 30)
    src = eagle_tree(model)
    src.lookup, src.lookup_first = False, first
    taken = []
    orig = src._lookup_tree
    src._lookup_tree = lambda *a: taken.append(1) or orig(*a)
    res = tree_dec(model, src, 30).generate(prompt)
    assert res.token_ids == ref.token_ids
    assert taken


# ---------------------------------------------------------------- sampling
def exact_joint(model, ids, n, temperature, top_p):
    """Exact target distribution of the first n generated tokens (support under top-p)."""
    out = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            nxt = {}
            for pre, pr in out.items():
                logits = model(torch.tensor([ids + list(pre)])).logits[0, -1]
                probs = target_probs(logits, temperature, top_p)
                for t in torch.nonzero(probs > 0).flatten().tolist():
                    nxt[pre + (t,)] = pr * float(probs[t])
            out = nxt
    return out


def test_tree_sampling_follows_target_distribution():
    """Chi-square goodness of fit of the first 3 tokens (2 of them from one tree step) over seeds."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # peaked distributions: few cells, accepted paths common
    temperature, top_p, n = 1.0, 0.9, 3
    joint = exact_joint(model, PROMPT, n, temperature, top_p)
    s = Settings(max_new_tokens=n, speculate="tree", temperature=temperature, top_p=top_p,
                 tree_budget=8, tree_depth=2)
    dec = Decoder(make_segments(model, s), s, draft=OracleTree(model, width=3))
    runs = 1200
    seen = Counter()
    one_step = 0
    for seed in range(runs):
        dec.s = s.replace(seed=seed)
        res = dec.generate(PROMPT)
        seen[tuple(res.token_ids)] += 1
        one_step += res.verify_steps == 1
    assert one_step / runs > 0.15  # tokens 2 and 3 often came from one step: an accepted child + bonus
    assert set(seen) <= set(joint)
    # cells with expected count >= 5, the rest pooled
    big = [c for c, pr in joint.items() if pr * runs >= 5]
    obs = [seen[c] for c in big] + [runs - sum(seen[c] for c in big)]
    exp = [joint[c] * runs for c in big] + [runs * (1 - sum(joint[c] for c in big))]
    cells = [(o, e) for o, e in zip(obs, exp) if e > 0]
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    # p < 1e-4 critical value (Wilson-Hilferty): fails only for a biased sampler
    z = 3.72
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert dof >= 3
    print(f"chi2 {chi2:.1f} < {crit:.1f} (dof {dof}), one-step share {one_step / runs:.2f}")
    assert chi2 < crit, (chi2, crit, dof)
    tv = 0.5 * sum(abs(seen[c] / runs - pr) for c, pr in joint.items())
    assert tv < 0.08


def test_tree_sampling_is_seeded():
    model = make_tiny_llama()
    a = tree_dec(model, eagle_tree(model), 20, temperature=0.8, seed=3).generate(PROMPT).token_ids
    b = tree_dec(model, eagle_tree(model), 20, temperature=0.8, seed=3).generate(PROMPT).token_ids
    assert a == b


# ---------------------------------------------------------------- SpecEE on the tree
def always_exit_program(L, k, score_bias=10.0):
    """Predictors whose score is sigmoid(score_bias) at every layer (zero weights)."""
    return SpecEEProgram(
        num_layers=L,
        exit_points=[ExitPoint(i, 0.5) for i in range(L - 1)],
        predictors=Predictors(torch.zeros(L, 8, 3 * k), torch.zeros(L, 8), torch.zeros(L, 8),
                              torch.full((L, 1), score_bias), list(range(L - 1))),
        offline_layers=list(range(L - 1)),
        num_candidates=k,
    )


def test_specee_tree_lossless_prunes_and_equals_dense():
    model = make_tiny_llama(num_hidden_layers=6)
    L = 6
    ref = dense(model, PROMPT, 30)
    prog = always_exit_program(L, 4)
    kw = {"tree_budget": 14, "tree_depth": 4, "specee": True, "mode": "lossless", "kv_policy": "backfill", "min_exit_layer": 2}
    res = tree_dec(model, OracleTree(model), 30, program=prog, **kw).generate(PROMPT)
    assert res.token_ids == ref.token_ids
    assert res.predictor_calls >= res.verify_steps  # one batched call per step until it prunes
    full_rows = res.verify_steps * L
    assert res.layer_rows < (res.tree_nodes + res.verify_steps) * L  # pruned rows skip deep layers
    assert res.avg_layers == pytest.approx(L)
    assert res.layer_rows >= full_rows
    # never exits: no pruning, same tokens, every row through every layer
    never = tree_dec(model, OracleTree(model), 30, program=always_exit_program(L, 4, -10.0), **kw).generate(PROMPT)
    assert never.token_ids == ref.token_ids
    assert never.layer_rows == (never.tree_nodes + never.verify_steps) * L


def test_specee_tree_approximate_stops_early():
    model = make_tiny_llama(num_hidden_layers=6)
    prog = always_exit_program(6, 4)
    res = tree_dec(model, OracleTree(model), 24, program=prog, tree_budget=14, tree_depth=4, specee=True,
                   min_exit_layer=3).generate(PROMPT)
    assert len(res.token_ids) == 24
    assert res.avg_layers <= 6
    assert set(res.exit_layers) <= set(range(3, 6))
    st = res.stats()
    assert st["accepted_per_step"] >= 1.0


def test_tree_exit_scores_match_the_op():
    from specee_compile.ops import exit_score_reference

    torch.manual_seed(0)
    q, k, D, Hm = 5, 4, 16, 8
    h, rows, p_prev = torch.randn(q, D), torch.randn(q, k, D), torch.rand(q, k)
    w1, b1, w2, b2, norm = torch.randn(Hm, 3 * k), torch.randn(Hm), torch.randn(Hm), torch.randn(1), torch.rand(D)
    score, z, p = tree_exit_scores(h, norm, rows, p_prev, w1, b1, w2, b2, 1e-5)
    for r in range(q):
        s1, z1, p1 = exit_score_reference(h[r][None, None], norm, rows[r], p_prev[r], w1, b1, w2, b2, 1e-5)
        torch.testing.assert_close(score[r : r + 1], s1)
        torch.testing.assert_close(z[r], z1)
        torch.testing.assert_close(p[r], p1)


# ---------------------------------------------------------------- settings, API
def test_settings_check_tree_fields():
    with pytest.raises(SpecEEError, match="speculate"):
        Settings(speculate="chain")
    with pytest.raises(SpecEEError, match="tree_budget"):
        Settings(tree_budget=0)
    with pytest.raises(SpecEEError):
        Settings(tree_depth="3")


def test_tree_shape_defaults_per_device_and_given_fields_win():
    from specee_compile.config import TREE_SHAPES

    assert Settings().tree_shape() == TREE_SHAPES["cpu"] == (2, 2, 2)
    assert Settings(device="cuda:1").tree_shape() == TREE_SHAPES["cuda"] == (24, 6, 8)
    assert Settings(device="cuda", tree_budget=10).tree_shape() == (10, 6, 8)
    assert Settings(tree_depth=3, tree_topk=5).tree_shape() == (2, 3, 5)
    # a CPU whose eager backend runs its matmuls in oneDNN (rows cost about one row up to 8): a larger tree
    assert Settings().tree_shape("onednn") == TREE_SHAPES["cpu-onednn"] == (4, 3, 2)
    assert Settings(device="cuda").tree_shape("onednn") == TREE_SHAPES["cuda"]
    assert Settings(tree_budget=3).tree_shape("onednn") == (3, 3, 2)
    # a draft head's measured shape (draft_config.json `tree_shapes`) replaces its device kind's default; the
    # fields given still win, and another kind's shape is not taken
    measured = {"cuda": (31, 4, 8), "cpu-onednn": (6, 3, 2)}
    assert Settings(device="cuda").tree_shape(None, measured) == (31, 4, 8)
    assert Settings(device="cuda", tree_depth=6).tree_shape(None, measured) == (31, 6, 8)
    assert Settings().tree_shape("onednn", measured) == (6, 3, 2)  # keyed as the defaults: the CPU's matmul library
    assert Settings().tree_shape("mkl", measured) == TREE_SHAPES["cpu"]
    assert Settings().tree_shape(None, {"cpu": (3, 2, 2)}) == (3, 2, 2)
    assert [Settings(device=d).tree_shape_key(g) for d, g in (("cuda", None), ("cpu", "mkl"), ("cpu", "onednn"))] == [
        "cuda", "cpu", "cpu-onednn"]
    dec = tree_dec(make_tiny_llama(), OracleTree(make_tiny_llama()), 4)
    assert (dec.tree.budget, dec.tree.depth, dec.tree.topk) == Settings().tree_shape(dec.seg.gemm)
    # prompt lookup: on by default on CUDA, off on a CPU; a given value wins
    assert Settings().tree_lookup_on() is False and Settings(device="cuda").tree_lookup_on() is True
    assert Settings(tree_lookup=True).tree_lookup_on() is True
    assert Settings(device="cuda", tree_lookup=False).tree_lookup_on() is False
    with pytest.raises(SpecEEError, match="tree_lookup"):
        Settings(tree_lookup="yes")
    # lookup first: n = 3 on a CPU, off on CUDA; a given value wins; n >= 0
    assert Settings().tree_lookup_first_n() == 3 and Settings(device="cuda").tree_lookup_first_n() == 0
    assert Settings(device="cuda", tree_lookup_first=2).tree_lookup_first_n() == 2
    assert Settings(tree_lookup_first=0).tree_lookup_first_n() == 0
    with pytest.raises(SpecEEError, match="tree_lookup_first"):
        Settings(tree_lookup_first=-1)
    # the fixed program verifies the draft's tree: lookup first is off there, and refused when asked for
    assert Settings(tree_program="fixed").tree_lookup_first_n() == 0
    with pytest.raises(SpecEEError, match="lookup first runs on the host step"):
        Settings(speculate="tree", tree_program="fixed", tree_lookup_first=3)


def test_tree_draft_takes_prompt_lookup_from_settings():
    """The product's tree source (api.tree_draft) merges the prompt-lookup path per Settings.tree_lookup_on()."""
    from specee_compile.api import tree_draft
    from specee_compile.draft.eagle import EagleSource

    source = EagleSource(EagleDraft(make_tiny_llama()).eval(), k=4)
    assert tree_draft(None, Settings(speculate="tree"), source=source).lookup is False  # CPU default
    assert tree_draft(None, Settings(speculate="tree", tree_lookup=True), source=source).lookup is True
    assert tree_draft(None, Settings(speculate="tree"), source=source).lookup_first == 3  # CPU default
    assert tree_draft(None, Settings(speculate="tree", tree_lookup_first=0), source=source).lookup_first == 0
    # on CUDA, lookup first keeps the host tree source (auto then runs the host step, not the fixed program)
    from types import SimpleNamespace

    from specee_compile.api import _device_draft

    cuda = SimpleNamespace(device=torch.device("cuda"), max_len=64)
    s = Settings(speculate="tree", device="cuda", tree_lookup_first=3)
    src = tree_draft(None, s, source=source)
    assert _device_draft(src, cuda, s) is src


def test_tree_needs_an_eagle_draft():
    model = make_tiny_llama()
    s = Settings(speculate="tree")
    with pytest.raises(SpecEEError, match="EAGLE draft"):
        Decoder(make_segments(model, s), s)


def test_build_decoder_tree_from_a_draft_directory(tmp_path, tiny_model_dir):
    from specee_compile.api import build_decoder
    from specee_compile.models import load_model

    loaded = load_model(str(tiny_model_dir))
    draft = EagleDraft(loaded.model)
    _init_draft(draft, 0)
    draft.save(tmp_path / "d")
    s = Settings(max_new_tokens=12, speculate="tree", artifacts=str(tmp_path / "d"), chat_template=False)
    res = build_decoder(loaded, s).generate(PROMPT)
    ref = build_decoder(loaded, s.replace(speculate="none", artifacts=None)).generate(PROMPT)
    assert res.token_ids == ref.token_ids
    with pytest.raises(SpecEEError, match="draft head"):
        build_decoder(loaded, s.replace(artifacts=str(tmp_path)))


@pytest.mark.slow
def test_smollm2_greedy_tree_equals_dense(smollm2):
    from specee_compile.api import build_decoder, encode_prompt

    ids = encode_prompt(smollm2.tokenizer, "Write a short poem about the sea.")
    s = Settings(max_new_tokens=48)
    ref = build_decoder(smollm2, s).generate(ids)
    res = build_decoder(smollm2, s.replace(speculate="tree")).generate(ids)
    assert res.token_ids == ref.token_ids
    assert res.accepted_per_step > 1.5


# ---------------------------------------------------------------- train-draft --device
def test_train_draft_device_path_on_cpu():
    """The --device code path (draft, buffers and batches on `device`), run on the CPU with a tiny budget."""
    from conftest import make_tiny_tokenizer

    from specee_compile.draft.train import train_draft

    model, tok = make_tiny_llama(), make_tiny_tokenizer()
    texts = [f"user {i}: tell me about item {i}. assistant: item {i} is a thing, and that is all." for i in range(12)]
    draft, report = train_draft(model, tok, texts, steps=4, batch_size=4, time_budget_s=None, device="cpu",
                                aux_layers=[1], vocab_size_limit=64, progress=False)
    assert report["steps"] == 4 and report["aux_layers"] == [1]
    assert draft.fc.weight.device.type == "cpu"
    assert 0.0 <= report["val_final_layer"]["top4"] <= 1.0
    src = EagleTreeSource(draft, k=4)  # the trained head drives the tree
    res = tree_dec(model, src, 10).generate(PROMPT)
    assert res.token_ids == dense(model, PROMPT, 10).token_ids


def test_train_draft_command_refuses_cuda_without_cuda(tmp_path):
    from specee_compile.draft.train import train_draft_command

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SpecEEError, match="CUDA"):
        train_draft_command("smollm2-135m", tmp_path / "d", device="cuda", progress=False)


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
def test_inductor_backend_tree_equals_dense(gemm, monkeypatch):
    """--backend inductor on a CPU: the tree layer is model_step's layer over the backend's CPU matmul weights, run
    eagerly there (with oneDNN's, which Inductor cannot take; compiled by torch.compile on CUDA), and the dense
    one-row steps compiled. Either library the probe may pick (pinned here) gives the dense tokens."""
    monkeypatch.setenv("SPECEE_CPU_GEMM", gemm)
    model = make_tiny_llama()
    ref = dense(model, PROMPT, 16)
    dec = tree_dec(model, OracleTree(model), 16, backend="inductor", tree_budget=6, tree_depth=3)
    assert dec.seg.gemm == gemm
    res = dec.generate(PROMPT)
    assert res.token_ids == ref.token_ids
    assert res.accepted_per_step > 2.0
    assert res.compile_s > 0  # the one-row segments compiled before the prefill (there is no whole step to capture)


# ---------------------------------------------------------------- the fixed tree program (FixedTree)
def _fixed_vs_host(model, device="cpu", backend="eager", n=40, lookup=False, prompt=PROMPT, layers=1, quant=None,
                   **tree):
    from specee_compile.draft.tree import DeviceEagleTreeSource

    draft = EagleDraft(model, num_layers=layers)
    _init_draft(draft, 0)
    draft.to(device).eval()
    if quant:
        draft.quantize(quant)
    out = {}
    for prog in ("host", "fixed"):
        s = Settings(max_new_tokens=n, speculate="tree", tree_program=prog, device=device, backend=backend, **tree)
        src = (DeviceEagleTreeSource(draft, k=4, max_len=s.max_context, compile=device == "cuda") if prog == "fixed"
               else EagleTreeSource(draft, k=4))
        src.lookup = lookup
        dec = Decoder(make_segments(model, s), s, draft=src)
        out[prog] = (dec.generate(prompt), dec)
    return out


@pytest.mark.parametrize("budget,depth,topk,lookup", [(12, 4, 4, False), (1, 1, 1, False), (30, 6, 8, False),
                                                      (5, 6, 2, False), (12, 4, 4, True), (1, 1, 1, True),
                                                      (30, 6, 8, True)])
def test_fixed_tree_program_equals_host_step_and_dense(budget, depth, topk, lookup):
    """Same trees, same accepted paths, same tokens as the host step (and dense greedy), with and without
    the prompt-lookup path (a repetitive prompt: the lookup finds continuations); it really ran."""
    model = make_tiny_llama()
    prompt = PROMPT * 3 if lookup else PROMPT
    ref = dense(model, prompt, 40)
    out = _fixed_vs_host(model, lookup=lookup, prompt=prompt, tree_budget=budget, tree_depth=depth, tree_topk=topk)
    (host, _), (fixed, dec) = out["host"], out["fixed"]
    assert dec.tree._fixed_on and dec.tree.fixed.programs
    assert fixed.token_ids == host.token_ids == ref.token_ids
    assert fixed.verify_steps == host.verify_steps
    assert dec.tree.accepted_log == out["host"][1].tree.accepted_log


@pytest.mark.parametrize("lookup", [False, True])
def test_fixed_tree_program_with_its_glue_compiled_equals_the_host_step(monkeypatch, lookup):
    """The step's glue (the plan with the rows' positions, slots and embeddings; the acceptance with every index
    the bookkeeping takes from it) compiled by Inductor, as on CUDA, here on the CPU: it compiles (no fallback to
    eager) and the program gives the host step's tokens and accepted lengths."""
    import specee_compile.runtime.tree as T

    class Compiled(T.CompiledFns):
        def __init__(self, what, enabled):
            super().__init__(what, True)

    monkeypatch.setattr(T, "CompiledFns", Compiled)
    model = make_tiny_llama()
    prompt = PROMPT * 3 if lookup else PROMPT
    out = _fixed_vs_host(model, lookup=lookup, prompt=prompt, n=24, tree_budget=12, tree_depth=4, tree_topk=4)
    (host, hdec), (fixed, dec) = out["host"], out["fixed"]
    glue = dec.tree.fixed.glue
    assert glue.error is None and set(glue.fns) == {"plan", "accept"}
    assert fixed.token_ids == host.token_ids and dec.tree.accepted_log == hdec.tree.accepted_log


def test_fixed_tree_program_follows_an_acceptance_trace():
    from specee_compile.draft.tree import DeviceEagleTreeSource
    from specee_compile.runtime.policies import trace_accepts

    model = make_tiny_llama()
    d = EagleDraft(model)
    _init_draft(d, 0)
    d.head_rows = d.head_rows * 50.0  # a confident draft: its tree is a deep chain
    s = Settings(max_new_tokens=60, speculate="tree", tree_program="fixed", tree_budget=12, tree_depth=6)
    src = DeviceEagleTreeSource(d.eval(), k=4)
    src.lookup = False  # all 12 rows for the draft's chain
    dec = Decoder(make_segments(model, s), s, draft=src, accept=trace_accepts([3, 5, 1, 4]))
    res = dec.generate(PROMPT)
    assert dec.tree.accepted_log[:8] == [3, 5, 1, 4, 3, 5, 1, 4]
    assert len(res.token_ids) == 60
    # the next call goes on where this one stopped in the trace (a trace of many prompts is replayed whole)
    steps = res.verify_steps
    dec.generate(PROMPT)
    assert dec.tree.accepted_log[:4] == [[3, 5, 1, 4][(steps + i) % 4] for i in range(4)]
    with pytest.raises(SpecEEError, match="acceptance trace needs the fixed tree program"):
        s2 = s.replace(tree_program="host")
        Decoder(make_segments(model, s2), s2, draft=eagle_tree(model), accept=trace_accepts([2]))


def test_fixed_tree_program_refuses_what_it_cannot_run():
    model = make_tiny_llama()
    with pytest.raises(SpecEEError, match="--tree-program fixed decodes greedily"):
        Settings(max_new_tokens=8, speculate="tree", tree_program="fixed", temperature=0.7)
    with pytest.raises(SpecEEError, match="--tree-program fixed runs no lossless exits on the tree"):
        Settings(speculate="tree", tree_program="fixed", specee=True, mode="lossless", kv_policy="backfill")
    Settings(speculate="tree", tree_program="fixed", specee=True)  # approximate: exits inside the program
    s = Settings(max_new_tokens=8, speculate="tree", tree_program="fixed")
    with pytest.raises(SpecEEError, match="cannot run here: it needs the draft on the device"):
        Decoder(make_segments(model, s), s, draft=eagle_tree(model))  # a host-only tree source
    s = Settings(max_new_tokens=8, speculate="tree", tree_program="fixed", tree_topk=2, specee=True)
    prog = always_exit_program(model.config.num_hidden_layers, 4)
    with pytest.raises(SpecEEError, match="its exits score the draft's 4 candidates per node, more than the tree's top-k"):
        Decoder(make_segments(model, s, prog), s, program=prog, draft=_device_tree(model, s))
    with pytest.raises(SpecEEError, match="tree_program='bogus' is not one of auto, fixed, host"):
        Settings(speculate="tree", tree_program="bogus")


# ---------------------------------------------------------------- SpecEE on the fixed tree program
def _device_tree(model, s, lookup=False, device="cpu"):
    from specee_compile.draft.tree import DeviceEagleTreeSource

    draft = EagleDraft(model)
    _init_draft(draft, 0)
    src = DeviceEagleTreeSource(draft.to(device).eval(), k=4, max_len=s.max_context, compile=device == "cuda")
    src.lookup = lookup
    return src


def random_program(L, k, seed, offline=(2, 4, 6)):
    """Random predictor MLPs at every layer: some rows exit at some layers, most do not."""
    g = torch.Generator().manual_seed(seed)
    return SpecEEProgram(num_layers=L, exit_points=[ExitPoint(i, 0.5) for i in range(L - 1)],
                         predictors=Predictors(torch.randn(L, 8, 3 * k, generator=g), torch.randn(L, 8, generator=g),
                                               torch.randn(L, 8, generator=g), torch.randn(L, 1, generator=g) + 1.0,
                                               list(range(L - 1))),
                         offline_layers=list(offline), num_candidates=k)


def _exits_fixed_vs_host(model, prog, prompt, n, scheduled, device="cpu", backend="eager", **kw):
    from specee_compile.predictors.schedule import OnlineScheduler

    out = {}
    for tp in ("host", "fixed"):
        s = Settings(max_new_tokens=n, speculate="tree", tree_program=tp, specee=True, device=device, backend=backend,
                     **kw)
        src = _device_tree(model, s, s.tree_lookup, device) if tp == "fixed" else eagle_tree(model)
        src.lookup = s.tree_lookup
        sched = OnlineScheduler.from_settings(s, prog.offline_layers, prog.predictors.layers) if scheduled else None
        dec = Decoder(make_segments(model, s, prog), s, program=prog, draft=src, scheduler=sched)
        res = dec.generate(prompt)
        n_pos = len(prompt) + len(res.token_ids) - 1
        out[tp] = (res, dec, dec.seg.cache.valid[:, :n_pos].cpu().clone())
    return out


@pytest.mark.parametrize("seed,shape,lookup,scheduled,min_exit", [(4, (12, 4, 4), False, False, 0),
                                                                  (1, (30, 6, 8), True, True, 1),
                                                                  (2, (5, 6, 4), False, True, 3),
                                                                  (3, (12, 4, 4), True, False, 2)])
def test_fixed_tree_program_with_exits_equals_the_host_step(seed, shape, lookup, scheduled, min_exit):
    """SpecEE on the tree inside the fixed program (approximate: the path leaves at its exit layer, the paper's
    check on its head argmax): the same tokens, exit layers, predictor and head calls, layer passes and KV
    validity (the skip policy) as the host step, with random predictors, the online schedule, the lookup rows."""
    L = 8
    model = make_tiny_llama(num_hidden_layers=L)
    prompt = PROMPT * 3 if lookup else PROMPT
    out = _exits_fixed_vs_host(model, random_program(L, 4, seed), prompt, 40, scheduled, tree_budget=shape[0],
                               tree_depth=shape[1], tree_topk=shape[2], min_exit_layer=min_exit, tree_lookup=lookup)
    (host, _, hv), (fixed, dec, fv) = out["host"], out["fixed"]
    assert dec.tree._fixed_on and dec.tree.fixed.gated and dec.tree.fixed.programs
    assert fixed.token_ids == host.token_ids
    assert fixed.exit_layers == host.exit_layers
    assert (fixed.verify_steps, fixed.predictor_calls, fixed.head_calls, fixed.layer_passes) == (
        host.verify_steps, host.predictor_calls, host.head_calls, host.layer_passes)
    assert torch.equal(fv, hv)
    assert min(fixed.exit_layers) < L - 1 and fixed.avg_layers < L  # it did leave early
    assert dec.selection["exit_points_kept"] == list(range(L - 1))  # (no exit rates: every point kept)
    assert dec.tree.fixed.ex.gates == [i for i in range(L - 1) if i >= min_exit]


def test_fixed_tree_program_with_exits_that_never_fire_is_the_tree():
    """Predictors that never exit: the gated program emits dense greedy, every step through every layer."""
    L = 6
    model = make_tiny_llama(num_hidden_layers=L)
    ref = dense(model, PROMPT, 30)
    s = Settings(max_new_tokens=30, speculate="tree", tree_program="fixed", specee=True, tree_budget=12, tree_depth=4,
                 tree_topk=4)
    prog = always_exit_program(L, 4, -10.0)
    dec = Decoder(make_segments(model, s, prog), s, program=prog, draft=_device_tree(model, s))
    res = dec.generate(PROMPT)
    assert dec.tree.fixed.gated
    assert res.token_ids == ref.token_ids
    assert set(res.exit_layers) == {L - 1} and res.avg_layers == L and res.head_calls == 0
    assert res.predictor_calls == res.verify_steps * (L - 1)


@pytest.mark.parametrize("device,backend", [("cpu", "eager"),
                                            pytest.param("cuda", "inductor", marks=pytest.mark.skipif(
                                                not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fixed_tree_program_follows_an_exit_trace(device, backend):
    """The benchmark's replay: an acceptance trace picks the path, an exit trace the layer it leaves at (the
    deepest of its tokens' trace layers: the merged mapping), at the first active exit point at or past it. On
    CUDA as `bench`'s tree35_specee232 row runs it: captured, the branches IF nodes, the glue compiled."""
    from specee_compile.runtime.policies import trace_accepts, trace_exits

    L = 8
    model = make_tiny_llama(num_hidden_layers=L)
    s = Settings(max_new_tokens=40, speculate="tree", tree_program="fixed", specee=True, tree_budget=12, tree_depth=6,
                 tree_topk=4, min_exit_layer=2, tree_lookup=False, exit_cost_check=False,  # (every point kept)
                 tree_guard=False,  # on CUDA the guard would decline this tiny tree and decode the rest densely
                 device=device, backend=backend)
    src = _device_tree(model, s, device=device)
    src.draft.head_rows = src.draft.head_rows * 50.0  # a confident draft: its tree is a deep chain
    prog = always_exit_program(L, 4, -10.0)  # the predictors never exit: the trace decides
    accepts, exits = [3, 1, 2, 4], [1, 5, 3, 7, 2, 4, 6, 0, 3]
    dec = Decoder(make_segments(model, s, prog), s, program=prog, draft=src, accept=trace_accepts(accepts),
                  policy=trace_exits(exits))
    res = dec.generate(PROMPT)
    assert dec.tree.accepted_log[:4] == accepts
    steps, cur = [], 0  # (tokens, exit layer) per verify step (the last one's tokens cut at max_new_tokens)
    for n in (accepts[i % len(accepts)] for i in range(res.verify_steps)):
        deepest = max(exits[(cur + j) % len(exits)] for j in range(n))
        steps.append((n, L - 1 if deepest >= L - 1 else max(deepest, 2)))
        cur += n
    want = [L - 1] + [e for n, e in steps for _ in range(n)]  # (the first token comes from the prefill)
    assert res.exit_layers == want[: len(res.exit_layers)]
    assert res.head_calls == sum(e < L - 1 for _, e in steps) > 0  # one per path that left (no paper check)
    # each step's rows (root p, accepted p + 1 .. p + n - 1) hold K/V up to its exit layer only
    valid, p = dec.seg.cache.valid, len(PROMPT)
    for n, e in steps[:-1]:
        assert bool(valid[: e + 1, p : p + n].all()) and not bool(valid[e + 1 :, p : p + n].any())
        p += n
    assert dec.tree.fixed.glue.error is None
    with pytest.raises(SpecEEError, match="an exit trace on the tree needs an acceptance trace too"):
        Decoder(make_segments(model, s, prog), s, program=prog, draft=_device_tree(model, s, device=device),
                policy=trace_exits(exits))


@pytest.mark.parametrize("program", ["host", "fixed"])
def test_tree_exit_points_are_weighed_with_a_path_s_rates(program):
    """Approximate SpecEE on the tree keeps only the exit points that pay, with a path's exit rates (a step leaves
    where all its ~3 tokens have): rates that pay for one token do not for a path, and the step is the tree's."""
    L = 6
    model = make_tiny_llama(num_hidden_layers=L)
    prog = always_exit_program(L, 4)
    prog.exit_rates = {i: 0.15 for i in range(L - 1)}  # 75% of tokens out by layer 4, one by one
    s = Settings(max_new_tokens=24, speculate="tree", tree_program=program, specee=True, tree_budget=12, tree_depth=4,
                 tree_topk=4, min_exit_layer=2, tree_lookup=False)
    src = _device_tree(model, s) if program == "fixed" else eagle_tree(model)
    dec = Decoder(make_segments(model, s, prog), s, program=prog, draft=src)
    from specee_compile.runtime.exit_costs import StepCosts, select_exit_points

    costs = StepCosts(layer_s=100e-6, fixed_s=0.0, decision_s=40e-6, draft_s=0.0)
    # one token: point l saves 0.15 x (5 - l) x 100 us, so 0, 1 and 2 pay their 40 us; a path of 3 tokens leaves
    # by l with 0.15 (l + 1) cubed: at most 25 us saved at any point, so none pays
    assert select_exit_points(list(range(L - 1)), L, costs, prog.exit_rates)[0] == [0, 1, 2]
    dec._composed_costs = lambda: costs
    dec._select_exit_points()  # (what the first generate's start does)
    ep = dec.selection
    assert ep["path_tokens"] == 3.0 and ep["exit_points_kept"] == [] and dec.exit_layers == []
    assert all("us/verify step" in why for why in ep["exit_points_dropped"].values())
    res = dec.generate(PROMPT)
    assert res.token_ids == dense(model, PROMPT, 24).token_ids  # no point kept fires: the tree's own tokens
    assert set(res.exit_layers) == {L - 1}


def test_fixed_tree_program_exits_with_compiled_glue_equal_the_host_step():
    """The exits' glue (the decision with its path walk, the commit, the deep layers' K/V) as Inductor-compiled
    functions, as CUDA with the inductor backend runs them: one compile each serves every exit point (a
    recompile fails the call and sets `glue.error`), and the step equals the host step."""
    import torch._dynamo
    import torch._inductor.config as ic

    L = 8
    model = make_tiny_llama(num_hidden_layers=L)
    prog = random_program(L, 4, 3)
    want = _exits_fixed_vs_host(model, prog, PROMPT, 24, False, tree_budget=12, tree_depth=4, tree_topk=4,
                                min_exit_layer=2, tree_lookup=False)["host"][0]
    s = Settings(max_new_tokens=24, speculate="tree", tree_program="fixed", specee=True, tree_budget=12, tree_depth=4,
                 tree_topk=4, min_exit_layer=2, tree_lookup=False)
    dec = Decoder(make_segments(model, s, prog), s, program=prog, draft=_device_tree(model, s))
    f = dec.tree.fixed
    f.glue.enabled = True
    with ic.patch({"cpp.simdlen": 1}), torch._dynamo.config.patch(error_on_recompile=True):
        torch._dynamo.reset()
        got = dec.generate(PROMPT)
    assert f.glue.error is None and sorted(f.glue.fns) == ["accept", "commit", "decide", "forget", "plan"]
    assert got.token_ids == want.token_ids and got.exit_layers == want.exit_layers
    assert min(got.exit_layers) < L - 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cuda_fixed_tree_program_with_exits_equals_the_host_step(backend):
    """On CUDA the exits are IF nodes of the captured graph (the device decides): the same tokens, exits and KV
    validity as the host step."""
    L = 8
    model = make_tiny_llama(num_hidden_layers=L)
    # the guard off: on CUDA with inductor it times the tiny tree against dense and may decline it mid-generation
    # (since 2db1a71 it arms there), and the dense steps then leave where the tree's paths would not
    out = _exits_fixed_vs_host(model, random_program(L, 4, 3), PROMPT * 3, 40, True, device="cuda", backend=backend,
                               tree_budget=12, tree_depth=4, tree_topk=4, min_exit_layer=2, tree_lookup=True,
                               exit_cost_check=False, tree_guard=False)
    (host, _, hv), (fixed, dec, fv) = out["host"], out["fixed"]
    assert dec.tree.fixed.gated and all(type(g).__name__ == "method" for g in dec.tree.fixed.programs.values())
    assert fixed.token_ids == host.token_ids
    assert fixed.exit_layers == host.exit_layers
    assert torch.equal(fv, hv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,lookup", [("eager", False), ("inductor", False), ("inductor", True)])
def test_fixed_tree_program_captured_on_cuda_equals_dense(backend, lookup):
    """On CUDA the fixed program is a CUDA graph per bucket (Segments.capture); greedy output = dense."""
    model = make_tiny_llama()
    prompt = PROMPT * 3 if lookup else PROMPT
    ref = dense(model, prompt, 40, device="cuda", backend=backend)
    out = _fixed_vs_host(model, device="cuda", backend=backend, lookup=lookup, prompt=prompt, tree_budget=12,
                         tree_depth=4, tree_topk=4)
    (host, _), (fixed, dec) = out["host"], out["fixed"]
    assert dec.tree._fixed_on and dec.tree.fixed.programs
    assert all(type(g).__name__ == "method" for g in dec.tree.fixed.programs.values())  # CUDAGraph.replay
    assert fixed.token_ids == ref.token_ids == host.token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", [None, "int8"])
def test_cuda_two_layer_draft_tree_equals_dense(quant):
    """A head of two decoder layers (`train-draft --draft-layers 2`) in the captured fixed program on CUDA, its
    weights as they are and rounded to int8 (the CUDA default for a 16-bit draft): the host step's tokens and
    accepted lengths, and dense greedy's tokens."""
    model = make_tiny_llama()
    ref = dense(model, PROMPT, 40, device="cuda", backend="inductor")
    # the guard off: it times the tiny tree against dense on CUDA and declines it mid-generation (its dense steps
    # then log no accepted lengths; the first GPU run, session 42, failed on exactly that)
    out = _fixed_vs_host(model, device="cuda", backend="inductor", layers=2, quant=quant, tree_budget=12,
                         tree_depth=4, tree_topk=4, tree_guard=False)
    (host, hdec), (fixed, dec) = out["host"], out["fixed"]
    assert len(dec.draft.draft.layers) == 2 and dec.draft.draft.quant == (quant or "none")
    assert dec.tree._fixed_on and dec.tree.fixed.programs
    assert fixed.token_ids == ref.token_ids == host.token_ids
    assert dec.tree.accepted_log == hdec.tree.accepted_log


def test_fixed_tree_program_with_compiled_glue_equals_dense():
    """The program's glue (the tree's plan with the lookup merge, the acceptance) as Inductor-compiled functions,
    as CUDA with the inductor backend runs it: the same tokens as dense greedy, two attention buckets served
    by one compile each (a recompile would fail the call and leave `glue.error` set). Here on Inductor's CPU
    code (not vectorized: its CPU vector code for this graph is not what is checked)."""
    import torch._dynamo
    import torch._inductor.config as ic

    from specee_compile.draft.tree import DeviceEagleTreeSource

    model = make_tiny_llama()
    prompt = PROMPT * 3
    ref = dense(model, prompt, 40)
    draft = EagleDraft(model)
    _init_draft(draft, 0)
    draft.eval()
    s = Settings(max_new_tokens=40, speculate="tree", tree_program="fixed", tree_budget=12, tree_depth=4, tree_topk=4)
    src = DeviceEagleTreeSource(draft, k=4, max_len=s.max_context, compile=False)
    src.lookup = True
    dec = Decoder(make_segments(model, s), s, draft=src)
    f = dec.tree.fixed
    assert not f.glue.enabled  # the CPU default: eager glue
    f.glue.enabled = True
    with ic.patch({"cpp.simdlen": 1}), torch._dynamo.config.patch(error_on_recompile=True):
        torch._dynamo.reset()
        got = dec.generate(prompt)
    assert f.glue.error is None and sorted(f.glue.fns) == ["accept", "plan"]
    assert sorted(f.programs) == [64, 128] and got.token_ids == ref.token_ids
    torch._dynamo.reset()


def test_fixed_tree_program_reads_nothing_on_the_host():
    """A CUDA graph cannot hold a host read: no op of the program may turn a tensor into a Python value
    (`_local_scalar_dense`: .item(), int(t), a 0-d index) or have a data-dependent shape (nonzero)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero,
                                       torch.ops.aten.masked_select, torch.ops.aten.unique_consecutive):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model = make_tiny_llama()
    out = _fixed_vs_host(model, n=12, lookup=True, tree_budget=12, tree_depth=4, tree_topk=4)
    f = out["fixed"][1].tree.fixed
    assert f.Dl == 4
    S = f.bucket(30)
    f.p.fill_(20)
    with HostReads() as mode:
        f.body(S)
    assert mode.seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_trace_replay_follows_its_trace_after_the_captures(tmp_path):
    """Session 17 (H200): the graph warm-ups of the fixed tree program left inf / NaN in cache slots no
    position held (fp16, 7B widths); the masked verification multiplied them by zero weights (NaN), the kept
    tree collapsed and a forced trace was followed at 0.53 of its length, worse on every later call. With the
    junk cleared (`KVCache.junk`), every call follows the trace and no non-finite value is left anywhere."""
    from specee_compile.api import build_decoder
    from specee_compile.eval import gpu_bench as gb
    from specee_compile.models import load_model
    from specee_compile.runtime.policies import trace_accepts

    shape = dict(gb.LLAMA2_7B, num_hidden_layers=4)  # as the session-17 diagnostic that found it
    gb.write_random_model(shape, torch.float16, torch.device("cuda"), str(tmp_path))
    loaded = load_model(str(tmp_path), dtype=torch.float16, device="cuda")
    prompt = torch.randint(0, shape["vocab_size"], (64,), generator=torch.Generator().manual_seed(0)).tolist()
    base = {"device": "cuda", "dtype": "float16", "backend": "inductor", "max_context": 256, "max_new_tokens": 128}
    _, draft, _ = gb.random_artifacts(loaded, [2] * 64)
    dense = build_decoder(loaded, Settings(**base))
    gb.sharpen_draft(draft, dense.seg, prompt, gb.TRACE_SPREAD)
    trace = gb.accept_trace(4096, 3.5)
    tree = build_decoder(loaded, Settings(**base, speculate="tree", tree_program="fixed", tree_lookup=False,
                                          tree_guard=False),  # 4 layers: the tree need not pay; the replay is checked
                         segments=dense.seg, draft=draft, accept=trace_accepts(trace))
    dense.generate(prompt)
    for _ in range(2):
        tree.generate(prompt)
        fid = gb.replay_fidelity(tree.tree, trace)
        assert fid["realized_vs_forced"] >= 0.9, fid  # (0.53 and falling with the NaN; 0.99 without)
    c, d = dense.seg.cache, tree.tree.fixed.draft
    assert all(bool(torch.isfinite(t).all()) for t in (c.k, c.v, d._feats, *d._k, *d._v, tree.tree.fixed.g0))


def test_many_tree_decoders_in_one_process_keep_compiling():
    """Every decoder compiles `model_step`'s one layer code with what makes it distinct (dtype, rows of one
    or many, a tree mask or none, the model's shapes): Dynamo counts every such compile against one limit
    per code object. At its default (8) the next `fullgraph=True` compile raises (the CUDA tree test hit it
    on the H200 at its third decoder in one process, session 18); the product raises the limit before it
    compiles. Dynamo only (backend "eager"), tiny shapes."""
    from types import SimpleNamespace

    import torch._dynamo

    from specee_compile.compiled_fns import RECOMPILE_LIMIT, allow_recompiles
    from specee_compile.model_step import make_layer_fn

    H, hd, D, F, T = 2, 4, 8, 12, 16
    spec = SimpleNamespace(num_heads=H, num_kv_heads=H, head_dim=hd, eps=1e-5, hidden=D, max_len=T)

    def run():
        torch._dynamo.reset()
        for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):  # decoders of four dtypes
            fn = torch.compile(make_layer_fn(spec), backend="eager", fullgraph=True, dynamic=None)
            w = [t.to(dt) for t in (torch.ones(D), torch.randn(3 * H * hd, D), torch.randn(D, H * hd),
                                    torch.ones(D), torch.randn(2 * F, D), torch.randn(D, F))]
            w.insert(2, None)
            for rows, tree in ((1, False), (3, False), (3, True)):  # the decode row, rows, tree rows
                pos = torch.arange(3, 3 + rows)
                extra = {"slots": pos, "mask": torch.ones(rows, 8, dtype=torch.bool)} if tree else {}
                fn(torch.randn(1, rows, D, dtype=dt), pos, torch.ones(T, dtype=torch.bool), torch.ones(T, hd, dtype=dt),
                   torch.zeros(T, hd, dtype=dt), torch.zeros(H, T, hd, dtype=dt), torch.zeros(H, T, hd, dtype=dt),
                   8, *w, **extra)

    cfg = torch._dynamo.config
    with torch._dynamo.config.patch(recompile_limit=8):
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # the failure the product avoids
            run()
        allow_recompiles()
        assert cfg.recompile_limit == RECOMPILE_LIMIT
        run()
    torch._dynamo.reset()


def test_tree_guard_declines_only_a_tree_that_does_not_pay():
    from specee_compile.runtime.tree import TreeGuard

    g = TreeGuard(tree_s=3e-3, dense_s=1e-3, source="given", min_steps=4)  # break-even: 3 tokens per step
    assert g.break_even == pytest.approx(3.0)
    for n in (1, 1, 1):  # under min_steps: no verdict yet
        g.observe(n)
    assert g.declined is None
    g.observe(9)  # 12 / 4 = 3.0: pays exactly, kept
    assert g.declined is None
    g.observe(1)  # 13 / 5 < 3
    assert "2.60 tokens per step" in g.declined and "3.00 dense steps" in g.declined
    g.observe(50)  # a declined tree stays declined
    assert g.steps == 5 and g.record()["declined"] == g.declined
    assert g.record()["break_even_tokens_per_step"] == 3.0
    with pytest.raises(ValueError):
        TreeGuard(tree_s=0.0, dense_s=1e-3, source="given")
    # the setting and its flag: on by default, --no-tree-guard turns it off, a non-bool is refused
    import argparse

    from specee_compile.cli import _add_decode_args, _settings_from

    p = argparse.ArgumentParser()
    _add_decode_args(p)
    assert _settings_from(p.parse_args([])).tree_guard is True
    assert _settings_from(p.parse_args(["--no-tree-guard"])).tree_guard is False
    with pytest.raises(SpecEEError, match="tree_guard"):
        Settings(tree_guard="yes")


@pytest.mark.parametrize("tree_s,declines", [(100.0, True), (1e-6, False)])
def test_a_declined_tree_decodes_densely_with_the_same_tokens(tree_s, declines):
    """The guard (timed on CUDA; given here) declines a tree that costs more dense steps than it accepts tokens:
    the decoder's next steps are dense steps, the tokens stay dense greedy's, and the stats count the tokens of
    both kinds of step and say why."""
    from specee_compile.runtime.tree import TreeGuard

    model = make_tiny_llama()
    ref = dense(model, PROMPT, 40).token_ids
    dec = tree_dec(model, eagle_tree(model), 40)
    dec.tree.guard = TreeGuard(tree_s=tree_s, dense_s=1e-3, source="given", min_steps=3)
    res = dec.generate(PROMPT)
    assert res.token_ids == ref
    st = res.stats()
    if declines:
        assert res.verify_steps == 3 and res.decode_steps > 3 and not dec.tree.on
        assert st["tree_guard"]["declined"] and st["tree_guard"]["steps_seen"] == 3
        # tokens: the tree steps' accepted ones plus one per dense step (every generated token but the prefill's)
        assert res.accepted_tokens + res.decode_steps - res.verify_steps == len(ref) - 1
        again = dec.generate(PROMPT)  # the decoder stays dense
        assert again.token_ids == ref and again.verify_steps == 0 and again.stats()["tree_guard"]["declined"]
    else:
        assert res.verify_steps == res.decode_steps and dec.tree.on and st["tree_guard"]["declined"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tree_guard_is_timed_and_a_declined_tree_continues_on_the_dense_graphs():
    """On CUDA (inductor: the fixed program beside the dense whole step) the guard times a step of each before
    the first token. Declined mid-generation (its tree cost set high), the decoder continues on the dense
    whole-step graphs captured at start (run ahead), with dense greedy's tokens, on this call and the next."""
    from specee_compile.draft.tree import DeviceEagleTreeSource

    model = make_tiny_llama()
    ref = dense(model, PROMPT, 40, device="cuda", backend="inductor").token_ids
    draft = EagleDraft(model)
    _init_draft(draft, 0)
    draft.to("cuda").eval()
    s = Settings(max_new_tokens=40, speculate="tree", tree_program="fixed", device="cuda", backend="inductor",
                 tree_budget=12, tree_depth=4, tree_topk=4)
    dec = Decoder(make_segments(model, s), s, draft=DeviceEagleTreeSource(draft, k=4, max_len=s.max_context,
                                                                           compile=True))
    first = dec.generate(PROMPT)
    g = dec.tree.guard
    assert g is not None and g.tree_s > 0 and g.dense_s > 0 and first.tree_guard["tree_step_us"] > 0
    assert first.token_ids == ref
    if g.declined is None:  # (a tiny model's tree may pay or not; make it not pay)
        g.tree_s, g.min_steps, g.steps, g.accepted = 1.0, 2, 0, 0
        res = dec.generate(PROMPT)
        assert g.declined and res.verify_steps == 2 and res.decode_steps > 2
        assert res.token_ids == ref
    again = dec.generate(PROMPT)
    assert again.verify_steps == 0 and again.token_ids == ref and again.tree_guard["declined"]
