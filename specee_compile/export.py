"""`specee-compile export MODEL`: the deployable artifact directory (see exported/README.md).

model + SpecEE artifacts (predictors, draft, schedule) -> prefill.onnx, decode_step.onnx (nested
`If` exits), draft.onnx, weights, predictors, tokenizer, TensorRT engines where TensorRT is present,
and manifest.json with the fingerprint and every file's sha256. Written atomically; the output
directory is checked before any work (see `artifacts.plan_output`: never a file, never a directory
holding files we did not write unless --force, which still deletes and overwrites nothing of the
user's). Each graph carries the model fingerprint and the tokenizer digest in its metadata, which
loading cross-checks against the manifest (`artifacts.check_export`).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

from .config import Settings
from .errors import ArtifactError


def _alias(loaded, model_name: str) -> str:
    from .models.zoo import ZOO

    for alias, entry in ZOO.items():
        if loaded.name in (alias, entry.hub_id):
            return alias
    return Path(model_name.rstrip("/")).name.replace(".gguf", "") or "model"


def export_command(model_name: str, output: str | None = None, *, backend: str = "onnx", artifacts=None,
                   trt_plugin: bool = False, max_context: int = 1024, dtype: str | None = None,
                   force: bool = False) -> dict:
    """dtype: the exported weights' and compute dtype; None = the model's own (`onnx_export.own_dtype`).
    Local safetensors models stream (`onnx_export.stream_model`): the weights are never all in memory."""
    from .api import default_artifacts_dir, eos_ids, load_program
    from .artifacts import atomic_directory, plan_output, read_manifest, stamp_graphs, write_manifest
    from .backends.onnx_export import count_if_nodes, export_onnx, own_dtype, stream_model
    from .models import load_model

    t0 = time.perf_counter()
    # bad numbers and an unusable output directory fail before the model loads
    settings = Settings(specee=True, max_context=max_context, dtype=dtype or "float32", artifacts=artifacts)
    if output is not None:
        plan_output(output, force=force)
    loaded = stream_model(model_name) or load_model(model_name)
    if dtype is None:
        dtype = own_dtype(loaded)
        settings = dataclasses.replace(settings, dtype=dtype)
    out = Path(output or Path("exported") / _alias(loaded, model_name))
    if output is None:
        plan_output(out, force=force)
    source = Path(artifacts) if artifacts else default_artifacts_dir(loaded)
    program = draft = None
    src_manifest: dict = {}
    if source is not None:
        program, draft, _, src_manifest = load_program(source, loaded, settings)
    else:
        print(f"no SpecEE artifacts for {loaded.name}: exporting a dense decode step "
              f"(train them with `specee-compile train {model_name} -o DIR`, then --artifacts DIR)", file=sys.stderr)
    with atomic_directory(out, force=force) as tmp:
        print(f"exporting {loaded.name} to {out} ...", file=sys.stderr)
        info = export_onnx(loaded.model, program, tmp, settings, draft=getattr(draft, "draft", None),
                           trt_exit_plugin=trt_plugin, weights_from=getattr(loaded, "weights", None),
                           # TensorRT parses If nesting only to depth 24 and builds deep nests slowly
                           structure="flat" if backend == "tensorrt" else "nested")
        if source is not None:
            for name in ("predictors.safetensors", "predictors_config.json", "draft.safetensors", "draft_config.json"):
                if (source / name).exists():
                    shutil.copy2(source / name, tmp / name)
        loaded.tokenizer.save_pretrained(str(tmp))
        stamp_graphs(tmp, fingerprint=loaded.fingerprint)  # graphs <-> model + tokenizer, checked on load
        engines = []
        if backend == "tensorrt":
            from .backends.tensorrt import build_engines

            engines = build_engines(tmp / "decode_step.onnx", tmp)
        manifest_info = {
            "kind": "export",
            "dtype": dtype,
            "num_layers": loaded.model.config.num_hidden_layers,
            "max_context": info["meta"]["max_len"],
            "exit_layers": program.exit_layers if program else [],
            "thresholds": {str(ep.layer): ep.threshold for ep in program.exit_points} if program else {},
            "schedule": src_manifest.get("schedule", {}),
            "draft": {**src_manifest.get("draft", {}), "runtime": info["draft_runtime"]},
            "eos_ids": sorted(eos_ids(loaded)),
            "graphs": info["graphs"],
            "if_nodes": count_if_nodes(tmp / "decode_step.onnx"),
            "engines": engines,
            "export_s": info["export_s"],
            "source_artifacts": str(source) if source else None,
        }
        manifest = write_manifest(tmp, model=loaded.name, fingerprint=loaded.fingerprint, info=manifest_info)
    read_manifest(out)  # verify what landed
    if not (out / "decode_step.onnx").exists():
        raise ArtifactError(f"export to {out} did not produce decode_step.onnx")
    print(f"wrote {out}: {len(manifest['files'])} files, {manifest_info['if_nodes']} If nodes, "
          f"{len(engines)} TensorRT engine(s), {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return manifest
