"""Artifact directories: predictors + draft + schedule (+ ONNX graphs, engines), tied to one model.

Layout (see exported/README.md for the ONNX part):
    manifest.json               format version, model id + fingerprint, dtype, exit layers,
                                thresholds, schedule, draft spec, every file with sha256 and size
    predictors.safetensors      stacked predictor MLPs (+ predictors_config.json)
    draft.safetensors           EAGLE-style draft head, when the draft source is `eagle`
                                (+ draft_config.json)
    *.onnx, *.onnx.data, *.engine   written by `specee-compile export`

Writes are atomic: everything goes to a temporary sibling directory `.NAME.tmp-PID-*`, which
replaces the target in one rename once complete. `-o DIR` never deletes what specee-compile did not
write: an existing directory is replaced only when it holds our manifest and nothing the manifest
does not list (or is empty); any other directory is refused unless `force=True`, which adds the
artifact's files beside the user's and still never overwrites or deletes a file it did not write.
A file target is always refused. The temporary directory is removed on every exit path (SIGTERM,
SIGHUP and SIGINT raise inside the write so cleanup runs), and stale ones left by killed runs are
removed when the same target is written again.

Loading verifies the manifest (a JSON object; `files` maps relative paths that stay inside the
directory to {sha256, bytes}), that each listed path is a regular file of that size and checksum,
and that every file a loader reads is listed (an unlisted predictor, draft, graph or tokenizer file
is refused; other unlisted files are ignored, never read). Exported directories also cross-check
each ONNX graph (its role, the model fingerprint and the tokenizer digest stamped into its metadata
at export, its external-data files) against the manifest. Errors say exactly what does not match.
Never pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArtifactError, BackendUnavailable, Interrupted

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOOL = "specee-compile"
SHIPPED_ROOT = Path(__file__).parent / "shipped"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists a few dozen files; anything this big is not one
GRAPH_FINGERPRINT_KEY = "specee_model_fingerprint"  # stamped into each exported graph's metadata_props
GRAPH_TOKENIZER_KEY = "specee_tokenizer_sha256"

# What the loaders read from an artifact directory (api.load_program, the draft, the ONNX runner,
# AutoTokenizer.from_pretrained): top-level files with these names or suffixes, and tokenizer files.
# Every one of them that is present must be listed in (and verified against) the manifest.
_LOADER_NAMES = frozenset({"predictors.safetensors", "predictors_config.json", "draft.safetensors",
                           "draft_config.json", "weights.bin", "config.json", "generation_config.json"})
_LOADER_SUFFIXES = (".onnx", ".onnx.data", ".engine", ".plan", ".safetensors", ".bin", ".pt2", ".so")
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges",
                       "spiece", "sentencepiece")
_TOKENIZER_DIRS = ("additional_chat_templates",)


def is_tokenizer_file(rel: str) -> bool:
    """A path (relative, posix) that `AutoTokenizer.from_pretrained(directory)` may read."""
    head, _, rest = rel.partition("/")
    if rest:
        return head in _TOKENIZER_DIRS
    return rel.startswith(_TOKENIZER_PREFIXES)


def loader_reads(rel: str) -> bool:
    """A path (relative, posix) that some artifact loader may read, so the manifest must cover it."""
    if "/" in rel:
        return is_tokenizer_file(rel)
    return rel in _LOADER_NAMES or rel.endswith(_LOADER_SUFFIXES) or is_tokenizer_file(rel)


def _open_regular(path: Path, what: str | None = None):
    """Open `path` for reading only if it is a regular file: never a FIFO or a device (/dev/zero would
    hang a checksum), checked before the open and again on the open descriptor."""
    what = what or str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ArtifactError(f"cannot read {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{what} is not a regular file; artifacts hold regular files only")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{what} is not a regular file; artifacts hold regular files only")
    return os.fdopen(fd, "rb")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with _open_regular(Path(path)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_dir(alias: str) -> Path | None:
    d = SHIPPED_ROOT / alias
    return d if (d / MANIFEST).exists() else None


def tokenizer_digest(files: dict) -> str:
    """One sha256 over the tokenizer files of a manifest `files` map (name and checksum of each)."""
    h = hashlib.sha256()
    for rel in sorted(r for r in files if is_tokenizer_file(r)):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- where an artifact may be written

@dataclass(frozen=True)
class OutputPlan:
    """How an artifact lands at `target`: `new` (nothing there), `replace` (an empty directory, or one
    holding only our earlier artifact: swapped in one rename), `merge` (files added beside others,
    with --force; our earlier files are replaced, nothing else is touched)."""

    target: Path
    mode: str
    ours: frozenset = field(default_factory=frozenset)


def _own_manifest(d: Path) -> dict | None:
    """The manifest of a directory specee-compile wrote, else None. Never raises, never hangs."""
    m = d / MANIFEST
    try:
        st = os.lstat(m)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return None
        with _open_regular(m) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, ArtifactError):
        return None
    if (isinstance(data, dict) and data.get("tool") == TOOL and "format_version" in data
            and isinstance(data.get("files"), dict)
            and all(isinstance(r, str) and _rel_problem(r) is None for r in data["files"])):
        return data
    return None


def _entries(d: Path, limit: int | None = None, skip_prefix: str | None = None):
    """Relative posix paths of everything under `d` that is not a directory (links not followed);
    top-level entries starting with `skip_prefix` (our own temporary directory) are left out."""
    n = 0
    for root, dirs, files in os.walk(d, followlinks=False):
        rel_root = Path(root).relative_to(d)
        if skip_prefix and root == str(d):
            dirs[:] = [x for x in dirs if not x.startswith(skip_prefix)]
            files = [x for x in files if not x.startswith(skip_prefix)]
        for name in files + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            yield (rel_root / name).as_posix()
            n += 1
            if limit is not None and n >= limit:
                return


def probe_writable(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (None if they can), found by creating and removing
    one: permission bits say nothing for root, nor for a read-only or pseudo file system."""
    try:
        fd, name = tempfile.mkstemp(prefix=".specee-probe-", dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def _is_cwd_or_above(t: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return t == cwd or t in cwd.parents


def plan_output(target, *, force: bool = False, flag: str = "-o") -> OutputPlan:
    """Check, before any work, that an artifact may be written to `target`; raise ArtifactError
    (naming --force where it would help) if not. Nothing is created or changed here."""
    raw = str(target)
    t = Path(os.path.realpath(target))
    if os.path.lexists(t) and not t.is_dir():
        raise ArtifactError(f"{flag} {raw} is an existing file, not a directory; specee-compile never replaces "
                            "a file (not even with --force): pass a directory path")
    if not t.exists():
        parent = t.parent
        while not os.path.lexists(parent):
            parent = parent.parent
        if not parent.is_dir():
            raise ArtifactError(f"cannot create {flag} {raw}: {parent} is a file, not a directory")
        why = probe_writable(parent)
        if why:
            raise ArtifactError(f"cannot write {flag} {raw}: {parent} is not writable ({why}); "
                                "pick a directory you can write to")
        return OutputPlan(t, "new")
    why = probe_writable(t)
    if why:
        raise ArtifactError(f"cannot write {flag} {raw}: the directory is not writable ({why})")
    plan = _existing_plan(t, raw, flag, force)
    if plan.mode == "replace":  # the new directory is built beside it and renamed over it
        why = probe_writable(t.parent)
        if why:
            raise ArtifactError(f"cannot replace {flag} {raw}: its parent {t.parent} is not writable ({why})")
    return plan


def _existing_plan(t: Path, raw: str, flag: str, force: bool) -> OutputPlan:
    inplace = _is_cwd_or_above(t)  # never rename away the directory we (or the user's shell) stand in
    own = _own_manifest(t)
    if own is not None:
        ours = frozenset(own["files"]) | {MANIFEST}
        extras = [e for e in _entries(t, limit=10_000, skip_prefix=f".{t.name}.tmp-") if e not in ours]
        if not extras:
            return OutputPlan(t, "merge" if inplace else "replace", ours)
        if not force:
            raise ArtifactError(
                f"{flag} {raw} holds a specee-compile artifact plus files its manifest does not list "
                f"({', '.join(extras[:3])}{', ...' if len(extras) > 3 else ''}); refusing to replace it. Move those "
                "files away, pick another directory, or pass --force to write the new artifact beside them "
                "(they are kept)")
        return _merge_plan(t, raw, flag, ours)
    with os.scandir(t) as it:
        empty = all(e.name.startswith(f".{t.name}.tmp-") for e in it)
    if empty:
        return OutputPlan(t, "merge" if inplace else "replace")
    if not force:
        raise ArtifactError(
            f"{flag} {raw} is a non-empty directory that is not a specee-compile artifact (no {MANIFEST} of ours); "
            "refusing to touch it. Pick a new or empty directory, or pass --force to add the artifact's files "
            "beside the ones there (nothing there is deleted or overwritten)")
    return _merge_plan(t, raw, flag, frozenset())


def _merge_plan(t: Path, raw: str, flag: str, ours: frozenset) -> OutputPlan:
    top = [e.name for e in os.scandir(t) if not e.name.startswith(f".{t.name}.tmp-")]
    top += [f"{d}/{x}" for d in _TOKENIZER_DIRS if (t / d).is_dir() for x in _entries(t / d, limit=1000)]
    clash = [e for e in top if e not in ours and (loader_reads(e) or e == MANIFEST)]
    if clash:
        raise ArtifactError(
            f"--force cannot write into {flag} {raw}: it holds {', '.join(sorted(clash)[:4])}, which specee-compile "
            "did not write and which an artifact would overwrite or a loader would read; move them away or pick "
            "another directory")
    return OutputPlan(t, "merge", ours)


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` directories beside (or, for in-place writes, inside) `target` left by runs
    that were killed (their process is gone); a temp directory of a live process is left alone. A
    `.NAME.old-*` backup of a killed replace is removed only when it holds nothing but our earlier
    artifact and `target` holds our artifact again (so nothing of the user's can go)."""
    removed = []
    prefix = f".{target.name}.tmp-"
    old_prefix = f".{target.name}.old-"
    pid_re = re.compile(r"(\d+)-")
    entries = []
    for where in (target.parent, target):
        try:
            entries += list(os.scandir(where))
        except OSError:
            pass
    target_ours = target.is_dir() and _own_manifest(target) is not None
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        if e.name.startswith(prefix):
            m = pid_re.match(e.name[len(prefix):])
        elif e.name.startswith(old_prefix) and target_ours and Path(e.path).parent == target.parent:
            m = pid_re.match(e.name[len(old_prefix):])
            own = _own_manifest(Path(e.path))
            if own is None or not m or any(x not in own["files"] and x != MANIFEST for x in _entries(Path(e.path))):
                continue
        else:
            continue
        if m and _alive(int(m.group(1))):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    if removed:
        print(f"removed {len(removed)} stale temporary director{'y' if len(removed) == 1 else 'ies'} of an "
              f"interrupted earlier write to {target}", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_CATCH = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None), signal.SIGINT) if s)


@contextmanager
def raise_on_signals(state: dict | None = None):
    """While active: SIGTERM/SIGHUP/SIGINT raise `Interrupted`, so every `finally` and context manager
    cleanup runs (only where the signal has its default action, or an outer raise_on_signals' handler);
    while state["defer"] is true they are held in state["pending"] instead; state["seen"] records any. The previous handlers are
    restored on exit. The CLI wraps each command in one; atomic_directory adds its own to defer
    signals while the finished artifact is moved into place."""
    state = {} if state is None else state
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        state["seen"] = signum  # kept even if the exception is swallowed (raised inside a __del__)
        if state.get("defer"):
            state["pending"] = signum
            return
        raise Interrupted(signum)

    handler.specee_raises = True
    previous = {}
    for sig in _CATCH:
        cur = signal.getsignal(sig)
        if (cur is signal.SIG_DFL or getattr(cur, "specee_raises", False)
                or (sig == signal.SIGINT and cur is signal.default_int_handler)):
            previous[sig] = cur
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, cur in previous.items():
            signal.signal(sig, cur)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, force: bool = False, flag: str = "-o"):
    """Yield a temporary directory; once the block completes it lands at `target` as `plan_output`
    allows (checked on entry and again before landing). The temporary directory is removed on every
    exit path, signals included; on a failure the old contents of `target` are unchanged."""
    plan = plan_output(target, force=force, flag=flag)
    t = plan.target
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {t.parent}: {e.strerror}") from None
    remove_stale_temps(t)
    state: dict = {}
    tmp = None
    with raise_on_signals(state):
        try:
            # beside the target, so one rename lands it; inside it when merging (the parent may be read-only)
            where = t if plan.mode == "merge" else t.parent
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}.tmp-{os.getpid()}-", dir=where))
            except OSError as e:
                raise ArtifactError(f"cannot write {flag} {target}: {e.strerror} in {where}") from None
            tmp.chmod(0o755)
            yield tmp
            if state.get("seen"):  # interrupted, but the exception was swallowed on its way out
                raise Interrupted(state["seen"])
            again = plan_output(target, force=force, flag=flag)  # the directory may have changed meanwhile
            plan = again if where == t.parent or again.mode == "merge" else OutputPlan(t, "merge", again.ours)
            state["defer"] = True  # a signal now waits until the artifact has landed (or not)
            _commit(tmp, plan)
        finally:
            if tmp is not None and os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            state["defer"] = False
        if state.get("pending"):
            raise Interrupted(state["pending"])


def _commit(tmp: Path, plan: OutputPlan) -> None:
    t = plan.target
    if plan.mode == "new":
        try:
            os.rename(tmp, t)
        except OSError as e:
            raise ArtifactError(f"cannot move the finished artifact into {t}: {e.strerror}; nothing was written") from None
    elif plan.mode == "replace":
        backup = t.parent / f".{t.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(t, backup)
        except OSError as e:
            raise ArtifactError(f"cannot replace {t}: {e.strerror}; it is unchanged") from None
        try:
            os.rename(tmp, t)
        except OSError as e:
            try:
                os.rename(backup, t)
            except OSError:
                raise ArtifactError(f"cannot move the finished artifact into {t} ({e.strerror}), nor put the "
                                    f"previous one back; it is at {backup}") from None
            raise ArtifactError(f"cannot move the finished artifact into {t}: {e.strerror}; the previous contents "
                                "are unchanged") from None
        shutil.rmtree(backup, ignore_errors=True)
    else:
        _merge(tmp, plan)


def _merge(tmp: Path, plan: OutputPlan) -> None:
    """Move the new files into an existing directory: never over a file we did not write; our old
    manifest goes first and the new one last, so the directory is a valid artifact only when complete."""
    t = plan.target
    new = sorted(_entries(tmp))
    taken = [rel for rel in new if rel not in plan.ours and os.path.lexists(t / rel)]
    if taken:
        raise ArtifactError(f"the artifact would overwrite {', '.join(taken[:3])} in {t}, which specee-compile did "
                            "not write; nothing was written: move them away or pick another directory")
    try:
        if MANIFEST in plan.ours and os.path.lexists(t / MANIFEST):
            os.unlink(t / MANIFEST)
        for rel in new:
            if rel != MANIFEST:
                (t / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, t / rel)
        for rel in sorted(plan.ours - set(new) - {MANIFEST}):
            p = t / rel
            if os.path.lexists(p) and not p.is_dir():
                os.unlink(p)  # a file of our previous artifact that the new one does not have
        if MANIFEST in new:
            os.replace(tmp / MANIFEST, t / MANIFEST)
    except OSError as e:
        raise ArtifactError(f"writing the artifact into {t} failed ({e}); it is incomplete (no {MANIFEST}): "
                            "re-run the command") from None


# ---------------------------------------------------------------- manifest

def write_manifest(directory: Path, *, model: str, fingerprint: str, info: dict) -> dict:
    """Checksum every file in `directory` and write manifest.json (call last, inside the temp dir)."""
    files = {}
    for rel in sorted(_entries(directory)):
        p = directory / rel
        if rel != MANIFEST and stat.S_ISREG(os.lstat(p).st_mode):
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": TOOL,
        "model": model,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _rel_problem(rel) -> str | None:
    """Why `rel` is not an acceptable manifest path (relative, normalized, inside the directory)."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if "\\" in rel or "\x00" in rel:
        return "holds a backslash or NUL"
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "is an absolute path (entries must be relative to the artifact directory)"
    if ".." in rel.split("/"):
        return "leaves the artifact directory (..)"
    if posixpath.normpath(rel) != rel or rel == ".":
        return "is not a normalized relative path"
    if rel == MANIFEST:
        return "names the manifest itself"
    return None


def _load_manifest(mpath: Path) -> dict:
    with _open_regular(mpath) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath} is {size} bytes, too large for a manifest; re-create the artifacts")
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the file is corrupt, re-create the artifacts") from None


def _check_structure(manifest, mpath: Path) -> dict:
    expected = "an object with format_version, model, fingerprint and files"
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} holds a JSON {type(manifest).__name__}, expected {expected}; it is corrupt or "
                            "not a specee-compile manifest: re-create the artifacts")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath} has format_version {manifest.get('format_version')!r}, this specee-compile "
                            f"reads {FORMAT_VERSION}; re-create the artifacts with this version")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{mpath}: `files` is a JSON {type(files).__name__}, expected an object mapping each "
                            "relative path to {sha256, bytes}; re-create the artifacts")
    problems = []
    for rel, meta in files.items():
        why = _rel_problem(rel)
        if why:
            problems.append(f"entry {rel!r} {why}")
        elif not isinstance(meta, dict):
            problems.append(f"entry {rel!r} is a JSON {type(meta).__name__}, expected {{sha256, bytes}}")
        else:
            sha, n = meta.get("sha256"), meta.get("bytes")
            if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
                problems.append(f"entry {rel!r} has no valid sha256")
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
                problems.append(f"entry {rel!r} has no valid `bytes` (expected a size >= 0, got {n!r})")
    if not isinstance(manifest.get("fingerprint"), str):
        problems.append(f"`fingerprint` is {manifest.get('fingerprint')!r}, expected a string")
    vocab_file = manifest.get("vocab_ids_file")
    if vocab_file is not None and vocab_file not in files:
        problems.append(f"vocab_ids_file {vocab_file!r} is not listed in `files`")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ArtifactError(f"{mpath} is malformed: " + "; ".join(problems[:5]) + more + "; re-create the artifacts")
    return manifest


def _verify_files(d: Path, files: dict) -> list[str]:
    problems = []
    root = d.resolve()
    for rel, meta in files.items():
        p = d / rel
        if not os.path.lexists(p):
            problems.append(f"{rel} is missing")
            continue
        real = p.resolve()
        if real != root and root not in real.parents:
            problems.append(f"{rel} points outside the artifact directory (a link to {real})")
            continue
        try:
            st = os.stat(p)
        except OSError as e:
            problems.append(f"{rel} cannot be read ({e.strerror})")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel} is not a regular file")
        elif st.st_size != meta["bytes"]:
            problems.append(f"{rel} has {st.st_size} bytes, manifest says {meta['bytes']} (partial?)")
        else:
            try:
                ok = sha256_file(p) == meta["sha256"]
            except (ArtifactError, OSError) as e:
                problems.append(f"{rel} cannot be read ({e})")
                continue
            if not ok:
                problems.append(f"{rel} checksum differs from the manifest (corrupt or modified)")
    return problems


def _unlisted_loader_files(d: Path, files: dict) -> list[str]:
    top = [e.name for e in os.scandir(d)]
    top += [f"{x}/{r}" for x in _TOKENIZER_DIRS if (d / x).is_dir() for r in _entries(d / x, limit=1000)]
    return [f"{rel} is present but not listed in the manifest (a loader would read it unchecked): remove it"
            for rel in sorted(top) if rel != MANIFEST and rel not in files and loader_reads(rel)]


def verify_listed(directory: str | os.PathLike, rels) -> None:
    """Where `directory` holds a manifest (any artifact, a train-draft output included): each of `rels` that is
    there must be listed in it and match it (size, sha256); ArtifactError (one line) otherwise. For a loader that
    reads a few files of a directory without the whole `read_manifest` check; a directory with no manifest is left
    to the loader's own checks."""
    d = Path(directory)
    mpath = d / MANIFEST
    if not os.path.lexists(mpath):
        return
    files = _check_structure(_load_manifest(mpath), mpath)["files"]
    present = [r for r in rels if os.path.lexists(d / r)]
    problems = [f"{r} is present but not listed in the manifest (a loader would read it unchecked)"
                for r in present if r not in files]
    problems += _verify_files(d, {r: files[r] for r in present if r in files})
    if problems:
        raise ArtifactError(f"artifacts in {d} are damaged: " + "; ".join(problems) + "; re-create them")


def read_manifest(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    """Read and check an artifact directory's manifest. verify: every listed file is a regular file
    inside the directory with the listed size and sha256, every file a loader would read is listed,
    and (exported directories) the graphs agree with the manifest and the tokenizer."""
    d = Path(directory)
    if os.path.lexists(d) and not d.is_dir():
        raise ArtifactError(f"{d} is a file, not an artifact directory; pass the directory that `specee-compile "
                            "train MODEL -o DIR` or `specee-compile export MODEL -o DIR` wrote")
    if not d.is_dir():
        raise ArtifactError(f"artifact directory {d} does not exist; create it with `specee-compile train MODEL -o {d}`"
                            " or `specee-compile export MODEL -o DIR`")
    mpath = d / MANIFEST
    if not os.path.lexists(mpath):
        raise ArtifactError(f"{d} has no {MANIFEST}: not a specee-compile artifact directory, or a partial write; "
                            "re-run the command that produced it")
    manifest = _check_structure(_load_manifest(mpath), mpath)
    if verify:
        problems = _verify_files(d, manifest["files"]) + _unlisted_loader_files(d, manifest["files"])
        if problems:
            raise ArtifactError(f"artifacts in {d} are damaged: " + "; ".join(problems) + "; re-create them")
        if manifest.get("kind") == "export" or any(r.endswith(".onnx") for r in manifest["files"]):
            check_export(d, manifest)
    return manifest


# ---------------------------------------------------------------- exported graphs <-> manifest

def _onnx():
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable("reading an exported directory needs the onnx package; install it with "
                                 "`pip install 'specee-compile[onnx]'`") from None
    return onnx


def _graph_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for g in a.graphs:
                yield from _graph_tensors(g)


def graph_role(rel: str) -> str:
    """prefill.onnx -> prefill; decode_step.onnx and decode_step.plugin.onnx -> decode_step."""
    return rel.rsplit("/", 1)[-1].split(".", 1)[0]


def stamp_graphs(directory: Path, *, fingerprint: str) -> int:
    """Write the model fingerprint and the tokenizer digest into every graph's metadata_props (call
    inside the export's temp dir, after the tokenizer is saved and before the manifest); returns how
    many graphs were stamped. `check_export` compares them on load."""
    onnx = _onnx()
    d = Path(directory)
    rels = sorted(_entries(d))
    tok = tokenizer_digest({r: {"sha256": sha256_file(d / r)} for r in rels if is_tokenizer_file(r)})
    n = 0
    for rel in rels:
        if not rel.endswith(".onnx"):
            continue
        model = onnx.load(str(d / rel), load_external_data=False)
        keep = [(p.key, p.value) for p in model.metadata_props if p.key not in (GRAPH_FINGERPRINT_KEY,
                                                                                 GRAPH_TOKENIZER_KEY)]
        del model.metadata_props[:]
        for k, v in keep + [(GRAPH_FINGERPRINT_KEY, fingerprint), (GRAPH_TOKENIZER_KEY, tok)]:
            p = model.metadata_props.add()
            p.key, p.value = k, v
        (d / rel).write_bytes(model.SerializeToString())  # external data stays where it is, untouched
        n += 1
    return n


def check_export(d: Path, manifest: dict) -> None:
    """An exported directory's graphs must be the ones it lists, for the model and tokenizer it lists:
    each graph's role matches its file name, its stamped fingerprint equals the manifest's, its
    stamped tokenizer digest equals the listed tokenizer files', and its external data is listed."""
    onnx = _onnx()
    files = manifest["files"]
    missing = [g for g in ("prefill.onnx", "decode_step.onnx") if g not in files]
    if missing:
        raise ArtifactError(f"exported directory {d} does not list {', '.join(missing)} in its manifest; "
                            "re-export it (`specee-compile export MODEL -o DIR`)")
    tok = tokenizer_digest(files)
    problems = []
    for rel in sorted(r for r in files if r.endswith(".onnx")):
        try:
            model = onnx.load(str(d / rel), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
            problems.append(f"{rel} is not a readable ONNX graph ({type(e).__name__})")
            continue
        meta = {p.key: p.value for p in model.metadata_props}
        role = graph_role(rel)
        if meta.get("graph") != role:
            problems.append(f"{rel} holds the {meta.get('graph')!r} graph, expected {role!r} (graphs swapped?)")
        fp = meta.get(GRAPH_FINGERPRINT_KEY)
        if fp is None:
            problems.append(f"{rel} carries no model fingerprint (exported by an older specee-compile?)")
        elif fp != manifest["fingerprint"]:
            problems.append(f"{rel} was exported from the model with fingerprint {fp}, the manifest says "
                            f"{manifest['fingerprint']}")
        if meta.get(GRAPH_TOKENIZER_KEY, tok) != tok:
            problems.append(f"the tokenizer files are not the ones {rel} was exported with")
        base = posixpath.dirname(rel)
        for t in _graph_tensors(model.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = {e.key: e.value for e in t.external_data}.get("location", "")
                ref = posixpath.normpath(posixpath.join(base, loc))
                if _rel_problem(ref) or ref not in files:
                    problems.append(f"{rel} reads external data from {loc!r}, which the manifest does not list")
                    break
    if problems:
        raise ArtifactError(f"exported directory {d} does not hang together: " + "; ".join(problems)
                            + "; re-export it (`specee-compile export MODEL -o DIR`)")


# ---------------------------------------------------------------- result files (bench, eval)
def free_suffix(directory, names) -> str:
    """"" if none of `names` (files in `directory`) exists, else the first of "-2", "-3", ... for which none of
    them exists with it inserted before the extension: a second run writes its results beside the first's
    instead of overwriting them."""
    d = Path(directory)

    def taken(suffix: str) -> bool:
        return any(os.path.lexists(d / (Path(n).stem + suffix + Path(n).suffix)) for n in names)

    n, suffix = 1, ""
    while taken(suffix):
        n += 1
        suffix = f"-{n}"
    return suffix


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` (a dot file ending in the same extension, so writers that infer
    the format from it work); once the block completes it is renamed to `path`. Removed on every exit path."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=f".tmp{p.suffix}", dir=p.absolute().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_file_atomic(path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_tensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written through `atomic_file`: whole or absent, and readable as our other outputs are
    (safetensors' `save_file` alone leaves a file of mode 0600, so an exported directory copied to a deployment
    that runs as another user could not be read there)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def check_fingerprint(manifest: dict, fingerprint: str, directory) -> None:
    if manifest.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"artifacts in {directory} were made for model {manifest.get('model')!r} with fingerprint "
            f"{manifest.get('fingerprint')}, but the loaded model's fingerprint is {fingerprint}; use artifacts made "
            "for this model (`specee-compile train MODEL`), or load the model they were made for"
        )
