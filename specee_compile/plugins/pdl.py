"""Programmatic dependent launch (PDL, sm_90 and newer) for the plugin kernels, and optionally Inductor's: opt-in
with SPECEE_PDL, for A/B runs on a GPU.

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
One exception, by design: the one-row GEMV and the turned rows kernel load their first weight tile before the wait
(`EARLY_W`), so the weights stream in during the previous kernel's tail. Weights are written only while a decoder
is built (cast, quantization, a new vocabulary) by plain ATen kernels, which never let a dependent start early.

SPECEE_PDL:
  unset / 0   off (the default: `all` sped the 7B rows up 0.7-3.2% and SmolLM2's dense step 24.6% on an H100 in
              session 27, but the 7B rows' tokens differed under it: near-ties or a race, see `all`);
  ops         the plugin kernels (GEMV, rows GEMMs, decode and tree attention, RoPE + cache write, top-k, the
              exit score);
  all         also the kernels Inductor generates (`torch._inductor.config.triton.enable_pdl`), whose waits
              Inductor places from its own dependency analysis: a kernel waits only if the kernel just before it
              wrote what it reads, and lets its dependents launch after a wait that follows its loads. A kernel
              with no loads has neither, so the kernel after it may read before an earlier one has finished: not
              the contract above, and a possible cause of session 27's 7B token differences.
Stream capture should record such launches as programmatic edges of the CUDA graph; whether the bodies of the exits'
conditional nodes take them is for the first GPU run to show. The AOTInductor twins (`specee_aoti` ops) never use
it: their package launches every kernel plainly.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import SettingError

MODES = ("0", "ops", "all")


def mode() -> str:
    v = os.environ.get("SPECEE_PDL", "0") or "0"
    if v not in MODES:
        raise SettingError(f"SPECEE_PDL={v!r}: expected one of {', '.join(MODES)}; unset it for 0 (off)")
    return v


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


def inductor_options() -> dict:
    """Inductor config patches: PDL in its own kernels where SPECEE_PDL=all (Inductor generates it only for CUDA
    devices of sm_90 and newer, so the patch is harmless elsewhere)."""
    return {"triton.enable_pdl": True} if mode() == "all" else {}
