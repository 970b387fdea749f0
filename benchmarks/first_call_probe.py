"""Where does the first SpecEE `generate` call lose its time? ([engine], benchmarks/GPU_NOTES.md session 8)

The 7B bench's first SpecEE call ran at ~0.35x its steady speed, while dense's first call and a SpecEE
decoder that never exits started at 1.00x. This probe builds the bench's SpecEE decoder (random model of
the given shape, random predictors, the paper's 23.2-layer trace, the draft running) and, for three
`generate` calls, records:
  - the wall time between streamed tokens (the five largest gaps and where they fall, the median);
  - whole-step graphs captured during the call (a kind or bucket `prepare` did not foresee);
  - Dynamo / Inductor compiles during the call (a recompile on the decode path).
With `--warm-exits`, a fresh decoder on the same segments replays every captured exit graph once with an
exit forced at its first gate before its first call (the conditional-node hypothesis; ruled out on the
H200: the whole loss was one 657 ms gap on the first decode step, the draft's eager path running for the
first time in the process, which `Decoder.start` now runs before the prefill).

    python3 benchmarks/first_call_probe.py [--layers 32] [--new-tokens 128] [--warm-exits] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time

import torch


def counters() -> dict:
    from torch._dynamo.utils import counters as c

    return {"frames_ok": int(c["frames"]["ok"]), "unique_graphs": int(c["stats"]["unique_graphs"]),
            "inductor_compiles": int(sum(c["inductor"].values()))}


def probe_call(dec, prompt: list[int]) -> dict:
    stamps: list[float] = []
    whole = dec.seg._whole()
    graphs0, layer_graphs0, steps0 = len(whole.graphs), len(dec.seg._graphs.entries), whole.steps_run
    c0 = counters()
    t0 = time.perf_counter()
    res = dec.generate(prompt, on_token=lambda _t: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    c1 = counters()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    top = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:5]
    return {"decode_tok_s": round(res.decode_tok_s, 1), "compile_s": round(res.compile_s, 2),
            "prefill_s": round(res.prefill_s, 3), "wall_s": round(wall, 3),
            "graphs_captured_in_call": len(whole.graphs) - graphs0,
            "layer_graphs_captured_in_call": len(dec.seg._graphs.entries) - layer_graphs0,
            "whole_steps_run": whole.steps_run - steps0, "decode_steps": res.decode_steps,
            "compiles_in_call": {k: c1[k] - c0[k] for k in c1},
            "median_gap_ms": round(1e3 * statistics.median(gaps), 3) if gaps else None,
            "largest_gaps_ms": [(i + 1, round(1e3 * gaps[i], 2)) for i in top],
            "sum_gaps_over_2x_median_ms": round(1e3 * sum(g for g in gaps if g > 2 * statistics.median(gaps)), 1)
            if gaps else None,
            "avg_layers": round(res.avg_layers, 2)}


def warm_exits(whole) -> int:
    """Replay each captured exit graph once with an exit forced at its first gate (outside any token)."""
    n = 0
    for (kind, S), pair in list(whole.graphs.items()):
        if kind[0] != "exits":
            continue
        gate = kind[2][0]
        whole._set_rec(whole.seg.max_len - 1, gate, 0)
        for g in pair:
            whole._reset_ctrl(kind, frozenset(kind[2]), gate)
            whole.ctrl.copy_(whole.ctrl_host)
            g.replay()
            n += 1
    torch.cuda.synchronize()
    whole.seg.cache.reset()
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--warm-exits", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    from specee_compile.api import build_decoder
    from specee_compile.config import Settings
    from specee_compile.eval.gpu_bench import LLAMA2_7B, paper_trace, random_artifacts, write_random_model
    from specee_compile.models import load_model
    from specee_compile.runtime.policies import trace_exits

    dev, dt = torch.device("cuda"), torch.float16
    shape = dict(LLAMA2_7B, num_hidden_layers=a.layers)
    L, P, N = a.layers, a.prompt_len, a.new_tokens
    with tempfile.TemporaryDirectory(prefix="specee-probe-") as d:
        write_random_model(shape, dt, dev, d)
        loaded = load_model(d, dtype=dt, device="cuda")
    prompt = torch.randint(0, shape["vocab_size"], (P,), generator=torch.Generator().manual_seed(0)).tolist()
    max_ctx = ((P + N + 64 + 63) // 64) * 64
    base = {"device": "cuda", "dtype": "float16", "backend": "inductor", "max_context": max_ctx, "max_new_tokens": N}
    trace = [min(L, max(1, round(e * L / 32))) for e in paper_trace(4096)]
    program, draft, _ = random_artifacts(loaded, trace)
    out: dict = {"shape": shape, "new_tokens": N, "prompt_len": P, "torch": torch.__version__,
                 "card": torch.cuda.get_device_name()}
    dense = build_decoder(loaded, Settings(**base))
    out["dense"] = [probe_call(dense, prompt) for _ in range(2)]
    print("dense", out["dense"], file=sys.stderr, flush=True)
    spec = Settings(**base, specee=True)
    dec = build_decoder(loaded, spec, segments=dense.seg, program=program, draft=draft,
                        policy=trace_exits([e - 1 for e in trace]))
    out["specee"] = []
    for i in range(3):
        r = probe_call(dec, prompt)
        out["specee"].append(r)
        print(f"specee call {i + 1}", r, file=sys.stderr, flush=True)
    out["graph_kinds"] = sorted({str((k[0][0], k[0][2][:3] if k[0][0] == "exits" else (), k[1]))
                                 for k in dec.seg._whole().graphs})[:40]
    if a.warm_exits:
        # a second program and draft (new graph kinds: a kind holds its draft) on the same segments
        program2, draft2, _ = random_artifacts(loaded, trace, seed=1)
        dec2 = build_decoder(loaded, spec, segments=dense.seg, program=program2, draft=draft2,
                             policy=trace_exits([e - 1 for e in trace]))
        dec2.start(prompt)  # selection + capture + prefill (the call's compile part)
        out["warm_exit_replays"] = warm_exits(dec2.seg._whole())
        out["specee_warmed"] = [probe_call(dec2, prompt) for _ in range(2)]
        print("specee_warmed", out["specee_warmed"], file=sys.stderr, flush=True)
    s = out["specee"]
    print(f"\nfirst/steady specee: {s[0]['decode_tok_s'] / s[-1]['decode_tok_s']:.3f}; "
          f"graphs captured in call 1: {s[0]['graphs_captured_in_call']}; compiles in call 1: "
          f"{s[0]['compiles_in_call']}; largest gaps call 1: {s[0]['largest_gaps_ms']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
