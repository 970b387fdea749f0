"""`specee::tree_attention` (a few rows under an explicit [q, S] mask: tree verification and the draft tree's
levels) against SDPA, on CPU (reference, the Triton kernel in the interpreter) and on CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

from specee_compile.ops import tree_attention_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")


def _inputs(H, Hkv, S, rows, hd, dtype, device, seed):
    """q [H, rows, hd]; k, v views [Hkv, S, hd] of a longer cache; valid with holes; a tree mask: every row
    sees a committed prefix and a random subset of the tree slots that always holds its own slot."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, rows, hd, generator=g).to(dtype).to(device)
    kc = torch.randn(Hkv, S + 16, hd, generator=g).to(dtype).to(device)
    vc = torch.randn(Hkv, S + 16, hd, generator=g).to(dtype).to(device)
    p = S - rows - 3  # committed prefix; tree slots p .. p + rows - 1; stale keys after them
    valid = torch.rand(S, generator=g) < 0.8
    valid[p : p + rows] = True
    mask = torch.zeros(rows, S, dtype=torch.bool)
    mask[:, :p] = True
    mask[:, p : p + rows] = torch.rand(rows, rows, generator=g) < 0.4
    mask[torch.arange(rows), p + torch.arange(rows)] = True
    return q, kc[:, :S], vc[:, :S], valid.to(device), mask.to(device)


def test_reference_attends_to_valid_keys_the_mask_allows():
    q, k, v, valid, mask = _inputs(4, 2, 40, 5, 8, torch.float32, "cpu", 0)
    out = tree_attention_reference(q, k, v, valid, mask)
    kk, vv = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    for r in range(5):
        keep = valid & mask[r]
        want = torch.softmax(q[:, r : r + 1] @ kk[:, keep].transpose(1, 2) / 8**0.5, -1) @ vv[:, keep]
        assert torch.allclose(out[:, r : r + 1], want, atol=1e-5)


def test_op_equals_the_reference_on_cpu_laid_out_rows_major():
    """The op's output [H, q, hd] sits in memory as [q, H, hd] (so is its fake's, which Inductor plans with):
    the layer's `a.transpose(0, 1).reshape(1, q, H * hd)` is a view, no copy kernel."""
    a = _inputs(3, 1, 64, 7, 16, torch.float32, "cpu", 1)
    out = torch.ops.specee.tree_attention(*a)
    assert torch.equal(out, tree_attention_reference(*a)) and out.transpose(0, 1).is_contiguous()
    flat = out.transpose(0, 1).reshape(1, 7, 3 * 16)
    assert flat.data_ptr() == out.data_ptr()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.specee.tree_attention(*(mode.from_tensor(t) for t in a))
    assert fake.shape == out.shape and fake.stride() == out.stride()


_INTERP = textwrap.dedent(
    """
    import torch
    from specee_compile.ops import tree_attention_reference as ref
    from specee_compile.plugins import triton_tree_attention as A
    # rows: one row block of 16, a padded one, two blocks (40 > 32); S: one split, several; GQA and not
    for H, Hkv, S, rows, hd in ((4, 4, 64, 5, 16), (4, 2, 200, 25, 32), (2, 1, 130, 40, 16), (3, 3, 90, 1, 16)):
        for bs, maxs in ((16, 4), (64, 8)):  # several blocks per split; one block per split
            A.BLOCK_S, A.MAX_SPLITS = bs, maxs
            A._WORKSPACES.clear()
            for seed in range(2):  # a second call: the counters were reset by the merge
                a = _inputs(H, Hkv, S, rows, hd, torch.float32, "cpu", seed)
                out = A.triton_tree_attention(*a)
                e = float((out - ref(*a)).abs().max())
                assert out.shape == (H, rows, hd) and e < 1e-5, (H, Hkv, S, rows, bs, e)
                assert out.transpose(0, 1).is_contiguous()  # rows-major, as the op's fake
                for ws, cnt in A._WORKSPACES.values():
                    assert int(cnt.abs().sum()) == 0
            # q as a transposed view (the layer's rope output may be one): read by strides
            q, k, v, valid, mask = a
            qt = q.transpose(0, 1).contiguous().transpose(0, 1)
            assert torch.equal(A.triton_tree_attention(qt, k, v, valid, mask), out)
            # fp32's 3xTF32 configs take the same path (the interpreter's dot is exact whatever the precision)
            got = A._launch((bs, maxs, 4, 1, "tf32x3"), *a)
            assert float((got - ref(*a)).abs().max()) < 1e-5
    print("INTERP_OK")
    """
)


def test_kernel_logic_in_triton_interpreter_on_cpu():
    """The kernel against SDPA: row blocks (padded, several), splits (one, several, merged by the last
    arrival), GQA, strided q; its counters back at zero after every call."""
    import inspect

    run_in_triton_interpreter(inspect.getsource(_inputs) + _INTERP)


def test_fp32_tf32x3_configs_compile_to_tensor_core_mma_for_hopper():
    """Compiled for sm_90 on the CPU at SmolLM2's tree shape (9 heads over 3, 25 rows in a block of 32, hd 64):
    every 3xTF32 config fits a Hopper program's shared memory and takes TF32 MMAs, three per product where one
    TF32 pass takes one; the IEEE configs take none (CUDA-core FMAs)."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from specee_compile.plugins import triton_tree_attention as A

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    f = "*fp32"
    ptrs = {"q_ptr": f, "k_ptr": f, "v_ptr": f, "valid_ptr": "*u8", "mask_ptr": "*u8", "o_ptr": f, "ws_ptr": f,
            "cnt_ptr": "*i32"}
    ints = ("R", "S", "sm_scale", "stride_qh", "stride_qr", "stride_kh", "stride_ks", "stride_vh", "stride_vs",
            "stride_mr", "stride_ms")

    def compiled(block_s, splits, warps, stages, prec):
        br, _, nsp, per = A.plan(25, 256, block_s, splits)
        consts = {"HD": 64, "REP": 3, "BR": br, "BLOCK_S": block_s, "PER": per, "NSP": nsp, "PREC": prec,
                  "PDL": True}
        sig = {**ptrs, **{n: "fp32" if n == "sm_scale" else "i32" for n in ints}, **{k: "constexpr" for k in consts}}
        return triton.compile(ASTSource(A._tree_attn_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})

    def mmas(ptx: str) -> int:
        return ptx.count("mma.sync") + ptx.count("wgmma.mma_async")

    for *cfg, prec in A.CONFIGS_F32_TF32X3:
        c = compiled(*cfg, prec)
        one = mmas(compiled(*cfg, "tf32").asm["ptx"])
        assert c.metadata.shared <= 227 * 1024 and ".tf32" in c.asm["ptx"], cfg
        assert one > 0 and mmas(c.asm["ptx"]) == 3 * one, (cfg, one)
    assert A.configs(torch.float32)[: len(A.CONFIGS)] == list(A.CONFIGS)
    assert set(A.configs(torch.float16)) == set(A.CONFIGS)
    assert mmas(compiled(*A.CONFIGS[0], "ieee").asm["ptx"]) == 0


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,Hkv,S,rows,hd", [(32, 32, 256, 25, 128), (9, 3, 128, 25, 64), (32, 32, 256, 8, 128),
                                             (8, 2, 4096, 40, 128)])
def test_cuda_kernel_matches_sdpa(dtype, H, Hkv, S, rows, hd):
    from specee_compile.plugins.triton_tree_attention import triton_tree_attention

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for seed in range(3):  # repeated calls: the merge counters reset themselves
        a = _inputs(H, Hkv, S, rows, hd, dtype, "cuda", seed)
        got = triton_tree_attention(*a)
        want = tree_attention_reference(*[t.float() if t.is_floating_point() else t for t in a])
        assert got.dtype == dtype and got.shape == (H, rows, hd)
        assert float((got.float() - want).abs().max()) < tol


@cuda
def test_registered_op_dispatches_to_the_kernel():
    from specee_compile.ops import register_cuda_kernels
    from specee_compile.plugins.triton_tree_attention import triton_tree_attention

    assert register_cuda_kernels()
    a = _inputs(8, 8, 128, 9, 64, torch.float16, "cuda", 4)
    assert torch.equal(torch.ops.specee.tree_attention(*a), triton_tree_attention(*a))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_every_tuner_config_matches_sdpa(dtype):
    """Every config the tuner may pick (split and unsplit, several block sizes) gives SDPA's rows, the tuner
    picks one of them or the reference, and the op then runs the pick."""
    from specee_compile.plugins import triton_tree_attention as A

    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    a = _inputs(32, 32, 320, 25, 128, dtype, "cuda", 5)
    want = tree_attention_reference(*[t.float() if t.is_floating_point() else t for t in a])
    from triton.runtime.errors import OutOfResources

    ran = 0
    for cfg in A.configs(dtype):
        for _ in range(2):  # the counters reset themselves
            try:
                got = A._launch(cfg, *a)
            except OutOfResources:  # a config this card cannot launch at this dtype: the tuner skips it too
                break
            assert float((got.float() - want).abs().max()) < tol, cfg
            ran += 1
    assert ran >= len(A.CONFIGS), ran  # at least half the configs ran (twice each)
    got = A.triton_tree_attention(*a)
    pick = A._TUNE_CACHE[(32, 32, 25, 320, 128, dtype, a[0].device, A.pdl.mode())]
    assert pick == A.EAGER or pick in A.configs(dtype)
    assert float((got.float() - want).abs().max()) < tol
