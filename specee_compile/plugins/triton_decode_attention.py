"""The `specee::decode_attention` op as one split-S Triton kernel (CUDA, one query row).

At batch 1 and one new token, attention reads each head's K/V prefix once (Llama-2-7B at S = 320:
5 MB per layer, under 2 us at 3 TB/s) but cuDNN's flash kernel, tiled for long queries, takes ~8.5 us
on the H100 and needs two mask kernels in front. This kernel builds the mask itself (valid[j] and
j <= pos, the KV contract) and splits the prefix over programs (flash-decoding):

    grid (H, splits); program (h, s) covers blocks of BLOCK_S keys of head h's KV head (GQA: h // rep)
    online softmax over its keys -> (max m, sum l, acc[hd]) in an fp32 workspace
    the program of head h that arrives last (a counter per head) merges the splits, writes the row in
    the input dtype and resets the counter, so the workspace serves every call and graph replay.

fp32 math; scale 1/sqrt(hd) as SDPA's default. Rows q > 1 (prefill, pending rows) take the reference
(SDPA), where the flash kernels are the right tool.
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, register_kernel, tl, triton

BLOCK_S = 64  # keys per block: a [64, hd] K tile and V tile per step
MAX_SPLITS = 16  # a power of two (the merge reads all split slots as one vector)
NUM_WARPS = 4

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


def triton_decode_attention(q, k, v, valid, pos):
    from ..ops import decode_attention_reference

    H, rows, hd = q.shape
    Hkv, S, _ = k.shape
    usable = (
        HAVE_TRITON and rows == 1 and hd == triton.next_power_of_2(hd) and H % Hkv == 0
        and k.stride(-1) == 1 and v.stride(-1) == 1 and k.dtype == q.dtype == v.dtype
    )
    if not usable:
        return decode_attention_reference(q, k, v, valid, pos).contiguous()
    q = q.contiguous()
    o = torch.empty_like(q)
    ws, cnt = _workspace(q.device, H, hd)
    nsp, per = splits_for(S)
    _decode_attn_kernel[(H, nsp)](
        q, k, v, valid.view(torch.uint8) if valid.dtype == torch.bool else valid, pos, o, ws, cnt,
        S, 1.0 / math.sqrt(hd), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HD=hd, REP=H // Hkv, BLOCK_S=BLOCK_S, BLOCKS_PER_SPLIT=per, MAX_SPLITS=MAX_SPLITS, num_warps=NUM_WARPS,
    )
    return o


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::decode_attention` (idempotent; False where triton is missing)."""
    return register_kernel("specee::decode_attention", triton_decode_attention)
