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
  gemv     the product's `_gemv_kernel` in the decode chain's pattern (SmolLM2: 4 GEMVs per layer, 30 layers,
           fp32, each layer its own weights: `gemv_hbm`; layer 0's every time: `gemv_l2`); in C++ its cubins
           by cuLaunchKernel, loaded from a file or from memory, and recompiled with eps as fp64 (the AOTI
           wrapper's argument layout). The runner's chain idles ~0.3 us more per kernel than Python's only
           in the hbm case (cpp_bench, session 16): if these hand launches do not, the package's kernels carry it
           (session 17: they do not; C++ 2.85 vs Python 3.20 us per kernel, eps fp64 and loading from memory
           change nothing)
  --package  the same chain with an AOTI package's own GEMV cubins (`layer1.pt2` of cpp_bench's export),
           launched by hand with its wrapper's grids: idling like the runner -> the package's modules carry
           the gap; not -> the wrapper's launches (its `run()`) do

Reads: the C++ native chain idling more -> the process (how libtorch C++ sets up CUDA); only the C++ Triton
chain -> how the kernel is loaded or launched; neither -> the AOTI packages' kernels themselves.

    PYTHONPATH=. python benchmarks/graph_gap_probe.py [--kernels 180] [--layers 30] [--build /tmp/ggp] [--json F]
        [--package OUT/layer1.pt2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile

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


# SmolLM2's four GEMVs per layer, fp32: (N, K, prologue, residual, config (BLOCK_N, BLOCK_K, SPLIT, warps, stages)),
# the configs the H200's tuner picked in every process of session 16 (cpp_bench's "GEMV configs" line)
SMOL_GEMVS = (
    (960, 576, 1, False, (4, 1024, 1, 4, 1)),  # qkv (RMSNorm prologue)
    (576, 576, 0, True, (2, 1024, 1, 4, 1)),  # o (+ residual)
    (3072, 576, 1, False, (4, 1024, 1, 4, 1)),  # gate/up (RMSNorm prologue)
    (576, 1536, 2, True, (2, 4096, 1, 16, 1)),  # down (SiLU(gate) * up prologue, + residual)
)


def gemv_chain(build_dir: str, layers: int, package_lines: list[str]) -> tuple[dict, str]:
    """The product's `_gemv_kernel` in the decode chain's pattern (4 GEMVs per layer, each layer its own weights,
    ~14 MB per layer, 420 MB at 30 layers), captured and timed here through Triton's launcher, on per-layer
    weights (hbm) and on layer 0's weights every time (l2). Writes the C++ half's spec: the four cubins as
    compiled here (eps fp32) and recompiled with eps as fp64 (the AOTI wrapper's argument layout)."""
    import triton
    from triton.compiler import ASTSource

    from specee_compile.plugins.triton_gemv import _launch

    dev, D = "cuda", SMOL_GEMVS[0][1]
    gen = torch.Generator(device=dev).manual_seed(0)
    w = [[torch.randn(n, k, device=dev, generator=gen) * 0.02 for n, k, *_ in SMOL_GEMVS] for _ in range(layers)]
    ln, att = torch.ones(D, device=dev), torch.randn(D, device=dev, generator=gen)
    h = [torch.randn(D, device=dev, generator=gen)] + [torch.empty(D, device=dev) for _ in range(layers)]
    qkv = [torch.empty(SMOL_GEMVS[0][0], device=dev) for _ in range(layers)]
    h1 = [torch.empty(D, device=dev) for _ in range(layers)]
    gu = [torch.empty(SMOL_GEMVS[2][0], device=dev) for _ in range(layers)]
    ws = [(torch.zeros(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, dtype=torch.int32, device=dev))
          for n, *_ in SMOL_GEMVS]
    compiled = [None] * 4

    def launch(j, x, wt, res, nw, y):  # the product's launch (triton_gemv._launch)
        n, k, pro, has_res, cfg = SMOL_GEMVS[j]
        compiled[j] = _launch((x, wt, res, nw, y, *ws[j], n, 1e-5), {"K": k, "PRO": pro, "HAS_RES": has_res}, cfg)

    def chain(same: bool):  # the product's argument choices: res = y and norm_w = x when there is none
        for i in range(layers):
            lw = w[0 if same else i]
            launch(0, h[i], lw[0], qkv[i], ln, qkv[i])
            launch(1, att, lw[1], h[i], att, h1[i])
            launch(2, h1[i], lw[2], gu[i], ln, gu[i])
            launch(3, gu[i], lw[3], h1[i], gu[i], h[i + 1])

    out = {"hbm": time_graph(lambda: chain(False)), "l2": time_graph(lambda: chain(True))}
    lines = [f"layers {layers}"]
    for j, ck in enumerate(compiled):
        n, k, pro, has_res, (bn, _, sp, nwarps, ns) = SMOL_GEMVS[j]
        src = ck.src
        f64 = triton.compile(ASTSource(src.fn, {**src.signature, "eps": "fp64"}, src.constants, src.attrs),
                             target=ck.metadata.target,
                             options={"num_warps": nwarps, "num_stages": ns})
        for tag, kern in (("f32", ck), ("f64", f64)):
            path = os.path.join(build_dir, f"gemv_{tag}_{j}.cubin")
            with open(path, "wb") as fh:
                fh.write(kern.asm["cubin"])
            md = kern.metadata
            lines.append(f"kernel {tag}_{j} {path} {md.name} {md.num_warps} {md.shared} {triton.cdiv(n, bn)} {sp} "
                         f"{n} {k} {pro} {int(has_res)} {8 if tag == 'f64' else 4}")
    lines += package_lines  # --package: the AOTI package's own cubins (package_gemvs)
    spec = os.path.join(build_dir, "gemv.spec")
    with open(spec, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return out, spec


def _split_args(text: str) -> list[str]:
    """A C++ call's arguments, split at the commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    return out + [cur.strip()] if cur.strip() else out


def package_gemvs(pt2: str, build_dir: str) -> list[str]:
    """Spec lines (slots pkg_0..3) for the four GEMV launches of an AOTI one-row layer package (`layer1.pt2`
    of a CUDA `--format aoti` export of SmolLM2's shapes, as cpp_bench writes it): the package's own cubins,
    extracted into build_dir, with the grid, warps and shared memory its wrapper launches them with. The C++
    half launches them in the same chain: if they idle like the runner's chain, the package's modules carry the
    gap; if not, its wrapper's launches do (the census shows no difference in either)."""
    import re

    with zipfile.ZipFile(pt2) as z:
        names = z.namelist()
        wrappers = [n for n in names if n.endswith(".wrapper.cpp")]
        if len(wrappers) != 1:
            raise ValueError(f"{pt2}: expected one AOTI wrapper source (*.wrapper.cpp) in the package, found "
                             f"{len(wrappers)}")
        src = z.read(wrappers[0]).decode()
        loads = {i: (os.path.basename(path), int(smem)) for i, path, smem in
                 re.findall(r'kernels_\._gemv_kernel_(\d+) = loadKernel\("([^"]+)", "_gemv_kernel", (\d+)', src)}
        warps = {i: int(w) for i, w in
                 re.findall(r"launchKernel\(kernels_\._gemv_kernel_(\d+), grid_0, grid_1, grid_2, (\d+),", src)}
        calls = re.findall(r"^\s+call__gemv_kernel_(\d+)\((.*)\);\s*$", src, flags=re.MULTILINE)
        if [len(calls), len(loads), len(warps)] != [4, 4, 4]:
            raise ValueError(f"{pt2}: expected SmolLM2's four GEMV launches in the layer package, found {len(calls)} "
                             f"calls, {len(loads)} loads, {len(warps)} launches")
        lines = []
        for j, (i, text) in enumerate(calls):
            a = _split_args(text)  # 8 tensors, N, eps, grid x, y, z, device, stream, kernels, cubin dir
            n, k, pro, has_res, _ = SMOL_GEMVS[j]
            if int(a[8]) != n:
                raise ValueError(f"{pt2}: GEMV {j} has N = {a[8]}, expected {n} (SmolLM2's shapes, fp32)")
            cubin, smem = loads[i]
            entry = [e for e in names if os.path.basename(e).endswith(cubin)]
            if len(entry) != 1:
                raise ValueError(f"{pt2}: the cubin {cubin} of GEMV {j} is not in the package")
            path = os.path.join(build_dir, f"pkg_{j}.cubin")
            with open(path, "wb") as fh:
                fh.write(z.read(entry[0]))
            gx, gy = (int(v.rstrip("L")) for v in a[10:12])
            lines.append(f"kernel pkg_{j} {path} _gemv_kernel {warps[i]} {smem} {gx} {gy} {n} {k} {pro} {int(has_res)} 8")
    return lines


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
    ap.add_argument("--layers", type=int, default=30, help="layers of the GEMV chain (SmolLM2: 30)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--package", help="an AOTI one-row layer package of SmolLM2's shapes (cpp_bench's export: "
                    "OUT/layer1.pt2): its own GEMV cubins join the C++ chains")
    args = ap.parse_args(argv)
    if args.package and not os.path.isfile(args.package):
        print(f"graph_gap_probe: --package {args.package}: no such file; expected a layer1.pt2 from cpp_bench's "
              "--format aoti export", file=sys.stderr)
        return 2
    if args.kernels < 1 or args.layers < 1:
        print(f"graph_gap_probe: --kernels and --layers must be >= 1, got {args.kernels} and {args.layers}",
              file=sys.stderr)
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
    try:  # the package is read before any timing: one that is not of the expected shape costs nothing
        pkg_lines = package_gemvs(args.package, args.build) if args.package else []
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
        print(f"graph_gap_probe: --package {args.package}: {e}", file=sys.stderr)
        return 2
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
    py_gemv, spec = gemv_chain(args.build, args.layers, pkg_lines)
    r = subprocess.run([exe, "gemv", spec], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return 1
    cpp_gemv = json.loads(r.stdout.strip().splitlines()[-1])
    gk = 4 * args.layers
    rows = {("python", "native"): (py_native, n), ("python", "triton"): (py_triton, n),
            ("cpp", "native"): (cpp["native_us"], n), ("cpp", "triton"): (cpp["triton_us"], n),
            ("python", "stream"): (py_stream, n), ("cpp", "stream"): (cpp["stream_us"], n),
            ("python", "gemv_hbm"): (py_gemv["hbm"], gk), ("python", "gemv_l2"): (py_gemv["l2"], gk),
            ("cpp", "gemv_hbm"): (cpp_gemv["f32_hbm"], gk), ("cpp", "gemv_l2"): (cpp_gemv["f32_l2"], gk),
            ("cpp", "gemv_hbm_loaddata"): (cpp_gemv["f32_hbm_loaddata"], gk),
            ("cpp", "gemv_hbm_eps_fp64"): (cpp_gemv["f64_hbm"], gk), ("cpp", "gemv_l2_eps_fp64"): (cpp_gemv["f64_l2"], gk)}
    if "pkg_hbm" in cpp_gemv:  # --package: the AOTI package's own cubins
        rows.update({("cpp", "gemv_hbm_pkg_cubins"): (cpp_gemv["pkg_hbm"], gk),
                     ("cpp", "gemv_l2_pkg_cubins"): (cpp_gemv["pkg_l2"], gk)})
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {n} kernels per graph (gemv: {gk}) | "
          f"C++ build {build_s:.0f} s")
    print("| chain | side | kernels | us per replay (median of 5) | us per kernel |\n|---|---|---|---|---|")
    per = {}
    for (side, chain), (v, k) in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = statistics.median(v) if v else float("nan")
        per[f"{side}_{chain}_us_per_kernel"] = round(med / k, 4)
        print(f"| {chain} | {side} | {k} | {med:.1f} | {med / k:.3f} |")
    for chain in ("native", "triton", "stream", "gemv_hbm", "gemv_l2"):
        d = per[f"cpp_{chain}_us_per_kernel"] - per[f"python_{chain}_us_per_kernel"]
        print(f"{chain}: C++ - Python = {d:+.3f} us per kernel")
    print("gemv: the runner's chain idled ~0.3 us more per kernel than Python's only on HBM (cpp_bench, session 16); "
          "the same here says the launch path or the process carries it, none says the AOTI package does")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": n, "gemv_kernels": gk,
                       "runs_us_per_replay": {f"{s}_{c}": v for (s, c), (v, _) in rows.items()}, **per}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
