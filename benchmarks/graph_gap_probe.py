"""Does a libtorch C++ process idle more between a CUDA graph's kernels than a Python process? ([cpp], H200)

cpp_bench's kernel timelines (sessions 13-14) show the C++ runner's captured chain idling ~0.45 us at every
kernel boundary against ~0.1 us in the Python step's chain, with the same kernels, launch configurations and
(since c52486c) function attributes. This probe separates the process from the kernels: the same chains of
N small kernels, captured as one graph and replayed, in this Python process and in a C++ program linked
against the same libtorch (`graph_gap_probe/`, built here with cmake):

  native   N x `x.add_(1)` on a [576] fp16 tensor (libtorch's own elementwise kernel on both sides)
  triton   N launches of one small Triton kernel: Triton's launcher here; in C++ the same cubin through
           cuModuleLoad + cuLaunchKernel (what AOTInductor's generated loader does)
  stream   N x `sum` of its own 2 MB fp32 buffer (360 MB at N = 180): every kernel reads from HBM, as the
           chain's GEMVs do (session 16: the runner's extra idle appears only when the weights stream)

Reads: the C++ native chain idling more -> the process (how libtorch C++ sets up CUDA); only the C++ Triton
chain -> how the kernel is loaded or launched; neither -> the AOTI packages' kernels themselves.

    python benchmarks/graph_gap_probe.py [--kernels 180] [--build /tmp/ggp] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def time_graph(body, reps: int = 5, replays: int = 20) -> list[float]:
    """us per replay of `body` captured as one graph: five timings of 20 replays (the C++ half's method)."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        body()  # warm: compile and load outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            body()
        for _ in range(50):
            g.replay()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(replays):
                g.replay()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1000.0 / replays)
    return out


def build(build_dir: str) -> str:
    src = os.path.join(HERE, "graph_gap_probe")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", src, "-B", build_dir, f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    return os.path.join(build_dir, "graph_gap_probe")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=180, help="kernels per captured chain (the step's chain: 180)")
    ap.add_argument("--build", default="/tmp/graph_gap_probe", help="cmake build folder for the C++ half")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.kernels < 1:
        print(f"graph_gap_probe: --kernels must be >= 1, got {args.kernels}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("graph_gap_probe: needs CUDA (the H200 machine)", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl

    @triton.jit
    def _inc(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)

    n = args.kernels
    x = torch.zeros(576, dtype=torch.float16, device="cuda")
    compiled = _inc[(1,)](x, x.numel(), BLOCK=1024, num_warps=4)
    t0 = time.perf_counter()
    try:
        exe = build(args.build)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"graph_gap_probe: cannot build the C++ half with cmake in {args.build} ({e}); cmake and g++ must be "
              "on PATH", file=sys.stderr)
        return 2
    build_s = time.perf_counter() - t0
    cubin = os.path.join(args.build, "inc.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    md = compiled.metadata
    py_native = time_graph(lambda: [x.add_(1) for _ in range(n)])
    py_triton = time_graph(lambda: [_inc[(1,)](x, x.numel(), BLOCK=1024, num_warps=4) for _ in range(n)])
    bufs = [torch.ones(512 * 1024, device="cuda") for _ in range(n)]
    y = torch.zeros((), device="cuda")
    py_stream = time_graph(lambda: [torch.sum(b, 0, out=y) for b in bufs])
    r = subprocess.run([exe, str(n), cubin, md.name, str(md.num_warps), str(md.shared)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return 1
    cpp = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {("python", "native"): py_native, ("python", "triton"): py_triton,
            ("cpp", "native"): cpp["native_us"], ("cpp", "triton"): cpp["triton_us"],
            ("python", "stream"): py_stream, ("cpp", "stream"): cpp["stream_us"]}
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {n} kernels per graph | C++ build {build_s:.0f} s")
    print("| chain | side | us per replay (median of 5) | us per kernel |\n|---|---|---|---|")
    per = {}
    for (side, chain), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = statistics.median(v) if v else float("nan")
        per[f"{side}_{chain}_us_per_kernel"] = round(med / n, 4)
        print(f"| {chain} | {side} | {med:.1f} | {med / n:.3f} |")
    for chain in ("native", "triton", "stream"):
        d = per[f"cpp_{chain}_us_per_kernel"] - per[f"python_{chain}_us_per_kernel"]
        print(f"{chain}: C++ - Python = {d:+.3f} us per kernel")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": n,
                       "runs_us_per_replay": {f"{s}_{c}": v for (s, c), v in rows.items()}, **per}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
