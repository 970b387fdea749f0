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

`specee_aoti::decode_attention` is the same kernel for AOTInductor packages (the C++ runner's one-row
layer, `backends/aoti_export.py`): a `torch.library.triton_op`, which an AOTI package embeds (a Python
custom op it cannot call). One launch, as the Python kernel: its state, which a package cannot own, is
the caller's, as the Python step keeps one of each for every layer: the arrival counters (an int32 [H]
input, zero between calls; the kernel leaves it zero) and the fp32 workspace (`workspace_numel`).
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, pdl, register_kernel, tl, triton

BLOCK_S = 64  # keys per block: a [64, hd] K tile and V tile per step
MAX_SPLITS = 16  # a power of two (the merge reads all split slots as one vector)
NUM_WARPS = 4

if HAVE_TRITON:
    from .pdl import launch_token, wait_token

    @triton.jit
    def _attn_split(
        q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, ws_ptr, h, sp, S, per, sm_scale,
        stride_kh, stride_ks, stride_vh, stride_vs,
        HD: tl.constexpr, REP: tl.constexpr, BLOCK_S: tl.constexpr, MAX_SPLITS: tl.constexpr, NB: tl.constexpr,
    ):
        # split sp of head h: keys [sp * per * BLOCK_S, (sp + 1) * per * BLOCK_S) -> (acc, m, l) in its
        # workspace row (a split past S leaves acc = 0, m = -inf, l = 0: weight 0 in the merge). NB >= per
        # iterations: blocks b >= per are masked, which leaves (m, l, acc) bit-equal (alpha = 1, p = 0)
        kvh = h // REP
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + h * HD + d).to(tl.float32) * tl.cast(sm_scale, tl.float32)  # AOTI passes floats as fp64
        pos = tl.load(pos_ptr)
        m = tl.full([], -float("inf"), tl.float32)
        l_sum = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        base = sp * per * BLOCK_S
        for b in range(NB):
            offs = base + b * BLOCK_S + tl.arange(0, BLOCK_S)
            inb = (offs < S) & (b < per)
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

    @triton.jit
    def _attn_merge(ws_ptr, o_ptr, h, nsp, HD: tl.constexpr, MAX_SPLITS: tl.constexpr):
        # every split's (m, l, acc) of head h in one round of L2 reads (.cg: not through this SM's L1)
        d = tl.arange(0, HD)
        i = tl.arange(0, MAX_SPLITS)
        live = i < nsp
        rows = ws_ptr + (h * MAX_SPLITS + i) * (HD + 2)
        ms = tl.load(rows + HD, mask=live, other=-float("inf"), cache_modifier=".cg")
        ls = tl.load(rows + HD + 1, mask=live, other=0.0, cache_modifier=".cg")
        accs = tl.load(rows[:, None] + d[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
        w = tl.where(live, tl.exp(ms - tl.max(ms, axis=0)), 0.0)  # the current position is valid: max finite
        out = tl.sum(w[:, None] * accs, axis=0) / tl.sum(w * ls, axis=0)
        tl.store(o_ptr + h * HD + d, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, o_ptr, ws_ptr, cnt_ptr,
        S, sm_scale, stride_kh, stride_ks, stride_vh, stride_vs,
        HD: tl.constexpr, REP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
        MAX_SPLITS: tl.constexpr, PDL: tl.constexpr = False,
    ):
        if PDL:  # programmatic dependent launch: the wait as a token every later access takes (plugins/pdl.py)
            t = wait_token()
            q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr = q_ptr + t, k_ptr + t, v_ptr + t, valid_ptr + t, pos_ptr + t
            o_ptr, ws_ptr, cnt_ptr = o_ptr + t, ws_ptr + t, cnt_ptr + t
        h = tl.program_id(0)
        nsp = tl.num_programs(1)
        _attn_split(q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, ws_ptr, h, tl.program_id(1), S, BLOCKS_PER_SPLIT,
                    sm_scale, stride_kh, stride_ks, stride_vh, stride_vs, HD, REP, BLOCK_S, MAX_SPLITS,
                    BLOCKS_PER_SPLIT)
        if PDL:
            cnt_ptr += launch_token(t)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel") == nsp - 1:  # last split of head h: merge
            _attn_merge(ws_ptr, o_ptr, h, nsp, HD, MAX_SPLITS)
            tl.store(cnt_ptr + h, 0)

    # The AOTInductor twin (`specee_aoti::decode_attention`) for packages whose S may pass BLOCK_S * MAX_SPLITS
    # (below that the twin launches `_decode_attn_kernel` itself): the same split and merge in one launch. The
    # attended length S is dynamic in the package, so the grid is fixed at MAX_SPLITS splits per head and
    # the kernel computes `splits_for(S)` itself: (nsp, per); programs past nsp return at once, and the
    # live ones run exactly the Python kernel's splits and merge (the same bits). NB: the most blocks per
    # split any S of the package needs.
    @triton.jit
    def _aoti_attn_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, o_ptr, ws_ptr, cnt_ptr,
        S, sm_scale, stride_kh, stride_ks, stride_vh, stride_vs,
        HD: tl.constexpr, REP: tl.constexpr, BLOCK_S: tl.constexpr, MAX_SPLITS: tl.constexpr, NB: tl.constexpr,
    ):
        h = tl.program_id(0)
        sp = tl.program_id(1)
        blocks = tl.cdiv(S, BLOCK_S)
        per = tl.cdiv(blocks, MAX_SPLITS)
        nsp = tl.cdiv(blocks, per)
        if sp < nsp:
            _attn_split(q_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, ws_ptr, h, sp, S, per,
                        sm_scale, stride_kh, stride_ks, stride_vh, stride_vs, HD, REP, BLOCK_S, MAX_SPLITS, NB)
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel") == nsp - 1:  # last split of head h: merge
                _attn_merge(ws_ptr, o_ptr, h, nsp, HD, MAX_SPLITS)
                tl.store(cnt_ptr + h, 0)


_WORKSPACES: dict = {}


def _workspace(device, heads: int, hd: int):
    key = (device, heads, hd)
    ws = _WORKSPACES.get(key)
    if ws is None:  # first call of a shape: before any capture in every caller (warm-up)
        ws = _WORKSPACES[key] = (
            torch.empty(workspace_numel(heads, hd), dtype=torch.float32, device=device),
            torch.zeros(heads, dtype=torch.int32, device=device),
        )
    return ws


def workspace_numel(heads: int, hd: int) -> int:
    """Elements of the fp32 split workspace: (m, l, acc[hd]) per split slot per head."""
    return heads * MAX_SPLITS * (hd + 2)


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
        **pdl.kernel_args(q.device),
    )
    return o


def _upper(n) -> int:
    """n, or the upper bound of a symbolic size (S in a traced package: torch.export's Dim max)."""
    if isinstance(n, int):
        return n
    return int(n.node.shape_env.bound_sympy(n.node.expr).upper)


def _aoti_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                    pos: torch.Tensor, counters: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """`specee_aoti::decode_attention`: one query row (the decode step of an AOTI layer package); the same
    numbers as `triton_decode_attention` (the same splits, the same merge order). counters: int32 [H],
    zero on entry, zero again on return (the last split of a head resets its counter). ws: the fp32
    workspace [workspace_numel(H, hd)], any contents: one for every layer, as the Python step's."""
    H, rows, hd = q.shape
    Hkv = k.shape[0]
    if rows != 1 or hd != triton.next_power_of_2(hd) or H % Hkv:
        raise ValueError(f"specee_aoti::decode_attention: one row and a power-of-two head_dim, got q {tuple(q.shape)}")
    if counters is None or counters.dtype != torch.int32 or tuple(counters.shape) != (H,):
        got = None if counters is None else f"{counters.dtype} {tuple(counters.shape)}"
        raise ValueError(f"specee_aoti::decode_attention: counters must be int32 [{H}] (zero), got {got}")
    n = workspace_numel(H, hd)
    if ws is None or ws.dtype != torch.float32 or ws.numel() != n or not ws.is_contiguous():
        got = None if ws is None else f"{ws.dtype} {tuple(ws.shape)}"
        raise ValueError(f"specee_aoti::decode_attention: ws must be a contiguous float32 [{n}], got {got}")
    q = q.contiguous()
    o = torch.empty_like(q)
    S = k.shape[1]
    if splits_for(_upper(S))[1] == 1:  # every S of the package (<= BLOCK_S * MAX_SPLITS): one block per split
        # the Python step's own kernel on (H, blocks(S)) programs, S symbolic in the grid: 0.5 us less per
        # layer than the fixed-grid twin in a chain of one-row layers on the H200 (GPU_NOTES, session 11)
        wrap_triton(_decode_attn_kernel)[(H, (S + BLOCK_S - 1) // BLOCK_S)](
            q, k, v, valid, pos, o, ws, counters, S, 1.0 / math.sqrt(hd), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), HD=hd, REP=H // Hkv, BLOCK_S=BLOCK_S, BLOCKS_PER_SPLIT=1, MAX_SPLITS=MAX_SPLITS,
            num_warps=NUM_WARPS, **pdl.twin_args(q.device),
        )
        return o
    wrap_triton(_aoti_attn_kernel)[(H, MAX_SPLITS)](
        q, k, v, valid, pos, o, ws, counters,  # bool as it is (Inductor cannot lower a bool -> uint8 view)
        S, 1.0 / math.sqrt(hd), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HD=hd, REP=H // Hkv, BLOCK_S=BLOCK_S, MAX_SPLITS=MAX_SPLITS, NB=splits_for(_upper(S))[1],
        num_warps=NUM_WARPS,
    )
    return o


if HAVE_TRITON:
    from torch.library import triton_op, wrap_triton

    aoti_decode_attention = triton_op("specee_aoti::decode_attention", _aoti_attention,
                                      mutates_args={"counters", "ws"})


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::decode_attention` (idempotent; False where triton is missing)."""
    return register_kernel("specee::decode_attention", triton_decode_attention)
