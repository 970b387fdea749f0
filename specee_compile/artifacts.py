"""Artifact directories: predictors + draft + schedule (+ ONNX graphs, engines), tied to one model.

Layout (see exported/README.md for the ONNX part):
    manifest.json               format version, model id + fingerprint, dtype, exit layers,
                                thresholds, schedule, draft spec, every file with sha256 and size
    predictors.safetensors      stacked predictor MLPs (+ predictors_config.json)
    draft.safetensors           EAGLE-style draft head, when the draft source is `eagle`
                                (+ draft_config.json)
    *.onnx, *.onnx.data, *.engine   written by `specee-compile export`

Writes are atomic: everything goes to a temporary sibling directory, which replaces the target in
one rename; an existing directory is kept until the new one is complete. Loading verifies the
manifest, every checksum and the model fingerprint, and says exactly what does not match.
Never pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHIPPED_ROOT = Path(__file__).parent / "shipped"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_dir(alias: str) -> Path | None:
    d = SHIPPED_ROOT / alias
    return d if (d / MANIFEST).exists() else None


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory; on success it replaces `target` (old contents kept until then)."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{os.getpid()}-{int(time.time())}"
        os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_manifest(directory: Path, *, model: str, fingerprint: str, info: dict) -> dict:
    """Checksum every file in `directory` and write manifest.json (call last, inside the temp dir)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": "specee-compile",
        "model": model,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory {d} does not exist; create it with `specee-compile train MODEL -o {d}`"
                            " or `specee-compile export MODEL -o DIR`")
    mpath = d / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{d} has no {MANIFEST}: not a specee-compile artifact directory, or a partial write; "
                            "re-run the command that produced it")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the file is corrupt, re-create the artifacts") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath} has format_version {manifest.get('format_version')!r}, this specee-compile "
                            f"reads {FORMAT_VERSION}; re-create the artifacts with this version")
    if verify:
        problems = []
        for rel, meta in manifest.get("files", {}).items():
            p = d / rel
            if not p.exists():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != meta["bytes"]:
                problems.append(f"{rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']} (partial?)")
            elif sha256_file(p) != meta["sha256"]:
                problems.append(f"{rel} checksum differs from the manifest (corrupt or modified)")
        if problems:
            raise ArtifactError(f"artifacts in {d} are damaged: " + "; ".join(problems) + "; re-create them")
    return manifest


def check_fingerprint(manifest: dict, fingerprint: str, directory) -> None:
    if manifest.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"artifacts in {directory} were made for model {manifest.get('model')!r} with fingerprint "
            f"{manifest.get('fingerprint')}, but the loaded model's fingerprint is {fingerprint}; use artifacts made "
            "for this model (`specee-compile train MODEL`), or load the model they were made for"
        )
