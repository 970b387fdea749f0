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

Rounding: SiLU and `* up` are rounded to the input dtype as the eager ops round, and the linear's
output is rounded before the residual add. RMSNorm runs in one pass: norm_w * x enters the sum in
fp32 and the scalar 1/rms multiplies the fp32 total, instead of HF's two roundings of the normed
vector to the half dtype, so it is slightly more exact than the eager op, not bit-equal (the tests
bound its error against float64 by the eager op's own).

Each program owns BLOCK_N output rows and streams them over K (or over 1/SPLIT of K: split-K, where
the partial sums meet in an fp32 workspace and the last-arriving program finishes the rows) in
BLOCK_K chunks; the activation chunk is recomputed per program. The configs are
autotuned per (N, K, prologue) on first use, which happens outside CUDA-graph capture in every
caller (warm-up runs); `TUNED` holds what was picked, for the benchmark record.
`SPECEE_GEMV_CONFIG=BLOCK_N,BLOCK_K,SPLIT,num_warps,num_stages` pins one config instead.

`specee_aoti::fused_linear` is the same kernel for AOTInductor packages (the C++ runner's one-row layer,
`backends/aoti_export.py`): a `torch.library.triton_op`, which an AOTI package embeds (a Python custom op
it cannot call), launched whole-K with the config `tune_for_aoti` picked for its shape in the exporting
process (the Python op's own pick where that is whole-K, so the package computes the same bits).
"""

from __future__ import annotations

import os

import torch

from . import HAVE_TRITON, register_kernel, tl, triton

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}

# (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages); the autotuner keeps the fastest per shape. Few
# output rows over a long K (the down projection: 4096 x 11008) leave too few programs to keep enough
# bytes in flight; wide BLOCK_K and split-K are the two answers to that, both in the search.
CONFIGS = [
    (8, 512, 1, 4, 1),
    (4, 512, 1, 4, 1),
    (4, 1024, 1, 4, 1),
    (4, 1024, 1, 8, 1),
    (4, 2048, 1, 8, 1),
    (2, 1024, 1, 4, 1),
    (2, 2048, 1, 8, 1),
    (1, 4096, 1, 8, 1),
    (2, 4096, 1, 8, 1),
    (2, 4096, 1, 16, 1),
    (4, 4096, 1, 16, 1),
    (16, 512, 4, 4, 1),
    (8, 1024, 4, 8, 1),
]

TUNED: dict = {}  # (N, K, prologue) -> config string, filled on first use

if HAVE_TRITON:

    def _configs():
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=nw, num_stages=ns)
            for bn, bk, sp, nw, ns in CONFIGS
        ]

    @triton.jit
    def _round(x, DT: tl.constexpr):
        # the eager op's rounding to the activation dtype (no-op for fp32)
        return x.to(DT, fp_downcast_rounding="rtne").to(tl.float32)

    def _bench(kernel_call, quantiles):  # short runs (L2 flushed between them by do_bench)
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, res_ptr, nw_ptr, y_ptr, ws_ptr, ss_ptr, cnt_ptr,
        N, eps, K: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ):
        DT: tl.constexpr = y_ptr.dtype.element_ty
        KS: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # K range of one split
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wrow = w_ptr + rows.to(tl.int64)[:, None] * K
        k_lo = tl.program_id(1) * KS
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, KS, BLOCK_K):
            offs = k_lo + k0 + tl.arange(0, BLOCK_K)
            km = offs < K
            if PRO == 0:
                a = tl.load(x_ptr + offs, mask=km, other=0.0).to(tl.float32)
            elif PRO == 1:  # RMSNorm in one pass: norm_w * x now, the 1/rms scalar after the sum
                xv = tl.load(x_ptr + offs, mask=km, other=0.0).to(tl.float32)
                sq += xv * xv
                a = xv * tl.load(nw_ptr + offs, mask=km, other=0.0).to(tl.float32)
            else:  # SiLU(gate) * up, rounded as the eager ops round
                g = tl.load(x_ptr + offs, mask=km, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + offs, mask=km, other=0.0).to(tl.float32)
                a = _round(_round(g / (1.0 + tl.exp(-g)), DT) * u, DT)
            wt = tl.load(wrow + offs[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            acc += wt.to(tl.float32) * a[None, :]
        y = tl.sum(acc, axis=1)
        ss = tl.sum(sq, axis=0)
        last = True
        if SPLIT > 1:
            # split-K: partial sums meet in an fp32 workspace; the split that arrives last (a counter
            # per row block) reads the total, resets the workspace for the next call, and stores
            tl.atomic_add(ws_ptr + rows, y, mask=rmask, sem="relaxed")
            if PRO == 1:
                tl.atomic_add(ss_ptr + pid, ss, sem="relaxed")
            tl.debug_barrier()
            last = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT - 1
            if last:  # read the totals at L2 (atomic add of 0), then leave the scratch zeroed
                zero = tl.zeros([BLOCK_N], dtype=tl.float32)
                y = tl.atomic_add(ws_ptr + rows, zero, mask=rmask, sem="relaxed")
                tl.store(ws_ptr + rows, zero, mask=rmask)
                if PRO == 1:
                    ss = tl.atomic_add(ss_ptr + pid, 0.0, sem="relaxed")
                    tl.store(ss_ptr + pid, 0.0)
                tl.store(cnt_ptr + pid, 0)
        if last:
            if PRO == 1:  # eps as fp32 (an AOTI package passes float arguments as fp64)
                y = y / tl.sqrt(ss / K + tl.cast(eps, tl.float32))
            if HAS_RES:
                y = _round(y, DT) + tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows, y.to(DT), mask=rmask)

    _gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "PRO"], do_bench=_bench)(_gemv_kernel)
    # whole-K configs only: the AOTI twin's choice where the Python step picked split-K (a package keeps no
    # state, so split-K would need its scratch zeroed on every call: extra launches in a launch-bound step)
    _gemv_whole_k = triton.autotune(configs=[c for c in _configs() if c.kwargs["SPLIT"] == 1],
                                    key=["N", "K", "PRO"], do_bench=_bench)(_gemv_kernel)


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
    args = (x, w, res_t, nw, y, *_workspace(x.device, N), N, float(eps))
    kw = {"K": K, "PRO": pro, "HAS_RES": res is not None}
    fixed = _fixed_config()
    if fixed is not None:
        bn, bk, sp, nwarps, ns = fixed
        _gemv_kernel[(triton.cdiv(N, bn), sp)](*args, **kw, BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp, num_warps=nwarps,
                                               num_stages=ns)
        return y
    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT"])

    _gemv_tuned[grid](*args, **kw)
    best = getattr(_gemv_tuned, "best_config", None)
    if best is not None:
        TUNED.setdefault((N, K, prologue), str(best))
        PICKED[(N, K, pro)] = _as_tuple(best)
    return y


PICKED: dict = {}  # (N, K, PRO) -> the config tuple this process's autotuner picked (read by the AOTI twin)
WHOLE_K: dict = {}  # (N, K, PRO) -> the best whole-K config, for shapes where PICKED is split-K
AOTI_DEFAULT = (4, 1024, 1, 4, 1)  # a shape the autotuner never saw (the export tunes every shape first)


def _as_tuple(c) -> tuple:
    return c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT"], c.num_warps, c.num_stages


def tune_for_aoti(x, w, res=None, norm_w=None, eps: float = 0.0, prologue: str = "none") -> tuple:
    """Pick the twin's config for this shape on real tensors: the Python op's own pick where it is whole-K
    (the package then computes the Python step's bits), else the fastest whole-K config."""
    triton_fused_linear(x, w, res, norm_w, eps, prologue)
    pro = PROLOGUES[prologue]
    N, K = w.shape
    key = (N, K, pro)
    if PICKED.get(key, AOTI_DEFAULT)[2] > 1:
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
        _gemv_whole_k[lambda m: (triton.cdiv(N, m["BLOCK_N"]), 1)](
            x.contiguous(), w, res.contiguous() if res is not None else y, norm_w if norm_w is not None else x, y,
            y, y, y, N, float(eps), K=K, PRO=pro, HAS_RES=res is not None)
        WHOLE_K[key] = _as_tuple(_gemv_whole_k.best_config)
    return _aoti_config(key)


def _aoti_config(key) -> tuple:
    fixed = _fixed_config()
    if fixed is not None and fixed[2] == 1:
        return fixed
    picked = PICKED.get(key, AOTI_DEFAULT)
    return picked if picked[2] == 1 else WHOLE_K.get(key, AOTI_DEFAULT)


def _aoti_fused_linear(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None = None,
                       norm_w: torch.Tensor | None = None, eps: float = 0.0, prologue: str = "none") -> torch.Tensor:
    """`specee_aoti::fused_linear`: the one-row kernel for AOTInductor packages, whole-K, with the config
    `tune_for_aoti` picked for the shape (the Python op's own where that is whole-K: the same bits)."""
    pro = PROLOGUES[prologue]
    N, K = w.shape
    if x.numel() != (2 * K if pro == 2 else K):
        raise ValueError(f"specee_aoti::fused_linear: one row of {2 * K if pro == 2 else K} features, got "
                         f"x {tuple(x.shape)}")
    bn, bk, _, nwarps, ns = _aoti_config((N, K, pro))
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    wrap_triton(_gemv_kernel)[(triton.cdiv(N, bn), 1)](  # the split-K scratch pointers are never touched
        x, w, res.contiguous() if res is not None else y, norm_w if norm_w is not None else x, y, y, y, y, N,
        float(eps), K=K, PRO=pro, HAS_RES=res is not None, BLOCK_N=bn, BLOCK_K=bk, SPLIT=1, num_warps=nwarps,
        num_stages=ns)
    return y


if HAVE_TRITON:
    from torch.library import triton_op, wrap_triton

    aoti_fused_linear = triton_op("specee_aoti::fused_linear", _aoti_fused_linear, mutates_args=())


_WORKSPACES: dict = {}


def _workspace(device, n: int):
    """Split-K scratch for outputs of n rows: fp32 partial sums [n], squared-sum partials and arrival
    counters per row block. Zero at rest (the last split of every call resets what it used), so one
    allocation serves every call and every CUDA-graph replay; the first call of a shape happens before
    any capture in every caller (warm-up), so it is never allocated inside one."""
    key = (device, n)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (
            torch.zeros(n, dtype=torch.float32, device=device),
            torch.zeros(n, dtype=torch.float32, device=device),
            torch.zeros(n, dtype=torch.int32, device=device),
        )
    return ws


def _fixed_config():
    """SPECEE_GEMV_CONFIG="BLOCK_N,BLOCK_K,SPLIT,num_warps,num_stages" skips autotuning (tests,
    reproductions)."""
    v = os.environ.get("SPECEE_GEMV_CONFIG")
    if not v:
        return None
    try:
        bn, bk, sp, nw, ns = (int(t) for t in v.split(","))
    except ValueError:
        raise ValueError(f"SPECEE_GEMV_CONFIG={v!r}: expected five integers "
                         "BLOCK_N,BLOCK_K,SPLIT,num_warps,num_stages") from None
    return bn, bk, sp, nw, ns


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::fused_linear` (idempotent; False where triton is missing)."""
    return register_kernel("specee::fused_linear", triton_fused_linear)
