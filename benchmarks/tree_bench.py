"""Tree speculative decoding vs dense decode on real prompts, through the product API.

Per prompt (MT-Bench first turns, chat template, greedy) the configurations run back to back on the
same segments and cache (`api.build_decoder(..., segments=)`), so their speeds compare in one run:

    dense        one token per step
    tree         --speculate tree (EAGLE-2 draft tree from the shipped EAGLE head, one verify forward)
    tree+specee  (with --specee) tree + SpecEE lossless: exit predictors prune the tree at scheduled layers
    tree+approx  (with --approx)  tree + SpecEE approximate: verification stops at the path's exit layer
    tree(fixed)  (with --fixed)   the same tree as the fixed program (runtime/tree.py FixedTree)
    tree(int8)   (with --int8)    the default tree with the draft's weights in int8 (--draft-quant int8), and
                                  tree(fixed,int8) with --fixed too
    tree(D)      (with --draft-dtypes D,...) the default tree with its draft computing in D (--draft-dtype D), and
                                  tree(fixed,D) with --fixed too

Reported per configuration: decode tok/s (tokens after the first / decode time; the prefill is the
same dense pass for all), ratio to dense, `accepted_per_step` (tokens per verify step, bonus included),
`avg_layers` (layer passes per verify step), `avg_layer_rows`, mean tree nodes, and the share of
prompts whose output is identical to dense.

    python benchmarks/tree_bench.py                                  # CPU, 10 prompts, 128 tokens
    python benchmarks/tree_bench.py --device cuda --backend inductor --prompts 80 --specee
    python benchmarks/tree_bench.py --grid 8:4:4,16:5:6,24:6:8      # budget:depth:topk sweep
    python benchmarks/tree_bench.py --grid 6:4:2:L,2:2:2:N           # :L / :N prompt lookup on / off
    python benchmarks/tree_bench.py --grid 2:2:2:F0                  # :F<n> lookup first after n tokens (0 = off)

Writes benchmarks/results/<date>-tree-<cpu|gpu name>.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specee_compile.api import build_decoder, encode_prompt, load_model
from specee_compile.config import Settings
from specee_compile.data import mtbench_first_turns


def parse_grid(text: str) -> list[tuple[int, int, int, bool | None, int | None]]:
    """budget:depth:topk[:L|:N][:F<n>] items -> (budget, depth, topk, lookup, lookup_first); lookup None = the
    device's default (L on, N off); lookup_first None = the device's default (F0 = off, F3 = after a 3-gram)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        first = int(parts.pop()[1:]) if parts[-1].startswith("F") else None
        look = {"L": True, "N": False}[parts.pop()] if parts[-1] in ("L", "N") else None
        b, d, k = (int(x) for x in parts)
        out.append((b, d, k, look, first))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=10, help="first N MT-Bench first turns")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tree-budget", type=int, default=None, help="default: the device's (Settings.tree_shape)")
    ap.add_argument("--tree-depth", type=int, default=None)
    ap.add_argument("--tree-topk", type=int, default=None)
    ap.add_argument("--tree-lookup", action=argparse.BooleanOptionalAction, default=None,
                    help="the default tree's prompt lookup (default: the device's)")
    ap.add_argument("--tree-lookup-first", type=int, default=None, help="default: the device's")
    ap.add_argument("--grid", help="budget:depth:topk,... extra tree shapes to run (each its own config)")
    ap.add_argument("--specee", action="store_true", help="also tree + SpecEE lossless")
    ap.add_argument("--approx", action="store_true", help="also tree + SpecEE approximate")
    ap.add_argument("--fixed", action="store_true", help="also the default tree as the fixed program "
                    "(--tree-program fixed; `tree` is what auto picks on this device)")
    ap.add_argument("--int8", action="store_true", help="also the default tree with --draft-quant int8")
    ap.add_argument("--draft-dtypes", default="", help="comma list (float16, bfloat16): also the default tree with its "
                    "draft computing in each (--draft-dtype), and tree(fixed,DTYPE) with --fixed too")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--artifacts", help="artifact dir with the draft (+ predictors); default: shipped")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<date>-tree-<device>.json)")
    ap.add_argument("--accept-trace-out", help="also write the default tree's tokens per verify step, in order, "
                                               "as a JSON list: the input of `bench --accept-trace FILE`")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    base = Settings(max_new_tokens=args.max_new_tokens, device=args.device, backend=args.backend, dtype=args.dtype,
                    artifacts=args.artifacts)
    shapes = [(*base.replace(tree_budget=args.tree_budget, tree_depth=args.tree_depth,
                             tree_topk=args.tree_topk).tree_shape(), args.tree_lookup, args.tree_lookup_first)]
    shapes += parse_grid(args.grid) if args.grid else []
    configs: dict[str, Settings] = {"dense": base}
    for i, (b, d, k, look, first) in enumerate(shapes):
        tag = ("" if look is None else (":L" if look else ":N")) + ("" if first is None else f":F{first}")
        name = "tree" if i == 0 else f"tree[{b}:{d}:{k}{tag}]"
        if i == 0:  # the default tree: the fields given, the rest the runtime's default (it depends on the backend)
            b, d, k = args.tree_budget, args.tree_depth, args.tree_topk
        configs[name] = base.replace(speculate="tree", tree_budget=b, tree_depth=d, tree_topk=k, tree_lookup=look,
                                     tree_lookup_first=first)
    tree0 = configs["tree"]
    if args.specee:
        configs["tree+specee"] = tree0.replace(specee=True, mode="lossless", kv_policy="backfill")
    if args.approx:
        configs["tree+approx"] = tree0.replace(specee=True, mode="approximate", kv_policy="skip")
    if args.fixed:
        configs["tree(fixed)"] = tree0.replace(tree_program="fixed")
    if args.int8:  # build_decoder loads the draft afresh per decoder: only these quantize theirs
        configs["tree(int8)"] = tree0.replace(draft_quant="int8")
        if args.fixed:
            configs["tree(fixed,int8)"] = tree0.replace(tree_program="fixed", draft_quant="int8")
    for dt in [v for v in args.draft_dtypes.split(",") if v]:  # each decoder casts its own draft, loaded afresh
        configs[f"tree({dt})"] = tree0.replace(draft_dtype=dt)
        if args.fixed:
            configs[f"tree(fixed,{dt})"] = tree0.replace(tree_program="fixed", draft_dtype=dt)

    seg = None
    decoders = {}
    for name, s in configs.items():
        dec = build_decoder(loaded, s, segments=seg)
        seg = dec.seg
        decoders[name] = dec
    prompts = mtbench_first_turns()[: args.prompts]

    rows = {name: [] for name in configs}
    trace: list[int] = []  # the default tree's tokens per verify step (--accept-trace-out)
    # warm-up: two prompts of different lengths (attention buckets), so a compiled backend has compiled
    # its static and its dynamic-shape code before anything is timed
    warm = [encode_prompt(loaded.tokenizer, "Hello!"),
            encode_prompt(loaded.tokenizer, " ".join(mtbench_first_turns()[-3:]))]
    for dec in decoders.values():
        dec.s = dec.s.replace(max_new_tokens=12)
        for ids in warm:
            dec.generate(ids)
        dec.s = dec.s.replace(max_new_tokens=args.max_new_tokens)
    t_all = time.time()
    for i, text in enumerate(prompts):
        ids = encode_prompt(loaded.tokenizer, text)
        ref = None
        for name, dec in decoders.items():
            res = dec.generate(ids)
            st = res.stats()
            if name == "dense":
                ref = res.token_ids
            if name == "tree":
                trace += dec.tree.accepted_log
            rows[name].append({
                "prompt": i,
                "tokens": len(res.token_ids),
                "decode_s": res.decode_s,
                "prefill_s": res.prefill_s,
                "identical": res.token_ids == ref,
                "first_divergence": next((j for j, (a, b_) in enumerate(zip(res.token_ids, ref)) if a != b_),
                                         None if len(res.token_ids) == len(ref) else min(len(ref), len(res.token_ids))),
                "verify_steps": st["verify_steps"],
                "accepted_per_step": st["accepted_per_step"],
                "avg_layers": st["avg_layers"],
                "avg_layer_rows": st["avg_layer_rows"],
                "avg_tree_nodes": st["avg_tree_nodes"],
                "decode_steps": res.decode_steps,
            })
        line = " ".join(f"{n}={rows[n][-1]['tokens'] - 1}/{rows[n][-1]['decode_s']:.1f}s" for n in rows)
        print(f"prompt {i}: {line}", file=sys.stderr, flush=True)

    summary = {}
    for name, rs in rows.items():
        toks = sum(r["tokens"] - 1 for r in rs)  # the first token comes from the prefill
        secs = sum(r["decode_s"] for r in rs)
        steps = sum(r["decode_steps"] for r in rs)
        summary[name] = {
            "decode_tok_s": toks / secs if secs else 0.0,
            "decode_tokens": toks,
            "decode_s": secs,
            "identical": sum(r["identical"] for r in rs),
            "prompts": len(rs),
            "accepted_per_step": toks / steps if steps else None,
            "avg_layers": sum(r["avg_layers"] * r["decode_steps"] for r in rs) / steps if steps else None,
            "avg_layer_rows": sum(r["avg_layer_rows"] * r["decode_steps"] for r in rs) / steps if steps else None,
            "avg_tree_nodes": (sum((r["avg_tree_nodes"] or 0) * r["decode_steps"] for r in rs) / steps
                               if steps and name != "dense" else None),
        }
    dense_rate = summary["dense"]["decode_tok_s"]
    for name, s in summary.items():
        s["vs_dense"] = s["decode_tok_s"] / dense_rate if dense_rate else None

    on_cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name().lower().replace(" ", "-") if on_cuda else "cpu"
    date = datetime.date.today().isoformat()
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    record = {
        "date": date,
        "machine": card if on_cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "command": "python benchmarks/tree_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit,
        "torch": torch.__version__,
        "model": args.model,
        "device": args.device,
        "backend": args.backend,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "tree": {name: {"budget": decoders[name].tree.budget, "depth": decoders[name].tree.depth,
                        "topk": decoders[name].tree.topk, "lookup": s.tree_lookup_on(),
                        "lookup_first": s.tree_lookup_first_n(), "draft_quant": s.draft_quant,
                        "draft_dtype": s.draft_dtype}
                 for name, s in configs.items() if s.speculate == "tree"},
        "gemm": getattr(decoders["dense"].seg, "gemm", None),
        "wall_s": time.time() - t_all,
        "summary": summary,
        "results": {
            "smollm2_tree_ratio": summary["tree"]["vs_dense"],
            "smollm2_tree_accepted": summary["tree"]["accepted_per_step"],
            **({"smollm2_tree_specee_vs_tree": summary["tree+specee"]["decode_tok_s"] / summary["tree"]["decode_tok_s"]}
               if "tree+specee" in summary else {}),
        },
        "per_prompt": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{date}-tree-{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    if args.accept_trace_out:
        Path(args.accept_trace_out).write_text(json.dumps(trace) + "\n")
        print(f"wrote {args.accept_trace_out}: {len(trace)} verify steps, mean {sum(trace) / max(1, len(trace)):.3f}",
              file=sys.stderr)

    print(f"\n{args.model}, {record['machine']}, {args.backend}, {args.dtype}, {len(prompts)} MT-Bench prompts x "
          f"{args.max_new_tokens} tokens, greedy; commit {commit}\n")
    print("| config | decode tok/s | vs dense | accepted / step | avg layers | layer-rows / step | tree nodes "
          "| identical to dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        acc = f"{s['accepted_per_step']:.2f}" if name != "dense" else "1"
        nodes = f"{s['avg_tree_nodes']:.1f}" if s["avg_tree_nodes"] is not None else "-"
        print(f"| {name} | {s['decode_tok_s']:.2f} | {s['vs_dense']:.2f}x | {acc} | {s['avg_layers']:.2f} | "
              f"{s['avg_layer_rows']:.1f} | {nodes} | {s['identical']}/{s['prompts']} |")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
