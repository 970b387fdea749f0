"""Draft training for the GPU path, run on the CPU with tiny models: unrolled training matches the
runtime's draft chain exactly, batched collection equals one-by-one, packed data round-trips (and is
refused for another tokenizer), the time budget covers generation + collection + training, and the
CLI's new flags fail with one line. Fast; no downloads."""

from __future__ import annotations

import json
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from specee_compile.cli import main
from specee_compile.draft import EagleDraft
from specee_compile.draft.train import (
    choose_vocab,
    collect_teacher_data,
    load_training_data,
    pack_training_data,
    train_draft,
    train_draft_command,
    unrolled_forward,
    unrolled_mask,
)
from specee_compile.errors import SpecEEError

TEXTS = [f"user {i}: tell me about item {i}. assistant: item {i} is a thing, and that is all {i % 3}."
         for i in range(16)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _random_draft(model, seed=1):
    torch.manual_seed(seed)
    d = EagleDraft(model, torch.arange(200))
    with torch.no_grad():  # non-trivial weights: every input and every attended key matters
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return d.eval()


def test_unrolled_mask_by_hand():
    m = unrolled_mask(4, 2).int()
    # query t sees true keys j <= t - 2, step-1 key at t - 1, its own step-2 key at t
    assert m.tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
    ]


@torch.no_grad()
def test_unrolled_forward_equals_runtime_draft_chain(model):
    """Step s at position t = m + s must be what the runtime computes at tree depth s + 1: the draft
    cache holds the true pairs 0..m, then the draft runs on its own output s times."""
    draft = _random_draft(model)
    g = torch.Generator().manual_seed(3)
    B, T, D = 2, 9, draft.hidden_size
    feats = torch.randn(B, T, D, generator=g)
    nxt = torch.randint(0, 256, (B, T), generator=g)
    pos = torch.arange(T)[None].expand(B, T)
    outs = unrolled_forward(draft, feats, nxt, pos, unroll=3)
    assert len(outs) == 3 and all(o.shape == (B, T, D) for o in outs)
    for m in (0, 2, 5):
        for b in range(B):
            g0, past = draft(feats[b : b + 1, : m + 1], nxt[b : b + 1, : m + 1], pos[b : b + 1, : m + 1])
            cur = g0[:, -1:]
            torch.testing.assert_close(cur[0, 0], outs[0][b, m], atol=3e-4, rtol=1e-3)
            for s in (1, 2):
                t = m + s
                if t >= T:
                    break
                cur, new = draft(cur, nxt[b : b + 1, t : t + 1], pos[b : b + 1, t : t + 1], past=past)
                past = [(torch.cat([pk, nk], 2), torch.cat([pv, nv], 2)) for (pk, pv), (nk, nv) in zip(past, new)]
                torch.testing.assert_close(cur[0, 0], outs[s][b, t], atol=3e-4, rtol=1e-3)
    # step 1 really reads the fed-back features (not the true ones)
    assert not torch.allclose(outs[1][:, 3:], outs[0][:, 3:], atol=1e-3)


def test_batched_collection_equals_one_by_one(model, tok):
    one = collect_teacher_data(model, tok, TEXTS[:7], seq_len=40, aux_layers=[1, 2], progress=False, batch_size=1)
    many = collect_teacher_data(model, tok, TEXTS[:7], seq_len=40, aux_layers=[1, 2], progress=False, batch_size=3)
    assert torch.equal(one["lengths"], many["lengths"]) and torch.equal(one["ids"], many["ids"])
    valid = torch.arange(one["ids"].shape[1])[None] < one["lengths"][:, None]
    assert torch.equal(one["argmax"][valid], many["argmax"][valid])
    torch.testing.assert_close(one["final"][valid].float(), many["final"][valid].float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(one["aux"][:, valid].float(), many["aux"][:, valid].float(), atol=2e-3, rtol=2e-3)


def test_collection_deadline_keeps_min_sequences(model, tok):
    data = collect_teacher_data(model, tok, TEXTS, seq_len=40, aux_layers=[1], progress=False, batch_size=2,
                                deadline=time.time() - 1, min_sequences=4)
    assert data["ids"].shape[0] == 4 and data["offered_sequences"] == len(TEXTS)


def test_pairs_before_the_reply_are_not_trained(model, tok):
    """Items (ids, reply start): pairs t < start - 1 (the prompt) are masked out of loss and scores,
    as the runtime only drafts from the last prompt position on."""
    from specee_compile.draft.train import _batch

    seq = tok("<|user|>what is 2+2?\n<|assistant|>it is 4, of course.", add_special_tokens=False)["input_ids"]
    data = collect_teacher_data(model, tok, [(seq, 20), seq], seq_len=64, aux_layers=[1], progress=False)
    assert data["starts"].tolist() == [20, 0]
    vmap = torch.arange(256)
    _f, _n, _p, _tf, tgt_tok, valid = _batch(data, torch.tensor([0, 1]), vmap, 0.0, None)
    n = len(seq) - 1
    assert valid[0].tolist() == [False] * 19 + [True] * (n - 19)
    assert valid[1].tolist() == [True] * n
    assert (tgt_tok[0, :19] == -100).all() and (tgt_tok[0, 19:] >= 0).all()
    # a conversation's reply start is found from its generation prompt
    conv = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "it is 4, of course."}]
    d2 = collect_teacher_data(model, tok, [conv], seq_len=64, aux_layers=[1], progress=False, min_tokens=4)
    from specee_compile.draft.train import prompt_ids

    assert d2["starts"].tolist() == [len(prompt_ids(tok, conv))]


def test_choose_vocab_counts_predictions_twice():
    ids = torch.tensor([[5, 5, 6, 7, 0], [6, 6, 6, 9, 9]])
    argmax = torch.tensor([[7, 7, 7, 8, 3], [7, 8, 1, 1, 1]])
    data = {"ids": ids, "argmax": argmax, "lengths": torch.tensor([4, 3])}
    # valid: row 0 pos 0..3, row 1 pos 0..2; counts: 5:2, 6:1+3=4, 7:1 + 2*(3+1)=9, 8:2*(1+1)=4, 1:2
    v = choose_vocab(data, 4, 12, always=[11])
    assert v.tolist() == [7, 6, 8, 11]  # 6 and 8 tie at 4: lower id first; EOS-like 11 kept
    v = choose_vocab(data, 3, 12, extra_counts=Counter({1: 10}))
    assert v.tolist() == [1, 7, 6]


@pytest.mark.parametrize("name", ["d.safetensors", "d.safetensors.xz"])
def test_pack_round_trip_and_refusals(tmp_path, tok, name):
    path = tmp_path / name
    convs = [{"conversations": [{"from": "human", "value": f"question {i}?"},
                                {"from": "gpt", "value": f"answer {i}, quite long enough to keep."}]} for i in range(5)]
    convs.append({"conversations": [{"from": "gpt", "value": "no user turn"}]})  # unusable: dropped
    long = {"conversations": [{"from": "human", "value": "a long question " * 4},
                              {"from": "gpt", "value": "cut away"}]}  # prompt fills the window: no text
    convs = [long, *convs]
    meta = pack_training_data(tok, convs, path, seq_len=48, prompt_tokens=20, max_texts=4, progress=False,
                              source="unit test")
    assert meta["count"] == "6" and meta["texts"] == "3" and meta["ids"] == "uint16-as-int16"
    if name.endswith(".xz"):
        assert path.read_bytes()[:6] == b"\xfd7zXZ\x00"
    texts, prompts, meta2 = load_training_data(path, tok)
    assert meta2["source"] == "unit test" and len(texts) == 3 and len(prompts) == 6
    from specee_compile.draft.train import format_text, prompt_ids

    want = tok(format_text(tok, convs[3]), add_special_tokens=False)["input_ids"][:48]
    assert texts[2][0] == want and prompts[4] == prompt_ids(tok, convs[4])[-20:] and len(prompts[4]) == 20
    # the reply starts right after the generation prompt (a prefix of the text)
    start = len(prompt_ids(tok, convs[3]))
    assert texts[2][1] == start and want[:start] == prompt_ids(tok, convs[3]) and start < len(want)

    class BigIds:  # ids above 32767 survive the 16-bit encoding; another tokenizer is refused
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [40000 + ord(c) for c in text]}

    big = BigIds()
    pack_training_data(big, ["a" * 20 + "\u00e9" * 5], tmp_path / "big.safetensors", progress=False)
    ((t, st),), _prompts, _ = load_training_data(tmp_path / "big.safetensors", big)
    assert st == 0 and t == [40000 + ord(c) for c in "a" * 20 + "\u00e9" * 5] and t[-1] == 40233
    with pytest.raises(SpecEEError, match="another tokenizer"):
        load_training_data(tmp_path / "big.safetensors", tok)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpecEEError, match="cannot read|not packed"):
        load_training_data(tmp_path / "junk.safetensors", tok)


def test_unrolled_training_learns_and_reports_depth(model, tok):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    texts = [("abcabd " * 6)[i % 5 :] + "xyz " * 3 for i in range(24)]
    d, rep = train_draft(model, tok, texts, steps=60, lr=3e-3, seq_len=48, vocab_size_limit=64, progress=False,
                         batch_size=6, seed=0, unroll=2, aux_layers=[1], time_budget_s=None)
    assert rep["unroll"] == 2 and rep["final_loss"] < 0.85 * rep["first_loss"]
    depth = rep["val_final_layer"]["top1_by_depth"]
    assert len(depth) == 3 and all(0.0 <= x <= 1.0 for x in depth)
    assert isinstance(d, EagleDraft)
    with pytest.raises(SpecEEError, match="unroll"):
        train_draft(model, tok, texts, steps=2, unroll=0, progress=False, time_budget_s=None)


def test_command_budget_covers_generation_collection_training(tmp_path, model, tok):
    data = tmp_path / "d.safetensors"
    convs = [[f"question {i} about a thing?", f"answer {i}: it is a thing of some length, {i}."] for i in range(40)]
    pack_training_data(tok, convs, data, seq_len=48, progress=False)
    loaded = SimpleNamespace(model=model, tokenizer=tok, fingerprint="tiny")
    budget = 6.0
    t0 = time.time()
    cfg = train_draft_command("tiny", tmp_path / "out", loaded=loaded, data_file=data, conversations=30,
                              self_generated=6, gen_tokens=8, seq_len=48, steps=10**6, batch_size=4,
                              time_budget_s=budget, unroll=2, exit_mix=0.25, aux_layers=[1], progress=False,
                              vocab_size_limit=64)
    took = time.time() - t0
    rep = cfg["train"]
    assert rep["stopped_by_time_budget"] and rep["steps"] >= 2  # trained, then stopped by the clock (few steps on a loaded CPU)
    assert rep["self_generated"] == 6 and rep["gen_tokens"] == 8
    assert rep["total_seconds"] <= budget + 3.0 and took <= budget + 5.0, (rep["total_seconds"], took)
    assert rep["unroll"] == 2 and rep["exit_mix"] == 0.25 and "packed" in rep["data"] or "d.safetensors" in rep["data"]
    saved = json.loads((tmp_path / "out" / "draft_config.json").read_text())
    assert saved["train"]["steps"] == rep["steps"]
    loaded_draft = EagleDraft.load(tmp_path / "out", model)  # the runtime loader reads what was written
    assert loaded_draft.vocab_ids.numel() == 64


@pytest.mark.parametrize("argv, needle", [
    (["--unroll", "0"], "--unroll"),
    (["--unroll", "9"], "--unroll"),
    (["--exit-mix", "1.5"], "--exit-mix"),
    (["--lr", "nan"], "--lr"),
    (["--self-generated", "-1"], "--self-generated"),
    (["--conversations", "0"], "--conversations"),
    (["--data", "no/such/file.safetensors"], "--data"),
    (["--aux-layers", "3,x"], "--aux-layers"),
    (["--init", "no/such/draft"], "--init"),
    (["--draft-layers", "0"], "--draft-layers"),
    (["--draft-layers", "5"], "--draft-layers"),
])
def test_cli_bad_training_flags(tmp_path, capsys, monkeypatch, argv, needle):
    from specee_compile import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    rc = main(["train-draft", "smollm2-135m", "-o", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("specee-compile: error: "), err
    assert needle in err[0], err


def _params(d):
    return {k: v.detach().float().cpu() for k, v in d.named_parameters()}


def test_warm_start_continues_from_the_head(tmp_path, model, tok):
    """--init: the new head starts as the given one (weights, layers, vocabulary), not from the identity start, and
    the report says so; on the same data a warm start's first losses are the head's last ones, not a fresh head's."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    texts = [("abcabd " * 6)[i % 5 :] + "xyz " * 3 for i in range(24)]
    common = {"seq_len": 48, "progress": False, "batch_size": 6, "seed": 0, "aux_layers": [1], "time_budget_s": None}
    data = collect_teacher_data(model, tok, texts, seq_len=48, aux_layers=[1], progress=False)
    base, base_rep = train_draft(model, tok, texts, steps=60, lr=3e-3, vocab_size_limit=64, data=data, **common)
    base.save(tmp_path / "base")

    # lr ~ 0: the weights come back as they went in (fp16 on disk), the vocabulary is the head's, not the limit's
    loaded = SimpleNamespace(model=model, tokenizer=tok, fingerprint="tiny")
    data_file = tmp_path / "d.safetensors"
    pack_training_data(tok, [["go on:", t] for t in texts], data_file, seq_len=48, progress=False)
    cfg = train_draft_command("tiny", tmp_path / "warm", loaded=loaded, data_file=data_file, conversations=24,
                              steps=2, lr=1e-8, seq_len=48, batch_size=6, time_budget_s=None, aux_layers=[1],
                              progress=False, vocab_size_limit=16, init=tmp_path / "base")
    assert cfg["train"]["warm_start"] is True and cfg["train"]["init"] == str(tmp_path / "base")
    assert cfg["train"]["vocab_size_limit"] is None
    warm = EagleDraft.load(tmp_path / "warm", model)
    assert torch.equal(warm.vocab_ids.cpu(), base.vocab_ids.cpu()) and warm.vocab_ids.numel() == 64
    want, got = _params(EagleDraft.load(tmp_path / "base", model)), _params(warm)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-3, rtol=1e-3, msg=k)

    # trained on: a warm start begins where the head is (its first losses are the trained head's, far under a
    # fresh head's) and the head then moves
    _fresh, fresh_rep = train_draft(model, tok, texts, steps=4, lr=3e-3, vocab_size_limit=64, data=data, **common)
    cont, cont_rep = train_draft(model, tok, texts, steps=4, lr=3e-3, data=data, init=base, **common)
    assert cont_rep["warm_start"] and not fresh_rep["warm_start"]
    losses = (base_rep["final_loss"], cont_rep["first_loss"], fresh_rep["first_loss"])
    assert fresh_rep["first_loss"] - base_rep["final_loss"] > 0.2, losses  # the base head did learn
    assert abs(cont_rep["first_loss"] - base_rep["final_loss"]) < 0.25 * (
        fresh_rep["first_loss"] - base_rep["final_loss"]), losses
    assert any(not torch.equal(a, b) for a, b in zip(_params(cont).values(), _params(base).values()))


def test_warm_start_keeps_the_heads_layers_and_refuses_another_model(model, tok):
    texts = [("abcabd " * 6)[i % 5 :] for i in range(12)]
    two = EagleDraft(model, torch.arange(40), num_layers=2)
    d, rep = train_draft(model, tok, texts, steps=2, seq_len=32, progress=False, batch_size=4, aux_layers=[1],
                         time_budget_s=None, init=two)
    assert len(d.layers) == 2 and d.vocab_ids.numel() == 40 and rep["num_vocab_ids"] == 40
    other = make_tiny_llama(hidden_size=48)
    with pytest.raises(SpecEEError, match="another model"):
        train_draft(model, tok, texts, steps=2, seq_len=32, progress=False, batch_size=4, aux_layers=[1],
                    time_budget_s=None, init=EagleDraft(other, torch.arange(40)))


def test_warm_start_verifies_an_artifact_manifest(tmp_path, model, tok):
    from specee_compile.artifacts import write_manifest
    from specee_compile.errors import ArtifactError

    arts = tmp_path / "arts"
    EagleDraft(model, torch.arange(40)).save(arts)
    write_manifest(arts, model="tiny", fingerprint="tiny", info={})
    loaded = SimpleNamespace(model=model, tokenizer=tok, fingerprint="tiny")
    kw = {"loaded": loaded, "conversations": 4, "steps": 1, "seq_len": 32, "batch_size": 2, "time_budget_s": None,
          "progress": False, "aux_layers": [1], "init": arts}
    data_file = tmp_path / "d.safetensors"
    pack_training_data(tok, [["say it:", "abcabd abcabd xyz xyz"]] * 6, data_file, seq_len=32, progress=False)
    cfg = train_draft_command("tiny", tmp_path / "ok", data_file=data_file, **kw)
    assert cfg["train"]["warm_start"]
    raw = bytearray((arts / "draft.safetensors").read_bytes())
    raw[-1] ^= 1  # one bit of a weight: the manifest's digest no longer matches
    (arts / "draft.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="damaged"):
        train_draft_command("tiny", tmp_path / "bad", data_file=data_file, **kw)
    assert not (tmp_path / "bad").exists()


def test_cli_init_that_is_also_the_output_is_refused(tmp_path, capsys, monkeypatch, model):
    from specee_compile import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --init was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    head = tmp_path / "head"
    EagleDraft(model, torch.arange(40)).save(head)
    before = (head / "draft.safetensors").read_bytes()
    rc = main(["train-draft", "smollm2-135m", "-o", str(head), "--init", str(head)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--init" in err[0] and "overwrite" in err[0], err
    assert (head / "draft.safetensors").read_bytes() == before


def test_two_layer_head_trains_saves_and_decodes_a_lossless_tree(tmp_path, model, tok):
    """--draft-layers 2: the head trains with both layers, saves and loads as two, and drives the lossless tree
    decode (the host step and the fixed program) to dense greedy's tokens; a warm start from it keeps two and
    refuses another count. (That the device step runs both layers: tests/test_device_draft.py.)"""
    from test_tree import PROMPT, _fixed_vs_host, dense

    data = tmp_path / "d.safetensors"
    pack_training_data(tok, [["go on:", ("abcabd " * 6)[i % 5 :]] for i in range(12)], data, seq_len=48,
                       progress=False)
    loaded = SimpleNamespace(model=model, tokenizer=tok, fingerprint="tiny")
    kw = {"loaded": loaded, "data_file": data, "conversations": 12, "seq_len": 48, "batch_size": 4,
          "time_budget_s": None, "progress": False, "aux_layers": [1], "vocab_size_limit": 64}
    cfg = train_draft_command("tiny", tmp_path / "two", steps=6, draft_layers=2, **kw)
    assert cfg["train"]["draft_layers"] == 2
    two = EagleDraft.load(tmp_path / "two", model)
    assert len(two.layers) == 2
    assert any(k.startswith("layers.1.") for k in two.state_dict())
    with pytest.raises(SpecEEError, match="--draft-layers"):
        train_draft_command("tiny", tmp_path / "x", steps=1, draft_layers=1, init=tmp_path / "two", **kw)
    cont = train_draft_command("tiny", tmp_path / "cont", steps=1, init=tmp_path / "two", **kw)
    assert cont["train"]["draft_layers"] == 2

    out = _fixed_vs_host(model, n=24, layers=2, tree_budget=12, tree_depth=4, tree_topk=4)
    (host, hdec), (fixed, fdec) = out["host"], out["fixed"]
    assert len(fdec.tree.fixed.draft.draft.layers) == 2
    assert fixed.token_ids == host.token_ids == dense(model, PROMPT, 24).token_ids
    assert fdec.tree.accepted_log == hdec.tree.accepted_log


def _tiny_kw(tmp_path, model, tok):
    data = tmp_path / "d.safetensors"
    if not data.exists():
        pack_training_data(tok, [["go on:", ("abcabd " * 6)[i % 5 :]] for i in range(8)], data, seq_len=48,
                           progress=False)
    loaded = SimpleNamespace(model=model, tokenizer=tok, fingerprint="tiny")
    return {"loaded": loaded, "data_file": data, "conversations": 8, "seq_len": 48, "batch_size": 4, "steps": 1,
            "time_budget_s": None, "progress": False, "aux_layers": [1], "vocab_size_limit": 64}


def test_output_is_atomic_with_a_manifest_and_never_overwrites_foreign_files(tmp_path, model, tok):
    """train-draft's -o lands whole with a manifest of its two files; a re-run replaces its own output; a directory
    holding other files is refused unless --force, which adds the head beside them and overwrites none of them; a
    draft file there that specee-compile did not write is never overwritten, not even with --force."""
    from specee_compile.artifacts import read_manifest
    from specee_compile.errors import ArtifactError

    kw = _tiny_kw(tmp_path, model, tok)
    out = tmp_path / "out"
    train_draft_command("tiny", out, **kw)
    files = read_manifest(out)["files"]
    assert set(files) == {"draft.safetensors", "draft_config.json"}
    first = (out / "draft.safetensors").read_bytes()
    train_draft_command("tiny", out, seed=1, **kw)  # our own output: replaced
    assert (out / "draft.safetensors").read_bytes() != first
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")) == []

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="--force"):
        train_draft_command("tiny", mine, **kw)
    train_draft_command("tiny", mine, force=True, **kw)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert EagleDraft.load(mine, model).vocab_ids.numel() == 64

    old = tmp_path / "old"  # a head written without a manifest (before this check, or by hand)
    EagleDraft(model, torch.arange(40)).save(old)
    before = (old / "draft.safetensors").read_bytes()
    for force in (False, True):
        with pytest.raises(ArtifactError):
            train_draft_command("tiny", old, force=force, **kw)
    assert (old / "draft.safetensors").read_bytes() == before and not (old / "manifest.json").exists()


def test_a_draft_that_does_not_match_its_manifest_is_refused(tmp_path, model, tok):
    from specee_compile.errors import ArtifactError

    out = tmp_path / "out"
    train_draft_command("tiny", out, **_tiny_kw(tmp_path, model, tok))
    cfg = json.loads((out / "draft_config.json").read_text())
    cfg["num_vocab_ids"] = 1
    (out / "draft_config.json").write_text(json.dumps(cfg))  # edited after the manifest was written
    with pytest.raises(ArtifactError, match="damaged: draft_config.json"):
        EagleDraft.load(out, model)


def test_cli_output_with_foreign_files_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from specee_compile import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before -o was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc = main(["train-draft", "smollm2-135m", "-o", str(mine)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--force" in err[0], err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_draft_output_given_as_artifacts_says_what_it_is(tmp_path, model, tok):
    from specee_compile.api import load_program
    from specee_compile.config import Settings
    from specee_compile.errors import ArtifactError

    kw = _tiny_kw(tmp_path, model, tok)
    train_draft_command("tiny", tmp_path / "out", **kw)
    with pytest.raises(ArtifactError, match="draft head only .* --draft-dir"):
        load_program(tmp_path / "out", kw["loaded"], Settings())
