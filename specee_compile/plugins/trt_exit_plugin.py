"""`specee::exit_score` as a TensorRT quickly-deployable plugin (QDP), AOT code from Triton.

Off by default: the exported graphs compute the exit score with built-in layers (plain ONNX ops),
which every TensorRT flavour and ONNX Runtime run. With `export_onnx(..., trt_exit_plugin=True)` an
extra graph `decode_step.plugin.onnx` is written in which each exit point's score is ONE node

    exit_score(h [1,1,D], norm_w [D], rows [k,D], p_prev [k] f32, w1 [Hm,3k], b1 [Hm], w2 [Hm], b2 [1])
        -> score [1], z [k], p [k]   (float32; attribute eps; plugin_namespace "specee")

that TensorRT's ONNX parser maps to this plugin once `register()` has run. Only TensorRT can load
that graph (ONNX Runtime has no such op).

The plugin (module `tensorrt.plugin`, full TensorRT >= 10.7):
  register  output shapes: score [1], z [k], p [k] float32
  impl      JIT path at run time: the Triton launcher `triton_exit_score` on TensorRT's stream
  aot_impl  the kernel's PTX, compiled ahead of time by `triton.compile` for a `GPUTarget`, so the
            engine carries the code and needs no Python or Triton at run time

The kernel is the fused one of `plugins/triton_exit_score.py`, called from a thin wrapper whose
parameters follow TensorRT's AOT launch order (input pointers, extra scalars, output pointers):
(h, norm_w, rows, p_prev, w1, b1, w2, b2, score, z, p); eps and the shapes are compile-time
constants. Triton >= 3.3 appends two scratch pointers (global, profile) to every kernel; this kernel
uses neither and TensorRT does not pass them, so `plugin_ptx` removes them from the PTX entry (after
checking the body never reads them).

Verified here (no GPU, no full TensorRT): PTX is produced for sm_90, has the entry with exactly the
11 parameters TensorRT passes, and assembles with Triton's bundled ptxas. Not verified: loading the
plugin in TensorRT, building an engine with it, running it (full TensorRT cannot be installed here;
TensorRT-RTX 1.7.1's plugin support is broken: `tensorrt_rtx.plugin` does not import and a custom
ONNX op aborts its parser).
"""

from __future__ import annotations

import functools
import re

import torch

PLUGIN_ID = "specee::exit_score"
NAMESPACE, NAME = PLUGIN_ID.split("::")
NUM_PARAMS = 11  # 8 inputs + 3 outputs, no extra scalars

try:
    import triton
    import triton.language as tl

    from .triton_exit_score import BLOCK_D, BLOCK_H, NUM_WARPS, _exit_score_kernel

    HAVE_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - triton absent or broken
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def trt_exit_score_kernel(
        h_ptr, nw_ptr, rows_ptr, pprev_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # inputs
        score_ptr, z_ptr, p_ptr,  # outputs
        EPS: tl.constexpr, D: tl.constexpr, HM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        ROUND_X: tl.constexpr, ROUND_HN: tl.constexpr, HN_BF16: tl.constexpr,
    ):
        # mode 0 (score only): ctrl/hexit are never touched; any pointer of the right kind will do
        _exit_score_kernel(
            h_ptr, nw_ptr, rows_ptr, pprev_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, score_ptr, z_ptr, p_ptr,
            score_ptr, h_ptr, EPS, 0.5, 0,
            D, HM, 0, 1, 2, K, KP, BLOCK_D, BLOCK_H, ROUND_X, ROUND_HN, HN_BF16, 0, -1,
        )


def _need_triton():
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed: the plugin's AOT code is compiled by triton (pip install triton)")


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@functools.cache
def compile_kernel(target=(90, 32), dtype: torch.dtype = torch.float16, k: int = 4, hidden: int = 4096,
                   predictor_hidden: int = 512, eps: float = 1e-5):
    """triton.compile the wrapper for `target` = (compute capability, warp size); no GPU needed.
    h, norm_w and rows in `dtype`; p_prev and the predictor in float32."""
    _need_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = _TRITON_TYPES[dtype]
    sig = {"h_ptr": f"*{t}", "nw_ptr": f"*{t}", "rows_ptr": f"*{t}", "pprev_ptr": "*fp32", "w1_ptr": "*fp32",
           "b1_ptr": "*fp32", "w2_ptr": "*fp32", "b2_ptr": "*fp32", "score_ptr": "*fp32", "z_ptr": "*fp32",
           "p_ptr": "*fp32"}
    half = dtype != torch.float32
    constexprs = {"EPS": float(eps), "D": int(hidden), "HM": int(predictor_hidden), "K": int(k),
                  "KP": max(2, triton.next_power_of_2(int(k))), "BLOCK_D": BLOCK_D, "BLOCK_H": BLOCK_H,
                  "ROUND_X": half, "ROUND_HN": half, "HN_BF16": dtype == torch.bfloat16}
    for name in constexprs:
        sig[name] = "constexpr"
    names = trt_exit_score_kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, ty in sig.items() if ty.startswith("*")}
    src = ASTSource(fn=trt_exit_score_kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", int(target[0]), int(target[1])),
                          options={"num_warps": NUM_WARPS})


def entry_params(ptx: str, name: str) -> list[str]:
    """Parameter names of the `.entry name(...)` in a PTX module."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.DOTALL)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+[^,]*?\s(\w+)\s*(?:,|$)", m.group(1).strip() + ",")


def strip_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Drop the entry's parameters after the first `keep` when the body never reads them (Triton's
    scratch pointers). Raises if one of them is used."""
    m = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()(.*?)(\))", ptx, re.DOTALL)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    decls = [d for d in m.group(2).split(",")]
    if len(decls) <= keep:
        return ptx
    body = ptx[m.end():]
    for d in decls[keep:]:
        pname = d.strip().split()[-1]
        if re.search(r"\b" + re.escape(pname) + r"\b", body):
            raise ValueError(f"kernel parameter {pname} is used by the kernel; cannot drop it")
    return ptx[: m.start(2)] + ",".join(decls[:keep]).rstrip() + "\n" + ptx[m.end(2):]


def plugin_ptx(target=(90, 32), dtype: torch.dtype = torch.float16, k: int = 4, hidden: int = 4096,
               predictor_hidden: int = 512, eps: float = 1e-5) -> tuple[str, str, dict]:
    """(kernel name, PTX with exactly the 11 parameters TensorRT passes, launch info)."""
    ck = compile_kernel(tuple(target), dtype, k, hidden, predictor_hidden, eps)
    name = ck.metadata.name
    ptx = strip_unused_trailing_params(ck.asm["ptx"], name, NUM_PARAMS)
    launch = {"grid": (1, 1, 1), "block_x": ck.metadata.num_warps * 32, "shared_mem": ck.metadata.shared}
    return name, ptx, launch


def ptx_target(ptx: str) -> str:
    """The `.target` of a PTX module (Triton writes sm_90a for Hopper)."""
    m = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    if m is None:
        raise ValueError("no .target line in the PTX")
    return m.group(1)


def ptxas_check(ptx: str, arch: str | None = None) -> bool | None:
    """Assemble `ptx` with the ptxas Triton bundles (no GPU needed), for its own `.target` unless
    `arch` is given. True = assembled; None = no ptxas found; raises with ptxas' message otherwise."""
    arch = arch or ptx_target(ptx)
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    exe = None
    try:
        from triton.backends.nvidia import compiler as nv

        exe = nv.get_ptxas().path if hasattr(nv, "get_ptxas") else None
    except Exception:  # noqa: BLE001
        exe = None
    exe = exe or shutil.which("ptxas")
    if not exe:
        return None
    if isinstance(exe, (list, tuple)):
        exe = exe[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([exe, f"-arch={arch}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas rejected the PTX: {r.stderr[-2000:]}")
    return True


def gpu_self_test(dtype: torch.dtype = torch.float16, k: int = 4, hidden: int = 576, predictor_hidden: int = 512,
                  eps: float = 1e-5) -> dict:
    """Launch `plugin_ptx` on this machine's GPU the way TensorRT's QDP AOT launcher does (driver API:
    cuModuleLoadData + cuLaunchKernel with the 11 pointer parameters, grid and dynamic shared memory
    from the compile) and compare with the op's eager reference. Returns max abs error per output."""
    import ctypes

    from ..ops import exit_score_reference

    cc = torch.cuda.get_device_capability()
    name, ptx, launch = plugin_ptx((cc[0] * 10 + cc[1], 32), dtype, k, hidden, predictor_hidden, eps)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dt)

    D, hm = hidden, predictor_hidden
    # scales keep z ~ 1 and the score away from 0 and 1, so every stage of the kernel is checked
    h, nw, rows = rnd(1, 1, D, dt=dtype), (1 + rnd(D, scale=0.1)).to(dtype), rnd(k, D, scale=D**-0.5, dt=dtype)
    p_prev = torch.softmax(rnd(k), 0)
    w1, b1, w2, b2 = rnd(hm, 3 * k, scale=0.3), rnd(hm, scale=0.1), rnd(hm, scale=0.1), rnd(1)
    outs = [torch.full((n,), float("nan"), device="cuda") for n in (1, k, k)]
    torch.cuda.synchronize()  # the primary context is current from here on

    cuda = ctypes.CDLL("libcuda.so.1")

    def ok(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA driver error {rc}")

    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    ok(cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx.encode() + b"\0")), "cuModuleLoadData")
    try:
        ok(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), "cuModuleGetFunction")
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (h, nw, rows, p_prev, w1, b1, w2, b2, *outs)]
        params = (ctypes.c_void_p * len(ptrs))(*[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in ptrs])
        cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        stream = torch.cuda.current_stream().cuda_stream
        ok(cuda.cuLaunchKernel(fn, *launch["grid"], launch["block_x"], 1, 1, launch["shared_mem"],
                               ctypes.c_void_p(stream), params, None), "cuLaunchKernel")
        torch.cuda.synchronize()
    finally:
        cuda.cuModuleUnload(mod)
    ref = exit_score_reference(h, nw, rows, p_prev, w1, b1, w2, b2, eps)
    errors = {n: float((got - want.float()).abs().max()) for n, got, want in zip(("score", "z", "p"), outs, ref)}
    errors["score_value"] = float(ref[0])
    return errors


# ------------------------------------------------------------------------------------------ TensorRT
_REGISTERED = False


def _torch_dtype(trt_dtype):
    import tensorrt as trt

    return {trt.float16: torch.float16, trt.float32: torch.float32, trt.bfloat16: torch.bfloat16}[trt_dtype]


def _const(expr, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"specee::exit_score plugin needs a static {what}")
    return int(expr.constant_value)


def register(target=None) -> bool:
    """Register the QDP with TensorRT (full TensorRT >= 10.7, `tensorrt.plugin`). Idempotent.

    target: (compute capability, warp size) the AOT PTX is compiled for; default: this machine's GPU
    (torch.cuda), else (90, 32). Returns False when `tensorrt.plugin` is not importable.
    Written against the documented QDP API; unverified here (no full TensorRT in this environment).
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    if target is None:
        target = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        target = (target[0] * 10 + target[1], 32)

    @trtp.register(PLUGIN_ID)
    def _desc(h: trtp.TensorDesc, norm_w: trtp.TensorDesc, rows: trtp.TensorDesc, p_prev: trtp.TensorDesc,
              w1: trtp.TensorDesc, b1: trtp.TensorDesc, w2: trtp.TensorDesc, b2: trtp.TensorDesc,
              eps: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        k = rows.shape_expr[0]
        return (trtp.from_shape_expr((1,), dtype=trt.float32), trtp.from_shape_expr((k,), dtype=trt.float32),
                trtp.from_shape_expr((k,), dtype=trt.float32))

    @trtp.impl(PLUGIN_ID)
    def _impl(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float, outputs, stream: int) -> None:
        from .triton_exit_score import triton_exit_score

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in (h, norm_w, rows, p_prev, w1, b1, w2, b2)]
            score, z, p = triton_exit_score(*t, eps)
            for dst, src in zip(outputs, (score, z, p)):
                torch.as_tensor(dst, device="cuda").copy_(src)

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(h, norm_w, rows, p_prev, w1, b1, w2, b2, eps: float, outputs, tactic: int):
        dtype = _torch_dtype(h.dtype)
        D = _const(h.shape_expr[h.ndim - 1], "hidden size")
        k = _const(rows.shape_expr[0], "number of candidates")
        hm = _const(w1.shape_expr[0], "predictor width")
        name, ptx, launch = plugin_ptx(target, dtype, k, D, hm, eps)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch["grid"]
        params.block_x = launch["block_x"]
        params.shared_mem = launch["shared_mem"]
        return name.encode(), ptx.encode(), params, trtp.SymIntExprs(0)

    _REGISTERED = True
    return True


__all__ = [
    "HAVE_TRITON",
    "PLUGIN_ID",
    "compile_kernel",
    "entry_params",
    "gpu_self_test",
    "plugin_ptx",
    "ptx_target",
    "ptxas_check",
    "register",
    "strip_unused_trailing_params",
]
