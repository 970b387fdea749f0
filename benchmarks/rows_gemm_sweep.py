"""The tree's multi-row matmuls at Llama-2-7B widths (fp16), or SmolLM2's (fp32, `--shape smollm2`), on a GPU:
cuBLAS against the two rows kernels (issue t3).

For each weight of the 7B tree step (the verification's 25 rows and the draft levels' 8 rows: q/k/v, o, gate/up,
down, the LM head, the draft's fc and its 8704-row head), device time per call inside a CUDA graph, the weight
rotated over enough copies that L2 never holds it (`plugins.triton_gemv._graph_us`, as the product's tuner times):
  - `mm`: cuBLAS alone (F.linear, no prologue or residual): the floor a library gives;
  - `eager`: the op's eager reference (the prologue's ops + cuBLAS + the residual add), the tuner's EAGER;
  - every `ROW_CONFIGS` entry (`_rows_kernel`, mma.sync) and every turned config (`_rows_t_kernel`, warpgroup MMA,
    split-K; 3xTF32 for fp32): the product's list, plus 24 more on the 7B verification's four layer shapes with
    `--wide`; in fp32 (`--shape smollm2`) the tuner's own list (`row_candidates`);
  - where K <= `WHOLE_K_MAX` (SmolLM2's shapes), every whole-K config (`_rows_k_kernel`: whole weight rows in
    registers, the rows a few at a time on the FMA units);
  - the tuner's pick (`triton_fused_linear` inside `multi_row_kernel()`).
Prints one row per shape (us and GB/s of the weight stream) and writes JSON.

    PYTHONPATH=$PWD python3 benchmarks/rows_gemm_sweep.py --out $OUT/rows_sweep.json
    PYTHONPATH=$PWD python3 benchmarks/rows_gemm_sweep.py --shape smollm2 --out $OUT/rows_sweep_smollm2.json
    PYTHONPATH=$PWD python3 benchmarks/rows_gemm_sweep.py --w8 --out $OUT/rows_sweep_w8.json   # the int8 draft's

`--w8` times the 7B draft's 8-row shapes with int8 weights (the CUDA default draft's `--draft-quant auto`), as the
tree's levels call them (the bare matmul), on the tuner's int8 list, the wider ROW_CONFIGS_W8 / ROW_T_CONFIGS_W8
included; its GB/s count the int8 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

# the sweep times the tuner's pick in this process: never read it from the on-disk store (plugins/compile_cache.py)
os.environ["SPECEE_TUNE_CACHE"] = "0"

# (name, N, K, prologue, residual, rows)
SHAPES = [
    ("verify qkv", 12288, 4096, "rmsnorm", False, 25),
    ("verify o", 4096, 4096, "none", True, 25),
    ("verify gate_up", 22016, 4096, "rmsnorm", False, 25),
    ("verify down", 4096, 11008, "silu_mul", True, 25),
    ("verify head", 32000, 4096, "none", False, 25),
    ("draft fc", 4096, 8192, "none", False, 8),
    ("draft qkv", 12288, 4096, "rmsnorm", False, 8),
    ("draft o", 4096, 4096, "none", True, 8),
    ("draft gate_up", 22016, 4096, "rmsnorm", False, 8),
    ("draft down", 4096, 11008, "silu_mul", True, 8),
    ("draft head", 8704, 4096, "none", False, 8),
]
# SmolLM2-135M in fp32, as the tree's layers call the op (`model_step.rows_fused`: the matmul, no prologue)
SMOL_SHAPES = [
    ("verify qkv", 960, 576, "none", False, 25),
    ("verify o", 576, 576, "none", False, 25),
    ("verify gate_up", 3072, 576, "none", False, 25),
    ("verify down", 576, 1536, "none", False, 25),
    ("verify head", 49152, 576, "none", False, 25),
    ("draft fc", 576, 1152, "none", False, 8),
    ("draft qkv", 960, 576, "none", False, 8),
    ("draft gate_up", 3072, 576, "none", False, 8),
    ("draft down", 576, 1536, "none", False, 8),
    ("draft head", 8192, 576, "none", False, 8),
]


def wide_t_configs() -> list[tuple]:
    return [("t", bn, bk, sp, 4, ns) for bn, bk in ((64, 128), (64, 256), (128, 64), (128, 128)) for sp in (1, 2, 4)
            for ns in (3, 4)]


def _us(launch, n: int):
    from specee_compile.plugins import triton_gemv as T

    try:
        return round(T._graph_us(launch, n), 2)
    except Exception as err:  # noqa: BLE001 - a config this card cannot run: recorded
        torch.cuda.synchronize()
        return repr(err)[:120]


def sweep_shape(name: str, N: int, K: int, pro: str, res: bool, rows: int, wide: bool, g,
                dt: torch.dtype = torch.float16, w8: bool = False) -> dict:
    """One shape: cuBLAS alone, the eager reference, every rows config, the tuner's pick; prints its table row.
    w8: int8 weights with per-row scales (the quantized draft's): "mm" stays cuBLAS on the 16-bit weight (the floor
    at twice the bytes), GB/s counts the int8 bytes, and the configs are the tuner's int8 list."""
    from specee_compile.ops import fused_linear_reference, multi_row_kernel, quantize_rows
    from specee_compile.plugins import triton_gemv as T

    dev = torch.device("cuda")
    kin = 2 * K if pro == "silu_mul" else K
    x = torch.randn(1, rows, kin, device=dev, generator=g, dtype=dt)
    w = torch.randn(N, K, device=dev, generator=g, dtype=dt) * 0.02
    w16, scale = w, None
    if w8:
        w, scale = quantize_rows(w)
    r = torch.randn(1, rows, N, device=dev, generator=g, dtype=dt) if res else None
    nw = torch.ones(K, device=dev, dtype=dt)
    nbytes = w.numel() * w.element_size()
    ws = [w] + [torch.empty_like(w) for _ in range(T.tune_copies(nbytes) - 1)]
    n = max(16, len(ws))
    xs = x if pro != "silu_mul" else x[..., :K].contiguous()
    e = {"name": name, "N": N, "K": K, "prologue": pro, "residual": res, "rows": rows, "MB": round(nbytes / 1e6, 1),
         "int8": w8}
    w16s = [w16] + [torch.empty_like(w16) for _ in range(T.tune_copies(w16.numel() * 2) - 1)] if w8 else ws
    e["mm_us"] = _us(lambda i: torch.nn.functional.linear(xs, w16s[i % len(w16s)]), max(16, len(w16s)))
    e["eager_us"] = _us(lambda i: fused_linear_reference(x, ws[i % len(ws)], r, nw, 1e-5, pro, scale), n)
    y, a, kw = T.rows_args(x, w, r, nw, 1e-5, T.PROLOGUES[pro], scale)
    ref = fused_linear_reference(x, w, r, nw, 1e-5, pro, scale)
    e["configs"] = {}
    cands = T.row_candidates(dt, T.PROLOGUES[pro], w8, K)
    if dt != torch.float32 and not w8:  # every config of the kernels, not only the tuner's list
        cands = [*T.ROW_CONFIGS, *(dict.fromkeys([*T.ROW_T_CONFIGS, *wide_t_configs()]) if wide else T.ROW_T_CONFIGS),
                 *(T.ROW_K_CONFIGS if K <= T.WHOLE_K_MAX else [])]
    for cfg in cands:
        t = _us(lambda i, c=cfg: T._rows_launch(a, kw, c, ws[i % len(ws)]), n)
        if isinstance(t, float):  # the config computes the op (against the eager reference)
            T._rows_launch(a, kw, cfg)
            err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
            if err > (1e-2 if dt != torch.float32 else 1e-5):
                t = f"wrong: max rel err {err:.3g}"
        e["configs"][",".join(map(str, cfg))] = t
    T._TUNE_CACHE.clear()
    with multi_row_kernel():
        T.triton_fused_linear(x, w, r, nw, 1e-5, pro, scale)
    pick = next(v for k, v in T._TUNE_CACHE.items() if k[0] == "rows" and k[2:4] == (N, K))
    e["tuned_pick"] = pick if pick == T.EAGER else ",".join(map(str, pick))
    ok = {c: t for c, t in e["configs"].items() if isinstance(t, float)}
    old = {c: t for c, t in ok.items() if not c.startswith(("t,", "k,"))}
    new = {c: t for c, t in ok.items() if c.startswith("t,")}
    whole = {c: t for c, t in ok.items() if c.startswith("k,")}
    bo = min(old, key=old.get) if old else None
    bt = min(new, key=new.get) if new else None
    bk = min(whole, key=whole.get) if whole else None
    e["best_rows"], e["best_turned"], e["best_whole_k"] = bo, bt, bk
    e["turned_vs_mm"] = round(e["mm_us"] / new[bt], 3) if bt and isinstance(e["mm_us"], float) else None

    def gbs(t, b=nbytes):
        return f"{t:.1f} ({b / t / 1e3:.0f})" if isinstance(t, float) else str(t)

    mm = gbs(e["mm_us"], w16.numel() * w16.element_size())  # cuBLAS reads the 16-bit weight
    print(f"| {name} | {rows} | {mm} | {gbs(e['eager_us'])} | {bo}: {gbs(old.get(bo))} | "
          f"{bt}: {gbs(new.get(bt))} | {bk}: {gbs(whole.get(bk))} | {e['tuned_pick']} | {e['turned_vs_mm']} |",
          flush=True)
    return e


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--wide", action="store_true", help="sweep 24 turned configs on the verification's shapes")
    ap.add_argument("--shape", choices=("7b", "smollm2"), default="7b",
                    help="7b: Llama-2-7B widths in fp16; smollm2: SmolLM2-135M's in fp32")
    ap.add_argument("--w8", action="store_true", help="7b: the draft's 8-row shapes only, with int8 weights (the "
                    "product's CUDA default draft), every config of the tuner's int8 list")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    if args.out:  # before any GPU time: a result that cannot be written is found now, not after the sweep
        from specee_compile.api import check_output_file
        from specee_compile.errors import SpecEEError

        try:
            check_output_file(args.out, "--out")
        except SpecEEError as e:
            print(f"rows_gemm_sweep: {e}", file=sys.stderr)
            return 2
    if args.w8 and args.shape != "7b":
        print("rows_gemm_sweep: --w8 sweeps the 7B draft's int8 shapes; drop --shape smollm2 (its draft is not int8)",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("rows_gemm_sweep: a CUDA GPU is needed; run it on the device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    out = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": args.commit,
           "command": " ".join(["python", *sys.argv]), "shapes": []}
    print("| shape | rows | mm us (GB/s) | eager us | best rows | best turned | best whole-K | tuned pick | "
          "turned vs mm |")
    print("|---|---|---|---|---|---|---|---|---|")
    out["shape"], out["dtype"], out["int8"] = args.shape, "float16" if args.shape == "7b" else "float32", args.w8
    shapes = SHAPES if args.shape == "7b" else SMOL_SHAPES
    if args.w8:  # as the tree's draft levels call them: the bare matmul (`rows_fused`'s "matmul" op)
        shapes = [(s[0], s[1], s[2], "none", False, s[5]) for s in shapes if s[0].startswith("draft")]
    for shape in shapes:
        wide = args.wide and args.shape == "7b" and shape[0].startswith("verify") and shape[0] != "verify head"
        e = sweep_shape(*shape, wide=wide, g=g, dt=getattr(torch, out["dtype"]), w8=args.w8)
        out["shapes"].append(e)
        torch.cuda.empty_cache()
    if args.out:
        from specee_compile.artifacts import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
