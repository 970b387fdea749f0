"""The library API the CLI (and users) call. Nothing here is CLI-specific.

    loaded = load_model("smollm2-135m")
    dec = build_decoder(loaded, Settings(specee=True, mode="lossless", kv_policy="backfill"))
    res = dec.generate(encode_prompt(loaded.tokenizer, "What is the capital of France?"))
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .artifacts import (
    MANIFEST,
    atomic_directory,
    check_fingerprint,
    probe_writable,
    read_manifest,
    shipped_dir,
    write_manifest,
)
from .backends import make_segments
from .config import Settings
from .errors import ArtifactError, InputError, SpecEEError
from .program import ExitPoint, Predictors, SpecEEProgram
from .runtime.decoder import Decoder


def encode_prompt(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of `prompt`, wrapped in the model's chat template when it has one."""
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty: pass some text to generate from")
    if chat_template and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(prompt)["input_ids"]]


def eos_ids(loaded) -> set[int]:
    ids = set()
    for src in (getattr(loaded.tokenizer, "eos_token_id", None),
                getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src)
    return ids


def default_artifacts_dir(loaded) -> Path | None:
    """Shipped artifacts for a zoo model (e.g. smollm2-135m), if the package carries them: found by the model's
    name, else by its fingerprint (the same weights loaded from a local copy, a cache path or the .gguf file,
    where the name is that path), as the shipped manifests name it."""
    from .models.zoo import ZOO

    for alias, entry in ZOO.items():
        if loaded.name in (alias, getattr(entry, "hub_id", None)):
            return shipped_dir(alias)
    for alias in ZOO:
        d = shipped_dir(alias)
        if d is None:
            continue
        try:
            fingerprint = json.loads((d / MANIFEST).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if fingerprint and fingerprint == getattr(loaded, "fingerprint", None):
            return d
    return None


# ---------------------------------------------------------------- artifacts <-> program

def load_program(directory, loaded, settings: Settings):
    """Read an artifact directory into (SpecEEProgram, candidate source, scheduler, manifest)."""
    from .draft import make_candidate_source
    from .predictors.mlp import PredictorBank

    d = Path(directory)
    manifest = read_manifest(d)
    check_fingerprint(manifest, loaded.fingerprint, d)
    if manifest.get("kind") == "draft":
        raise ArtifactError(f"{d} holds a draft head only (train-draft's output), no exit predictors: build "
                            f"artifacts with it by `specee-compile train MODEL -o DIR --draft-dir {d}`")
    try:
        bank = PredictorBank.load(d / "predictors.safetensors", d / "predictors_config.json")
    except (OSError, ValueError, RuntimeError) as e:  # safetensors header errors etc.
        raise ArtifactError(f"cannot read predictors in {d}: {e}; re-create the artifacts") from None
    L = loaded.model.config.num_hidden_layers
    if bank.num_layers != L:
        raise ArtifactError(f"predictors in {d} are for {bank.num_layers} layers, the model has {L}")
    program = program_from_bank(bank, manifest, L)
    kind = settings.draft_source or manifest.get("draft", {}).get("source", "eagle")
    # (read_manifest above verified the draft's files: the loader need not hash them again)
    draft_args = {"draft_path": d, "manifest_checked": True} if (d / "draft.safetensors").exists() else {}
    if manifest.get("vocab_ids_file") and (d / manifest["vocab_ids_file"]).exists():
        from safetensors.torch import load_file

        draft_args["vocab_ids"] = load_file(str(d / manifest["vocab_ids_file"]))["vocab_ids"]
    draft = make_candidate_source(kind, loaded.model, draft_args, k=bank.k)
    return program, draft, program_scheduler(program, settings), manifest


def program_scheduler(program: SpecEEProgram, settings: Settings):
    """The two-level schedule of a program: its offline layer set + the online window of settings."""
    from .predictors.schedule import OnlineScheduler

    return OnlineScheduler(program.offline_layers, settings.online_window, settings.online_offsets,
                           valid_layers=program.predictors.layers)


def program_from_bank(bank, manifest: dict, num_layers: int) -> SpecEEProgram:
    import torch

    th = bank.thresholds.tolist()
    pad = num_layers - bank.W1.shape[0]  # the bank has no slot for the last layer; the program has one per layer

    def rows(t):
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad > 0 else t

    points = [ExitPoint(layer, float(th[layer])) for layer in bank.layers if th[layer] < 1.0]
    sim = (getattr(bank, "meta", None) or {}).get("validation_simulation", {})
    run = sim.get("scheduled_per_layer_thresholds") or sim.get("per_layer_thresholds") or {}
    rates, share = {}, {}
    if run.get("positions") and run.get("exit_counts"):
        n = float(run["positions"])
        rates = {layer: c / n for layer, c in enumerate(run["exit_counts"]) if c}
        if run.get("predictor_calls") is not None and points:
            share = {ep.layer: min(1.0, float(run["predictor_calls"]) / len(points)) for ep in points}
    return SpecEEProgram(
        num_layers=num_layers,
        # a threshold of 1.0 marks a layer whose predictor never reached the target precision
        exit_points=points,
        exit_rates=rates,
        eval_share=share,
        exit_precision=float(run["exit_precision"]) if run.get("exit_precision") is not None else None,
        predictors=Predictors(rows(bank.W1), rows(bank.b1), rows(bank.W2), rows(bank.b2[:, None]), list(bank.layers)),
        offline_layers=list(manifest.get("schedule", {}).get("offline_layers", bank.layers)),
        num_candidates=bank.k,
        draft_kind=manifest.get("draft", {}).get("source", "eagle"),
        fingerprint=manifest.get("fingerprint", ""),
        meta=manifest,
    )


def save_program_artifacts(out_dir, loaded, bank, *, source: str, draft=None, offline_layers, extra_info=None,
                           extra_files: dict | None = None, force: bool = False) -> dict:
    """Write predictors (+ draft) + manifest atomically to out_dir; returns the manifest. out_dir is
    refused if it holds files we did not write, unless force (see `artifacts.plan_output`)."""
    with atomic_directory(out_dir, force=force) as tmp:
        bank.save(tmp / "predictors.safetensors", tmp / "predictors_config.json")
        draft_info = {"source": source, "kind": "none"}
        if draft is not None:
            draft_info.update(kind="eagle", config=draft.save(tmp))
        for name, src in (extra_files or {}).items():
            Path(tmp / name).write_bytes(Path(src).read_bytes())
        info = {
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "num_layers": loaded.model.config.num_hidden_layers,
            "exit_layers": list(bank.layers),
            "thresholds": {str(layer): float(bank.thresholds[layer]) for layer in bank.layers},
            "schedule": {"offline_layers": list(offline_layers)},
            "draft": draft_info,
            **(extra_info or {}),
        }
        return write_manifest(tmp, model=loaded.name, fingerprint=loaded.fingerprint, info=info)


# ---------------------------------------------------------------- decoders

def build_decoder(loaded, settings: Settings, artifacts_dir=None, segments=None, *, program=None, draft=None,
                  scheduler=None, policy=None, accept=None) -> Decoder:
    """A Decoder for `loaded` on settings.backend; with settings.specee, loads the artifacts
    (`artifacts_dir`, else settings.artifacts, else the shipped ones). Pass `segments` of an earlier
    decoder (same model, backend and artifacts) to share its compiled segments and cache.
    `program` + `draft` given in memory replace the artifacts (the benchmark's random 7B-shaped
    predictors; the scheduler defaults to the program's two-level schedule); `policy` replaces the exit policy of settings.mode (the benchmark's
    `runtime.policies.trace_exits`); `accept` the tree's acceptance policy (the benchmark's
    `runtime.policies.trace_accepts`)."""
    if settings.specee and program is None:
        directory = artifacts_dir or settings.artifacts or default_artifacts_dir(loaded)
        if directory is None:
            raise ArtifactError(
                f"no SpecEE artifacts for {loaded.name}: train them with `specee-compile train {loaded.name} -o DIR` "
                "and pass --artifacts DIR"
            )
        program, draft, scheduler, _ = load_program(directory, loaded, settings)
    if program is not None and scheduler is None:  # an in-memory program: its two-level schedule
        scheduler = program_scheduler(program, settings)
    if settings.speculate == "tree":
        draft = tree_draft(loaded, settings, artifacts_dir, draft)
    if segments is None:
        segments = make_segments(loaded.model, settings, program)
    elif program is not None and segments.predictors is None:
        segments.predictors = program.predictors.to(segments.device)
    eagle, dev = _eagle_head(draft), getattr(segments, "device", None)
    if eagle is not None and dev is not None and eagle.fc.weight.device.type != dev.type:
        getattr(draft, "inner", draft).to(dev)  # a model loaded on the host: the segments moved it, the draft follows
    prepare_draft(draft, settings)
    if eagle is not None and getattr(segments, "gemm", "default") in ("onednn", "mkl"):
        eagle.use_cpu_gemm(segments.gemm)  # the draft's host path in the target's CPU matmul library
    draft = _device_draft(draft, segments, settings)
    return Decoder(segments, settings, eos_ids=eos_ids(loaded), program=program, draft=draft, scheduler=scheduler,
                   policy=policy, accept=accept)


def _eagle_head(draft):
    """The EagleDraft behind a candidate source, or None (NgramAssist wraps the source it assists)."""
    from .draft.eagle import EagleDraft

    eagle = getattr(getattr(draft, "inner", draft), "draft", None)
    return eagle if isinstance(eagle, EagleDraft) else None


def prepare_draft(draft, settings: Settings) -> None:
    """settings.draft_dtype (`EagleDraft.cast`), then settings.draft_quant (`EagleDraft.quantize`), on the EAGLE
    draft head behind `draft`; the host source then re-allocates its buffers in the draft's dtype (the device
    sources are built after this). A draft given in memory that is already quantized must be asked for as such."""
    eagle = _eagle_head(draft)
    if eagle is None:
        for flag, v, off in (("--draft-quant", settings.draft_quant, ("auto", "none")),
                             ("--draft-dtype", settings.draft_dtype, ("auto",))):
            if v not in off:
                raise SpecEEError(f"{flag} {v} changes an EAGLE draft head; this decoder's candidates come from "
                                   f"{type(draft).__name__}: drop {flag}")
        return
    if eagle.quant != "none" and settings.draft_quant == "none":
        raise SpecEEError(f"this draft is already {eagle.quant}: pass draft_quant={eagle.quant!r}, or a draft loaded "
                           "afresh")
    if settings.draft_dtype != "auto":
        import torch

        eagle.cast(getattr(torch, settings.draft_dtype))
    if eagle.quant == "none":  # (auto keeps a draft given in memory already quantized)
        eagle.quantize(settings.draft_quant_for(eagle.fc.weight.device.type, eagle.dtype))
    src = getattr(draft, "inner", draft)  # NgramAssist wraps the source it assists
    if src._dt != eagle.dtype:
        src.retype()


def _device_draft(draft, segments, settings: Settings):
    """On a backend with a captured whole step (CUDA), the EAGLE draft runs inside that step; a tree
    draft that the fixed tree program may run (runtime/tree.py) keeps its buffers on the device (not with
    lookup first, which the host step runs)."""
    from .draft.eagle import DeviceEagleSource, EagleSource
    from .draft.tree import DeviceEagleTreeSource, EagleTreeSource

    if type(draft) is EagleTreeSource and settings.temperature <= 0 and not draft.lookup_first and (
            settings.tree_program == "fixed" or (settings.tree_program == "auto" and segments.device.type == "cuda")):
        dev = DeviceEagleTreeSource(draft.draft, k=draft.k, context_vocab=draft.context_vocab,
                                    max_len=segments.max_len, compile=segments.device.type == "cuda")
        dev.lookup = draft.lookup
        return dev

    if type(draft) is EagleSource and hasattr(segments, "can_run") and segments.device.type == "cuda":
        return DeviceEagleSource.from_source(draft, segments.max_len, compile=True)
    return draft


def tree_draft(loaded, settings: Settings, artifacts_dir=None, source=None):
    """The draft-tree source for --speculate tree (`draft/tree.py`): the EAGLE head of the SpecEE
    candidate source `source` when it has one, else the draft of the artifacts (`artifacts_dir`,
    settings.artifacts, or the shipped ones)."""
    from .draft.eagle import EagleDraft, EagleSource
    from .draft.tree import EagleTreeSource

    inner = getattr(source, "inner", source)  # NgramAssist wraps the source it assists
    if isinstance(inner, EagleSource):
        src = EagleTreeSource(inner.draft, k=inner.k, context_vocab=inner.context_vocab)
    else:
        directory = artifacts_dir or settings.artifacts or default_artifacts_dir(loaded)
        if directory is None or not (Path(directory) / "draft.safetensors").is_file():
            where = f"in {directory}" if directory is not None else f"for {loaded.name}"
            raise ArtifactError(
                f"--speculate tree needs an EAGLE draft head, and there is none {where}: train one with "
                f"`specee-compile train-draft {loaded.name} -o DIR` and pass --artifacts DIR"
            )
        src = EagleTreeSource(EagleDraft.load(directory, loaded.model), k=settings.num_candidates)
    src.lookup = settings.tree_lookup_on()
    src.lookup_first = settings.tree_lookup_first_n()
    return src


def check_output_file(path, flag: str = "--stats-json") -> Path:
    """Fail now, before any work, if a result file cannot be written at `path`: it must not be a
    directory or a special file, its directory must exist, and both must be writable."""
    import os
    import stat

    p = Path(path)
    if p.is_dir():
        raise SpecEEError(f"{flag} {path} is a directory; pass a file path such as {p / 'stats.json'}")
    if os.path.lexists(p):
        try:
            st = os.stat(p)
        except OSError as e:
            raise SpecEEError(f"{flag} {path} cannot be used: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise SpecEEError(f"{flag} {path} exists and is not a regular file; pass a file path")
        if not os.access(p, os.W_OK):
            raise SpecEEError(f"{flag} {path} is not writable (permission denied)")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise SpecEEError(f"{flag} {path}: the directory {parent} does not exist; create it first")
    why = probe_writable(parent)
    if why:
        raise SpecEEError(f"{flag} {path}: the directory {parent} is not writable ({why})")
    return p


def check_output_directory(path, flag: str) -> Path:
    """Fail now, before any work, if files cannot be written into directory `path` (created later
    if missing): it must not be a file, and it (or its nearest existing parent) must be writable."""
    import os

    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        raise SpecEEError(f"{flag} {path} is a file, not a directory; pass a directory path")
    probe = p.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SpecEEError(f"{flag} {path} cannot be created: {probe} is a file, not a directory")
    why = probe_writable(probe)
    if why:
        raise SpecEEError(f"{flag} {path} cannot be written: {probe} is not writable ({why})")
    return p


def stats_json(result, path, extra: dict | None = None) -> None:
    """Write result.stats() (+ extra) to `path` atomically (`artifacts.write_file_atomic`: a temporary file
    beside it, renamed over it, removed if anything fails)."""
    from .artifacts import write_file_atomic

    data = result.stats()
    data.update(extra or {})
    p = check_output_file(path)
    try:
        write_file_atomic(p, json.dumps(data, indent=1) + "\n")
    except OSError as e:
        raise SpecEEError(f"cannot write --stats-json {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------- exported directories

def artifact_backend(name: str) -> str | None:
    """The registry's summary of backend `name` when it runs exported directories, else None."""
    from .backends.registry import get_backend

    entry = get_backend(name)
    return entry.summary if entry.kind == "artifact" else None


def open_exported(directory, settings: Settings, **kw):
    """An exported directory opened by its artifact backend (settings.backend when it is one, else
    onnx): an `ArtifactRun` (backend + tokenizer, program, draft, scheduler, EOS ids); `.decoder()`
    is the runtime's Decoder over it."""
    from .backends.registry import get_backend

    entry = get_backend(settings.backend)
    if entry.kind != "artifact":
        entry = get_backend("onnx")
    return entry.load()(directory, settings, **kw)


def generate_from_artifact(directory, prompt: str, settings: Settings, on_text=None):
    """`specee-compile generate DIR PROMPT --backend onnx`: the runtime loop over an exported directory
    (manifest, ONNX graphs, predictors, tokenizer). `on_text` streams text as tokens become final.
    Returns (GenerationResult, generated text)."""
    t0 = time.perf_counter()
    run = open_exported(directory, settings)  # the manifest's checks; ONNX Runtime's sessions
    tokenizer = run.tokenizer
    load_s = time.perf_counter() - t0
    ids = encode_prompt(tokenizer, prompt, settings.chat_template)
    if not hasattr(run, "decoder"):  # a deployment runner with its own loop (the C++ runner, cpp/)
        res = run.generate(ids)
        res.load_s += load_s  # (the runner's own: its packages and weights)
        text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
        if on_text is not None:
            on_text(text + "\n")
        return res, text
    dec = run.decoder()
    out: list[int] = []
    printed = [0]

    def stream(token: int) -> None:
        out.append(token)
        if on_text is None:
            return
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for multi-byte pieces to complete
            on_text(text[printed[0] :])
            printed[0] = len(text)

    res = dec.generate(ids, on_token=stream)
    res.load_s = load_s
    text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
    if on_text is not None and len(text) > printed[0]:
        on_text(text[printed[0] :] + "\n")
    return res, text


# ---------------------------------------------------------------- the commands behind the CLI
# (cli.py imports only this module; each is imported on first use so `specee-compile --help` stays fast)

def model_zoo() -> dict:
    from .models.zoo import ZOO

    return ZOO


def load_model(name_or_path: str, dtype="float32", device="cpu"):
    """models.load_model; dtype a torch dtype or its name (float32 | float16 | bfloat16)."""
    from .config import torch_dtype
    from .models import load_model as _load

    return _load(name_or_path, dtype=torch_dtype(dtype) if isinstance(dtype, str) else dtype, device=device)


def dump_graphs(model, settings: Settings, dump_dir):
    """Capture + passes with the graph written before/after each pass into dump_dir."""
    from .capture import capture_and_segment

    return capture_and_segment(model, settings, dump_dir=dump_dir)


def export_command(*args, **kwargs):
    from .export import export_command as run

    return run(*args, **kwargs)


def train_command(*args, **kwargs):
    from .training import train_command as run

    return run(*args, **kwargs)


def train_draft_command(*args, **kwargs):
    from .draft.train import train_draft_command as run

    return run(*args, **kwargs)


def tune_tree_command(*args, **kwargs):
    """`tune-tree`: the draft tree's shapes timed with a head on this device; the fastest written with it."""
    from .draft.tree_tune import tune_tree_command as run

    return run(*args, **kwargs)


def eval_command(args):
    from .eval.accuracy import eval_command as run

    return run(args)


def bench_main(argv):
    from .eval.gpu_bench import main as run

    return run(argv)


def export_aoti_command(*args, **kwargs):
    """`export --format aoti`: AOTInductor packages + weights for the C++ runner (cpp/)."""
    from .backends.aoti_export import export_aoti_command as run

    return run(*args, **kwargs)


def raise_on_signals(state: dict):
    """SIGTERM / SIGHUP unwind like Ctrl-C while a command runs, so temp files are removed."""
    from .artifacts import raise_on_signals as run

    return run(state)


__all__ = [
    "MANIFEST",
    "bench_main",
    "build_decoder",
    "check_output_directory",
    "check_output_file",
    "dump_graphs",
    "encode_prompt",
    "eos_ids",
    "eval_command",
    "export_command",
    "generate_from_artifact",
    "load_model",
    "load_program",
    "model_zoo",
    "open_exported",
    "save_program_artifacts",
    "stats_json",
    "train_command",
    "train_draft_command",
    "tree_draft",
]
