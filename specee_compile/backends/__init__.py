"""Backends turn the decode step into runnable segments: eager (reference), inductor, onnx, tensorrt."""

from .base import KVCache, Segments


def make_segments(model, settings, program=None) -> Segments:
    """Build the segments of `model` for `settings.backend` (eager or inductor; onnx/tensorrt
    artifacts run through their own runners, see `backends.onnx_runner`)."""
    from ..errors import SpecEEError

    if settings.backend == "eager":
        from .eager import EagerSegments

        return EagerSegments(model, settings, program)
    if settings.backend == "inductor":
        from .inductor import InductorSegments

        return InductorSegments(model, settings, program)
    raise SpecEEError(
        f"backend {settings.backend!r} runs from an exported artifact directory: "
        f"`specee-compile export MODEL -o DIR`, then `specee-compile generate DIR PROMPT --backend {settings.backend}`"
    )


__all__ = ["KVCache", "Segments", "make_segments"]
