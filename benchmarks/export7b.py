"""[export-scale] `export` at scale: build a random-weight Llama of a given shape in fp16 with
save_pretrained, export it, run it with ONNX Runtime; measure what issue 15 asks for.

    python benchmarks/export7b.py                      # Llama-2-7B shapes (the GPU machine: 128 GB RAM)
    python benchmarks/export7b.py --shape 1b --tag export-scale-cpu   # ~1.1B (TinyLlama shapes), CPU box

Each stage runs in its own process, so peak RSS is that stage's own (`ru_maxrss`):
    build    LlamaForCausalLM(config) in fp16 (default dtype set before init) -> save_pretrained
    export   `specee-compile export MODEL -o ART [--dtype D] [--artifacts A]`
    ort      process start -> `generate ART PROMPT --backend onnx` first token, then decode
    trt      `export --backend tensorrt` when TensorRT(-RTX) imports (else null)

Fields (under "results"): weights_gb (weights.bin), export_s, export_peak_rss_gb, if_nodes,
ort_peak_rss_gb, ort_first_token_s (process start to first token), ort_decode_tok_s, trt_build_s,
trt_engine_gb. Writes benchmarks/results/<date>-<tag>.json. Random weights: the numbers measure the
pipeline's time and memory, not quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # Llama-2-7B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # TinyLlama-1.1B
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    # a quick check of this script
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1024),
}

# run in a child: python -c CHILD <stage> <json args>; prints one JSON line "RESULT {...}"
CHILD = r'''
import json, resource, sys, time
T0 = time.perf_counter()
stage, a = sys.argv[1], json.loads(sys.argv[2])
out = {}
if stage == "build":
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # init directly in fp16: never a float32 copy
    cfg = LlamaConfig(**a["shape"], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(a["dir"])
    AutoTokenizer.from_pretrained(a["tokenizer"]).save_pretrained(a["dir"])
    out["params"] = sum(p.numel() for p in model.parameters())
elif stage == "export":
    from specee_compile.cli import main
    argv = ["export", a["model"], "-o", a["out"], "--max-context", str(a["max_context"]), "--force"]
    argv += ["--dtype", a["dtype"]] if a.get("dtype") else []
    argv += ["--artifacts", a["artifacts"]] if a.get("artifacts") else []
    argv += ["--backend", a["backend"]] if a.get("backend") else []
    out["rc"] = main(argv)
elif stage == "ort":
    from specee_compile.api import generate_from_artifact
    from specee_compile.config import Settings
    first = []
    # raw text, no chat template: SmolLM2's tokenizer (49152 ids) feeds a 32000-id model; plain English stays below
    s = Settings(backend="onnx", max_new_tokens=a["tokens"], max_context=a["max_context"], specee=a["specee"],
                 chat_template=False)
    res, text = generate_from_artifact(a["art"], a["prompt"], s,
                                       on_text=lambda t: first or first.append(time.perf_counter()))
    st = res.stats()
    out.update(first_token_in_process_s=(first[0] - T0) if first else None, decode_tok_s=st["decode_tokens_per_s"],
               prefill_s=st["prefill_s"], tokens=len(res.token_ids), avg_layers=st["avg_layers"])
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
out["wall_s"] = time.perf_counter() - T0
print("RESULT " + json.dumps(out), flush=True)
'''


def stage(name: str, args: dict, log: Path) -> dict:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", CHILD, name, json.dumps(args)], capture_output=True, text=True, env=env)
    with log.open("a") as f:
        f.write(f"==== {name} {json.dumps(args)}\n{p.stdout}\n{p.stderr}\n")
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"stage {name} failed (rc {p.returncode}); see {log}\n{p.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["process_s"] = time.perf_counter() - t0  # includes interpreter start and imports
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--work", default="/tmp/specee_export_scale", help="model + artifact directories go here")
    ap.add_argument("--dtype", default=None, help="export --dtype (default: the model's own, float16)")
    ap.add_argument("--artifacts", help="trained predictors/draft (train --device cuda) for the If nodes")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: SmolLM2's, via the zoo)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--prompt", default="Hello there, tell me about the history of computing.")
    ap.add_argument("--trt", action="store_true", help="also export --backend tensorrt (TensorRT-RTX, SM89)")
    ap.add_argument("--tag", default="export7b", help="benchmarks/results/<date>-<tag>.json")
    ap.add_argument("--keep", action="store_true", help="keep the model and artifact directories")
    ap.add_argument("--no-ort", action="store_true", help="export only (no ONNX Runtime run)")
    a = ap.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, art = work / f"llama-{a.shape}-fp16", work / f"art-{a.shape}"
    log = work / "log.txt"
    tok = a.tokenizer
    if tok is None:
        sys.path.insert(0, str(ROOT))
        from specee_compile.models import resolve

        tok = resolve("smollm2-135m")
    res: dict = {}
    if not (model_dir / "config.json").exists():
        b = stage("build", {"shape": SHAPES[a.shape], "dir": str(model_dir), "tokenizer": str(tok)}, log)
        res["params"] = b["params"]
        res["build_peak_rss_gb"] = round(b["peak_rss_gb"], 2)
    res["checkpoint_gb"] = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9, 3)

    e = stage("export", {"model": str(model_dir), "out": str(art), "max_context": a.max_context, "dtype": a.dtype,
                         "artifacts": a.artifacts}, log)
    manifest = json.loads((art / "manifest.json").read_text())
    res.update(weights_gb=round((art / "weights.bin").stat().st_size / 1e9, 3), export_s=round(e["process_s"], 1),
               export_peak_rss_gb=round(e["peak_rss_gb"], 2), if_nodes=manifest["if_nodes"], dtype=manifest["dtype"])

    o = None if a.no_ort else stage("ort", {"art": str(art), "tokens": a.tokens, "max_context": a.max_context, "prompt": a.prompt,
                      "specee": bool(a.artifacts)}, log)
    startup = o["process_s"] - o["wall_s"] if o else 0.0  # interpreter start before the child's clock began
    if o:
        res.update(ort_peak_rss_gb=round(o["peak_rss_gb"], 2),
                   ort_first_token_s=round(o["first_token_in_process_s"] + startup, 1),
                   ort_decode_tok_s=round(o["decode_tok_s"], 2), ort_prefill_s=round(o["prefill_s"], 2),
                   ort_tokens=o["tokens"], ort_avg_layers=o["avg_layers"])

    res["trt_build_s"] = res["trt_engine_gb"] = None
    if a.trt:
        t_art = work / f"art-{a.shape}-trt"
        t = stage("export", {"model": str(model_dir), "out": str(t_art), "max_context": a.max_context,
                             "dtype": a.dtype, "artifacts": a.artifacts, "backend": "tensorrt"}, log)
        engines = json.loads((t_art / "manifest.json").read_text()).get("engines", [])
        res["trt_build_s"] = round(t["process_s"] - e["process_s"], 1)  # on top of the ONNX export
        res["trt_peak_rss_gb"] = round(t["peak_rss_gb"], 2)
        res["trt_engine_gb"] = round(sum((t_art / x["file"]).stat().st_size for x in engines
                                         if isinstance(x, dict) and "file" in x) / 1e9, 3) if engines else None
        if not a.keep:
            shutil.rmtree(t_art, ignore_errors=True)

    import platform

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    record = {"date": date, "commit": commit, "shape": a.shape, "machine": f"{platform.node()} ({os.cpu_count()} cores)",
              "command": "python benchmarks/export7b.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": res}
    path = ROOT / "benchmarks" / "results" / f"{date}-{a.tag}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print(f"wrote {path}")
    if not a.keep:
        shutil.rmtree(art, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
