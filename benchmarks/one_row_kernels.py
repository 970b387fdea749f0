"""The one-row decode step's kernels, the Python CUDA step's vs the C++ runner's package (CUDA only).

    PYTHONPATH=. python benchmarks/one_row_kernels.py [--shape smollm2] [--json F]

Where a gap between the two decode steps (`cpp_bench.py --device cuda`: the runner's captured step vs
the Python product's) lives, kernel by kernel, on random weights (a GEMV's or attention's time depends on
its shape only):
- each fused GEMV of a layer: the Python op (`specee::fused_linear`, its autotuner's pick) against the
  AOTI twin (`specee_aoti::fused_linear` with the config `tune_for_aoti` gives the package);
- attention at two attended lengths: the Python kernel against the twin;
- the LM head of one row: cuBLAS (what `head.pt2`'s dynamic-shape matmul calls), the fused GEMV.
Times are CUDA-graph replays (`triton.testing.do_bench_cudagraph`: launch cost included, as in the steps).

Whole calls (one `layer1.pt2` call, the chain of layers, the head, the whole step) are timed by the
runner itself at capture and set beside the Python step's by `cpp_bench.py --device cuda` (loading a
package into a Python process that had compiled the Python step crashed it on the H200, session 8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, heads, kv heads, intermediate, vocab
    "smollm2": (576, 9, 3, 1536, 49152),
    "7b": (4096, 32, 32, 11008, 32000),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("one_row_kernels.py needs CUDA")
    import triton

    dt = getattr(torch, a.dtype)
    dev = torch.device("cuda")
    torch.manual_seed(0)

    def t(*s):
        return (torch.randn(*s, device=dev) / math.sqrt(s[-1])).to(dt)

    def us(fn, *args):
        fn(*args)
        torch.cuda.synchronize()
        return 1000.0 * triton.testing.do_bench_cudagraph(lambda: fn(*args), rep=50)

    rows = []
    print(f"{torch.cuda.get_device_name()} | {a.shape} shapes, {a.dtype} | us per call, CUDA-graph replays\n\n"
          "| kernel | Python step | C++ package | note |\n|---|---|---|---|", flush=True)

    def add(*row):  # printed as it comes (a run cut short keeps its rows)
        rows.append(row)
        print(f"| {row[0]} | {row[1]:.2f} | {row[2]:.2f} | {row[3]} |", flush=True)

    kernel_rows(add, SHAPES[a.shape], dev, t, us)
    if a.json:
        Path(a.json).write_text(json.dumps([dict(zip(("kernel", "python_us", "package_us", "note"), r)) for r in rows],
                                           indent=1) + "\n")
    return 0


def kernel_rows(add, shape, dev, t, us) -> None:
    """The per-kernel rows: each fused GEMV of a layer, attention at three lengths, the LM head."""
    from specee_compile.plugins import triton_decode_attention as A
    from specee_compile.plugins import triton_gemv as G

    D, H, Hkv, I, V = shape
    hd = D // H
    gemvs = {"qkv": (t(1, 1, D), t((H + 2 * Hkv) * hd, D), None, t(D), "rmsnorm"),
             "o": (t(1, 1, H * hd), t(D, H * hd), t(1, 1, D), None, "none"),
             "gate_up": (t(1, 1, D), t(2 * I, D), None, t(D), "rmsnorm"),
             "down": (t(1, 1, 2 * I), t(D, I), t(1, 1, D), None, "silu_mul")}
    for name, (x, w, r, nw, pro) in gemvs.items():
        cfg = G.tune_for_aoti(x, w, r, nw, 1e-5, pro)
        picked = G.PICKED.get((w.shape[0], w.shape[1], G.PROLOGUES[pro]))
        py = us(G.triton_fused_linear, x, w, r, nw, 1e-5, pro)
        tw = us(torch.ops.specee_aoti.fused_linear, x, w, r, nw, 1e-5, pro)
        add(f"gemv {name} {tuple(w.shape)}", py, tw, f"python {picked} / twin {cfg}")
    for S in (64, 128, 256):
        q, kc, vc = t(H, 1, hd), t(Hkv, S, hd), t(Hkv, S, hd)
        valid = torch.ones(S, dtype=torch.bool, device=dev)
        pos = torch.tensor([S - 1], device=dev)
        cnt = torch.zeros(H, dtype=torch.int32, device=dev)
        py = us(A.triton_decode_attention, q, kc, vc, valid, pos)
        tw = us(torch.ops.specee_aoti.decode_attention, q, kc, vc, valid, pos, cnt)
        add(f"attention S={S}", py, tw, f"splits {A.splits_for(S)} / {A.MAX_SPLITS}")
    h, nw, wh = t(1, 1, D), t(D), t(V, D)
    from specee_compile.model_step import make_head_fn, rms_norm

    spec = type("Spec", (), {"eps": 1e-5})
    ind = torch.compile(make_head_fn(spec), dynamic=False, options={"coordinate_descent_tuning": True})
    inductor = us(ind, h, nw, wh)
    cublas = us(lambda: torch.nn.functional.linear(rms_norm(h, nw, 1e-5), wh))
    fused = us(G.triton_fused_linear, h, wh, None, nw, 1e-5, "rmsnorm")
    add(f"head {tuple(wh.shape)}", inductor, cublas,
        f"Inductor static (Python) / eager norm + cuBLAS (head.pt2 ~); the fused GEMV: {fused:.2f}")


if __name__ == "__main__":
    sys.exit(main())
