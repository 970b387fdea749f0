"""The `specee::topk_rows` op as one Triton kernel (CUDA): the top k (k <= 16) of each row of a few rows.

The fixed tree program (`draft/tree.py`, issue t3) takes the top k of each expansion level's draft
log-probabilities ([8, ~8.7K] on the H200 at 7B shapes) and of each level's cumulative scores (8 or 64
values), ~11 and ~5 times per tree step. torch.topk runs a radix select and a sort per call (`gatherTopK`
+ `bitonicSortKVInPlace`: ~14 us per call on the H200, ~0.22 ms per 7B tree step in session 12's profile).
Here one program per row holds its row in registers and takes k maxima in turn:

    m = max over the live entries; i = the lowest live column holding m; emit (m, i); retire column i

Values come out sorted, largest first, as torch.topk's; ties go to the lowest column (torch.topk leaves
their order open); every column is emitted at most once, -inf entries included.

One program per row left 8 of the H200's 132 SMs busy on the draft's [8, ~8.7K] rows, each round two
block-wide reductions: 16.6 us per call on average (session-18 profile, ~0.18 ms per 7B tree step). Rows
longer than CHUNK are split: program (r, c), one warp, takes the top k of its chunk of row r the same way
into a workspace, and the program of row r that arrives last (a counter per row, as the attention kernels)
takes the top k of the row's chunks' candidates and resets its counter. The k largest of a row are among
its chunks' k largest, and ties still go to the lowest column (each chunk emits its lowest tied columns
first; the merge takes the lowest column among equal values): the same output as one program per row.
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, pdl, register_kernel, tl, triton

MAX_K = 16
MAX_N = 32768  # the row in registers: 32K fp32 over 8 warps is 128 values per thread
CHUNK = 512  # longer rows are split into chunks of this many columns (one warp each)

if HAVE_TRITON:

    @triton.jit
    def _topk_kernel(x_ptr, v_ptr, i_ptr, N, stride, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # programmatic dependent launch (plugins/pdl.py)
            tl.extra.cuda.gdc_wait()
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        live = offs < N
        x = tl.load(x_ptr + r.to(tl.int64) * stride + offs, mask=live, other=float("-inf")).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        for j in tl.static_range(K):
            m = tl.max(tl.where(live, x, float("-inf")), axis=0)
            # a NaN row matches nothing: the clamp keeps its index inside the row
            i = tl.minimum(tl.min(tl.where(live & (x == m), offs, BLOCK), axis=0), N - 1)
            tl.store(v_ptr + r * K + j, m.to(v_ptr.dtype.element_ty))
            tl.store(i_ptr + r * K + j, i.to(tl.int64))
            live = live & (offs != i)

    @triton.jit
    def _topk_chunks_kernel(x_ptr, v_ptr, i_ptr, wv_ptr, wi_ptr, cnt_ptr, N, stride,
                            K: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr, MERGE: tl.constexpr,
                            PDL: tl.constexpr = False):
        if PDL:
            tl.extra.cuda.gdc_wait()
        r = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        live = offs < N
        x = tl.load(x_ptr + r.to(tl.int64) * stride + offs, mask=live, other=float("-inf")).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        cand = (r * NCH + c) * K
        for j in tl.static_range(K):  # this chunk's top k; a spent chunk emits column N (no column)
            m = tl.max(tl.where(live, x, float("-inf")), axis=0)
            i = tl.min(tl.where(live & (x == m), offs, N), axis=0)
            tl.store(wv_ptr + cand + j, m)
            tl.store(wi_ptr + cand + j, i)
            live = live & (offs != i)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel") == NCH - 1:  # the row's last chunk: merge
            o = tl.arange(0, MERGE)
            ok = o < NCH * K
            vals = tl.load(wv_ptr + r * NCH * K + o, mask=ok, other=float("-inf"), cache_modifier=".cg")
            idx = tl.load(wi_ptr + r * NCH * K + o, mask=ok, other=N, cache_modifier=".cg")
            ok = ok & (idx < N)
            for j in tl.static_range(K):
                m = tl.max(tl.where(ok, vals, float("-inf")), axis=0)
                i = tl.minimum(tl.min(tl.where(ok & (vals == m), idx, N), axis=0), N - 1)  # NaN: inside the row
                tl.store(v_ptr + r * K + j, m.to(v_ptr.dtype.element_ty))
                tl.store(i_ptr + r * K + j, i.to(tl.int64))
                ok = ok & (idx != i)
            tl.store(cnt_ptr + r, 0)


_WORKSPACES: dict = {}


def _workspace(device, rows: int, chunks: int, k: int):
    """(candidate values fp32, their columns int32, counters int32 [rows]) for one shape; made on the first
    call (a warm-up, before any capture in every caller)."""
    key = (device, rows, chunks, k)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (torch.empty(rows * chunks * k, dtype=torch.float32, device=device),
                                 torch.empty(rows * chunks * k, dtype=torch.int32, device=device),
                                 torch.zeros(rows, dtype=torch.int32, device=device))
    return ws


def triton_topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    usable = (HAVE_TRITON and 1 <= k <= min(MAX_K, n) and n <= MAX_N and x.stride(-1) == 1
              and x.dtype in (torch.float32, torch.float16, torch.bfloat16))
    if not usable:
        return torch.topk(x, k, dim=-1)
    rows = x.reshape(-1, n)  # a view where the rows are evenly strided (copied otherwise)
    v = torch.empty(rows.shape[0], k, dtype=x.dtype, device=x.device)
    i = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    block = triton.next_power_of_2(n)
    if rows.shape[0] and n > CHUNK:
        nch = triton.cdiv(n, CHUNK)
        wv, wi, cnt = _workspace(x.device, rows.shape[0], nch, k)
        _topk_chunks_kernel[(rows.shape[0], nch)](rows, v, i, wv, wi, cnt, n, rows.stride(0), K=k, CHUNK=CHUNK,
                                                  NCH=nch, MERGE=triton.next_power_of_2(nch * k), num_warps=1,
                                                  **pdl.kernel_args(x.device))
    elif rows.shape[0]:
        _topk_kernel[(rows.shape[0],)](rows, v, i, n, rows.stride(0), K=k, BLOCK=block,
                                       num_warps=8 if block >= 4096 else 4, **pdl.kernel_args(x.device))
    return v.view(*x.shape[:-1], k), i.view(*x.shape[:-1], k)


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::topk_rows` (idempotent; False where triton is missing)."""
    return register_kernel("specee::topk_rows", triton_topk_rows)
