"""Kernels behind the custom ops of `specee_compile.ops` (Triton, CUDA) and the TensorRT exit plugin.

`triton`, `tl` and `HAVE_TRITON` are imported once here: triton is optional on CPU-only installs, and
every kernel module guards on HAVE_TRITON. `register_kernel` makes a kernel the CUDA implementation
of an op, once.
"""

from __future__ import annotations

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - triton absent or broken
    triton = None
    tl = None
    HAVE_TRITON = False

_REGISTERED: set[str] = set()


def register_kernel(op: str, fn) -> bool:
    """Register `fn` as the CUDA kernel of custom op `op` ("specee::name"). Idempotent; False (and
    nothing registered) where triton is missing."""
    if not HAVE_TRITON:
        return False
    if op not in _REGISTERED:
        import torch

        from .. import ops  # noqa: F401  # defines the ops

        torch.library.register_kernel(op, "cuda", fn)
        _REGISTERED.add(op)
    return True
