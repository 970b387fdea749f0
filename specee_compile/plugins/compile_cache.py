"""What a decoder's start found in the on-disk caches, and the kernel tuners' picks kept on disk.

A CUDA decoder's start compiles and captures before the prefill (`Decoder.start`, its `compile_s`). Two caches
decide whether a second process does that in seconds:
  - Inductor's FX graph cache (torch's own, under `TORCHINDUCTOR_CACHE_DIR`): counted here from its hit / miss
    counters;
  - the tuners' picks. The GEMV / rows tuner (`triton_gemv`) and the tree attention's time every candidate config
    of a shape on its first use, which took most of a 7B tree decoder's first start (compile_s 100 s, H200, session
    21). `pick` keeps each pick in `<cache>/tune/<fingerprint>.json` (`$SPECEE_CACHE`, else
    ~/.cache/specee-compile), so a later process reads it instead of timing again.

The fingerprint names what a pick is valid for: the device's name and compute capability, the torch, triton and
CUDA versions, and a digest of the kernels' sources (a change to a kernel or to its candidate configs starts a new
file). The callers' shape keys carry the rest, SPECEE_PDL included (a kernel launched with PDL is compiled as
another kernel). A pick read back is used only if it is one of the
candidates the caller would time now; otherwise the shape is timed again and the pick replaced.

SPECEE_TUNE_CACHE:
  unset / 1   read and write the picks (the default);
  0           neither: every shape is timed, as in a fresh cache (for tuner A/B runs).
A cache directory that cannot be written costs only the time: the pick is kept for the process, and one warning
says so.
Triton's own compile cache (~/.triton/cache) also serves the plugin kernels; it keeps no counters, so it is not
counted in `report`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingError

VERSION = 1
ENV = "SPECEE_TUNE_CACHE"
# the kernels whose candidates and timing the picks depend on (their digest is part of the fingerprint)
KERNEL_SOURCES = ("triton_gemv.py", "triton_tree_attention.py")

COUNTS = {"hits": 0, "misses": 0}  # tuner lookups of this process: read from disk, or timed
_STORES: dict[str, dict] = {}  # fingerprint -> {"fingerprint": parts, "picks": {kernel: {key: pick}}}
_WARNED: list[str] = []


def enabled() -> bool:
    v = os.environ.get(ENV, "1") or "1"
    if v not in ("0", "1"):
        raise SettingError(f"{ENV}={v!r}: expected 0 (time every kernel shape again) or 1 (keep the tuners' "
                           "picks on disk); unset it for 1")
    return v == "1"


def tune_dir() -> Path:
    from ..models.pypi import cache_dir

    return cache_dir() / "tune"


@functools.cache
def _sources_digest() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in KERNEL_SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def fingerprint_parts(device: torch.device) -> dict:
    """What the picks made on `device` are valid for (see the module's docstring)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {"name": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:  # the tuners run only on CUDA; a CPU key keeps the store testable anywhere
        dev = {"name": platform.processor() or platform.machine(), "capability": device.type, "cuda": None}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {**dev, "torch": torch.__version__, "triton": triton_version, "kernels": _sources_digest(),
            "version": VERSION}


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def key_text(key: tuple) -> str:
    """A shape key as text: dtypes without "torch.", devices by their type (the fingerprint names the card)."""
    def part(x) -> str:
        if isinstance(x, torch.dtype):
            return str(x).removeprefix("torch.")
        if isinstance(x, torch.device):
            return x.type
        return str(x)

    return "|".join(part(x) for x in key)


def _as_pick(value):
    """A pick read back from JSON: configs are tuples again (lists nested in lists, too); strings stay."""
    return tuple(_as_pick(v) for v in value) if isinstance(value, list) else value


def _path(fp: str) -> Path:
    return tune_dir() / f"{fp}.json"


def _read(fp: str, parts: dict) -> dict:
    """The store of fingerprint fp from disk; an empty one where the file is missing, unreadable, or not ours."""
    try:
        data = json.loads(_path(fp).read_text())
        if data.get("fingerprint") == parts and isinstance(data.get("picks"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"fingerprint": parts, "picks": {}}


def _store(device: torch.device) -> tuple[str, dict]:
    parts = fingerprint_parts(device)
    fp = _fingerprint(parts)
    if fp not in _STORES:
        _STORES[fp] = _read(fp, parts)
    return fp, _STORES[fp]


def _write(fp: str, kernel: str, key: str, value) -> None:
    """Add one pick to the file: re-read it first, so picks another process wrote meanwhile are kept."""
    from ..artifacts import atomic_file

    store = _STORES[fp]
    disk = _read(fp, store["fingerprint"])
    for k, picks in store["picks"].items():  # this process's picks win over the file's
        disk["picks"].setdefault(k, {}).update(picks)
    disk["picks"].setdefault(kernel, {})[key] = value
    try:
        path = _path(fp)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(disk, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        if not _WARNED:
            _WARNED.append(str(e))
            print(f"specee-compile: warning: the tuners' picks are not kept on disk ({e}); set {ENV}=0 or make "
                  f"{tune_dir()} writable", file=sys.stderr)
    _STORES[fp] = disk


def pick(kernel: str, key: tuple, device: torch.device, candidates: list, tune: Callable[[], Any]):
    """The config for one shape of `kernel`: the pick kept on disk where it is one of `candidates`, else
    `tune()`'s (the caller times the candidates), which is then kept. Counted in COUNTS."""
    if not enabled():
        COUNTS["misses"] += 1
        return tune()
    fp, store = _store(device)
    text = key_text(key)
    kept = store["picks"].get(kernel, {}).get(text)
    if kept is not None and _as_pick(kept) in candidates:
        COUNTS["hits"] += 1
        return _as_pick(kept)
    COUNTS["misses"] += 1
    value = tune()
    _write(fp, kernel, text, value)  # (the process's store too, written to disk or not)
    return value


def counts() -> dict:
    """Cumulative hits and misses of this process: Inductor's FX graph cache, and the tuners' picks."""
    from torch._dynamo.utils import counters

    ind = counters["inductor"]  # a bypassed graph (one the cache cannot key) compiles: a miss
    misses = ind["fxgraph_cache_miss"] + ind["fxgraph_cache_bypass"]
    return {"inductor": {"hits": int(ind["fxgraph_cache_hit"]), "misses": int(misses)}, "tuner": dict(COUNTS)}


def report(before: dict, after: dict) -> dict:
    """What happened between two `counts()`: each cache's hits and misses, and `state`: "hit" (everything came
    from a cache), "miss" (nothing did), "partial", or "none" (nothing was compiled or tuned)."""
    out = {name: {k: after[name][k] - before[name][k] for k in ("hits", "misses")} for name in after}
    hits = sum(v["hits"] for v in out.values())
    misses = sum(v["misses"] for v in out.values())
    out["state"] = ("none" if not hits + misses else "hit" if not misses else "miss" if not hits else "partial")
    return out
