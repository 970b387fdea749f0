"""The `specee::exit_score` op as ONE fused Triton kernel (CUDA), plus its AOT PTX form.

One launch, one program (the work is ~40 KB of reads: latency-bound, so a single CTA that keeps every
intermediate in registers beats any split that needs a second launch or atomics):

    pass 1   ss   = sum_d h[d]^2                                   (h read once, fp32)
    pass 2   hn   = final_norm(h)  (HF rounding emulated: (h*rs) -> h.dtype, * norm_w -> result dtype)
             z[j] = sum_d hn[d] * rows[j, d]                       (k candidate LM-head rows, gather-GEMV)
    then     p = softmax(z) over the k valid entries; delta = p - p_prev
             hidden = relu(W1[:, :k] z + W1[:, k:2k] p + W1[:, 2k:] delta + b1)   (Hm = 512)
             score  = sigmoid(hidden . w2 + b2)

All math is fp32 whatever the input dtypes (fp16 / bf16 / fp32). The launcher has the exact signature
of `specee_compile.ops.exit_score`; `register_cuda_impl()` makes it the CUDA kernel of that custom op,
so compiled graphs (Inductor calls the op as an extern kernel) run it on GPU.

`triton_exit_decide` is the same kernel with a decision epilogue for device-resident early exit
(no host sync): it updates p_prev in place, clears an `alive` flag, records the exit layer and copies
h into the exit buffer the head reads. `compile_ptx()` compiles the kernel ahead of time for a given
target with no GPU (for the TensorRT plugin helper).
"""

from __future__ import annotations

import functools

import torch

from . import HAVE_TRITON, pdl, register_kernel, tl, triton

BLOCK_D = 512  # D-chunk per loop iteration (4 warps x 32 lanes x 4 elements)
BLOCK_H = 128  # predictor hidden units per loop iteration
NUM_WARPS = 4

# MODE of the decision epilogue
MODE_NONE, MODE_THRESHOLD, MODE_FORCED = 0, 1, 2

if HAVE_TRITON:

    @triton.jit
    def _exit_score_kernel(
        h_ptr, nw_ptr, rows_ptr, pprev_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        score_ptr, z_ptr, p_ptr,
        ctrl_ptr, hexit_ptr,
        eps, threshold, layer,
        D: tl.constexpr, HM: tl.constexpr,
        ALIVE_OFF: tl.constexpr, FORCED_OFF: tl.constexpr, EXIT_OFF: tl.constexpr,
        K: tl.constexpr, KP: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        ROUND_X: tl.constexpr, ROUND_HN: tl.constexpr, HN_BF16: tl.constexpr,
        MODE: tl.constexpr, GATE_OFF: tl.constexpr, PDL: tl.constexpr = False,
    ):
        if PDL:  # programmatic dependent launch (plugins/pdl.py): the wait before the gate's and every other read
            tl.extra.cuda.gdc_wait()
        if GATE_OFF >= 0:  # predicated: a no-op unless ctrl[alive] and ctrl[GATE_OFF] (this layer active)
            go = (tl.load(ctrl_ptr + ALIVE_OFF, volatile=True) != 0) & (tl.load(ctrl_ptr + GATE_OFF, volatile=True) != 0)
            if not go:
                return
        offs_k = tl.arange(0, KP)
        kmask = offs_k < K

        # ---- pass 1: mean square of h
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            m = offs < D
            x = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc += x * x
        rs = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)

        # ---- pass 2: hn and the k candidate logits
        zacc = tl.zeros([KP, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            m = offs < D
            xin = tl.load(h_ptr + offs, mask=m, other=0.0)
            xn = xin.to(tl.float32) * rs
            if ROUND_X:  # HF: (x.float() * rsqrt).to(x.dtype)
                xn = xn.to(xin.dtype, fp_downcast_rounding="rtne").to(tl.float32)
            hn = xn * tl.load(nw_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if ROUND_HN:  # HF: norm_w * x_normed in the promoted (half) dtype
                if HN_BF16:
                    hn = hn.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
                else:
                    hn = hn.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
            r = tl.load(
                rows_ptr + offs_k[:, None] * D + offs[None, :],
                mask=kmask[:, None] & m[None, :],
                other=0.0,
            ).to(tl.float32)
            zacc += r * hn[None, :]
        z = tl.sum(zacc, axis=1)  # [KP]

        # ---- softmax over the k candidates, delta against the previous evaluated layer
        zm = tl.where(kmask, z, float("-inf"))
        e = tl.where(kmask, tl.exp(zm - tl.max(zm, axis=0)), 0.0)
        p = e / tl.sum(e, axis=0)
        pp = tl.load(pprev_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        dl = p - pp

        # ---- predictor MLP: 3k -> Hm (ReLU) -> 1 (sigmoid)
        sacc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, HM, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            hmask = offs_h < HM
            wmask = hmask[:, None] & kmask[None, :]
            base = w1_ptr + offs_h[:, None] * (3 * K) + offs_k[None, :]
            wz = tl.load(base, mask=wmask, other=0.0).to(tl.float32)
            wp = tl.load(base + K, mask=wmask, other=0.0).to(tl.float32)
            wd = tl.load(base + 2 * K, mask=wmask, other=0.0).to(tl.float32)
            hid = tl.sum(wz * z[None, :] + wp * p[None, :] + wd * dl[None, :], axis=1)
            hid += tl.load(b1_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
            hid = tl.maximum(hid, 0.0)
            sacc += tl.where(hmask, hid * tl.load(w2_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32), 0.0)
        s = tl.sum(sacc, axis=0) + tl.load(b2_ptr).to(tl.float32)
        score = 1.0 / (1.0 + tl.exp(-s))
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

        tl.debug_barrier()  # p_prev may alias p_ptr (decide mode): every lane has read it by now
        tl.store(score_ptr, score)
        tl.store(z_ptr + offs_k, z, mask=kmask)
        tl.store(p_ptr + offs_k, p, mask=kmask)

        if MODE != 0:
            # ctrl is a uint8 control block: [alive, ..., forced_exit_layer, exit_layer]
            # ctrl may be host memory the CPU rewrites between launches: volatile loads, never a cached line
            if MODE == 1:
                ex = score > threshold
            else:
                ex = layer >= tl.load(ctrl_ptr + FORCED_OFF, volatile=True).to(tl.int32)
            # the decision runs only while alive, so alive := !exit (also a "done" mark for a host that
            # polls a host-mapped ctrl block: it writes 2 before the launch and waits for 0/1)
            tl.store(ctrl_ptr + ALIVE_OFF, tl.where(ex, 0, 1).to(tl.uint8))
            old = tl.load(ctrl_ptr + EXIT_OFF, volatile=True)
            tl.store(ctrl_ptr + EXIT_OFF, tl.where(ex, layer, old.to(tl.int32)).to(tl.uint8))
            for d0 in range(0, D, BLOCK_D):  # the head reads hexit: copy h there on exit
                offs = d0 + tl.arange(0, BLOCK_D)
                m = offs < D
                x = tl.load(h_ptr + offs, mask=m & ex, other=0.0)
                tl.store(hexit_ptr + offs, x, mask=m & ex)


def _check(h, norm_w, rows, p_prev, w1, b1, w2, b2):
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed: the fused exit kernel needs it (pip install triton)")
    D = h.shape[-1]
    k = rows.shape[0]
    if h.numel() != D:
        raise ValueError(f"exit_score takes one hidden state [1, 1, D]; got {tuple(h.shape)}")
    if rows.shape != (k, D) or norm_w.numel() != D or p_prev.numel() != k:
        raise ValueError("exit_score: rows must be [k, D], norm_w [D], p_prev [k]")
    Hm = w1.shape[0]
    if w1.shape != (Hm, 3 * k) or b1.numel() != Hm or w2.numel() != Hm or b2.numel() != 1:
        raise ValueError(f"exit_score: predictor shapes w1 {tuple(w1.shape)} (want [Hm, {3 * k}]), b1, w2 [Hm], b2 [1]")
    return D, k, Hm


def _rounding(h, norm_w):
    round_x = h.dtype != torch.float32
    hn_dtype = torch.result_type(norm_w, h) if norm_w.dtype != h.dtype else h.dtype
    round_hn = hn_dtype in (torch.float16, torch.bfloat16)
    return round_x, round_hn, hn_dtype == torch.bfloat16


def _launch(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps, score, z, p, ctrl, hexit, threshold, layer, mode, offs,
            gate_off: int = -1):
    D, k, Hm = _check(h, norm_w, rows, p_prev, w1, b1, w2, b2)
    round_x, round_hn, hn_bf16 = _rounding(h, norm_w)
    kp = max(2, triton.next_power_of_2(k))
    _exit_score_kernel[(1,)](
        h.reshape(-1), norm_w.reshape(-1).contiguous(), rows.contiguous(), p_prev.reshape(-1),
        w1.contiguous(), b1.reshape(-1), w2.reshape(-1), b2.reshape(-1),
        score, z, p,
        ctrl, hexit,
        float(eps), float(threshold), int(layer),
        D=D, HM=Hm,
        ALIVE_OFF=offs[0], FORCED_OFF=offs[1], EXIT_OFF=offs[2],
        K=k, KP=kp, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H,
        ROUND_X=round_x, ROUND_HN=round_hn, HN_BF16=hn_bf16, MODE=mode, GATE_OFF=gate_off,
        num_warps=NUM_WARPS, **pdl.kernel_args(h.device),
    )


def triton_exit_score(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float):
    """Same contract as `specee_compile.ops.exit_score`: -> (score [1], z [k], p [k]) float32."""
    k = rows.shape[0]
    dev = h.device
    score = torch.empty(1, device=dev, dtype=torch.float32)
    z = torch.empty(k, device=dev, dtype=torch.float32)
    p = torch.empty(k, device=dev, dtype=torch.float32)
    if not h.is_contiguous():
        h = h.contiguous()
    _launch(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps, score, z, p, score, score, 0.0, 0, MODE_NONE, (0, 0, 0))
    return score, z, p


def triton_exit_decide(
    h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float, *,
    layer: int, ctrl: torch.Tensor, hexit: torch.Tensor, score: torch.Tensor, z: torch.Tensor,
    threshold: float = 0.5, forced: bool = False, alive_off: int = 0, forced_off: int = 1, exit_off: int = 2,
    gate_off: int = -1,
):
    """Exit scoring + the exit decision on the device, one launch (for CUDA-graph early exit).

    Writes score/z into the given buffers and p into `p_prev` (in place: it is the next evaluated
    layer's p_prev). `ctrl` is a uint8 tensor (device memory, or pinned host memory, which the kernel
    reads and writes through the unified address space): ctrl[alive_off] (the alive flag the graph's
    IF nodes read: written 0 on exit, 1 otherwise), ctrl[forced_off] (trace-driven exit layer, used
    when `forced`), ctrl[exit_off] (set to `layer` on exit). On exit, h is copied into `hexit` [D].
    forced=False decides by score > threshold (the predictor); forced=True by layer >= ctrl[forced_off]
    (an exit trace; the score is still computed, so the work is the same).
    gate_off >= 0: the kernel does nothing unless ctrl[alive_off] and ctrl[gate_off] are set (this exit
    point is active and no earlier one fired): a predicated launch instead of a graph IF node around it.
    """
    if ctrl.dtype != torch.uint8:
        raise ValueError("ctrl must be a uint8 tensor")
    mode = MODE_FORCED if forced else MODE_THRESHOLD
    _launch(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps, score, z, p_prev, ctrl, hexit, threshold, layer, mode,
            (alive_off, forced_off, exit_off), gate_off)


def register_cuda_impl() -> bool:
    """Make the fused kernel the CUDA implementation of `specee::exit_score` (idempotent; False where
    triton is missing)."""
    return register_kernel("specee::exit_score", triton_exit_score)


# ---------------------------------------------------------------------------------- AOT (no GPU)
_SIG_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@functools.cache
def compile_aot(target=(90, 32), dtype: torch.dtype = torch.float16, k: int = 4, mode: int = MODE_NONE,
                norm_dtype: torch.dtype | None = None, hidden: int = 4096, predictor_hidden: int = 512):
    """Compile the kernel ahead of time for `target` = (compute capability, warp size), no GPU needed.

    Specialised for hidden states of `dtype` (rows in the same dtype), `k` candidates, model width
    `hidden`, predictor width `predictor_hidden`, fp32 p_prev / predictor weights. Returns the triton CompiledKernel (asm has 'ptx' and 'cubin')."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc, warp = target
    t = _SIG_DTYPES[dtype]
    n = _SIG_DTYPES[norm_dtype or dtype]
    sig = {
        "h_ptr": f"*{t}", "nw_ptr": f"*{n}", "rows_ptr": f"*{t}", "pprev_ptr": "*fp32",
        "w1_ptr": "*fp32", "b1_ptr": "*fp32", "w2_ptr": "*fp32", "b2_ptr": "*fp32",
        "score_ptr": "*fp32", "z_ptr": "*fp32", "p_ptr": "*fp32",
        "ctrl_ptr": "*u8", "hexit_ptr": f"*{t}",
        "eps": "fp32", "threshold": "fp32", "layer": "i32",
    }
    hn_dtype = torch.promote_types(dtype, norm_dtype or dtype)
    constexprs = {
        "D": hidden, "HM": predictor_hidden, "ALIVE_OFF": 0, "FORCED_OFF": 1, "EXIT_OFF": 2,
        "K": k, "KP": max(2, triton.next_power_of_2(k)), "BLOCK_D": BLOCK_D, "BLOCK_H": BLOCK_H,
        "ROUND_X": dtype != torch.float32, "ROUND_HN": hn_dtype != torch.float32,
        "HN_BF16": hn_dtype == torch.bfloat16, "MODE": mode, "GATE_OFF": -1,
    }
    for name in constexprs:
        sig[name] = "constexpr"
    # pointers 16-byte aligned (as torch allocates them): lets the loads vectorise like the JIT path
    names = _exit_score_kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn=_exit_score_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, warp), options={"num_warps": NUM_WARPS})


def compile_ptx(target=(90, 32), dtype: torch.dtype = torch.float16, k: int = 4, hidden: int = 4096,
                predictor_hidden: int = 512) -> str:
    """PTX of the fused exit kernel for `target` (e.g. (90, 32) for Hopper), compiled with no GPU.

    Kernel parameters, in order: h, norm_w, rows, p_prev, w1, b1, w2, b2, score, z, p, ctrl, hexit
    (pointers, 16-byte aligned), eps, threshold (f32), layer (i32), then Triton's two scratch pointers
    (global, profile: pass null, this kernel uses neither). Grid (1, 1, 1), 128 threads, dynamic
    shared memory as `compile_aot(...).metadata.shared` says (1 KiB for the defaults)."""
    return compile_aot(tuple(target), dtype, k, hidden=hidden, predictor_hidden=predictor_hidden).asm["ptx"]


def kernel_name(target=(90, 32), dtype: torch.dtype = torch.float16, k: int = 4, hidden: int = 4096,
                predictor_hidden: int = 512) -> str:
    """The entry symbol in `compile_ptx`'s PTX (what a plugin's cuModuleGetFunction asks for)."""
    return compile_aot(tuple(target), dtype, k, hidden=hidden, predictor_hidden=predictor_hidden).metadata.name


__all__ = [
    "HAVE_TRITON",
    "compile_aot",
    "compile_ptx",
    "kernel_name",
    "register_cuda_impl",
    "triton_exit_decide",
    "triton_exit_score",
]


def torch_exit_decide(
    h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float, *,
    layer: int, ctrl: torch.Tensor, hexit: torch.Tensor, score: torch.Tensor, z: torch.Tensor,
    threshold: float = 0.5, forced: bool = False, alive_off: int = 0, forced_off: int = 1, exit_off: int = 2,
    gate_off: int = -1,
):
    """`triton_exit_decide` in plain torch ops (any device): the reference for its semantics and the
    CPU path of the benchmark. No host sync either."""
    from ..ops import exit_score_reference

    s, zz, p = exit_score_reference(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps)
    go = torch.ones((), dtype=torch.bool, device=ctrl.device)
    if gate_off >= 0:  # predicated: nothing changes unless alive and this layer is active
        go = (ctrl[alive_off] != 0) & (ctrl[gate_off] != 0)
    score.copy_(torch.where(go, s, score))
    z.copy_(torch.where(go, zz, z))
    p_prev.copy_(torch.where(go, p, p_prev))
    if forced:
        ex = ctrl[forced_off].to(torch.int64) <= layer
    else:
        ex = s[0] > threshold
    ex = ex & go
    ctrl[alive_off] = torch.where(go, torch.where(ex, 0, 1).to(ctrl.dtype), ctrl[alive_off])
    ctrl[exit_off] = torch.where(ex, torch.full_like(ctrl[exit_off], layer), ctrl[exit_off])
    hexit.copy_(torch.where(ex, h.reshape(hexit.shape), hexit))


__all__ += ["torch_exit_decide"]
