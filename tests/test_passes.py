"""Graph passes: hand-built FX graphs (expected nodes, counts, skip cases, idempotence) and the golden
segment structure of a captured 2-layer tiny Llama, run against the eager decode-step functions."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specee_compile.capture import capture_and_segment, capture_weights
from specee_compile.config import Settings
from specee_compile.errors import UnsupportedArchitecture
from specee_compile.model_step import extract_weights, make_head_fn, make_layer_fn
from specee_compile.ops import exit_score
from specee_compile.passes import (
    PASS_ORDER,
    PassError,
    cleanup,
    graph_text,
    insert_exit_predictors,
    kv_validity,
    run_passes,
    segment_layers,
    tag_layers,
)
from specee_compile.passes.tag_layers import tag_of_stack

aten = torch.ops.aten
SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


# ---------------------------------------------------------------- hand-built graphs


def _stack(path):
    return {path.replace(".", "_"): (path, "Module")}


def hand_graph(stacks=True, foreign_read=False, write_weight=False, dead_node=False):
    """embed -> layer 0 -> layer 1 -> head over x [4]; layer i fills valid_i at pos and scales by w_i.

    foreign_read: layer 1 reads valid_0 (breaks the KV contract); write_weight: layer 0 writes w_0."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    pos = g.placeholder("pos")
    ws = [g.placeholder(f"w_{i}") for i in range(2)]
    valids = [g.placeholder(f"valid_{i}") for i in range(2)]
    for p, role in ((x, "ids"), (pos, "pos")):
        p.meta["specee_role"] = role
    for i in range(2):
        ws[i].meta.update(specee_role="ln1", specee_input_layer=i)
        valids[i].meta.update(specee_role="valid", specee_input_layer=i)

    def node(target, args, path):
        n = g.call_function(target, args)
        if stacks:
            n.meta["nn_module_stack"] = _stack(path)
        return n

    h = node(aten.clone.default, (x,), "embed")
    for i in range(2):
        path = f"layers.{i}"
        v = valids[0] if (foreign_read and i == 1) else valids[i]
        filled = node(aten.index_fill_.int_Scalar, (v, 0, pos, True), path)
        if write_weight and i == 0:
            node(aten.mul_.Tensor, (ws[0], 2.0), path)
        h = node(aten.mul.Tensor, (h, ws[i]), path)
        h = node(aten.add.Tensor, (h, node(aten.sum.default, (filled,), path)), path)
        if dead_node and i == 0:
            node(aten.neg.default, (h,), path)
    out = node(aten.neg.default, (h,), "head")
    g.output((out,))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def hand_inputs():
    return (
        torch.arange(4.0),
        torch.tensor([2]),
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        torch.full((4,), 0.5),
        torch.zeros(8, dtype=torch.bool),
        torch.zeros(8, dtype=torch.bool),
    )


def call_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


def test_tag_of_stack_reads_export_and_dynamo_paths():
    assert tag_of_stack({"a": ("layers.3", "M")}) == 3
    assert (
        tag_of_stack(
            {
                "a": ("L['self'].model", "M"),
                "b": ("L['self'].model.layers.12", "M"),
                "c": ("L['self'].model.layers.12.mlp", "M"),
            }
        )
        == 12
    )
    assert (
        tag_of_stack({"a": ("L['self'].model", "M"), "b": ("L['self'].model.embed_tokens", "E")}) == "embed"
    )
    assert tag_of_stack({"a": ("L['self'].lm_head", "H")}) == "head"
    assert tag_of_stack({"a": ("L['self'].model", "M"), "b": ("L['self'].model.rotary_emb", "R")}) is None


def test_tag_layers_tags_every_node_and_is_idempotent():
    gm = hand_graph()
    r = tag_layers(gm, Settings())
    assert r.modified
    assert r.counts == {"tagged_nodes": 14, "layers": 2, "embed_nodes": 1, "head_nodes": 1, "shared_nodes": 0}
    tags = {n.name: n.meta.get("specee_layer") for n in gm.graph.nodes}
    assert tags["clone_default"] == "embed" and tags["neg_default"] == "head"
    assert tags["index_fill__int_scalar"] == 0 and tags["index_fill__int_scalar_1"] == 1
    assert tags["valid_1"] == 1 and tags["w_0"] == 0
    assert "specee_layer" not in gm.graph.find_nodes(op="placeholder", target="pos")[0].meta
    before = graph_text(gm)
    again = tag_layers(gm, Settings())
    assert not again.modified and again.counts == r.counts and graph_text(gm) == before


def test_graph_without_module_stacks_is_left_alone_then_segmentation_says_why():
    gm = hand_graph(stacks=False)
    for n in gm.graph.nodes:  # no capture metadata at all
        n.meta.pop("specee_input_layer", None)
    r = tag_layers(gm, Settings())
    assert not r.modified and r.counts["tagged_nodes"] == 0 and r.counts["layers"] == 0
    with pytest.raises(PassError, match="no decoder-layer tags"):
        segment_layers(gm, Settings())
    with pytest.raises(PassError, match=r"graph pass 02 'segment_layers' failed: no decoder-layer tags"):
        run_passes(gm, Settings())


def test_segment_layers_builds_one_module_per_segment_and_keeps_semantics():
    gm = hand_graph()
    ref_inputs = hand_inputs()
    expected = gm(*ref_inputs)[0]
    tag_layers(gm)
    r = segment_layers(gm, Settings())
    seg = r.gm
    assert r.modified
    assert r.counts == {"segments": 4, "layer_segments": 2, "ops_per_layer": 4, "uniform_layers": 1}
    assert call_targets(seg) == ["embed", "layer_0", "layer_1", "head"]
    layer1 = seg.get_submodule("layer_1")
    assert [n.name for n in layer1.graph.nodes if n.op == "placeholder"] == ["h", "pos", "valid", "ln1"]
    assert layer1.meta["specee_inputs"] == ["h", "pos", "valid", "ln1"]
    # layer_1 is bound to valid_1 and w_1 at the top level
    call = next(n for n in seg.graph.nodes if n.target == "layer_1")
    assert [a.name for a in call.args] == ["layer_0", "pos", "valid_1", "w_1"]
    inputs = hand_inputs()
    torch.testing.assert_close(seg(*inputs)[0], expected)
    assert inputs[4][2] and inputs[5][2] and inputs[4].sum() == 1  # in-place validity writes kept
    again = segment_layers(seg, Settings())
    assert not again.modified and again.gm is seg


def test_kv_validity_counts_and_annotates():
    gm = tag_layers(hand_graph()).gm
    flat = kv_validity(gm, Settings())
    assert flat.counts == {"layers_checked": 2, "cache_writes": 0, "validity_writes": 2, "validity_reads": 2}
    seg = segment_layers(gm).gm
    r = kv_validity(seg, Settings())
    assert r.modified and r.counts == flat.counts
    call = next(n for n in seg.graph.nodes if n.target == "layer_1")
    assert call.meta["specee_kv"] == {
        "layer": 1,
        "valid": "valid_1",
        "writes": [("index_fill__int_scalar", "valid")],
    }
    assert not kv_validity(seg, Settings()).modified


def test_kv_validity_rejects_a_layer_reading_another_layers_validity():
    gm = tag_layers(hand_graph(foreign_read=True)).gm
    with pytest.raises(PassError, match="layer 1 reads valid_0"):
        kv_validity(gm, Settings())
    # segmented, the same graph is caught too (the segment is bound to layer 0's row)
    seg = segment_layers(gm).gm
    with pytest.raises(PassError, match="layer 1 reads valid_0"):
        kv_validity(seg, Settings())


def test_kv_validity_rejects_in_place_writes_to_weights():
    gm = tag_layers(hand_graph(write_weight=True)).gm
    with pytest.raises(PassError, match="layer 0 writes w_0 in place"):
        kv_validity(gm, Settings())


def test_insert_exit_predictors_skips_graphs_without_segments():
    gm = tag_layers(hand_graph()).gm
    before = graph_text(gm)
    r = insert_exit_predictors(gm, Settings())
    assert not r.modified and r.counts == {"exit_points": 0, "inserted": 0} and graph_text(gm) == before


def test_insert_exit_predictors_needs_the_step_spec():
    seg = segment_layers(tag_layers(hand_graph()).gm).gm
    with pytest.raises(PassError, match="StepSpec"):
        insert_exit_predictors(seg, Settings())


def test_cleanup_removes_dead_nodes_once():
    gm = tag_layers(hand_graph(dead_node=True)).gm
    seg = segment_layers(gm).gm
    r = cleanup(seg, Settings())
    assert r.modified and r.counts == {"removed_nodes": 1, "graphs": 5}
    assert "neg_default" not in [n.name for n in seg.get_submodule("layer_0").graph.nodes]
    again = cleanup(seg, Settings())
    assert not again.modified and again.counts["removed_nodes"] == 0
    torch.testing.assert_close(seg(*hand_inputs())[0], hand_graph()(*hand_inputs())[0])


# ---------------------------------------------------------------- a captured tiny Llama


@pytest.fixture(scope="module")
def tiny2():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def program(tiny2, tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    prog = capture_and_segment(tiny2, Settings(max_context=128), dump_dir=dump)
    prog.dump_dir = dump
    return prog


# fmt: off
GOLDEN_LAYER = [
    # q and S
    "sym_size.int", "sym_size.int",
    # input RMSNorm
    "_assert_tensor_metadata", "to.dtype", "pow.Tensor_Scalar", "mean.dim", "add.Tensor", "rsqrt", "mul.Tensor",
    "_assert_tensor_metadata", "to.dtype", "mul.Tensor",
    # fused qkv
    "linear", "split_with_sizes", "getitem", "getitem", "getitem",
    # heads, cos[pos], sin[pos]
    "view", "transpose.int", "view", "transpose.int", "view", "transpose.int", "index.Tensor", "index.Tensor",
    # RoPE on q
    "mul.Tensor", "slice.Tensor", "neg", "slice.Tensor", "cat", "mul.Tensor", "add.Tensor",
    # RoPE on k
    "mul.Tensor", "slice.Tensor", "neg", "slice.Tensor", "cat", "mul.Tensor", "add.Tensor",
    # this layer's K, V, validity at pos
    "index_copy_", "index_copy_", "index_fill_.int_Scalar",
    # mask: valid & causal
    "arange", "slice.Tensor", "unsqueeze", "unsqueeze", "unsqueeze", "le.Tensor", "__and__.Tensor",
    "slice.Tensor", "slice.Tensor", "unsqueeze", "unsqueeze", "unsqueeze", "unsqueeze", "unsqueeze",
    # attention, o_proj, residual
    "scaled_dot_product_attention", "select.int", "transpose.int", "reshape", "linear", "add.Tensor",
    # post-attention RMSNorm
    "_assert_tensor_metadata", "to.dtype", "pow.Tensor_Scalar", "mean.dim", "add.Tensor", "rsqrt", "mul.Tensor",
    "_assert_tensor_metadata", "to.dtype", "mul.Tensor",
    # fused gate/up, SwiGLU, down, residual
    "linear", "chunk", "getitem", "getitem", "silu", "mul.Tensor", "linear", "add.Tensor",
]
GOLDEN_HEAD = [
    # final RMSNorm
    "_assert_tensor_metadata", "to.dtype", "pow.Tensor_Scalar", "mean.dim", "add.Tensor", "rsqrt", "mul.Tensor",
    # LM head
    "_assert_tensor_metadata", "to.dtype", "mul.Tensor", "linear",
]
# fmt: on


def short_ops(gm):
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            out.append(
                n.target.__name__
                if not hasattr(n.target, "_schema")
                else str(n.target).replace("aten.", "").replace("specee.", "").replace(".default", "")
            )
    return out


def test_golden_segment_structure(program):
    assert [short_ops(m) for m in program.layers] == [GOLDEN_LAYER, GOLDEN_LAYER]
    assert short_ops(program.embed) == ["index.Tensor", "unsqueeze"]
    assert short_ops(program.head) == GOLDEN_HEAD
    assert short_ops(program.exit_point) == ["slice.Tensor", "exit_score", "getitem", "getitem", "getitem"]
    assert program.layer_inputs == [
        "h",
        "pos",
        "keys",
        "valid",
        "k_cache",
        "v_cache",
        "cos",
        "sin",
        "ln1",
        "wqkv",
        "wo",
        "ln2",
        "wgu",
        "wd",
    ]
    assert call_targets(program.graph) == [
        "embed",
        "layer_0",
        "aten.slice.Tensor",
        "specee.exit_score.default",
        *["<built-in function getitem>"] * 3,
        "layer_1",
        "head",
        *["<built-in function getitem>"] * 2,
    ]
    assert program.layers[0].code == program.layers[1].code  # one compiled layer serves all


def test_pass_counts_on_tiny_llama(program):
    c = program.pass_counts
    assert c["tag_layers"] == {
        "tagged_nodes": 190,
        "layers": 2,
        "embed_nodes": 3,
        "head_nodes": 13,
        "shared_nodes": 2,
        "modified": True,
    }
    assert c["segment_layers"] == {
        "segments": 4,
        "layer_segments": 2,
        "ops_per_layer": 80,
        "uniform_layers": 1,
        "modified": True,
    }
    assert c["insert_exit_predictors"] == {"exit_points": 1, "inserted": 1, "modified": True}
    assert c["kv_validity"] == {
        "layers_checked": 2,
        "cache_writes": 4,
        "validity_writes": 2,
        "validity_reads": 2,
        "modified": True,
    }
    assert c["cleanup"]["removed_nodes"] == 0
    assert list(c) == [fn.__name__ for fn in PASS_ORDER]


def test_dump_dir_has_every_pass_before_and_after(program):
    names = sorted(p.name for p in program.dump_dir.iterdir())
    assert names == sorted(
        f"{i:02d}_{fn.__name__}_{w}.txt" for i, fn in enumerate(PASS_ORDER, 1) for w in ("before", "after")
    )
    assert "class SegmentedStep" in (program.dump_dir / "02_segment_layers_after.txt").read_text()
    assert "exit_score" in (program.dump_dir / "03_insert_exit_predictors_after.txt").read_text()


def test_second_run_of_every_pass_changes_nothing(program):
    gm = program.graph
    before = graph_text(gm)
    gm2, counts = run_passes(gm, Settings())
    assert gm2 is gm and graph_text(gm2) == before
    assert all(not c["modified"] for c in counts.values()), counts


def test_segmented_program_computes_the_eager_decode_step(tiny2, program):
    """Flat graph, segmented graph and the eager model_step functions agree (logits, caches, exits)."""
    w = extract_weights(tiny2, 128)
    spec = w.spec
    layer_fn, head_fn = make_layer_fn(spec), make_head_fn(spec)
    L, T, k = 2, 128, 4
    ids, pos, S = torch.tensor([5, 9, 11]), torch.tensor([0, 1, 2]), 64

    def caches():
        return (
            [torch.zeros(T, dtype=torch.bool) for _ in range(L)],
            [torch.zeros(2, T, 16) for _ in range(L)],
            [torch.zeros(2, T, 16) for _ in range(L)],
        )

    # eager reference
    ev, ek, evv = caches()
    h = w.embed[ids][None]
    hs = []
    for i in range(L):
        lw = w.layers[i]
        h = layer_fn(h, pos, ev[i], w.cos, w.sin, ek[i], evv[i], S, *lw.as_tuple())
        hs.append(h)
    hn, logits = head_fn(h, w.norm, w.head)
    rows = w.head[torch.tensor([1, 2, 3, 4])]
    g = torch.Generator().manual_seed(0)
    pred = [
        torch.randn(512, 3 * k, generator=g),
        torch.randn(512, generator=g),
        torch.randn(512, generator=g),
        torch.randn(1, generator=g),
    ]
    p_prev = torch.zeros(k)
    ref_exit = exit_score(hs[0][:, -1:], w.norm, rows, p_prev, *pred, spec.eps)

    # segmented program (weights bound from the placeholders' roles)
    v, kc, vc = caches()
    args = []
    for n in program.graph.graph.nodes:
        if n.op != "placeholder":
            continue
        role, layer = n.meta["specee_role"], n.meta.get("specee_input_layer", n.meta.get("specee_exit"))
        table = {
            "ids": ids,
            "pos": pos,
            "keys": torch.arange(S),
            "cos": w.cos,
            "sin": w.sin,
            "embed_weight": w.embed,
            "norm_weight": w.norm,
            "head_weight": w.head,
            "rows": rows,
            "p_prev": p_prev,
            "w1": pred[0],
            "b1": pred[1],
            "w2": pred[2],
            "b2": pred[3],
        }
        if role in table:
            args.append(table[role])
        elif role in ("valid", "k_cache", "v_cache"):
            args.append({"valid": v, "k_cache": kc, "v_cache": vc}[role][layer])
        else:
            args.append(getattr(w.layers[layer], role))
    out = program.graph(*args)
    torch.testing.assert_close(out[0], hn)
    torch.testing.assert_close(out[1], logits)
    for got, want in zip(out[2:], ref_exit):
        torch.testing.assert_close(got, want)
    for i in range(L):
        assert torch.equal(v[i], ev[i])
        torch.testing.assert_close(kc[i], ek[i])
        torch.testing.assert_close(vc[i], evv[i])


def test_qwen2_segments_take_the_qkv_bias():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    cap = capture_weights(extract_weights(model, 64), num_layers=1)
    gm, counts = run_passes(cap.gm, Settings())
    assert counts["segment_layers"]["layer_segments"] == 1
    assert counts["insert_exit_predictors"]["exit_points"] == 0  # one layer: nothing to exit before
    layer = gm.get_submodule("layer_0")
    assert layer.meta["specee_inputs"] == [
        "h",
        "pos",
        "keys",
        "valid",
        "k_cache",
        "v_cache",
        "cos",
        "sin",
        "ln1",
        "wqkv",
        "bqkv",
        "wo",
        "ln2",
        "wgu",
        "wd",
    ]


def test_unsupported_architecture_is_refused_before_tracing():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(UnsupportedArchitecture, match="model_type 'gpt2' is not supported"):
        capture_and_segment(model, Settings(max_context=32))
