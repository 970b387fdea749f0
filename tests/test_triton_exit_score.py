"""The fused Triton exit kernel against the eager `specee::exit_score` reference.

GPU tests skip without CUDA (CI has none); the AOT PTX test runs wherever triton imports; the
interpreter test runs the same kernel on the CPU through TRITON_INTERPRET=1 (in a subprocess, since
the variable must be set before triton is imported).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

from specee_compile.ops import exit_score_reference

triton = pytest.importorskip("triton", reason="triton is not installed")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def inputs(D, k, dtype, device, seed, hm=512):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        h=(r(1, 1, D) * 2).to(dtype).to(device),
        norm_w=(1 + 0.1 * r(D)).to(dtype).to(device),
        rows=(r(k, D) * 0.05).to(dtype).to(device),
        p_prev=torch.softmax(r(k), 0).to(device),
        w1=(r(hm, 3 * k) * 0.3).to(device),
        b1=(r(hm) * 0.1).to(device),
        w2=(r(hm) * 0.1).to(device),
        b2=r(1).to(device),
        eps=1e-5,
    )


# fp32 math everywhere; bf16/fp16 inputs: only the HF rounding of the normed state can differ by an ulp
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D,k", [(4096, 4), (576, 4), (576, 3), (1000, 5)])
def test_cuda_kernel_matches_eager(dtype, D, k):
    from specee_compile.plugins.triton_exit_score import triton_exit_score

    for seed in range(3):  # fresh inputs each time
        a = inputs(D, k, dtype, "cuda", seed=1000 * D + 10 * k + seed)
        ref = exit_score_reference(**a)
        out = triton_exit_score(**a)
        for o, r_ in zip(out, ref):
            assert o.dtype == torch.float32 and o.shape == r_.shape
            assert torch.isfinite(o).all()
            assert rel(o, r_) < TOL[dtype], (dtype, D, k, rel(o, r_))


@cuda
def test_registered_as_cuda_impl_of_the_op():
    from specee_compile.ops import exit_score
    from specee_compile.plugins import triton_exit_score as T

    assert T.register_cuda_impl()
    a = inputs(4096, 4, torch.float16, "cuda", seed=7)
    out = exit_score(**a)
    fused = T.triton_exit_score(**a)
    for o, f in zip(out, fused):
        assert torch.equal(o, f)  # the op now runs the fused kernel on CUDA
    cpu = exit_score(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in a.items()})
    for o, c in zip(out, cpu):  # CPU still runs the eager reference
        assert rel(o.cpu(), c) < 1e-3


@cuda
@pytest.mark.parametrize("forced", [True, False])
@pytest.mark.parametrize("host_ctrl", [False, True])
def test_cuda_decide_epilogue(forced, host_ctrl):
    from specee_compile.plugins.triton_exit_score import triton_exit_decide

    a = inputs(4096, 4, torch.float16, "cuda", seed=11)
    ref_score, _, ref_p = exit_score_reference(**a)
    for layer, should in [(5, False), (9, True), (12, True)]:
        # alive starts at 2 ("pending"): the kernel always writes 0 (exit) or 1; a host-mapped (pinned)
        # control block is read and written by the kernel directly
        ctrl = torch.tensor([2, 0, 9, 31], dtype=torch.uint8)
        ctrl = ctrl.pin_memory() if host_ctrl else ctrl.cuda()
        hexit = torch.full((4096,), float("nan"), dtype=torch.float16, device="cuda")
        score = torch.full((1,), float("nan"), device="cuda")
        z = torch.full((4,), float("nan"), device="cuda")
        p_prev = a["p_prev"].clone()
        thr = (float(ref_score) - 1e-3) if should else (float(ref_score) + 1e-3)
        args = {**a, "p_prev": p_prev}
        triton_exit_decide(**args, layer=layer, ctrl=ctrl, hexit=hexit, score=score, z=z, threshold=thr,
                           forced=forced, alive_off=0, forced_off=2, exit_off=3)
        exits = should  # forced: layer >= 9; threshold: set just below / above the score
        torch.cuda.synchronize()
        assert ctrl.tolist() == ([0, 0, 9, layer] if exits else [1, 0, 9, 31])
        assert rel(score, ref_score) < 1e-3 and rel(p_prev, ref_p) < 1e-3
        if exits:
            assert torch.equal(hexit, a["h"].reshape(-1))
        else:
            assert torch.isnan(hexit).all()


def test_torch_decide_reference_semantics():
    from specee_compile.plugins.triton_exit_score import torch_exit_decide

    a = inputs(64, 4, torch.float32, "cpu", seed=3)
    ref_score, ref_z, ref_p = exit_score_reference(**a)
    for layer, exits in [(5, False), (9, True), (12, True)]:  # forced: the first evaluated layer >= 9
        ctrl = torch.tensor([2, 0, 9, 31], dtype=torch.uint8)
        hexit = torch.zeros(64)
        score, z, p_prev = torch.empty(1), torch.empty(4), a["p_prev"].clone()
        torch_exit_decide(**{**a, "p_prev": p_prev}, layer=layer, ctrl=ctrl, hexit=hexit, score=score, z=z,
                          forced=True, alive_off=0, forced_off=2, exit_off=3)
        assert ctrl.tolist() == ([0, 0, 9, layer] if exits else [1, 0, 9, 31])
        assert torch.allclose(score, ref_score) and torch.allclose(z, ref_z) and torch.allclose(p_prev, ref_p)
        assert torch.equal(hexit, a["h"].reshape(-1)) == exits


def test_aot_ptx_for_hopper_without_gpu():
    from specee_compile.plugins.triton_exit_score import compile_ptx, kernel_name

    try:
        ptx = compile_ptx(target=(90, 32))
    except Exception as e:  # noqa: BLE001  # pragma: no cover - depends on the local triton build
        pytest.skip(f"triton cannot compile for sm_90 here: {type(e).__name__}: {e}")
    assert ".target sm_90" in ptx
    assert f".entry {kernel_name()}(" in ptx
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx  # aligned, vectorised loads


_INTERP = textwrap.dedent(
    """
    import torch
    from specee_compile.ops import exit_score_reference
    from specee_compile.plugins.triton_exit_score import triton_exit_score, triton_exit_decide
    torch.manual_seed(0)
    for dt in (torch.float16, torch.float32):  # the interpreter's own bf16 rounding is not RTNE
        for D, k in ((4096, 4), (576, 3)):
            h = (torch.randn(1, 1, D) * 3).to(dt)
            nw = (1 + 0.1 * torch.randn(D)).to(dt)
            rows = (torch.randn(k, D) * 0.05).to(dt)
            pp = torch.softmax(torch.randn(k), 0)
            w1, b1 = torch.randn(512, 3 * k) * 0.3, torch.randn(512) * 0.1
            w2, b2 = torch.randn(512) * 0.1, torch.randn(1)
            ref = exit_score_reference(h, nw, rows, pp, w1, b1, w2, b2, 1e-5)
            out = triton_exit_score(h, nw, rows, pp, w1, b1, w2, b2, 1e-5)
            for o, r in zip(out, ref):
                e = float((o - r).norm() / r.norm())
                assert e < 1e-5, (dt, D, k, e)
            ctrl = torch.tensor([1, 0, 7, 31], dtype=torch.uint8)
            hexit = torch.zeros(D, dtype=dt)
            p2 = pp.clone()
            triton_exit_decide(h, nw, rows, p2, w1, b1, w2, b2, 1e-5, layer=7, ctrl=ctrl, hexit=hexit,
                               score=torch.empty(1), z=torch.empty(k), forced=True, alive_off=0,
                               forced_off=2, exit_off=3)
            assert ctrl.tolist() == [0, 0, 7, 7]
            assert torch.equal(hexit, h.reshape(-1))
            assert torch.allclose(p2, ref[2], atol=1e-6)
    print("INTERP_OK")
    """
)


def test_kernel_logic_in_triton_interpreter_on_cpu():
    run_in_triton_interpreter(_INTERP)