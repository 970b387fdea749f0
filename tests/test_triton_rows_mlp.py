"""`specee::rows_mlp` (plugins/triton_rows_mlp.py): the layer's half after attention for a few rows as one persistent
kernel. The math against the eager reference in the Triton interpreter (three phase launches, and one grid of one
program through its barriers), its configs compiled for Hopper on the CPU, and on CUDA the grid with its barriers,
in CUDA graphs, and the fixed tree program with the form on."""

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

from specee_compile.model_step import make_layer_fn, rows_fused, step_spec
from specee_compile.ops import rows_mlp_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")


def _inputs(rows, D, KO, I, dtype, device="cpu", seed=0):
    """(a, h, wo, ln2, wgu, wd) of one layer (the interpreter's subprocess runs this function's source too)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    return (r(1, rows, KO), r(1, rows, D), r(D, KO, scale=KO ** -0.5), 1 + r(D, scale=0.1),
            r(2 * I, D, scale=D ** -0.5), r(D, I, scale=I ** -0.5))


def test_reference_is_the_matmul_forms_math(tiny_llama):
    """The op's reference is what the "matmul" form writes out (o-projection residual, RMSNorm, gate/up, SiLU x up,
    down residual), bit for bit; the op on the CPU runs it."""
    from specee_compile.model_step import make_layer_parts

    spec = step_spec(tiny_llama.config, 64)
    *_, out_mlp = make_layer_parts(spec, fused=("attn", "matmul"))
    D, I = spec.hidden, tiny_llama.config.intermediate_size
    a, h, wo, ln2, wgu, wd = _inputs(7, D, D, I, torch.float32)
    want = out_mlp(h, a, wo, ln2, wgu, wd)
    assert torch.equal(rows_mlp_reference(a, h, wo, ln2, wgu, wd, spec.eps), want)
    assert torch.equal(torch.ops.specee.rows_mlp(a, h, wo, ln2, wgu, wd, spec.eps), want)


def test_mlp_form_takes_float_weights_and_leaves_int8_to_the_matmul_form(tiny_llama):
    """`SPECEE_TREE_LINEARS=mlp`'s layer: the op where the weights are float; an int8 draft's pairs take the "matmul"
    form's ops; the C++ runner's op namespace has no twin and is refused."""
    from specee_compile.model_step import ROWS_MLP, make_layer_parts
    from specee_compile.ops import quantize_rows

    spec = step_spec(tiny_llama.config, 64)
    calls = []
    real = torch.ops.specee.rows_mlp

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    *_, out_mlp = make_layer_parts(spec, fused=ROWS_MLP)
    D, I = spec.hidden, tiny_llama.config.intermediate_size
    a, h, wo, ln2, wgu, wd = _inputs(5, D, D, I, torch.float32)
    import specee_compile.model_step as ms

    orig = ms._fused_op
    try:
        ms._fused_op = lambda ns, name: Spy() if name == "rows_mlp" else orig(ns, name)
        *_, out_mlp = make_layer_parts(spec, fused=ROWS_MLP)
        out_mlp(h, a, wo, ln2, wgu, wd)
        assert len(calls) == 1
        out_mlp(h, a, quantize_rows(wo), ln2, quantize_rows(wgu), quantize_rows(wd))
        assert len(calls) == 1
    finally:
        ms._fused_op = orig
    with pytest.raises(ValueError, match="no specee_aoti twin"):
        make_layer_parts(spec, fused=ROWS_MLP, ops="specee_aoti")


def test_rows_fused_mlp_override(monkeypatch):
    from specee_compile.model_step import ROWS_MLP

    monkeypatch.setenv("SPECEE_TREE_LINEARS", "mlp")
    assert rows_fused(torch.float32) == rows_fused(torch.float16) == ROWS_MLP == ("attn", "matmul", "mlp")


def test_mlp_form_layer_with_tree_mask_equals_plain_layer_on_cpu(tiny_llama):
    """The tree verification's call through the "mlp" form's layer (the op's CPU reference) computes what the plain
    layer does, bit for bit."""
    from specee_compile.model_step import ROWS_MLP, extract_weights

    W = extract_weights(tiny_llama, 64)
    spec = step_spec(tiny_llama.config, 64)
    L, Hkv, hd = spec.num_layers, spec.num_kv_heads, spec.head_dim
    torch.manual_seed(5)
    h0 = torch.randn(1, 6, spec.hidden)
    pos = torch.tensor([20, 21, 21, 22, 22, 22])
    slots = torch.arange(20, 26)
    mask = torch.rand(6, 32) < 0.5
    mask[torch.arange(6), slots] = True
    outs = []
    for fn in (make_layer_fn(spec), make_layer_fn(spec, fused=ROWS_MLP)):
        kc = torch.randn(L, Hkv, 64, hd, generator=torch.Generator().manual_seed(1))
        vc = torch.randn(L, Hkv, 64, hd, generator=torch.Generator().manual_seed(2))
        valid = torch.ones(L, 64, dtype=torch.bool)
        x = h0
        with torch.no_grad():
            for i in range(L):
                x = fn(x, pos, valid[i], W.cos, W.sin, kc[i], vc[i], 32, *W.layers[i].as_tuple(), slots=slots,
                       mask=mask)
        outs.append(x)
    assert torch.equal(*outs)


_INTERP = textwrap.dedent(
    """
    import torch
    from specee_compile.ops import rows_mlp_reference
    from specee_compile.plugins import triton_rows_mlp as M
    # (the inputs)
    # shapes no block divides (D 48, KO 40, I 72); 5 rows (a 16-row block) and 25 (32); split-K 1 and 3
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):  # (the interpreter's bf16 rounding is not RTNE)
        for rows in (5, 25):
            a, h, wo, ln2, wgu, wd = _inputs(rows, 48, 40, 72, dt, seed=rows)
            want = rows_mlp_reference(a, h, wo, ln2, wgu, wd, 1e-5)
            for cfg in ((16, 32, 16, 1, 4, 2), (16, 32, 16, 3, 4, 2), (32, 16, 32, 2, 4, 2)):
                for phased, p in ((True, None), (False, 1)):
                    outs = [M.launch(cfg, a, h, wo, ln2, wgu, wd, 1e-5, phased=phased, n_programs=p) for _ in range(2)]
                    torch.testing.assert_close(outs[0], want, rtol=tol, atol=tol)
                    # the second call reads the scratch and counters the first left: the same bits
                    assert torch.equal(outs[0], outs[1]), (dt, rows, cfg, phased)
            _, _, _, _, bar = M._workspace(h.device, dt, rows, M.rows_block(rows), 48, 72, 2)
            assert bar.tolist() == [0, 0]  # the barrier's counters left at zero
    print("INTERP_OK")
    """
)


def test_kernel_computes_the_reference_in_triton_interpreter():
    """Every phase's tiles, the split-K parts summed in split order, the norm's statistics from all of h1, the
    rounding of each step; three launches (the phases) and one program through the grid barriers; twice in a row,
    the same bits (the scratch and counters are left as found)."""
    import inspect

    run_in_triton_interpreter(_INTERP.replace("# (the inputs)", inspect.getsource(_inputs)))


def _for_hopper(t: str, shape, cfg, rows_block=32):
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specee_compile.plugins.triton_rows_mlp import _rows_mlp_kernel

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    D, KO, I = shape
    bn, bk, bj, split, nwarps, ns = cfg
    ptrs = {k: t for k in ("a_ptr", "h_ptr", "wo_ptr", "ln_ptr", "wgu_ptr", "wd_ptr", "h1_ptr", "act_ptr", "out_ptr")}
    ptrs.update(ws_ptr="*fp32", cnt_ptr="*i32", bar_ptr="*i32")
    consts = {"D": D, "KO": KO, "I": I, "MP": rows_block, "BN": bn, "BK": bk, "BJ": bj, "SPLIT": split, "PHASE": 0,
              "PREC": "tf32x3" if t == "*fp32" else "", "PDL": True}
    sig = {**ptrs, "M": "i32", "eps": "fp32", **{k: "constexpr" for k in consts}}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
    return triton.compile(ASTSource(_rows_mlp_kernel, sig, consts, aligned), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": nwarps, "num_stages": ns})


def test_every_config_compiles_for_hopper_within_its_shared_memory():
    """Each tuner config, compiled for sm_90 on the CPU at the shapes it is for (SmolLM2's fp32 layer, 7B's fp16
    one): within Hopper's 227 KB of shared memory per program (one program per SM is all the grid needs), the weight
    tiles on cp.async stages, tensor-core MMAs (a warpgroup MMA for 64-feature 16-bit tiles), the barriers' atomics,
    and the PDL wait and release."""
    from specee_compile.plugins.triton_rows_mlp import CONFIGS, CONFIGS_F32

    for t, shape, cfgs in (("*fp32", (576, 576, 1536), CONFIGS_F32), ("*fp16", (4096, 4096, 11008), CONFIGS)):
        for cfg in cfgs:
            k = _for_hopper(t, shape, cfg)
            ptx = k.asm["ptx"]
            assert k.metadata.shared <= 227 * 1024, (cfg, k.metadata.shared)
            assert "cp.async" in ptx and "atom." in ptx and ptx.count("griddepcontrol") == 2, cfg
            assert ("wgmma" in ptx) if t == "*fp16" else ("mma.sync" in ptx and ".tf32" in ptx), cfg


def test_programs_never_exceed_the_tiles():
    from specee_compile.plugins.triton_rows_mlp import programs

    cpu = torch.device("cpu")
    assert programs((16, 64, 16, 1, 4, 3), 576, 1536, cpu) == 96  # gate/up: 1536 / 16 tiles
    assert programs((16, 64, 16, 4, 4, 3), 576, 576, cpu) == 144  # down: 36 feature tiles x 4 splits


@cuda
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (576, 576, 1536)), (torch.float16, (4096, 4096, 11008)),
                                         (torch.bfloat16, (1024, 2048, 2816))])
@pytest.mark.parametrize("rows", [8, 25])
def test_cuda_every_config_through_its_barriers_in_a_graph(dtype, shape, rows):
    """Each config as the product launches it (P programs, barriers, PDL where on), captured in a CUDA graph and
    replayed: the reference's values, the same bits every replay (the counters reset), the scratch shared."""
    from specee_compile.plugins import triton_rows_mlp as M

    D, KO, I = shape
    a, h, wo, ln2, wgu, wd = _inputs(rows, D, KO, I, dtype, "cuda", seed=rows)
    want = rows_mlp_reference(*(t.float() for t in (a, h, wo, ln2, wgu, wd)), 1e-5)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for cfg in M.configs(dtype):
        first = M.launch(cfg, a, h, wo, ln2, wgu, wd, 1e-5)  # compiles, makes the scratch
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = M.launch(cfg, a, h, wo, ln2, wgu, wd, 1e-5)
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, first), cfg
        torch.testing.assert_close(first.float(), want, rtol=tol, atol=tol)


@cuda
def test_cuda_op_tunes_and_dispatches_inside_multi_row_kernel():
    from specee_compile.ops import multi_row_kernel, register_cuda_kernels
    from specee_compile.plugins import triton_rows_mlp as M

    assert register_cuda_kernels()
    args = _inputs(25, 576, 576, 1536, torch.float32, "cuda", seed=3)
    want = rows_mlp_reference(*args, 1e-5)
    with multi_row_kernel():
        got = torch.ops.specee.rows_mlp(*args, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (576, 576, 1536, 32, "float32") in M.TUNED


@cuda
@pytest.mark.parametrize("quant", [None, "int8"])
def test_cuda_fixed_tree_with_the_mlp_form_equals_dense(monkeypatch, quant):
    """SPECEE_TREE_LINEARS=mlp: the captured fixed tree program's verification and draft levels through the op
    (float weights; an int8 draft's levels keep the matmul form): dense greedy's tokens and the host step's."""
    from test_tree import PROMPT, _fixed_vs_host, dense, make_tiny_llama

    monkeypatch.setenv("SPECEE_TREE_LINEARS", "mlp")
    model = make_tiny_llama()
    ref = dense(model, PROMPT, 40, device="cuda", backend="inductor")
    out = _fixed_vs_host(model, device="cuda", backend="inductor", quant=quant, tree_budget=12, tree_depth=4,
                         tree_topk=4)
    (host, _), (fixed, dec) = out["host"], out["fixed"]
    assert dec.tree._fixed_on and dec.tree.fixed.programs
    assert fixed.token_ids == ref.token_ids == host.token_ids
