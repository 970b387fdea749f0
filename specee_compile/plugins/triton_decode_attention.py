"""The `specee::decode_attention` op as one split-S Triton kernel (CUDA, one query row).

At batch 1 and one new token, attention reads each head's K/V prefix once (Llama-2-7B at S = 320:
5 MB per layer, under 2 us at 3 TB/s) but cuDNN's flash kernel, tiled for long queries, takes ~8.5 us
on the H100 and needs two mask kernels in front. This kernel builds the mask itself (valid[j] and
j <= pos, the KV contract) and splits the prefix over programs (flash-decoding):

    grid (H, splits); program (h, s) covers blocks of BLOCK_S keys of head h's KV head (GQA: h // rep)
    online softmax over its keys -> (max m, sum l, acc[hd]) in an fp32 workspace
    the program of head h that arrives last (a counter per head) merges the splits, writes the row in
    the input dtype and resets the counter, so the workspace serves every call and graph replay.

fp32 math; scale 1/sqrt(hd) as SDPA's default.

Rows 2..ROWS_MAX (`_rows_attn_kernel`: a draft's catch-up rows; with an explicit [q, S] mask,
`specee::masked_attention`, the tree's verification and expansion rows): one program per (head, block of
rows) over the whole prefix, [BLOCK_R x hd] queries against [BLOCK_S x hd] key tiles with `tl.dot` (IEEE
float32 for float32; the tensor cores for half types, probabilities rounded to the input dtype as flash
kernels do) and an online softmax per row. The mask is read (masked mode) or built from valid[j] and
j <= pos[r] (causal mode). More rows (prefill) take the reference (SDPA), where the flash kernels are the
right tool. The rows kernel is opt-in (`SPECEE_ROWS_KERNEL=1`, float32; `triton_gemv.rows_kernel_on`):
measured slower than SDPA + cuBLAS on the H200, so 2..ROWS_MAX rows take the reference by default.
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, register_kernel, tl, triton

BLOCK_S = 64  # keys per block: a [64, hd] K tile and V tile per step
MAX_SPLITS = 16  # a power of two (the merge reads all split slots as one vector)
NUM_WARPS = 4
ROWS_MAX = 64  # the rows kernel's limit (BLOCK_R = 16 rows per program)
BLOCK_R = 16

if HAVE_TRITON:

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, o_ptr, ws_ptr, cnt_ptr,
        S, sm_scale, stride_kh, stride_ks, stride_vh, stride_vs,
        HD: tl.constexpr, REP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
        MAX_SPLITS: tl.constexpr,
    ):
        h = tl.program_id(0)
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        kvh = h // REP
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + h * HD + d).to(tl.float32) * sm_scale
        pos = tl.load(pos_ptr)
        m = tl.full([], -float("inf"), tl.float32)
        l_sum = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        base = sp * BLOCKS_PER_SPLIT * BLOCK_S
        for b in range(BLOCKS_PER_SPLIT):
            offs = base + b * BLOCK_S + tl.arange(0, BLOCK_S)
            inb = offs < S
            kt = tl.load(k_ptr + kvh * stride_kh + offs[:, None] * stride_ks + d[None, :], mask=inb[:, None], other=0.0)
            vt = tl.load(v_ptr + kvh * stride_vh + offs[:, None] * stride_vs + d[None, :], mask=inb[:, None], other=0.0)
            ok = inb & (tl.load(valid_ptr + offs, mask=inb, other=0) != 0) & (offs <= pos)
            sc = tl.where(ok, tl.sum(kt.to(tl.float32) * q[None, :], axis=1), -float("inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # all masked so far: keep exp() finite
            alpha = tl.exp(m - m_ref)
            p = tl.exp(sc - m_ref)
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            m = m_new
        row = ws_ptr + (h * MAX_SPLITS + sp) * (HD + 2)
        tl.store(row + d, acc)
        tl.store(row + HD, m)
        tl.store(row + HD + 1, l_sum)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel") == nsp - 1:  # last split of head h: merge
            # every split's (m, l, acc) in one round of L2 reads (.cg: not through this SM's L1)
            i = tl.arange(0, MAX_SPLITS)
            live = i < nsp
            rows = ws_ptr + (h * MAX_SPLITS + i) * (HD + 2)
            ms = tl.load(rows + HD, mask=live, other=-float("inf"), cache_modifier=".cg")
            ls = tl.load(rows + HD + 1, mask=live, other=0.0, cache_modifier=".cg")
            accs = tl.load(rows[:, None] + d[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
            w = tl.where(live, tl.exp(ms - tl.max(ms, axis=0)), 0.0)  # the current position is valid: max finite
            out = tl.sum(w[:, None] * accs, axis=0) / tl.sum(w * ls, axis=0)
            tl.store(o_ptr + h * HD + d, out.to(o_ptr.dtype.element_ty))
            tl.store(cnt_ptr + h, 0)


    @triton.jit
    def _rows_attn_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, valid_ptr, pos_ptr, o_ptr,
        R, S, sm_scale, stride_kh, stride_ks, stride_vh, stride_vs, stride_mr,
        HD: tl.constexpr, REP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, NBLK: tl.constexpr,
        HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        # NBLK = cdiv(S, BLOCK_S): a compile-time trip count (S is an attention bucket: a few values)
        # q, o [H, R, HD]; k, v [Hkv, S, HD] (strided views of the cache); mask [R, S] (HAS_MASK) or
        # valid [S] + pos [R] (causal over the valid prefix)
        DT: tl.constexpr = o_ptr.dtype.element_ty
        h = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < R
        kvh = h // REP
        d = tl.arange(0, HD)
        qa = q_ptr + (h * R + r)[:, None] * HD + d[None, :]
        q = tl.load(qa, mask=rm[:, None], other=0.0).to(tl.float32) * sm_scale  # [BLOCK_R, HD]
        if not IEEE:
            q = q.to(DT)
        if not HAS_MASK:
            pos = tl.load(pos_ptr + r, mask=rm, other=-1)
        m = tl.full([BLOCK_R], -float("inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, HD], dtype=tl.float32)
        for blk in range(NBLK):
            offs = blk * BLOCK_S + tl.arange(0, BLOCK_S)
            inb = offs < S
            kt = tl.load(k_ptr + kvh * stride_kh + offs[:, None] * stride_ks + d[None, :], mask=inb[:, None], other=0.0)
            vt = tl.load(v_ptr + kvh * stride_vh + offs[:, None] * stride_vs + d[None, :], mask=inb[:, None], other=0.0)
            if HAS_MASK:
                ok = tl.load(mask_ptr + r[:, None] * stride_mr + offs[None, :], mask=rm[:, None] & inb[None, :],
                             other=0) != 0
            else:
                vld = tl.load(valid_ptr + offs, mask=inb, other=0) != 0
                ok = (vld & inb)[None, :] & (offs[None, :] <= pos[:, None])
            if IEEE:
                sc = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(kt)).to(tl.float32)
            sc = tl.where(ok, sc, -float("inf"))  # [BLOCK_R, BLOCK_S]
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # all masked so far: keep exp() finite
            alpha = tl.exp(m - m_ref)
            p = tl.exp(sc - m_ref[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(DT), vt).to(tl.float32)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(o_ptr + (h * R + r)[:, None] * HD + d[None, :], out.to(DT), mask=rm[:, None])


_WORKSPACES: dict = {}


def _workspace(device, heads: int, hd: int):
    key = (device, heads, hd)
    ws = _WORKSPACES.get(key)
    if ws is None:  # first call of a shape: before any capture in every caller (warm-up)
        ws = _WORKSPACES[key] = (
            torch.empty(heads * MAX_SPLITS * (hd + 2), dtype=torch.float32, device=device),
            torch.zeros(heads, dtype=torch.int32, device=device),
        )
    return ws


def splits_for(S: int) -> tuple[int, int]:
    """(splits, blocks per split) for an attended length S."""
    blocks = triton.cdiv(S, BLOCK_S)
    per = triton.cdiv(blocks, MAX_SPLITS)
    return triton.cdiv(blocks, per), per


def _usable(q, k, v) -> bool:
    from .triton_gemv import rows_kernel_on

    H, rows, hd = q.shape
    if rows > 1 and not rows_kernel_on(q.dtype):
        return False
    return (
        HAVE_TRITON and 1 <= rows <= ROWS_MAX and hd == triton.next_power_of_2(hd) and hd >= 16
        and H % k.shape[0] == 0 and k.stride(-1) == 1 and v.stride(-1) == 1 and k.dtype == q.dtype == v.dtype
    )


def _u8(t):
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _rows_attention(q, k, v, mask, valid, pos):
    """The rows kernel: mask [R, S] bool, or (mask None) valid [S] + pos [R]."""
    H, R, hd = q.shape
    Hkv, S, _ = k.shape
    q = q.contiguous()
    o = torch.empty_like(q)
    has_mask = mask is not None
    mask_t = _u8(mask.contiguous()) if has_mask else q
    _rows_attn_kernel[(H, triton.cdiv(R, BLOCK_R))](
        q, k, v, mask_t, _u8(valid) if valid is not None else q, pos if pos is not None else q, o,
        R, S, 1.0 / math.sqrt(hd), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        mask_t.stride(0) if has_mask else 0,
        HD=hd, REP=H // Hkv, BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, NBLK=triton.cdiv(S, BLOCK_S), HAS_MASK=has_mask,
        IEEE=q.dtype == torch.float32, num_warps=NUM_WARPS,
    )
    return o


def triton_masked_attention(q, k, v, mask):
    from ..ops import masked_attention_reference

    if not _usable(q, k, v):
        return masked_attention_reference(q, k, v, mask).contiguous()
    return _rows_attention(q, k, v, mask, None, None)


def triton_decode_attention(q, k, v, valid, pos):
    from ..ops import decode_attention_reference

    H, rows, hd = q.shape
    Hkv, S, _ = k.shape
    if not _usable(q, k, v):
        return decode_attention_reference(q, k, v, valid, pos).contiguous()
    if rows > 1:
        return _rows_attention(q, k, v, None, valid, pos.contiguous())
    q = q.contiguous()
    o = torch.empty_like(q)
    ws, cnt = _workspace(q.device, H, hd)
    nsp, per = splits_for(S)
    _decode_attn_kernel[(H, nsp)](
        q, k, v, _u8(valid), pos, o, ws, cnt,
        S, 1.0 / math.sqrt(hd), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HD=hd, REP=H // Hkv, BLOCK_S=BLOCK_S, BLOCKS_PER_SPLIT=per, MAX_SPLITS=MAX_SPLITS, num_warps=NUM_WARPS,
    )
    return o


def register_cuda_impl() -> bool:
    """Make the kernels the CUDA implementations of `specee::decode_attention` and `specee::masked_attention`
    (idempotent; False where triton is missing)."""
    a = register_kernel("specee::decode_attention", triton_decode_attention)
    return register_kernel("specee::masked_attention", triton_masked_attention) and a
