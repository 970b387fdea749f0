"""The `specee::rows_mlp` op as one persistent Triton kernel (CUDA): the second half of a decoder layer for a few
rows, the o-projection's residual, RMSNorm, gate/up, SiLU x up and the down projection's residual, in one launch.

Why: at SmolLM2's widths a tree step is bound by its launches, not its bytes (benchmarks/RESULTS.md, session 36's
profile: 464 launches, ~15 per verification layer, each small one 1.3-2.4 us, each 25-row matmul 5-10 us for 1-7
MB of weights). The layer's half after attention is five of them: the o-projection, the residual add + RMSNorm,
gate/up, SiLU x up and the down projection. Here they are three phases of one grid of P programs (P <= the SMs,
so every program is resident at once), with a grid-wide barrier (an arrival counter) between phases:

    phase 1  h1 = h + a . Wo^T                          (BN features a tile)
    phase 2  act = SiLU(n . Wg^T) * (n . Wu^T), n = RMSNorm(h1) (BJ intermediate features a tile; each program
             takes its rows' statistics from all of h1 first)
    phase 3  out = h1 + act . Wd^T                      (BN features a tile, split-K in SPLIT parts: the split
             that arrives last sums the parts in split order, so the result does not depend on arrival order)

Each tile's product is the turned rows kernel's (`triton_gemv._rows_t_kernel`): acc [features, rows] = W_tile .
x_tile^T on the tensor cores, 3xTF32 for fp32. Every value is rounded where the eager ops round it
(`ops.rows_mlp_reference`: the "matmul" form of `model_step.make_layer_parts`), so the only differences from it are
the sums' order.
h1 and act live in scratch between phases, read back from L2 (`.cg`: never a stale L1 line). The counter is
reset by the program that leaves last, so the scratch serves every call and every CUDA-graph replay.
PDL: the programs wait before their first global access; they release the next kernel only after the last
barrier, when every program of this grid is resident (a dependent kernel that started earlier could hold SMs that
a program not yet started needs, and the barrier would never open).

`PHASE` 1, 2 or 3 runs one phase (three launches, no barrier): the Triton interpreter runs a grid's programs one
after another, so a barrier there waits forever unless P = 1; the tests run both forms.
The launch config (BN, BK, BJ, SPLIT, num_warps, num_stages) is tuned per shape on CUDA at the first call outside a
capture, among `CONFIGS` (16-bit) or `CONFIGS_F32`; the picks are kept on disk (`compile_cache`).
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, compile_cache, pdl, register_kernel, tl, triton

MAX_ROWS = 32
# (BN, BK, BJ, SPLIT, num_warps, num_stages). fp32 (SmolLM2): 16-feature tiles (mma.sync, many programs on 576-wide
# outputs), 3xTF32 dots; 16-bit (7B widths): 64-feature tiles for a warpgroup MMA.
CONFIGS_F32 = [
    (16, 64, 16, 1, 4, 3),
    (16, 64, 16, 2, 4, 3),
    (16, 64, 16, 4, 4, 3),
    (16, 32, 16, 4, 4, 4),
    (32, 64, 16, 2, 4, 3),
]
CONFIGS = [
    (64, 128, 64, 1, 4, 3),
    (64, 128, 64, 2, 4, 3),
    (64, 256, 32, 2, 4, 3),
    (64, 128, 32, 4, 4, 4),
]
TUNED: dict = {}  # (D, KO, I, rows block, dtype) -> the pick as a string, filled on first use (the bench records it)
_TUNE_CACHE: dict = {}
_WORKSPACES: dict = {}

if HAVE_TRITON:
    from .triton_gemv import _round, _rows_norm, _rows_t_dot

    @triton.jit
    def _grid_sync(bar_ptr, target):
        # every program's stores of the phase are done (CTA barrier) and released with its arrival; then wait until
        # `target` arrivals are counted (acquire: the other programs' stores are visible after it)
        tl.debug_barrier()
        tl.atomic_add(bar_ptr, 1, sem="acq_rel")
        n = tl.atomic_add(bar_ptr, 0, sem="acq_rel")
        while n < target:
            n = tl.atomic_add(bar_ptr, 0, sem="acq_rel")
        tl.debug_barrier()

    @triton.jit
    def _tile(w_ptr, x_ptr, cols, cm, r, rm, k_lo, KLEN: tl.constexpr, K: tl.constexpr, BN: tl.constexpr,
              MP: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        # acc [BN, MP] = W[cols, k_lo:k_lo + KLEN] . x[rows, k_lo:k_lo + KLEN]^T (x [rows, K] from L2)
        acc = tl.zeros([BN, MP], dtype=tl.float32)
        wrow = w_ptr + cols.to(tl.int64)[:, None] * K
        xrow = x_ptr + r[:, None] * K
        for k0 in range(0, KLEN, BK):
            offs = k_lo + k0 + tl.arange(0, BK)
            km = offs < K
            a = tl.load(xrow + offs[None, :], mask=rm[:, None] & km[None, :], other=0.0, cache_modifier=".cg")
            wt = tl.load(wrow + offs[None, :], mask=cm[:, None] & km[None, :], other=0.0)
            acc = _rows_t_dot(acc, wt, a.to(DT), DT, PREC)
        return acc

    @triton.jit
    def _rows_mlp_kernel(
        a_ptr, h_ptr, wo_ptr, ln_ptr, wgu_ptr, wd_ptr, h1_ptr, act_ptr, out_ptr, ws_ptr, cnt_ptr, bar_ptr,
        M, eps, D: tl.constexpr, KO: tl.constexpr, I: tl.constexpr, MP: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, SPLIT: tl.constexpr, PHASE: tl.constexpr,
        PREC: tl.constexpr, PDL: tl.constexpr = False,
    ):
        if PDL:
            tl.extra.cuda.gdc_wait()
        DT: tl.constexpr = out_ptr.dtype.element_ty
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        r = tl.arange(0, MP)
        rm = r < M
        # (each phase's tiles are dealt out round robin: `while`, where the Triton interpreter takes no `range` over
        # a program id)
        if PHASE == 0 or PHASE == 1:  # h1 = h + a . Wo^T
            t = pid
            while t < triton.cdiv(D, BN):
                cols = t * BN + tl.arange(0, BN)
                cm = cols < D
                om = cm[:, None] & rm[None, :]
                acc = _tile(wo_ptr, a_ptr, cols, cm, r, rm, 0, KO, KO, BN, MP, BK, DT, PREC)
                y = _round(acc, DT) + tl.load(h_ptr + r[None, :] * D + cols[:, None], mask=om, other=0.0).to(tl.float32)
                tl.store(h1_ptr + r[None, :] * D + cols[:, None], y.to(DT), mask=om)
                t += P
        if PHASE == 0:
            _grid_sync(bar_ptr, P)
        if PHASE == 0 or PHASE == 2:  # act = SiLU(n . Wg^T) * (n . Wu^T), n = RMSNorm(h1)
            sq = tl.zeros([MP], dtype=tl.float32)
            for k0 in range(0, D, BK):
                offs = k0 + tl.arange(0, BK)
                xv = tl.load(h1_ptr + r[:, None] * D + offs[None, :], mask=rm[:, None] & (offs < D)[None, :],
                             other=0.0, cache_modifier=".cg").to(tl.float32)
                sq += tl.sum(xv * xv, axis=1)
            rstd = 1.0 / tl.sqrt(sq / D + tl.cast(eps, tl.float32))
            t = pid
            while t < triton.cdiv(I, BJ):
                j = t * BJ + tl.arange(0, BJ)
                jm = j < I
                acc_g = tl.zeros([BJ, MP], dtype=tl.float32)
                acc_u = tl.zeros([BJ, MP], dtype=tl.float32)
                for k0 in range(0, D, BK):
                    offs = k0 + tl.arange(0, BK)
                    km = offs < D
                    xv = tl.load(h1_ptr + r[:, None] * D + offs[None, :], mask=rm[:, None] & km[None, :], other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                    xn = _rows_norm(xv, ln_ptr, offs, km, rstd, DT).to(DT)
                    wm = jm[:, None] & km[None, :]
                    wg = tl.load(wgu_ptr + j.to(tl.int64)[:, None] * D + offs[None, :], mask=wm, other=0.0)
                    wu = tl.load(wgu_ptr + (j + I).to(tl.int64)[:, None] * D + offs[None, :], mask=wm, other=0.0)
                    acc_g = _rows_t_dot(acc_g, wg, xn, DT, PREC)
                    acc_u = _rows_t_dot(acc_u, wu, xn, DT, PREC)
                g = _round(acc_g, DT)
                act = _round(_round(g / (1.0 + tl.exp(-g)), DT) * _round(acc_u, DT), DT)
                tl.store(act_ptr + r[None, :] * I + j[:, None], act.to(DT), mask=jm[:, None] & rm[None, :])
                t += P
        if PHASE == 0:
            _grid_sync(bar_ptr, 2 * P)
            if PDL:  # every program is resident now (all arrived): the next kernel may be scheduled
                tl.extra.cuda.gdc_launch_dependents()
        if PHASE == 0 or PHASE == 3:  # out = h1 + act . Wd^T, split-K
            KS: tl.constexpr = triton.cdiv(triton.cdiv(I, SPLIT), BK) * BK
            t = pid
            while t < triton.cdiv(D, BN) * SPLIT:
                tn = t // SPLIT
                sp = t % SPLIT
                cols = tn * BN + tl.arange(0, BN)
                cm = cols < D
                om = cm[:, None] & rm[None, :]
                acc = _tile(wd_ptr, act_ptr, cols, cm, r, rm, sp * KS, KS, I, BN, MP, BK, DT, PREC)
                last = True
                if SPLIT > 1:  # the parts meet in the workspace; the last to arrive sums them in split order
                    wsp = ws_ptr + cols[:, None] * MP + r[None, :]
                    tl.store(wsp + sp * D * MP, acc, mask=om)
                    tl.debug_barrier()
                    last = tl.atomic_add(cnt_ptr + tn, 1, sem="acq_rel") == SPLIT - 1
                    if last:
                        acc = tl.zeros([BN, MP], dtype=tl.float32)
                        for s in tl.static_range(SPLIT):
                            acc += tl.load(wsp + s * D * MP, mask=om, other=0.0, cache_modifier=".cg")
                        tl.store(cnt_ptr + tn, 0)
                if last:
                    h1 = tl.load(h1_ptr + r[None, :] * D + cols[:, None], mask=om, other=0.0, cache_modifier=".cg")
                    y = _round(acc, DT) + h1.to(tl.float32)
                    tl.store(out_ptr + r[None, :] * D + cols[:, None], y.to(DT), mask=om)
                t += P
        if PHASE == 0:  # the program that leaves last resets the counter: every program has left both waits
            tl.debug_barrier()
            if tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel") == P - 1:
                tl.store(bar_ptr, 0)
                tl.store(bar_ptr + 1, 0)


def rows_block(rows: int) -> int:
    """The padded row count of a tile's dot: 16 or 32 (`tl.dot` takes 16 rows at least)."""
    return 16 if rows <= 16 else 32


def configs(dtype: torch.dtype) -> list:
    """The launch configs the tuner times for the activations' dtype."""
    return list(CONFIGS_F32) if dtype == torch.float32 else list(CONFIGS)


def programs(cfg, D: int, I: int, device) -> int:
    """P, the grid: enough programs for the widest phase's tiles, never more than the card's SMs (every program
    must be resident at once for the barriers to open)."""
    bn, _, bj, split = cfg[:4]
    tiles = max(-(-D // bn), -(-I // bj), -(-D // bn) * split)
    if device.type != "cuda":
        return tiles
    return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def _workspace(device, dtype, rows: int, mp: int, D: int, I: int, split: int):
    """(h1, act, split-K partials, split arrival counters, barrier counters) for one shape and split: scratch
    that every call leaves as it found it (counters zero), made at the first call (a warm-up, before any capture)."""
    key = (device, dtype, rows, mp, D, I, split)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (
            torch.empty(rows, D, dtype=dtype, device=device),
            torch.empty(rows, I, dtype=dtype, device=device),
            torch.empty(max(split, 1) * D * mp, dtype=torch.float32, device=device),
            torch.zeros(-(-D // 16), dtype=torch.int32, device=device),
            torch.zeros(2, dtype=torch.int32, device=device),
        )
    return ws


def launch(cfg, a, h, wo, ln2, wgu, wd, eps: float, phased: bool = False, n_programs: int | None = None):
    """out [..., rows, D] of one call with cfg; `phased`: three launches, one per phase (no barrier), as the
    Triton interpreter needs; `n_programs` overrides P (the tests' P = 1)."""
    D, KO = wo.shape
    I = wd.shape[1]
    rows = h.numel() // D
    mp = rows_block(rows)
    bn, bk, bj, split, nwarps, ns = cfg
    h1, act, ws, cnt, bar = _workspace(h.device, h.dtype, rows, mp, D, I, split)
    out = torch.empty_like(h)
    prec = "tf32x3" if h.dtype == torch.float32 else ""
    args = (a, h, wo, ln2, wgu, wd, h1, act, out, ws, cnt, bar, rows, float(eps))
    kw = {"D": D, "KO": KO, "I": I, "MP": mp, "BN": bn, "BK": bk, "BJ": bj, "SPLIT": split, "PREC": prec,
          "num_warps": nwarps, "num_stages": ns}
    if phased:
        for phase, tiles in ((1, -(-D // bn)), (2, -(-I // bj)), (3, -(-D // bn) * split)):
            _rows_mlp_kernel[(tiles,)](*args, **kw, PHASE=phase)
        return out
    p = n_programs or programs(cfg, D, I, h.device)
    _rows_mlp_kernel[(p,)](*args, **kw, PHASE=0, **pdl.kernel_args(h.device))
    return out


def usable(a, h, wo, ln2, wgu, wd) -> bool:
    """Whether the kernel takes this call: 2..MAX_ROWS rows, float weights of the activations' dtype (an int8 draft
    keeps the separate ops), shapes of one layer, contiguous weights."""
    if not HAVE_TRITON or ln2 is None:
        return False
    D = h.shape[-1]
    rows = h.numel() // D
    ts = (a, h, wo, ln2, wgu, wd)
    return (
        2 <= rows <= MAX_ROWS and all(isinstance(t, torch.Tensor) and t.dtype == h.dtype for t in ts)
        and h.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.is_contiguous() for t in (wo, ln2, wgu, wd))
        and wo.shape[0] == D and a.shape[-1] == wo.shape[1] and a.numel() // a.shape[-1] == rows
        and wgu.shape[1] == D and wgu.shape[0] == 2 * wd.shape[1] and wd.shape[0] == D and ln2.shape == (D,)
    )


def _tuned(a, h, wo, ln2, wgu, wd, eps: float):
    """The config for this call's shape: the fastest of `configs`, timed back to back in a CUDA graph over copies
    of the weights that L2 cannot hold (`triton_gemv._tune`'s method), kept on disk; None inside a capture."""
    from .triton_gemv import _graph_us, pick_fastest, tune_copies

    D, KO = wo.shape
    I = wd.shape[1]
    rows = h.numel() // D
    key = ("rows_mlp", D, KO, I, rows_block(rows), h.dtype, h.device, pdl.mode())
    cfg = _TUNE_CACHE.get(key)
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        cands = configs(h.dtype)

        def tune():
            nbytes = sum(t.numel() * t.element_size() for t in (wo, wgu, wd))
            ws = [(wo, wgu, wd)] + [tuple(torch.empty_like(t) for t in (wo, wgu, wd))
                                    for _ in range(tune_copies(nbytes) - 1)]
            n = max(16, len(ws))
            times = {}
            for c in cands:
                try:
                    times[c] = _graph_us(lambda i, c=c: launch(c, a, h, ws[i % len(ws)][0], ln2, ws[i % len(ws)][1],
                                                               ws[i % len(ws)][2], eps), n)
                except Exception:  # noqa: BLE001  # a config this card cannot compile or launch
                    times[c] = None
                    torch.cuda.synchronize()
            return pick_fastest(times)

        cfg = _TUNE_CACHE[key] = compile_cache.pick("rows_mlp", key, h.device, cands, tune)
        TUNED.setdefault((D, KO, I, rows_block(rows), str(h.dtype).replace("torch.", "")), ",".join(map(str, cfg)))
    return cfg


def triton_rows_mlp(a, h, wo, ln2, wgu, wd, eps: float):
    """`specee::rows_mlp` on CUDA: the persistent kernel inside `ops.multi_row_kernel()` (the fixed tree
    program's capture) where `usable`, else the eager reference."""
    from ..ops import multi_row_kernel_on, rows_mlp_reference

    if not (multi_row_kernel_on() and usable(a, h, wo, ln2, wgu, wd)):
        return rows_mlp_reference(a, h, wo, ln2, wgu, wd, eps)
    a, h = a.contiguous(), h.contiguous()
    cfg = _tuned(a, h, wo, ln2, wgu, wd, eps) or configs(h.dtype)[0]
    return launch(cfg, a, h, wo, ln2, wgu, wd, eps)


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::rows_mlp` (idempotent; False where triton is missing)."""
    return register_kernel("specee::rows_mlp", triton_rows_mlp)
