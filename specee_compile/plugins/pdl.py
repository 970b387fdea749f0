"""Programmatic dependent launch (PDL, sm_90 and newer) for the plugin kernels and Inductor's: on by default on
such a CUDA device (`all`), set with SPECEE_PDL.

Why: a decode step at SmolLM2's widths is bound by its launches (the H200's tree step: ~600 kernels of 2-6 us,
benchmarks/GPU_NOTES.md session 22), and every kernel boundary of a captured graph idles while the next kernel
launches and sets up. With PDL a kernel may be scheduled while the one before it in the stream still runs.

The contract every plugin kernel keeps when launched with it (`kernel_args`):
  - `gdc_wait()` first, before it reads or writes any global memory: it returns once the kernel before it has
    completed and its writes are visible;
  - `gdc_launch_dependents()` only after that wait, once its loads are issued (after its main loop), so the next
    kernel may be scheduled during its tail, and waits in turn.
So when a kernel passes its wait, every kernel before it in the stream has completed, launched with PDL or not (a
launch without it is serialized as usual). Both instructions are no-ops where PDL is off.
The kernels an AOTInductor package embeds (the one-row GEMV, RoPE + cache write, decode attention) wait through
`wait_token()` instead: the same `griddepcontrol.wait`, as a value every later global access of the kernel takes
into its address. Inductor functionalizes a package's Triton launch by reading the kernel's TTIR for the tensors it
writes, and it cannot read through an asm statement with side effects (Triton's `gdc_wait`): it then assumes the
launch writes every input and clones each one per call, the weights and the cache included (session 31: the runner
at 0.40x Python). The token's asm is pure, so the analysis passes it, and the data dependence keeps the compiler
from moving any access above it.
One exception, by design: the one-row GEMV and the turned rows kernel load their first weight tile before the wait
(`EARLY_W`), so the weights stream in during the previous kernel's tail. Weights are written only while a decoder
is built (cast, quantization, a new vocabulary) by plain ATen kernels, which never let a dependent start early.

SPECEE_PDL:
  unset       the default: `all` where the current CUDA device is sm_90+ and this torch's Inductor can be held to
              the contract (`ops` where it cannot), `0` anywhere else (`default()`). Measured on an H100 (sessions
              27-29): `all` +3.8% on 7B dense, +28% on SmolLM2's dense step (fp32 and bf16, 20/20 turns identical
              to dense without it), +7% on its tree; the CUDA parity tests pass under it. The 7B fp16 dense
              twin's tokens part once from the row's without it, at a near-tie (a top-2 gap of 0.02 at a logit
              scale of 5.3): the tuners pick configs per mode, so the twins round apart, as two compiled kernels
              do (our dense and HF's eager part at the first token on those random weights).
  0           off;
  ops         the plugin kernels (GEMV, rows GEMMs, decode and tree attention, RoPE + cache write, top-k, the
              exit score);
  all         also the kernels Inductor generates (`torch._inductor.config.triton.enable_pdl`), held to the
              contract above: each waits before its first global access (`_inductor_waits_first`). Inductor's
              own placement waits only where the kernel just before wrote what a kernel reads; a kernel with no
              loads then neither waits nor holds its dependents back, so the next kernel may read ahead of an
              earlier one still writing (a possible cause of session 27's 7B token differences, measured with
              that placement).
Stream capture records such launches as programmatic edges of the CUDA graph.

AOTInductor packages (the C++ runner, backends/aoti_export.py) launch every kernel plainly: AOTInductor's C++
wrapper sets no launch attributes. Where the export runs under `all` (the default on sm_90+; `package_mode`), their
kernels are compiled to the same contract (Inductor's with `triton.enable_pdl` and the wait-first placement, the
twins with their PDL constexpr), and the manifest names them (`PACKAGE_WAITING_KERNELS`); the runner then turns the
edges of its captured graph that lead into those kernels into programmatic ones after capture, which is what stream
capture makes of a PDL launch. Measured on an H100 (session 31, SmolLM2's shapes, fp32, dense): the runner 1849.9
tok/s against the Python step's 1820.6 under PDL (1.02x; 0.78x with packages compiled without it), the same ids.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import SettingError
from . import HAVE_TRITON, tl, triton

MODES = ("0", "ops", "all")


def mode() -> str:
    """SPECEE_PDL, or `default()` where it is unset."""
    v = os.environ.get("SPECEE_PDL") or default()
    if v not in MODES:
        raise SettingError(f"SPECEE_PDL={v!r}: expected one of {', '.join(MODES)}; unset it for the default "
                           f"({default()} here)")
    return v


@functools.cache
def default() -> str:
    """The mode where SPECEE_PDL is unset: `all` on a current CUDA device of sm_90+ whose Inductor places its
    PDL waits in the way `_inductor_waits_first` replaces (`ops` where it does not: the plugin kernels only), `0`
    elsewhere (a CPU-only process, ROCm, an older card). Called only where CUDA work is set up."""
    if not torch.cuda.is_available() or not _capable(torch.device("cuda", torch.cuda.current_device())):
        return "0"
    return "all" if _inductor_kernel() is not None else "ops"


def _inductor_kernel():
    """Inductor's `TritonKernel` class where it places its PDL waits in the method `_inductor_waits_first`
    replaces (`_handle_pdl_before_access`), else None (a torch whose PDL codegen we do not know)."""
    from torch._inductor.codegen import triton as inductor_triton

    kernel = inductor_triton.TritonKernel
    return kernel if hasattr(kernel, "_handle_pdl_before_access") else None


@contextlib.contextmanager
def setting(value: str):
    """SPECEE_PDL = value inside the block (what a kernel compiled or captured there takes), restored after."""
    old = os.environ.get("SPECEE_PDL")
    os.environ["SPECEE_PDL"] = value
    try:
        mode()  # a bad value fails here, before any work
        yield
    finally:
        if old is None:
            os.environ.pop("SPECEE_PDL", None)
        else:
            os.environ["SPECEE_PDL"] = old


@functools.cache
def _capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def kernel_args(device: torch.device) -> dict:
    """The launch keywords of a plugin kernel on `device`: the kernel's PDL constexpr and Triton's launch_pdl
    option, both True where SPECEE_PDL is on and the device has PDL; {} otherwise (the kernel's default: off)."""
    if mode() == "0" or not _capable(device):
        return {}
    return {"PDL": True, "launch_pdl": True}


# The kernels of a package compiled under `package_mode() == "all"` that wait before any global access, by name
# (the runner matches substrings): Inductor's pointwise, persistent-reduction and reduction kernels (its templates
# get no PDL codegen), and the twins that take the PDL constexpr (`_aoti_attn_kernel` does not).
PACKAGE_WAITING_KERNELS = ("triton_poi_", "triton_per_", "triton_red_", "gemv_kernel", "rope_append_kernel",
                           "decode_attn_kernel")


def package_mode(device: torch.device) -> str:
    """The PDL mode AOTInductor packages for `device` are compiled with: `all` where `mode()` is `all` (set, or the
    default on sm_90+) and `device` has PDL, else `0` (`ops` too: the runner's edges follow the package)."""
    return "all" if mode() == "all" and _capable(device) else "0"  # (mode(): a bad value is refused)


def twin_args(device: torch.device, early_w: bool = False) -> dict:
    """The PDL constexprs of an AOTInductor twin's launch (`wrap_triton`, which a package embeds). Every constexpr
    is named, the defaulted ones included: Inductor's launcher for a user kernel counts its arguments, and one
    short by a defaulted constexpr fails its autotuning block ("launcher() missing ... '_grid_1'"). early_w: the
    GEMV's EARLY_W, on with PDL as in `kernel_args`' callers."""
    on = package_mode(device) == "all"
    return {"PDL": on, **({"EARLY_W": on} if early_w else {})}


def package_inductor_options(device: torch.device) -> dict:
    """Inductor config patches for a package's compile: `triton.enable_pdl` with the wait-first placement where
    `package_mode` is `all` (the Python step's `inductor_options` then), else none."""
    return inductor_options() if package_mode(device) == "all" else {}


def inductor_options() -> dict:
    """Inductor config patches: PDL in its own kernels where SPECEE_PDL=all (Inductor generates it only for CUDA
    devices of sm_90 and newer, so the patch is harmless elsewhere), each kernel waiting first."""
    if mode() != "all":
        return {}
    _inductor_waits_first()
    return {"triton.enable_pdl": True}


@functools.cache
def _inductor_waits_first() -> None:
    """Every Inductor kernel generated with PDL waits (`gdc_wait`) before each global load or store, of which
    Inductor's codegen keeps the first: so before any access, as the plugin kernels do. Then a kernel that passes
    its wait knows every kernel before it has completed, whatever it reads, and its own `gdc_launch_dependents`
    (which Inductor places after a wait) cannot release the next kernel early either. The cost: nothing of a kernel
    runs before its wait but its launch and index math. Replaces `TritonKernel._handle_pdl_before_access`, which
    waits only where the scheduler's previous node wrote (or, for stores, read) the buffer; only kernels compiled
    with `triton.enable_pdl` call it. A torch whose Inductor has no such method is refused (its PDL codegen is
    unknown to us)."""
    kernel = _inductor_kernel()
    if kernel is None:
        raise SettingError(f"SPECEE_PDL=all: this torch's Inductor ({torch.__version__}) places its PDL waits in a "
                           "way this plugin does not know; use SPECEE_PDL=ops (the plugin kernels only)")
    if not hasattr(kernel, "_specee_inductor_placement"):  # Inductor's own, kept for the tests
        kernel._specee_inductor_placement = kernel._handle_pdl_before_access
    kernel._handle_pdl_before_access = wait_before_access


def wait_before_access(self, wait_buffer, *dependencies, consider_reads=False):
    """`TritonKernel._handle_pdl_before_access` under SPECEE_PDL=all: a wait before every access (see above)."""
    if not self._enable_pdl_codegen():
        return
    if self.inside_reduction and self.range_trees[-1].is_loop:
        wait_buffer = self.body  # before the loop, as Inductor hoists it
    wait_buffer.writeline(self.GDC_WAIT)


if HAVE_TRITON:

    @triton.jit
    def wait_token():
        # PDL's wait as a value (see the module docstring): zero, known to the compiler only as a multiple of 16,
        # so a pointer plus it keeps the 16-element alignment Triton specializes on (vector loads stay vector)
        t = tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=True,
                                      pack=1)
        return t * 16

    @triton.jit
    def launch_token(after):
        # `gdc_launch_dependents` as a value (Triton's has side effects too): after `after` (the wait's token), kept
        # by the kernel taking it into an address it stores to
        t = tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r,r", [after],
                                      dtype=tl.int32, is_pure=True, pack=1)
        return t * 16
