"""The `specee::fused_linear` op as one Triton GEMV kernel per call (CUDA, one row: the decode step).

A decode step at batch 1 is four weight-streaming GEMVs per layer. Inductor's own reductions reach
~3.0 TB/s on the H100 for gate+up but only 2.3 for the down projection (each of its per-row programs
re-reads the 2 x 11008 gate/up activations, so L2 traffic is twice the weight traffic) and 2.5-2.75
for o-proj and qkv; RMSNorm statistics add one small kernel before each normed GEMV. This kernel
fuses the prologue and epilogue into the weight stream:

    prologue  none       a = x
              rmsnorm    a = norm_w * (x * rsqrt(mean(x^2) + eps))     (statistics recomputed per
                                                                        program: 8 KB from L2)
              silu_mul   a = silu(x[:K]) * x[K:]                      (x = fused gate|up output)
    body      y[n] = sum_k W[n, k] a[k]                               (fp32 accumulation)
    epilogue  y += res                                                (residual), one store

Rounding follows the eager math in the input dtype (HF RMSNorm: statistics in fp32, `(x * rs)` and
`w * .` rounded to the half dtype; `silu` and `* up` rounded; the linear's output rounded before the
residual add), so the kernel differs from the eager op by accumulation order only.

Each program owns BLOCK_N output rows and streams them over K in BLOCK_K chunks; the activation
chunk is recomputed per program (it is BLOCK_N times smaller than the weight tile). The configs are
autotuned per (N, K, prologue) on first use, which happens outside CUDA-graph capture in every
caller (warm-up runs); `TUNED` holds what was picked, for the benchmark record.
`SPECEE_GEMV_CONFIG=BLOCK_N,BLOCK_K,num_warps,num_stages` pins one config instead.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - triton absent or broken
    triton = None
    tl = None
    HAVE_TRITON = False

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}

# (BLOCK_N, BLOCK_K, num_warps, num_stages); the autotuner keeps the fastest per shape
CONFIGS = [
    (4, 512, 4, 1),
    (8, 256, 4, 1),
    (8, 512, 4, 1),
    (8, 512, 8, 1),
    (16, 256, 4, 1),
    (16, 256, 8, 1),
    (16, 512, 8, 1),
    (32, 256, 8, 1),
    (8, 256, 4, 3),
    (16, 256, 4, 3),
]

TUNED: dict = {}  # (N, K, prologue) -> config string, filled on first use

if HAVE_TRITON:

    def _configs():
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
            for bn, bk, nw, ns in CONFIGS
        ]

    @triton.jit
    def _round(x, DT: tl.constexpr):
        # the eager op's rounding to the activation dtype (no-op for fp32)
        return x.to(DT, fp_downcast_rounding="rtne").to(tl.float32)

    def _bench(kernel_call, quantiles):  # short runs (L2 flushed between them by do_bench)
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, res_ptr, nw_ptr, y_ptr,
        N, eps, K: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        DT: tl.constexpr = y_ptr.dtype.element_ty
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wrow = w_ptr + rows.to(tl.int64)[:, None] * K
        if PRO == 1:  # RMSNorm statistics of x (fp32)
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
                sq += xv * xv
            rs = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            km = offs < K
            if PRO == 0:
                a = tl.load(x_ptr + offs, mask=km, other=0.0).to(tl.float32)
            elif PRO == 1:
                xv = tl.load(x_ptr + offs, mask=km, other=0.0).to(tl.float32)
                a = _round(xv * rs, DT) * tl.load(nw_ptr + offs, mask=km, other=0.0).to(tl.float32)
                a = _round(a, DT)
            else:
                g = tl.load(x_ptr + offs, mask=km, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + offs, mask=km, other=0.0).to(tl.float32)
                a = _round(_round(g / (1.0 + tl.exp(-g)), DT) * u, DT)
            wt = tl.load(wrow + offs[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            acc += wt.to(tl.float32) * a[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_RES:
            y = _round(y, DT) + tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(DT), mask=rmask)

    _gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "PRO"], do_bench=_bench)(_gemv_kernel)


def triton_fused_linear(x, w, res=None, norm_w=None, eps: float = 0.0, prologue: str = "none"):
    """The fused GEMV for one row (x [..., 1, K or 2K]); more rows (prefill, pending rows) take the
    eager reference (cuBLAS), which is the faster path there."""
    from ..ops import fused_linear_reference

    rows = x.numel() // x.shape[-1]
    if rows != 1 or not HAVE_TRITON or x.dtype != w.dtype:
        return fused_linear_reference(x, w, res, norm_w, eps, prologue)
    pro = PROLOGUES[prologue]
    N, K = w.shape
    if x.shape[-1] != (2 * K if pro == 2 else K):
        raise ValueError(f"fused_linear: x has {x.shape[-1]} features; weight {tuple(w.shape)} with "
                         f"prologue {prologue!r} needs {2 * K if pro == 2 else K}")
    x = x.contiguous()
    w = w.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    res_t = res.contiguous() if res is not None else y
    nw = norm_w.contiguous() if norm_w is not None else x
    args = (x, w, res_t, nw, y, N, float(eps))
    fixed = _fixed_config()
    if fixed is not None:
        bn, bk, nw_, ns = fixed
        _gemv_kernel[(triton.cdiv(N, bn),)](*args, K=K, PRO=pro, HAS_RES=res is not None, BLOCK_N=bn, BLOCK_K=bk,
                                            num_warps=nw_, num_stages=ns)
        return y
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_tuned[grid](*args, K=K, PRO=pro, HAS_RES=res is not None)
    key = (N, K, prologue)
    if key not in TUNED and getattr(_gemv_tuned, "best_config", None) is not None:
        TUNED[key] = str(_gemv_tuned.best_config)
    return y


def _fixed_config():
    """SPECEE_GEMV_CONFIG="BLOCK_N,BLOCK_K,num_warps,num_stages" skips autotuning (tests, reproductions)."""
    v = os.environ.get("SPECEE_GEMV_CONFIG")
    if not v:
        return None
    try:
        bn, bk, nw, ns = (int(t) for t in v.split(","))
    except ValueError:
        raise ValueError(f"SPECEE_GEMV_CONFIG={v!r}: expected four integers BLOCK_N,BLOCK_K,num_warps,num_stages") from None
    return bn, bk, nw, ns


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::fused_linear`. Idempotent; False (nothing
    registered) where triton is missing."""
    global _REGISTERED
    if not HAVE_TRITON:
        return False
    if not _REGISTERED:
        from .. import ops  # noqa: F401  # defines the op

        torch.library.register_kernel("specee::fused_linear", "cuda", triton_fused_linear)
        _REGISTERED = True
    return True


_REGISTERED = False
