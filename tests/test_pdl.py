"""Programmatic dependent launch for the plugin kernels (`plugins/pdl.py`, SPECEE_PDL): the setting, and each
kernel compiled for sm_90 on the CPU with PDL on: it waits for the kernel before it (griddepcontrol.wait) before any
global load, store or atomic, lets the next one launch only after that wait, and carries Triton's launch_pdl
option; with PDL off (every default) neither instruction is there. On CUDA (sm_90+) the greedy tree and dense
decode give the same tokens with it on."""

from __future__ import annotations

import re

import pytest
import torch

from specee_compile.errors import SettingError
from specee_compile.plugins import pdl


def test_setting_is_checked_and_off_by_default(monkeypatch):
    monkeypatch.delenv("SPECEE_PDL", raising=False)
    assert pdl.mode() == "0" and pdl.kernel_args(torch.device("cuda")) == {} and pdl.inductor_options() == {}
    monkeypatch.setenv("SPECEE_PDL", "all")
    assert pdl.inductor_options() == {"triton.enable_pdl": True}
    assert pdl.kernel_args(torch.device("cpu")) == {}  # no PDL off CUDA
    monkeypatch.setenv("SPECEE_PDL", "ops")
    assert pdl.inductor_options() == {}
    monkeypatch.setenv("SPECEE_PDL", "1")
    with pytest.raises(SettingError, match=r"SPECEE_PDL='1': expected one of 0, ops, all"):
        pdl.mode()


def _kernels():
    """(name, kernel, signature, constexprs) of every kernel the plugin ops launch with PDL."""
    from specee_compile.plugins.triton_decode_attention import _decode_attn_kernel
    from specee_compile.plugins.triton_gemv import _gemv_kernel, _rows_kernel, _rows_t_kernel
    from specee_compile.plugins.triton_rope_append import _rope_append_kernel
    from specee_compile.plugins.triton_topk import _topk_chunks_kernel, _topk_kernel
    from specee_compile.plugins.triton_tree_attention import _tree_attn_kernel

    h = "*fp16"
    lin = {"x_ptr": h, "w_ptr": h, "s_ptr": "*fp32", "res_ptr": h, "nw_ptr": h, "y_ptr": h}
    return [
        ("gemv", _gemv_kernel, {**lin, "ws_ptr": "*fp32", "ss_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32",
                                "eps": "fp32"},
         {"K": 4096, "PRO": 1, "HAS_RES": True, "BLOCK_N": 4, "BLOCK_K": 1024, "SPLIT": 2, "W8": False}),
        ("rows", _rows_kernel, {**lin, "M": "i32", "N": "i32", "eps": "fp32"},
         {"K": 4096, "XS": 4096, "PRO": 0, "HAS_RES": False, "MP": 16, "IEEE": False, "BLOCK_N": 32,
          "BLOCK_K": 128, "W8": False}),
        ("rows_t", _rows_t_kernel, {**lin, "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
                                    "eps": "fp32"},
         {"K": 4096, "XS": 4096, "PRO": 0, "HAS_RES": True, "MP": 32, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": 2,
          "W8": False, "PREC": ""}),
        ("tree_attention", _tree_attn_kernel,
         {"q_ptr": h, "k_ptr": h, "v_ptr": h, "valid_ptr": "*u8", "mask_ptr": "*u8", "o_ptr": h, "ws_ptr": "*fp32",
          "cnt_ptr": "*i32", **{n: "i32" for n in ("R", "S")}, "sm_scale": "fp32",
          **{n: "i32" for n in ("stride_qh", "stride_qr", "stride_kh", "stride_ks", "stride_vh", "stride_vs",
                                "stride_mr", "stride_ms")}},
         {"HD": 64, "REP": 3, "BR": 32, "BLOCK_S": 64, "PER": 2, "NSP": 4, "IEEE": False}),
        ("decode_attention", _decode_attn_kernel,
         {"q_ptr": h, "k_ptr": h, "v_ptr": h, "valid_ptr": "*u8", "pos_ptr": "*i64", "o_ptr": h, "ws_ptr": "*fp32",
          "cnt_ptr": "*i32", "S": "i32", "sm_scale": "fp32",
          **{n: "i32" for n in ("stride_kh", "stride_ks", "stride_vh", "stride_vs")}},
         {"HD": 64, "REP": 3, "BLOCK_S": 64, "BLOCKS_PER_SPLIT": 2, "MAX_SPLITS": 16}),
        ("rope_append", _rope_append_kernel,
         {"qkv_ptr": h, "cos_ptr": h, "sin_ptr": h, "pos_ptr": "*i64", "slot_ptr": "*i64", "k_ptr": h, "v_ptr": h,
          "valid_ptr": "*u8", "q_out_ptr": h,
          **{n: "i32" for n in ("stride_kh", "stride_ks", "stride_vh", "stride_vs", "rows", "stride_pos",
                                "stride_slot")}},
         {"H": 9, "HKV": 3, "HD": 64}),
        ("topk", _topk_kernel, {"x_ptr": h, "v_ptr": h, "i_ptr": "*i64", "N": "i32", "stride": "i32"},
         {"K": 8, "BLOCK": 512}),
        ("topk_chunks", _topk_chunks_kernel,
         {"x_ptr": h, "v_ptr": h, "i_ptr": "*i64", "wv_ptr": "*fp32", "wi_ptr": "*i32", "cnt_ptr": "*i32",
          "N": "i32", "stride": "i32"},
         {"K": 8, "CHUNK": 512, "NCH": 16, "MERGE": 128}),
    ]


@pytest.mark.parametrize("name", ["gemv", "rows", "rows_t", "tree_attention", "decode_attention", "rope_append",
                                  "topk", "topk_chunks"])
def test_each_kernel_waits_before_any_memory_access_and_launches_pdl_for_hopper(name):
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    _, kernel, sig, consts = next(k for k in _kernels() if k[0] == name)

    def compile_(on: bool):
        c = {**consts, "PDL": on}
        src = ASTSource(kernel, {**sig, **{k: "constexpr" for k in c}}, c, {})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 2, "launch_pdl": on})

    on, off = compile_(True), compile_(False)
    ptx = on.asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    first_access = min(m.start() for m in re.finditer(r"\b(ld|st|atom|red|cp\.async)\.(global|shared::cluster)",
                                                       body))
    assert wait < first_access, f"{name}: a global access before the wait"
    assert wait < body.index("griddepcontrol.launch_dependents")
    assert on.metadata.launch_pdl and not off.metadata.launch_pdl
    assert "griddepcontrol" not in off.asm["ptx"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs CUDA sm_90+ (programmatic dependent launch)")
@pytest.mark.parametrize("mode", ["ops", "all"])
def test_cuda_greedy_tree_and_dense_with_pdl_equal_dense_without(monkeypatch, mode):
    from conftest import make_tiny_llama
    from test_tree import PROMPT, _fixed_vs_host, dense

    model = make_tiny_llama()
    monkeypatch.delenv("SPECEE_PDL", raising=False)
    ref = dense(model, PROMPT * 3, 40, device="cuda", backend="inductor")
    monkeypatch.setenv("SPECEE_PDL", mode)
    got = dense(model, PROMPT * 3, 40, device="cuda", backend="inductor")
    assert got.token_ids == ref.token_ids
    out = _fixed_vs_host(model, device="cuda", backend="inductor", lookup=True, prompt=PROMPT * 3, tree_budget=12,
                         tree_depth=4, tree_topk=4)
    assert out["fixed"][0].token_ids == ref.token_ids and out["fixed"][0].verify_steps > 0


def test_a_bad_setting_is_one_line_before_any_work(monkeypatch, capsys, tiny_model_dir):
    from specee_compile.cli import main

    monkeypatch.setenv("SPECEE_PDL", "yes")
    capsys.readouterr()
    rc = main(["generate", str(tiny_model_dir), "hi", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "SPECEE_PDL='yes': expected one of 0, ops, all" in err and len(err.strip().splitlines()) == 1
