"""The `cpp` backend: the C++ runner (`cpp/`, specee_runtime + specee_runner) over an AOTInductor export.

    specee-compile export MODEL --format aoti -o DIR
    specee-compile generate DIR "PROMPT" --backend cpp [--specee --mode lossless --kv backfill]

Why: a C++ deployment runs the whole decode loop (prefill, exits, schedule, EAGLE draft, skip/backfill
KV, lossless rollback) with no Python; this backend is how the package drives and tests it. Python
tokenizes the prompt (the tokenizer saved in DIR), the runner gets token ids and returns token ids,
per-token exit layers and timing as JSON, and Python decodes the text.

Build: once per source digest (cpp/ sources + torch version), with cmake + g++ against the libtorch in
the torch wheel, into `<cache>/cpp/<digest>/` (`$SPECEE_CACHE`, else ~/.cache/specee-compile); a build
lands by one rename, so concurrent builds never see a half-built runner.

Error: cmake or a C++ compiler missing -> BackendUnavailable naming what to install; the runner's
own errors (missing or corrupt artifact, prompt too long) come back as one SpecEEError line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..config import Settings
from ..errors import BackendUnavailable, SpecEEError

CPP_DIR = Path(__file__).resolve().parents[2] / "cpp"
RUNNER = "specee_runner"


def cpp_source_dir() -> Path:
    if not (CPP_DIR / "CMakeLists.txt").is_file():
        raise BackendUnavailable(f"the C++ runner sources are not at {CPP_DIR}; the cpp backend needs a source "
                                 "checkout of specee-compile (the cpp/ directory)")
    return CPP_DIR


def toolchain_missing() -> str | None:
    """What is missing to build the runner (None: cmake and a C++ compiler are on PATH)."""
    if shutil.which("cmake") is None:
        return "cmake"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "a C++ compiler (g++)"
    return None


def source_digest() -> str:
    import torch

    h = hashlib.sha256(f"torch={torch.__version__}\n".encode())
    src = cpp_source_dir()
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".hpp", ".cpp", ".txt", ".cmake") and "build" not in p.parts:
            h.update(p.relative_to(src).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from ..models.pypi import cache_dir

    return cache_dir() / "cpp" / source_digest()


def build_runner(verbose: bool = False, jobs: int = 2) -> Path:
    """Build the library + runner once (cached); returns the build directory holding both."""
    out = build_dir()
    if (out / RUNNER).is_file():
        return out
    missing = toolchain_missing()
    if missing:
        raise BackendUnavailable(f"building the C++ runner needs {missing}, which is not on PATH; install it "
                                 "(e.g. apt-get install cmake g++)")
    import torch.utils

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cfg = ["cmake", "-S", str(cpp_source_dir()), "-B", str(tmp), "-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
        for cmd in (cfg, ["cmake", "--build", str(tmp), "-j", str(jobs)]):
            if verbose:
                print("+ " + " ".join(cmd), file=sys.stderr)
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
                raise BackendUnavailable("building the C++ runner failed: " + " | ".join(tail))
        try:
            os.replace(tmp, out)  # one rename: a concurrent build that landed first wins
        except OSError:
            if not (out / RUNNER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def runner_args(directory, prompt_ids: list[int], settings: Settings) -> list[str]:
    """The runner's flags for these settings (dense unless settings.specee)."""
    s = settings
    args = [str(directory), "--ids", ",".join(str(int(t)) for t in prompt_ids),
            "--mode", s.mode if s.specee else "dense", "--kv", s.kv_policy,
            "--max-new-tokens", str(s.max_new_tokens), "--max-pending", str(s.max_pending),
            "--min-exit-layer", str(s.min_exit_layer), "--online-window", str(s.online_window),
            "--online-offsets", ",".join(str(o) for o in s.online_offsets), "--device", s.device]
    if s.threshold is not None:
        args += ["--threshold", repr(float(s.threshold))]
    if not s.use_schedule:
        args.append("--no-schedule")
    if not s.exit_cost_check:
        args.append("--no-exit-cost-check")
    if os.environ.get("SPECEE_PDL") == "0":  # off for the Python step: off for the runner's captured step too
        args.append("--no-pdl")
    import torch

    return args + ["--threads", str(torch.get_num_threads())]  # the same CPU threads as this process


def run_runner(directory, prompt_ids: list[int], settings: Settings, extra: tuple[str, ...] = (),
               timeout: float | None = None) -> dict:
    """Run the C++ runner; its JSON result as a dict. A runner error is one SpecEEError line."""
    if settings.temperature > 0:
        raise SpecEEError("the cpp backend decodes greedily; drop --temperature")
    if settings.draft_source not in (None, "eagle"):
        raise SpecEEError(f"the cpp backend runs the exported EAGLE draft; --draft {settings.draft_source} is "
                          "not available there")
    exe = build_runner() / RUNNER
    r = subprocess.run([str(exe), *runner_args(directory, prompt_ids, settings), *extra],
                       capture_output=True, text=True, check=False, timeout=timeout)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit code {r.returncode}"
        raise SpecEEError(msg.removeprefix("specee_runner: error: "))
    return json.loads(r.stdout)


def result_from_json(data: dict, device: str = "cpu"):
    """The runner's JSON as the Python runtime's `GenerationResult`: its load (packages and weights) as load_s, its
    CUDA graph capture as compile_s, its cost check's outcome as exit_program, and on CUDA whether its captured steps
    ran with PDL (`all`: programmatic edges into the packages' waiting kernels; `0`: none), as `generate
    --stats-json` reports them for every backend."""
    from ..runtime.decoder import GenerationResult

    exit_program = None
    if "exit_points_kept" in data:  # the runner ran the cost check (runtime/exit_costs.py's rule)
        exit_program = {k: data[k] for k in ("exit_points_kept", "exit_points_dropped", "step_costs")}
    return GenerationResult(
        prompt_len=data["prompt_len"], token_ids=list(data["token_ids"]), num_layers=data["num_layers"],
        exit_layers=list(data["exit_layers"]), layer_passes=data["layer_passes"], layer_rows=data["layer_rows"],
        decode_steps=data["decode_steps"], rollbacks=data["rollbacks"], predictor_calls=data["predictor_calls"],
        head_calls=data["head_calls"], prefill_s=data["prefill_s"], decode_s=data["decode_s"],
        load_s=data["load_s"], compile_s=data.get("capture_s", 0.0), exit_program=exit_program,
        pdl=None if not device.startswith("cuda") else "all" if data.get("pdl_edges", 0) > 0 else "0")


class CppArtifact:
    """An exported AOTInductor directory run by the C++ runner: the whole loop is in C++, so this backend
    offers `generate` (not the per-layer `Segments` contract)."""

    name = "cpp"

    def __init__(self, directory, settings: Settings):
        from ..artifacts import read_manifest

        self.directory = Path(directory)
        self.settings = settings
        self.manifest = read_manifest(self.directory)  # sizes + sha256, before any C++ runs
        if self.manifest.get("format") != "aoti" or "cpp" not in self.manifest:
            raise SpecEEError(f"{directory} is not an AOTInductor export (manifest format "
                              f"{self.manifest.get('format', 'onnx')!r}); export it with "
                              f"`specee-compile export MODEL --format aoti -o {directory}`")
        self.eos_ids = set(self.manifest.get("eos_ids") or ())
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
            except (OSError, ValueError) as e:
                raise SpecEEError(f"{self.directory} holds no usable tokenizer ({e}); re-export it") from None
        return self._tokenizer

    def generate(self, prompt_ids: list[int], on_token: Callable[[int], None] | None = None):
        # the runner checks sizes itself; read_manifest verified sha256 already
        res = result_from_json(run_runner(self.directory, prompt_ids, self.settings, extra=("--no-verify",)),
                               self.settings.device)
        if on_token is not None:
            for t in res.token_ids:
                on_token(t)
        return res


def open_artifact(directory, settings: Settings) -> CppArtifact:
    """Registry factory (kind "artifact")."""
    return CppArtifact(directory, settings)


__all__ = ["CppArtifact", "build_runner", "open_artifact", "run_runner",
           "toolchain_missing"]
