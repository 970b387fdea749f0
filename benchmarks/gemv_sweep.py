"""Sweep the fused GEMV's configs on Llama-2-7B decode shapes beside Inductor's own kernels (GPU).

For each weight of a layer (and the LM head): device time per call inside a CUDA graph, the weight
rotated over 6 copies so L2 never holds it, for
  - every config in `plugins.triton_gemv.CONFIGS` (pinned through SPECEE_GEMV_CONFIG),
  - the autotuned pick (what the runtime uses),
  - Inductor with coordinate-descent tuning compiling the same eager math (norm / SiLU / residual
    fused by Inductor), and the eager ops (cuBLAS + separate kernels).
Prints one table per shape and writes JSON to $OUT (or the current directory).

    PYTHONPATH=$PWD python3 benchmarks/gemv_sweep.py
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys

import torch

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


GEMV_SHAPES = (  # name, N, K, prologue, residual (Llama-2-7B)
    ("wqkv", 12288, 4096, "rmsnorm", False), ("wo", 4096, 4096, "none", True),
    ("wgu", 22016, 4096, "rmsnorm", False), ("wd", 4096, 11008, "silu_mul", True),
    ("head", 32000, 4096, "rmsnorm", False),
)


def gemv_inputs(n: int, k: int, pro: str, has_res: bool, copies: int, dev, g):
    """fp16 inputs of one fused_linear shape: `copies` weights [n, k], x, norm weight, residual."""
    kin = 2 * k if pro == "silu_mul" else k
    ws = [(torch.randn(n, k, generator=g) * 0.02).half().to(dev) for _ in range(copies)]
    x = torch.randn(1, 1, kin, generator=g).half().to(dev)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).half().to(dev)
    r = torch.randn(1, 1, n, generator=g).half().to(dev) if has_res else None
    return ws, x, nw, r


def gemv_time_us(fn, x, ws, r, nw, pro: str) -> float:
    """Device time per call of a fused_linear implementation, each call on the next weight copy."""
    it = iter(range(10**9))
    return graph_time_us(lambda: fn(x, ws[next(it) % len(ws)], r, nw, 1e-5, pro), reps=24)


def main() -> int:
    dev = torch.device("cuda")
    T.register_cuda_impl()
    copies = 6
    g = torch.Generator().manual_seed(7)
    out = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "commit": os.environ.get("SPECEE_COMMIT"), "shapes": {}}
    for name, n, k, pro, has_res in GEMV_SHAPES:
        ws, x, nw, r = gemv_inputs(n, k, pro, has_res, copies, dev, g)
        def timed(fn, x=x, ws=ws, r=r, nw=nw, pro=pro):
            return gemv_time_us(fn, x, ws, r, nw, pro)

        mb = n * k * 2 / 1e6
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
            else:
                print(f"  {key:28s} {v}")
        torch._dynamo.reset()
        del ws
    path = os.path.join(os.environ.get("OUT", "."), "gemv_sweep.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
