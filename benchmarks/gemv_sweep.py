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
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specee_compile.eval.gpu_bench import GEMV_SHAPES, gemv_inputs, gemv_time_us
from specee_compile.ops import fused_linear_reference
from specee_compile.plugins import triton_gemv as T


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
