"""C++ runner vs the Python runtime: decode tok/s on the same model, SpecEE artifacts and mode.

    python benchmarks/cpp_bench.py                      # SmolLM2, CPU, dense + paper + lossless
    python benchmarks/cpp_bench.py --device cuda --py-backend inductor --model smollm2.gguf   # the GPU box
    python benchmarks/cpp_bench.py --device cuda --py-backend inductor --random-weights --modes dense  # no GGUF
    python benchmarks/cpp_bench.py --plot "before=A.json" "after=B.json" --out cpp.png   # --json records, plotted

Exports `smollm2-135m` with `--format aoti` (or reuses --export DIR), then per mode and prompt runs the
Python runtime (`api.build_decoder`, --py-backend, default eager) and the C++ runner (`--backend cpp`),
each once to warm up and then timed; checks that token ids and exit layers agree; prints a Markdown
table (decode tok/s = decode steps / decode seconds, as GenerationResult.stats()). A client of the
product: it imports the API and the cpp backend, nothing else.

Same mode = same exit program: in the SpecEE modes the runner gets the Python runtime's measured step
costs (`--step-costs`), so both keep the same exit points (where none pays, both decode as dense). On
CUDA the runner's dense steps replay captured graphs; `--no-cuda-graphs` is timed beside it there.

On CUDA with `--py-backend inductor` the dense step's parts (whole step, one layer, the layer chain, the
head) are timed on both sides. `SPECEE_PROFILE_DIR=DIR` adds each part's kernels over 10 replays
(`<side>_<part>_kernels.json`: {name: [launches, device us]}, the runner's from the CUDA profiler it links)
and prints the chain's table: a chain's replay time minus its kernels' device time is idle time.
PDL: both sides follow `SPECEE_PDL` (the default: `all` on sm_90+): the Python step launches with it, the packages are
exported with PDL's waits (plugins/pdl.py `package_mode`) and the runner makes its captured step's edges into them
programmatic; the header line says both sides' modes and the edges changed.
`SPECEE_GRAPH_ATTRS=DIR` writes the chain's kernel nodes with their launch and function attributes on both
sides (`<side>_layers_attrs.json`, `graph_census.py`) and prints where they differ.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specee_compile.api import build_decoder, default_artifacts_dir, encode_prompt, eos_ids, load_program
from specee_compile.backends.aoti_export import export_aoti_dir
from specee_compile.backends.cpp_runner import build_runner, run_runner
from specee_compile.config import Settings
from specee_compile.models import load_model

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain why the sky is blue in two sentences."]
MODES = {"dense": {}, "paper": {"specee": True},
         "lossless": {"specee": True, "mode": "lossless", "kv_policy": "backfill"}}


def plot_records(specs: list[str], out: str) -> None:
    """`--plot LABEL=RECORD ...`: decode tok/s of both sides per record (a `--json` file), one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specee_compile.artifacts import atomic_file

    recs = []
    for spec in specs:
        label, _, path = spec.rpartition("=")
        runs = [r for r in json.loads(Path(path).read_text()) if r.get("mode") in MODES]
        recs.append((label or Path(path).stem, runs))
    modes = [m for m in MODES if any(r["mode"] == m for _, runs in recs for r in runs)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for j, side in enumerate(("python", "cpp")):
            vals = [statistics.mean(r[side]["decode_tokens_per_s"] for r in runs if r["mode"] == mode)
                    for _, runs in recs]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(recs))]
            bars = ax.bar(xs, vals, width=0.38, color=f"C{j}", label={"python": "Python runtime", "cpp": "C++ runner"}[side])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(recs)), [label for label, _ in recs], fontsize=7, rotation=15)
        ax.set_title(mode)
    axes[0][0].set_ylabel("decode tok/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--plot" in argv:  # no model: plot --json records
        pp = argparse.ArgumentParser(description="plot cpp_bench --json records")
        pp.add_argument("--plot", nargs="+", required=True, metavar="LABEL=RECORD")
        pp.add_argument("--out", required=True, help="PNG path")
        pa = pp.parse_args(argv)
        plot_records(pa.plot, pa.out)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true",
                    help="a random-weight Llama of SmolLM2-135M's shapes (fp32, word-level tokenizer) instead of "
                         "--model: the GPU timing without the GGUF (dense mode only: no artifacts fit it)")
    ap.add_argument("--export", help="an existing --format aoti export of the model (default: export to --out)")
    ap.add_argument("--out", default="exported/smollm2-135m-aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--py-backend", default="eager", help="the Python runtime's backend (eager | inductor)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, both sides")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="write the raw figures here")
    ap.add_argument("--commit", help="the commit to record (default: git HEAD)")
    ap.add_argument("--artifacts", help="SpecEE artifacts (default: the model's shipped ones; give them for a "
                                        "model loaded from a path, e.g. a .gguf of SmolLM2)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for var in ("SPECEE_PROFILE_DIR", "SPECEE_GRAPH_ATTRS", "SPECEE_GRAPH_DUMP"):  # both sides write there
        if os.environ.get(var):
            Path(os.environ[var]).mkdir(parents=True, exist_ok=True)

    exits = any(MODES[m] for m in a.modes.split(","))  # dense only: no artifacts, no exit or draft package
    if a.random_weights:
        if exits:
            raise SystemExit("--random-weights times dense only: pass --modes dense")
        from tree_gpu_profile import SMOL  # this directory's GPU tree profile: SmolLM2-135M's shapes

        from specee_compile.eval.gpu_bench import write_random_model

        scratch = tempfile.TemporaryDirectory(prefix="specee-random-model-")  # removed when main returns or raises
        a.model = scratch.name
        write_random_model(dict(SMOL), torch.float32, torch.device(a.device), a.model)
    loaded = load_model(a.model)
    arts = a.artifacts or default_artifacts_dir(loaded)
    if arts is None and exits:
        raise SystemExit(f"{a.model} has no shipped SpecEE artifacts; pass --artifacts DIR (or --modes dense)")
    s0 = Settings(specee=exits, max_context=a.max_context, device=a.device, artifacts=str(arts) if exits else None)
    directory = Path(a.export) if a.export else Path(a.out)
    if not a.export:
        program = draft = None  # dense only: ~75 s less on the H200
        if exits:
            program, src, _, _ = load_program(arts, loaded, s0)
            draft = src.draft
        t0 = time.perf_counter()
        export_aoti_dir(loaded.model, program, directory, s0, draft, model_name=loaded.name,
                        fingerprint=loaded.fingerprint, device=a.device, eos_ids=eos_ids(loaded),
                        tokenizer=loaded.tokenizer, force=True)
        print(f"exported {directory} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        loaded = load_model(a.model)  # export moved the weights; start the Python side from a fresh copy
    build_runner()
    commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    rows, raw, dense_seg = [], [], None
    for mode in a.modes.split(","):
        s = Settings(max_new_tokens=a.max_new_tokens, max_context=a.max_context, device=a.device,
                     backend=a.py_backend, artifacts=str(arts) if MODES[mode] else None, **MODES[mode])
        dec = build_decoder(loaded, s)
        if mode == "dense":
            dense_seg = dec.seg  # its captured dense step: the parts below time it
        py_tps, cc_tps, nog_tps, same, layers = [], [], [], 0, []
        cuda = a.device.startswith("cuda")
        for prompt in PROMPTS:
            ids = encode_prompt(loaded.tokenizer, prompt)
            dec.generate(ids)  # warm-up (compiles, caches)
            ref = dec.generate(ids)
            extra = ("--repeat", "2", "--no-verify") + (("--time-parts",) if mode == "dense" else ())
            costs = (ref.exit_program or {}).get("step_costs") if s.specee else None
            if costs:
                extra += ("--step-costs", ",".join(f"{k}={costs[k]!r}" for k in
                                                  ("layer_us", "decision_us", "draft_us", "check_us", "row_us")))
            got = run_runner(directory, ids, s, extra=extra)
            if cuda:
                nog = run_runner(directory, ids, s, extra=extra + ("--no-cuda-graphs",))
                nog_tps.append(nog["decode_tokens_per_s"])
            py_tps.append(ref.decode_steps / ref.decode_s)
            cc_tps.append(got["decode_tokens_per_s"])
            same += got["token_ids"] == ref.token_ids and got["exit_layers"] == ref.exit_layers
            layers.append(ref.avg_layers)
            raw.append({"mode": mode, "prompt": prompt, "python": ref.stats(), "cpp": got,
                        **({"cpp_no_graphs": nog} if cuda else {})})
        py, cc = statistics.mean(py_tps), statistics.mean(cc_tps)
        # the captured step's own device time against the loop's time per token (what the loop adds)
        step_us = statistics.mean(r["cpp"].get("graph_step_us", 0.0) for r in raw if r["mode"] == mode)
        nog_col = f" {statistics.mean(nog_tps):.1f} | {step_us:.0f} / {1e6 / cc:.0f} |" if cuda else ""
        rows.append(f"| {mode} | {statistics.mean(layers):.2f} | {py:.1f} | {cc:.1f} |{nog_col} {cc / py:.2f}x | "
                    f"{same}/{len(PROMPTS)} |")
    cuda = a.device.startswith("cuda")
    pdl_note = ""
    if cuda:  # PDL on each side: the Python step's mode, the packages' (`all` where exported under it)
        from specee_compile.artifacts import read_manifest
        from specee_compile.plugins import pdl

        edges = sorted({r["cpp"].get("pdl_edges", 0) for r in raw if "cpp" in r})
        pdl_note = (f", PDL: Python {pdl.mode()}, packages {read_manifest(directory)['cpp'].get('pdl', '0')} "
                    f"({'/'.join(map(str, edges))} programmatic edges per captured step)")
    print(f"\n{a.model}, device {a.device}, {a.threads} thread(s), Python backend {a.py_backend}, "
          f"max_new_tokens {a.max_new_tokens}, {len(PROMPTS)} prompts, commit {commit}{pdl_note}\n")
    print("| mode | avg layers | Python decode tok/s | C++ decode tok/s |"
          + (" C++ without graphs | C++ graph step / loop, us per token |" if cuda else "")
          + " C++/Python | identical ids + exits |")
    print("|---|---|---|---|---|---|" + ("---|---|" if cuda else ""))
    print("\n".join(rows))
    dense = [r["cpp"] for r in raw if r["mode"] == "dense"]
    if cuda and a.py_backend == "inductor" and dense and dense[0].get("graph_layer_us"):
        py = python_parts(dense_seg)
        cc = {k: statistics.mean(r.get(f"graph_{k}", 0.0) for r in dense)
              for k in ("step_us", "step_one_us", "layer_us", "layers_us", "head_us", "layers_same_us",
                        "layers_w0_us", "layers_c0_us", "layers_wclone_us", "layers_wkernel_us", "layers_wpack_us")}
        print(f"\nthe dense step's parts at S={py['S']}, each captured alone, us per replay (C++ / Python): whole step "
              f"{cc['step_us']:.1f} / {py['step_us']:.1f} (two instances alternating), {cc['step_one_us']:.1f} / "
              f"{py['step_one_us']:.1f} (one instance); the {py['L']}-layer chain {cc['layers_us']:.1f} / "
              f"{py['layers_us']:.1f}; one layer call {cc['layer_us']:.2f} / {py['layer_us']:.2f}; head "
              f"{cc['head_us']:.2f} / {py['head_us']:.2f}; layer 0's call {py['L']} times in a chain "
              f"{cc['layers_same_us']:.1f} / {py['layers_same_us']:.1f}; C++ only: the chain on layer 0's weights "
              f"{cc['layers_w0_us']:.1f}, on layer 0's cache {cc['layers_c0_us']:.1f}; on copies of the weights: "
              f"cloned {cc['layers_wclone_us']:.1f}, written by a kernel {cc['layers_wkernel_us']:.1f}, packed in "
              f"one allocation {cc['layers_wpack_us']:.1f}")
        raw.append({"mode": "parts", "python": py, "cpp": cc})
        if os.environ.get("SPECEE_PROFILE_DIR"):
            print("\n" + kernel_table(Path(os.environ["SPECEE_PROFILE_DIR"])))
            for part in ("layers_same", "layers_w0", "layers_c0", "layers_wclone", "layers_wkernel", "layers_wpack"):
                print("\n" + kernel_table(Path(os.environ["SPECEE_PROFILE_DIR"]), part))
        if os.environ.get("SPECEE_GRAPH_ATTRS"):
            print("\n" + attrs_table(Path(os.environ["SPECEE_GRAPH_ATTRS"])))
    if cuda:  # the GEMV configs both sides ran: the Python op's tuned picks and the package's whole-K twins
        from specee_compile.plugins import triton_gemv as G

        raw.append({"mode": "gemv_configs", "python": {str(k): v for k, v in G.PICKED.items()},
                    "package": {str(k): G._aoti_config(k) for k in G.PICKED}})
        print("\nGEMV configs (N, K, prologue): Python pick / package twin: " + "; ".join(
            f"{k}: {','.join(map(str, v))} / {','.join(map(str, G._aoti_config(k)))}" for k, v in G.PICKED.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1) + "\n")
    return 0


def attrs_table(directory: Path) -> str:
    """The chain's kernel nodes, C++ against Python, where their attributes differ (`graph_census.attr_diff`)."""
    from graph_census import attr_diff

    sides = [directory / f"{side}_layers_attrs.json" for side in ("cpp", "python")]
    if not all(f.exists() for f in sides):
        return f"(no node attributes: {', '.join(f.name for f in sides if not f.exists())} missing)"
    rows = attr_diff(*(json.loads(f.read_text()) for f in sides))
    return ("| chain: kernel | field | C++ | Python |\n|---|---|---|---|\n" + "\n".join(rows) if rows
            else "the chain's kernel nodes: the same attributes on both sides")


def warm_clocks(run, seconds: float = 0.2) -> None:
    """Calls `run` for `seconds` before a timing, as the runner does: a card that idled runs its first
    milliseconds of work at lower clocks, and a part's timing window is that short."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        torch.cuda.synchronize()


def python_parts(seg) -> dict:
    """The Python CUDA step's parts at the first attention length, timed as the C++ runner times its own
    (`graph_step_us`, `graph_step_one_us`, `graph_layer_us`, `graph_layers_us`, `graph_head_us`,
    `graph_layers_same_us`): the whole dense step's graph (its two instances alternating, as the loop replays
    them, and one instance), and one layer call, the L-layer chain, the head and layer 0's call L times in a
    chain, each captured alone, replayed back to back."""
    from specee_compile.backends.cuda_step import replay_time

    S, L = seg.attn_len(0), seg.spec.num_layers
    whole = seg._whole()
    pair = itertools.cycle(whole.graphs[(("dense",), S)])
    warm_clocks(lambda: whole._time(("dense",), S, frozenset(), None, reps=3))
    out = {"S": S, "L": L, "step_one_us": whole._time(("dense",), S, frozenset(), None) * 1e6}
    out["step_us"] = replay_time(lambda: next(pair).replay(), 20) * 1e6
    h = seg.embed(torch.zeros(1, dtype=torch.long, device=seg.device)).view(1, 1, -1)
    pos = torch.tensor([S - 1], device=seg.device)

    dump = os.environ.get("SPECEE_GRAPH_DUMP")  # DIR: each part's graph as a DOT file (cudaGraphDebugDotPrint)
    attrs = os.environ.get("SPECEE_GRAPH_ATTRS")  # DIR: the chain's kernel nodes with their attributes (JSON)

    def chain(same: bool = False):  # same: layer 0's call L times (the same weights and cache every call)
        x = h
        for i in range(L):
            x = seg.layer_direct(0 if same else i, x, pos, S)

    for name, fn in (("layer_us", lambda: seg.layer_direct(0, h, pos, S)), ("layers_us", chain),
                     ("head_us", lambda: seg.head_direct(h)), ("layers_same_us", lambda: chain(same=True))):
        fn()
        torch.cuda.synchronize()
        census = bool(attrs) and name == "layers_us"
        g = torch.cuda.CUDAGraph(keep_graph=bool(dump) or census)  # a kept graph can be printed and read
        with torch.cuda.graph(g):
            fn()
        if dump:  # beside the runner's cpp_<part>.dot
            g.debug_dump(os.path.join(dump, f"python_{name.removesuffix('_us')}.dot"))
        if census:  # beside the runner's cpp_layers_attrs.json
            from graph_census import kernel_nodes

            Path(attrs, "python_layers_attrs.json").write_text(json.dumps(kernel_nodes(g.raw_cuda_graph())) + "\n")
        warm_clocks(g.replay)
        out[name] = replay_time(g.replay, 20) * 1e6
        if os.environ.get("SPECEE_PROFILE_DIR"):
            profile_kernels(Path(os.environ["SPECEE_PROFILE_DIR"]) / f"python_{name.removesuffix('_us')}_kernels.json",
                            g.replay)
    seg.cache.reset()
    return out


def profile_kernels(path: Path, replay) -> None:
    """A part's kernels over 10 replays (torch.profiler) as the runner writes its own (SPECEE_PROFILE_DIR):
    {kernel name: [launches, device us in all]}, and beside it `..._timeline.json`: [[kernel name, start us,
    end us], ...] in start order, from the first kernel's start (`gap_table` reads it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            replay()
        torch.cuda.synchronize()
    path.write_text(json.dumps({e.key: [e.count, e.device_time_total] for e in prof.key_averages()
                                if e.device_time_total > 0}, indent=0) + "\n")
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    t0 = spans[0][0] if spans else 0
    timeline = [[name, start - t0, end - t0] for start, end, name in spans]
    path.with_name(path.name.replace("_kernels.json", "_timeline.json")).write_text(json.dumps(timeline) + "\n")


def gap_table(timeline: list, replays: int = 10, top: int = 8) -> list[tuple[str, int, float]]:
    """Idle time between consecutive kernels of a part's timeline ([[name, start us, end us], ...] in start
    order), by the pair of kernels around each gap: [("prev -> next", gaps per replay, idle us per replay)],
    the largest first. A kernel that starts before its predecessor ends adds no gap (overlap counts 0)."""
    pairs: dict[str, list] = {}
    for (a, _, a_end), (b, b_start, _) in itertools.pairwise(timeline):
        slot = pairs.setdefault(f"{a[:40]} -> {b[:40]}", [0, 0.0])
        slot[0] += 1
        slot[1] += max(0.0, b_start - a_end)
    rows = [(k, round(n / replays), idle / replays) for k, (n, idle) in pairs.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]


def kernel_table(directory: Path, part: str = "layers") -> str:
    """The part's kernels on both sides (SPECEE_PROFILE_DIR's files), us per launch, the costliest first."""
    sides = {}
    for side in ("cpp", "python"):
        f = directory / f"{side}_{part}_kernels.json"
        sides[side] = json.loads(f.read_text()) if f.exists() else {}
    lines = [f"| {part}: kernel | side | launches per replay | device us per launch | us per replay |",
             "|---|---|---|---|---|"]
    for side, ks in sides.items():
        for name, (n, total) in sorted(ks.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {name[:60]} | {side} | {n / 10:g} | {total / n:.2f} | {total / 10:.1f} |")
    lines += ["", f"| {part}: idle before a kernel, after | side | gaps per replay | idle us per replay |",
              "|---|---|---|---|"]
    for side in sides:
        f = directory / f"{side}_{part}_timeline.json"
        if f.exists():
            for pair, n, idle in gap_table(json.loads(f.read_text())):
                lines.append(f"| {pair} | {side} | {n} | {idle:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
