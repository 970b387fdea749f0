"""Verify lossless mode on real prompts: every output must equal dense greedy, token for token.

Runs `specee-compile eval` (dense + lossless, all 80 MT-Bench first turns, 128 new tokens) unless
--from-json points at an existing eval.json, then fails (exit 1) on any differing output.

    python benchmarks/verify_lossless.py                 # ~25 min on a 2-core CPU
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
args = ap.parse_args()
path = args.from_json
if path is None:
    subprocess.check_call(["specee-compile", "eval", args.model, "--configs", "lossless", "--mtbench", "80",
                           "--squad", "0", "--out", args.out])
    path = f"{args.out}/eval.json"
summary = json.load(open(path))["summary"]["lossless"]
bad = {suite: s["identical_pct"] for suite, s in summary.items() if s["identical_pct"] < 100.0}
for suite, s in summary.items():
    print(f"{suite}: {s['prompts']} prompts, identical {s['identical_pct']:.1f}%, avg layers {s['avg_layers']:.2f}, "
          f"rollbacks/100 tok {s['rollbacks_per_100_tokens']:.2f}")
if bad:
    print(f"FAIL: lossless outputs differ from dense greedy: {bad}")
    sys.exit(1)
print("OK: lossless == dense greedy on every prompt")
