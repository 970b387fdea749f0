"""SmolLM2-135M with its shipped artifacts on one GPU: dense compiled vs SpecEE compiled.

Inductor segments with CUDA graphs (the `inductor` backend), greedy, MT-Bench first turns. For every
prompt each configuration runs back to back (dense first), so speeds compare as ratios under the
same conditions. Reports decode tok/s, average executed layers (layer passes per step), token
agreement with dense greedy, rollbacks; checks that inductor == eager tokens on the first prompt.

    python benchmarks/gpu_smollm2.py --model PATH.gguf|smollm2-135m --prompts prompts.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch

from specee_compile.api import build_decoder, encode_prompt
from specee_compile.config import Settings
from specee_compile.eval.accuracy import agreement
from specee_compile.models import load_model

CONFIGS = {
    "dense": dict(specee=False),
    "paper": dict(specee=True, mode="approximate", kv_policy="skip"),
    "lossless": dict(specee=True, mode="lossless", kv_policy="backfill"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifacts", default=None)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true", help="cProfile one paper-mode generate (host time by function)")
    args = ap.parse_args()

    t0 = time.time()
    loaded = load_model(args.model)  # fp32 on the host: the fingerprint the artifacts were made for
    load_s = time.time() - t0
    prompts = [encode_prompt(loaded.tokenizer, p) for p in json.load(open(args.prompts))[: args.n]]
    base = dict(device=args.device, dtype=args.dtype, backend="inductor", max_context=1024, max_new_tokens=args.new,
                artifacts=args.artifacts)
    decs, shared = {}, None
    t0 = time.time()
    for name, over in CONFIGS.items():
        decs[name] = build_decoder(loaded, Settings(**base, **over), segments=shared)
        shared = shared or decs[name].seg
    for dec in decs.values():  # warm-up: compiles + CUDA graph captures for the buckets used
        dec.generate(prompts[0])
    compile_s = time.time() - t0

    # parity: the inductor backend against the eager backend on the same artifacts
    eager = build_decoder(loaded, Settings(**{**base, "backend": "eager"}, **CONFIGS["paper"]))
    parity = eager.generate(prompts[0]).token_ids == decs["paper"].generate(prompts[0]).token_ids

    prof_top = None
    if args.profile:  # where a SpecEE step's host time goes (launches, syncs, draft, scheduler)
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        decs["paper"].generate(prompts[1 % len(prompts)])
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        prof_top = buf.getvalue()
        print(prof_top)

    recs = {name: [] for name in CONFIGS}
    for ids in prompts:
        for name, dec in decs.items():
            recs[name].append(dec.generate(ids))
    out = {"card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"), "model": loaded.name,
           "fingerprint": loaded.fingerprint, "dtype": args.dtype, "prompts": len(prompts), "new_tokens": args.new,
           "load_s": round(load_s, 1), "compile_and_capture_s": round(compile_s, 1),
           "inductor_equals_eager_paper_tokens": parity, "segments": shared.compile_stats() if hasattr(shared, "compile_stats") else None,
           "commit": os.environ.get("COMMIT") or _git(), "results": {}}
    dense_tok = [r.token_ids for r in recs["dense"]]
    for name, rs in recs.items():
        steps = sum(r.decode_steps for r in rs)
        out["results"][name] = {
            "decode_tok_s": steps / sum(r.decode_s for r in rs),
            "decode_tok_s_median_prompt": statistics.median(r.decode_steps / r.decode_s for r in rs),
            "avg_layers": sum(r.layer_passes for r in rs) / steps,
            "avg_layer_rows": sum(r.layer_rows for r in rs) / steps,
            "rollbacks": sum(r.rollbacks for r in rs),
            **agreement(dense_tok, [r.token_ids for r in rs]),
        }
    d = out["results"]["dense"]["decode_tok_s"]
    for r in out["results"].values():
        r["speed_vs_dense"] = r["decode_tok_s"] / d
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_smollm2.json"), "w") as f:
        json.dump(out, f, indent=1)
    if prof_top:
        with open(os.path.join(args.out, "gpu_smollm2_profile.txt"), "w") as f:
            f.write(prof_top)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))
    print("| config | decode tok/s | vs dense | avg layers | identical % | mean 1st div | rollbacks |")
    for name, r in out["results"].items():
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['speed_vs_dense']:.3f} | {r['avg_layers']:.2f} | "
              f"{r['identical_pct']:.1f} | {r['mean_first_divergence']:.1f} | {r['rollbacks']} |")


def _git() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
