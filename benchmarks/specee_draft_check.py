"""SpecEE (no tree) with two artifact directories that differ only in their draft head (or one directory, B
with its draft quantized: --b-draft-quant int8): exits and speed.

The exit predictors' features include the draft candidates' logits, so a new head changes what the
(unchanged) predictors see. Per MT-Bench first turn (every 4th, chat template, greedy) and per
directory, `generate --specee` in approximate and lossless mode, plus dense once: avg layers, exits per
token, decode tok/s, tokens identical to dense.

    python benchmarks/specee_draft_check.py --a specee_compile/shipped/smollm2-135m --b /tmp/candidate \\
        --prompts 8 --max-new-tokens 64 --threads 1 --out FILE
    python benchmarks/specee_draft_check.py --a specee_compile/shipped/smollm2-135m --b-draft-quant int8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specee_compile.api import build_decoder, encode_prompt, load_model  # noqa: E402
from specee_compile.config import Settings  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="artifact dir A (e.g. the shipped one)")
    ap.add_argument("--b", default=None, help="artifact dir B (the same predictors, another draft; default: A)")
    ap.add_argument("--b-draft-quant", default="none", choices=("none", "int8"),
                    help="B's draft weights (Settings.draft_quant)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts-json", default=str(ROOT / ".carry" / "draft" / "prompts.json"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-exit-cost-check", action="store_true",
                    help="keep every exit point (Settings.exit_cost_check=False): the predictors' own behaviour")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    args.b = args.b or args.a
    torch.set_num_threads(args.threads)
    prompts = json.loads(Path(args.prompts_json).read_text())[::4][: args.prompts]
    loaded = load_model(args.model, dtype="float32", device="cpu")
    base = Settings(max_new_tokens=args.max_new_tokens, exit_cost_check=not args.no_exit_cost_check)
    decs, seg = {}, None
    decs["dense"] = build_decoder(loaded, base)
    seg = decs["dense"].seg
    for tag, d, quant in (("A", args.a, "none"), ("B", args.b, args.b_draft_quant)):
        spec = base.replace(specee=True, artifacts=d, draft_quant=quant)
        decs[f"{tag}-approximate"] = build_decoder(loaded, spec, segments=seg)
        decs[f"{tag}-lossless"] = build_decoder(loaded, spec.replace(mode="lossless", kv_policy="backfill"),
                                                segments=seg)
    acc = {n: {"tokens": 0, "decode_s": 0.0, "layer_passes": 0.0, "steps": 0, "exits": 0, "identical": 0,
               "rollbacks": 0} for n in decs}
    for i, text in enumerate(prompts):
        ids = encode_prompt(loaded.tokenizer, text)
        names = list(decs) if i % 2 == 0 else [list(decs)[0]] + list(reversed(list(decs)[1:]))
        ref = None
        outs = {}
        for n in names:
            res = decs[n].generate(ids)
            outs[n] = res
            if n == "dense":
                ref = res.token_ids
        for n, res in outs.items():
            st = res.stats()
            a = acc[n]
            a["tokens"] += len(res.token_ids) - 1
            a["decode_s"] += res.decode_s
            a["layer_passes"] += (st["avg_layers"] or 0) * res.decode_steps
            a["steps"] += res.decode_steps
            hist = st.get("exit_histogram") or {}
            a["exits"] += sum(v for k, v in hist.items() if int(k) < loaded.model.config.num_hidden_layers - 1)
            a["identical"] += res.token_ids == ref
            a["rollbacks"] += st.get("rollbacks") or 0
        print(f"prompt {i}: " + " ".join(f"{n}={outs[n].stats()['avg_layers']:.2f}" for n in decs), file=sys.stderr,
              flush=True)
    summary = {}
    for n, a in acc.items():
        summary[n] = {"avg_layers": a["layer_passes"] / a["steps"] if a["steps"] else None,
                      "exits_per_token": a["exits"] / a["steps"] if a["steps"] else None,
                      "decode_tok_s": a["tokens"] / a["decode_s"] if a["decode_s"] else None,
                      "identical_to_dense": a["identical"], "rollbacks": a["rollbacks"], "prompts": len(prompts)}
    rec = {"command": "python benchmarks/specee_draft_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "a": args.a, "b": args.b, "b_draft_quant": args.b_draft_quant, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    print("| config | avg layers | exits / token | decode tok/s | identical to dense | rollbacks |")
    print("|---|---|---|---|---|---|")
    for n, s in summary.items():
        print(f"| {n} | {s['avg_layers']:.2f} | {s['exits_per_token']:.3f} | {s['decode_tok_s']:.2f} | "
              f"{s['identical_to_dense']}/{s['prompts']} | {s['rollbacks']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
