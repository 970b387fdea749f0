"""What verifying M rows costs on this CPU: fp32 `F.linear` over SmolLM2's own weights, M = 1..12.

Why the CPU tree default is 3 rows (`config.TREE_SHAPES["cpu"]`): MKL's fp32 GEMM streams the weights once
per block of 3 rows, so 1-3 rows cost one weight pass, 4-6 two, and so on. Two tables:
  - the LM head [49152, 576] alone, M = 1..12 (cache-warm: one weight, repeated);
  - SmolLM2's 30 layers (qkv, o, gate|up, down), M = 1 and 3, the weights streamed from memory as in decode,
    with MKL's packed weights (`mkl._mkl_linear`) and oneDNN (`mkldnn._linear_pointwise`) beside plain MKL;
  - the LM head by oneDNN weight layout, M = 1, 3, 8, 25: `to_mkldnn`'s default and the product's (reordered for
    `cpu_gemm.ROWS_HINT` rows, `backends/cpu_gemm.py`), what the eager backend's CPU choice runs;
  and in the layers' table and the head's, `F.linear` compiled by Inductor with our CPU options: one row becomes a
    parallel reduction (`plugins/inductor_cpu_gemv.py`: the Inductor backend's and the C++ runner's one-row step),
    several rows stay an MKL call.

    OMP_NUM_THREADS=2 python benchmarks/cpu_gemm_rows.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, n: int = 10) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from specee_compile.api import load_model

    m = load_model("smollm2-135m").model
    layers = []
    for layer in m.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        layers.append([torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).contiguous(),
                       at.o_proj.weight.contiguous(),
                       torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                       mlp.down_proj.weight.contiguous()])
    head = m.lm_head.weight.contiguous()

    print(f"LM head {list(head.shape)}, F.linear ms by rows M ({a.threads} threads):")
    cells = []
    for r in range(1, 13):
        x = torch.randn(r, head.shape[1])
        cells.append(f"M{r}:{timed(lambda x=x: F.linear(x, head), 30):.2f}")
    print(" ".join(cells))

    packed = [[torch.ops.mkl._mkl_reorder_linear_weight(w, 3) for w in ws] for ws in layers]
    onednn = [[w.to_mkldnn() for w in ws] for ws in layers]
    from specee_compile.backends.cpu_gemm import ROWS_HINT, linear_onednn, onednn_form

    product = [[onednn_form(w) for w in ws] for ws in layers]
    from specee_compile.plugins.inductor_cpu_gemv import inductor_options

    torch._dynamo.config.recompile_limit = 64  # one compile per (rows, weight shape): 20
    with torch._inductor.config.patch(inductor_options(torch.device("cpu"))):
        compiled = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, dynamic=False)
        for ws in ([*layers[0], head],):  # compile every shape now (the pass is read at compile time)
            for w in ws:
                for rows in (1, 3, 8, 25):
                    compiled(torch.randn(rows, w.shape[1]), w)

    def run(rows: int, how: str) -> float:
        xs = [torch.randn(rows, w.shape[1]) for w in layers[0]]

        def step():
            for i, ws in enumerate(layers):
                for j, w in enumerate(ws):
                    if how == "mkl":
                        F.linear(xs[j], w)
                    elif how == "mkl packed":
                        torch.ops.mkl._mkl_linear(xs[j], packed[i][j], w, None, 3)
                    elif how == "onednn":
                        linear_onednn(xs[j], onednn[i][j])
                    elif how == "inductor":
                        compiled(xs[j], w)
                    else:
                        linear_onednn(xs[j], product[i][j])
        return timed(step)

    hows = ("mkl", "mkl packed", "onednn", f"onednn, {ROWS_HINT} rows", "inductor")
    print("\n30 layers' GEMMs, weights streamed (ms per pass):")
    print("| rows | " + " | ".join(hows) + " |\n|---|---|---|---|---|---|")
    for rows in (1, 3, 1, 3):  # twice: the first pass of each warms the allocator
        print(f"| {rows} | " + " | ".join(f"{run(rows, how):.2f}" for how in hows) + " |")

    layouts = {"to_mkldnn": head.to_mkldnn(), f"reordered for {ROWS_HINT} rows (the product's)": onednn_form(head)}
    print("\nLM head by oneDNN weight layout, ms (MKL and Inductor beside):")
    print("| rows | mkl | " + " | ".join(layouts) + " | inductor |\n|---|---|---|---|---|")
    for rows in (1, 3, 8, 25):
        x = torch.randn(1, rows, head.shape[1])
        cells = [timed(lambda x=x: F.linear(x, head))] + [timed(lambda x=x, w=w: linear_onednn(x, w))
                                                           for w in layouts.values()]
        cells.append(timed(lambda x=x: compiled(x[0], head)))
        print(f"| {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
