"""Verify lossless modes on real prompts: every output must equal dense greedy, token for token.

Runs `specee-compile eval` (dense + the --configs, default lossless; all 80 MT-Bench first turns x 128 new
tokens and --squad SQuAD v2 questions x 32) unless --from-json points at an existing eval.json, then fails
(exit 1) on any differing output.

    python benchmarks/verify_lossless.py                 # ~25 min on a 2-core CPU
    python benchmarks/verify_lossless.py --configs tree,tree_lossless --squad 100   # the greedy tree
    python benchmarks/verify_lossless.py --from-json benchmarks/results/eval/eval.json
"""

import argparse
import json
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--from-json")
ap.add_argument("--out", default="benchmarks/results/verify_lossless")
ap.add_argument("--configs", default="lossless", help="eval configs that must equal dense greedy")
ap.add_argument("--mtbench", type=int, default=80)
ap.add_argument("--squad", type=int, default=0)
args = ap.parse_args()
path = args.from_json
if path is None:
    subprocess.check_call(["specee-compile", "eval", args.model, "--configs", args.configs, "--mtbench",
                           str(args.mtbench), "--squad", str(args.squad), "--out", args.out])
    path = f"{args.out}/eval.json"
summaries = json.load(open(path))["summary"]
missing = [n for n in args.configs.split(",") if n not in summaries]
if missing:
    print(f"verify_lossless: {path} has no results for {', '.join(missing)} (it has {', '.join(summaries)}); "
          "pass --configs with those, or run without --from-json", file=sys.stderr)
    sys.exit(2)
bad = {}
for name in args.configs.split(","):
    for suite, s in summaries[name].items():
        print(f"{name} {suite}: {s['prompts']} prompts, identical {s['identical_pct']:.1f}%, avg layers "
              f"{s['avg_layers']:.2f}, tokens/step {s.get('tokens_per_step', 1.0):.2f}, rollbacks/100 tok "
              f"{s['rollbacks_per_100_tokens']:.2f}")
        if s["identical_pct"] < 100.0:
            bad[f"{name}/{suite}"] = s["identical_pct"]
if bad:
    print(f"FAIL: outputs differ from dense greedy: {bad}")
    sys.exit(1)
print(f"OK: {args.configs} == dense greedy on every prompt")
