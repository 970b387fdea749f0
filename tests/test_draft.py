"""Candidate sources: interface behaviour, n-gram lookup, EAGLE key mapping, safetensors round trip,
and a learnable training signal. Tiny random Llama models only (fast, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from specee_compile.draft import (
    EagleDraft,
    EagleSource,
    NgramDraft,
    ShallowDraft,
    load_eagle_state_dict,
    make_candidate_source,
)
from specee_compile.errors import ArtifactError, SpecEEError

transformers = pytest.importorskip("transformers")


def tiny_config(**kw):
    base = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def draft(tiny_model):
    torch.manual_seed(1)
    d = EagleDraft(tiny_model, torch.arange(200))
    with torch.no_grad():  # non-trivial weights so proposals depend on the whole context
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return d.eval()


def _seq(n=24, seed=0, D=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist(), torch.randn(n, D, generator=g)


def _sources(tiny_model, draft, k=4):
    return {
        "eagle": EagleSource(draft, k=k),
        "ngram": NgramDraft(k=k, fallback_ids=draft.vocab_ids[:16]),
        "shallow": ShallowDraft(tiny_model, k=k, vocab_ids=draft.vocab_ids),
    }


def _run(src, ids, hid, P, upto):
    """reset on ids[:P], then observe ids[P:upto] (step at position p emits ids[p+1] with f_p)."""
    src.reset(ids[:P], hid[:P])
    props = [src.propose().clone()]
    for t in range(P, upto):
        src.observe(ids[t], hid[t - 1], 3)
        props.append(src.propose().clone())
    return props


@pytest.mark.parametrize("kind", ["eagle", "ngram", "shallow"])
def test_propose_shape_and_dtype(tiny_model, draft, kind):
    src = _sources(tiny_model, draft, k=4)[kind]
    ids, hid = _seq()
    for p in _run(src, ids, hid, 8, 16):
        assert p.dtype == torch.long and p.shape == (4,)
        assert len(set(p.tolist())) == 4
        assert int(p.min()) >= 0 and int(p.max()) < 256
    assert len(src.ids) == 16


@pytest.mark.parametrize("kind", ["eagle", "ngram", "shallow"])
def test_truncate_then_observe_matches_fresh_run(tiny_model, draft, kind):
    ids, hid = _seq(32, seed=3)
    srcs = _sources(tiny_model, draft)
    src = srcs[kind]
    _run(src, ids, hid, 10, 24)  # went ahead to 24 tokens
    # a "wrong" suffix (different tokens/features), then roll back to 15 and continue correctly
    for t in range(24, 28):
        src.observe((ids[t] + 7) % 256, hid[t - 1] * -1.0, 1)
        src.propose()
    src.truncate(15)
    got = []
    for t in range(15, 20):
        src.observe(ids[t], hid[t - 1], 3)
        got.append(src.propose().clone())
    fresh = _sources(tiny_model, draft)[kind]
    want = _run(fresh, ids, hid, 10, 20)[-5:]
    for a, b in zip(got, want):
        assert a.tolist() == b.tolist()


def test_eagle_incremental_equals_batch(draft):
    """One-pair-at-a-time KV-cached drafting == one batched causal pass over all pairs."""
    ids, hid = _seq(20, seed=5)
    src = EagleSource(draft, k=4, context_vocab=False)
    src.reset(ids[:2], hid[:2])
    src.propose()
    for t in range(2, 20):
        src.observe(ids[t], hid[t - 1], 3)
        src.propose()
    with torch.no_grad():
        g, _ = draft(hid[:19][None], torch.tensor(ids[1:20])[None], torch.arange(19)[None])
    want = draft.vocab_ids[torch.topk(draft.logits(g[0, -1]), 4).indices]
    assert src.propose().tolist() == want.tolist()


def test_eagle_context_vocab(tiny_model):
    """Tokens of the sequence outside the static vocabulary join the head for that sequence only."""
    d = EagleDraft(tiny_model, torch.arange(4, 256))  # static vocab lacks ids 0..3
    with torch.no_grad():
        d.head_rows[:] = -10.0 * torch.ones(64) / 8  # static rows: strongly negative logits below
        d.head_weight = d.head_weight.clone()
        d.head_weight[:4] = 0.0
        d.head_weight[2] = torch.ones(64) / 8  # the only positive row: token 2
        d.fc.weight.zero_()
        d.fc.bias.fill_(1.0)  # g = constant positive vector (zeroed layer below)
        for p in d.layers.parameters():
            p.zero_()
    ids = [10, 11, 2, 12]
    src = EagleSource(d, k=1)
    src.reset(ids, torch.zeros(4, 64))
    assert src.propose().tolist() == [2]  # from the prompt, not the static vocab
    src.truncate(2)  # the position that introduced token 2 is gone
    assert src.propose().tolist() != [2]
    src.observe(2, torch.zeros(64), 3)
    assert src.propose().tolist() == [2]
    plain = EagleSource(d, k=1, context_vocab=False)
    plain.reset(ids, torch.zeros(4, 64))
    assert plain.propose().tolist() != [2]


def test_truncate_bounds(draft):
    src = EagleSource(draft)
    ids, hid = _seq(8)
    src.reset(ids, hid)
    with pytest.raises(SpecEEError):
        src.truncate(9)
    with pytest.raises(SpecEEError):
        src.truncate(0)


def test_ngram_lookup_hand_made():
    src = NgramDraft(k=4, fallback_ids=[100, 101, 102, 103])
    #       0  1  2  3  4  5  6  7  8  9
    seq = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6]
    src.reset(seq, None)
    # last 3 (7?): (9,5,6) unseen; last 2 (5,6) seen twice, both followed by 7; then 1-gram (6) -> 7;
    # fill by context frequency: 5 (x3), 6 (x3), then 7 already, 8/9 (x1)
    assert src.propose().tolist() == [7, 5, 6, 8]
    src.observe(7, None, 0)  # ... 5 6 7 -> trigram (5,6,7) followed by 8 (pos 3) and 9 (pos 7)
    p = src.propose().tolist()
    assert p[:2] == [9, 8]  # equal counts: most recent first
    src.truncate(9)  # back to [.., 9, 5]: (7,9,5) unseen, (9,5) unseen, (5) -> 6 (x2)
    assert src.propose().tolist()[0] == 6
    # empty context falls back to the fixed list
    src.reset([42], None)
    assert src.propose().tolist() == [42, 100, 101, 102]


def test_ngram_truncate_restores_index():
    a, b = NgramDraft(k=4), NgramDraft(k=4)
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3, 3, 1]
    a.reset(seq[:4], None)
    for t in seq[4:]:
        a.observe(t, None, 0)
    a.truncate(6)
    b.reset(seq[:6], None)
    assert dict(a._index) == dict(b._index) and dict(a._counts) == dict(b._counts)


def _eagle_public_sd(cfg, with_embed=True, prefix=""):
    """A synthetic state dict in the public EAGLE-1 layout (cnets.Model, layer 0 w/o input_layernorm)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    hd = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    sd = {
        "fc.weight": r(d, 2 * d),
        "fc.bias": r(d),
        "layers.0.self_attn.q_proj.weight": r(d, d),
        "layers.0.self_attn.k_proj.weight": r(kv, d),
        "layers.0.self_attn.v_proj.weight": r(kv, d),
        "layers.0.self_attn.o_proj.weight": r(d, d),
        "layers.0.self_attn.rotary_emb.inv_freq": torch.ones(hd // 2),
        "layers.0.mlp.gate_proj.weight": r(i, d),
        "layers.0.mlp.up_proj.weight": r(i, d),
        "layers.0.mlp.down_proj.weight": r(d, i),
        "layers.0.post_attention_layernorm.weight": 1 + r(d),
    }
    if with_embed:
        sd["embed_tokens.weight"] = r(cfg.vocab_size, d)
    return {prefix + k: v for k, v in sd.items()}


def _eagle_reference(sd, model, feats, ids):
    """Hand-written EAGLE-1 forward (fc -> attention w/o input norm -> MLP; RoPE at 0..T-1)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = model.config
    d, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // H
    T = feats.shape[0]
    emb = model.get_input_embeddings().weight[ids]
    x = torch.cat([emb, feats], -1) @ sd["fc.weight"].T + sd["fc.bias"]
    q = (x @ sd["layers.0.self_attn.q_proj.weight"].T).view(T, H, hd).transpose(0, 1)
    k = (x @ sd["layers.0.self_attn.k_proj.weight"].T).view(T, KV, hd).transpose(0, 1)
    v = (x @ sd["layers.0.self_attn.v_proj.weight"].T).view(T, KV, hd).transpose(0, 1)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    k = k[0].repeat_interleave(H // KV, 0)
    v = v.repeat_interleave(H // KV, 0)
    att = (q[0] @ k.transpose(-1, -2)) / hd**0.5
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    a = (att @ v).transpose(0, 1).reshape(T, d) @ sd["layers.0.self_attn.o_proj.weight"].T
    x = x + a
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    h = h * sd["layers.0.post_attention_layernorm.weight"]
    m = torch.nn.functional.silu(h @ sd["layers.0.mlp.gate_proj.weight"].T) * (h @ sd["layers.0.mlp.up_proj.weight"].T)
    return x + m @ sd["layers.0.mlp.down_proj.weight"].T


@pytest.mark.parametrize("prefix", ["", "ea_layer."])
def test_eagle_checkpoint_key_mapping(tiny_model, prefix):
    sd = _eagle_public_sd(tiny_model.config, prefix=prefix)
    d = load_eagle_state_dict(sd, tiny_model)
    assert not hasattr(d.layers[0], "input_layernorm")  # EAGLE-1: identity
    assert d.vocab_ids.numel() == 256
    assert d.head_rows.data_ptr() == tiny_model.lm_head.weight.data_ptr()  # full vocab: shared, no copy
    ids, hid = _seq(12, seed=9)
    with torch.no_grad():
        g, _ = d(hid[None], torch.tensor(ids)[None], torch.arange(12)[None])
        ref = _eagle_reference({k[len(prefix):]: v for k, v in sd.items()}, tiny_model, hid, torch.tensor(ids))
    torch.testing.assert_close(g[0], ref, atol=1e-5, rtol=1e-4)
    # restricted vocabulary on top of a public head
    d2 = load_eagle_state_dict(sd, tiny_model, vocab_ids=torch.arange(0, 256, 2))
    assert d2.head_rows.shape == (128, 64)


def test_eagle_checkpoint_with_input_layernorm_and_errors(tiny_model):
    sd = _eagle_public_sd(tiny_model.config, with_embed=False)
    sd["layers.0.input_layernorm.weight"] = torch.ones(64)
    assert hasattr(load_eagle_state_dict(sd, tiny_model).layers[0], "input_layernorm")
    bad = _eagle_public_sd(tiny_model.config)
    bad["embed_tokens.weight"] = torch.zeros(300, 64)
    with pytest.raises(ArtifactError, match="embed_tokens"):
        load_eagle_state_dict(bad, tiny_model)
    other = _eagle_public_sd(tiny_config(hidden_size=32, intermediate_size=64), with_embed=False)
    with pytest.raises(ArtifactError):
        load_eagle_state_dict(other, tiny_model)
    with pytest.raises(ArtifactError, match="fc.weight"):
        load_eagle_state_dict({"foo": torch.zeros(1)}, tiny_model)


def test_measured_tree_shapes_round_trip_and_bad_ones_are_refused(tiny_model, draft, tmp_path):
    """draft_config.json's `tree_shapes` (the tree shape measured best with the head, per device kind) is saved
    when set, read back as tuples, absent by default; anything but {kind: [3 positive ints]} is one clear error.
    The shipped SmolLM2 head carries its CUDA shape."""
    from specee_compile.artifacts import read_manifest, shipped_dir
    from specee_compile.draft.eagle import tree_shapes_from_config

    assert "tree_shapes" not in draft.draft_config() and draft.tree_shapes == {}
    draft.tree_shapes = {"cuda": (31, 4, 8)}
    try:
        assert draft.save(tmp_path / "d")["tree_shapes"] == {"cuda": [31, 4, 8]}
    finally:
        draft.tree_shapes = {}  # (the module's fixture)
    assert EagleDraft.load(tmp_path / "d", tiny_model).tree_shapes == {"cuda": (31, 4, 8)}
    for bad in ({"cuda": [31, 4]}, {"tpu": [31, 4, 8]}, {"cuda": [0, 4, 8]}, {"cuda": [31, 4.0, 8]}, [31, 4, 8],
                {"cuda": [True, 4, 8]}):
        cfg = json.loads((tmp_path / "d" / "draft_config.json").read_text())
        (tmp_path / "d" / "draft_config.json").write_text(json.dumps({**cfg, "tree_shapes": bad}))
        with pytest.raises(ArtifactError, match="tree_shapes .* expected an object mapping a device"):
            EagleDraft.load(tmp_path / "d", tiny_model)
    shipped = shipped_dir("smollm2-135m")
    manifest = read_manifest(shipped)  # its files' checksums hold
    cfg = json.loads((shipped / "draft_config.json").read_text())
    assert tree_shapes_from_config(cfg["tree_shapes"], "shipped") == {"cuda": (31, 4, 8)}
    assert manifest["draft"]["config"] == cfg


def test_safetensors_round_trip(tiny_model, draft, tmp_path):
    config = draft.save(tmp_path / "d", note="x")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == ["draft.safetensors", "draft_config.json"]
    on_disk = json.loads((tmp_path / "d" / "draft_config.json").read_text())
    assert on_disk == config and config["note"] == "x" and config["num_vocab_ids"] == 200
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "d" / "draft.safetensors")))
    assert "vocab_ids" in keys and not any("embed" in k or "head" in k for k in keys)  # shared, not saved
    back = EagleDraft.load(tmp_path / "d", tiny_model)
    assert torch.equal(back.vocab_ids, draft.vocab_ids)
    for k, v in draft.state_dict().items():
        if k != "vocab_ids":
            torch.testing.assert_close(back.state_dict()[k], v.half().float())
    ids, hid = _seq(20, seed=11)
    a = _run(EagleSource(draft), ids, hid, 6, 20)
    b = _run(EagleSource(back), ids, hid, 6, 20)
    same = sum(x.tolist() == y.tolist() for x, y in zip(a, b))
    assert same >= len(a) - 1  # fp16 storage may swap a near-tie, not more
    # the factory loads the same files
    src = make_candidate_source("eagle", tiny_model, {"draft_path": str(tmp_path / "d")}, k=3)
    src.reset(ids[:6], hid[:6])
    assert src.propose().shape == (3,)
    # corrupt / wrong-model files are explained
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "draft.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        EagleDraft.load(tmp_path / "bad", tiny_model)
    other = transformers.LlamaForCausalLM(tiny_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(ArtifactError):
        EagleDraft.load(tmp_path / "d", other)


def test_factory(tiny_model, draft):
    with pytest.raises(ArtifactError):
        make_candidate_source("eagle", tiny_model, None, 4)
    with pytest.raises(SpecEEError):
        make_candidate_source("medusa", tiny_model, None, 4)
    assert isinstance(make_candidate_source("eagle", tiny_model, {"draft": draft}, 4), EagleSource)
    ng = make_candidate_source("ngram", tiny_model, {"draft": draft}, 4)
    assert ng.fallback[:4] == draft.vocab_ids[:4].tolist()
    sh = make_candidate_source("shallow", tiny_model, None, 4)
    assert sh.head_rows.shape == (256, 64)


def test_shallow_uses_latest_hidden(tiny_model):
    src = ShallowDraft(tiny_model, k=3)
    W = tiny_model.lm_head.weight
    ids, hid = _seq(6, seed=2)
    src.reset(ids, hid)
    want = torch.topk(W @ hid[-1], 3).indices  # right after reset: the prompt's last feature
    assert src.propose().tolist() == want.tolist()
    h = torch.randn(64)
    top = torch.topk(W @ h, 4).indices.tolist()
    src.observe(top[0], h, 2)  # the emitted token is dropped from the proposals
    assert src.propose().tolist() == top[1:4]


class _CharTok:
    chat_template = None
    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_training_reduces_loss(tiny_model):
    from specee_compile.draft.train import train_draft

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    texts = [("abcabd " * 6)[i % 5 :] + "xyz " * 3 for i in range(24)]
    d, rep = train_draft(tiny_model, _CharTok(), texts, steps=60, lr=3e-3, seq_len=48,
                         vocab_size_limit=64, progress=False, batch_size=6, seed=0)
    assert rep["final_loss"] < 0.85 * rep["first_loss"]
    assert isinstance(d, EagleDraft) and d.vocab_ids.numel() == 64
    assert d.embed_weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert 0.0 <= rep["val_final_layer"]["top1"] <= 1.0 and rep["vocab_coverage"] > 0.5


def test_generate_replies_and_token_id_inputs(tiny_model):
    from specee_compile.draft.train import collect_teacher_data, generate_replies

    tok = _CharTok()
    tok.pad_token_id = 0
    seqs = generate_replies(tiny_model, tok, ["hello there", "abc"], max_new_tokens=5, seq_len=32,
                            batch_size=2, progress=False)
    assert len(seqs) == 2 and all(isinstance(t, int) for s in seqs for t in s)
    # greedy continuation of the prompt (left padding must not change it)
    x = torch.tensor([seqs[0][: len(seqs[0]) - 5]])
    ref = tiny_model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)[0].tolist()
    assert ref == seqs[0] or ref[: len(seqs[0])] == seqs[0]
    data = collect_teacher_data(tiny_model, tok, seqs, seq_len=32, min_tokens=4, progress=False)
    assert data["ids"].shape[0] == 2 and data["aux"].shape[1] == 2


def test_ngram_assist_wrapper(tiny_model, draft):
    """A repeated bigram puts its earlier follower first; the wrapped source's choices fill the rest."""
    from specee_compile.draft import NgramAssist

    ids, hid = _seq(12, seed=4)
    ids[3:5] = [17, 23]
    ids[5] = 99
    ids[-2:] = [17, 23]  # ends with the bigram seen at 3..4, followed by 99
    plain = EagleSource(draft, k=4)
    plain.reset(ids, hid)
    assisted = NgramAssist(EagleSource(draft, k=4))
    assisted.reset(ids, hid)
    own = plain.propose().tolist()
    got = assisted.propose().tolist()
    assert got[0] == 99 and got[1:] == [t for t in own if t != 99][:3]
    assisted.truncate(11)  # bigram gone -> the wrapped source's order again
    plain.truncate(11)
    assert assisted.propose().tolist() == plain.propose().tolist()
    assert len(assisted.ids) == 11
    src = make_candidate_source("eagle", tiny_model, {"draft": draft, "ngram_assist": True}, 4)
    assert isinstance(src, NgramAssist) and src.k == 4
