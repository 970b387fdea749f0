"""The one backend registry: every backend is declared here, once, and found by name.

Why a table of import paths and not decorators: a decorator registry fills up only when its modules
are imported, so tests must import (and reset) it; this table is plain data, importable without torch,
and `config.Settings`, the CLI's `--backend` choices and `api.build_decoder` all read it.

A backend is one of two kinds:
    model     built from a loaded Hugging Face model (`factory(model, settings, program) -> Segments`);
              the runtime loop (`runtime/decoder.py`) drives it through `runtime.contract.Segments`
              (and `WholeStep`, when it also has a captured whole-step path)
    artifact  runs an exported artifact directory (`specee-compile export`);
              `factory(directory, settings) -> StepBackend + what the loop needs (tokenizer, program, draft)`

Adding a backend = one `BackendEntry` below + its module. Nothing else lists backend names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendEntry:
    name: str
    kind: str  # "model" | "artifact"
    factory: str  # "module:callable", imported on first use
    summary: str

    def load(self):
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, BackendEntry] = {
    e.name: e
    for e in (
        BackendEntry("eager", "model", "specee_compile.backends.eager:EagerSegments",
                     "the decode-step functions as written; the reference every backend is tested against"),
        BackendEntry("inductor", "model", "specee_compile.backends.inductor:InductorSegments",
                     "captured + passed segments compiled by Inductor; on CUDA whole-step CUDA graphs"),
        BackendEntry("onnx", "artifact", "specee_compile.backends.onnx_runner:open_artifact",
                     "an exported conditional ONNX decode graph on ONNX Runtime"),
        BackendEntry("tensorrt", "artifact", "specee_compile.backends.onnx_runner:open_artifact",
                     "TensorRT engines of an exported directory (falls back to its ONNX graphs where "
                     "TensorRT cannot run)"),
        BackendEntry("cpp", "artifact", "specee_compile.backends.cpp_runner:open_artifact",
                     "the C++ runner (cpp/) over an AOTInductor export (`export --format aoti`)"),
    )
}


def backend_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_backend(name: str) -> BackendEntry:
    from ..errors import SpecEEError

    try:
        return REGISTRY[name]
    except KeyError:
        raise SpecEEError(f"backend {name!r} is not one of {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "BackendEntry", "backend_names", "get_backend"]
