"""The decode step of a Llama-family model, written once as plain tensor functions.

This is the single definition of the model's math that every backend runs: the eager backend calls
these functions directly, `capture` traces them into an FX graph that the passes segment, Inductor
compiles them, and the ONNX exporter exports them. Weights come from the Hugging Face model (no
copy of the architecture is loaded from anywhere else); `tests/test_runtime.py` checks greedy output
against `transformers` `generate()` token for token.

Shapes (batch 1 throughout; q = query rows in this call, S = attended cache length):
    h       [1, q, D]            hidden states
    pos     [q] int64            absolute positions of the rows
    k_cache [Hkv, T, hd]         one layer's static K cache (T = max context)
    valid   [T] bool             which positions this layer holds K/V for (the KV contract)

A layer writes K/V of its rows into the cache at `pos`, marks those positions valid, and attends to
positions that are valid *in this layer* and not after the row's own position. Early exit never
writes deeper layers' K/V, so their `valid` stays False there: that is the `skip` policy, for free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UnsupportedArchitecture

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class StepSpec:
    """Static shape facts of the model; closed over by the compiled functions."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_len: int


@dataclass
class LayerWeights:
    """A layer's weights. A matmul weight may also be an int8 pair (q [N, K] int8, scale [N] float32) from
    `ops.quantize_rows` (the draft's --draft-quant int8); the layer functions take either form."""

    ln1: torch.Tensor | None  # [D]; None: no input norm (EAGLE-1's draft layer)
    wqkv: torch.Tensor  # [(H + 2 Hkv) hd, D]
    bqkv: torch.Tensor | None  # [(H + 2 Hkv) hd] (Qwen2) or None
    wo: torch.Tensor  # [D, H hd]
    ln2: torch.Tensor  # [D]
    wgu: torch.Tensor  # [2 F, D]   gate rows then up rows
    wd: torch.Tensor  # [D, F]

    def as_tuple(self) -> tuple:
        return (self.ln1, self.wqkv, self.bqkv, self.wo, self.ln2, self.wgu, self.wd)

    def quantized(self) -> LayerWeights:
        """The same layer with its four matmul weights as int8 pairs (`ops.quantize_rows`)."""
        from .ops import quantize_rows

        return dataclasses.replace(self, wqkv=quantize_rows(self.wqkv), wo=quantize_rows(self.wo),
                                   wgu=quantize_rows(self.wgu), wd=quantize_rows(self.wd))


@dataclass
class ModelWeights:
    spec: StepSpec
    embed: torch.Tensor  # [V, D]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [D]
    head: torch.Tensor  # [V, D]
    cos: torch.Tensor  # [T, hd]
    sin: torch.Tensor  # [T, hd]


def step_spec(config, max_len: int) -> StepSpec:
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"model_type {getattr(config, 'model_type', None)!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)} (Llama family)"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return StepSpec(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        max_len=max_len,
    )


@torch.no_grad()
def extract_weights(model, max_len: int) -> ModelWeights:
    """Gather weights from a Hugging Face *ForCausalLM into fused decode-friendly tensors.

    q/k/v and gate/up are fused (one GEMV each instead of three/two). The HF module's own parameters
    are then re-pointed at views of the fused tensors, so the model is not held twice in memory and
    `model.generate()` keeps working on the same storage.
    """
    spec = step_spec(model.config, max_len)
    inner = model.model
    layers = [fuse_layer(layer.self_attn, layer.mlp, layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
              for layer in inner.layers]
    _own_aligned(model.lm_head)  # a tied embedding is the same Parameter: it follows
    dev = inner.embed_tokens.weight.device
    positions = torch.arange(max_len, device=dev)[None]
    probe = torch.zeros(1, device=dev, dtype=inner.embed_tokens.weight.dtype)
    cos, sin = inner.rotary_emb(probe, positions)  # [1, T, hd], attention scaling applied by HF
    return ModelWeights(
        spec=spec,
        embed=inner.embed_tokens.weight,
        layers=layers,
        norm=inner.norm.weight,
        head=model.lm_head.weight,
        cos=cos[0].contiguous(),
        sin=sin[0].contiguous(),
    )


@torch.no_grad()
def fuse_layer(attn, mlp, ln1: torch.Tensor | None, ln2: torch.Tensor) -> LayerWeights:
    """A decoder layer's weights as `LayerWeights` (q/k/v and gate/up fused); the modules' own
    parameters are re-pointed at views of the fused tensors (one copy in memory). Serves the model's
    layers and the EAGLE draft's."""
    wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0).contiguous()
    bqkv = None
    if attn.q_proj.bias is not None:
        bqkv = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], 0).contiguous()
    wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).contiguous()
    _own_aligned(attn.o_proj)
    _own_aligned(mlp.down_proj)
    _repoint(attn.q_proj, attn.k_proj, attn.v_proj, wqkv, bqkv)
    _repoint(mlp.gate_proj, mlp.up_proj, None, wgu, None)
    return LayerWeights(ln1=ln1, wqkv=wqkv, bqkv=bqkv, wo=attn.o_proj.weight, ln2=ln2, wgu=wgu,
                        wd=mlp.down_proj.weight)


def _own_aligned(linear) -> None:
    """A CPU weight that starts off a 64-byte boundary gets a copy of its own, in place of the module's
    (one copy in memory). transformers maps model.safetensors and hands out tensors at the file's offsets
    (8-byte aligned): SmolLM2's LM head GEMV took 5.1 ms per row from there, 3.1 ms from a copy (MKL, 2
    cores). The fused q/k/v and gate/up weights are new tensors already."""
    w = linear.weight
    if w.device.type == "cpu" and w.data_ptr() % 64:
        w.data = w.data.clone()  # the Parameter object stays (a tied embedding shares it)


def _repoint(a, b, c, fused_w, fused_b):
    """Make linear modules a, b, (c) use row slices of the fused weight (and bias)."""
    mods = [m for m in (a, b, c) if m is not None]
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused_w[start : start + n], requires_grad=False)
        if fused_b is not None:
            m.bias = torch.nn.Parameter(fused_b[start : start + n], requires_grad=False)
        start += n


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm exactly: statistics in float32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of heads x [heads, q, hd] with c, s = cos, sin at the rows' positions [q, hd]."""
    return x * c + _rotate_half(x) * s


def split_qkv(y: torch.Tensor, H: int, Hkv: int, hd: int):
    """The fused QKV projection's output y [1, q, (H + 2 Hkv) hd] as q [H, q, hd], k, v [Hkv, q, hd] (views)."""
    q_rows = y.shape[1]
    q, k, v = y.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    return (q.view(q_rows, H, hd).transpose(0, 1), k.view(q_rows, Hkv, hd).transpose(0, 1),
            v.view(q_rows, Hkv, hd).transpose(0, 1))


# what the fused Triton ops can take over; "matmul": the matmuls the others leave plain, as the op with no prologue
# (the norms, SiLU and residual adds stay plain ops around it, for a compiler to fuse)
FUSABLE = ("qkv", "o", "gate_up", "down", "attn", "matmul")
# the CUDA Inductor path's choice (benchmarks/gemv_sweep.py, benchmarks/results: on the H100 the Triton
# GEMVs match or beat Inductor's coordinate-descent-tuned reductions on every matmul, and the decode
# attention kernel beats cuDNN's flash kernel plus its two mask kernels)
CUDA_FUSED = ("qkv", "o", "gate_up", "down", "attn")


ROWS_LINEARS = ("plain", "matmul", "fused", "silu")
# "silu": "matmul", with the down projection's SiLU x up inside the op as its prologue (no SiLU kernel of its own:
# 30 launches of 1.3 us in a SmolLM2 tree step, session 36's profile), the norms still plain. Measured on the
# product (H100, session 38, real SmolLM2 at 31:4:8): 0.861x dense against the default's 0.868x, so not the default.
# (Session 37's ROPE form, rotary + cache write inside the tree attention's launch, measured 0.820x there and was
# removed: each split's program re-read the rotation's inputs, more than its own keys' bytes.) (Session 41's "mlp"
# form, the layer's half after attention as one persistent kernel with grid barriers between its three phases
# (1d3b1e0), measured 0.739x dense against this form's 0.938x on SmolLM2's shapes (H100) and was removed: under PDL a
# grid barrier cost ~2.2 us, as much as the launch it replaced, and its phases ran slower than the tuned rows kernels.)
ROWS_SILU = ("attn", "matmul", "down")


def tree_linears() -> str:
    """SPECEE_TREE_LINEARS, checked: one of ROWS_LINEARS, or "" (unset: `rows_fused`'s default form)."""
    import os

    v = os.environ.get("SPECEE_TREE_LINEARS", "")
    if v and v not in ROWS_LINEARS:
        from .errors import SettingError

        raise SettingError(f"SPECEE_TREE_LINEARS={v!r}: expected one of {', '.join(ROWS_LINEARS)}; unset it for "
                           "the default")
    return v


def rows_fused(dtype: torch.dtype) -> tuple[str, ...]:
    """The fused ops of a CUDA layer that runs a few rows at once (the fixed tree program's verification and its
    draft's levels): the attention op, and for 16-bit weights the matmuls as `specee::fused_linear` with no
    prologue ("matmul"), where the rows tuner picks cuBLAS or a rows kernel per shape while the norms, SiLU and
    the o-projection's residual add stay plain ops for Inductor to fuse (the down projection takes the layer's
    last add as its epilogue: nothing after it in the layer would fuse it). A prologue inside the rows kernels
    costs more than it saves at 7B widths (H200, benchmarks/rows_gemm_sweep.py: 25-row q/k/v with RMSNorm 50.7 us
    against cuBLAS's 28.7 without it).
    fp32 takes the same form: there the tuner also times the turned rows kernel's 3xTF32 configs against cuBLAS,
    which runs SmolLM2's 25-row fp32 matmuls on the FMA units (H200, session 22 profile: 1.70 of the tree step's
    2.64 ms of kernel time). On the real SmolLM2 (H100, session 25, benchmarks/RESULTS.md) the tree went from
    0.739x to 0.800x dense with it, identical to dense greedy on 20/20 MT-Bench turns.
    SPECEE_TREE_LINEARS=plain|matmul|fused|silu (plain: cuBLAS as `F.linear`; fused: `CUDA_FUSED`, prologues inside
    the op; silu: `ROWS_SILU`) overrides the choice, for A/B runs. `dtype` is kept for callers and a future
    per-dtype choice."""
    del dtype  # every dtype takes the same form today (see above)
    v = tree_linears()
    if v == "plain":
        return ("attn",)
    return {"fused": CUDA_FUSED, "silu": ROWS_SILU}.get(v, ("attn", "matmul"))


def _check_fused(fused) -> None:
    unknown = set(fused) - set(FUSABLE)
    if unknown:
        raise ValueError(f"fused: unknown op(s) {sorted(unknown)}; expected a subset of {FUSABLE}")


def make_layer_parts(spec: StepSpec, fused: tuple[str, ...] = (), ops: str = "specee"):
    """The parts of a decoder layer around attention, shared by every attention formulation
    (`make_layer_fn` here; the read-only-cache variant of the ONNX exporter):

    qkv(h [1,q,D], ln1, wqkv, bqkv) -> q [H,q,hd], k, v [Hkv,q,hd]  (split=False: the projection
        [1,q,(H+2Hkv) hd] before the split)
    rope(q, k, c, s [q,hd]) -> q, k with rotary embedding applied
    out_mlp(h [1,q,D], a [1,q,H hd], wo, ln2, wgu, wd) -> h [1,q,D] (o-proj residual + MLP residual)

    fused: which matmuls (of `FUSABLE`) to write as `specee::fused_linear` ops, with the RMSNorm,
    SiLU*up and residual add around each folded into it; on CUDA each is one Triton GEMV kernel
    (`plugins/triton_gemv.py`). The math is the same otherwise. ("attn" is `make_layer_fn`'s.)
    ops: the op namespace of the fused ops: "specee" (Python custom ops, the Python step) or "specee_aoti"
    (their `triton_op` twins, which an AOTInductor package embeds: `backends/aoti_export.py`).
    """
    H, Hkv, hd, eps = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.eps
    _check_fused(fused)
    op = None
    if set(fused) - {"attn"}:
        op = _fused_op(ops, "fused_linear")
    fuse = {name: op is not None and name in fused for name in FUSABLE}

    def lin(x, w, res=None, norm_w=None, eps_=0.0, pro="none"):  # the fused op; an int8 pair passes its scale
        if isinstance(w, tuple):
            return op(x, w[0], res, norm_w, eps_, pro, w[1])
        return op(x, w, res, norm_w, eps_, pro)

    def mm(x, w, b=None):  # "matmul": the op with no prologue; else `plain_linear`
        if not fuse["matmul"]:
            return plain_linear(x, w, b)
        y = lin(x, w)
        return y if b is None else y + b

    def normed_linear(x, ln, w, b, fused_op: bool):
        if ln is None:  # no input norm (EAGLE-1's draft layer)
            y = lin(x, w) if fused_op else mm(x, w)
            return y if b is None else y + b
        if fused_op:
            y = lin(x, w, None, ln, eps, "rmsnorm")
            return y if b is None else y + b
        return mm(rms_norm(x, ln, eps), w, b)

    def out_mlp(h, a, wo, ln2, wgu, wd):
        h = lin(a, wo, h) if fuse["o"] else h + mm(a, wo)
        gu = normed_linear(h, ln2, wgu, None, fuse["gate_up"])
        if fuse["down"]:
            return lin(gu, wd, h, None, 0.0, "silu_mul")
        g, u = gu.chunk(2, dim=-1)
        if fuse["matmul"]:  # the layer's last add in the op's epilogue (it rounds as `h + mm(...)` does): no
            return lin(F.silu(g) * u, wd, h)  # launch of its own, where nothing after it in the layer fuses it
        return h + mm(F.silu(g) * u, wd)

    def qkv(h, ln1, wqkv, bqkv, split: bool = True):
        y = normed_linear(h, ln1, wqkv, bqkv, fuse["qkv"])  # [1, q, (H + 2Hkv) hd]
        return split_qkv(y, H, Hkv, hd) if split else y

    def rope_qk(q, k, c, s):
        return rope(q, c, s), rope(k, c, s)

    return qkv, rope_qk, out_mlp


def plain_linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; for an int8 pair (q, scale) the int8 matmul (`ops.linear_w8`); for a oneDNN-layout weight (the
    eager backend's CPU choice, `backends/cpu_gemm.py`) oneDNN's linear."""
    if isinstance(w, tuple):
        from .ops import linear_w8

        y = linear_w8(x, *w)
        return y if b is None else y + b
    if w.is_mkldnn:
        from .backends.cpu_gemm import linear_onednn

        return linear_onednn(x, w, b)
    return F.linear(x, w, b)


def _fused_op(ns: str, name: str):
    from . import ops  # noqa: F401  # defines torch.ops.specee.*

    if ns == "specee_aoti":
        from .plugins import triton_decode_attention, triton_gemv, triton_rope_append  # noqa: F401  # the twins
    elif ns != "specee":
        raise ValueError(f"ops: expected 'specee' or 'specee_aoti', got {ns!r}")
    return getattr(getattr(torch.ops, ns), name)


def make_layer_fn(spec: StepSpec, native_gqa: bool = True, fused: tuple[str, ...] = (), ops: str = "specee"):
    """Return `layer(h, pos, valid, cos, sin, k_cache, v_cache, S, ln1, wqkv, bqkv, wo, ln2, wgu, wd)`
    (keywords: slots, mask, attn_state; see inside).

    One function serves every layer (weights are arguments), so a compiler compiles it once.
    `S` (a Python int) bounds the attended cache prefix; it must exceed every position in `pos`.
    native_gqa: let SDPA broadcast K/V heads (no copy of the cache per step); False repeats them
    explicitly, for exporters that do not know `enable_gqa`.
    fused, ops: see `make_layer_parts`; with "attn", the mask and attention are one
    `specee::decode_attention` op (a split-S Triton kernel on CUDA, `plugins/triton_decode_attention.py`),
    or, with a mask given, one `specee::tree_attention` op (`plugins/triton_tree_attention.py`); and the
    rows' rotary embedding, K/V writes and validity mark before it are one `rope_append` op (one Triton
    kernel on CUDA for one row, and for rows at slots of their own, the tree's; `plugins/triton_rope_append.py`).
    """
    H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rep = H // Hkv
    qkv, rope_qk, out_mlp = make_layer_parts(spec, fused=fused, ops=ops)
    append = tree_attend = None
    if "attn" in fused:
        attend = _fused_op(ops, "decode_attention")
        append = _fused_op(ops, "rope_append")
        if ops == "specee":  # the AOTI packages decode one row: no twin
            tree_attend = _fused_op(ops, "tree_attention")

    def layer(h, pos, valid, cos, sin, k_cache, v_cache, S: int, ln1, wqkv, bqkv, wo, ln2, wgu, wd,
              slots=None, mask=None, attn_state=()):
        # slots [q] (optional): cache positions to write K/V at, when they differ from the RoPE
        # positions `pos` (tree verification: nodes of one depth share a position, not a slot).
        # mask [q, S] bool (optional): which cache positions each row may attend to, instead of
        # `j <= pos` (a tree attention mask); still ANDed with `valid`. Neither given = the decode
        # step every backend traces (the graph is unchanged).
        # attn_state: the `specee_aoti` attention's state, (arrival counters int32 [H] zero between calls,
        # fp32 workspace), which an AOTI package takes as inputs since it owns no state; required with
        # ops="specee_aoti".
        q_rows = h.shape[1]
        # the fused op writes the cache in place: the decode step's rows, and (the Python op only; the AOTI
        # twin takes no slots) rows at slots of their own
        if append is not None and (ops == "specee" or (mask is None and slots is None)):
            extra = () if slots is None else (slots,)
            q = append(qkv(h, ln1, wqkv, bqkv, split=False), cos, sin, pos, k_cache, v_cache, valid, *extra)
        else:
            q, k, v = qkv(h, ln1, wqkv, bqkv)
            q, k = rope_qk(q, k, cos[pos], sin[pos])
            at = pos if slots is None else slots
            k_cache.index_copy_(1, at, k)
            v_cache.index_copy_(1, at, v)
            valid.index_fill_(0, at, True)
        if "attn" in fused and mask is None:
            a = attend(q, k_cache[:, :S], v_cache[:, :S], valid[:S], pos,
                       *(() if ops == "specee" else attn_state))  # [H, q, hd]
            return out_mlp(h, a.transpose(0, 1).reshape(1, q_rows, H * hd), wo, ln2, wgu, wd)
        if tree_attend is not None and mask is not None:  # tree rows: the mask and attention in one op
            a = tree_attend(q, k_cache[:, :S], v_cache[:, :S], valid[:S], mask)  # [H, q, hd]
            return out_mlp(h, a.transpose(0, 1).reshape(1, q_rows, H * hd), wo, ln2, wgu, wd)
        if mask is None:
            keys = torch.arange(S, device=h.device)
            mask = valid[:S][None, :] & (keys[None, :] <= pos[:, None])  # [q, S]
        else:
            mask = valid[:S][None, :] & mask
        kk, vv = k_cache[:, :S], v_cache[:, :S]  # [Hkv, S, hd]
        if rep > 1 and not native_gqa:
            kk = kk[:, None].expand(Hkv, rep, S, hd).reshape(H, S, hd)
            vv = vv[:, None].expand(Hkv, rep, S, hd).reshape(H, S, hd)
        a = F.scaled_dot_product_attention(
            q[None], kk[None], vv[None], attn_mask=mask[None, None], enable_gqa=rep > 1 and native_gqa
        )
        return out_mlp(h, a[0].transpose(0, 1).reshape(1, q_rows, H * hd), wo, ln2, wgu, wd)

    return layer


def make_head_fn(spec: StepSpec, fused: bool = False, matmul: bool = False):
    """Return `head(h, norm_w, head_w) -> (hn, logits)`: final norm and full LM head.
    fused: the LM head as one `specee::fused_linear` GEMV with the norm folded in.
    matmul: the norm plain and the LM head as `specee::fused_linear` with no prologue, as a rows layer's "matmul"
    (`rows_fused`): for a few rows inside `ops.multi_row_kernel()` the rows tuner picks cuBLAS or a rows kernel (the
    tree's verification head: 32 rows x SmolLM2's 49152 x 576 fp32 took 66 us in cuBLAS's fp32 GEMM on the H100,
    ~1.7 TB/s, where the 3xTF32 rows kernel streams the draft's 8192-row head at ~2.7, session 36's profile)."""
    eps = spec.eps

    if fused or matmul:
        from . import ops  # noqa: F401

    if fused:
        def head(h, norm_w, head_w):
            return rms_norm(h, norm_w, eps), torch.ops.specee.fused_linear(h, head_w, None, norm_w, eps, "rmsnorm")

        return head

    if matmul:
        def head(h, norm_w, head_w):
            hn = rms_norm(h, norm_w, eps)
            return hn, torch.ops.specee.fused_linear(hn, head_w, None, None, 0.0, "none")

        return head

    def head(h, norm_w, head_w):
        hn = rms_norm(h, norm_w, eps)
        return hn, plain_linear(hn, head_w)

    return head
