"""Where the fixed tree step's time goes on a GPU (issue t3): SmolLM2-135M shapes (or Llama-2-7B widths
with --shape 7b --layers N) with random weights (timing does not depend on the weights; the accepted
length is forced by a trace), through `Decoder.generate()`.

Times, in one process: the dense whole-step graph, the fixed tree program per step (variants: the draft
expansion compiled (tree_compiled) or eager (tree_eager_draft)),
and the parts of one step captured alone (draft expansion, verification layers). Prints a table and writes
JSON to --out.

    python benchmarks/tree_gpu_profile.py --out $OUT/tree_profile.json
    python benchmarks/tree_gpu_profile.py --linears plain,matmul --profile   # same-process A/B of the tree's matmuls
    python benchmarks/tree_gpu_profile.py --draft-dtypes auto,float16        # the draft in the model's dtype and fp16
    python benchmarks/tree_gpu_profile.py --pdl 0,all                        # programmatic dependent launch off / on
    python benchmarks/tree_gpu_profile.py --plot A.json B.json --out cats.png   # no GPU: records' categories
    python benchmarks/tree_gpu_profile.py --device cpu --layers 2 --new 8 --runs 1 ...  # a dry run before GPU time
    python benchmarks/tree_gpu_profile.py --model /tmp/s/smollm2.gguf --draft-dtypes auto,float16 --profile

--model profiles a real model (a Hugging Face directory, a .gguf, or a zoo alias) with its trained draft head (the
shipped artifacts, or --artifacts DIR) and a chat prompt (--prompt) in place of the random weights, draft and ids:
what a real head's tree and a real prompt's buckets cost, where random weights may not show it (session 25: the
fp16 draft was faster on random weights and slower on the real SmolLM2). The accepted length stays forced.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

SEVEN = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
             intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMOL = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=100000.0)


# kernel-name patterns per category of the tree step's GPU time (first match wins; the rest is "other")
CATEGORIES = (
    ("matmul", ("nvjet", "gemm", "gemv", "cutlass", "xmma", "splitkreduce", "sgemm", "hgemm", "_rows_kernel",
                "_rows_t_kernel", "_rows_k_kernel")),
    ("attention", ("sdpa", "attention", "attn", "flash", "fmha")),
    ("top-k", ("topk", "sort")),
    ("rope + cache write", ("rope", "index_copy", "index_fill", "scatter")),
    ("softmax", ("softmax",)),
    ("norm", ("rsqrt", "mean_mul_pow", "norm")),
)


def kernel_categories(kernels: list[tuple[str, float, int]], steps: int) -> dict[str, dict]:
    """(name, total GPU us, calls) per kernel over `steps` tree steps -> per category: us and launches per step."""
    out: dict[str, dict] = {}
    for name, us, calls in kernels:
        low = name.lower()
        cat = next((c for c, pats in CATEGORIES if any(p in low for p in pats)), "other")
        e = out.setdefault(cat, {"us_per_step": 0.0, "launches_per_step": 0.0})
        e["us_per_step"] += us / steps
        e["launches_per_step"] += calls / steps
    return {c: {k: round(v, 1) for k, v in e.items()} for c, e in
            sorted(out.items(), key=lambda kv: -kv[1]["us_per_step"])}


def plot_categories(paths: list[str], out: str) -> None:
    """One stacked bar per `--profile` record (its commit, or file name), and per variant of a `--linears` A/B
    (`profile_categories@VALUE`): GPU us per tree step by category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        keys = [k for k in r if k.startswith("profile_categories") and r[k]]
        if not keys:
            print(f"{p}: no profile_categories; expected a record written with --profile", file=sys.stderr)
            raise SystemExit(2)
        for k in keys:
            tag = k[len("profile_categories"):]
            recs.append(((r.get("commit") or p.rsplit("/", 1)[-1]) + tag, r[k],
                         (r.get("results") or {}).get("tree_compiled" + tag, {}).get("step_us")))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * len(recs)))
    for y, (label, pc, step) in enumerate(recs):
        left = 0.0
        for i, c in enumerate(cats):
            us = pc.get(c, {}).get("us_per_step", 0.0)
            ax.barh(y, us, left=left, color=f"C{i}", label=c if y == 0 else None)
            left += us
        ax.text(left + 30, y, f"kernels {left:.0f} us" + (f", step {step:.0f} us" if step else ""), va="center",
                fontsize=8)
    ax.set_yticks(range(len(recs)), [r[0] for r in recs])
    ax.set_xlabel("GPU us per tree step (kernel time under the profiler)")
    ax.set_xlim(0, max(sum(v["us_per_step"] for v in r[1].values()) for r in recs) * 1.35)
    ax.invert_yaxis()  # the first record on top
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Where the tree step's GPU time goes")
    fig.tight_layout()
    from specee_compile.artifacts import atomic_file

    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> int:
    if "--plot" in sys.argv:  # no GPU: plot records' categories
        pp = argparse.ArgumentParser()
        pp.add_argument("--plot", nargs="+", required=True, metavar="RECORD")
        pp.add_argument("--out", required=True, help="PNG path")
        a = pp.parse_args()
        plot_categories(a.plot, a.out)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("smollm2", "7b"), default="smollm2")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the same script at whatever size --layers gives, to check a command before GPU time "
                         "(times are host wall clock, not comparable)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (7b: a cheaper build)")
    ap.add_argument("--model", default=None,
                    help="a real model (HF directory, .gguf or zoo alias) with its trained draft, instead of --shape")
    ap.add_argument("--artifacts", default=None,
                    help="with --model: the directory holding draft.safetensors (default: the model's shipped one)")
    ap.add_argument("--prompt", default="Give three tips for learning a new language.",
                    help="with --model: the prompt, in the model's chat template")
    ap.add_argument("--dtype", default=None, help="default: float32 (smollm2), float16 (7b)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None, help="the checkout's commit, recorded in --out's JSON")
    ap.add_argument("--profile", action="store_true", help="also print the kernels of one tree step")
    ap.add_argument("--variants", default="tree_compiled", help="comma list of the timed variants")
    ap.add_argument("--linears", default="",
                    help="comma list of SPECEE_TREE_LINEARS values (plain, matmul, fused, silu; default = unset) "
                         "to run every variant (and --profile) under, in this one process; results keyed "
                         "VARIANT@VALUE")
    ap.add_argument("--draft-dtypes", default="",
                    help="comma list of Settings.draft_dtype values (auto, float16, bfloat16) to run every variant "
                         "(and --profile) with, each on its own copy of the draft; results keyed VARIANT%%VALUE")
    ap.add_argument("--draft-quant", default="none", choices=("none", "int8", "auto"),
                    help="Settings.draft_quant of every variant (default none: the draft's weights as the dtype "
                         "gives them; auto, the product's, takes int8 for a 16-bit draft on CUDA)")
    ap.add_argument("--tree-shape", default=None, metavar="B:D:K",
                    help="the tree's budget:depth:topk (default: the real model's head's measured shape, else the "
                         "device's default)")
    ap.add_argument("--pdl", default="",
                    help="comma list of SPECEE_PDL values (0, ops, all) to run dense and every variant under, each "
                         "with its own compiled segments; results keyed KEY#pdl=VALUE (default: the environment's)")
    args = ap.parse_args()
    from specee_compile.config import DRAFT_DTYPES
    from specee_compile.model_step import ROWS_LINEARS
    from specee_compile.plugins import pdl

    pdls = [v for v in args.pdl.split(",") if v] or [pdl.mode()]
    if sorted(set(pdls) - set(pdl.MODES)):
        print(f"--pdl: unknown {sorted(set(pdls) - set(pdl.MODES))}; expected a comma list of {', '.join(pdl.MODES)}",
              file=sys.stderr)
        return 2

    draft_dtypes = [v for v in args.draft_dtypes.split(",") if v] or ["auto"]
    if sorted(set(draft_dtypes) - set(DRAFT_DTYPES)):
        print(f"--draft-dtypes: unknown {sorted(set(draft_dtypes) - set(DRAFT_DTYPES))}; expected a comma list of "
              f"{', '.join(DRAFT_DTYPES)}", file=sys.stderr)
        return 2

    linears = [v for v in args.linears.split(",") if v] or [os.environ.get("SPECEE_TREE_LINEARS", "")]
    bad = sorted(set(linears) - {"", "default", *ROWS_LINEARS})
    if bad:
        print(f"--linears: unknown {bad}; expected a comma list of default, {', '.join(ROWS_LINEARS)}", file=sys.stderr)
        return 2
    if args.model is None and args.artifacts is not None:
        print("--artifacts names a real model's draft: pass --model too", file=sys.stderr)
        return 2
    if args.model is not None and args.layers:
        print("--layers builds a random model of --shape: drop it with --model (a real model keeps its layers)",
              file=sys.stderr)
        return 2
    from specee_compile.config import parse_tree_shape
    from specee_compile.errors import SpecEEError

    try:
        tree_shape = parse_tree_shape(args.tree_shape, "--tree-shape") if args.tree_shape else None
    except SpecEEError as e:
        print(f"tree_gpu_profile: {e}", file=sys.stderr)
        return 2
    if args.out:  # before any GPU time
        from specee_compile.api import check_output_file

        try:
            check_output_file(args.out, "--out")
        except SpecEEError as e:
            print(f"tree_gpu_profile: {e}", file=sys.stderr)
            return 2

    from specee_compile.api import build_decoder
    from specee_compile.config import Settings
    from specee_compile.draft.eagle import EagleDraft, EagleSource
    from specee_compile.eval.gpu_bench import sharpen_draft, write_random_model
    from specee_compile.model_step import rows_fused
    from specee_compile.models import load_model

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("tree_gpu_profile: no CUDA device here; expected a GPU, or pass --device cpu for a dry run",
              file=sys.stderr)
        return 2
    if dev.type == "cpu":  # the weights as the GPU holds them (plain), not the CPU probe's oneDNN copies
        os.environ["SPECEE_CPU_GEMM"] = "mkl"  # (which Inductor cannot compile, nor copy.deepcopy copy)
    args.dtype = args.dtype or ("float32" if args.shape == "smollm2" else "float16")
    dt = getattr(torch, args.dtype)
    shape = dict(SMOL if args.shape == "smollm2" else SEVEN)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.model is not None:
        try:
            loaded, draft, prompt = real_model(args, dt)
        except SpecEEError as e:
            print(f"tree_gpu_profile: {e}", file=sys.stderr)
            return 2
        shape = {k: getattr(loaded.model.config, k, None) for k in SMOL}  # (transformers 5 keeps rope_theta elsewhere)
    else:
        with tempfile.TemporaryDirectory() as d:
            write_random_model(shape, dt, dev, d)
            loaded = load_model(d, dtype=dt, device=args.device)
        V = shape["vocab_size"]
        prompt = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(0)).tolist()
        draft = EagleDraft(loaded.model, vocab_ids=torch.arange(min(8192, V)))
        for p in draft.parameters():
            torch.nn.init.normal_(p, std=0.02)
        draft.to(device=dev, dtype=dt).requires_grad_(False).eval()
    base = dict(device=args.device, dtype=args.dtype, backend="inductor", max_context=1024, max_new_tokens=args.new,
                draft_quant=args.draft_quant)
    if tree_shape is not None:
        base.update(zip(("tree_budget", "tree_depth", "tree_topk"), tree_shape))
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"
    out: dict = {"card": card, "date": time.strftime("%Y-%m-%d"), "commit": args.commit, "dtype": args.dtype,
                 "rows_fused": {}, "shape": shape, "pdl": pdls,
                 "command": " ".join(["python", *sys.argv]), "results": {}}
    R = out["results"]

    def tok_s(dec):
        dec.generate(prompt)
        vals = []
        for _ in range(args.runs):
            r = dec.generate(prompt)
            vals.append(r.decode_tok_s)
        return statistics.median(vals), r

    out["model"] = args.model or "random"
    for pm in pdls:  # PDL is decided when a kernel is compiled (Inductor) and captured (ours): segments per mode
        os.environ["SPECEE_PDL"] = pm
        ptag = f"#pdl={pm}" if len(pdls) > 1 else ""
        dense = build_decoder(loaded, Settings(**{**base, "draft_quant": "auto"}))  # (no draft runs)
        R["dense_tok_s" + ptag], _ = tok_s(dense)
        R["dense_step_us" + ptag] = round(1e6 / R["dense_tok_s" + ptag], 1)
        print("dense" + ptag, R["dense_tok_s" + ptag], flush=True)
        seg = dense.seg
        if pm == pdls[0] and args.model is None:
            sharpen_draft(EagleSource(draft, k=4), seg, prompt, spread=4.0)  # a trained head's spread
        for lin in linears:
            if lin in ("", "default"):
                os.environ.pop("SPECEE_TREE_LINEARS", None)
            else:
                os.environ["SPECEE_TREE_LINEARS"] = lin
            out["rows_fused"][lin or "default"] = list(rows_fused(dt))  # the tree layers' fused ops under it
            for ddt in draft_dtypes:  # a cast changes the draft in place (EagleDraft.cast): each dtype casts a copy
                tag = (f"@{lin}" if len(linears) > 1 else "") + (f"%{ddt}" if len(draft_dtypes) > 1 else "") + ptag
                d = draft if ddt == "auto" else copy.deepcopy(draft)
                tb = {**base, "draft_dtype": ddt}
                run_variants(args, tag, loaded, tb, seg, d, prompt, tok_s, R, dt, dev, R["dense_tok_s" + ptag])
                if args.profile:
                    profile_step(tag, loaded, tb, seg, d, prompt, out)
        del dense, seg
    from specee_compile.plugins.triton_gemv import TUNED

    out["gemv_tuned"] = {str(k): v for k, v in TUNED.items()}
    print(json.dumps(R, indent=1))
    if args.out:
        from specee_compile.artifacts import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(out, indent=1))
    return 0


def real_model(args, dt: torch.dtype):
    """(loaded model on args.device in dt, its trained EAGLE draft, the chat prompt's ids) for --model."""
    from specee_compile.api import default_artifacts_dir, encode_prompt
    from specee_compile.draft.eagle import EagleDraft
    from specee_compile.errors import ArtifactError
    from specee_compile.models import load_model

    loaded = load_model(args.model, dtype=dt, device=args.device)
    directory = args.artifacts or default_artifacts_dir(loaded)
    if directory is None or not os.path.isfile(os.path.join(directory, "draft.safetensors")):
        raise ArtifactError(f"no draft head for {args.model}"
                            + (f" in {directory}" if directory else " shipped") + ": pass --artifacts DIR "
                            "(a directory with draft.safetensors, as `specee-compile train-draft` writes)")
    draft = EagleDraft.load(directory, loaded.model).requires_grad_(False).eval()
    return loaded, draft, encode_prompt(loaded.tokenizer, args.prompt)


def run_variants(args, tag, loaded, base, seg, draft, prompt, tok_s, R, dt, dev, dense_tok_s: float) -> None:
    """The timed variants (the fixed tree program with the draft compiled or eager) and their parts captured
    alone (the draft's expansion, the verification), into R[VARIANT + tag]."""
    from specee_compile.api import build_decoder
    from specee_compile.config import Settings
    from specee_compile.draft.eagle import EagleSource
    from specee_compile.ops import multi_row_kernel
    from specee_compile.runtime.policies import trace_accepts

    for variant, compiled_draft in (("tree_compiled", True), ("tree_eager_draft", False)):
        if variant not in args.variants.split(","):
            continue
        name = variant + tag
        t0 = time.time()
        dec = build_decoder(loaded, Settings(**base, speculate="tree", tree_program="fixed", tree_guard=False), segments=seg,
                            draft=EagleSource(draft, k=4), accept=trace_accepts([3]))
        dec.draft.compile = compiled_draft
        try:
            ts, r = tok_s(dec)
        except Exception as e:  # noqa: BLE001 - recorded, the other variants still run
            R[name] = {"error": repr(e)[:500]}
            print(name, R[name], flush=True)
            continue
        step_us = r.decode_s / r.verify_steps * 1e6
        f = dec.tree.fixed
        S = f.bucket(len(prompt) + 60)
        parts = {}
        with multi_row_kernel():  # as the program runs them (the rows kernels; cuBLAS outside it)
            g = seg.capture(lambda d=dec, f=f, S=S: d.draft.fixed_expand(f.g0, f.p, S, f.K, f.depth),
                            lambda f=f, S=S: f.p.fill_(S - f.margin - 1))
        parts["expand_us"] = round(call_time(g, 50, dev) * 1e6, 1)
        q = f.q
        h0 = torch.zeros(1, q, seg.spec.hidden, dtype=dt, device=dev)
        pos = torch.arange(q, device=dev) + 100
        mask = torch.ones(q, S, dtype=torch.bool, device=dev)

        def verify(f=f, S=S, h0=h0, pos=pos, mask=mask):
            h = h0
            for i in range(seg.spec.num_layers):
                h = f.layer(i, h, pos, S, pos, mask)
            f.head(h)

        with multi_row_kernel():
            g = seg.capture(verify, lambda: None)
        parts["verify_us"] = round(call_time(g, 50, dev) * 1e6, 1)
        seg.cache.reset()
        R[name] = {"tok_s": round(ts, 1), "vs_dense": round(ts / dense_tok_s, 3),
                   "accepted_per_step": round(r.accepted_per_step, 3), "step_us": round(step_us, 1),
                   "draft_mode": dec.draft.step_mode,
                   "setup_s": round(time.time() - t0, 1), **parts}
        print(name, R[name], flush=True)
        del dec


def call_time(run, reps: int, dev: torch.device) -> float:
    """Seconds per call of a captured part: CUDA events on the GPU (`replay_time`), the wall clock elsewhere."""
    if dev.type == "cuda":
        from specee_compile.backends.cuda_step import replay_time

        return replay_time(run, reps)
    run()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) / reps


def profile_step(tag, loaded, base, seg, draft, prompt, out) -> None:
    """The kernels of one fixed tree step, run eagerly (not replayed, but with the kernels the replay runs) under the
    profiler: the table, and GPU us and launches per step by category (`profile_categories`, or `profile_categories`
    + tag under a --linears A/B). On the CPU (a dry run) the ops' self CPU time stands in for the kernels'."""
    from torch.profiler import ProfilerActivity, profile

    from specee_compile.api import build_decoder
    from specee_compile.config import Settings
    from specee_compile.draft.eagle import EagleSource
    from specee_compile.ops import multi_row_kernel
    from specee_compile.runtime.policies import trace_accepts

    dec = build_decoder(loaded, Settings(**base, speculate="tree", tree_program="fixed", tree_guard=False), segments=seg,
                        draft=EagleSource(draft, k=4), accept=trace_accepts([3]))
    dec.generate(prompt)
    f = dec.tree.fixed
    S = f.bucket(len(prompt) + 60)
    gpu = f.p.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    # inside `multi_row_kernel` as the program is captured (`FixedTree.prepare`): the rows kernels the tuner picked,
    # not cuBLAS for every few-row matmul (session 32's profile, run outside it, showed cuBLAS's SIMT GEMMs instead)
    with multi_row_kernel():
        for _ in range(2):
            f.p.fill_(len(prompt) + 10)
            f.body(S)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                f.p.fill_(len(prompt) + 10)
                f.body(S)
            sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if gpu else "self_cpu_time_total", row_limit=50,
                                      max_name_column_width=70)
    print(table)
    out["profile" + tag] = table
    own = "self_device_time_total" if gpu else "self_cpu_time_total"
    kern = [(e.key, getattr(e, own), e.count) for e in prof.key_averages() if getattr(e, own) > 0]
    cats = kernel_categories(kern, steps=5)
    busy = sum(c["us_per_step"] for c in cats.values())
    unit = "GPU us" if gpu else "CPU us (self)"
    print(f"{tag or 'the tree step'}\n| category | {unit} per tree step | launches per step |\n|---|---|---|")
    for c, e in cats.items():
        print(f"| {c} | {e['us_per_step']} | {e['launches_per_step']} |")
    print(f"kernel time {busy:.1f} us per step (eager body under the profiler; the captured step's time is "
          "step_us above, the difference is launch gaps)")
    out["profile_categories" + tag] = cats
    seg.cache.reset()


if __name__ == "__main__":
    sys.exit(main())
