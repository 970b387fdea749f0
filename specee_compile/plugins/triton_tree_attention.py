"""The `specee::tree_attention` op as one split-S Triton kernel (CUDA): attention of a few query rows under an
explicit [q, S] mask (tree verification's rows and the draft tree's levels, issue t3).

A 7B tree step attends 32 verification layers of ~25 rows and ~6 draft levels of 4-8 rows, each over a
short cache (S = 256 in the bench). cuDNN's flash kernel, tiled for long queries, took 9.4 us per call on
the H200 (session-18 profile: 38 calls and ~0.36 ms per tree step), and Inductor put a mask kernel (valid &
mask) and layout copies of q in front of it. At S = 256 a layer's K/V is 4 MB (fp16, 32 heads), under
1 us of HBM reads. Here:

    grid (H, row blocks of BR rows, splits); program (h, rb, sp) covers `per` blocks of BLOCK_S keys of
    head h's KV head (GQA: h // rep) for its BR rows, with the key mask built inside (valid[j] and
    mask[r, j]): scores by tl.dot, online softmax in fp32, then P (in the input dtype, as flash kernels
    do) by tl.dot with V
    one split: the rows are written at once; several: (m, l, acc) go to an fp32 workspace and the program
    of (h, rb) that arrives last (a counter per (h, rb)) merges them, writes the rows and resets its
    counter, so the workspace serves every call and graph replay (as `triton_decode_attention`).

The output [H, q, hd] is stored rows-major (a contiguous [q, H, hd], `ops.rows_major`), so the o-projection's
input is a view of it. Scale 1/sqrt(hd), SDPA's default. fp32 inputs take IEEE or 3xTF32 dot products, the tuner's
pick (never plain TF32). Every real row must be allowed at least one valid key (its own slot, in the tree's use);
padding rows are never written.

The launch config (keys per block, most splits, warps, pipeline stages) is tuned on CUDA per shape at its first
call outside a capture (the warm-ups before a graph is captured), as the fused GEMV's: every config and the
reference (cuDNN's kernel through SDPA) are timed back to back in a CUDA graph over copies of K/V that L2
cannot hold, and the fastest is kept, so no shape runs slower than before the kernel. Session 18's profile
had the first config (64 keys, up to 8 splits, 4 warps) at 8.1 us per call against cuDNN's 9.4.
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, compile_cache, pdl, register_kernel, tl, triton

BLOCK_S = 64  # keys per block (the untuned config: CPU, the interpreter, a first call inside a capture)
MAX_SPLITS = 8  # splits of S per (head, row block)
MAX_ROWS = 64  # more rows than this take the reference (SDPA): a tree budget past it is not the kernel's case
NUM_WARPS = 4
NUM_STAGES = 1
EAGER = "eager"  # the tuner's pick where the reference (cuDNN through SDPA) is the fastest for a shape
# (BLOCK_S, MAX_SPLITS, num_warps, num_stages): split-S with a merge, and unsplit loops that Triton pipelines.
# fp32 takes these with IEEE dot products (CUDA-core FMAs)...
CONFIGS = ((64, 8, 4, 1), (64, 4, 4, 2), (64, 1, 4, 2), (32, 8, 4, 1), (128, 2, 8, 2), (128, 1, 8, 3))
# ...and these, fp32 only, with 3xTF32 dot products (three tensor-core passes, hi*hi + hi*lo + lo*hi: fp32's
# accuracy to ~1e-6, as the fp32 verification's matmuls already run, `triton_gemv.ROW_T_CONFIGS_F32`). An IEEE
# split of SmolLM2's 25 verification rows x 64 keys is ~2k FMAs per thread for the two products: the step's
# attention took 8.1 us per call on the H100 (session 34), most of it in those FMAs. The split ones won every
# SmolLM2 shape there (session 35) at 6.8 us per call (session 36's profile: 33 calls, 13% of a tree step's kernel
# time); the last three, unsplit or split in two, skip the merge (a workspace round trip and a counter) that a
# split pays at S <= 256, where one program's K/V (~130 KB in fp32) is a short loop.
CONFIGS_F32_TF32X3 = tuple((*c, "tf32x3") for c in ((64, 8, 4, 1), (64, 4, 4, 2), (32, 8, 4, 1), (64, 8, 8, 1),
                                                     (64, 1, 4, 2), (128, 1, 8, 2), (64, 2, 4, 2)))
TUNED: dict = {}  # (heads, kv heads, rows, S, hd, dtype) -> the pick as a string, filled on first use (the bench)
_TUNE_CACHE: dict = {}

if HAVE_TRITON:

    @triton.jit
    def _tree_attn_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, mask_ptr, o_ptr, ws_ptr, cnt_ptr,
        R, S, sm_scale, stride_qh, stride_qr, stride_kh, stride_ks, stride_vh, stride_vs, stride_mr, stride_ms,
        HD: tl.constexpr, REP: tl.constexpr, BR: tl.constexpr, BLOCK_S: tl.constexpr, PER: tl.constexpr,
        NSP: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False,
    ):
        if PDL:  # programmatic dependent launch (plugins/pdl.py)
            tl.extra.cuda.gdc_wait()
        h = tl.program_id(0)
        rb = tl.program_id(1)
        sp = tl.program_id(2)
        nrb = tl.num_programs(1)
        kvh = h // REP
        d = tl.arange(0, HD)
        r = rb * BR + tl.arange(0, BR)
        live_r = r < R
        q = tl.load(q_ptr + h * stride_qh + r[:, None] * stride_qr + d[None, :], mask=live_r[:, None], other=0.0)
        m = tl.full([BR], -float("inf"), tl.float32)
        l_sum = tl.zeros([BR], dtype=tl.float32)
        acc = tl.zeros([BR, HD], dtype=tl.float32)
        base = sp * PER * BLOCK_S
        for b in range(PER):
            offs = base + b * BLOCK_S + tl.arange(0, BLOCK_S)
            inb = offs < S
            kt = tl.load(k_ptr + kvh * stride_kh + offs[None, :] * stride_ks + d[:, None], mask=inb[None, :], other=0.0)
            if PREC != "":  # fp32: "ieee" or "tf32x3"
                sc = tl.dot(q, kt, input_precision=PREC)
            else:
                sc = tl.dot(q, kt)
            sc = sc * tl.cast(sm_scale, tl.float32)  # [BR, BLOCK_S]
            ok_k = inb & (tl.load(valid_ptr + offs, mask=inb, other=0) != 0)
            ok = tl.load(mask_ptr + r[:, None] * stride_mr + offs[None, :] * stride_ms,
                         mask=live_r[:, None] & ok_k[None, :], other=0) != 0
            sc = tl.where(ok, sc, -float("inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with nothing allowed yet: exp() finite
            alpha = tl.exp(m - m_ref)
            p = tl.exp(sc - m_ref[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_ptr + kvh * stride_vh + offs[:, None] * stride_vs + d[None, :], mask=inb[:, None], other=0.0)
            if PREC != "":
                pv = tl.dot(p, vt.to(tl.float32), input_precision=PREC)
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        out_rows = o_ptr + (r[:, None] * tl.num_programs(0) + h) * HD + d[None, :]  # rows-major [R, H, HD]
        if NSP == 1:
            tl.store(out_rows, (acc / l_sum[:, None]).to(o_ptr.dtype.element_ty), mask=live_r[:, None])
        else:
            slot = ((h * nrb + rb) * NSP + sp) * BR + tl.arange(0, BR)  # this split's rows in the workspace
            tl.store(ws_ptr + slot[:, None] * (HD + 2) + d[None, :], acc)
            tl.store(ws_ptr + slot * (HD + 2) + HD, m)
            tl.store(ws_ptr + slot * (HD + 2) + HD + 1, l_sum)
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr + h * nrb + rb, 1, sem="acq_rel") == NSP - 1:  # last split: merge
                mx = tl.full([BR], -float("inf"), tl.float32)
                for i in tl.static_range(NSP):
                    row = ((h * nrb + rb) * NSP + i) * BR + tl.arange(0, BR)
                    mx = tl.maximum(mx, tl.load(ws_ptr + row * (HD + 2) + HD, cache_modifier=".cg"))
                mx = tl.where(mx == -float("inf"), 0.0, mx)
                num = tl.zeros([BR, HD], dtype=tl.float32)
                den = tl.zeros([BR], dtype=tl.float32)
                for i in tl.static_range(NSP):
                    row = ((h * nrb + rb) * NSP + i) * BR + tl.arange(0, BR)
                    w = tl.exp(tl.load(ws_ptr + row * (HD + 2) + HD, cache_modifier=".cg") - mx)
                    den += w * tl.load(ws_ptr + row * (HD + 2) + HD + 1, cache_modifier=".cg")
                    num += w[:, None] * tl.load(ws_ptr + row[:, None] * (HD + 2) + d[None, :], cache_modifier=".cg")
                tl.store(out_rows, (num / den[:, None]).to(o_ptr.dtype.element_ty), mask=live_r[:, None])
                tl.store(cnt_ptr + h * nrb + rb, 0)


_WORKSPACES: dict = {}


def _workspace(device, programs: int, splits: int, br: int, hd: int):
    """(fp32 workspace, int32 counters) for `programs` (head, row block) pairs of `splits` splits; one per
    shape and config, made on the first call (a warm-up or the tuner, before any capture in every caller)."""
    key = (device, programs, splits, br, hd)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = (
            torch.empty(programs * splits * br * (hd + 2), dtype=torch.float32, device=device),
            torch.zeros(programs, dtype=torch.int32, device=device),
        )
    return ws


def plan(rows: int, S: int, block_s: int | None = None, max_splits: int | None = None) -> tuple[int, int, int, int]:
    """(BR rows per block, row blocks, splits, blocks per split) for `rows` query rows over S keys, with
    `block_s` keys per block and at most `max_splits` splits (default: the module's untuned config)."""
    br = max(16, triton.next_power_of_2(rows)) if rows <= 32 else 32  # tl.dot needs 16 rows or more
    blocks = triton.cdiv(S, block_s or BLOCK_S)
    per = triton.cdiv(blocks, max_splits or MAX_SPLITS)
    return br, triton.cdiv(rows, br), triton.cdiv(blocks, per), per


def triton_tree_attention(q, k, v, valid, mask):
    from ..ops import rows_major, tree_attention_reference

    H, rows, hd = q.shape
    Hkv, S, _ = k.shape
    usable = (
        HAVE_TRITON and 1 <= rows <= MAX_ROWS and 16 <= hd == triton.next_power_of_2(hd) and H % Hkv == 0
        and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and k.dtype == q.dtype == v.dtype
        and tuple(mask.shape) == (rows, S)
    )
    if not usable:
        return rows_major(tree_attention_reference(q, k, v, valid, mask))
    cfg = (BLOCK_S, MAX_SPLITS, NUM_WARPS, NUM_STAGES)
    if q.is_cuda:
        cfg = _tuned(q, k, v, valid, mask) or cfg
    if cfg == EAGER:
        return rows_major(tree_attention_reference(q, k, v, valid, mask))
    return _launch(cfg, q, k, v, valid, mask)


def configs(dtype: torch.dtype) -> list:
    """The launch configs the tuner times for q's dtype (besides the reference): CONFIGS, and for fp32 also
    CONFIGS_F32_TF32X3."""
    return [*CONFIGS, *CONFIGS_F32_TF32X3] if dtype == torch.float32 else list(CONFIGS)


def _launch(cfg, q, k, v, valid, mask) -> torch.Tensor:
    block_s, max_splits, warps, stages = cfg[:4]
    prec = (cfg[4] if len(cfg) > 4 else "ieee") if q.dtype == torch.float32 else ""  # "": the dtype's own dot
    H, rows, hd = q.shape
    Hkv, S, _ = k.shape
    o = torch.empty(rows, H, hd, dtype=q.dtype, device=q.device).transpose(0, 1)  # `ops.rows_major`
    br, nrb, nsp, per = plan(rows, S, block_s, max_splits)
    ws, cnt = _workspace(q.device, H * nrb, nsp, br, hd)
    _tree_attn_kernel[(H, nrb, nsp)](
        q, k, v, valid.view(torch.uint8) if valid.dtype == torch.bool else valid,
        mask.view(torch.uint8) if mask.dtype == torch.bool else mask, o, ws, cnt,
        rows, S, 1.0 / math.sqrt(hd), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        mask.stride(0), mask.stride(1),
        HD=hd, REP=H // Hkv, BR=br, BLOCK_S=block_s, PER=per, NSP=nsp, PREC=prec,
        num_warps=warps, num_stages=stages, **pdl.kernel_args(q.device),
    )
    return o


def _tuned(q, k, v, valid, mask):
    """The config for this call's shape: the tuner's pick, cached per shape; None (the untuned config, not
    remembered) on a first call inside a stream capture."""
    from ..ops import tree_attention_reference
    from .triton_gemv import _tune

    H, rows, hd = q.shape
    Hkv, S, _ = k.shape
    key = (H, Hkv, rows, S, hd, q.dtype, q.device, pdl.mode())  # PDL: timed as it is launched
    cfg = _TUNE_CACHE.get(key)
    if cfg is not None or torch.cuda.is_current_stream_capturing():
        return cfg

    def launch(c, kv):  # kv: K and V of one layer stacked, or one of the tuner's copies of them
        if c == EAGER:
            tree_attention_reference(q, kv[0], kv[1], valid, mask)
        else:
            _launch(c, q, kv[0], kv[1], valid, mask)

    cands = [EAGER, *configs(q.dtype)]
    cfg = _TUNE_CACHE[key] = compile_cache.pick("tree_attention", key, q.device, cands,
                                                lambda: _tune(torch.stack([k, v]), launch, cands))
    TUNED[(H, Hkv, rows, S, hd, str(q.dtype).removeprefix("torch."))] = (
        cfg if cfg == EAGER else ",".join(map(str, cfg)))
    return cfg


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::tree_attention` (idempotent; False where triton is missing)."""
    return register_kernel("specee::tree_attention", triton_tree_attention)
