"""`specee::fused_linear` (the decode GEMV with norm / SiLU*up / residual folded in) against the eager
math, on CPU (reference path, compiled layer, the Triton kernel in the interpreter) and on CUDA.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

from specee_compile.model_step import FUSABLE, make_head_fn, make_layer_fn, step_spec
from specee_compile.ops import fused_linear_reference, multi_row_kernel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")

CASES = [("none", 40, 96, True), ("rmsnorm", 72, 64, False), ("silu_mul", 24, 80, True), ("rmsnorm", 33, 136, True)]


def _inputs(pro, n, k, res, dtype, device, seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    kin = 2 * k if pro == "silu_mul" else k
    x = (torch.randn(1, rows, kin, generator=g) * 2).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype).to(device)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype).to(device)
    r = torch.randn(1, rows, n, generator=g).to(dtype).to(device) if res else None
    return x, w, r, nw


def test_reference_is_the_model_step_math():
    import torch.nn.functional as F

    from specee_compile.model_step import rms_norm

    x, w, r, nw = _inputs("silu_mul", 16, 32, True, torch.float32, "cpu", 0)
    g, u = x.chunk(2, dim=-1)
    assert torch.equal(fused_linear_reference(x, w, r, None, 0.0, "silu_mul"), r + F.linear(F.silu(g) * u, w))
    x, w, _, nw = _inputs("rmsnorm", 16, 32, False, torch.float32, "cpu", 1)
    assert torch.equal(fused_linear_reference(x, w, None, nw, 1e-5, "rmsnorm"), F.linear(rms_norm(x, nw, 1e-5), w))
    with pytest.raises(ValueError, match="prologue"):
        fused_linear_reference(x, w, None, nw, 1e-5, "gelu")


def test_unknown_fused_matmul_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="unknown op"):
        make_layer_fn(step_spec(tiny_llama.config, 64), fused=("qkv", "lm_head"))


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_layer_equals_plain_layer_on_cpu(compiled, tiny_llama):
    """The fused-op layer/head (what the CUDA Inductor path compiles) computes what the plain one does;
    on CPU the op runs the reference, so eager is bit-exact and Inductor (fake impl, extern call) is too."""
    model = tiny_llama
    from specee_compile.model_step import extract_weights

    W = extract_weights(model, 64)
    spec = step_spec(model.config, 64)
    plain, fused = make_layer_fn(spec), make_layer_fn(spec, fused=FUSABLE)
    hp, hf = make_head_fn(spec), make_head_fn(spec, fused=True)
    if compiled:
        fused = torch.compile(fused, fullgraph=True, dynamic=False)
        hf = torch.compile(hf, fullgraph=True, dynamic=False)
    L, Hkv, hd = spec.num_layers, spec.num_kv_heads, spec.head_dim
    outs = []
    for fn, head in ((plain, hp), (fused, hf)):
        kc = torch.zeros(L, Hkv, 64, hd)
        vc = torch.zeros(L, Hkv, 64, hd)
        valid = torch.zeros(L, 64, dtype=torch.bool)
        torch.manual_seed(3)
        h = torch.randn(1, 5, spec.hidden)
        with torch.no_grad():
            for q, pos in ((5, torch.arange(5)), (1, torch.tensor([5]))):
                x = h if q == 5 else h[:, -1:]
                for i in range(L):
                    x = fn(x, pos, valid[i], W.cos, W.sin, kc[i], vc[i], 64, *W.layers[i].as_tuple())
            outs.append((x, *head(x, W.norm, W.head), kc.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5) if compiled else torch.equal(a, b)
    # the tree verification's head: the norm plain, the LM head as the op with no prologue (several rows)
    hm = make_head_fn(spec, matmul=True)
    if compiled:
        hm = torch.compile(hm, fullgraph=True, dynamic=False)
    rows = torch.randn(1, 7, spec.hidden)
    with torch.no_grad():
        for a, b in zip(hp(rows, W.norm, W.head), hm(rows, W.norm, W.head)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5) if compiled else torch.equal(a, b)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("fused", [FUSABLE, ("attn", "matmul"), ("attn", "matmul", "down")])
def test_fused_layer_with_tree_mask_equals_plain_layer_on_cpu(tiny_llama, fused, int8):
    """Tree verification's call (slots + an explicit mask) through the fused-op layer computes what the plain
    layer does: every op fused, and the multi-row form (`rows_fused`: the matmuls as the op, norms plain, the
    down projection with the residual); with float weights, and with int8 pairs as a quantized draft's layer."""
    from specee_compile.model_step import extract_weights
    from specee_compile.ops import quantize_rows

    def weights(i):
        ln1, wqkv, bqkv, wo, ln2, wgu, wd = W.layers[i].as_tuple()
        if not int8:
            return ln1, wqkv, bqkv, wo, ln2, wgu, wd
        return ln1, quantize_rows(wqkv), bqkv, quantize_rows(wo), ln2, quantize_rows(wgu), quantize_rows(wd)

    W = extract_weights(tiny_llama, 64)
    spec = step_spec(tiny_llama.config, 64)
    L, Hkv, hd = spec.num_layers, spec.num_kv_heads, spec.head_dim
    torch.manual_seed(5)
    h0 = torch.randn(1, 6, spec.hidden)
    pos = torch.tensor([20, 21, 21, 22, 22, 22])  # a root, two children, three grandchildren
    slots = torch.arange(20, 26)
    mask = torch.rand(6, 32) < 0.5
    mask[torch.arange(6), slots] = True
    outs = []
    for fn in (make_layer_fn(spec), make_layer_fn(spec, fused=fused)):
        kc = torch.randn(L, Hkv, 64, hd, generator=torch.Generator().manual_seed(1))
        vc = torch.randn(L, Hkv, 64, hd, generator=torch.Generator().manual_seed(2))
        valid = torch.ones(L, 64, dtype=torch.bool)
        x = h0
        with torch.no_grad():
            for i in range(L):
                x = fn(x, pos, valid[i], W.cos, W.sin, kc[i], vc[i], 32, *weights(i), slots=slots, mask=mask)
        outs.append(x)
    assert torch.equal(*outs)


def test_compiled_rows_layer_launches_no_copy_and_no_trailing_add(tiny_llama):
    """The tree's multi-row layer (`rows_fused`: attention, RoPE and the matmuls as ops) compiled by Inductor
    generates three kernels of its own: RMSNorm, residual add + RMSNorm, SiLU * up. The attention output feeds
    the o-projection as a view (`tree_attention` writes rows-major) and the last residual add is the down
    projection's epilogue; each was one more launch per layer and tree step before (a copy and an add)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from specee_compile.model_step import extract_weights

    W = extract_weights(tiny_llama, 64)
    spec = step_spec(tiny_llama.config, 64)
    Hkv, hd = spec.num_kv_heads, spec.head_dim
    torch.manual_seed(3)
    h0 = torch.randn(1, 6, spec.hidden)
    pos = torch.tensor([20, 21, 21, 22, 22, 22])
    slots = torch.arange(20, 26)
    mask = torch.rand(6, 32) < 0.5
    mask[torch.arange(6), slots] = True
    kc, vc = torch.randn(Hkv, 64, hd), torch.randn(Hkv, 64, hd)
    valid = torch.ones(64, dtype=torch.bool)
    args = (h0, pos, valid, W.cos, W.sin, kc, vc, 32, *W.layers[0].as_tuple())
    fn = torch.compile(make_layer_fn(spec, fused=("attn", "matmul")), fullgraph=True)
    with torch.no_grad():
        got, code = run_and_get_code(lambda: fn(*args, slots=slots, mask=mask))
        want = make_layer_fn(spec)(*args, slots=slots, mask=mask)  # (the compiled call wrote its K/V already)
    kernels = re.findall(r"^(?:cpp|triton)_\w+ = ", "\n".join(code), re.MULTILINE)
    assert len(kernels) == 3, kernels
    assert not any("clone" in k or "transpose" in k for k in kernels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_tuner_candidates_per_dtype_prologue_and_weights():
    """What the rows tuner times beside cuBLAS: fp32 the turned kernel's 3xTF32 configs (the old kernel's IEEE dot
    lost every fp32 shape to cuBLAS); 16-bit with no prologue the turned kernel's plus the old ones that won there; a
    prologue or int8 weights every config of both."""
    pytest.importorskip("triton")
    from specee_compile.plugins import triton_gemv as T

    assert T.row_candidates(torch.float32, 1, False) == T.row_candidates(torch.float32, 0, False) == [
        *T.ROW_T_CONFIGS_F32]
    # the whole-K kernel where its weight rows fit a program's registers: SmolLM2's K (576 .. 1536), not 7B's; in
    # fp32 there also the turned kernel's deep-pipeline configs
    for dt, pro, w8 in ((torch.float32, 0, False), (torch.bfloat16, 0, False), (torch.float16, 1, True)):
        deep = T.ROW_T_CONFIGS_F32_DEEP if dt == torch.float32 else []
        assert T.row_candidates(dt, pro, w8, 1536) == [*T.row_candidates(dt, pro, w8), *deep, *T.ROW_K_CONFIGS]
        assert T.row_candidates(dt, pro, w8, 4096) == T.row_candidates(dt, pro, w8)
    assert all(c[0] == "k" and len(c) == 4 for c in T.ROW_K_CONFIGS) and T.WHOLE_K_MAX == 2048
    for c in (*T.ROW_T_CONFIGS_F32, *T.ROW_T_CONFIGS_F32_DEEP):
        assert len(c) == 7 and c[0] == "t" and c[-1] == "tf32x3"
    assert not set(T.ROW_T_CONFIGS_F32) & set(T.ROW_T_CONFIGS_F32_DEEP)
    plain16 = T.row_candidates(torch.bfloat16, 0, False)
    assert plain16 == [*T.ROW_CONFIGS_16, *T.ROW_T_CONFIGS] and set(T.ROW_CONFIGS_16) <= set(T.ROW_CONFIGS)
    assert T.row_candidates(torch.float16, 1, False) == [*T.ROW_CONFIGS, *T.ROW_T_CONFIGS]
    # int8 weights: every 16-bit config and the wider int8 ones, whose stages hold the bytes of a 16-bit winner's
    for pro in (0, 1):
        assert T.row_candidates(torch.float16, pro, True) == [
            *T.ROW_CONFIGS, *T.ROW_T_CONFIGS, *T.ROW_CONFIGS_W8, *T.ROW_T_CONFIGS_W8]
    assert not set(T.ROW_CONFIGS_W8) & set(T.ROW_CONFIGS) and not set(T.ROW_T_CONFIGS_W8) & set(T.ROW_T_CONFIGS)
    fp16_stage = {c[0] * c[1] * 2 for c in T.ROW_CONFIGS} | {c[1] * c[2] * 2 for c in T.ROW_T_CONFIGS}  # bytes
    assert all(c[0] * c[1] in fp16_stage and c[0] * c[1] >= 16384 for c in T.ROW_CONFIGS_W8)
    assert all(c[0] == "t" and len(c) == 6 and c[1] * c[2] in fp16_stage and c[1] * c[2] >= 16384
               for c in T.ROW_T_CONFIGS_W8)


def test_one_row_tuner_times_wider_tiles_for_int8_weights():
    """int8 weights (a quantized draft's one-row step) are also timed on CONFIGS_W8, whose tiles hold 16-32 KiB of
    int8 (a CONFIGS tile holds half its fp16 bytes in int8: at most 16 KiB); float weights keep CONFIGS; the
    whole-K list (the C++ runner's packages) keeps only unsplit configs."""
    pytest.importorskip("triton")
    from specee_compile.plugins import triton_gemv as T

    assert T.gemv_candidates(False) == T.CONFIGS
    assert T.gemv_candidates(True) == [*T.CONFIGS, *T.CONFIGS_W8] and not set(T.CONFIGS_W8) & set(T.CONFIGS)
    assert all(c[2] == 1 for c in T.gemv_candidates(True, whole_k=True))
    assert max(bn * bk for bn, bk, *_ in T.CONFIGS) == 16384  # int8 bytes of the widest CONFIGS tile
    assert all(16384 <= bn * bk <= 32768 for bn, bk, *_ in T.CONFIGS_W8)
    assert max(bn * bk for bn, bk, *_ in T.CONFIGS_W8) == max(bn * bk * 2 for bn, bk, *_ in T.CONFIGS)  # fp16's


def test_rows_fused_per_dtype_and_its_override(monkeypatch):
    """The multi-row layer's ops: the matmuls as the op with no prologue, for every dtype (fp32 too since session
    25: the tuner's 3xTF32 configs); SPECEE_TREE_LINEARS picks another form (A/B runs) and a bad value is refused in
    one line."""
    from specee_compile.errors import SettingError
    from specee_compile.model_step import CUDA_FUSED, ROWS_SILU, rows_fused

    monkeypatch.delenv("SPECEE_TREE_LINEARS", raising=False)
    assert rows_fused(torch.float16) == rows_fused(torch.bfloat16) == rows_fused(torch.float32) == ("attn", "matmul")
    for v, want in (("plain", ("attn",)), ("fused", CUDA_FUSED), ("matmul", ("attn", "matmul")), ("silu", ROWS_SILU)):
        monkeypatch.setenv("SPECEE_TREE_LINEARS", v)
        assert rows_fused(torch.float16) == rows_fused(torch.float32) == want
    monkeypatch.setenv("SPECEE_TREE_LINEARS", "cublas")
    with pytest.raises(SettingError, match="expected one of plain, matmul, fused, silu"):
        rows_fused(torch.float16)


_INTERP = textwrap.dedent(
    """
    import torch, triton
    from specee_compile.ops import fused_linear_reference as ref
    from specee_compile.plugins.triton_gemv import PROLOGUES, _gemv_kernel, _workspace
    kern = _gemv_kernel
    torch.manual_seed(0)
    for dt in (torch.float16, torch.float32):  # the interpreter's own bf16 rounding is not RTNE
        for pro, n, k, res in CASES:
            kin = 2 * k if pro == "silu_mul" else k
            x = (torch.randn(1, 1, kin) * 2).to(dt)
            w = (torch.randn(n, k) * 0.1).to(dt)
            nw = (1 + 0.1 * torch.randn(k)).to(dt)
            r = torch.randn(1, 1, n).to(dt) if res else None
            # N and K not multiples of the blocks in some cases; split-K with 3 and 2 splits
            for bn, bk, sp in ((16, 32, 1), (8, 64, 1), (8, 16, 3), (16, 32, 2)):
                y = torch.full((1, 1, n), float("nan"), dtype=dt)
                ws = _workspace(torch.device("cpu"), n)
                kern[(triton.cdiv(n, bn), sp)](x, w, w, r if res else y, nw, y, *ws, n, 1e-5, K=k,
                                               PRO=PROLOGUES[pro], HAS_RES=res, BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp,
                                               W8=False)
                assert all(int(t.abs().sum()) == 0 for t in ws), "split-K workspace not reset"
                e = ref(x, w, r, nw, 1e-5, pro)
                err = float((y.float() - e.float()).abs().max())
                tol = 2e-3 * float(e.float().abs().max()) if dt == torch.float16 else 1e-5
                assert err <= tol, (dt, pro, n, k, res, bn, bk, sp, err)
    print("INTERP_OK")
    """
)


def test_kernel_logic_in_triton_interpreter_on_cpu():
    run_in_triton_interpreter(f"CASES = {CASES!r}\n" + _INTERP)


_INTERP_ROWS = textwrap.dedent(
    """
    import torch, triton
    from specee_compile.ops import fused_linear_reference as ref
    from specee_compile.plugins.triton_gemv import PROLOGUES, _rows_kernel, row_block
    torch.manual_seed(0)
    for dt in (torch.float16, torch.float32):
        for pro, n, k, res in CASES:
            for rows in (2, 5, 17):
                kin = 2 * k if pro == "silu_mul" else k
                x = (torch.randn(1, rows, kin) * 2).to(dt)
                w = (torch.randn(n, k) * 0.1).to(dt)
                nw = (1 + 0.1 * torch.randn(k)).to(dt)
                r = torch.randn(1, rows, n).to(dt) if res else None
                e = ref(x, w, r, nw, 1e-5, pro)
                for bn, bk in ((16, 32), (32, 16)):  # N and K not multiples of the blocks in some cases
                    y = torch.full((1, rows, n), float("nan"), dtype=dt)
                    _rows_kernel[(triton.cdiv(n, bn),)](x, w, w, r if res else y, nw, y, rows, n, 1e-5, K=k,
                                                        XS=kin, PRO=PROLOGUES[pro], HAS_RES=res, MP=row_block(rows),
                                                        IEEE=dt == torch.float32, BLOCK_N=bn, BLOCK_K=bk, W8=False)
                    err = float((y.float() - e.float()).abs().max())
                    tol = 2e-3 * float(e.float().abs().max()) if dt == torch.float16 else 1e-5 * float(e.abs().max())
                    assert err <= tol, (dt, pro, n, k, res, rows, bn, bk, err)
    print("INTERP_OK")
    """
)


def test_rows_kernel_logic_in_triton_interpreter_on_cpu():
    """The rows kernel (2 .. 32 rows: tree verification, the draft's levels) against the eager math, every
    prologue, with and without the residual, rows padded to 16 and 32, blocks that do not divide N or K."""
    run_in_triton_interpreter(f"CASES = {CASES!r}\n" + _INTERP_ROWS)


_INTERP_ROWS_T = textwrap.dedent(
    """
    import torch, triton
    from specee_compile.ops import fused_linear_reference as ref, quantize_rows
    from specee_compile.plugins.triton_gemv import PROLOGUES, _rows_launch, row_block, rows_args
    torch.manual_seed(0)
    CFGS = (("t", 16, 32, 1, 4, 1), ("t", 32, 16, 3, 4, 1), ("t", 16, 16, 2, 4, 1))
    for pro, n, k, res in CASES:
        kin = 2 * k if pro == "silu_mul" else k
        for dt, w8 in ((torch.float16, False), (torch.float16, True), (torch.float32, False)):
            w = torch.randn(n, k) * 0.1
            q, s = quantize_rows(w) if w8 else (w.to(dt), None)
            nw = (1 + 0.1 * torch.randn(k)).to(dt)
            # fp32: the configs with a precision (3xTF32 as the GPU runs it, IEEE); a 16-bit config refused there
            cfgs = CFGS if dt != torch.float32 else tuple(c + (p,) for c in CFGS for p in ("tf32x3", "ieee"))
            cfgs += (("k", 4, 4, 4), ("k", 2, 8, 2), ("k", 8, 16, 4))  # the whole-K kernel (RB 16: 17 rows, 2 blocks)
            for rows in (2, 5, 17):
                x = (torch.randn(1, rows, kin) * 2).to(dt)
                r = torch.randn(1, rows, n).to(dt) if res else None
                e = ref(x, q, r, nw, 1e-5, pro, s)
                tol = (2e-3 if dt != torch.float32 else 1e-5) * float(e.float().abs().max())
                if dt == torch.float32:
                    y, args, kw = rows_args(x, q, r, nw, 1e-5, PROLOGUES[pro], s)
                    try:
                        _rows_launch(args, kw, CFGS[0])
                        raise AssertionError("a 16-bit turned config ran fp32 rows")
                    except ValueError as ex:
                        assert "precision" in str(ex)
                for cfg in cfgs:
                    for rep in range(2):  # split-K leaves its scratch zeroed: a second call computes the same
                        y, args, kw = rows_args(x, q, r, nw, 1e-5, PROLOGUES[pro], s)
                        _rows_launch(args, kw, cfg)
                        err = float((y.float() - e.float()).abs().max())
                        assert err <= tol, (pro, n, k, res, w8, rows, cfg, rep, err)
    print("INTERP_OK")
    """
)


def test_turned_rows_kernel_logic_in_triton_interpreter_on_cpu():
    """The turned rows kernel (weight tile on the MMA's wide side, split-K through a self-zeroing scratch) and the
    whole-K rows kernel against the eager math: fp16, int8 and fp32 weights (fp32 with each precision), every
    prologue, with and without the residual, 2 / 5 / 17 rows, blocks that do not divide N or K, whole-K and split-K,
    two calls in a row."""
    run_in_triton_interpreter(f"CASES = {CASES!r}\n" + _INTERP_ROWS_T)


def _rows_t_for_hopper(t: str, consts: dict, num_warps: int, num_stages: int, w: str | None = None):
    """`_rows_t_kernel` compiled for sm_90 on the CPU with the launch's 16-byte alignment hints: activations of
    Triton type t, weights of type w (default t), the other constexprs from consts (skips without triton's NVIDIA
    backend)."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specee_compile.plugins.triton_gemv import _rows_t_kernel

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    ptrs = {"x_ptr": t, "w_ptr": w or t, "s_ptr": "*fp32", "res_ptr": t, "nw_ptr": t, "y_ptr": t, "ws_ptr": "*fp32",
            "cnt_ptr": "*i32"}
    sig = {**ptrs, "M": "i32", "N": "i32", "eps": "fp32", **{k: "constexpr" for k in consts}}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
    return triton.compile(ASTSource(_rows_t_kernel, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def test_turned_rows_kernel_compiles_to_a_pipelined_warpgroup_mma_for_hopper():
    """Compiled for sm_90 on the CPU with the launch's 16-byte alignment hints: the dot is a warpgroup MMA
    (wgmma) and the weight tiles stream through cp.async stages (the old rows kernel's dot is mma.sync); fp32 with
    3xTF32 too, on TF32 warpgroup MMAs (three per K block), where the IEEE dot is FMAs."""
    def ptx(t: str, prec: str, bk: int) -> str:
        consts = {"K": 4096, "XS": 4096, "PRO": 1, "HAS_RES": True, "MP": 32, "BLOCK_N": 64, "BLOCK_K": bk,
                  "SPLIT": 2, "W8": False, "PREC": prec}
        return _rows_t_for_hopper(t, consts, 4, 3).asm["ptx"]

    p16 = ptx("*fp16", "", 128)
    assert "wgmma" in p16 and "cp.async" in p16
    p32 = ptx("*fp32", "tf32x3", 64)
    assert "cp.async" in p32 and p32.count("wgmma.mma_async") == 3 * ptx("*fp32", "tf32", 64).count("wgmma.mma_async")
    assert ".tf32" in p32 and "wgmma" not in ptx("*fp32", "ieee", 64)


def test_deep_fp32_turned_configs_fit_hopper_shared_memory():
    """The fp32 deep-pipeline configs (every K block in flight), compiled for sm_90 on the CPU at 32 rows: each fits
    a Hopper program's shared memory (227 KB), streams its tiles through cp.async, and takes a warpgroup MMA where
    its feature block is 64 wide, mma.sync where narrower."""
    pytest.importorskip("triton")
    from specee_compile.plugins import triton_gemv as T

    for _, bn, bk, sp, nwarps, ns, prec in T.ROW_T_CONFIGS_F32_DEEP:
        consts = {"K": 1536, "XS": 1536, "PRO": 0, "HAS_RES": True, "MP": 32, "BLOCK_N": bn, "BLOCK_K": bk,
                  "SPLIT": sp, "W8": False, "PREC": prec, "PDL": True, "EARLY_W": True}
        c = _rows_t_for_hopper("*fp32", consts, nwarps, ns)
        ptx = c.asm["ptx"]
        assert c.metadata.shared <= 227 * 1024, (bn, bk, sp, ns, c.metadata.shared)
        assert "cp.async" in ptx and ("wgmma" in ptx) == (bn >= 64) and ("mma.sync" in ptx) == (bn < 64)


def test_int8_rows_configs_fit_hopper_and_take_its_mma():
    """Every int8 rows config (ROW_CONFIGS_W8 on the old kernel, ROW_T_CONFIGS_W8 on the turned one), compiled for
    sm_90 on the CPU as the 7B draft's levels launch it (8 rows in a 16-row block, K 4096, int8 weights, fp16
    activations, split-K where the config has it): each fits a Hopper program's shared memory (227 KB) and lowers
    its dot to tensor-core MMAs (warpgroup MMA in the turned kernel) fed by cp.async stages."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specee_compile.plugins import triton_gemv as T

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    base = {"K": 4096, "XS": 4096, "PRO": 0, "HAS_RES": False, "MP": 16, "W8": True}
    for _, bn, bk, sp, nwarps, ns in T.ROW_T_CONFIGS_W8:
        consts = {**base, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "PREC": "", "PDL": True, "EARLY_W": True}
        c = _rows_t_for_hopper("*fp16", consts, nwarps, ns, w="*i8")
        assert c.metadata.shared <= 227 * 1024, (bn, bk, sp, ns, c.metadata.shared)
        assert "wgmma" in c.asm["ptx"] and "cp.async" in c.asm["ptx"], (bn, bk, sp)
    for bn, bk, nwarps, ns in T.ROW_CONFIGS_W8:
        consts = {**base, "IEEE": False, "BLOCK_N": bn, "BLOCK_K": bk}
        ptrs = {"x_ptr": "*fp16", "w_ptr": "*i8", "s_ptr": "*fp32", "res_ptr": "*fp16", "nw_ptr": "*fp16",
                "y_ptr": "*fp16"}
        sig = {**ptrs, "M": "i32", "N": "i32", "eps": "fp32", **{k: "constexpr" for k in consts}}
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
        c = triton.compile(ASTSource(T._rows_kernel, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": nwarps, "num_stages": ns})
        assert c.metadata.shared <= 227 * 1024, (bn, bk, ns, c.metadata.shared)
        assert "mma" in c.asm["ptx"] and "cp.async" in c.asm["ptx"], (bn, bk)


def test_int8_rows_quantize_round_trip_and_reference():
    """`quantize_rows`: per-row symmetric int8, |q| <= 127 with 127 reached in every nonzero row, error at most half
    a step; a zero row keeps scale 1; stacking rows quantizes as the parts (a fused q|k|v). The reference's int8
    matmul is fp32 products and sums, scaled once, and the op dispatches it on the CPU."""
    from specee_compile.ops import dequantize_rows, fused_linear, linear_w8, quantize_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * torch.linspace(0.01, 2.0, 48)[:, None]
    w[5] = 0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (48,)
    assert int(q.abs().max()) == 127 and s[5] == 1 and int(q[5].abs().max()) == 0
    assert all(int(q[i].abs().max()) == 127 for i in range(48) if i != 5)
    assert bool(((dequantize_rows(q, s, torch.float32) - w).abs() <= s[:, None] / 2 + 1e-7).all())
    qa, sa = quantize_rows(w[:20])
    qb, sb = quantize_rows(w[20:])
    assert torch.equal(torch.cat([qa, qb]), q) and torch.equal(torch.cat([sa, sb]), s)
    for pro, n, k, res in CASES:
        x, _, r, nw = _inputs(pro, n, k, res, torch.float16, "cpu", 1)
        wq, ws = quantize_rows(torch.randn(n, k, generator=g) * 0.1)
        got = fused_linear(x, wq, r, nw, 1e-5, pro, ws)
        xp = fused_linear_reference(x, torch.eye(x.shape[-1] if pro != "silu_mul" else k, dtype=x.dtype),
                                    None, nw, 1e-5, pro)  # the prologue alone
        want = linear_w8(xp, wq, ws)
        assert torch.equal(got, want if r is None else r + want), pro
        deq = fused_linear_reference(xp.double(), dequantize_rows(wq, ws, torch.float64))
        assert float((linear_w8(xp, wq, ws).double() - deq).abs().max()) <= 1e-3 * float(deq.abs().max())


_INTERP_W8 = textwrap.dedent(
    """
    import torch, triton
    from specee_compile.ops import fused_linear_reference as ref, quantize_rows
    from specee_compile.plugins.triton_gemv import PROLOGUES, _gemv_kernel, _rows_kernel, _workspace, row_block
    torch.manual_seed(0)
    for dt in (torch.float16, torch.float32):
        for pro, n, k, res in CASES:
            kin = 2 * k if pro == "silu_mul" else k
            q, s = quantize_rows(torch.randn(n, k) * 0.1)
            nw = (1 + 0.1 * torch.randn(k)).to(dt)
            for rows in (1, 3, 17):
                x = (torch.randn(1, rows, kin) * 2).to(dt)
                r = torch.randn(1, rows, n).to(dt) if res else None
                e = ref(x, q, r, nw, 1e-5, pro, s)
                tol = 2e-3 * float(e.float().abs().max()) if dt == torch.float16 else 1e-5 * float(e.abs().max())
                y = torch.full((1, rows, n), float("nan"), dtype=dt)
                if rows == 1:
                    for bn, bk, sp in ((16, 32, 1), (8, 16, 3)):  # whole K; split-K
                        ws = _workspace(torch.device("cpu"), n)
                        _gemv_kernel[(triton.cdiv(n, bn), sp)](x, q, s, r if res else y, nw, y, *ws, n, 1e-5, K=k,
                                                               PRO=PROLOGUES[pro], HAS_RES=res, BLOCK_N=bn,
                                                               BLOCK_K=bk, SPLIT=sp, W8=True)
                        err = float((y.float() - e.float()).abs().max())
                        assert err <= tol, (dt, pro, n, k, res, bn, bk, sp, err)
                else:
                    _rows_kernel[(triton.cdiv(n, 16),)](x, q, s, r if res else y, nw, y, rows, n, 1e-5, K=k, XS=kin,
                                                        PRO=PROLOGUES[pro], HAS_RES=res, MP=row_block(rows),
                                                        IEEE=dt == torch.float32, BLOCK_N=16, BLOCK_K=32, W8=True)
                    err = float((y.float() - e.float()).abs().max())
                    assert err <= tol, (dt, pro, n, k, res, rows, err)
    print("INTERP_OK")
    """
)


def test_int8_weight_kernels_in_triton_interpreter_on_cpu():
    """Both kernels with int8 weights and per-row scales (the draft's --draft-quant int8): one row whole-K and
    split-K, 3 and 17 rows, every prologue, fp16 and fp32 activations, against the reference's int8 matmul."""
    run_in_triton_interpreter(f"CASES = {CASES!r}\n" + _INTERP_W8)


_INTERP_TWIN = textwrap.dedent(
    """
    import torch, triton
    from specee_compile.plugins import triton_gemv as G
    torch.manual_seed(0)
    for pro, n, k, res in CASES:
        kin = 2 * k if pro == "silu_mul" else k
        x = torch.randn(1, 1, kin); w = torch.randn(n, k) * 0.1; nw = 1 + 0.1 * torch.randn(k)
        r = torch.randn(1, 1, n) if res else None
        key = (n, k, G.PROLOGUES[pro])
        # the Python op's whole-K pick is used as it is; a split-K pick gives way to the whole-K tuner's
        for picked, used in (((16, 32, 1, 4, 1),) * 2, ((8, 16, 3, 4, 1), (8, 64, 1, 4, 1))):
            G.PICKED[key], G.WHOLE_K[key] = picked, (8, 64, 1, 4, 1)
            got = torch.ops.specee_aoti.fused_linear(x, w, r, nw, 1e-5, pro)
            want = torch.empty(1, 1, n)
            G._gemv_kernel[(triton.cdiv(n, used[0]), 1)](x, w, w, r if res else want, nw, want,
                *G._workspace(torch.device("cpu"), n), n, 1e-5, K=k, PRO=G.PROLOGUES[pro], HAS_RES=res,
                BLOCK_N=used[0], BLOCK_K=used[1], SPLIT=1, W8=False)
            assert torch.equal(got, want), (pro, picked)
    print("INTERP_OK")
    """
)


_INTERP_W8_CONFIGS = textwrap.dedent(
    """
    import torch
    from specee_compile.ops import linear_w8, quantize_rows
    from specee_compile.plugins import triton_gemv as T
    torch.manual_seed(0)
    n, k = 200, 640  # neither divides by a config's feature or K block
    q, s = quantize_rows(torch.randn(n, k) * 0.1)
    for cfg in (*T.ROW_CONFIGS_W8, *T.ROW_T_CONFIGS_W8):
        for rows in (8, 5):
            x = torch.randn(1, rows, k).half()
            want = linear_w8(x, q, s)
            for _ in range(2):  # the split-K scratch is left zeroed for the next call
                y, args, kw = T.rows_args(x, q, None, None, 0.0, 0, s)
                T._rows_launch(args, kw, cfg)
                err = float((y.float() - want.float()).abs().max())
                assert err <= 2e-3 * float(want.float().abs().max()), (cfg, rows, err)
    print("INTERP_OK")
    """
)


def test_int8_rows_configs_compute_the_int8_matmul_in_triton_interpreter():
    """Every int8 rows config (ROW_CONFIGS_W8, ROW_T_CONFIGS_W8) through the tuner's launch path, as the draft's levels
    call it (8 rows, no prologue), and with 5 rows, on a shape its blocks do not divide, twice in a row: the int8
    matmul with per-row scales (`ops.linear_w8`) to fp16 rounding."""
    run_in_triton_interpreter(_INTERP_W8_CONFIGS)


def test_aoti_twin_runs_the_picked_config_in_triton_interpreter():
    """`specee_aoti::fused_linear` (what the C++ runner's CUDA layer package embeds) launches the config the
    Python autotuner picked for its shape where it is whole-K (the same bits as the Python op's kernel)."""
    run_in_triton_interpreter(f"CASES = {CASES!r}\n" + _INTERP_TWIN)


def test_tuner_picks_the_fastest_config_that_ran_and_rotates_enough_weight_copies():
    from specee_compile.plugins import triton_gemv as G

    a, b, c = G.CONFIGS[:3]
    assert G.pick_fastest({a: 3.2, b: 2.9, c: 3.0}) == b
    assert G.pick_fastest({a: None, b: 4.0, c: None}) == b  # a config that failed never wins
    with pytest.raises(RuntimeError, match="no GEMV config ran"):
        G.pick_fastest({a: None})
    # the copies cover several times a 50 MB L2; a weight that alone outsizes it many times is read as it is
    for nbytes in (576 * 576 * 4, 960 * 576 * 4, 3 << 20, 40 << 20):  # SmolLM2's o and qkv (fp32), ...
        assert G.tune_copies(nbytes) * nbytes >= 3 * (50 << 20)
    assert G.tune_copies(1 << 10) == 256 and G.tune_copies(G.TUNE_BYTES // 3) == 1
    assert G.tune_copies(12_288 * 4096 * 2) == 1  # 7B qkv, fp16


@cuda
def test_tuner_times_configs_in_a_graph_and_keeps_its_pick_per_shape(monkeypatch):
    from specee_compile.plugins import triton_gemv as G

    monkeypatch.delenv("SPECEE_GEMV_CONFIG", raising=False)
    x, w, r, nw = _inputs("rmsnorm", 960, 576, True, torch.float32, "cuda", 3)
    G._TUNE_CACHE.clear()
    seen = []
    real = G._graph_us
    monkeypatch.setattr(G, "_graph_us", lambda launch, n, reps=5: seen.append(n) or real(launch, n, reps))
    y = G.triton_fused_linear(x, w, r, nw, 1e-5, "rmsnorm")
    assert len(seen) == len(G.CONFIGS) and G.PICKED[(960, 576, 1)] in G.CONFIGS
    G.triton_fused_linear(x, w, r, nw, 1e-5, "rmsnorm")
    assert len(seen) == len(G.CONFIGS)  # cached: no second tuning
    ref = fused_linear_reference(x, w, r, nw, 1e-5, "rmsnorm")
    assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # first use of a shape inside a capture: the default config, not tuned, not remembered
    x2, w2, _, nw2 = _inputs("rmsnorm", 200, 256, False, torch.float32, "cuda", 4)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        G.triton_fused_linear(x2, w2, None, nw2, 1e-5, "rmsnorm")
    assert len(seen) == len(G.CONFIGS) and (200, 256, 1) not in G.PICKED
    # a pinned config (SPECEE_GEMV_CONFIG) runs as it is and is not recorded as a pick
    monkeypatch.setenv("SPECEE_GEMV_CONFIG", "8,512,1,4,1")
    x3, w3, _, nw3 = _inputs("rmsnorm", 136, 256, False, torch.float32, "cuda", 5)
    G.triton_fused_linear(x3, w3, None, nw3, 1e-5, "rmsnorm")
    assert len(seen) == len(G.CONFIGS) and (136, 256, 1) not in G.PICKED


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pro,n,k,res", CASES + [("silu_mul", 4096, 11008, True), ("rmsnorm", 12288, 4096, False)])
@pytest.mark.parametrize("config", ["16,256,1,4,1", "8,512,4,4,1"])  # whole K; split-K
def test_cuda_kernel_matches_eager(dtype, pro, n, k, res, config, monkeypatch):
    from specee_compile.plugins.triton_gemv import triton_fused_linear

    monkeypatch.setenv("SPECEE_GEMV_CONFIG", config)  # no autotuning per case

    for seed in range(3):  # split-K: the workspace resets itself between calls
        x, w, r, nw = _inputs(pro, n, k, res, dtype, "cuda", seed)
        got = triton_fused_linear(x, w, r, nw, 1e-5, pro)
        ref = fused_linear_reference(x, w, r, nw, 1e-5, pro)
        exact = fused_linear_reference(x.double(), w.double(), r.double() if res else None, nw.double(), 1e-5, pro)
        assert got.dtype == dtype and got.shape == ref.shape
        # no worse than the eager op (cuBLAS) against float64, within rounding of the output dtype
        e_got = float((got.double() - exact).norm() / exact.norm())
        e_ref = float((ref.double() - exact).norm() / exact.norm())
        assert e_got <= 1.5 * e_ref + 1e-6, (e_got, e_ref)


@cuda
def test_registered_op_dispatches_and_more_rows_fall_back(monkeypatch):
    from specee_compile.plugins import triton_gemv as T

    monkeypatch.delenv("SPECEE_GEMV_MAX_ROWS", raising=False)
    assert T.register_cuda_impl()
    x, w, r, nw = _inputs("rmsnorm", 256, 512, True, torch.float16, "cuda", 5)
    assert torch.equal(torch.ops.specee.fused_linear(x, w, r, nw, 1e-5, "rmsnorm"),
                       T.triton_fused_linear(x, w, r, nw, 1e-5, "rmsnorm"))
    # 3 rows: the eager reference bit for bit (the C++ runner's multi-row bits), except inside
    # multi_row_kernel() (the fixed tree program): the rows kernel there, but 33 rows (past MAX_ROWS) and
    # SPECEE_GEMV_MAX_ROWS=1 keep the reference
    x3, _, r3, _ = _inputs("rmsnorm", 256, 512, True, torch.float16, "cuda", 6, rows=3)
    ref = fused_linear_reference(x3, w, r3, nw, 1e-5, "rmsnorm")
    assert torch.equal(torch.ops.specee.fused_linear(x3, w, r3, nw, 1e-5, "rmsnorm"), ref)
    T._TUNE_CACHE.clear()
    with multi_row_kernel():
        got = torch.ops.specee.fused_linear(x3, w, r3, nw, 1e-5, "rmsnorm")
        assert got.shape == ref.shape and float((got - ref).abs().max()) <= 4e-3 * float(ref.abs().max())
        assert any(key[:4] == ("rows", 16, 256, 512) for key in T._TUNE_CACHE)  # tuned for 16-row blocks
        x33, _, r33, _ = _inputs("rmsnorm", 256, 512, True, torch.float16, "cuda", 7, rows=33)
        assert torch.equal(torch.ops.specee.fused_linear(x33, w, r33, nw, 1e-5, "rmsnorm"),
                           fused_linear_reference(x33, w, r33, nw, 1e-5, "rmsnorm"))
        monkeypatch.setenv("SPECEE_GEMV_MAX_ROWS", "1")
        assert torch.equal(torch.ops.specee.fused_linear(x3, w, r3, nw, 1e-5, "rmsnorm"), ref)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pro,n,k,res", CASES + [("silu_mul", 4096, 11008, True), ("rmsnorm", 12288, 4096, False)])
@pytest.mark.parametrize("rows", [2, 8, 25])
def test_cuda_rows_kernel_matches_eager(dtype, pro, n, k, res, rows, monkeypatch):
    """The rows kernel on the GPU (tree verification's 25 rows, the draft's 8-row levels, lossless pending
    rows): no worse than the eager op (cuBLAS) against float64, within rounding of the output dtype."""
    from specee_compile.plugins import triton_gemv as T

    monkeypatch.delenv("SPECEE_GEMV_MAX_ROWS", raising=False)
    x, w, r, nw = _inputs(pro, n, k, res, dtype, "cuda", rows, rows=rows)
    ref = fused_linear_reference(x, w, r, nw, 1e-5, pro)
    exact = fused_linear_reference(x.double(), w.double(), r.double() if res else None, nw.double(), 1e-5, pro)
    e_ref = float((ref.double() - exact).norm() / exact.norm())
    with multi_row_kernel():  # the tuned path (a config, or cuBLAS where faster)
        outs = [T.triton_fused_linear(x, w, r, nw, 1e-5, pro)]
    turned = ([("t", 64, 128, 1, 4, 4), ("t", 64, 128, 4, 4, 4)] if dtype != torch.float32 else
              [("t", 64, 64, 1, 4, 4, "tf32x3"), ("t", 64, 32, 8, 4, 2, "tf32x3"),
               *(T.ROW_T_CONFIGS_F32_DEEP if k <= T.WHOLE_K_MAX else [])])
    whole = [("k", 4, 4, 8), ("k", 2, 8, 8)] if k <= T.WHOLE_K_MAX else []
    for cfg in ((32, 128, 4, 3), (16, 256, 4, 3), *turned, *whole):  # the kernels themselves: two or more configs each
        y, args, kw = T.rows_args(x, w, r, nw, 1e-5, T.PROLOGUES[pro])
        T._rows_launch(args, kw, cfg)
        outs.append(y)
    for got in outs:
        assert got.dtype == dtype and got.shape == ref.shape
        e_got = float((got.double() - exact).norm() / exact.norm())
        assert e_got <= 1.5 * e_ref + 1e-6, (e_got, e_ref)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pro,n,k,res", [("none", 4096, 8192, False), ("rmsnorm", 12288, 4096, False),
                                         ("silu_mul", 4096, 11008, True), ("none", 8192, 4096, False)])
@pytest.mark.parametrize("rows", [1, 8])
def test_cuda_int8_weights_match_the_reference(dtype, pro, n, k, res, rows, monkeypatch):
    """int8 weights on the GPU at the 7B draft's shapes (fc, qkv, down, its 8192-row head), one row (the draft
    step) and 8 (a tree level), through the tuner: within the output dtype's rounding of the fp32 reference."""
    from specee_compile.ops import quantize_rows
    from specee_compile.plugins import triton_gemv as T

    monkeypatch.delenv("SPECEE_GEMV_MAX_ROWS", raising=False)
    monkeypatch.delenv("SPECEE_GEMV_CONFIG", raising=False)
    x, w, r, nw = _inputs(pro, n, k, res, dtype, "cuda", rows, rows=rows)
    q, s = quantize_rows(w)
    ref = fused_linear_reference(x, q, r, nw, 1e-5, pro, s)
    with multi_row_kernel():
        got = T.triton_fused_linear(x, q, r, nw, 1e-5, pro, s)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = (1e-5 if dtype == torch.float32 else 8e-3) * float(ref.float().abs().max())
    assert float((got.float() - ref.float()).abs().max()) <= tol
    assert any("w8" in str(key[2]) for key in T.TUNED)


def test_fp32_rows_kernel_sums_each_k_block_apart():
    """fp32 (IEEE) rows: each K block's dot starts from zero and is added to the total, so the FMA chain is
    BLOCK_K long, not K (one chain over K = 11008 gave 1.9e-6 relative error on the H200 against cuBLAS's
    1.7e-7; per block ~3e-7). Triton folds `acc + dot(a, b)` into dot(a, b, acc): compiled for sm_90 on the
    CPU (no GPU needed), the Triton IR must keep the dot's accumulator a zero constant."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specee_compile.plugins.triton_gemv import _rows_kernel

    sig = {n: "*fp32" for n in ("x_ptr", "w_ptr", "s_ptr", "res_ptr", "nw_ptr", "y_ptr")}
    sig.update(M="i32", N="i32", eps="fp32")
    consts = {"K": 1024, "XS": 2048, "PRO": 2, "HAS_RES": True, "MP": 16, "IEEE": True, "BLOCK_N": 32, "BLOCK_K": 128,
              "W8": False}
    sig.update({k: "constexpr" for k in consts})
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    k = triton.compile(ASTSource(_rows_kernel, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3})
    dots = [line for line in k.asm["ttir"].splitlines() if "tt.dot" in line]
    consts_zero = {line.split("=")[0].strip() for line in k.asm["ttir"].splitlines()
                   if "arith.constant dense<0.000000e+00>" in line}
    assert len(dots) == 1
    acc = dots[0].split("tt.dot")[1].split(":")[0].split(",")[2].strip()
    assert acc in consts_zero, dots[0]


def test_rows_tuner_keeps_cublas_where_it_is_faster(monkeypatch):
    """The rows path times the eager reference (cuBLAS) beside its configs and keeps whichever is fastest per
    (row block, shape): a shape where cuBLAS wins runs the reference, the others the kernel's pick. (Timing
    and launch stubbed: the dispatch logic on the CPU.)"""
    pytest.importorskip("triton")
    from specee_compile.plugins import triton_gemv as T

    launched = []
    monkeypatch.setattr(T, "_rows_launch", lambda args, kw, cfg, w=None: launched.append((cfg, kw["MP"])))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    eager_us = {}

    def fake_graph_us(launch, n, reps=5):
        before = len(launched)
        launch(0)
        if len(launched) == before:  # the eager reference ran
            return eager_us["now"]
        return 2.0 + T.row_candidates(torch.float32, 1, False, 64).index(launched.pop()[0])  # the first: fastest

    monkeypatch.setattr(T, "_graph_us", fake_graph_us)
    T._TUNE_CACHE.clear()
    for us, rows in ((1.0, 3), (9.0, 20)):  # cuBLAS faster for 16-row blocks, slower for 32-row blocks
        eager_us["now"] = us
        x, w, r, nw = _inputs("rmsnorm", 40, 64, True, torch.float32, "cpu", 1, rows=rows)
        y = T._rows_linear(x, w, r, nw, 1e-5, T.PROLOGUES["rmsnorm"], rows)
        assert y.shape == (1, rows, 40)
        if us == 1.0:  # the reference's own result
            assert torch.equal(y, fused_linear_reference(x, w, r, nw, 1e-5, "rmsnorm")) and not launched
    assert T._TUNE_CACHE[("rows", 16, 40, 64, 1, True, torch.float32, torch.device("cpu"), "0")] == T.EAGER
    first = T.row_candidates(torch.float32, 1, False, 64)[0]
    assert T._TUNE_CACHE[("rows", 32, 40, 64, 1, True, torch.float32, torch.device("cpu"), "0")] == first
    assert launched == [(first, 32)]  # the 20-row call ran the kernel's pick
    T._TUNE_CACHE.clear()


def test_multi_row_calls_take_the_rows_kernel_only_inside_its_scope(monkeypatch):
    """More than one row keeps the eager reference (prefill, pending rows: the bits the C++ runner's multi-row
    package computes) except inside `ops.multi_row_kernel()` (the fixed tree program's capture)."""
    pytest.importorskip("triton")
    from specee_compile.ops import multi_row_kernel_on
    from specee_compile.plugins import triton_gemv as T

    calls = []
    monkeypatch.setattr(T, "_rows_linear", lambda x, w, res, nw, eps, pro, rows, w_scale=None: calls.append(rows) or "rows")
    monkeypatch.delenv("SPECEE_GEMV_MAX_ROWS", raising=False)
    x, w, r, nw = _inputs("none", 24, 32, True, torch.float32, "cpu", 2, rows=4)
    assert torch.equal(T.triton_fused_linear(x, w, r, nw, 0.0, "none"), fused_linear_reference(x, w, r, nw, 0.0, "none"))
    assert not multi_row_kernel_on() and not calls
    with multi_row_kernel():
        assert multi_row_kernel_on() and T.triton_fused_linear(x, w, r, nw, 0.0, "none") == "rows"
        with multi_row_kernel():
            pass
        assert multi_row_kernel_on()  # nested scopes restore, not clear
    assert not multi_row_kernel_on() and calls == [4]


def test_max_rows_setting(monkeypatch):
    from specee_compile.plugins import triton_gemv as T

    monkeypatch.delenv("SPECEE_GEMV_MAX_ROWS", raising=False)
    assert T.max_rows() == T.MAX_ROWS == 32
    monkeypatch.setenv("SPECEE_GEMV_MAX_ROWS", "1")
    assert T.max_rows() == 1
    for bad in ("0", "33", "many"):
        monkeypatch.setenv("SPECEE_GEMV_MAX_ROWS", bad)
        with pytest.raises(ValueError, match="SPECEE_GEMV_MAX_ROWS"):
            T.max_rows()
    # a user's error (one line from the CLI, exit 2), found when the kernels register, before any decoding
    from specee_compile.errors import SpecEEError

    with pytest.raises(SpecEEError, match="expected an integer 1..32"):
        T.register_cuda_impl()
    monkeypatch.delenv("SPECEE_GEMV_MAX_ROWS")
    monkeypatch.setenv("SPECEE_GEMV_CONFIG", "8,512")
    with pytest.raises(SpecEEError, match="expected five integers"):
        T.register_cuda_impl()
    assert [T.row_block(n) for n in (2, 16, 17, 32)] == [16, 16, 32, 32]


def test_capture_and_passes_keep_fused_ops(tiny_llama):
    """The Inductor backend's CUDA path traces fused_linear ops through torch.export and the passes;
    on CPU the segmented layer they produce computes what the plain one does."""
    from specee_compile.capture import segment_weights
    from specee_compile.config import Settings
    from specee_compile.model_step import CUDA_FUSED, extract_weights

    W = extract_weights(tiny_llama, 32)
    plain = segment_weights(W, Settings(), num_layers=2)
    fused = segment_weights(W, Settings(), num_layers=2, fused=CUDA_FUSED)
    assert fused.pass_counts["segment_layers"]["uniform_layers"]
    ops = [n.target for n in fused.layers[0].graph.nodes if n.op == "call_function"]
    assert sum(t is torch.ops.specee.fused_linear.default for t in ops) == 4  # qkv, o, gate/up, down
    assert sum(t is torch.ops.specee.decode_attention.default for t in ops) == 1
    assert sum(t is torch.ops.specee.rope_append.default for t in ops) == 1  # RoPE, K/V writes, valid mark
    spec = W.spec
    outs = []
    for seg in (plain, fused):
        kc = torch.zeros(spec.num_kv_heads, 32, spec.head_dim)
        vc = torch.zeros_like(kc)
        valid = torch.zeros(32, dtype=torch.bool)
        torch.manual_seed(0)
        h = torch.randn(1, 3, spec.hidden)
        args = seg.layer_args(W, 0, h, torch.arange(3), torch.empty(32, dtype=torch.int8), valid, kc, vc)
        with torch.no_grad():
            outs.append((seg.layers[0](*args), kc))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_int8_weight_kernels_compile_for_hopper(dt):
    """The W8 paths as the H200 runs them, compiled for sm_90 on the CPU (no GPU needed; the interpreter does not
    type-check a tensor-core dot): the rows kernel's dot of the activation tile and the widened int8 tile lowers to
    MMA instructions; the one-row kernel (split-K, RMSNorm prologue, residual) lowers too."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specee_compile.plugins.triton_gemv import _gemv_kernel, _rows_kernel

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    ptrs = {"x_ptr": f"*{dt}", "w_ptr": "*i8", "s_ptr": "*fp32", "res_ptr": f"*{dt}", "nw_ptr": f"*{dt}",
            "y_ptr": f"*{dt}"}
    target = GPUTarget("cuda", 90, 32)
    consts = {"K": 4096, "XS": 8192, "PRO": 2, "HAS_RES": True, "MP": 16, "IEEE": False, "BLOCK_N": 32,
              "BLOCK_K": 128, "W8": True}
    sig = {**ptrs, "M": "i32", "N": "i32", "eps": "fp32", **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(_rows_kernel, sig, consts, {}), target=target,
                       options={"num_warps": 4, "num_stages": 3})
    assert "mma" in k.asm["ptx"]
    consts = {"K": 4096, "PRO": 1, "HAS_RES": True, "BLOCK_N": 4, "BLOCK_K": 1024, "SPLIT": 4, "W8": True}
    sig = {**ptrs, "ws_ptr": "*fp32", "ss_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "eps": "fp32",
           **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(_gemv_kernel, sig, consts, {}), target=target,
                       options={"num_warps": 8, "num_stages": 1})
    assert "ld.global" in k.asm["ptx"]
