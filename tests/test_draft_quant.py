"""`--draft-quant int8` (draft/eagle.py `EagleDraft.quantize`): the draft's matmul weights as int8 with a scale
per output row. Every path proposes from the same rounded weights (the modules', the device step's float form,
and the int8 pairs the CUDA kernels stream); the target is untouched, so greedy tree and lossless SpecEE stay
identical to dense. The int8 kernels themselves: tests/test_triton_gemv.py."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_device_draft import _steps
from test_draft import draft, tiny_model  # noqa: F401  # fixtures

from specee_compile.config import Settings
from specee_compile.draft.eagle import DeviceEagleSource, EagleDraft, EagleSource
from specee_compile.draft.train import _init_draft
from specee_compile.errors import SpecEEError
from specee_compile.model_step import FUSABLE, extract_weights, make_layer_fn, step_spec
from specee_compile.ops import dequantize_rows

PROMPT = [1, 5, 9, 33, 70, 12]


def _fresh(model, vocab=None, scale=0.0, seed=1) -> EagleDraft:
    torch.manual_seed(seed)
    d = EagleDraft(model, vocab)
    if scale:
        with torch.no_grad():
            for p in d.parameters():
                p.add_(torch.randn_like(p) * scale)
    else:
        _init_draft(d, 0)
    return d.eval()


def test_quantize_rounds_each_matmul_weight_in_place_and_never_the_base_head(tiny_model):  # noqa: F811
    head = tiny_model.lm_head.weight.detach().clone()
    d = _fresh(tiny_model, scale=0.2)  # full vocabulary: head_rows is the base model's own LM head
    assert d.head_rows.data_ptr() == tiny_model.lm_head.weight.data_ptr()
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    d.quantize("int8")
    assert d.quant == "int8" and torch.equal(tiny_model.lm_head.weight, head)
    layers, (fq, fs), (hq, hs) = d.matmul_weights(int8=True)
    assert fq.dtype == hq.dtype == torch.int8 and fs.dtype == hs.dtype == torch.float32
    assert torch.equal(d.fc.weight, dequantize_rows(fq, fs, d.dtype))
    assert torch.equal(d.head_rows, dequantize_rows(hq, hs, d.dtype))
    attn, mlp = d.layers[0].self_attn, d.layers[0].mlp
    lw, q8 = d.fused_layers()[0], layers[0]
    assert torch.equal(lw.wqkv, dequantize_rows(*q8.wqkv, d.dtype))
    assert torch.equal(attn.k_proj.weight, lw.wqkv[attn.q_proj.weight.shape[0]:][: attn.k_proj.weight.shape[0]])
    assert torch.equal(mlp.down_proj.weight, dequantize_rows(*q8.wd, d.dtype))
    for n, p in d.named_parameters():  # weights moved by at most half a step of their row; norms untouched
        if p.dim() == 2:
            step = p.detach().abs().amax(dim=1, keepdim=True) / 127
            assert bool(((p - before[n]).abs() <= step / 2 + 1e-6).all()), n
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    fc = d.fc.weight.clone()
    d.quantize("int8")  # idempotent
    assert torch.equal(d.fc.weight, fc)
    with pytest.raises(SpecEEError, match="already int8"):
        d.quantize("none")
    d.set_vocab_ids(torch.arange(100), tiny_model.lm_head.weight)  # a new vocabulary is rounded as well
    assert d.matmul_weights(True)[2][0].shape == (100, 64)
    assert torch.equal(d.head_rows, dequantize_rows(*d.matmul_weights(True)[2], d.dtype))
    assert d.matmul_weights(False)[1] is d.fc.weight


def test_layer_functions_take_int8_pairs(tiny_llama):
    """model_step's layer with int8 pairs, plain and through the fused ops (the CUDA form; their reference on
    the CPU), computes the layer of the rounded float weights."""
    W = extract_weights(tiny_llama, 64)
    spec = step_spec(tiny_llama.config, 64)
    lw = W.layers[0]
    q8 = lw.quantized()
    deq = [w if not isinstance(w, tuple) else dequantize_rows(*w, torch.float32) for w in q8.as_tuple()]
    h = torch.randn(1, 3, spec.hidden)
    pos = torch.tensor([4, 5, 6])
    outs = []
    for fused, weights in (((), deq), ((), q8.as_tuple()), (FUSABLE, q8.as_tuple())):
        kc = torch.zeros(spec.num_kv_heads, 64, spec.head_dim)
        vc, valid = torch.zeros_like(kc), torch.zeros(64, dtype=torch.bool)
        valid[:4] = True
        with torch.no_grad():
            outs.append(make_layer_fn(spec, fused=fused)(h, pos, valid, W.cos, W.sin, kc, vc, 16, *weights))
    for o in outs[1:]:
        assert float((o - outs[0]).abs().max()) <= 1e-5 * float(outs[0].abs().max())


@pytest.mark.parametrize("fused_ops", [False, True])
def test_device_step_of_an_int8_draft_equals_its_eager_propose(tiny_model, fused_ops):  # noqa: F811
    """The device draft step (float form; or the fused ops on the int8 pairs, what CUDA runs) proposes what the
    eager source proposes from the same quantized draft, context vocabulary included."""
    d = _fresh(tiny_model, torch.arange(128), scale=0.2)
    d.quantize("int8")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (40,), generator=g).tolist()
    hid = torch.randn(40, 64, generator=g)
    want = _steps(EagleSource(d, k=4), ids, hid, 8, 24, device_path=None)
    dev = DeviceEagleSource(d, k=4, max_len=64, fused_ops=fused_ops)
    assert dev._w8 == fused_ops and isinstance(dev._lw[0][1], tuple) == fused_ops  # wqkv
    assert _steps(dev, ids, hid, 8, 24, device_path="ahead") == want


@pytest.mark.parametrize("program", ["host", "fixed"])
def test_greedy_tree_with_an_int8_draft_equals_dense(tiny_model_dir, program):
    """Through the API: the tree's draft is quantized, its output is dense greedy's, the stats say int8."""
    from specee_compile.api import build_decoder
    from specee_compile.models import load_model

    loaded = load_model(str(tiny_model_dir))
    dense = build_decoder(loaded, Settings(max_new_tokens=30)).generate(PROMPT)
    src = EagleSource(_fresh(loaded.model), k=4)
    s = Settings(max_new_tokens=30, speculate="tree", tree_program=program, draft_quant="int8", tree_budget=12,
                 tree_depth=4, tree_topk=4)
    dec = build_decoder(loaded, s, draft=src)
    assert dec.draft.draft.quant == "int8"
    res = dec.generate(PROMPT)
    assert res.token_ids == dense.token_ids and res.verify_steps > 0
    assert res.stats()["draft_quant"] == "int8"
    with pytest.raises(SpecEEError, match="already int8"):  # the same draft asked for as unquantized
        build_decoder(loaded, s.replace(draft_quant="none"), draft=src)


def test_lossless_specee_with_an_int8_draft_equals_dense():
    """Lossless SpecEE, on single tokens and on the tree, with the candidates of an int8 draft: dense greedy."""
    from test_tree import always_exit_program, dense, tree_dec

    from specee_compile.api import prepare_draft
    from specee_compile.backends import make_segments
    from specee_compile.draft.tree import EagleTreeSource
    from specee_compile.runtime.decoder import Decoder

    model = make_tiny_llama(num_hidden_layers=6)
    ref = dense(model, PROMPT, 30)
    src = EagleSource(_fresh(model), k=4)
    lossless = {"specee": True, "mode": "lossless", "kv_policy": "backfill", "min_exit_layer": 2}
    s = Settings(max_new_tokens=30, draft_quant="int8", exit_cost_check=False, **lossless)
    prepare_draft(src, s)
    prog = always_exit_program(6, 4)
    res = Decoder(make_segments(model, s, prog), s, program=prog, draft=src).generate(PROMPT)
    assert res.token_ids == ref.token_ids and res.draft_quant == "int8"
    assert res.avg_layers < 6  # it exited
    tree = tree_dec(model, EagleTreeSource(src.draft, k=4), 30, program=prog, tree_budget=14, tree_depth=4,
                    **lossless).generate(PROMPT)
    assert tree.token_ids == ref.token_ids


@pytest.mark.parametrize("field,value,choices", [("draft_quant", "int8", "auto, none, int8"),
                                                  ("draft_dtype", "float16", "auto, float16")])
def test_settings_and_cli_refuse_a_draft_setting_that_would_do_nothing(capsys, tiny_model_dir, field, value, choices):
    """--draft-quant and --draft-dtype (tests/test_draft_dtype.py) change the draft: refused where none runs."""
    from specee_compile.cli import main

    flag = "--" + field.replace("_", "-")
    capsys.readouterr()  # the model directory fixture's progress bar
    with pytest.raises(SpecEEError, match=f"{field}='int4' is not one of {choices}"):
        Settings(**{field: "int4"}, specee=True)
    with pytest.raises(SpecEEError, match="runs only with --specee or --speculate tree"):
        Settings(**{field: value})
    with pytest.raises(SpecEEError, match="runs an exported directory's draft as exported"):
        Settings(**{field: value}, specee=True, backend="onnx")
    rc = main(["generate", str(tiny_model_dir), "hi", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag} {value} changes the draft" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("device,speculate,dtype,want", [
    ("cuda", "tree", torch.float16, "int8"), ("cuda", "tree", torch.bfloat16, "int8"),
    ("cuda", "tree", torch.float32, "none"),  # an fp32 draft's int8 rows: never timed on a GPU
    ("cuda", "none", torch.float16, "int8"),  # the one-token SpecEE draft (its exits: eval's paper_q8 rows)
    ("cuda", "none", torch.float32, "none"),
    ("cpu", "tree", torch.float16, "none"),  # no int8 kernels on a CPU
    ("cpu", "none", torch.bfloat16, "none"),
])
def test_auto_draft_quant_takes_int8_only_for_a_16_bit_draft_on_cuda(device, speculate, dtype, want):
    s = Settings(speculate=speculate, specee=speculate == "none")
    assert s.draft_quant == "auto" and s.draft_quant_for(device, dtype) == want
    for explicit in ("none", "int8"):  # an explicit choice is kept everywhere
        assert s.replace(draft_quant=explicit).draft_quant_for(device, dtype) == explicit


def test_auto_keeps_the_draft_as_it_comes_and_none_is_never_refused(tiny_model_dir):
    """auto on the CPU leaves a float draft as trained and an int8 draft given in memory int8 (no refusal);
    --draft-quant none on a decoder without a draft is a no-op, not an error (only int8 changes a draft)."""
    from specee_compile.api import build_decoder, prepare_draft
    from specee_compile.models import load_model

    loaded = load_model(str(tiny_model_dir))
    s = Settings(max_new_tokens=8, speculate="tree", tree_budget=6, tree_depth=3, tree_topk=2)
    fresh = EagleSource(_fresh(loaded.model), k=4)
    prepare_draft(fresh, s)
    assert fresh.draft.quant == "none"
    q = EagleSource(_fresh(loaded.model), k=4)
    q.draft.quantize("int8")
    res = build_decoder(loaded, s, draft=q).generate(PROMPT)
    assert res.stats()["draft_quant"] == "int8"
    Settings(draft_quant="none")  # no draft runs: nothing to refuse



def test_eval_q8_configs_run_an_int8_draft_and_every_exit_point_keeps_the_exits(smollm2, tmp_path, capsys):
    """`eval --configs paper,paper_q8 --every-exit-point`: the _q8 row runs the shipped draft rounded to int8,
    the plain row the draft as shipped, both with every scheduled exit point (on this CPU the cost check
    drops them all): what the int8 draft does to the exit decisions, measured in one run."""
    import json

    from specee_compile.cli import main

    out = tmp_path / "ev"
    rc = main(["eval", "smollm2-135m", "--mtbench", "1", "--squad", "0", "--configs", "paper,paper_q8",
               "--every-exit-point", "--out", str(out)])
    capsys.readouterr()
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["meta"]["draft_quant"] == {"dense": None, "paper": "none", "paper_q8": "int8"}
    assert data["meta"]["exit_cost_check"] is False
    for name in ("paper", "paper_q8"):
        assert data["summary"][name]["mtbench"]["avg_layers"] < 30  # the points were kept: tokens exited
