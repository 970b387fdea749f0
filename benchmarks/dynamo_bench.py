"""The three ways into one runtime, timed in one process on one prompt (issue 16):

    hf eager              model.generate() of the Hugging Face model as loaded
    hf compile dense      model.forward = torch.compile(model.forward, backend="specee", options={"specee": False})
    hf compile specee     the same with SpecEE (approximate exits; the model's shipped artifacts, found by
                          fingerprint: no `artifacts` option)
    hf compile lossless   the same, mode="lossless" (the backend hands generate() only verified tokens)
    api dense / specee / lossless
                          specee_compile.api.build_decoder(...).generate(ids): the runtime's own loop

Every compiled path is called once untimed (compile, capture: `first_call_s`), then all rows are timed in
alternating rounds (A B C ... A B C ...) and each row reports the median and spread. Decode tok/s counts
the tokens after the first one over the time after the first one (the first token ends the prefill): for
the HF rows a streamer stamps the first token, for the api rows it is `GenerationResult.decode_s`.

    python benchmarks/dynamo_bench.py                       # SmolLM2-135M, CPU, float32, 48 new tokens
    python benchmarks/dynamo_bench.py --device cuda         # the same on a GPU (captured CUDA steps)
    python benchmarks/dynamo_bench.py --device cuda --shapes 7b --dtype float16   # Llama-2-7B shapes, dense rows
    python benchmarks/dynamo_bench.py --shapes tiny --new 16 --rounds 1           # smoke test

Writes benchmarks/results/<date>-dynamo-<machine>.json (date, machine, command, commit, every run).
Random-weight shapes (--shapes) cannot exit on their own, so they get the dense rows only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Give three tips for learning a new language."


# ---------------------------------------------------------------- setup


def load(args):
    """(loaded, prompt ids): the zoo model, or a random-weight Llama of the given shapes."""
    from specee_compile.api import encode_prompt
    from specee_compile.config import torch_dtype

    dtype = torch_dtype(args.dtype)
    if args.shapes is None:
        from specee_compile.models import load_model

        loaded = load_model(args.model, dtype=dtype, device=args.device)
        return loaded, encode_prompt(loaded.tokenizer, args.prompt)
    from transformers import LlamaConfig, LlamaForCausalLM

    from specee_compile.eval.gpu_bench import LLAMA2_7B, TINY

    shape = {"7b": LLAMA2_7B, "tiny": TINY}[args.shapes]
    cfg = LlamaConfig(**shape, initializer_range=0.02, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    loaded = SimpleNamespace(model=model, tokenizer=None, config=model.config, name=f"llama-{args.shapes}-shapes",
                             fingerprint=None)
    g = torch.Generator().manual_seed(1)
    return loaded, torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=g).tolist()


class Clock:
    """A generate() streamer that only stamps time: put() #1 is the prompt, #2 the first new token."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_run(model, forward, ids, args) -> dict:
    model.forward = forward
    x = torch.tensor([ids], device=args.device)
    clock = Clock(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    out = model.generate(x, max_new_tokens=args.new, do_sample=False, streamer=clock,
                         pad_token_id=model.generation_config.pad_token_id or 0)
    sync(args.device)
    t1 = time.perf_counter()
    toks = out[0, len(ids):].tolist()
    first = clock.stamps[1] if len(clock.stamps) > 1 else t1
    return {"tokens": toks, "total_s": t1 - t0, "decode_s": t1 - first, "decode_tokens": len(toks) - 1}


def api_run(dec, ids, args) -> dict:
    sync(args.device)
    t0 = time.perf_counter()
    res = dec.generate(ids)
    t1 = time.perf_counter()
    # tokens after the first, as for the HF rows (lossless decode_steps also counts rolled-back steps)
    return {"tokens": res.token_ids, "total_s": t1 - t0, "decode_s": res.decode_s,
            "decode_tokens": len(res.token_ids) - 1, "decode_steps": res.decode_steps,
            "avg_layers": res.avg_layers, "rollbacks": res.rollbacks}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def machine(device: str) -> tuple[str, str]:
    """(slug for the file name, description)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        return name.lower().replace("nvidia ", "nvidia-").replace(" ", "-"), name
    cores = os.cpu_count()
    return f"cpu{cores}", f"{cores}-core CPU ({platform.processor() or platform.machine()})"


# ---------------------------------------------------------------- the benchmark


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shapes", choices=["7b", "tiny"], help="random-weight Llama of these shapes (dense rows only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="inductor", help="segment backend of every row (eager | inductor)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-len", type=int, default=39, help="--shapes: random prompt length")
    p.add_argument("--new", type=int, default=48, help="new tokens per generate()")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (every row once per round)")
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--artifacts", help="SpecEE artifact directory (default: found by the model's fingerprint)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rows", default="", help="comma list of rows to keep (default: all that apply)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/<date>-dynamo-<machine>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from specee_compile.api import build_decoder
    from specee_compile.backends.dynamo_backend import last_result
    from specee_compile.config import Settings

    slug, desc = machine(args.device)
    t_load = time.perf_counter()
    loaded, ids = load(args)
    model = loaded.model
    load_s = time.perf_counter() - t_load
    eager_forward = model.forward
    common = {"backend": args.backend, "max_context": args.max_context}
    if args.artifacts:
        common["artifacts"] = args.artifacts
    base = Settings(device=args.device, dtype=args.dtype, max_new_tokens=args.new, **common)
    modes = {"dense": {"specee": False}}
    if args.shapes is None:  # random weights have no artifacts
        modes["specee"] = {"specee": True}
        modes["lossless"] = {"specee": True, "mode": "lossless", "kv_policy": "backfill"}

    rows: dict[str, Callable[[], dict]] = {"hf eager": partial(hf_run, model, eager_forward, ids, args)}
    first_call: dict[str, float] = {}
    api_decoders = {}
    for mode, opts in modes.items():
        fwd = torch.compile(eager_forward, backend="specee", options={**common, "max_new_tokens": args.new, **opts})
        rows[f"hf compile {mode}"] = partial(hf_run, model, fwd, ids, args)
    for mode, opts in modes.items():
        seg = api_decoders["dense"].seg if api_decoders else None
        t0 = time.perf_counter()
        api_decoders[mode] = build_decoder(loaded, base.replace(**opts), segments=seg)
        first_call[f"api {mode}"] = time.perf_counter() - t0  # build; the first generate adds compile below
        rows[f"api {mode}"] = partial(api_run, api_decoders[mode], ids, args)
    keep = [r for r in args.rows.split(",") if r]
    if keep:
        rows = {k: v for k, v in rows.items() if k in keep or k == "hf eager"}

    runs: dict[str, list[dict]] = {k: [] for k in rows}
    print(f"{desc}; {loaded.name} {args.dtype}; prompt {len(ids)} tokens; {args.new} new; load {load_s:.1f} s",
          flush=True)
    for name, fn in rows.items():  # first calls: compile, capture, build the runners
        t0 = time.perf_counter()
        r = fn()
        first_call[name] = first_call.get(name, 0.0) + time.perf_counter() - t0
        if name.startswith("hf compile"):
            r["avg_layers"] = last_result(model).avg_layers
        print(f"  first call {name}: {first_call[name]:.1f} s", flush=True)
    load_avg = [os.getloadavg()[0]]
    for rnd in range(args.rounds):
        for name, fn in rows.items():
            r = fn()
            if name.startswith("hf compile"):
                res = last_result(model)
                r["avg_layers"], r["rollbacks"] = res.avg_layers, res.rollbacks
            runs[name].append(r)
        load_avg.append(os.getloadavg()[0])
        print(f"  round {rnd + 1}/{args.rounds} done (load average {load_avg[-1]:.1f})", flush=True)

    table = summarize(runs, first_call)
    ratios = {
        "hf compile specee / api specee (decode)": _ratio(table, "hf compile specee", "api specee"),
        "hf compile lossless / api lossless (decode)": _ratio(table, "hf compile lossless", "api lossless"),
        "hf compile dense / api dense (decode)": _ratio(table, "hf compile dense", "api dense"),
        "hf compile dense / hf eager (decode)": _ratio(table, "hf compile dense", "hf eager"),
    }
    checks = {
        "hf compile specee == api specee tokens": _same(runs, "hf compile specee", "api specee"),
        "hf compile lossless == api dense tokens": _same(runs, "hf compile lossless", "api dense"),
        "api lossless == api dense tokens": _same(runs, "api lossless", "api dense"),
        "hf compile dense == api dense tokens": _same(runs, "hf compile dense", "api dense"),
        "hf compile dense == hf eager tokens": _same(runs, "hf compile dense", "hf eager"),
    }
    print_table(table, ratios, checks)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": desc,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *(argv or sys.argv[1:])]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": loaded.name,
        "dtype": args.dtype,
        "segment_backend": args.backend,
        "prompt_tokens": len(ids),
        "new_tokens": args.new,
        "rounds": args.rounds,
        "load_average_per_round": load_avg,
        "table": table,
        "ratios": ratios,
        "checks": checks,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v] for k, v in runs.items()},
        "tokens": {k: v[-1]["tokens"] for k, v in runs.items() if v},
    }
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{out['date']}-dynamo-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def summarize(runs: dict, first_call: dict) -> dict:
    table = {}
    for name, rs in runs.items():
        if not rs:
            continue
        dec = [r["decode_tokens"] / r["decode_s"] for r in rs if r["decode_s"] > 0]
        tot = [len(r["tokens"]) / r["total_s"] for r in rs]
        table[name] = {
            "decode_tok_s": statistics.median(dec) if dec else None,
            "decode_tok_s_min": min(dec) if dec else None,
            "decode_tok_s_max": max(dec) if dec else None,
            "total_tok_s": statistics.median(tot),
            "tokens": len(rs[-1]["tokens"]),
            "avg_layers": rs[-1].get("avg_layers"),
            "rollbacks": rs[-1].get("rollbacks"),
            "first_call_s": first_call.get(name),
        }
    return table


def _ratio(table, a, b):
    if a in table and b in table and table[a]["decode_tok_s"] and table[b]["decode_tok_s"]:
        return table[a]["decode_tok_s"] / table[b]["decode_tok_s"]
    return None


def _same(runs, a, b):
    if not runs.get(a) or not runs.get(b):
        return None
    return runs[a][-1]["tokens"] == runs[b][-1]["tokens"]


def print_table(table, ratios, checks) -> None:
    print("\n| path | decode tok/s (median; min-max) | total tok/s | tokens | avg layers | rollbacks | first call s |")
    print("|---|---|---|---|---|---|---|")
    for name, t in table.items():
        dec = f"{t['decode_tok_s']:.1f} ({t['decode_tok_s_min']:.1f}-{t['decode_tok_s_max']:.1f})"
        layers = f"{t['avg_layers']:.2f}" if t["avg_layers"] is not None else "-"
        rb = t["rollbacks"] if t["rollbacks"] is not None else "-"
        fc = f"{t['first_call_s']:.1f}" if t["first_call_s"] is not None else "-"
        print(f"| {name} | {dec} | {t['total_tok_s']:.1f} | {t['tokens']} | {layers} | {rb} | {fc} |")
    print()
    for k, v in ratios.items():
        if v is not None:
            print(f"{k}: {v:.3f}")
    for k, v in checks.items():
        if v is not None:
            print(f"{k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
