"""The custom ops of the decode step, each defined once with an eager reference and a fake (shapes
only) implementation, so torch.export, the passes and Inductor carry them; on CUDA their Triton
kernels (`plugins/`) are registered by `register_cuda_kernels()`.

- `specee::exit_score`: the exit point (below), lowered by every backend.
- `specee::fused_linear`: a decode matmul with its RMSNorm / SiLU*up prologue and residual add; its weight may
  be int8 with one scale per output row (`quantize_rows`: the draft's `--draft-quant int8`).
- `specee::decode_attention`: attention over a layer's valid cache prefix (the KV contract's mask).
- `specee::tree_attention`: the same for a few rows under an explicit [q, S] mask (a tree's rows).
- `specee::rope_append`: the rows' rotary embedding, K/V cache writes and validity mark, before it.
- `specee::topk_rows`: torch.topk(x, k) along the last dim, for the fixed draft tree's few short rows.
fused_linear, decode_attention, tree_attention and rope_append appear only where `model_step` is asked for them
(`fused=`, the CUDA Inductor path); the ONNX exporter and the eager backend use the plain ops.

The exit point:

    exit_score(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps) -> (score, z, p)

h [1, 1, D] hidden state after the layer; norm_w [D] the model's final norm; rows [k, D] the LM-head
rows of the k candidate tokens; p_prev [k] the candidate distribution at the previous evaluated layer
(zeros at the first); w1 [Hm, 3k], b1 [Hm], w2 [Hm], b2 [1] the layer's predictor MLP.
score [1] = sigmoid(MLP([z, p, p - p_prev])); z [k] candidate logits; p [k] = softmax(z).

Eager reference: `predictors.features.exit_features` + the MLP. Fake: shapes only. Inductor traces
through the reference (or the fused Triton kernel on GPU, `plugins/triton_exit_score.py`); the ONNX
exporter decomposes it into plain ops.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .model_step import rms_norm, rope, split_qkv


def exit_score_reference(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float):
    from .predictors.features import exit_features

    hn = rms_norm(h.reshape(-1), norm_w, eps)  # [D]
    x, z, p = exit_features(hn, rows, p_prev)  # x [3k] float32
    hidden = torch.relu(torch.nn.functional.linear(x, w1.float(), b1.float()))  # [Hm]
    score = torch.sigmoid((hidden * w2.float()).sum(-1, keepdim=True) + b2.float())  # [1]
    return score, z, p


@torch.library.custom_op("specee::exit_score", mutates_args=())
def exit_score(
    h: torch.Tensor,
    norm_w: torch.Tensor,
    rows: torch.Tensor,
    p_prev: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    score, z, p = exit_score_reference(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps)
    return score.clone(), z.clone(), p.clone()


@exit_score.register_fake
def _(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps):
    k = rows.shape[0]
    f32 = torch.float32
    return h.new_empty(1, dtype=f32), h.new_empty(k, dtype=f32), h.new_empty(k, dtype=f32)


# ------------------------------------------------------------------------------------ fused_linear
FUSED_PROLOGUES = ("none", "rmsnorm", "silu_mul")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 with one scale per output row (symmetric, round to nearest): w [N, K] ->
    (q int8 [N, K], scale float32 [N]) with w ~ q * scale[:, None]. A row of zeros gets scale 1.
    Per-row scales commute with stacking rows, so a fused q|k|v or gate|up weight quantizes as its parts."""
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale per row, in `dtype`: the weights an int8 layer computes with (its eager twin's)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def linear_w8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale).T as the int8 kernels compute it: fp32 products and sums, the row scale applied to the
    sum, one rounding to x's dtype."""
    return (torch.nn.functional.linear(x.float(), q.float()) * scale.float()).to(x.dtype)


def fused_linear_reference(x, w, res=None, norm_w=None, eps: float = 0.0, prologue: str = "none", w_scale=None):
    """The eager math `model_step` writes out: prologue(x) @ w.T (+ res); with w_scale, w is int8 and
    the matmul is `linear_w8(x, w, w_scale)`."""
    if prologue == "rmsnorm":
        x = rms_norm(x, norm_w, eps)
    elif prologue == "silu_mul":
        g, u = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(g) * u
    elif prologue != "none":
        raise ValueError(f"fused_linear: prologue {prologue!r} is not one of {FUSED_PROLOGUES}")
    y = torch.nn.functional.linear(x, w) if w_scale is None else linear_w8(x, w, w_scale)
    return y if res is None else res + y


_MULTI_ROW = contextvars.ContextVar("specee_multi_row_kernel", default=False)


@contextlib.contextmanager
def multi_row_kernel():
    """Inside: `specee::fused_linear` on 2..32 rows runs the rows kernel on CUDA (`plugins/triton_gemv.py`).
    Outside, more than one row keeps the eager reference (cuBLAS), whose bits the C++ runner's multi-row
    package reproduces (prefill, lossless pending rows): only programs with no C++ counterpart enter it (the
    fixed tree program's capture: its verification rows and the draft's levels)."""
    token = _MULTI_ROW.set(True)
    try:
        yield
    finally:
        _MULTI_ROW.reset(token)


def multi_row_kernel_on() -> bool:
    return _MULTI_ROW.get()


@torch.library.custom_op("specee::fused_linear", mutates_args=())
def fused_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    res: torch.Tensor | None = None,
    norm_w: torch.Tensor | None = None,
    eps: float = 0.0,
    prologue: str = "none",
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """prologue(x) @ w.T (+ res), one weight-streaming kernel on CUDA (`plugins/triton_gemv.py`).

    x [1, q, K] (or [1, q, 2K] for silu_mul: the fused gate|up output); w [N, K]; res [1, q, N].
    w_scale [N] float32: w is int8 (`quantize_rows`), half the bytes of an fp16 weight to stream."""
    return fused_linear_reference(x, w, res, norm_w, eps, prologue, w_scale).clone()


@fused_linear.register_fake
def _(x, w, res=None, norm_w=None, eps=0.0, prologue="none", w_scale=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


# -------------------------------------------------------------------------------- decode_attention
def decode_attention_reference(q, k, v, valid, pos):
    """Attention of q rows over the cache prefix, as `model_step` writes it: row r attends to key j
    where valid[j] and j <= pos[r]. q [H, q, hd]; k, v [Hkv, S, hd] (views of the cache); valid [S]
    bool; pos [q] int64 -> [H, q, hd]. The tree rows' attention with the causal mask j <= pos[r]."""
    keys = torch.arange(k.shape[1], device=q.device)
    return tree_attention_reference(q, k, v, valid, keys[None, :] <= pos[:, None])


@torch.library.custom_op("specee::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Masked attention over the layer's valid cache prefix; one split-S Triton kernel on CUDA for a
    single row (`plugins/triton_decode_attention.py`)."""
    return decode_attention_reference(q, k, v, valid, pos).clone(memory_format=torch.contiguous_format)


@decode_attention.register_fake
def _(q, k, v, valid, pos):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------- tree_attention
def tree_attention_reference(q, k, v, valid, mask):
    """Attention of q rows under an explicit mask, as `model_step`'s layer writes it for tree rows: row r
    attends to key j where valid[j] and mask[r, j]. q [H, q, hd]; k, v [Hkv, S, hd]; valid [S] bool; mask
    [q, S] bool -> [H, q, hd]."""
    H, Hkv = q.shape[0], k.shape[0]
    keep = valid[None, :] & mask
    a = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=keep[None, None], enable_gqa=H != Hkv
    )
    return a[0]


def rows_major(a: torch.Tensor) -> torch.Tensor:
    """[H, q, hd] with the memory of a contiguous [q, H, hd] (`tree_attention`'s output): the layer's
    `a.transpose(0, 1).reshape(1, q, H * hd)` for the o-projection is then a view, not a copy kernel."""
    return a.transpose(0, 1).contiguous().transpose(0, 1)


@torch.library.custom_op("specee::tree_attention", mutates_args=())
def tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked attention of a few rows over the layer's valid cache prefix (a tree's rows); one split-S Triton
    kernel on CUDA (`plugins/triton_tree_attention.py`), where cuDNN's flash kernel and its mask kernel run.
    The output [H, q, hd] is laid out rows-major (`rows_major`)."""
    return rows_major(tree_attention_reference(q, k, v, valid, mask))


@tree_attention.register_fake
def _(q, k, v, valid, mask):
    return rows_major(q.new_empty(q.shape))


# ------------------------------------------------------------------------------------- rope_append
def rope_append_reference(qkv, cos, sin, pos, k_cache, v_cache, valid, slots=None):
    """What `model_step`'s layer does between the QKV projection and attention: split qkv [1, q, (H + 2 Hkv)
    hd] into heads, rotate q and k at `pos` [q] (cos, sin [T, hd] tables), write k and v into k_cache,
    v_cache [Hkv, T, hd] at `slots` [q] (default `pos`; a draft tree's rows share positions, not slots) and
    mark those slots in valid [T] (in place). Returns q [H, q, hd]."""
    Hkv, hd = k_cache.shape[0], k_cache.shape[-1]
    q, k, v = split_qkv(qkv, qkv.shape[-1] // hd - 2 * Hkv, Hkv, hd)
    c, s = cos[pos], sin[pos]
    at = pos if slots is None else slots
    k_cache.index_copy_(1, at, rope(k, c, s))
    v_cache.index_copy_(1, at, v)
    valid.index_fill_(0, at, True)
    return rope(q, c, s)


@torch.library.custom_op("specee::rope_append", mutates_args=("k_cache", "v_cache", "valid"))
def rope_append(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary embedding, K/V cache write and validity mark of the step's rows, in place. On CUDA one Triton
    kernel (`plugins/triton_rope_append.py`) for the decode step's row, where Inductor makes four of the
    plain ops, and for rows at their own slots (tree verification, the draft tree's levels)."""
    return rope_append_reference(qkv, cos, sin, pos, k_cache, v_cache, valid, slots).contiguous().clone()


@rope_append.register_fake
def _(qkv, cos, sin, pos, k_cache, v_cache, valid, slots=None):
    Hkv, hd = k_cache.shape[0], k_cache.shape[-1]
    return qkv.new_empty(qkv.shape[-1] // hd - 2 * Hkv, qkv.shape[1], hd)


# --------------------------------------------------------------------------------------- topk_rows
@torch.library.custom_op("specee::topk_rows", mutates_args=())
def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) along the last dim (values largest first, their columns); on CUDA one Triton kernel for
    k <= 16 (`plugins/triton_topk.py`), where torch.topk runs a select and a sort per call."""
    v, i = torch.topk(x, k, dim=-1)
    return v.clone(), i.clone()


@topk_rows.register_fake
def _(x, k):
    return x.new_empty(*x.shape[:-1], k), x.new_empty(*x.shape[:-1], k, dtype=torch.long)


def register_cuda_kernels() -> bool:
    """Make the Triton kernels the CUDA implementations of the ops (exit_score, fused_linear, decode_attention,
    tree_attention, rope_append, topk_rows). Idempotent; False where triton is missing (the ops keep their references)."""
    from .plugins import (
        triton_decode_attention,
        triton_exit_score,
        triton_gemv,
        triton_rope_append,
        triton_topk,
        triton_tree_attention,
    )

    registered = [m.register_cuda_impl() for m in (triton_exit_score, triton_gemv, triton_decode_attention,
                                                    triton_tree_attention, triton_rope_append, triton_topk)]
    return all(registered)  # every module registers, even after one reports no triton
