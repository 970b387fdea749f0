"""`specee-compile bench`: the product's decode speed on the GPU, timed through the public API.

Everything timed here is `Decoder.generate()` built by `api.build_decoder` (the one decode loop, the
inductor backend: whole-step CUDA graphs, exits decided on the device). This module only orchestrates,
checks and prints; it has no decode loop of its own.

Workloads (batch 1, greedy, compile/capture reported apart). 7B shapes: one warm-up call per variant, then
--runs rounds in which every variant decodes once (order rotated); tok/s = median over rounds, a ratio = the
median of the per-round ratios to dense (`paired_ratio`), so a drift of the card over the run cancels:
  7B shapes   a random-weight fp16 `LlamaForCausalLM` with Llama-2-7B shapes, written with
              `save_pretrained` and loaded back through `models.load_model` (what a user's directory
              goes through). Random weights cannot exit on their own, so exits come from an exit-layer
              trace replayed by `runtime.policies.trace_exits` (the token exits at the first scheduled
              exit layer >= its trace layer); the predictors (random MLPs) still run at every active
              layer and the EAGLE-style draft (random, 8192-row head) runs every step, so their cost is
              counted. This measures the system, not the predictors.
                dense       `product_dense_tok_s`
                specee232   the paper's 23.2-of-32 trace: `product_specee232_ratio` = vs dense
                specee_noexit  the same decoder on a trace that never exits (the draft's and plan's cost)
                tree35, tree_smollm2trace  tree verification, the accepted length from a trace
                specee232_q8, tree35_q8  the same with the draft's weights in int8 (--draft-quant int8;
                            a copy of the same draft): `product_*_q8_ratio`
                tree35_specee232  tree35 with SpecEE on the tree (the fixed program's exits, approximate):
                            each verify step leaves at the deepest trace layer of the tokens it emits (the
                            merged mapping); `tree35_specee232_vs_tree35`; tree35_specee232_q8 with the int8 draft
                NAME_pdl    (--pdl-ab 0|ops|all) dense, specee232, tree35 and tree35_specee232 again under
                            SPECEE_PDL=MODE, on segments of their own: `pdl_gain_NAME`, `product_NAME_ratio_pdl`
  SmolLM2     (--smollm2 PATH.gguf --prompts P.json) real weights, shipped artifacts, MT-Bench turns:
              dense, paper (approximate + skip), lossless (backfill), ratios per prompt back to back; with
              the tree: tree, tree_guarded, tree_specee (lossless on the tree, vs tree), tree_paper
              (approximate on the tree: the fixed program's exits on CUDA; agreement with dense reported)
              and tree_draft16 (the tree with its draft computing in fp16: --draft-dtype float16); with
              --pdl-ab, dense_pdl (`smollm2_dense_pdl_ratio` is PDL's gain, its identity PDL's token check)
              and tree_pdl (`smollm2_tree_pdl_vs_dense_pdl`).
  HF eager    `generate` of the same 7B model, dynamic cache.
  yardstick   (--yardstick PATH) the plain compiled decoder, in its own process, first.

Writes benchmarks/results/<date>-<card>.json (or --out DIR; `-2`, `-3`, ... where that record exists: nothing is
overwritten) with "path": "runtime", its plot beside it, and prints a table. The record is written after the yardstick
and after each stage; `phases` says when each part ended (seconds from the start). Cut short by SIGTERM (a `timeout`),
SIGHUP or Ctrl-C, it is written once more with `interrupted` (the signal, the stage) and the stage's rounds so far
(`progress_7b`: each decoder's compile_s and tok/s per round; `progress_smollm2`: tok/s per prompt), then the run
exits with 128 + the signal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ..artifacts import free_suffix, write_file_atomic
from ..plugins.pdl import MODES as PDL_MODES

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-5)

# the yardstick's exit trace (plain_decode_yardstick.py): executed-layer counts 1..32 (32 = no exit)
YARD_CHOICES = [18, 20, 22, 23, 24, 25, 26, 28, 32]
YARD_PROBS = [0.08, 0.12, 0.16, 0.16, 0.14, 0.12, 0.08, 0.06, 0.08]
DRAFT_ROWS = 8192  # the 7B draft head's vocabulary (as the shipped SmolLM2 draft)


def phase(res: dict, label: str) -> None:
    """res["phases"]: the seconds since the run began at each named point, so a record shows where a call's time
    went, also when it was cut short (the GPU's calls have a hard limit)."""
    res.setdefault("phases", []).append([label, round(time.time() - res["started"], 1)])


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- traces
def stratified_trace(hist: dict[int, float], n: int, seed: int = 3) -> list[int]:
    """n exit counts whose empirical distribution follows `hist` as closely as n allows (inverse-CDF
    at stratified quantiles), in a seeded random order."""
    keys = sorted(hist)
    w = torch.tensor([float(hist[k]) for k in keys], dtype=torch.float64)
    cdf = torch.cumsum(w / w.sum(), 0)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    idx = torch.searchsorted(cdf, u).clamp(max=len(keys) - 1)
    vals = [keys[i] for i in idx.tolist()]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [vals[i] for i in perm]


def paper_trace(n: int, mean: float = 23.2) -> list[int]:
    """The yardstick's distribution mixed with exits after 16 layers so its mean is `mean` (paper: 23.2)."""
    base = sum(c * p for c, p in zip(YARD_CHOICES, YARD_PROBS))
    w16 = (base - mean) / (base - 16.0)
    hist = {c: p * (1 - w16) for c, p in zip(YARD_CHOICES, YARD_PROBS)}
    hist[16] = w16
    return stratified_trace(hist, n)


def gpu_state() -> dict | None:
    """SM / memory clock (MHz), power (W), temperature (C) right now, via NVML (read-only)."""
    global _NVML
    try:
        import pynvml

        if _NVML is None:
            pynvml.nvmlInit()
            _NVML = pynvml.nvmlDeviceGetHandleByIndex(0)
        h = _NVML
        return {"sm": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "W": round(pynvml.nvmlDeviceGetPowerUsage(h) / 1000, 1),
                "C": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}
    except Exception:  # noqa: BLE001
        return None


def summarize(vals: list[float]) -> dict:
    return {"median": round(statistics.median(vals), 2), "min": round(min(vals), 2), "max": round(max(vals), 2),
            "runs": [round(v, 2) for v in vals]}


def copy_bandwidth(dev) -> float:
    if dev.type != "cuda":
        return float("nan")
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return bw



def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_yardstick(path: str, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "OUT": d, "PYTHONUNBUFFERED": "1"}
        t = time.time()
        r = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout,
                           check=False)
        log(r.stdout[-2000:])
        if r.returncode != 0:
            return {"error": r.stderr[-2000:], "wall_s": round(time.time() - t, 1)}
        with open(os.path.join(d, "segment_overhead.json")) as f:
            res = json.load(f)
        res["wall_s"] = round(time.time() - t, 1)
        return res



def _git_head() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None



# ----------------------------------------------------------------------------------------- model dirs
def write_random_model(shape: dict, dtype, device, out_dir: str, seed: int = 0) -> str:
    """A random-weight LlamaForCausalLM + a word-level tokenizer, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(**shape, initializer_range=0.02, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0").save_pretrained(out_dir)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def random_artifacts(loaded, trace: list[int], seed: int = 0, k: int = 4, hm: int = 512):
    """In-memory SpecEE artifacts for a random model: random predictor MLPs at every layer, the offline
    set = the 8 most frequent trace exit layers, a random EAGLE-style draft over DRAFT_ROWS tokens."""
    from collections import Counter

    from ..draft.eagle import EagleDraft, EagleSource
    from ..program import ExitPoint, Predictors, SpecEEProgram

    model = loaded.model
    L = model.config.num_hidden_layers
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = Predictors(w1=(torch.randn(L, hm, 3 * k, generator=g) * 0.1).to(dev),
                   b1=(torch.randn(L, hm, generator=g) * 0.1).to(dev),
                   w2=(torch.randn(L, hm, generator=g) * 0.1).to(dev),
                   b2=torch.randn(L, 1, generator=g).to(dev), layers=list(range(L - 1)))
    counts = Counter(e - 1 for e in trace if e < L)
    offline = sorted(layer for layer, _ in counts.most_common(8))
    program = SpecEEProgram(num_layers=L, exit_points=[ExitPoint(i, 0.5) for i in range(L - 1)], predictors=P,
                            offline_layers=offline, num_candidates=k, draft_kind="eagle")
    torch.manual_seed(seed)
    draft = EagleDraft(model, vocab_ids=torch.arange(min(DRAFT_ROWS, model.config.vocab_size)))
    for p in draft.parameters():  # std 0.02 like the base model (nn.Linear's default init is far larger)
        torch.nn.init.normal_(p, std=0.02)
    draft.to(device=dev, dtype=dt).requires_grad_(False)
    return program, EagleSource(draft, k=k), offline


def int8_copy(src, model):
    """A copy of the bench's draft source (its sharpened head rows included) for the `_q8` rows: `build_decoder`
    quantizes it (Settings.draft_quant), the original stays as it is for the other rows."""
    from ..draft.eagle import EagleDraft, EagleSource

    d = src.draft
    q = EagleDraft.from_state_dict(model, d.state_dict(), source="the bench's draft").requires_grad_(False)
    q.head_rows = d.head_rows.clone()
    return EagleSource(q, k=src.k, context_vocab=src.context_vocab)


def draft_pass_bytes(eagle) -> int:
    """Bytes of weights one draft pass streams: its layers, fc and static head rows (int8 pairs where quantized)."""
    layers, fc, head = eagle.matmul_weights(int8=True)
    ts = [fc, head] + [t for lw in layers for t in lw.as_tuple() if t is not None]
    flat = [x for t in ts for x in (t if isinstance(t, tuple) else (t,))]
    return sum(x.numel() * x.element_size() for x in flat)


# ----------------------------------------------------------------------------------------- timing
class UnderPdl:
    """A decoder whose every build step and call run with SPECEE_PDL = mode (`pdl.setting`: its kernels are
    compiled and captured under it); the rest of the bench sees the decoder (attributes pass through)."""

    def __init__(self, mode: str, build):
        from ..plugins import pdl

        self.env = lambda: pdl.setting(mode)
        with self.env():
            self.dec = build()

    def generate(self, *a, **kw):
        with self.env():
            return self.dec.generate(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.dec, name)


def time_interleaved(decs: dict, prompt: list[int], runs: int, optional=(), progress: dict | None = None) -> dict:
    """name -> (figures, last result) of each decoder: its warm-up call (compile + capture, reported as
    `compile_s` and the first call's speed), then `runs` rounds in which every decoder decodes once, the order
    rotated per round. A variant and dense then run seconds apart, not minutes: a drift of the card's speed over
    the run (session 15 saw dense's timed call 5% under its own first call) moves both sides of a ratio, and
    `paired_ratio` (the median over rounds of variant / first decoder in the same round) cancels it. A decoder
    named in `optional` whose first call fails is left out of the rounds: ({"error": why}, None), the others
    still timed (a row not yet run on a GPU must not cost the call its other rows). `progress`, where given,
    holds what is measured so far (each warm-up's compile_s, each round's tok/s), for a run cut short."""
    names, first, failed = list(decs), {}, {}
    progress = {} if progress is None else progress
    for n in names:
        try:
            first[n] = decs[n].generate(prompt)
            progress[n] = {"compile_s": round(first[n].compile_s, 1), "tok_s": []}
        except Exception as e:  # noqa: BLE001 - recorded; only optional rows get here
            if n not in optional:
                raise
            failed[n] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}",
                         "where": failure_frames(e)}
            log(f"{n}: its first call failed, left out of the rounds: {failed[n]['error']} "
                f"(at {' <- '.join(reversed(failed[n]['where'][-3:]))})")
    names = [n for n in names if n not in failed]
    last, vals = dict(first), {n: [] for n in names}
    for r in range(runs):
        for n in names[r % len(names):] + names[: r % len(names)]:
            last[n] = decs[n].generate(prompt)
            vals[n].append(last[n].decode_tok_s)
            progress[n]["tok_s"].append(round(last[n].decode_tok_s, 1))
        log(f"round {r + 1}/{runs}: " + ", ".join(f"{n} {vals[n][-1]:.1f}" for n in names) + " tok/s")
    out, ref = {}, names[0]
    for n in names:
        f, res, fig = first[n], last[n], summarize(vals[n])
        fig.update(compile_s=round(f.compile_s, 1), compile_cache=f.compile_cache, first_prefill_s=round(f.prefill_s, 2),
                   first_call_decode_tok_s=round(f.decode_tok_s, 1),
                   first_call_vs_steady=round(f.decode_tok_s / fig["median"], 3) if fig["median"] else None,
                   prefill_s=round(res.prefill_s, 4), avg_layers=round(res.avg_layers, 2),
                   predictor_calls_per_step=round(res.predictor_calls / max(1, res.decode_steps), 2),
                   head_calls_per_step=round(res.head_calls / max(1, res.decode_steps), 2),
                   tokens=len(res.token_ids), exit_program=res.exit_program,
                   draft_step=getattr(decs[n].draft, "step_mode", None), draft_quant=res.draft_quant)
        if n != ref:
            fig["paired_ratio"] = round(statistics.median(a / b for a, b in zip(vals[n], vals[ref])), 3)
        out[n] = (fig, res)
    out.update({n: (why, None) for n, why in failed.items()})
    return out


def failure_frames(e: BaseException, n: int = 8) -> list[str]:
    """The innermost n frames of an exception's traceback as "file:line function" (the package's and Triton's
    paths shortened): which kernel launch or capture failed, not only the message (session 25's OutOfResources
    named no kernel)."""
    import traceback

    out = []
    for fr in traceback.extract_tb(e.__traceback__)[-n:]:
        path = fr.filename
        for mark in ("specee_compile/", "triton/", "torch/"):
            if mark in path:
                path = mark + path.split(mark, 1)[1]
                break
        out.append(f"{path}:{fr.lineno} {fr.name}")
    out += [f"kernel: {k}" for k in failure_kernels(e)]
    return out


def failure_kernels(e: BaseException) -> list[str]:
    """The Triton kernels on an exception's stack, innermost last: a compiled kernel's name (Triton's
    OutOfResources is raised in `CompiledKernel._init_handles`, its message without the name), a JIT function's or an
    Inductor kernel's (its `CachingAutotuner`)."""
    names: list[str] = []
    tb = e.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        name = None
        if obj is not None:
            meta = getattr(obj, "inductor_meta", None)
            if isinstance(meta, dict) and meta.get("kernel_name"):
                name = meta["kernel_name"]
            elif hasattr(obj, "metadata") and isinstance(getattr(obj, "name", None), str):
                name = obj.name
            elif callable(getattr(obj, "fn", None)) and hasattr(obj, "run"):
                name = getattr(obj.fn, "__name__", None)
        if name and name not in names:
            names.append(name)
        tb = tb.tb_next
    return names


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two outputs hold the same token (after a divergence they mostly differ)."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n if n else 1.0


# ----------------------------------------------------------------------------------------- stages
def bench_7b(args, res: dict, dev, shape: dict) -> None:
    from ..api import build_decoder
    from ..config import Settings
    from ..models import load_model
    from ..runtime.policies import trace_accepts, trace_exits
    from .accuracy import first_divergence

    R_ = res["results"]
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    P, N = args.prompt_len, args.new_tokens
    L = shape["num_hidden_layers"]
    with tempfile.TemporaryDirectory(prefix="specee-bench-") as d:
        log("== write the random model directory")
        t = time.time()
        write_random_model(shape, dt, dev, d)
        res["write_s"] = round(time.time() - t, 1)
        phase(res, "7b: random model written")
        t = time.time()
        loaded = load_model(d, dtype=dt, device=str(dev))
        R_["load_s"] = round(time.time() - t, 1)
    V = shape["vocab_size"]
    prompt = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(0)).tolist()
    max_ctx = ((P + N + 64 + 63) // 64) * 64  # + 64: the tree stage's slots past the last token
    base = dict(device=str(dev), dtype=str(dt).replace("torch.", ""), backend="inductor", max_context=max_ctx,
                max_new_tokens=N)

    if not args.skip_hf:
        log("== hf eager")
        ids = torch.tensor([prompt], device=dev)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        loaded.model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        vals = []
        for _ in range(args.hf_runs):
            sync(dev)
            t = time.perf_counter()
            out = loaded.model.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw)
            sync(dev)
            vals.append(N / (time.perf_counter() - t))
        R_["hf_eager"] = summarize(vals)
        R_["hf_eager_tok_s"] = R_["hf_eager"]["median"]
        res["hf_tokens"] = out[0, P:].tolist()
        log("hf_eager", R_["hf_eager"])

    trace = [min(L, max(1, round(e * L / 32))) for e in paper_trace(4096, args.trace_mean)]
    spec = Settings(**base, specee=True, draft_quant="none")  # the draft as built; the _q8 rows round it to int8
    program, draft, offline = random_artifacts(loaded, trace)
    res["offline_layers"] = offline
    log("== build the decoders: dense; SpecEE on the paper trace (draft + predictors running); the same with a "
        "trace that never exits (what the draft and plan cost); tree verification driven by acceptance traces")
    dense = build_decoder(loaded, Settings(**base))
    trees = {} if "tree" in args.skip else tree_traces(args)
    if trees:  # before any decoder runs the draft: every variant times the same head
        res["draft_spread"] = {"before": round(sharpen_draft(draft, dense.seg, prompt, spread=args.trace_spread), 3),
                               "target": args.trace_spread,
                               "after_sharpening": round(draft_spread(draft, dense.seg, prompt), 3)}
    exits_on = "specee" not in args.skip
    decs = {"dense": dense}
    if exits_on:
        decs["specee232"] = build_decoder(loaded, spec, segments=dense.seg, program=program, draft=draft,
                                          policy=trace_exits([e - 1 for e in trace]))
        decs["specee_noexit"] = build_decoder(loaded, spec, segments=dense.seg, program=program, draft=draft,
                                              policy=trace_exits([L]))
    q8 = None if "q8" in args.skip else int8_copy(draft, loaded.model)
    if q8 is not None and exits_on:
        decs["specee232_q8"] = build_decoder(loaded, spec.replace(draft_quant="int8"), segments=dense.seg,
                                             program=program, draft=q8, policy=trace_exits([e - 1 for e in trace]))
    shape_kw = dict(zip(("tree_budget", "tree_depth", "tree_topk"), args.tree_shape or ()))
    tree_rows = [(name, tr, draft, "none", False) for name, tr in trees.items()]
    if q8 is not None and "tree35" in trees:
        tree_rows.append(("tree35_q8", trees["tree35"], q8, "int8", False))
    if "tree35" in trees and exits_on:  # SpecEE on the tree: each path leaves at the deepest of its tokens' trace layers
        tree_rows.append(("tree35_specee232", trees["tree35"], draft, "none", True))
        if q8 is not None:  # the three together: the tree, its exits, the int8 draft
            tree_rows.append(("tree35_specee232_q8", trees["tree35"], q8, "int8", True))
    for name, tr, src, quant, exits in tree_rows:
        # no prompt lookup: random tokens do not repeat, its rows would be dead (the same row count)
        ts = Settings(**base, speculate="tree", tree_program="fixed", tree_lookup=False, draft_quant=quant,
                      specee=exits, **shape_kw)
        b, d, k = ts.tree_shape(getattr(dense.seg, "gemm", None))
        if exits and k < program.num_candidates:  # the exits score k candidates per row: the tree proposes them
            ts = ts.replace(tree_budget=b, tree_depth=d, tree_topk=program.num_candidates)
        decs[name] = build_decoder(loaded, ts, segments=dense.seg, draft=src, accept=trace_accepts(tr),
                                   **({"program": program, "policy": trace_exits([e - 1 for e in trace])} if exits else {}))
    pdl_rows = pdl_variants(args, loaded, base, spec, program, draft, trace, tree_rows, decs)
    phase(res, f"7b: {len(decs)} decoders built")
    log(f"== timing, interleaved: one warm-up call each, then {args.runs} round(s) of {', '.join(decs)}")
    # the exits on the tree (the newest rows, first run on the H200 in session 20) and the PDL rows: a failure is
    # recorded, the other rows still timed
    timed = time_interleaved(decs, prompt, args.runs,
                             optional={n for n, *_, exits in tree_rows if exits} | set(pdl_rows),
                             progress=res.setdefault("progress_7b", {}))
    del res["progress_7b"]  # (the figures below supersede it)
    phase(res, "7b: timed")
    R_["dense"], dres = timed["dense"]
    R_["product_dense_tok_s"] = R_["dense"]["median"]
    if "hf_tokens" in res:
        res["checks"]["dense_vs_hf_first_divergence"] = first_divergence(dres.token_ids, res["hf_tokens"])
    if exits_on:
        R_["specee232"] = timed["specee232"][0]
        R_["specee232"]["trace_mean_layers"] = round(sum(trace[: N]) / len(trace[: N]), 2)
        R_["product_specee232_ratio"] = R_["specee232"]["paired_ratio"]
        R_["specee_noexit"] = timed["specee_noexit"][0]
        R_["specee_noexit_ratio"] = R_["specee_noexit"]["paired_ratio"]
    if q8 is not None:
        if exits_on:
            R_["specee232_q8"] = timed["specee232_q8"][0]
            R_["product_specee232_q8_ratio"] = R_["specee232_q8"]["paired_ratio"]
        R_["draft_pass_MB"] = {"fp16": round(draft_pass_bytes(draft.draft) / 1e6, 1),
                               "int8": round(draft_pass_bytes(q8.draft) / 1e6, 1)}
    for name, tr, _src, _quant, _exits in tree_rows:
        R_[name], r = timed[name]
        if r is None:  # (an optional row that failed: its error is the record)
            continue
        R_[name].update(accepted_per_step=round(r.accepted_per_step, 3), trace_mean=round(sum(tr) / len(tr), 3),
                        avg_tree_nodes=r.stats()["avg_tree_nodes"],
                        tree_program="fixed" if decs[name].tree._fixed_on else "host", tree_guard=r.tree_guard,
                        tree_shape=":".join(map(str, (decs[name].tree.budget, decs[name].tree.depth,
                                                      decs[name].tree.topk))),
                        **replay_fidelity(decs[name].tree, tr))
        R_[f"product_{name}_ratio"] = R_[name]["paired_ratio"]
    for name in pdl_rows:  # each against its own row without PDL, and against dense with PDL, same rounds
        R_[name] = timed[name][0]
        if "paired_ratio" not in R_[name]:
            continue
        plain = name.removesuffix("_pdl")
        # the same kernels and math with PDL: a difference in the tokens is a race, or a near-tie that another
        # kernel config (the tuners pick per PDL mode) rounded the other way: the divergence record tells which
        same = timed[name][1].token_ids == timed[plain][1].token_ids
        res["checks"][f"{name}_tokens_identical"] = same
        if not same:
            res["checks"][f"{name}_divergence"] = token_divergence(
                loaded.model, prompt, timed[plain][1].token_ids, timed[name][1].token_ids, margin=not decs[plain].s.specee)
        R_[f"pdl_gain_{plain}"] = round(R_[name]["paired_ratio"] / R_[plain].get("paired_ratio", 1.0), 3)
        if plain != "dense" and "paired_ratio" in R_.get("dense_pdl", {}):
            R_[f"product_{plain}_ratio_pdl"] = round(R_[name]["paired_ratio"] / R_["dense_pdl"]["paired_ratio"], 3)
    # which rows run the product's default draft (Settings.draft_quant auto): the _q8 ones, or the others
    default_quant = Settings(**base).draft_quant_for(dev.type, draft.draft.dtype)  # (the same for every mode)
    quants = {"specee232": "none", "specee232_q8": "int8", **{n: q for n, _tr, _src, q, _exits in tree_rows}}
    R_["default_draft_quant"] = default_quant
    R_["default_rows"] = [n for n, q in quants.items() if n in decs and q == default_quant]
    if "product_tree35_specee232_ratio" in R_:  # exits on the tree against the same tree without them, same rounds
        R_["tree35_specee232_vs_tree35"] = round(R_["product_tree35_specee232_ratio"] / R_["product_tree35_ratio"], 3)
    if trees:  # still the sharpened head after every variant ran? (a replay falls short where it is not)
        res["draft_spread"]["after_timing"] = round(draft_spread(draft, dense.seg, prompt), 3)
        log("draft logit spread at the prompt's last pair", res["draft_spread"])
    for name in decs:
        log(name, R_[name])

    if dev.type == "cuda":
        record_tuned(res)
        bw = copy_bandwidth(dev)
        wbytes = sum(p.numel() * p.element_size() for n, p in loaded.model.named_parameters() if "embed" not in n)
        R_["copy_TBps"] = round(bw / 1e12, 3)
        R_["weight_GB"] = round(wbytes / 1e9, 3)
        R_["dense_floor_tok_s"] = round(bw / wbytes, 1)
    del dense, decs, timed, loaded
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def pdl_variants(args, loaded, base, spec, program, draft, trace, tree_rows, decs) -> list[str]:
    """--pdl-ab MODE: dense, specee232, tree35 and tree35_specee232 again, built and run under SPECEE_PDL=MODE on
    segments of their own (PDL is decided when kernels compile and when graphs capture), added to `decs` as
    NAME_pdl; returns their names."""
    from ..api import build_decoder
    from ..config import Settings
    from ..runtime.policies import trace_accepts, trace_exits

    mode = getattr(args, "pdl_ab", None)
    if not mode:
        return []
    dense = UnderPdl(mode, lambda: build_decoder(loaded, Settings(**base)))
    decs["dense_pdl"] = dense
    if "specee232" in decs:
        decs["specee232_pdl"] = UnderPdl(mode, lambda: build_decoder(
            loaded, spec, segments=dense.seg, program=program, draft=draft, policy=trace_exits([e - 1 for e in trace])))
    plain = {name: (tr, exits) for name, tr, _src, quant, exits in tree_rows if quant == "none"}
    for name in ("tree35", "tree35_specee232"):
        if name not in plain:
            continue
        tr, exits = plain[name]
        ts = decs[name].s  # the plain row's settings (its tree shape included)
        kw = {"program": program, "policy": trace_exits([e - 1 for e in trace])} if exits else {}
        decs[f"{name}_pdl"] = UnderPdl(mode, lambda ts=ts, tr=tr, kw=kw: build_decoder(
            loaded, ts, segments=dense.seg, draft=draft, accept=trace_accepts(tr), **kw))
    return [n for n in decs if n.endswith("_pdl")]


def accept_trace(n: int, mean: float, seed: int = 5, longest: int = 7, block: int = 2) -> list[int]:
    """n tokens-per-step values in 1 .. longest with the given mean, balanced per pair of steps (`block`; each
    block's sum is its share of n * mean): a generate call replays a ~40-step window of the trace, and the
    fixed tree program's step costs the same whatever it accepts, so a window whose mean strays from the
    trace's moves tok/s with it (session 17, unbalanced: windows of mean 3.34-3.7 gave 470-552 tok/s)."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for b in range(0, n, block):
        m = min(block, n - b)
        want = round(mean * (b + m)) - round(mean * b)  # this block's sum (the running total stays on the mean)
        want = min(max(want, m), m * longest)
        vals = [int(torch.randint(1, longest + 1, (1,), generator=g)) for _ in range(m)]
        while sum(vals) != want:  # nudge to the block's sum, one step at a time
            i = int(torch.randint(0, m, (1,), generator=g))
            if sum(vals) < want and vals[i] < longest:
                vals[i] += 1
            elif sum(vals) > want and vals[i] > 1:
                vals[i] -= 1
        out += vals
    return out


def draft_spread(eagle, seg, prompt: list[int]) -> float:
    """The std of the EAGLE head's logits at the prompt's last pair (leaves the target's cache empty)."""
    _, hn = seg.prefill(prompt)
    eagle.reset(prompt, hn)
    std = float(eagle.draft.logits(eagle._catch_up()).float().std())
    seg.cache.reset()
    return std


def sharpen_draft(eagle, seg, prompt: list[int], spread: float) -> float:
    """Scale a random EAGLE head's logits to std `spread` at the prompt's last pair, so its EAGLE-2 tree
    has depth (a trained head's spread is ~4; trace replays use TRACE_SPREAD). The scaled head rows are a
    new tensor: the target's LM head is not touched. Returns the std before scaling."""
    d = eagle.draft
    std = draft_spread(eagle, seg, prompt)
    d.head_rows = d.head_rows * (spread / max(std, 1e-6))
    return std


# The logit spread the random draft is scaled to for trace replays: a trace step accepts
# min(trace, the deepest kept node), so the tree must hold a path as long as every trace step asks, as the
# trees the trace was recorded from did. At std 4 (a trained head's spread) the kept trees often stop at
# depth 2-3 (H200 session 7: the SmolLM2 trace gave 2.19 accepted per step for a segment of mean 2.886;
# tiny CPU check with the CUDA shape 24:6:8: 2.35 / 2.05 for the 3.5 / SmolLM2 traces); at std 32 the
# replay follows the trace (3.629 / 2.886, the consumed segments' means). The fixed program's work per
# step does not depend on the tree's shape. (Session 17's replay fell to 0.56 of the trace at std 32 and at
# std 256 alike: not the spread but NaN junk from the graph warm-ups, fixed by KVCache.junk; the record's
# `draft_spread` shows the head keeps its scale.) --trace-spread overrides it.
TRACE_SPREAD = 32.0


def tree_traces(args) -> dict[str, list[int]]:
    """The 7B tree rows' acceptance traces (random weights accept nothing): tree35 (mean 3.5) and, with
    --accept-trace, one recorded from SmolLM2. The random draft head is sharpened (TRACE_SPREAD) so that its
    tree always holds the trace's path; the tree still comes from the draft, and the fixed program verifies all of it."""
    traces = {"tree35": accept_trace(4096, 3.5)}
    if getattr(args, "accept_trace_ids", None):
        trace = list(args.accept_trace_ids)  # (read and checked in main, before any work)
        # recorded prompt after prompt, and a run replays a prefix of it (a few hundred tokens): shuffled
        # (seed 0), every prefix follows the whole trace's distribution, not its first prompts'
        random.Random(0).shuffle(trace)
        traces["tree_smollm2trace"] = trace
    return traces


def token_divergence(model, prompt: list[int], a: list[int], b: list[int], margin: bool = True) -> dict:
    """Where two greedy runs of one prompt part (a: a row's tokens, b: its twin's, e.g. under PDL) and, with
    `margin`, how much the model's own eager forward prefers a's token to b's there ("margin") beside the gap
    between its two best logits ("top2_gap"). A gap near zero is a near-tie that any change of rounding flips
    (another kernel config, another reduction order: random weights make many); a large margin at a large gap
    would be a wrong token, e.g. a race. `margin` only where the row's tokens are the full model's (no exits)."""
    from .accuracy import first_divergence

    i = first_divergence(a, b)
    out: dict = {"identical": i is None}
    if i is None:
        return out
    out.update(first_divergence=i, tokens=len(a))
    if margin and i < min(len(a), len(b)):
        dev = next(model.parameters()).device
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt) + list(a[:i])], device=dev)).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        out.update(margin=round(float(logits[a[i]] - logits[b[i]]), 4), top2_gap=round(float(top[0] - top[1]), 4),
                   logit_scale=round(float(logits.abs().max()), 3))
    return out


def replay_fidelity(tree, trace: list[int]) -> dict:
    """How closely the last generation's verify steps followed the acceptance trace: the trace's mean over the
    steps it forced (`forced_mean`), realized / forced tokens (`realized_vs_forced`, 1.0 = followed), and the
    steps that emitted fewer than forced (`short_steps`; the last step, cut by max_new_tokens, not counted). A
    step falls short where the kept tree holds no path as deep as the trace asks."""
    got = list(tree.accepted_log)
    start = tree.trace_steps - len(got)
    forced = [trace[(start + i) % len(trace)] for i in range(len(got))]
    if not got:
        return {}
    return {"forced_mean": round(sum(forced) / len(forced), 3), "realized_vs_forced": round(sum(got) / sum(forced), 3),
            "short_steps": sum(a < f for a, f in zip(got[:-1], forced[:-1]))}


def record_tuned(res: dict) -> None:
    """The tuners' picks so far (this process's, every stage's shapes) into the record."""
    from ..plugins import triton_tree_attention
    from ..plugins.triton_gemv import TUNED

    # what every GEMV shape ran: a kernel config, or "eager" (cuBLAS) where the rows tuner timed it faster
    res["gemv_tuned"] = {str(k): v for k, v in TUNED.items()}
    # the same for the tree rows' attention: (BLOCK_S, splits, warps, stages[, fp32 precision]), or "eager" (cuDNN)
    res["tree_attention_tuned"] = {str(k): v for k, v in triton_tree_attention.TUNED.items()}


# besides dense (--smollm2-configs); tree = the tree alone (the t3 issue's measure, guard off), tree_guarded = the
# product's default (the guard may decline the tree where it does not pay: runtime/tree.py TreeGuard), tree_draft16
# = the tree with its draft computing in fp16 (--draft-dtype float16; the fp32 target verifies; weights kept fp16,
# where the product's draft_quant=auto would take int8: the row measures the dtype alone, as in session 25)
SMOLLM2_CONFIGS = ("paper", "lossless", "tree", "tree_guarded", "tree_specee", "tree_paper", "tree_draft16")
APPROXIMATE = ("paper", "tree_paper")  # the rows whose tokens may part from dense by design (approximate exits)


def bench_smollm2(args, res: dict, dev) -> None:
    from ..api import build_decoder, encode_prompt
    from ..config import Settings
    from ..models import load_model

    R_ = res["results"]
    t = time.time()
    loaded = load_model(args.smollm2)  # float32 on the host first: the fingerprint the artifacts were made for
    R_["smollm2_load_s"] = round(time.time() - t, 1)
    prompts = [encode_prompt(loaded.tokenizer, p) for p in args.prompt_texts[: args.smollm2_n]]  # (read in main)
    from ..artifacts import shipped_dir

    base = dict(device=str(dev), dtype=getattr(args, "smollm2_dtype", "float32"), backend="inductor", max_context=1024,
                max_new_tokens=args.smollm2_new,
                artifacts=str(getattr(args, "smollm2_artifacts", None) or shipped_dir("smollm2-135m")))
    R_["smollm2_artifacts"] = base["artifacts"]
    R_["smollm2_dtype"] = base["dtype"]  # every row's, dense included: each ratio compares one dtype with itself
    configs = {"dense": dict(), "paper": dict(specee=True, mode="approximate", kv_policy="skip"),
               "lossless": dict(specee=True, mode="lossless", kv_policy="backfill")}
    if "tree" not in args.skip:
        configs.update(tree=dict(speculate="tree", tree_guard=False), tree_guarded=dict(speculate="tree"),
                       tree_specee=dict(speculate="tree", specee=True, mode="lossless", kv_policy="backfill"),
                       tree_paper=dict(speculate="tree", specee=True, mode="approximate", kv_policy="skip"),
                       tree_draft16=dict(speculate="tree", tree_guard=False, draft_dtype="float16",
                                         draft_quant="none"))
    wanted = getattr(args, "smollm2_configs", None)
    if wanted:  # (names checked in main, before any work)
        keep = {"dense", *wanted.split(",")}
        configs = {n: c for n, c in configs.items() if n in keep}
    for b, d, k in getattr(args, "smollm2_tree_shapes", None) or ():  # the tree alone at other shapes
        configs[f"tree_{b}_{d}_{k}"] = {"speculate": "tree", "tree_guard": False, "tree_budget": b,
                                        "tree_depth": d, "tree_topk": k}
    decs, shared = {}, None
    for name, over in configs.items():
        decs[name] = build_decoder(loaded, Settings(**base, **over), segments=shared)
        shared = shared or decs[name].seg
    heads = getattr(args, "smollm2_tree_heads", None) or {}
    if heads:  # other draft heads on the tree row's own shape, guard off (a new head may carry no shape of its own)
        tr = decs["tree"].tree
        shape = {"tree_budget": tr.budget, "tree_depth": tr.depth, "tree_topk": tr.topk}
        for name, d in heads.items():
            over = {**configs["tree"], **shape, "artifacts": d}
            decs[f"tree@{name}"] = build_decoder(loaded, Settings(**{**base, **over}), segments=shared)
        R_["smollm2_tree_heads"] = heads
    mode = getattr(args, "pdl_ab", None)
    if mode:  # dense (and the tree) again under SPECEE_PDL=mode, on segments of their own, in the same rounds
        dense_pdl = decs["dense_pdl"] = UnderPdl(mode, lambda: build_decoder(loaded, Settings(**base)))
        if "tree" in configs:
            decs["tree_pdl"] = UnderPdl(mode, lambda: build_decoder(loaded, Settings(**base, **configs["tree"]),
                                                                    segments=dense_pdl.seg))
    t = time.time()
    for dec in decs.values():
        dec.generate(prompts[0])
    R_["smollm2_compile_s"] = round(time.time() - t, 1)
    phase(res, f"smollm2: {len(decs)} decoders built and compiled")
    if "paper" in configs:
        # parity with the exits on (the cost check may turn them off in the timed decoders)
        eager = build_decoder(loaded, Settings(**{**base, "backend": "eager"}, **configs["paper"]))
        want = eager.generate(prompts[0])
        every = build_decoder(loaded, Settings(**base, **configs["paper"], exit_cost_check=False), segments=shared)
        got = every.generate(prompts[0])
        res["checks"]["smollm2_paper_inductor_vs_eager"] = {"identical": got.token_ids == want.token_ids,
                                                            "agreement": round(agreement(got.token_ids, want.token_ids), 4),
                                                            "exit_layers_identical": got.exit_layers == want.exit_layers}
        del eager
    speeds = res["progress_smollm2"] = {n: [] for n in decs}  # (in the record while it grows: a run cut short)
    guards: dict = {}  # name -> the last call's tree guard record (None: no guard)
    stats = {n: {"layers": [], "agree": [], "identical": 0, "accepted": [0, 0]} for n in decs}
    accepted_trace: list[int] = []
    for ids in prompts:
        ref = None
        for name, dec in decs.items():
            r = dec.generate(ids)
            guards[name] = r.tree_guard
            speeds[name].append(r.decode_tok_s)
            stats[name]["layers"].append(r.avg_layers)
            stats[name]["accepted"][0] += r.accepted_tokens
            stats[name]["accepted"][1] += r.verify_steps
            if name == "tree":
                accepted_trace += getattr(dec.tree, "accepted_log", [])
            if name == "dense":
                ref = r.token_ids
            else:
                stats[name]["agree"].append(agreement(r.token_ids, ref))
                stats[name]["identical"] += int(r.token_ids == ref)
                if r.token_ids != ref and name not in APPROXIMATE:  # a lossless row that parts from dense: where,
                    # and the logit gap there (a near-tie within the dtype's rounding, or a wrong token)
                    stats[name].setdefault("divergences", []).append(
                        token_divergence(loaded.model, ids, r.token_ids, ref))
    # each row's tok/s per turn stays in the record (`smollm2_per_turn_tok_s`): a row slower than its twin says
    # whether every turn was, or a few (session 29's bf16 tree without PDL ran at half its PDL twin's median)
    R_["smollm2_per_turn_tok_s"] = {n: [round(v, 1) for v in vs] for n, vs in res.pop("progress_smollm2").items()}
    phase(res, "smollm2: timed")
    if dev.type == "cuda":
        record_tuned(res)
    d = statistics.median(speeds["dense"])
    R_["smollm2_dense_tok_s"] = round(d, 1)
    for name in [n for n in decs if n != "dense"]:  # (dense_pdl's ratio is PDL's gain; its identity, PDL's check)
        ratios = [a / b for a, b in zip(speeds[name], speeds["dense"])]
        R_[f"smollm2_{name}_ratio"] = round(statistics.median(ratios), 3)
        R_[f"smollm2_{name}"] = {"tok_s": round(statistics.median(speeds[name]), 1),
                                 "avg_layers": round(statistics.mean(stats[name]["layers"]), 2),
                                 "agreement": round(statistics.mean(stats[name]["agree"]), 4),
                                 "identical": f"{stats[name]['identical']}/{len(prompts)}"}
        if stats[name].get("divergences"):
            R_[f"smollm2_{name}"]["divergences"] = stats[name]["divergences"]
        acc, steps = stats[name]["accepted"]
        if steps:
            tr = decs[name].tree
            R_[f"smollm2_{name}"].update(accepted_per_step=round(acc / steps, 3),
                                         tree_program="fixed" if tr._fixed_on else "host",
                                         tree_shape=f"{tr.budget}:{tr.depth}:{tr.topk}", tree_guard=guards[name])
    if "tree" in configs:
        R_["smollm2_tree_accepted"] = R_["smollm2_tree"]["accepted_per_step"]
        R_["smollm2_tree_identical"] = stats["tree"]["identical"] / len(prompts)
        if "tree_specee" in configs:
            tt = [a / b for a, b in zip(speeds["tree_specee"], speeds["tree"])]
            R_["smollm2_tree_specee_vs_tree"] = round(statistics.median(tt), 3)
        if "tree_paper" in configs:  # approximate SpecEE on the tree (the fixed program's exits on CUDA)
            tt = [a / b for a, b in zip(speeds["tree_paper"], speeds["tree"])]
            R_["smollm2_tree_paper_vs_tree"] = round(statistics.median(tt), 3)
        if accepted_trace:
            R_["smollm2_tree_accept_hist"] = {str(k): accepted_trace.count(k) for k in sorted(set(accepted_trace))}
            # the per-step sequence, for a later `bench --accept-trace FILE` (the 7B tree stage on SmolLM2's trace)
            res.setdefault("traces", {})["smollm2_tree_accepted"] = accepted_trace
            stem = f"{res['date']}-smollm2-accept-trace"
            stem += free_suffix(bench_out_dir(args), [stem + ".json"])
            trace_path = os.path.join(bench_out_dir(args), stem + ".json")
            write_file_atomic(trace_path, json.dumps(accepted_trace))
            R_["smollm2_tree_accept_trace_file"] = trace_path
    if "tree_pdl" in decs:  # the tree under PDL against dense under PDL, same rounds
        tt = [a / b for a, b in zip(speeds["tree_pdl"], speeds["dense_pdl"])]
        R_["smollm2_tree_pdl_vs_dense_pdl"] = round(statistics.median(tt), 3)
    if "lossless" in configs:
        R_["smollm2_lossless_identical"] = stats["lossless"]["identical"] / len(prompts)
    R_["smollm2_exit_programs"] = {n: decs[n].selection for n in ("paper", "lossless", "tree_paper") if n in configs}
    R_["smollm2_prompts"] = len(prompts)


def tree_heads(value: str | None, configs: str | None) -> dict[str, str]:
    """--smollm2-tree-heads as {row name: directory}, each checked before any work (one clear line)."""
    from ..errors import SpecEEError

    heads: dict[str, str] = {}
    for d in [x for x in (value or "").split(",") if x]:
        name = os.path.basename(os.path.normpath(d))
        if not os.path.isfile(os.path.join(d, "draft.safetensors")):
            raise SpecEEError(f"--smollm2-tree-heads: {d} holds no draft.safetensors; expected artifact directories "
                              "or train-draft outputs")
        if name in heads:
            raise SpecEEError(f"--smollm2-tree-heads: two directories named {name!r}; their rows would share a name")
        heads[name] = d
    if heads and configs and "tree" not in configs.split(","):
        raise SpecEEError("--smollm2-tree-heads needs the tree row (add tree to --smollm2-configs): the heads run on "
                          "its shape and are compared in its rounds")
    return heads


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_out_dir(args) -> str:
    """Where the bench writes: --out, else $OUT (the device machine), else benchmarks/results."""
    return args.out or os.environ.get("OUT") or "benchmarks/results"


def run_bench(args) -> dict:
    from ..plugins import pdl

    dev = torch.device(args.device)
    shape = TINY if args.tiny else LLAMA2_7B
    res: dict = {
        "card": torch.cuda.get_device_name() if dev.type == "cuda" else "2-core CPU",
        "date": datetime.date.today().isoformat(),
        "commit": args.commit or os.environ.get("SPECEE_COMMIT") or _git_head(),
        "path": "runtime",
        "torch": torch.__version__,
        "model_shape": {**shape, "weights": "random, std 0.02"},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs, "batch": 1,
        "command": " ".join(["specee-compile bench", *getattr(args, "argv", [])]),
        # SPECEE_PDL (plugins/pdl.py): programmatic dependent launch, `all` by default on sm_90+; None off CUDA
        "pdl": pdl.mode() if dev.type == "cuda" else None,
        # every SPECEE_* variable of this run (an A/B form such as SPECEE_TREE_LINEARS changes the product's path)
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPECEE_")},
        "results": {}, "checks": {}, "notes": [], "started": time.time(),
    }
    os.makedirs(bench_out_dir(args), exist_ok=True)
    stem = f"{res['date']}-{card_slug(res['card'])}{'-tiny' if args.tiny else ''}"
    stem += free_suffix(bench_out_dir(args), [stem + ".json", stem + ".png"])  # never over an earlier record
    out_path = os.path.join(bench_out_dir(args), stem + ".json")

    def save():  # the record so far: a run cut short keeps what it measured
        write_file_atomic(out_path, json.dumps(res, indent=1, default=str))

    stages = [("7b", lambda: bench_7b(args, res, dev, shape))]
    if args.smollm2:
        stages.append(("smollm2", lambda: bench_smollm2(args, res, dev)))
    stage = "yardstick"
    try:
        if args.yardstick and dev.type == "cuda":
            log("== yardstick")
            try:
                y = run_yardstick(args.yardstick, timeout=300)
            except Exception as ex:  # noqa: BLE001  # recorded; the run goes on
                y = {"error": repr(ex)}
            res["yardstick"] = y
            if "whole_tok_s" in y:
                res["results"]["yardstick_whole_tok_s"] = y["whole_tok_s"][0]
            phase(res, "yardstick")
            save()
        for stage, fn in stages:
            if stage in args.skip:
                continue
            try:
                fn()
            except Exception:  # noqa: BLE001  # recorded; the other stages still run
                import traceback

                res["checks"][f"{stage}_error"] = traceback.format_exc()[-3000:]
                log(res["checks"][f"{stage}_error"])
            phase(res, f"{stage} stage")
            save()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (a `timeout`) under the CLI's raise_on_signals
        # the record keeps what was measured (progress_7b / progress_smollm2: the rounds so far) and where it stopped
        res["interrupted"] = {"signal": getattr(e, "signum", 2), "stage": stage}
        phase(res, f"interrupted in the {stage} stage")
        save()
        print_table(res)
        log(f"interrupted in the {stage} stage; the record so far: {out_path}")
        raise
    res["gpu_state_end"] = gpu_state() if dev.type == "cuda" else None
    save()
    print_table(res)
    png = plot_record(res, out_path[: -len(".json")] + ".png")
    log(f"wrote {out_path}" + (f", {png}" if png else ""))
    return res


def plot_record(res: dict, path: str) -> str | None:
    """Decode tok/s of every variant of one bench record as bars, each SpecEE bar labelled with its
    ratio to the dense bar of the same model (matplotlib PNG); None without matplotlib or figures."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    R_ = res["results"]
    bars = []  # (panel, label, tok/s, ratio or None)
    for panel, dense_key, variants, speed in (
            ("7B shapes", "product_dense_tok_s",
             (("specee232", "SpecEE, 23.2 trace"), ("specee232_q8", "SpecEE, int8 draft"),
              ("specee_noexit", "SpecEE, never exits"), ("tree35", "tree, 3.5 trace"),
              ("tree35_q8", "tree, int8 draft"), ("tree35_specee232", "tree+SpecEE, 23.2"),
              ("tree35_specee232_q8", "tree+SpecEE, int8 draft"),
              ("tree_smollm2trace", "tree, SmolLM2 trace")), "median"),
            ("SmolLM2-135M", "smollm2_dense_tok_s", (("smollm2_paper", "paper"), ("smollm2_lossless", "lossless"),
                                                     ("smollm2_tree", "tree"), ("smollm2_tree_guarded", "tree, guarded"),
                                                     ("smollm2_tree_specee", "tree+SpecEE"),
                                                     ("smollm2_tree_paper", "tree+SpecEE, paper"),
                                                     ("smollm2_tree_draft16", "tree, fp16 draft"),
                                                     *[(k, "tree " + k[len("smollm2_tree_"):].replace("_", ":"))
                                                       for k in R_ if re.fullmatch(r"smollm2_tree_\d+_\d+_\d+", k)]),
             "tok_s")):
        if dense_key not in R_:
            continue
        dense = R_[dense_key]
        bars.append((panel, "dense", dense, None))
        bars += [(panel, label, R_[k][speed], R_[k][speed] / dense) for k, label in variants
                 if isinstance(R_.get(k), dict) and speed in R_[k]]
        if panel == "7B shapes" and "yardstick_whole_tok_s" in R_:
            bars.append((panel, "yardstick", R_["yardstick_whole_tok_s"], None))
    if not bars:
        return None
    panels = list(dict.fromkeys(b[0] for b in bars))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = [b for b in bars if b[0] == panel]
        xs = range(len(rows))
        ax.bar(xs, [b[2] for b in rows], color=["#4c72b0" if b[3] is None else "#dd8452" for b in rows])
        for x, b in zip(xs, rows):
            ax.text(x, b[2], f"{b[2]:.0f}" + (f"\n{b[3]:.3f}x" if b[3] is not None else ""), ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [b[1] for b in rows], rotation=15, fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel("decode tok/s (Decoder.generate)")
        ax.margins(y=0.2)
    fig.suptitle(f"{res['card']}, {res['date']}, commit {res['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(res: dict) -> None:
    R_ = res["results"]
    log(f"\n{res['card']} | torch {res['torch']} | {res['date']} | commit {res['commit']} | "
        f"prompt {res['prompt_len']} + {res['new_tokens']} new | path: {res['path']}")
    log(f"{'variant':28s} {'tok/s':>8s} {'min':>8s} {'max':>8s} {'layers':>7s} {'compile_s':>9s}")
    for k, r in R_.items():
        if isinstance(r, dict) and "median" in r:
            log(f"{k:28s} {r['median']:8.1f} {r['min']:8.1f} {r['max']:8.1f} {r.get('avg_layers', ''):>7} "
                f"{r.get('compile_s', ''):>9}")
        elif isinstance(r, dict) and "error" in r:
            log(f"{k:28s} failed: {r['error']}")
    log(" | ".join(f"{k}={v}" for k, v in R_.items() if not isinstance(v, dict)))


SKIPS = ("7b", "smollm2", "tree", "q8", "specee")


def _skips(text: str) -> str:
    """--skip, checked: a typo would otherwise skip nothing, silently, on the GPU's time."""
    bad = sorted({v for v in text.split(",") if v} - set(SKIPS))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; expected a comma list of {', '.join(SKIPS)}")
    return text


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from ..errors import ArgParser

    p = p or ArgParser(prog="specee-compile bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small model shapes (a CPU dry run of the whole bench)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3,
                   help="timed rounds (7B: every variant once per round, after one warm-up call each)")
    p.add_argument("--hf-runs", type=int, default=3)
    p.add_argument("--trace-mean", type=float, default=23.2, help="mean executed layers of the exit trace (of 32)")
    p.add_argument("--yardstick", default=None, help="path of plain_decode_yardstick.py to run first")
    p.add_argument("--smollm2", default=None, help="SmolLM2 .gguf (or smollm2-135m) for the real-model stage")
    p.add_argument("--prompts", default=None, help="JSON list of prompt strings for the SmolLM2 stage")
    p.add_argument("--smollm2-artifacts", default=None,
                   help="artifact dir for the SmolLM2 stage (default: the shipped one), e.g. a newly trained draft")
    p.add_argument("--smollm2-configs", default=None,
                   help="comma list of the SmolLM2 configs to run besides dense (default: all: "
                        + ", ".join(SMOLLM2_CONFIGS) + ")")
    p.add_argument("--smollm2-tree-shapes", default=None, metavar="B:D:K,...",
                   help="also time the SmolLM2 tree (guard off) with these budget:depth:topk shapes besides the "
                        "default tree (the head's measured shape, else the device's), in the same rounds: rows "
                        "tree_B_D_K")
    p.add_argument("--smollm2-tree-heads", default=None, metavar="DIR,...",
                   help="also time the SmolLM2 tree (guard off, the tree row's shape) with the draft head of each "
                        "directory (artifacts, or a train-draft output), in the same rounds: rows tree@NAME (NAME: "
                        "the directory's name); the A/B of a new head against the shipped one")
    p.add_argument("--smollm2-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the SmolLM2 stage's compute dtype, every row's (dense included; the weights load in float32, "
                        "as the artifacts' fingerprint was made, and are cast)")
    p.add_argument("--smollm2-n", type=int, default=20)
    p.add_argument("--smollm2-new", type=int, default=128)
    p.add_argument("--skip", default="", type=_skips,
                   help="comma list of stages to skip: 7b, smollm2, tree, q8 (the int8-draft rows), specee (the 7B "
                        "rows with exits: specee232, specee_noexit, tree35_specee232; e.g. a short tree-only PDL "
                        "check with --skip smollm2,specee,q8 --pdl-ab all)")
    p.add_argument("--accept-trace", default=None,
                   help="JSON list of tokens per verify step (e.g. recorded from SmolLM2) for a second 7B tree run")
    p.add_argument("--tree-shape", default=None, metavar="B:D:K",
                   help="the 7B tree rows' budget:depth:topk (default: the device's, 24:6:8 on CUDA; "
                        "a CPU dry run with 24:6:8 replays the traces as the H200 run does)")
    p.add_argument("--trace-spread", type=float, default=TRACE_SPREAD,
                   help="logit std the random draft head is scaled to for the tree trace replays")
    p.add_argument("--pdl-ab", default=None, choices=PDL_MODES,
                   help="also time dense, specee232, tree35 and tree35_specee232 (SmolLM2: dense and the tree) with "
                        "SPECEE_PDL set to this, each built, compiled and captured under it on segments of its own, in "
                        "the same rounds: rows NAME_pdl, and pdl_gain_NAME = NAME_pdl / NAME (programmatic dependent "
                        "launch, plugins/pdl.py; the main rows run the default, `all` on sm_90+, so `0` measures "
                        "what it gains)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="output dir (default $OUT or benchmarks/results)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the record's `command`
    from ..config import parse_tree_shape
    from ..errors import SpecEEError

    for flag in ("runs", "hf_runs", "new_tokens", "prompt_len"):
        if getattr(args, flag) < 1:
            raise SpecEEError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    if not args.trace_spread > 0:
        raise SpecEEError(f"--trace-spread {args.trace_spread}: expected a positive number (the draft logits' std)")
    if args.smollm2 and not args.prompts:
        raise SpecEEError("--smollm2 needs --prompts P.json (a JSON list of prompt strings)")
    unknown = sorted(set((args.smollm2_configs or "").split(",")) - {"", *SMOLLM2_CONFIGS})
    if unknown:
        raise SpecEEError(f"--smollm2-configs: unknown {unknown}; expected a comma list of {', '.join(SMOLLM2_CONFIGS)}")
    if args.tree_shape:
        args.tree_shape = parse_tree_shape(args.tree_shape, "--tree-shape")
    args.smollm2_tree_shapes = [parse_tree_shape(t, "--smollm2-tree-shapes")
                                for t in (args.smollm2_tree_shapes or "").split(",") if t]
    args.smollm2_tree_heads = tree_heads(args.smollm2_tree_heads, args.smollm2_configs)
    if args.smollm2_tree_heads and "tree" in args.skip:
        raise SpecEEError("--smollm2-tree-heads needs the tree row, and --skip tree drops it")
    from ..api import check_output_directory

    check_output_directory(bench_out_dir(args), "--out")
    # the input files are read here, once, before any work: a bad one would otherwise cost a whole stage
    from ..data import read_json_list

    args.accept_trace_ids = (read_json_list(args.accept_trace, "--accept-trace", int, "accepted tokens per verify step")
                             if args.accept_trace else None)
    args.prompt_texts = (read_json_list(args.prompts, "--prompts", str, "prompt strings")
                         if args.smollm2 and "smollm2" not in args.skip else None)
    run_bench(args)
    return 0


if __name__ == "__main__":  # (`specee-compile bench` is the product's way in: one line for bad input, 128 + signum)
    from ..artifacts import raise_on_signals

    try:
        with raise_on_signals():  # SIGTERM (a `timeout`) unwinds: the record so far is written, temp dirs removed
            sys.exit(main())
    except KeyboardInterrupt as e:  # (the record's path was logged; no traceback)
        sys.exit(128 + getattr(e, "signum", 2))
