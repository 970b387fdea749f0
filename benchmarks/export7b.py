"""[export-scale] `export` at scale: build a random-weight Llama of a given shape in fp16 with
save_pretrained, export it, run it with ONNX Runtime; measure what issue 15 asks for.

    python benchmarks/export7b.py                      # Llama-2-7B shapes (the GPU machine: 128 GB RAM)
    python benchmarks/export7b.py --shape 1b --tag export-scale-cpu   # ~1.1B (TinyLlama shapes), CPU box
    python benchmarks/export7b.py --prepare-carry .carry   # wheels + tokenizer + calibration texts for the GPU box
    python benchmarks/export7b.py --train cuda --compare cuda --carry .carry ...   # there (see --help)

Each stage runs in its own process, so peak RSS is that stage's own (`ru_maxrss`):
    build    LlamaForCausalLM(config) in fp16 (default dtype set before init; on --build-device) ->
             save_pretrained
    train    (--train DEVICE) `train MODEL -o TRAINED --draft D --device DEVICE --num-texts N
             --target-precision P`:
             collect, fit, schedule on random weights (proves the pipeline, not the quality); the
             export then takes --artifacts TRAINED and gets its If nodes
    export   `specee-compile export MODEL -o ART [--dtype D] [--artifacts A]`
    ort      process start -> `generate ART PROMPT --backend onnx [--specee]` first token, then decode
    eager    (--compare DEVICE) the eager backend on the model itself, same dtype, same settings and
             artifacts: tokens compared with ORT's; at the first difference, the logit gap there
             (a dense fp16 forward over ORT's sequence: a near tie on random weights flips)
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
    with torch.device(a.get("device") or "cpu"):  # random init on the GPU takes seconds at 7B
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
elif stage == "train":
    from specee_compile.training import train_command
    m = train_command(a["model"], a["out"], num_texts=a["num_texts"], draft=a["draft"], device=a["device"],
                      force=True, progress=False, target_precision=a["target_precision"])
    out.update(exit_layers=m["exit_layers"], offline_layers=m["schedule"]["offline_layers"],
               times=m.get("training", {}).get("times"))
elif stage == "eager":
    import shutil, torch
    from pathlib import Path
    from specee_compile.api import build_decoder, encode_prompt, load_model
    from specee_compile.config import Settings
    loaded = load_model(a["model"], dtype=a["dtype"], device=a["device"])
    arts = a.get("artifacts")
    if arts:
        # the fingerprint hashes the loaded dtype: artifacts trained on the float32-loaded model (as
        # `export` checks them) are refused by a float16 load of the same checkpoint. Same weights
        # (an fp16 checkpoint upcasts exactly), so a copy is re-stamped for this load.
        copy = Path(a["work"]) / ("artifacts-" + a["dtype"])
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(arts, copy)
        m = json.loads((copy / "manifest.json").read_text())
        out["restamped"] = {"from": m["fingerprint"], "to": loaded.fingerprint}
        m["fingerprint"] = loaded.fingerprint
        (copy / "manifest.json").write_text(json.dumps(m, indent=1))
        arts = str(copy)
    s = Settings(backend="eager", device=a["device"], dtype=a["dtype"], specee=bool(arts), artifacts=arts,
                 max_new_tokens=a["tokens"], max_context=a["max_context"], chat_template=False)
    prompt_ids = encode_prompt(loaded.tokenizer, a["prompt"], False)
    res = build_decoder(loaded, s).generate(prompt_ids)
    mine, ort_ids = list(res.token_ids), a["ort_ids"]
    out["tokens"], out["avg_layers"] = mine, res.stats().get("avg_layers")
    n = min(len(mine), len(ort_ids))
    first = next((i for i in range(n) if mine[i] != ort_ids[i]), None)
    out["first_difference"] = first
    if first is not None:  # the logit gap there: a dense forward over the prompt + ORT's tokens
        ids = torch.tensor([prompt_ids + ort_ids[:first]], device=a["device"])
        with torch.no_grad():
            logits = loaded.model(ids).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        out["gap"] = {"position": first, "eager_token": mine[first], "ort_token": ort_ids[first],
                      "dense_logit_eager_token": logits[mine[first]].item(),
                      "dense_logit_ort_token": logits[ort_ids[first]].item(),
                      "dense_top1_minus_top2": (top2[0] - top2[1]).item()}
elif stage == "ort":
    from specee_compile.api import generate_from_artifact
    from specee_compile.config import Settings
    first = []
    # raw text, no chat template (the tokenizer is SmolLM2's cut to 32000 ids: vocab_tokenizer)
    s = Settings(backend="onnx", max_new_tokens=a["tokens"], max_context=a["max_context"], specee=a["specee"],
                 chat_template=False)
    res, text = generate_from_artifact(a["art"], a["prompt"], s,
                                       on_text=lambda t: first or first.append(time.perf_counter()))
    st = res.stats()
    out.update(first_token_in_process_s=(first[0] - T0) if first else None, decode_tok_s=st["decode_tokens_per_s"],
               prefill_s=st["prefill_s"], tokens=len(res.token_ids), avg_layers=st["avg_layers"],
               token_ids=list(res.token_ids))
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





def vocab_tokenizer(src, vocab: int, dst: Path) -> Path:
    """SmolLM2's byte-level BPE tokenizer cut to ids < `vocab` (the random model's 32000): tokens with
    a larger id and the merges that make or use them are dropped, so every text still encodes (into
    smaller pieces) and no id reaches past the embedding. No 32000-token Llama tokenizer is reachable."""
    from transformers import AutoTokenizer

    if (dst / "tokenizer.json").exists():
        return dst
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
    t = json.loads((dst / "tokenizer.json").read_text())
    m = t["model"]
    if len(m["vocab"]) > vocab:
        m["vocab"] = {k: v for k, v in m["vocab"].items() if v < vocab}
        keep = m["vocab"]
        merges = [x if isinstance(x, list) else x.split(" ") for x in m["merges"]]
        m["merges"] = [x for x in merges if x[0] in keep and x[1] in keep and x[0] + x[1] in keep]
        t["added_tokens"] = [x for x in t["added_tokens"] if x["id"] < vocab]
        (dst / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False))
    AutoTokenizer.from_pretrained(str(dst))  # loads
    return dst


def prepare_carry(d: Path) -> int:
    """What the GPU machine (no package registry, no model hub) needs beside the repo, into `d`:
    the tokenizer (SmolLM2's, fed raw English: its ids stay below 32000) and the first ShareGPT
    conversations as a compact data cache (`SPECEE_CACHE=d/cache`), enough for --num-texts <= 100."""
    sys.path.insert(0, str(ROOT))
    from specee_compile.data import SHAREGPT, SHAREGPT_CACHED, _ensure_sharegpt_cache
    from specee_compile.models import resolve

    d.mkdir(parents=True, exist_ok=True)
    vocab_tokenizer(resolve("smollm2-135m"), SHAPES["7b"]["vocab_size"], d / "tokenizer")
    src = _ensure_sharegpt_cache()
    dst = d / "cache" / "data" / f"{SHAREGPT[0]}-{SHAREGPT[1]}" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open(encoding="utf-8") as f, dst.open("w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= 400:  # sharegpt_pairs(n) scans max(2n, n + 200) conversations; < SHAREGPT_CACHED
                break
            g.write(line)
    assert 400 < SHAREGPT_CACHED
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    print(f"{d}: {size / 2**20:.1f} MiB")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--work", default="/tmp/specee_export_scale", help="model + artifact directories go here")
    ap.add_argument("--dtype", default=None, help="export --dtype (default: the model's own, float16)")
    ap.add_argument("--artifacts", help="trained predictors/draft (train --device cuda) for the If nodes")
    ap.add_argument("--train", metavar="DEVICE", help="train the predictors first (cpu | cuda) and export with them")
    ap.add_argument("--num-texts", type=int, default=24, help="--train: calibration texts")
    ap.add_argument("--draft", default="ngram", choices=("ngram", "shallow", "eagle"),
                    help="--train: the candidate source (eagle trains a draft head first)")
    ap.add_argument("--target-precision", type=float, default=0.95,
                    help="--train: exit precision an exit point must reach (random weights reach none at 0.95)")
    ap.add_argument("--compare", metavar="DEVICE", help="run the eager backend there (same dtype, same "
                    "artifacts) and compare its tokens with ONNX Runtime's")
    ap.add_argument("--build-device", default="cpu", help="where the random model is initialised (cuda: fast)")
    ap.add_argument("--carry", help="a --prepare-carry directory: tokenizer and data cache from there")
    ap.add_argument("--prepare-carry", metavar="DIR", help="write the GPU machine's extras into DIR and exit")
    ap.add_argument("--out", help="also copy the record here (the device's $OUT)")
    ap.add_argument("--commit", help="the commit to record where the tree has no .git (the GPU machine)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: SmolLM2's, via the zoo)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--prompt", default="Hello there, tell me about the history of computing.")
    ap.add_argument("--trt", action="store_true", help="also export --backend tensorrt (TensorRT-RTX, SM89)")
    ap.add_argument("--tag", default="export7b", help="benchmarks/results/<date>-<tag>.json")
    ap.add_argument("--keep", action="store_true", help="keep the model and artifact directories")
    ap.add_argument("--no-ort", action="store_true", help="export only (no ONNX Runtime run)")
    a = ap.parse_args(argv)
    if a.prepare_carry:
        return prepare_carry(Path(a.prepare_carry))
    if a.train and a.artifacts:
        print("export7b: give --train or --artifacts, not both", file=sys.stderr)
        return 2
    if a.carry:
        carry = Path(a.carry).resolve()
        if not (carry / "tokenizer").is_dir():
            print(f"export7b: {carry} holds no tokenizer/ (make it with --prepare-carry)", file=sys.stderr)
            return 2
        os.environ["SPECEE_CACHE"] = str(carry / "cache")
        a.tokenizer = a.tokenizer or str(carry / "tokenizer")

    t_start = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, art = work / f"llama-{a.shape}-fp16", work / f"art-{a.shape}"
    log = work / "log.txt"
    tok = a.tokenizer
    if tok is None:
        sys.path.insert(0, str(ROOT))
        from specee_compile.models import resolve

        tok = vocab_tokenizer(resolve("smollm2-135m"), SHAPES[a.shape]["vocab_size"], work / "tokenizer")
    res: dict = {}
    stages: dict = {}
    if not (model_dir / "config.json").exists():
        b = stage("build", {"shape": SHAPES[a.shape], "dir": str(model_dir), "tokenizer": str(tok),
                            "device": a.build_device}, log)
        res["params"] = b["params"]
        res["build_peak_rss_gb"] = round(b["peak_rss_gb"], 2)
        stages["build_s"] = round(b["process_s"], 1)
    res["checkpoint_gb"] = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9, 3)

    artifacts = a.artifacts
    if a.train:
        artifacts = str(work / f"trained-{a.shape}")
        t = stage("train", {"model": str(model_dir), "out": artifacts, "num_texts": a.num_texts,
                            "device": a.train, "draft": a.draft, "target_precision": a.target_precision}, log)
        res["train"] = {"device": a.train, "num_texts": a.num_texts, "draft": a.draft,
                        "target_precision": a.target_precision, "process_s": round(t["process_s"], 1),
                        "peak_rss_gb": round(t["peak_rss_gb"], 2), "exit_layers": t["exit_layers"],
                        "offline_layers": t["offline_layers"], "times": t["times"]}

    e = stage("export", {"model": str(model_dir), "out": str(art), "max_context": a.max_context, "dtype": a.dtype,
                         "artifacts": artifacts}, log)
    manifest = json.loads((art / "manifest.json").read_text())
    res.update(weights_gb=round((art / "weights.bin").stat().st_size / 1e9, 3), export_s=round(e["process_s"], 1),
               export_peak_rss_gb=round(e["peak_rss_gb"], 2), if_nodes=manifest["if_nodes"], dtype=manifest["dtype"])

    o = None if a.no_ort else stage("ort", {"art": str(art), "tokens": a.tokens, "max_context": a.max_context, "prompt": a.prompt,
                      "specee": bool(artifacts)}, log)
    startup = o["process_s"] - o["wall_s"] if o else 0.0  # interpreter start before the child's clock began
    if o:
        res.update(ort_peak_rss_gb=round(o["peak_rss_gb"], 2),
                   ort_first_token_s=round(o["first_token_in_process_s"] + startup, 1),
                   ort_decode_tok_s=round(o["decode_tok_s"], 2), ort_prefill_s=round(o["prefill_s"], 2),
                   ort_tokens=o["tokens"], ort_avg_layers=o["avg_layers"], ort_specee=bool(artifacts))

    if o and a.compare:
        g = stage("eager", {"model": str(model_dir), "prompt": a.prompt, "device": a.compare, "dtype": manifest["dtype"],
                            "tokens": a.tokens, "max_context": a.max_context, "artifacts": artifacts,
                            "work": str(work), "ort_ids": o["token_ids"]}, log)
        n = min(len(g["tokens"]), len(o["token_ids"]))
        res["eager_vs_ort"] = {"device": a.compare, "dtype": manifest["dtype"], "specee": bool(artifacts),
                               "tokens": n, "identical": g["tokens"][:n] == o["token_ids"][:n],
                               "agreement": round(sum(x == y for x, y in zip(g["tokens"], o["token_ids"])) / max(1, n), 3),
                               "first_difference": g["first_difference"], "gap": g.get("gap"),
                               "artifacts_restamped": g.get("restamped"),
                               "eager_avg_layers": g["avg_layers"], "ort_ids": o["token_ids"], "eager_ids": g["tokens"]}

    res["trt_build_s"] = res["trt_engine_gb"] = None
    if a.trt:
        t_art = work / f"art-{a.shape}-trt"
        t = stage("export", {"model": str(model_dir), "out": str(t_art), "max_context": a.max_context,
                             "dtype": a.dtype, "artifacts": artifacts, "backend": "tensorrt"}, log)
        engines = json.loads((t_art / "manifest.json").read_text()).get("engines", [])
        # the builder's own time, summed over the engines (one per target); trt_export_s is the whole command
        res["trt_build_s"] = round(sum(x.get("build_s", 0) for x in engines if isinstance(x, dict)), 1)
        res["trt_peak_rss_gb"] = round(t["peak_rss_gb"], 2)
        res["trt_export_s"] = round(t["process_s"], 1)  # the whole `export --backend tensorrt` process
        res["trt_engines"] = [{k: x.get(k) for k in ("file", "target", "bytes", "build_s", "version")}
                              for x in engines if isinstance(x, dict)]
        res["trt_engine_gb"] = round(sum((t_art / x["file"]).stat().st_size for x in engines
                                         if isinstance(x, dict) and "file" in x) / 1e9, 3) if engines else None
        if not a.keep:
            shutil.rmtree(t_art, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    res["stages_s"] = stages

    import platform

    commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    import onnxruntime

    record = {"date": date, "commit": commit or None, "shape": a.shape, "onnxruntime": onnxruntime.__version__,
              "machine": f"{platform.node()} ({os.cpu_count()} cores)",
              "command": "python benchmarks/export7b.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": res}
    text = json.dumps(record, indent=1) + "\n"
    path = ROOT / "benchmarks" / "results" / f"{date}-{a.tag}.json"
    path.write_text(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / path.name).write_text(text)
    print(text)
    print(f"wrote {path}")
    if not a.keep:
        shutil.rmtree(art, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
