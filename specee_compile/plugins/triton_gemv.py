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
BLOCK_K chunks; the activation chunk is recomputed per program. The config is tuned per (N, K,
prologue, residual, dtype) on first use, which happens outside CUDA-graph capture in every caller
(warm-up runs), the way the decode step runs the kernel: each candidate is launched back to back inside
a CUDA graph over enough copies of the weight that L2 never holds one (the step streams every layer's
weights cold), and the lowest median time per launch wins (`_tune`). Triton's autotuner, used before,
timed one call at a time with L2 flushed in between; on the H200 its pick moved between processes by up
to ~30% of a GEMV's graph time (session 13, `benchmarks/gemv_sweep.py --retune`). `TUNED` holds what
was picked, for the benchmark record.
`SPECEE_GEMV_CONFIG=BLOCK_N,BLOCK_K,SPLIT,num_warps,num_stages` pins one config instead.

int8 weights (W8, `ops.quantize_rows`: one fp32 scale per output row, the draft's `--draft-quant int8`) stream
half the bytes of fp16: both kernels load the int8 tile, widen it (exact), sum in fp32 as before, and multiply
the row's sum by its scale once, before the epilogue (the rows kernel's tensor-core dot widens the tile to the
activation dtype, where every int8 value is exact). The tuner keys them apart from the fp16 weights of a shape.

A few rows (2 .. MAX_ROWS) inside `ops.multi_row_kernel()` (the fixed tree program: its verification rows
and the draft's levels) take `_rows_kernel`: one program per BLOCK_N output features streams their weight rows once for all
rows (a tensor-core `tl.dot` of the [rows, BLOCK_K] activation tile, rows padded to 16 or 32, against the
weight tile), with the prologue applied exactly as the eager ops round (RMSNorm's statistics first, in a pass
over the row from L2). cuBLAS, used before for every multi-row call, runs the 7B tree's 25-row verification at
~1.27x the one-row step's time on the H200 (session 12's 7B tree profile). The tuner times cuBLAS beside the
configs and keeps it for a shape where it is faster. fp32 weights use full-precision dots (no TF32).
The tuner also times `_rows_t_kernel`, the same op turned around: the weight tile is the
dot's left operand, so 64-128 output features fill a Hopper warpgroup MMA (wgmma) whose narrow side is the rows,
and the weight tiles stream through cp.async stages, with split-K through a self-zeroing scratch. Without a
prologue it beats cuBLAS by 6-14% at 7B widths on the H200; with RMSNorm or SiLU inside, every rows kernel loses
to cuBLAS's plain matmul (each program re-normalizes the rows), so the tree's layers call the op with no prologue
(`model_step.rows_fused`; benchmarks/rows_gemm_sweep.py). For fp32 its dot is 3xTF32 (three TF32 tensor-core
products of split operands, within a few ulps of fp32), where cuBLAS's fp32 GEMM runs on the FMA units. At
SmolLM2's widths (K <= WHOLE_K_MAX) fp32 also times narrow-block configs with every K block of a split in flight at
once (ROW_T_CONFIGS_F32_DEEP): they took the tree verification's four layer matmuls from 7.3-10.7 us to 5.3-9.7 on the
H100, and the product's SmolLM2 tree from 0.661x to 0.753x dense (session 34, benchmarks/RESULTS.md).
Where K is at most WHOLE_K_MAX (SmolLM2's widths) the tuner also times `_rows_k_kernel`, the one-row kernel's shape
for a few rows: a program loads its weight rows whole, in one round of loads, and takes the rows a few at a time on
the FMA units, where the tiled kernels walked K one memory round trip after another (at those widths every 25-row call
of theirs, or cuBLAS's, took 7-13 us on the H100 before the deep configs above; the one-row kernel streams the same
weight in 2-4.5). Measured
(H100, session 33, benchmarks/RESULTS.md): it wins three of the draft's 8-row matmuls by 0.3-1.4 us and loses every
25-row one by 1.5-3.5x (25 rows of FMA sums cost more than the loads it saves), so the tuner picks it for the former.
`SPECEE_GEMV_MAX_ROWS=1` sends every multi-row call back to the eager reference (A/B runs).

`specee_aoti::fused_linear` is the same kernel for AOTInductor packages (the C++ runner's one-row layer,
`backends/aoti_export.py`): a `torch.library.triton_op`, which an AOTI package embeds (a Python custom op
it cannot call), launched whole-K with the config `tune_for_aoti` picked for its shape in the exporting
process (the Python op's own pick where that is whole-K, so the package computes the same bits).
"""

from __future__ import annotations

import os

import torch

from ..errors import SettingError
from . import HAVE_TRITON, compile_cache, pdl, register_kernel, tl, triton

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}
PROLOGUE_NAMES = {v: k for k, v in PROLOGUES.items()}

# (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages); the tuner keeps the fastest per shape. Few
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
# int8 weights (a quantized draft) also try these: a tile of CONFIGS holds half the bytes in int8, so a program keeps
# half as many in flight per iteration (H200, session 20: the int8 draft step streamed its 270 MB at ~1.8 TB/s
# against the fp16 one's 539 MB at ~3.2); these hold as many bytes as the fp16 tiles that win there
CONFIGS_W8 = [
    (8, 2048, 1, 8, 1),
    (8, 4096, 1, 16, 1),
    (16, 1024, 2, 8, 1),
    (16, 2048, 1, 16, 1),
]

# the rows kernel: (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N from 16 (more programs for N = 4096)
ROW_CONFIGS = [
    (16, 128, 4, 3),
    (16, 256, 4, 3),
    (32, 128, 4, 3),
    (32, 256, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
    (128, 64, 8, 3),
]
# the turned-around rows kernel (`_rows_t_kernel`), 16-bit activations: ("t", BLOCK_N, BLOCK_K, SPLIT, num_warps,
# num_stages); BLOCK_N >= 64 for a warpgroup MMA, split-K where N / BLOCK_N leaves too few programs
ROW_T_CONFIGS = [
    ("t", 64, 128, 1, 4, 4),
    ("t", 64, 128, 2, 4, 4),
    ("t", 64, 256, 1, 4, 3),
    ("t", 64, 256, 2, 4, 3),
    ("t", 64, 128, 4, 4, 4),
    ("t", 128, 128, 1, 4, 3),
    ("t", 64, 256, 1, 4, 4),
]
# the turned kernel for fp32 activations and weights: ("t", BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages, precision)
# with the dot in 3xTF32 (each operand split into a TF32 high and low part, three tensor-core products: fp32's
# accuracy within a few ulps, where the IEEE dot runs on the FMA units); half the K tile of the 16-bit configs
# (fp32 tiles are twice the bytes), and deeper split-K for SmolLM2's 576-wide outputs (9 feature blocks of 64). The
# old kernel's IEEE configs lost every fp32 shape of the H100 sweeps (sessions 33-34) to cuBLAS by 2-4x and are not
# timed for fp32; of these, the first two win SmolLM2's heads and the draft's gate/up there, the other two came
# within 6% of a shape's best in session 33's sweep (two more, never close, went in session 34)
ROW_T_CONFIGS_F32 = [
    ("t", 64, 64, 1, 4, 4, "tf32x3"),
    ("t", 64, 64, 4, 4, 3, "tf32x3"),
    ("t", 64, 32, 8, 4, 2, "tf32x3"),
    ("t", 128, 64, 1, 8, 3, "tf32x3"),
]
# the turned kernel in fp32 with narrow feature blocks (16: mma.sync, more programs) and every K block of a split in
# flight at once (as many pipeline stages as its K loop has blocks), for K up to WHOLE_K_MAX (SmolLM2's widths): a
# program issues its weight loads in one round rather than walking K a few blocks at a time. Session 34's two H100
# sweeps of 13 such configs kept the four that won a shape: the verification's qkv 6.4 us, o 5.3, gate/up 9.7 and
# down 7.1 against 8.0 / 7.3 / 10.7 / 10.6 for the configs above (cuBLAS 8.5 / 8.9 / 11.9 / 12.7), and the draft's qkv
ROW_T_CONFIGS_F32_DEEP = [
    ("t", 16, 64, 1, 4, 9, "tf32x3"),
    ("t", 16, 64, 4, 2, 6, "tf32x3"),
    ("t", 16, 64, 8, 4, 3, "tf32x3"),
    ("t", 16, 32, 8, 4, 3, "tf32x3"),
]
# the whole-K rows kernel (`_rows_k_kernel`): ("k", BLOCK_N, RB rows at a time, num_warps), for K up to WHOLE_K_MAX
# (a program holds BLOCK_N x next_power_of_2(K) weights in registers: SmolLM2's widths, not 7B's)
ROW_K_CONFIGS = [
    ("k", 4, 4, 8),
    ("k", 2, 4, 4),
    ("k", 4, 2, 4),
    ("k", 2, 8, 8),
    ("k", 8, 2, 8),
    ("k", 1, 8, 4),
]
WHOLE_K_MAX = 2048
# the old kernel's configs that won a 16-bit shape with no prologue on the H200 (session 21's sweep and bench: gate/up);
# with the turned configs beside them, the others never did, and each costs a compile at the first start
ROW_CONFIGS_16 = [(64, 128, 4, 3), (32, 256, 4, 3)]
# int8 weights (the quantized draft's 8-row levels) also try these, as CONFIGS_W8 for the one-row kernel: a 16-bit
# tile holds half its bytes in int8, so a stage of ROW_CONFIGS / ROW_T_CONFIGS keeps half the bytes in flight. These
# double BLOCK_K (or BLOCK_N) of the configs that won the 7B draft's int8 shapes on the H100 (session 39's profile:
# (32, 256, 4, 3) for q/k/v, gate/up and the head, ("t", 64, 128, 4, 4, 4) for fc, o and down), so each stage holds
# the bytes that the fp16 tile holds. Each costs a compile per int8 shape at the first start (the picks are kept on
# disk, plugins/compile_cache.py): four, on the draft's six shapes. Measured in the product (H100, session 41):
# ("t", 64, 256, 4, 4, 4) won fc and down, the others kept their picks, and the 7B tree rows did not move.
ROW_CONFIGS_W8 = [(32, 512, 4, 3), (64, 256, 4, 3)]
ROW_T_CONFIGS_W8 = [("t", 64, 256, 4, 4, 4), ("t", 64, 256, 2, 4, 4)]
MAX_ROWS = 32  # more rows (prefill) take the eager reference: cuBLAS's own tiles are the better fit there

TUNED: dict = {}  # (N, K, prologue) -> config string, filled on first use

if HAVE_TRITON:
    from .pdl import launch_token, wait_token

    @triton.jit
    def _round(x, DT: tl.constexpr):
        # the eager op's rounding to the activation dtype (no-op for fp32)
        return x.to(DT, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _gemv_block(acc, sq, wt, x_ptr, nw_ptr, offs, km, K: tl.constexpr, PRO: tl.constexpr, DT: tl.constexpr):
        # one K block of the one-row kernel: the activation tile (its prologue applied) times the weight tile wt
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
        acc += wt.to(tl.float32) * a[None, :]
        return acc, sq

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, res_ptr, nw_ptr, y_ptr, ws_ptr, ss_ptr, cnt_ptr,
        N, eps, K: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, W8: tl.constexpr,
        PDL: tl.constexpr = False, EARLY_W: tl.constexpr = False,
    ):
        # W8: w is int8 and s_ptr its fp32 scale per row (else s_ptr is never read). PDL: launched with
        # programmatic dependent launch (plugins/pdl.py): wait for the kernel before, let the next one launch after
        # the loop. EARLY_W: the first K block's weight tile is loaded before anything else (before that wait, with
        # PDL: the weights are never written by a step's kernels, so they stream in while the kernel before
        # finishes); the blocks are summed in the same order either way.
        DT: tl.constexpr = y_ptr.dtype.element_ty
        KS: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # K range of one split
        K0: tl.constexpr = BLOCK_K if EARLY_W else 0  # where the loop starts
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wrow = w_ptr + rows.to(tl.int64)[:, None] * K
        k_lo = tl.program_id(1) * KS
        if EARLY_W:
            offs = k_lo + tl.arange(0, BLOCK_K)
            km = offs < K
            wt = tl.load(wrow + offs[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        if PDL:  # the wait as a value (pdl.wait_token), taken into every pointer a step's kernels write (the
            # weights, their scales and the norm weights are written only while a decoder is built)
            t = wait_token()
            x_ptr, res_ptr, y_ptr = x_ptr + t, res_ptr + t, y_ptr + t
            ws_ptr, ss_ptr, cnt_ptr = ws_ptr + t, ss_ptr + t, cnt_ptr + t
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        if EARLY_W:
            acc, sq = _gemv_block(acc, sq, wt, x_ptr, nw_ptr, offs, km, K, PRO, DT)
        for k0 in range(K0, KS, BLOCK_K):
            offs = k_lo + k0 + tl.arange(0, BLOCK_K)
            km = offs < K
            wt = tl.load(wrow + offs[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            acc, sq = _gemv_block(acc, sq, wt, x_ptr, nw_ptr, offs, km, K, PRO, DT)
        if PDL:
            y_ptr += launch_token(t)
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
            if W8:
                y = y * tl.load(s_ptr + rows, mask=rmask, other=1.0)
            if PRO == 1:  # eps as fp32 (an AOTI package passes float arguments as fp64)
                y = y / tl.sqrt(ss / K + tl.cast(eps, tl.float32))
            if HAS_RES:
                y = _round(y, DT) + tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows, y.to(DT), mask=rmask)

    @triton.jit
    def _rows_stats(xrow, rm, eps, K: tl.constexpr, PRO: tl.constexpr, MP: tl.constexpr, BLOCK_K: tl.constexpr):
        # the rows' 1/rms over all of K (RMSNorm's statistics, read before the main pass; x comes from L2)
        rstd = tl.zeros([MP], dtype=tl.float32)
        if PRO == 1:
            sq = tl.zeros([MP], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                xv = tl.load(xrow + offs[None, :], mask=rm[:, None] & (offs < K)[None, :], other=0.0).to(tl.float32)
                sq += tl.sum(xv * xv, axis=1)
            rstd = 1.0 / tl.sqrt(sq / K + tl.cast(eps, tl.float32))
        return rstd

    @triton.jit
    def _rows_act(xrow, nw_ptr, offs, rm, km, rstd, K: tl.constexpr, PRO: tl.constexpr, DT: tl.constexpr):
        # the [MP, BLOCK_K] activation tile at K offsets `offs`, the prologue rounded as the eager ops round it
        # (rms_norm: w * round(x * rstd); silu_mul: round(round(silu(g)) * u))
        xm = rm[:, None] & km[None, :]
        if PRO == 0:
            a = tl.load(xrow + offs[None, :], mask=xm, other=0.0).to(tl.float32)
        elif PRO == 1:
            xv = tl.load(xrow + offs[None, :], mask=xm, other=0.0).to(tl.float32)
            a = _rows_norm(xv, nw_ptr, offs, km, rstd, DT)
        else:
            g = tl.load(xrow + offs[None, :], mask=xm, other=0.0).to(tl.float32)
            u = tl.load(xrow + K + offs[None, :], mask=xm, other=0.0).to(tl.float32)
            a = _round(_round(g / (1.0 + tl.exp(-g)), DT) * u, DT)
        return a

    @triton.jit
    def _rows_norm(xv, nw_ptr, offs, km, rstd, DT: tl.constexpr):
        # RMSNorm of the rows' tile xv [rows, BLOCK_K] (fp32) with their 1/rms: w * round(x * rstd), rounded
        nw = tl.load(nw_ptr + offs, mask=km, other=0.0).to(tl.float32)
        return _round(nw[None, :] * _round(xv * rstd[:, None], DT), DT)

    @triton.jit
    def _rows_kernel(
        x_ptr, w_ptr, s_ptr, res_ptr, nw_ptr, y_ptr,
        M, N, eps, K: tl.constexpr, XS: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr, MP: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W8: tl.constexpr, PDL: tl.constexpr = False,
    ):
        # M rows (<= MP, a power of two >= 16) of x [M, XS] against W [N, K]; program pid owns the output
        # features pid * BLOCK_N ..; PDL as the one-row kernel's
        if PDL:
            tl.extra.cuda.gdc_wait()
        DT: tl.constexpr = y_ptr.dtype.element_ty
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        r = tl.arange(0, MP)
        rm = r < M
        xrow = x_ptr + r.to(tl.int64)[:, None] * XS
        rstd = _rows_stats(xrow, rm, eps, K, PRO, MP, BLOCK_K)
        acc = tl.zeros([MP, BLOCK_N], dtype=tl.float32)
        wrow = w_ptr + cols.to(tl.int64)[:, None] * K
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            km = offs < K
            a = _rows_act(xrow, nw_ptr, offs, rm, km, rstd, K, PRO, DT)
            wt = tl.load(wrow + offs[None, :], mask=cm[:, None] & km[None, :], other=0.0)
            if IEEE:  # fp32 weights: full-precision products, as the eager fp32 matmul (no TF32); each K block
                # summed apart, then added (an FMA chain over all of K = 11008 loses ~6x more bits); fma, not +:
                # Triton folds `acc + dot(a, b)` back into dot(a, b, acc), the one long chain
                acc = tl.fma(tl.dot(a, tl.trans(wt.to(tl.float32)), input_precision="ieee"), 1.0, acc)
            elif W8:  # int8 -> the activation dtype is exact; the row scale multiplies the sum below
                acc = tl.dot(a.to(DT), tl.trans(wt.to(DT)), acc)
            else:
                acc = tl.dot(a.to(wt.dtype), tl.trans(wt), acc)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        y = acc
        if W8:
            y = y * tl.load(s_ptr + cols, mask=cm, other=1.0)[None, :]
        om = rm[:, None] & cm[None, :]
        if HAS_RES:
            y = _round(y, DT) + tl.load(res_ptr + r[:, None] * N + cols[None, :], mask=om, other=0.0).to(tl.float32)
        tl.store(y_ptr + r[:, None] * N + cols[None, :], y.to(DT), mask=om)

    @triton.jit
    def _rows_t_dot(acc, wt, a, DT: tl.constexpr, PREC: tl.constexpr):
        # one K block of the turned kernel: acc + W_tile . a^T (fp32: the block's dot summed apart, then added)
        if PREC == "":
            acc = tl.dot(wt.to(DT), tl.trans(a), acc)
        else:
            acc = tl.fma(tl.dot(wt.to(DT), tl.trans(a), input_precision=PREC), 1.0, acc)
        return acc

    @triton.jit
    def _rows_t_kernel(
        x_ptr, w_ptr, s_ptr, res_ptr, nw_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, eps, K: tl.constexpr, XS: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr, MP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, W8: tl.constexpr, PREC: tl.constexpr,
        PDL: tl.constexpr = False, EARLY_W: tl.constexpr = False,
    ):
        # The rows kernel turned around: the weight tile is the dot's left operand
        # (acc [BLOCK_N, MP] = W_tile . x_tile^T), so BLOCK_N >= 64 output features fill a Hopper warpgroup MMA
        # whose narrow side is the rows, and the weight tiles stream through the software pipeline
        # (num_stages). Split-K (SPLIT > 1) as the one-row kernel: fp32 partial tiles meet in a workspace
        # [N, MP]; the split that arrives last (a counter per feature block) reads the total, leaves the
        # workspace zeroed, and stores. fp32 (PREC "tf32x3" or "ieee"): each K block's dot summed apart, then
        # added, as the old kernel's IEEE dot (a short product chain per block; `fma`, since Triton folds
        # `acc + dot` back into one chain). PDL and EARLY_W as the one-row kernel's.
        if PDL and not EARLY_W:
            tl.extra.cuda.gdc_wait()
        DT: tl.constexpr = y_ptr.dtype.element_ty
        KS: tl.constexpr = triton.cdiv(triton.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # K range of one split
        K0: tl.constexpr = BLOCK_K if EARLY_W else 0  # where the loop starts
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        r = tl.arange(0, MP)
        rm = r < M
        xrow = x_ptr + r.to(tl.int64)[:, None] * XS
        wrow = w_ptr + cols.to(tl.int64)[:, None] * K
        k_lo = tl.program_id(1) * KS
        if EARLY_W:  # the first block's weight tile before the rows' statistics (and, with PDL, before the wait)
            offs0 = k_lo + tl.arange(0, BLOCK_K)
            km0 = offs0 < K
            wt0 = tl.load(wrow + offs0[None, :], mask=cm[:, None] & km0[None, :], other=0.0)
            if PDL:
                tl.extra.cuda.gdc_wait()
        rstd = _rows_stats(xrow, rm, eps, K, PRO, MP, BLOCK_K)
        acc = tl.zeros([BLOCK_N, MP], dtype=tl.float32)
        if EARLY_W:
            acc = _rows_t_dot(acc, wt0, _rows_act(xrow, nw_ptr, offs0, rm, km0, rstd, K, PRO, DT).to(DT), DT, PREC)
        for k0 in range(K0, KS, BLOCK_K):
            offs = k_lo + k0 + tl.arange(0, BLOCK_K)
            km = offs < K
            a = _rows_act(xrow, nw_ptr, offs, rm, km, rstd, K, PRO, DT).to(DT)
            wt = tl.load(wrow + offs[None, :], mask=cm[:, None] & km[None, :], other=0.0)
            acc = _rows_t_dot(acc, wt, a, DT, PREC)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        y = acc
        om = cm[:, None] & rm[None, :]
        wsp = ws_ptr + cols[:, None] * MP + r[None, :]
        last = True
        if SPLIT > 1:
            tl.atomic_add(wsp, y, mask=om, sem="relaxed")
            tl.debug_barrier()
            last = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT - 1
            if last:  # the totals at L2 (an atomic add of 0), then the scratch back to zero
                zero = tl.zeros([BLOCK_N, MP], dtype=tl.float32)
                y = tl.atomic_add(wsp, zero, mask=om, sem="relaxed")
                tl.store(wsp, zero, mask=om)
                tl.store(cnt_ptr + pid, 0)
        if last:
            _rows_t_store(y, s_ptr, res_ptr, y_ptr, cols, cm, r, om, N, HAS_RES, W8, DT)

    @triton.jit
    def _rows_t_store(y, s_ptr, res_ptr, y_ptr, cols, cm, r, om, N, HAS_RES: tl.constexpr, W8: tl.constexpr,
                      DT: tl.constexpr):
        # the turned kernels' epilogue: y [features, rows] (fp32 sums) -> the int8 weights' row scale, the residual
        # (rounded as the eager `h + mm` rounds), the output rows [rows, N] in the activation dtype
        if W8:
            y = y * tl.load(s_ptr + cols, mask=cm, other=1.0)[:, None]
        if HAS_RES:
            y = _round(y, DT) + tl.load(res_ptr + r[None, :] * N + cols[:, None], mask=om, other=0.0).to(tl.float32)
        tl.store(y_ptr + r[None, :] * N + cols[:, None], y.to(DT), mask=om)

    @triton.jit
    def _rows_k_kernel(
        x_ptr, w_ptr, s_ptr, res_ptr, nw_ptr, y_ptr,
        M, N, eps, K: tl.constexpr, XS: tl.constexpr,
        PRO: tl.constexpr, HAS_RES: tl.constexpr, MP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RB: tl.constexpr, W8: tl.constexpr,
        PDL: tl.constexpr = False, EARLY_W: tl.constexpr = False,
    ):
        # The one-row kernel's shape for a few rows (whole K, BLOCK_K >= K): a program loads its BLOCK_N weight rows
        # whole, in one round of loads, then takes the rows RB at a time (their tile from L2, the prologue applied as
        # `_rows_act` rounds it), each output the FMA units' sum over all of K. The tiled kernels loop over K blocks
        # one memory round trip after another: at SmolLM2's widths (K 576-1536) each of their 25-row calls took 7-11
        # us on the H100 (session 32) where the one-row kernel streams the same weight in 2-4.5 (H200, session 13).
        # PDL and EARLY_W as the one-row kernel's (the weights are written only while a decoder is built).
        if PDL and not EARLY_W:
            tl.extra.cuda.gdc_wait()
        offs = tl.arange(0, BLOCK_K)  # all of K
        km = offs < K
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < N
        DT: tl.constexpr = y_ptr.dtype.element_ty
        wt = tl.load(w_ptr + cols.to(tl.int64)[:, None] * K + offs[None, :], mask=cm[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        if PDL and EARLY_W:
            tl.extra.cuda.gdc_wait()
        if PDL:  # (the dependent kernel still waits for this one's end; after the last store ptxas drops the call)
            tl.extra.cuda.gdc_launch_dependents()
        for g in tl.static_range(MP // RB):
            if g * RB < M:  # (the row block's padding past M: no work)
                r = g * RB + tl.arange(0, RB)
                rm = r < M
                xrow = x_ptr + r.to(tl.int64)[:, None] * XS
                if PRO == 1:  # the statistics from the tile itself (whole K: `_rows_stats`'s one block, same bits)
                    xv = tl.load(xrow + offs[None, :], mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
                    rstd = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) / K + tl.cast(eps, tl.float32))
                    a = _rows_norm(xv, nw_ptr, offs, km, rstd, DT)
                else:  # (every prologue's tile holds values of the activation dtype already: no rounding left)
                    a = _rows_act(xrow, nw_ptr, offs, rm, km, tl.zeros([RB], dtype=tl.float32), K, PRO, DT)
                y = tl.sum(wt[:, None, :] * a[None, :, :], axis=2)  # [BLOCK_N, RB]
                _rows_t_store(y, s_ptr, res_ptr, y_ptr, cols, cm, r, cm[:, None] & rm[None, :], N, HAS_RES, W8, DT)


def max_rows() -> int:
    """The most rows the rows kernel takes (SPECEE_GEMV_MAX_ROWS, default MAX_ROWS; 1 = none)."""
    v = os.environ.get("SPECEE_GEMV_MAX_ROWS")
    if not v:
        return MAX_ROWS
    try:
        n = int(v)
    except ValueError:
        raise SettingError(f"SPECEE_GEMV_MAX_ROWS={v!r}: expected an integer 1..{MAX_ROWS}; unset it for the "
                           "default") from None
    if not 1 <= n <= MAX_ROWS:
        raise SettingError(f"SPECEE_GEMV_MAX_ROWS={v!r}: expected an integer 1..{MAX_ROWS}; unset it for the "
                           "default")
    return n


def triton_fused_linear(x, w, res=None, norm_w=None, eps: float = 0.0, prologue: str = "none", w_scale=None):
    """The fused GEMV for one row (x [..., 1, K or 2K]); 2 .. `max_rows()` rows take the rows kernel inside
    `ops.multi_row_kernel()` (the fixed tree program); other multi-row calls (prefill, pending rows) take the
    eager reference (cuBLAS), the bits the C++ runner's multi-row package computes. w_scale: w is int8."""
    from ..ops import fused_linear_reference, multi_row_kernel_on

    w8 = w_scale is not None
    if w8 and (w.dtype != torch.int8 or w_scale.shape != w.shape[:1] or w_scale.dtype != torch.float32):
        raise ValueError(f"fused_linear: an int8 weight [N, K] with float32 scales [N] expected, got w "
                         f"{w.dtype} {tuple(w.shape)}, w_scale {w_scale.dtype} {tuple(w_scale.shape)}")
    rows = x.numel() // x.shape[-1]
    rows_kernel = rows > 1 and multi_row_kernel_on() and rows <= max_rows()
    if not HAVE_TRITON or (not w8 and x.dtype != w.dtype) or not (rows == 1 or rows_kernel):
        return fused_linear_reference(x, w, res, norm_w, eps, prologue, w_scale)
    pro = PROLOGUES[prologue]
    N, K = w.shape
    if x.shape[-1] != (2 * K if pro == 2 else K):
        raise ValueError(f"fused_linear: x has {x.shape[-1]} features; weight {tuple(w.shape)} with "
                         f"prologue {prologue!r} needs {2 * K if pro == 2 else K}")
    if rows_kernel:
        return _rows_linear(x, w, res, norm_w, eps, pro, rows, w_scale)
    x = x.contiguous()
    w = w.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    res_t = res.contiguous() if res is not None else y
    nw = norm_w.contiguous() if norm_w is not None else x
    args = (x, w, w_scale.contiguous() if w8 else w, res_t, nw, y, *_workspace(x.device, N), N, float(eps))
    kw = {"K": K, "PRO": pro, "HAS_RES": res is not None, "W8": w8}
    cfg = fixed_config()
    if cfg is None:
        cfg = _tuned(args, kw)
        if cfg is None:  # first use inside a stream capture: untuned, not remembered
            cfg = AOTI_DEFAULT
        else:
            TUNED.setdefault((N, K, prologue + (" w8" if w8 else "")), ",".join(map(str, cfg)))
            if not w8:  # the AOTI twin takes fp16/fp32 weights only
                PICKED[(N, K, pro)] = cfg
    _launch(args, kw, cfg)
    return y


def _launch(args, kw, cfg, w=None):
    """One launch of the kernel with cfg = (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages); w replaces the
    weight in args (the tuner's copies). Returns Triton's compiled kernel (its cubin and metadata)."""
    bn, bk, sp, nwarps, ns = cfg
    if w is not None:
        args = (args[0], w, *args[2:])
    return _gemv_kernel[(triton.cdiv(args[-2], bn), sp)](*args, **kw, BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp,
                                                          num_warps=nwarps, num_stages=ns,
                                                          **_pdl_early(args[0].device))


# (N, K, PRO, HAS_RES, dtype, device, whole_k) -> `_tune`'s pick; ("rows", row block, N, K, ...) -> the rows
# kernel's pick (a ROW_CONFIGS entry, or EAGER)
_TUNE_CACHE: dict = {}
TUNE_BYTES = 192 << 20  # the weight copies a shape is timed over (several times a Hopper's 50 MB of L2)


def tune_copies(nbytes: int) -> int:
    """How many copies of a weight of `nbytes` the tuner rotates over so L2 never holds the one it reads:
    one where the weight alone outsizes L2 many times, else enough to fill TUNE_BYTES (at most 256)."""
    return 1 if nbytes >= TUNE_BYTES // 3 else min(256, -(-TUNE_BYTES // nbytes))


def pick_fastest(times: dict) -> tuple:
    """The config with the lowest time; a config that failed (None: it does not compile or launch on this
    card) never wins. times: {config: us or None}."""
    ok = {c: t for c, t in times.items() if t is not None}
    if not ok:
        raise RuntimeError(f"fused_linear: no GEMV config ran on this device (tried {list(times)})")
    return min(ok, key=ok.get)


def _tuned(args, kw, whole_k: bool = False) -> tuple | None:
    """The config for this call's shape (of all CONFIGS, with CONFIGS_W8 for int8 weights, or of the whole-K
    ones): `_tune`'s pick, cached per shape; None inside a stream capture."""
    w = args[1]
    # int8: W8; PDL: a kernel launched with it is compiled as another kernel (PDL, EARLY_W constexprs), so its pick
    # is timed as it will run
    key = (args[-2], kw["K"], kw["PRO"], kw["HAS_RES"], w.dtype, w.device, whole_k, pdl.mode())
    cfg = _TUNE_CACHE.get(key)
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        cands = gemv_candidates(kw["W8"], whole_k)
        cfg = _TUNE_CACHE[key] = compile_cache.pick(
            "gemv", key, w.device, cands, lambda: _tune(w, lambda c, wi: _launch(args, kw, c, wi), cands))
    return cfg


def gemv_candidates(w8: bool, whole_k: bool = False) -> list:
    """The one-row GEMV configs the tuner times: CONFIGS, and CONFIGS_W8 for int8 weights; only the whole-K ones
    (SPLIT 1) with whole_k."""
    cands = [*CONFIGS, *CONFIGS_W8] if w8 else list(CONFIGS)
    return [c for c in cands if c[2] == 1] if whole_k else cands


def _tune(w, launch, configs) -> tuple:
    """Time every config as the decode step runs it: launch(config, weight) back to back in one CUDA graph, each
    on the next of `tune_copies` copies of the weight w, the median of 5 replays per launch; return the fastest."""
    ws = [w] + [torch.empty_like(w) for _ in range(tune_copies(w.numel() * w.element_size()) - 1)]
    n = max(16, len(ws))
    times = {}
    for cfg in configs:
        try:
            times[cfg] = _graph_us(lambda i, c=cfg: launch(c, ws[i % len(ws)]), n)
        except Exception:  # noqa: BLE001  # a config this card cannot compile or launch (e.g. shared memory)
            times[cfg] = None
            torch.cuda.synchronize()
    return pick_fastest(times)


def row_block(rows: int) -> int:
    """The rows kernel's padded row count: 16 or 32 (`tl.dot` takes 16 rows at least)."""
    return 16 if rows <= 16 else 32


EAGER = "eager"  # the rows tuner's pick where cuBLAS (the eager reference) is the fastest for a shape


def row_candidates(dtype: torch.dtype, pro: int, w8: bool, k: int | None = None) -> list:
    """The rows configs the tuner times beside cuBLAS: for 16-bit activations with no prologue (the tree's
    `matmul` op) the turned kernel's and the two old ones that ever won there; with a prologue or int8 weights
    every config of both kernels, int8 also the wider ROW_CONFIGS_W8 and ROW_T_CONFIGS_W8; fp32 the turned kernel's
    3xTF32 ones (cuBLAS beat the old kernel's IEEE dot on every fp32 shape the sweeps timed). Where the weight's K
    (given) is at most WHOLE_K_MAX, the whole-K kernel's configs too, and in fp32 the turned kernel's deep-pipeline
    ones (ROW_T_CONFIGS_F32_DEEP)."""
    narrow = k is not None and k <= WHOLE_K_MAX
    whole_k = ROW_K_CONFIGS if narrow else []
    if dtype not in (torch.float16, torch.bfloat16):
        return [*ROW_T_CONFIGS_F32, *(ROW_T_CONFIGS_F32_DEEP if narrow else []), *whole_k]
    if pro == 0 and not w8:
        return [*ROW_CONFIGS_16, *ROW_T_CONFIGS, *whole_k]
    wide_w8 = [*ROW_CONFIGS_W8, *ROW_T_CONFIGS_W8] if w8 else []
    return [*ROW_CONFIGS, *ROW_T_CONFIGS, *wide_w8, *whole_k]


def _rows_linear(x, w, res, norm_w, eps: float, pro: int, rows: int, w_scale=None):
    """The rows kernel with the config tuned for (row block, shape), or the eager reference where the tuner
    timed cuBLAS faster than every config (so no shape gets slower than before the kernel)."""
    from ..ops import fused_linear_reference

    N, K = w.shape
    x, w = x.contiguous(), w.contiguous()
    y, args, kw = rows_args(x, w, res, norm_w, eps, pro, w_scale)
    key = ("rows", kw["MP"], N, K, pro, kw["HAS_RES"], w.dtype, w.device, pdl.mode())  # PDL: as in `_tuned`
    cfg = _TUNE_CACHE.get(key)
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():  # first use inside a capture: untuned, not remembered
            cfg = ROW_CONFIGS[2]
        else:
            name = PROLOGUE_NAMES[pro]

            def launch(c, wi):
                if c == EAGER:
                    fused_linear_reference(x, wi, res, norm_w, eps, name, w_scale)
                else:
                    _rows_launch(args, kw, c, wi)

            cands = [EAGER, *row_candidates(x.dtype, pro, kw["W8"], K)]
            cfg = _TUNE_CACHE[key] = compile_cache.pick("rows", key, w.device, cands, lambda: _tune(w, launch, cands))
            w8 = " w8" if kw["W8"] else ""
            TUNED.setdefault((N, K, f"{name} x{kw['MP']}{w8}"), cfg if cfg == EAGER else ",".join(map(str, cfg)))
    if cfg == EAGER:
        return fused_linear_reference(x, w, res, norm_w, eps, PROLOGUE_NAMES[pro], w_scale)
    _rows_launch(args, kw, cfg)
    return y


def rows_args(x, w, res, norm_w, eps: float, pro: int, w_scale=None):
    """(y, args, kw) of a rows-kernel launch on contiguous x [..., rows, K or 2K] and w [N, K] (int8 with
    w_scale [N]): y is the output."""
    N, K = w.shape
    rows = x.numel() // x.shape[-1]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    args = (x, w, w_scale.contiguous() if w_scale is not None else w, res.contiguous() if res is not None else y,
            norm_w.contiguous() if norm_w is not None else x, y, rows, N, float(eps))
    kw = {"K": K, "XS": x.shape[-1], "PRO": pro, "HAS_RES": res is not None, "MP": row_block(rows),
          "IEEE": x.dtype == torch.float32, "W8": w_scale is not None}
    return y, args, kw


def _rows_launch(args, kw, cfg, w=None) -> None:
    """One launch of a rows config: a ROW_CONFIGS entry (`_rows_kernel`), a ROW_T_CONFIGS(_F32) one
    (`_rows_t_kernel`) or a ROW_K_CONFIGS one (`_rows_k_kernel`)."""
    if w is not None:
        args = (args[0], w, *args[2:])
    N = args[7]
    if cfg[0] == "k":
        _, bn, rb, nwarps = cfg
        kk = {k: v for k, v in kw.items() if k != "IEEE"}
        _rows_k_kernel[(triton.cdiv(N, bn),)](*args, **kk, BLOCK_N=bn, BLOCK_K=triton.next_power_of_2(kw["K"]),
                                              RB=min(rb, kw["MP"]), num_warps=nwarps, num_stages=1,
                                              **_pdl_early(args[0].device))
        return
    if cfg[0] == "t":
        _, bn, bk, sp, nwarps, ns, *prec = cfg
        if kw["IEEE"] != bool(prec):
            raise ValueError(f"rows config {cfg}: a precision is given for fp32 activations, and only for them")
        ws, cnt = _rows_workspace(args[0].device, N, kw["MP"])
        kt = {k: v for k, v in kw.items() if k != "IEEE"}
        _rows_t_kernel[(triton.cdiv(N, bn), sp)](*args[:6], ws, cnt, *args[6:], **kt, BLOCK_N=bn, BLOCK_K=bk,
                                                  SPLIT=sp, PREC=prec[0] if prec else "", num_warps=nwarps,
                                                  num_stages=ns, **_pdl_early(args[0].device))
        return
    bn, bk, nwarps, ns = cfg
    _rows_kernel[(triton.cdiv(N, bn),)](*args, **kw, BLOCK_N=bn, BLOCK_K=bk, num_warps=nwarps, num_stages=ns,
                                        **pdl.kernel_args(args[0].device))


def _pdl_early(device) -> dict:
    """`pdl.kernel_args`, with the first weight tile loaded before the wait (EARLY_W) where PDL is on."""
    kw = pdl.kernel_args(device)
    return {**kw, "EARLY_W": True} if kw else kw


def _rows_workspace(device, n: int, mp: int):
    """The turned rows kernel's split-K scratch: fp32 partial tiles [n, mp] and arrival counters per feature block,
    zero at rest like `_workspace` (the tuner's first launch of a shape allocates it, before any capture). The
    fixed tree program runs its rows calls one after another on one stream, so one scratch per shape serves all."""
    key = ("rows", device, n, mp)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (torch.zeros(n * mp, dtype=torch.float32, device=device),
                                 torch.zeros(n, dtype=torch.int32, device=device))
    return ws


def _graph_us(launch, n: int, reps: int = 5) -> float:
    """Device microseconds per call of launch(i), i = 0..n-1 captured back to back in one CUDA graph: the
    median of `reps` timed replays after one untimed replay (compiles and loads run before the capture)."""
    for i in range(n):
        launch(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            launch(i)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    vals = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        vals.append(start.elapsed_time(end) * 1000 / n)
    return sorted(vals)[reps // 2]


PICKED: dict = {}  # (N, K, PRO) -> the config tuple this process's tuner picked (read by the AOTI twin)
WHOLE_K: dict = {}  # (N, K, PRO) -> the best whole-K config, for shapes where PICKED is split-K
AOTI_DEFAULT = (4, 1024, 1, 4, 1)  # a shape the tuner never saw (the export tunes every shape first)


def tune_for_aoti(x, w, res=None, norm_w=None, eps: float = 0.0, prologue: str = "none") -> tuple:
    """Pick the twin's config for this shape on real tensors: the Python op's own pick where it is whole-K
    (the package then computes the Python step's bits), else the fastest whole-K config."""
    triton_fused_linear(x, w, res, norm_w, eps, prologue)
    pro = PROLOGUES[prologue]
    N, K = w.shape
    key = (N, K, pro)
    if PICKED.get(key, AOTI_DEFAULT)[2] > 1:
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
        args = (x.contiguous(), w, w, res.contiguous() if res is not None else y,
                norm_w if norm_w is not None else x, y, y, y, y, N, float(eps))
        WHOLE_K[key] = _tuned(args, {"K": K, "PRO": pro, "HAS_RES": res is not None, "W8": False}, whole_k=True)
    return _aoti_config(key)


def _aoti_config(key) -> tuple:
    fixed = fixed_config()
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
        x, w, w, res.contiguous() if res is not None else y, norm_w if norm_w is not None else x, y, y, y, y, N,
        float(eps), K=K, PRO=pro, HAS_RES=res is not None, BLOCK_N=bn, BLOCK_K=bk, SPLIT=1, W8=False,
        num_warps=nwarps, num_stages=ns, **pdl.twin_args(x.device, early_w=True))
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


def fixed_config():
    """SPECEE_GEMV_CONFIG="BLOCK_N,BLOCK_K,SPLIT,num_warps,num_stages" skips tuning (tests,
    reproductions)."""
    v = os.environ.get("SPECEE_GEMV_CONFIG")
    if not v:
        return None
    try:
        bn, bk, sp, nw, ns = (int(t) for t in v.split(","))
    except ValueError:
        raise SettingError(f"SPECEE_GEMV_CONFIG={v!r}: expected five integers "
                           "BLOCK_N,BLOCK_K,SPLIT,num_warps,num_stages") from None
    return bn, bk, sp, nw, ns


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::fused_linear` (idempotent; False where triton is
    missing). Its SPECEE_GEMV_* settings are checked here, before any decoding, not at their first use."""
    max_rows()
    fixed_config()
    return register_kernel("specee::fused_linear", triton_fused_linear)
