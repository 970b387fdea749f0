"""Sweep the fused GEMV's configs on decode shapes (Llama-2-7B fp16, or SmolLM2 fp32) beside Inductor's kernels (GPU).

For each weight of a layer (and the LM head): device time per call inside a CUDA graph, the weight
rotated over 6 copies so L2 never holds it, for
  - every config in `plugins.triton_gemv.CONFIGS` (pinned through SPECEE_GEMV_CONFIG),
  - the tuned pick (what the runtime uses),
  - Inductor with coordinate-descent tuning compiling the same eager math (norm / SiLU / residual
    fused by Inductor), and the eager ops (cuBLAS + separate kernels).
With `--retune N`, the tuner is also run N times afresh per shape (its cache cleared), as N processes
of the product would tune it, and each pick is listed with its graph time: whether the pick is stable, and
whether the tuner picks what is fastest back to back (session 13 ran it on Triton's autotuner, before `_tune`).
Prints one table per shape and writes JSON to $OUT (or the current directory).

    PYTHONPATH=$PWD python3 benchmarks/gemv_sweep.py [--shape smollm2] [--retune 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

# the sweep times the tuner's pick in this process: never read it from the on-disk store (plugins/compile_cache.py)
os.environ["SPECEE_TUNE_CACHE"] = "0"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specee_compile.ops import fused_linear_reference
from specee_compile.plugins import triton_gemv as T


def capture(fn, pool=None):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


def graph_time_us(fn, reps: int = 50) -> float:
    """Device time per call of fn, from a CUDA graph of `reps` back-to-back calls."""
    fn()  # compile / load outside the capture
    torch.cuda.synchronize()
    g, _ = capture(lambda: [fn() for _ in range(reps)])
    g.replay()
    torch.cuda.synchronize()
    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    vals = []
    for _ in range(5):
        s.record()
        g.replay()
        t.record()
        t.synchronize()
        vals.append(s.elapsed_time(t) * 1000 / reps)
    return round(statistics.median(vals), 2)


GEMV_SHAPES = {  # name, N, K, prologue, residual
    "7b": (("wqkv", 12288, 4096, "rmsnorm", False), ("wo", 4096, 4096, "none", True),
           ("wgu", 22016, 4096, "rmsnorm", False), ("wd", 4096, 11008, "silu_mul", True),
           ("head", 32000, 4096, "rmsnorm", False)),
    "smollm2": (("wqkv", 960, 576, "rmsnorm", False), ("wo", 576, 576, "none", True),
                ("wgu", 3072, 576, "rmsnorm", False), ("wd", 576, 1536, "silu_mul", True),
                ("head", 49152, 576, "rmsnorm", False)),
}
DTYPES = {"7b": torch.float16, "smollm2": torch.float32}


def gemv_inputs(n: int, k: int, pro: str, has_res: bool, copies: int, dev, g, dt=torch.float16):
    """Inputs of one fused_linear shape: `copies` weights [n, k], x, norm weight, residual."""
    kin = 2 * k if pro == "silu_mul" else k
    ws = [(torch.randn(n, k, generator=g) * 0.02).to(dev, dt) for _ in range(copies)]
    x = torch.randn(1, 1, kin, generator=g).to(dev, dt)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dev, dt)
    r = torch.randn(1, 1, n, generator=g).to(dev, dt) if has_res else None
    return ws, x, nw, r


def gemv_time_us(fn, x, ws, r, nw, pro: str) -> float:
    """Device time per call of a fused_linear implementation, each call on the next weight copy."""
    it = iter(range(10**9))
    return graph_time_us(lambda: fn(x, ws[next(it) % len(ws)], r, nw, 1e-5, pro), reps=24)


def retune(times: int, first, row: dict, x, ws, r, nw, pro: str) -> list:
    """Run the tuner `times` more times afresh on this shape; each pick with its graph time (from `row`)."""
    picks = [first]
    for _ in range(times):
        T._TUNE_CACHE.clear()
        T.triton_fused_linear(x, ws[0], r, nw, 1e-5, pro)
        torch.cuda.synchronize()
        n, k = ws[0].shape
        picks.append(T.PICKED[(n, k, T.PROLOGUES[pro])])
    return [{"pick": list(p), "graph_us": row.get("cfg " + ",".join(map(str, p)))} for p in picks]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(GEMV_SHAPES), default="7b")
    ap.add_argument("--retune", type=int, default=0, help="also run the tuner N times afresh per shape")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    T.register_cuda_impl()
    dt = DTYPES[args.shape]
    copies = 6 if args.shape == "7b" else 24  # enough copies that L2 (50 MB on an H100/H200) never holds one
    g = torch.Generator().manual_seed(7)
    out = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "commit": os.environ.get("SPECEE_COMMIT"), "shape": args.shape, "dtype": str(dt), "shapes": {}}
    for name, n, k, pro, has_res in GEMV_SHAPES[args.shape]:
        ws, x, nw, r = gemv_inputs(n, k, pro, has_res, copies, dev, g, dt)
        def timed(fn, x=x, ws=ws, r=r, nw=nw, pro=pro):
            return gemv_time_us(fn, x, ws, r, nw, pro)

        mb = n * k * ws[0].element_size() / 1e6
        row: dict = {}
        for cfg in T.CONFIGS:
            os.environ["SPECEE_GEMV_CONFIG"] = ",".join(map(str, cfg))
            try:
                row["cfg " + ",".join(map(str, cfg))] = timed(T.triton_fused_linear)
            except Exception as ex:  # noqa: BLE001  # a config that does not compile on this card
                row["cfg " + ",".join(map(str, cfg))] = repr(ex)[:120]
        os.environ.pop("SPECEE_GEMV_CONFIG")
        row["autotuned"] = timed(T.triton_fused_linear)
        row["autotuned_pick"] = T.TUNED.get((n, k, pro))
        if args.retune:
            row["retune"] = retune(args.retune, T.PICKED[(n, k, T.PROLOGUES[pro])], row, x, ws, r, nw, pro)
        cdt = torch.compile(fused_linear_reference, fullgraph=True, dynamic=False,
                            options={"coordinate_descent_tuning": True})
        row["inductor_cdt"] = timed(cdt)
        row["eager_cublas"] = timed(fused_linear_reference)
        ref = fused_linear_reference(x, ws[0], r, nw, 1e-5, pro)
        got = T.triton_fused_linear(x, ws[0], r, nw, 1e-5, pro)
        row["max_abs_diff_autotuned_vs_eager"] = float((got.float() - ref.float()).abs().max())
        out["shapes"][f"{name} {n}x{k} {pro}"] = row
        print(f"\n{name} {n}x{k} {pro}{' +res' if has_res else ''}: {mb:.1f} MB")
        for key, v in row.items():
            if isinstance(v, float):
                print(f"  {key:28s} {v:8.2f} us {mb / v:6.3f} TB/s")
            elif key == "retune":
                print(f"  {key:28s} " + "; ".join(f"{','.join(map(str, e['pick']))}: {e['graph_us']}" for e in v))
            else:
                print(f"  {key:28s} {v}")
        torch._dynamo.reset()
        del ws
    path = os.path.join(os.environ.get("OUT", "."), f"gemv_sweep_{args.shape}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
