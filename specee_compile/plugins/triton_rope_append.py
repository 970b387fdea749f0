"""The `specee::rope_append` op as one Triton kernel (CUDA: the decode step's row, and rows at slots of their own).

Between a layer's QKV projection and its attention, the decode step rotates q and k at the row's
position, writes k and v into the layer's cache at that slot and marks the slot valid (the KV contract).
Inductor compiles those plain ops into four small kernels per layer (K rotate + write, V write, valid
mark, q rotate), each ~1 us on the H200 plus the idle time between launches: ~4.2 us of a ~25 us
SmolLM2 layer (GPU_NOTES, sessions 10 and 13). This kernel does all of it in one launch:

    grid (Hkv, rows): program (j, r) rotates the REP query heads of group j of row r and its key head j
    (fp32 math, one rounding to the input dtype, as Inductor's fused pointwise code rounds) at the row's
    position, stores k and v at cache[j, slot_r] and, in program (0, r), valid[slot_r] = 1.

Rows at slots of their own (`slots`: the tree verification's rows and the draft tree's levels, whose
nodes share positions) take it too. There Inductor fused the plain ops (rotation, index_copy, the
attention mask) into one kernel of ~7 us per 7B layer (H200 session-13 profile, 25 rows); the kernel here
does the rotation and the cache write for those rows in one small launch (not yet timed on the GPU). Other
rows (the prefill, pending rows) take the reference (`ops.rope_append_reference`), bit for bit.

`specee_aoti::rope_append` is the same kernel for AOTInductor packages (the C++ runner's one-row layer,
`backends/aoti_export.py`): a `torch.library.triton_op`, which a package embeds, writing the cache and
validity inputs the caller owns.
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, pdl, register_kernel, tl, triton

if HAVE_TRITON:
    from .pdl import launch_token, wait_token

    @triton.jit
    def _rope_append_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_ptr, v_ptr, valid_ptr, q_out_ptr,
        stride_kh, stride_ks, stride_vh, stride_vs, rows, stride_pos, stride_slot,
        H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, PDL: tl.constexpr = False,
    ):
        if PDL:  # programmatic dependent launch: the wait as a token every later access takes (plugins/pdl.py)
            t = wait_token()
            qkv_ptr, pos_ptr, slot_ptr, k_ptr, v_ptr = qkv_ptr + t, pos_ptr + t, slot_ptr + t, k_ptr + t, v_ptr + t
            valid_ptr, q_out_ptr = valid_ptr + t, q_out_ptr + t  # (cos and sin are written only at build time)
        j = tl.program_id(0)
        r = tl.program_id(1)
        REP: tl.constexpr = H // HKV
        HALF: tl.constexpr = HD // 2
        W: tl.constexpr = (H + 2 * HKV) * HD  # one row of qkv
        DT: tl.constexpr = q_out_ptr.dtype.element_ty
        d = tl.arange(0, HD)
        partner = (d + HALF) % HD  # rotate_half: [-x[HALF:], x[:HALF]]
        sign = tl.where(d < HALF, -1.0, 1.0)
        pos = tl.load(pos_ptr + r * stride_pos)  # (stride 0: one position for all rows, a tree level's)
        slot = tl.load(slot_ptr + r * stride_slot)
        c = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
        row = qkv_ptr + r * W
        for i in tl.static_range(REP):
            src = row + (j * REP + i) * HD
            x = tl.load(src + d).to(tl.float32)
            xp = tl.load(src + partner).to(tl.float32)
            tl.store(q_out_ptr + ((j * REP + i) * rows + r) * HD + d, (x * c + sign * xp * s).to(DT))
        src = row + (H + j) * HD
        x = tl.load(src + d).to(tl.float32)
        xp = tl.load(src + partner).to(tl.float32)
        if PDL:
            t = launch_token(t)
            k_ptr, v_ptr = k_ptr + t, v_ptr + t
        tl.store(k_ptr + j * stride_kh + slot * stride_ks + d, (x * c + sign * xp * s).to(DT))
        tl.store(v_ptr + j * stride_vh + slot * stride_vs + d, tl.load(row + (H + HKV + j) * HD + d))
        if j == 0:
            tl.store(valid_ptr + slot, tl.full([], 1, valid_ptr.dtype.element_ty))


def _launch(qkv, cos, sin, pos, slots, k_cache, v_cache, valid, launcher, **pdl_kw) -> torch.Tensor:
    """q [H, rows, hd] of the kernel over qkv [1, rows, (H + 2 Hkv) hd] (contiguous), writing k, v at `slots`;
    pdl_kw: `pdl.kernel_args` (the Python op's launches only)."""
    Hkv, hd = k_cache.shape[0], k_cache.shape[-1]
    H, rows = qkv.shape[-1] // hd - 2 * Hkv, qkv.shape[1]
    q = torch.empty(H, rows, hd, dtype=qkv.dtype, device=qkv.device)
    launcher[(Hkv, rows)](
        qkv, cos, sin, pos, slots, k_cache, v_cache, valid, q,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), rows, pos.stride(0), slots.stride(0),
        H=H, HKV=Hkv, HD=hd, num_warps=1, **pdl_kw,
    )
    return q


def triton_rope_append(qkv, cos, sin, pos, k_cache, v_cache, valid, slots=None):
    from ..ops import rope_append_reference

    Hkv, hd = k_cache.shape[0], k_cache.shape[-1]
    rows = qkv.shape[1]
    usable = (
        HAVE_TRITON and (rows == 1 or slots is not None) and pos.dim() == 1 and pos.numel() == rows
        and (slots is None or (slots.dim() == 1 and slots.numel() == rows))
        and hd == triton.next_power_of_2(hd)
        and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and tuple(cos.shape[1:]) == (hd,)
        and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and valid.is_contiguous()
        and qkv.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype
        and (qkv.shape[-1] // hd - 2 * Hkv) % Hkv == 0
    )
    if not usable:
        return rope_append_reference(qkv, cos, sin, pos, k_cache, v_cache, valid, slots).contiguous()
    return _launch(qkv, cos, sin, pos, pos if slots is None else slots, k_cache, v_cache,
                   valid.view(torch.uint8) if valid.dtype == torch.bool else valid, _rope_append_kernel,
                   **pdl.kernel_args(qkv.device))


def _aoti_rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`specee_aoti::rope_append`: one row (the decode step of an AOTI layer package), the Python op's kernel
    (the same bits); k_cache, v_cache and valid are the package's inputs, written in place."""
    Hkv, hd = k_cache.shape[0], k_cache.shape[-1]
    if qkv.shape[1] != 1 or hd != triton.next_power_of_2(hd) or (qkv.shape[-1] // hd - 2 * Hkv) % Hkv:
        raise ValueError(f"specee_aoti::rope_append: one row and a power-of-two head_dim, got qkv "
                         f"{tuple(qkv.shape)} with a cache of {tuple(k_cache.shape)}")
    # bool validity as it is (as the attention twin); the slots are the positions
    return _launch(qkv.contiguous(), cos, sin, pos, pos, k_cache, v_cache, valid, wrap_triton(_rope_append_kernel),
                   **pdl.twin_args(qkv.device))


if HAVE_TRITON:
    from torch.library import triton_op, wrap_triton

    aoti_rope_append = triton_op("specee_aoti::rope_append", _aoti_rope_append,
                                 mutates_args={"k_cache", "v_cache", "valid"})


def register_cuda_impl() -> bool:
    """Make the kernel the CUDA implementation of `specee::rope_append` (idempotent; False where triton is missing)."""
    return register_kernel("specee::rope_append", triton_rope_append)
