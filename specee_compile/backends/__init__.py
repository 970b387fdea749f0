"""Backends turn the decode step into something runnable. Every backend is declared once, in
`registry.py`; model backends (eager, inductor) give the runtime `Segments` (`runtime/contract.py`),
artifact backends (onnx, tensorrt) run an exported directory through the same loop."""

from .registry import REGISTRY, BackendEntry, backend_names, get_backend


def make_segments(model, settings, program=None):
    """The segments of `model` for `settings.backend` (a backend of kind "model")."""
    from ..errors import SpecEEError

    entry = get_backend(settings.backend)
    if entry.kind != "model":
        raise SpecEEError(
            f"backend {settings.backend!r} runs from an exported artifact directory: "
            f"`specee-compile export MODEL -o DIR`, then `specee-compile generate DIR PROMPT --backend {settings.backend}`"
        )
    return entry.load()(model, settings, program)


__all__ = ["REGISTRY", "BackendEntry", "backend_names", "get_backend", "make_segments"]
