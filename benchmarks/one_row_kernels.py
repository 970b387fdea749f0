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

    ... --package DIR    (a CUDA `export --format aoti` directory of a model of --shape, e.g. cpp_bench's --out)
    ... --whole          (the same, with the one-row packages compiled here, as the export compiles them)

add whole calls: one `layer1.pt2` call against one call of the Python CUDA step's compiled layer (the
inductor backend's `layer_direct`, on a random-weight model of the same shape), and `head1.pt2` / `head.pt2`.
The kernels a package launches are listed from its compiled kernels (the `.cubin` files inside).
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
    ap.add_argument("--package", help="a CUDA AOTI export directory of a model of --shape: time whole calls too")
    ap.add_argument("--whole", action="store_true", help="time whole calls with packages compiled here (no export)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel rows (with --package / --whole)")
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

    if not a.no_kernels:
        kernel_rows(add, SHAPES[a.shape], dev, t, us)
    if a.package or a.whole:
        for row in whole_calls(Path(a.package) if a.package else None, SHAPES[a.shape], dt, us, dev):
            add(*row)
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


def whole_calls(directory: Path | None, shape, dt, us, dev: torch.device) -> list[tuple]:
    """One layer1.pt2 call vs one call of the Python step's compiled layer; head1.pt2 (and head.pt2). The
    Python layer runs on a random-weight model of the shape; the packages come from `directory` (an export),
    or, without one, are compiled here from that model as the export compiles them (`one_row_packages`)."""
    import tempfile
    import zipfile

    import safetensors.torch

    from specee_compile.api import build_decoder
    from specee_compile.artifacts import read_manifest
    from specee_compile.backends.aoti_export import LAYER_KEYS, one_row_packages
    from specee_compile.config import Settings
    from specee_compile.eval.gpu_bench import write_random_model
    from specee_compile.model_step import extract_weights
    from specee_compile.models import load_model

    Dm, H, Hk, inter, V = shape
    T, S, p = 513, 64, 40
    with tempfile.TemporaryDirectory() as tmp:
        write_random_model({"hidden_size": Dm, "num_attention_heads": H, "num_key_value_heads": Hk,
                            "intermediate_size": inter, "vocab_size": V, "num_hidden_layers": 2,
                            "max_position_embeddings": T}, dt, "cpu", tmp)
        loaded = load_model(tmp, dtype=dt)
        if directory is None:
            w = extract_weights(loaded.model.to(dev), T - 1)
            info = {"cache_len": T, "max_len": T - 1, "hidden": Dm, "num_heads": H, "num_kv_heads": Hk,
                    "head_dim": Dm // H, "packages": {}}
            print("compiling the one-row packages:", file=sys.stderr)
            one_row_packages(w, Path(tmp), info)
            W = {"norm": w.norm, "head": w.head, "cos": w.cos, "sin": w.sin,
                 **{f"layers.0.{k}": t for k, t in zip(LAYER_KEYS, w.layers[0].as_tuple()) if t is not None}}
            pkdir = Path(tmp)
        else:
            info = read_manifest(directory)["cpp"]
            W = safetensors.torch.load_file(str(directory / info["weights"]), device=str(dev))
            pkdir = directory
        if "layer1" not in info["packages"]:
            raise SystemExit(f"{directory or 'the compiled packages'}: no layer1.pt2 (a CUDA export with triton has one)")
        D, Hkv, hd = info["hidden"], info["num_kv_heads"], info["head_dim"]
        if (D, info["num_heads"], Hkv) != shape[:3]:
            raise SystemExit(f"{directory}: hidden/heads/kv heads {(D, info['num_heads'], Hkv)} are not the shape's "
                             f"{shape[:3]}")
        dec = build_decoder(loaded, Settings(device=str(dev), dtype=str(dt).split(".")[-1], backend="inductor",
                                             max_new_tokens=4, max_context=T - 1))
        dec.generate([1, 2, 3])
        kc, vc = torch.zeros(Hkv, T, hd, device=dev, dtype=dt), torch.zeros(Hkv, T, hd, device=dev, dtype=dt)
        valid = torch.zeros(T, dtype=torch.bool, device=dev)
        valid[: p + 1] = True
        h, pos, keys = torch.randn(1, 1, D, device=dev).to(dt), torch.tensor([p], device=dev), torch.arange(S, device=dev)
        cnt = [torch.zeros(info["num_heads"], dtype=torch.int32, device=dev)] if info.get("layer1_attn_counters") else []
        lw = [W[f"layers.0.{k}"] for k in LAYER_KEYS if f"layers.0.{k}" in W]

        def cubins(name):
            with zipfile.ZipFile(pkdir / info["packages"][name]) as z:
                ks = sorted({Path(n).stem.split(".")[0] for n in z.namelist() if n.endswith(".cubin")})
            return f"{len(ks)} kernels: " + ", ".join(k[:48] for k in ks)

        # each figure goes to stderr as it is measured: a crash further on (an AOTI package loaded into a process
        # that also profiled one crashed on the H200, session 7) keeps what came before
        py_layer = us(dec.seg.layer_direct, 0, h, pos, S)
        py_head = us(dec.seg.head_direct, h)
        print(f"python step: layer {py_layer:.2f} us, head {py_head:.2f} us", file=sys.stderr, flush=True)
        layer1 = torch._inductor.aoti_load_package(str(pkdir / info["packages"]["layer1"]))
        rows = [(f"layer call S={S} (all kernels)", py_layer,
                 us(layer1, h, pos, keys, valid, W["cos"], W["sin"], kc, vc, *cnt, *lw), "layer1.pt2 " + cubins("layer1"))]
        print(f"layer1.pt2: {rows[0][2]:.2f} us", file=sys.stderr, flush=True)
        args = {"head1": (h, W["norm"], W["head"]),
                "head": (h, torch.zeros(1, dtype=torch.long, device=dev), W["norm"], W["head"])}
        for name, hargs in args.items():
            if name in info["packages"]:
                fn = torch._inductor.aoti_load_package(str(pkdir / info["packages"][name]))
                rows.append((f"{name}.pt2 call vs the Python step's head", py_head, us(fn, *hargs), cubins(name)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
