"""The one-row decode step's kernels, the Python CUDA step's vs the C++ runner's package (CUDA only).

    PYTHONPATH=. python benchmarks/one_row_kernels.py [--shape smollm2] [--chain | --chain-only] [--json F]

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
package into a Python process crashed it on the H200, sessions 8 and 10).

`--chain` adds the one-row layer whole, compiled several ways in this process (no package is loaded), each
chained over L layers and captured: the product's own compiled layer (`layer_direct`'s), the Python step's
layer from `make_layer_fn` (the `specee` ops, S static), the package's layer (the `specee_aoti` twins) with
the attended length S dynamic as `layer1.pt2` has it (its attention on the caller's workspace, one for every
layer), the same with S static, the twin layer whose attention allocates its workspace per call (a probe op:
the package before session 12), and last the
product's layer again after its Triton kernels got the attribute an AOTI package's loader sets
(`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` = their shared memory). Per variant: one layer call
and the chain as CUDA-graph replays, the chain's device time per kernel (torch.profiler) and their sum per
layer (the chain's time minus that sum = idle time between kernels). `--chain-only`: the product layer, the
twin layer, the twin layer whose attention allocates its workspace per call, and the attribute row.
`--attrs`: the product chain and the twin chain with each kernel function's attributes, then the twin's chain
under uniform attributes. Session 12 (GPU_NOTES): the two chains' functions have the same attributes, and this
probe's idle time per layer varies from run to run for the product's own layer (19.4-22.9 us per chained layer
over sessions 11-12), so a row here differs from another only past that spread.
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
    ap.add_argument("--chain", action="store_true", help="also the whole one-row layer, three ways (see above)")
    ap.add_argument("--chain-only", action="store_true", help="only the chain: the product layer, the package twin "
                    "and the product layer with AOTI's kernel attribute")
    ap.add_argument("--attrs", action="store_true", help="only the chain of the product layer and the package twin, "
                    "with each kernel's function attributes, then the twin's chain again under uniform attributes")
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

    if not a.chain_only:
        kernel_rows(add, SHAPES[a.shape], dev, t, us)
    chain = []
    if a.chain or a.chain_only or a.attrs:
        print("\n| one-row layer, compiled as | one call, us | per layer in the chain of 30, us | the chain's kernels, us "
              "each |\n|---|---|---|---|", flush=True)

        def add_chain(*row):
            chain.append(row)
            print(f"| {row[0]} | {row[1]:.2f} | {row[2]:.2f} | {row[3]} |", flush=True)

        chain_rows(add_chain, SHAPES[a.shape], dt, a_only=a.chain_only or a.attrs, attrs=a.attrs)
    if a.json:
        record = [dict(zip(("kernel", "python_us", "package_us", "note"), r)) for r in rows]
        record += [dict(zip(("layer", "one_call_us", "chain_us_per_layer", "kernels"), r)) for r in chain]
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
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
        ws = torch.empty(A.workspace_numel(H, hd), dtype=torch.float32, device=dev)
        py = us(A.triton_decode_attention, q, kc, vc, valid, pos)
        tw = us(torch.ops.specee_aoti.decode_attention, q, kc, vc, valid, pos, cnt, ws)
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


SMEM_ATTR = "product layer, the plugin kernels with AOTI's max-dynamic-smem attribute"


def chain_rows(add, shape, dt, layers: int = 30, S: int = 64, a_only: bool = False, attrs: bool = False) -> None:
    """One-row layer calls and their chain, compiled three ways (module docstring); rows (variant, one call
    us, us per layer in the chain, the chain's kernels: name, calls per chain, device us per call)."""
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    from specee_compile.backends import aoti_export as ax
    from specee_compile.backends.cuda_step import replay_time
    from specee_compile.model_step import CUDA_FUSED, extract_weights
    from specee_compile.ops import register_cuda_kernels
    from specee_compile.plugins.triton_decode_attention import workspace_numel

    register_cuda_kernels()
    D, H, Hkv, I, V = shape
    cfg = LlamaConfig(hidden_size=D, intermediate_size=I, num_hidden_layers=layers, num_attention_heads=H,
                      num_key_value_heads=Hkv, vocab_size=V, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).to("cuda", dt).eval()
    w = extract_weights(model, 512)
    spec, dev, T = w.spec, w.head.device, 513
    hd = spec.head_dim
    fused1 = ax.one_row_fused(spec, dev)
    lws = [[x for x in w.layers[i].as_tuple() if x is not None] for i in range(layers)]
    kc = [torch.randn(Hkv, T, hd, device=dev).to(dt) for _ in range(layers)]
    vc = [torch.randn(Hkv, T, hd, device=dev).to(dt) for _ in range(layers)]
    valid = [torch.arange(T, device=dev) < S - 1 for _ in range(layers)]
    pos, keys, keys_dyn = torch.tensor([S - 1], device=dev), torch.arange(S, device=dev), torch.arange(S, device=dev)
    torch._dynamo.mark_dynamic(keys_dyn, 0, min=2, max=512)  # as layer1.pt2's Dim S
    cnt = torch.zeros(H, dtype=torch.int32, device=dev)
    ax._tune_one_row(spec, fused1, lws[0])
    opts = {"coordinate_descent_tuning": True}  # the Python step's and the export's Inductor options

    def compiled(module):
        return torch.compile(module, dynamic=False, options=opts)

    py = compiled(ax.LayerFn(spec, False, CUDA_FUSED, ops="specee"))
    tw_dyn = compiled(ax.RowLayerFn(spec, False, fused1, ops="specee_aoti"))
    tw_static = compiled(ax.RowLayerFn(spec, False, fused1, ops="specee_aoti"))
    ws = torch.empty(workspace_numel(H, hd), dtype=torch.float32, device=dev)
    tw_alloc = compiled(_with_allocating_attention(lambda: ax.RowLayerFn(spec, False, fused1, ops="specee_aoti")))
    seg = _product_segments(model, dt)  # the product's compiled layer (the Python CUDA step's chain)
    keys8 = torch.empty(S, dtype=torch.int8, device=dev)

    def product(i, x):
        return seg._layer_c(*seg.segmented.layer_args(seg.weights, i, x, pos, keys8, valid[i], kc[i], vc[i]))

    def twin(module, keys_arg):
        return lambda i, x: module(x, pos, keys_arg, valid[i], w.cos, w.sin, kc[i], vc[i], cnt, ws, *lws[i])

    variants = {"product layer (seg.layer_direct's compile)": product}
    if not a_only:
        variants["python step (specee ops, S static)"] = lambda i, x: py(x, pos, keys, valid[i], w.cos, w.sin, kc[i],
                                                                          vc[i], *lws[i])
    variants["package twin (S dynamic, as layer1.pt2)"] = twin(tw_dyn, keys_dyn)
    if not attrs:
        variants["package twin, the attention's workspace allocated per call (before s12)"] = twin(tw_alloc, keys_dyn)
    if not a_only:
        variants["package twin, S static"] = twin(tw_static, keys)
    if not attrs:
        variants[SMEM_ATTR] = product  # last: the attribute stays on the kernels
    h0 = torch.randn(1, 1, D, device=dev).to(dt)

    def graph(fn):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    def replay_us(g):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.2:  # clocks up before a short timing window
            g.replay()
            torch.cuda.synchronize()
        return replay_time(g.replay, 50) * 1e6

    outs = {}
    with torch.no_grad():
        for name, f in variants.items():
            def chain(f=f, name=name):
                x = h0
                for i in range(layers):
                    x = f(i, x)
                outs[name] = x

            if name == SMEM_ATTR:
                _aoti_smem_attribute()
            try:  # a variant that does not compile (e.g. S specialized against the mark) leaves the others
                one, whole = graph(lambda f=f: f(0, h0)), graph(chain)
            except Exception as e:  # noqa: BLE001 - reported in the table, the other variants still run
                add(name, float("nan"), float("nan"), f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            one_us, chain_us = replay_us(one), replay_us(whole)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    whole.replay()
                torch.cuda.synchronize()
            ev = sorted(((e.device_time_total / e.count, e.count // 10, e.key) for e in prof.key_averages()
                         if e.device_time_total > 0), key=lambda r: -r[0] * r[1])
            busy = sum(u * c for u, c, _ in ev) / layers  # kernel device time per layer: chain_us - busy = gaps
            add(name, one_us, chain_us / layers, f"kernels {busy:.2f} per layer: "
                + "; ".join(f"{k[:48]} x{c} {u:.2f}" for u, c, k in ev))
    ref = next(iter(outs.values())).float()
    for name, x in outs.items():
        print(f"  {name}: max |chain output - python step's| = {(x.float() - ref).abs().max().item():.3g}")
    if attrs:
        try:
            with torch.no_grad():
                attr_rows(add, {k: variants[k] for k in list(variants)[:2]}, h0, layers, replay_us)
        except Exception as e:  # noqa: BLE001 - a probe: say what failed, keep the rows taken
            print(f"  attribute probe failed: {type(e).__name__}: {e}")


ATTRS = {"max_dyn_smem": 8, "carveout": 9, "regs": 4, "static_smem": 1, "local": 3, "cache_ca": 7}


def attr_rows(add, variants: dict, h0, layers: int, replay_us) -> None:
    """Each kernel function of the two chains (the product layer's, the package twin's) with its attributes
    (`cuFuncGetAttribute`, read from the captured graph's kernel nodes), then the twin's chain re-captured and
    timed after its functions get uniform attributes, one setting on top of the last: the dynamic shared
    memory limit back to the default (48 KB - static), the carveout preference 0 (most L1), then 100 (most
    shared memory). Which attribute, if any, is the package chain's idle time between kernels (GPU_NOTES s11-12)."""
    import ctypes

    from graph_census import kernel_nodes

    cu = ctypes.CDLL("libcuda.so.1")

    def functions(fn) -> dict:
        x = h0
        g = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(g):
            for i in range(layers):
                x = fn(i, x)
        return {rec["handle"]: rec["name"] for rec in kernel_nodes(g.raw_cuda_graph()) if rec["handle"]}

    def get(func, attr):
        v = ctypes.c_int(-99)
        cu.cuFuncGetAttribute(ctypes.byref(v), attr, ctypes.c_void_p(func))
        return v.value

    funcs = {}
    for label, fn in variants.items():
        funcs[label] = functions(fn)
        print(f"\n{label}: kernel functions and attributes\n| kernel | " + " | ".join(ATTRS) + " |\n|---|"
              + "---|" * len(ATTRS))
        for func, name in funcs[label].items():
            print(f"| {name[:60]} | " + " | ".join(str(get(func, a)) for a in ATTRS.values()) + " |", flush=True)
    label, fn = list(variants.items())[-1]
    settings = [("max_dyn_smem = 48 KB - static", lambda f: cu.cuFuncSetAttribute(
                    ctypes.c_void_p(f), 8, ctypes.c_int(49152 - get(f, 1)))),
                ("+ carveout 0", lambda f: cu.cuFuncSetAttribute(ctypes.c_void_p(f), 9, ctypes.c_int(0))),
                ("+ carveout 100", lambda f: cu.cuFuncSetAttribute(ctypes.c_void_p(f), 9, ctypes.c_int(100)))]
    for what, setter in settings:
        rc = [setter(f) for f in funcs[label]]

        def chain(fn=fn):
            x = h0
            for i in range(layers):
                x = fn(i, x)

        chain()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain()
        add(f"{label}, {what} (rc {sorted(set(rc))})", float("nan"), replay_us(g) / layers, "")


def _aoti_smem_attribute() -> None:
    """Set CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = shared on every loaded plugin Triton kernel that
    uses shared memory, as an AOTI package's loader does for each of its kernels (`loadKernel`: shared > 0);
    Triton's own loader sets it only past 48 KB. The attribute is the function's: later variants keep it."""
    import ctypes

    from specee_compile.plugins import triton_decode_attention as A
    from specee_compile.plugins import triton_gemv as G

    cuda = ctypes.CDLL("libcuda.so.1")
    n = 0
    for fn in (G._gemv_kernel, A._decode_attn_kernel, A._aoti_attn_kernel):
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                k._init_handles()
                if k.metadata.shared > 0:
                    rc = cuda.cuFuncSetAttribute(ctypes.c_void_p(k.function), 8, ctypes.c_int(k.metadata.shared))
                    n += rc == 0
    print(f"  max-dynamic-smem attribute set on {n} kernels", flush=True)


def _product_segments(model, dt):
    """The inductor backend's segments of `model` (what the Python CUDA step chains, `layer_direct`)."""
    from specee_compile.backends import make_segments
    from specee_compile.config import Settings

    return make_segments(model, Settings(device="cuda", backend="inductor", dtype=str(dt).split(".")[-1]))


def _with_allocating_attention(build):
    """build() with the layer's attention as a probe op `specee_probe::attention_alloc`: the package's attention
    as it was before session 12, allocating its fp32 workspace in every call instead of taking the caller's
    (ignores the `ws` input). The row beside the package twin's measures what the caller's workspace saves."""
    from specee_compile import model_step as ms
    from specee_compile.plugins import triton_decode_attention as A

    if not hasattr(torch.ops.specee_probe, "attention_alloc"):
        from torch.library import triton_op, wrap_triton

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor,
                      counters: torch.Tensor) -> torch.Tensor:
            H, _, hd = q.shape
            q = q.contiguous()
            o = torch.empty_like(q)
            ws = torch.empty(A.workspace_numel(H, hd), dtype=torch.float32, device=q.device)
            S = k.shape[1]
            assert A.splits_for(A._upper(S))[1] == 1  # one block per split: every S up to 1024
            wrap_triton(A._decode_attn_kernel)[(H, (S + A.BLOCK_S - 1) // A.BLOCK_S)](
                q, k, v, valid, pos, o, ws, counters, S, 1.0 / math.sqrt(hd), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), HD=hd, REP=H // k.shape[0], BLOCK_S=A.BLOCK_S, BLOCKS_PER_SPLIT=1,
                MAX_SPLITS=A.MAX_SPLITS, num_warps=A.NUM_WARPS)
            return o

        triton_op("specee_probe::attention_alloc", attention, mutates_args={"counters"})
    op = torch.ops.specee_probe.attention_alloc
    orig = ms._fused_op
    ms._fused_op = lambda ns, name: ((lambda q, k, v, valid, pos, counters, ws: op(q, k, v, valid, pos, counters))
                                     if name == "decode_attention" else orig(ns, name))
    try:
        return build()
    finally:
        ms._fused_op = orig


if __name__ == "__main__":
    sys.exit(main())
