"""Does the 7B tree decode under SPECEE_PDL, and which kernel fails where it does not? A short, narrow call.

Session 25's bench saw the 7B tree rows fail under SPECEE_PDL=ops with Triton's OutOfResources (245760 bytes of
shared memory asked, 232448 the H100's limit) and no kernel named, while dense and SpecEE ran under it with
identical tokens. Offline sm_90 compiles of every plugin kernel config at 7B shapes rule the plugin kernels out
(benchmarks/GPU_NOTES.md, sessions 25-26). This builds what the bench's tree35 rows build (7B shapes, random fp16
weights, the fixed tree program driven by the mean-3.5 acceptance trace, the sharpened random draft) with PDL off,
then under each mode on segments of its own, and for each reports whether its tokens are the PDL-off row's (the trace
forces what a step accepts, so not dense greedy's: the same check as the bench's `*_pdl_tokens_identical`), tok/s (one process, not the bench's
interleaved rounds: a go/no-go, not a figure for RESULTS.md) or the failure with the Triton kernels on its stack.

    python benchmarks/pdl_tree_check.py --modes ops,all --new 64 --out pdl_tree.json
    python benchmarks/pdl_tree_check.py --tiny --device cpu   # a dry run of the script (PDL is a no-op there)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model shapes (a dry run)")
    ap.add_argument("--modes", default="ops,all", help="comma list of SPECEE_PDL modes to try after PDL off")
    ap.add_argument("--quants", default="none,int8", help="comma list of draft_quant values (each mode runs each)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    from specee_compile.api import build_decoder
    from specee_compile.config import Settings
    from specee_compile.eval.gpu_bench import (
        LLAMA2_7B,
        TINY,
        TRACE_SPREAD,
        UnderPdl,
        accept_trace,
        failure_frames,
        int8_copy,
        random_artifacts,
        sharpen_draft,
        write_random_model,
    )
    from specee_compile.models import load_model
    from specee_compile.plugins import pdl
    from specee_compile.runtime.policies import trace_accepts

    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(pdl.MODES)) + sorted(set(args.quants.split(",")) - {"none", "int8"})
    if bad:  # before the model is written
        ap.error(f"unknown {bad}: --modes takes {', '.join(pdl.MODES)}, --quants none, int8")
    if args.out:
        from specee_compile.api import check_output_file
        from specee_compile.errors import SpecEEError

        try:
            check_output_file(args.out, "--out")
        except SpecEEError as e:
            ap.error(str(e))
    dev = torch.device(args.device)
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    shape = TINY if args.tiny else LLAMA2_7B
    with tempfile.TemporaryDirectory(prefix="specee-pdl-") as d:
        write_random_model(shape, dt, dev, d)
        loaded = load_model(d, dtype=dt, device=str(dev))
    P, N = args.prompt_len, args.new
    prompt = torch.randint(0, shape["vocab_size"], (P,), generator=torch.Generator().manual_seed(0)).tolist()
    base = dict(device=str(dev), dtype=str(dt).replace("torch.", ""), backend="inductor",
                max_context=((P + N + 64 + 63) // 64) * 64, max_new_tokens=N)
    L = shape["num_hidden_layers"]
    _program, draft, _ = random_artifacts(loaded, [L] * 8)
    drafts = {"none": draft}
    tr = accept_trace(4096, 3.5)
    out = {"card": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
           "rows": {}}

    def tree_settings(quant):
        return Settings(**base, speculate="tree", tree_program="fixed", tree_lookup=False, draft_quant=quant)

    ref: dict = {}  # quant -> the PDL-off tree row's tokens
    seeded = False
    for mode in ["0", *modes]:
        dense = UnderPdl(mode, lambda: build_decoder(loaded, Settings(**base)))
        if not seeded:
            sharpen_draft(draft, dense.seg, prompt, spread=TRACE_SPREAD)
            if "int8" in args.quants.split(","):
                drafts["int8"] = int8_copy(draft, loaded.model)
            seeded = True
        for quant in [q for q in args.quants.split(",") if q]:
            name = f"tree35{'_q8' if quant == 'int8' else ''}@pdl={mode}"
            t0 = time.time()
            try:
                dec = UnderPdl(mode, lambda q=quant, seg=dense.seg: build_decoder(loaded, tree_settings(q), segments=seg,
                                                                   draft=drafts[q], accept=trace_accepts(tr)))
                first = dec.generate(prompt)
                res = dec.generate(prompt)
                row = {"ok": True, "setup_s": round(time.time() - t0, 1), "tok_s": round(res.decode_tok_s, 1),
                       "first_tok_s": round(first.decode_tok_s, 1),
                       "identical_to_pdl_off": ref.setdefault(quant, res.token_ids) == res.token_ids,
                       "accepted_per_step": round(res.accepted_per_step, 3), "draft_quant": res.draft_quant}
            except Exception as e:  # noqa: BLE001  # the record is the failure: where, and which kernel
                row = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       "where": failure_frames(e, 12), "setup_s": round(time.time() - t0, 1)}
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            out["rows"][name] = row
            print(name, json.dumps(row), flush=True)
        del dense
    if args.out:
        from specee_compile.artifacts import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(out, indent=1))
    print(f"{'row':28} {'ok':>3} {'tok/s':>8} {'same as PDL off':>16}")
    for n, r in out["rows"].items():
        print(f"{n:28} {'yes' if r['ok'] else 'NO':>3} {r.get('tok_s', '-'):>8} {r.get('identical_to_pdl_off', '-')!s:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
