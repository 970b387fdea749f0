"""What does gating a stretch of layers with a CUDA-graph IF node cost, and which part of it? ([engine], GPU)

The 7B exit program paid ~15-17 us per kept exit point on a token that does not exit (`step_costs.gate_us`,
GPU_NOTES sessions 21 and 42), ~150 us per token over 9 points, where `product_specee232_ratio` misses 1.28 by ~120. A
point's gating is three things in a row on the graph's stream: the 1-thread kernel that sets the IF node's handle
from the `alive` flag (launched plainly), the conditional node, and its body (the stretch of layers up to the next
point), which PDL cannot overlap with what precedes or follows it. This probe times them apart, on a chain shaped
like the 7B step (32 layers of 7 fp16 GEMVs 4096 -> 4096 with a residual, the product's own GEMV kernel, each layer
its own weights) captured as one graph and replayed:

  dense        the 32 layers, no IF node
  if           an IF(alive) around each stretch after the points (the product's structure, its own extension)
  if_decide    the same, plus a small kernel on the graph's stream after each stretch (the exit decision's place)
  if_inside    the small kernel inside the stretch's body instead (PDL-chained to the layer before it)
  if_pdl_set   `if`, with the handle-setting kernel launched with programmatic stream serialization
  if_nested    each IF inside the previous one's body (one body entered per point, no return to the parent between)
  if_empty     the IF nodes with a 1-kernel body; the layers on the graph's stream (the node's own cost)
  (the above with alive 1 throughout: no exit taken; (variant - dense) / points is a point's cost)
  prefix       the first stretch alone (the layers a token that exits at the first point runs), no IF node
  exit_flat    `if` with alive cleared after the first stretch: the token exits there and every later IF node
               is evaluated and not taken
  exit_nested  `if_nested` with the same exit: one IF node is evaluated and not taken, the rest lie inside it
  ((exit_flat - prefix) / (points - 1) is what a node not taken costs)

Prints us per replay and, per variant, (variant - dense) / points.

    PYTHONPATH=. python benchmarks/if_gate_probe.py [--points 17,19,21,22,23,24,25,27,29] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import torch

SET_PDL_CU = r"""
#include <cuda_runtime.h>
__global__ void specee_set_cond_kernel(cudaGraphConditionalHandle h, const unsigned char* a, const unsigned char* b) {
  cudaGridDependencySynchronize();
  unsigned int v = a[0] != 0;
  if (b != nullptr) v = v && (b[0] != 0);
  cudaGraphSetConditional(h, v);
}
void specee_launch_set_cond(cudaGraphConditionalHandle h, const void* a, const void* b, cudaStream_t s) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1);
  cfg.blockDim = dim3(1);
  cfg.stream = s;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, specee_set_cond_kernel, h, (const unsigned char*)a, (const unsigned char*)b);
}
"""


def pdl_set_ext():
    from torch.utils.cpp_extension import load_inline

    from specee_compile.plugins.cuda_graph_if import COND_CPP

    ext = load_inline(name="specee_graph_if_pdlset", cpp_sources=[COND_CPP], cuda_sources=[SET_PDL_CU],
                      extra_cflags=["-O2"], extra_cuda_cflags=["-O2"], verbose=False)
    ext.init_streams(16)
    return ext


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="17,19,21,22,23,24,25,27,29")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gemvs", type=int, default=7)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("if_gate_probe: needs CUDA", file=sys.stderr)
        return 2
    from specee_compile.plugins import pdl
    from specee_compile.plugins.cuda_graph_if import cond_ext
    from specee_compile.plugins.triton_gemv import triton_fused_linear

    dev = torch.device("cuda")
    torch.manual_seed(0)
    D, L = a.width, a.layers
    points = sorted(int(p) for p in a.points.split(","))
    W = [[torch.randn(D, D, device=dev, dtype=torch.float16) * D ** -0.5 for _ in range(a.gemvs)] for _ in range(L)]
    small = torch.randn(8, D, device=dev, dtype=torch.float16) * D ** -0.5
    alive = torch.ones(1, dtype=torch.uint8, device=dev)
    x0 = torch.randn(1, 1, D, device=dev, dtype=torch.float16)
    base = cond_ext()
    base.init_streams(16)
    exts = {"base": base, "pdl_set": pdl_set_ext()}

    def layer(i, h):
        for w in W[i]:
            h = triton_fused_linear(h, w, res=h)
        return h

    def decide(h):
        return triton_fused_linear(h, small)

    def stretches():
        ends = [*points, L - 1]
        out, start = [], 0
        for end in ends:
            out.append(range(start, end + 1))
            start = end + 1
        return out

    def body(variant, g, pool):
        ext = exts["pdl_set" if variant == "if_pdl_set" else "base"]

        def gate(j):
            if g is None or j == 0 or variant in ("dense", "prefix"):
                return contextlib.nullcontext()
            return _if(ext, alive, pool)

        h = x0
        alive.fill_(1)
        exits = variant.startswith("exit_")
        if variant == "prefix":
            for i in stretches()[0]:
                h = layer(i, h)
            decide(h)  # as the exit variants do before they clear alive
            if g is not None:
                alive.zero_()
            return h
        if variant == "if_empty":
            for j, st in enumerate(stretches()):
                with gate(j):
                    decide(h)
                for i in st:
                    h = layer(i, h)
            return h
        if variant in ("if_nested", "exit_nested"):
            with contextlib.ExitStack() as stack:
                for j, st in enumerate(stretches()):
                    stack.enter_context(gate(j))
                    for i in st:
                        h = layer(i, h)
                    decide(h)
                    if exits and j == 0 and g is not None:
                        alive.zero_()
            return h
        for j, st in enumerate(stretches()):
            with gate(j):
                for i in st:
                    h = layer(i, h)
                if variant == "if_inside":
                    decide(h)
            if variant in ("if_decide", "exit_flat"):
                decide(h)
            if exits and j == 0 and g is not None:
                alive.zero_()
        return h

    variants = ["dense", "if", "if_decide", "if_inside", "if_pdl_set", "if_nested", "if_empty", "prefix", "exit_flat",
                "exit_nested"]
    for v in variants:  # tune and compile outside any capture
        body(v, None, None)
    torch.cuda.synchronize()
    rows = {}
    for v in variants:
        pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            body(v, g, pool)
        for _ in range(10):
            g.replay()
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(a.reps):
                g.replay()
            e1.record()
            torch.cuda.synchronize()
            runs.append(e0.elapsed_time(e1) * 1e3 / a.reps)
        rows[v] = statistics.median(runs)
        del g
    dense = rows["dense"]
    n = len(points)
    print(f"{torch.cuda.get_device_name()} | PDL {pdl.mode()} | {L} layers x {a.gemvs} GEMVs {D}x{D} | "
          f"points {a.points}")
    print(f"{'variant':12s} {'us/replay':>10s} {'us/point':>9s}")
    for v in variants:
        print(f"{v:12s} {rows[v]:10.1f} {(rows[v] - dense) / n:9.2f}")
    not_taken = {v: (rows[v] - rows["prefix"]) / (n - 1 if v == "exit_flat" else 1) for v in ("exit_flat", "exit_nested")}
    print("a node not taken: " + ", ".join(f"{v} {t:.2f} us" for v, t in not_taken.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "pdl": pdl.mode(), "points": points,
                       "layers": L, "gemvs": a.gemvs, "width": D, "us_per_replay": rows,
                       "us_per_point": {v: (rows[v] - dense) / n for v in variants},
                       "us_per_node_not_taken": not_taken}, f, indent=1)
    return 0


@contextlib.contextmanager
def _if(ext, a, pool):
    ext.begin_if(a, None, *pool)
    try:
        yield
    finally:
        ext.end_if(*pool)


if __name__ == "__main__":
    sys.exit(main())
