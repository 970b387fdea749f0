"""[export-scale] `export` at scale: build a random-weight Llama of a given shape in fp16 with
save_pretrained, export it, run it with ONNX Runtime; measure what issue 15 asks for.

    python benchmarks/export7b.py                      # Llama-2-7B shapes (the GPU machine: 128 GB RAM)
    python benchmarks/export7b.py --shape 1b --tag export-scale-cpu   # ~1.1B (TinyLlama shapes), CPU box
    python benchmarks/export7b.py --prepare-carry .carry   # wheels + tokenizer + calibration texts for the GPU box
    python benchmarks/export7b.py --train cuda --compare cuda --carry .carry ...   # there (see --help)
    python benchmarks/export7b.py --shape 1b --init settled --train cpu --compare cpu   # If nodes (see --init)

Each stage runs in its own process, so peak RSS is that stage's own (`ru_maxrss`):
    build    LlamaForCausalLM(config) in fp16 (default dtype set before init; on --build-device) ->
             [--init settled: damp the tail layers, boost a few frequent tokens' head rows; in place]
             -> save_pretrained
    train    (--train DEVICE) `train MODEL -o TRAINED --draft D --device DEVICE --num-texts N
             --target-precision P` (eagle: the draft's budget from --draft-budget, --draft-conversations):
             collect, fit, schedule on random weights (proves the pipeline, not the quality); the
             export then takes --artifacts TRAINED and gets its If nodes (--init settled; none on --init random)
    export   `specee-compile export MODEL -o ART [--dtype D] [--artifacts A]`
    ort      process start -> `generate ART PROMPT --backend onnx [--specee]` first token, then decode
    eager    (--compare DEVICE) the eager backend on the model itself, same dtype, same settings and
             artifacts, every exit point kept as ORT's runner keeps them: tokens compared with ORT's; at
             the first difference, the logit gap there (a dense fp16 forward over ORT's sequence: a near
             tie on random weights flips)
    trt      `export --backend tensorrt` when TensorRT(-RTX) imports (else null)

Fields (under "results"): init, weights_gb (weights.bin), export_s, export_peak_rss_gb, if_nodes,
ort_peak_rss_gb, ort_first_token_s (process start to first token), ort_decode_tok_s, ort_avg_layers,
trt_build_s, trt_engine_gb, stages_s (each stage's process time). Writes
benchmarks/results/<date>-<tag>.json. Random weights: the numbers measure the pipeline's time and memory,
not quality.

--init random|settled (the build; recorded under results.init):
    random   HF's i.i.d. init. The dense token settles only in the last layer, so no predictor reaches its
             target precision, every threshold is 1.0 and the export has 0 If nodes.
    settled  STILL RANDOM WEIGHTS, NOT A TRAINED MODEL: the same init, then two in-place changes.
             (1) A settled tail: the residual-writing projections (o_proj, down_proj) of every layer from
             round(SETTLE_FRACTION * L) on are multiplied by SETTLE_SCALE (--settle-fraction,
             --settle-scale). Those layers barely move the residual stream, so the final-norm LM head's
             argmax is decided after the first ~65% of the layers, as in real LLMs.
             (2) A frequent-token prior: the LM-head rows of PRIOR_WORDS (". , the <newline> and to of a in is",
             about 20% of ShareGPT's tokens) are multiplied by PRIOR_SCALE (--prior-scale; 1 = off), so
             their logits vary more and they win the argmax at a share of positions, as frequent tokens do
             in a real LLM. Without it the dense token of a wide random model is spread over the whole
             vocabulary and no untrained candidate source (ngram, shallow) ever proposes it, so no exit
             can pass the candidate check (measured below and in RESULTS.md).
             Predictors then find exit points and the export gets If nodes. It proves that the pipeline
             (train -> export with If nodes -> ONNX Runtime = eager) works at scale; it says nothing about
             quality or real exit rates. The build records the argmax agreement of each layer with the last
             on random token ids (results.init.layer_agreement).
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
    # Llama-2-7B's layer count and vocabulary at 256 wide: predictors for a 7B model trained where its
    # float32 load (27 GB) does not fit; the predictors read 3*k candidate features (no hidden size), so
    # they carry over to --shape 7b with --artifacts ... --restamp (random-weight pipeline artifacts)
    "l32-w256": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=32, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    # a quick check of this script
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1024),
}
# --init settled: layers [round(SETTLE_FRACTION * L), L) get o_proj and down_proj scaled by SETTLE_SCALE.
# Measured (float32, 256 random token ids, argmax of layer l's final-norm head = the last layer's):
# at the last full-strength layer 0.98-0.99 with these values (32 x 256-wide and TinyLlama-1.1B shapes),
# 0.94-0.95 with scale 0.05, 0.88 with 0.1; i.i.d. init: 0.01-0.4 there.
SETTLE_FRACTION = 0.65
SETTLE_SCALE = 0.02
# --init settled, the frequent-token prior: these tokens' LM-head rows x PRIOR_SCALE. Measured on 6 ShareGPT
# items, 2048 wide x 8 layers, settled tail: the dense token is one of them at 0% / 19% / 62% of positions
# for a scale of 1 / 2 / 3, and the ngram draft proposes it at 0% / 7% / 23% (shallow: 4% / 7% / 23%).
PRIOR_WORDS = (".", ",", " the", "\n", " and", " to", " of", " a", " in", " is")
PRIOR_SCALE = 2.5
# --train --draft eagle: train-draft's budget (its default, 540 s, is most of the one 7B device call)
DRAFT_BUDGET_S = 90.0
DRAFT_CONVERSATIONS = 200


def settle_tail_(model, fraction: float = SETTLE_FRACTION, scale: float = SETTLE_SCALE) -> dict:
    """--init settled (1), in place (no copy of any weight): multiply o_proj and down_proj of the decoder
    layers from round(fraction * L) on by `scale`. Returns what was done (for the results JSON)."""
    import torch

    layers = model.model.layers
    n = len(layers)
    first = min(n, max(1, round(fraction * n)))
    with torch.no_grad():
        for layer in layers[first:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return {"kind": "settled", "fraction": fraction, "scale": scale, "full_layers": first,
            "scaled_layers": [first, n - 1] if first < n else [],
            "note": "STILL RANDOM WEIGHTS: a damped tail (o_proj, down_proj x scale) and a frequent-token prior "
                    "(LM-head rows x prior_scale); proves the pipeline, not quality"}


def frequent_token_prior_(model, tokenizer, words=PRIOR_WORDS, scale: float = PRIOR_SCALE) -> dict:
    """--init settled (2), in place: multiply the LM-head rows of `words` (each one token of `tokenizer`,
    below the model's vocabulary; others are skipped) by `scale`."""
    import torch

    vocab = model.lm_head.weight.shape[0]
    ids = []
    for w in words:
        t = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(t) == 1 and t[0] < vocab and t[0] not in ids:
            ids.append(t[0])
    if scale != 1.0:
        with torch.no_grad():
            for i in ids:
                model.lm_head.weight[i].mul_(scale)
    return {"prior_scale": scale, "prior_ids": ids, "prior_words": [w for w in words]}


def layer_agreement(model, tokens: int = 128, seed: int = 1) -> list[float]:
    """Per layer l: the share of positions (random token ids, fixed seed) where the argmax of
    lm_head(final_norm(h_l)) equals the last layer's. One forward; the head runs in float32."""
    import torch

    vocab = model.config.vocab_size
    dev = model.lm_head.weight.device
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(dev)
    caps = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: caps.append((o[0] if isinstance(o, tuple) else o)[0]))
             for m in model.model.layers]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
            head = model.lm_head.weight.float().T
            top = [(model.model.norm(h).float() @ head).argmax(-1) for h in caps]
    finally:
        for h in hooks:
            h.remove()
    return [round((t == top[-1]).float().mean().item(), 3) for t in top]

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
    sys.path.insert(0, a["bench_dir"])
    from export7b import frequent_token_prior_, layer_agreement, settle_tail_
    tok = AutoTokenizer.from_pretrained(a["tokenizer"])
    init = {"kind": "random"}
    if a["init"] == "settled":  # in place: the weights stay one fp16 copy
        init = settle_tail_(model, a["settle_fraction"], a["settle_scale"])
        init.update(frequent_token_prior_(model, tok, scale=a["prior_scale"]))
    init["layer_agreement"] = layer_agreement(model)
    model.save_pretrained(a["dir"])
    tok.save_pretrained(a["dir"])
    (__import__("pathlib").Path(a["dir"]) / "init.json").write_text(json.dumps(init, indent=1))
    out["params"] = sum(p.numel() for p in model.parameters())
    out["init"] = init
elif stage == "restamp":
    # --restamp: the artifacts were trained on another model of the same layer count and vocabulary; a copy
    # gets this checkpoint's fingerprint as `export` computes it (streamed, float32), so export accepts it
    import shutil
    from pathlib import Path
    from specee_compile.backends.onnx_export import stream_model
    fp = stream_model(a["model"]).fingerprint
    shutil.rmtree(a["out"], ignore_errors=True)
    shutil.copytree(a["artifacts"], a["out"])
    m = json.loads((Path(a["out"]) / "manifest.json").read_text())
    out.update(source=a["artifacts"], source_model=m.get("model"), source_fingerprint=m["fingerprint"], fingerprint=fp)
    m["fingerprint"] = fp
    (Path(a["out"]) / "manifest.json").write_text(json.dumps(m, indent=1))
elif stage == "export":
    from specee_compile.cli import main
    argv = ["export", a["model"], "-o", a["out"], "--max-context", str(a["max_context"]), "--force"]
    argv += ["--dtype", a["dtype"]] if a.get("dtype") else []
    argv += ["--artifacts", a["artifacts"]] if a.get("artifacts") else []
    argv += ["--backend", a["backend"]] if a.get("backend") else []
    out["rc"] = main(argv)
    if out["rc"]:
        sys.exit(out["rc"])  # the CLI's one-line error is on stderr; the parent shows it
elif stage == "train":
    from specee_compile.training import train_command
    m = train_command(a["model"], a["out"], num_texts=a["num_texts"], draft=a["draft"], device=a["device"],
                      force=True, progress=False, target_precision=a["target_precision"],
                      draft_options=a.get("draft_options"))
    from pathlib import Path
    c = json.loads((Path(a["out"]) / "predictors_config.json").read_text())
    cal = c.get("calibration", {})
    out.update(exit_layers=m["exit_layers"], offline_layers=m["schedule"]["offline_layers"],
               times=m.get("training", {}).get("times"), thresholds=c.get("thresholds"),
               dense_in_candidates=cal.get("dense_in_candidates"), label_positive_rate=cal.get("label_positive_rate"),
               positions=cal.get("positions"))
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
    # exit_cost_check off: ONNX Runtime's runner measures no costs and keeps every exit point, so the same
    # exit program runs here (on, the eager backend may drop points that do not pay on this device)
    s = Settings(backend="eager", device=a["device"], dtype=a["dtype"], specee=bool(arts), artifacts=arts,
                 max_new_tokens=a["tokens"], max_context=a["max_context"], chat_template=False,
                 exit_cost_check=False)
    prompt_ids = encode_prompt(loaded.tokenizer, a["prompt"], False)
    res = build_decoder(loaded, s).generate(prompt_ids)
    mine, ort_ids = list(res.token_ids), a["ort_ids"]
    out["tokens"], out["avg_layers"] = mine, res.stats().get("avg_layers")
    out["exit_histogram"] = res.stats().get("exit_histogram")
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
                 chat_template=False, draft_source=a.get("draft_source"))
    res, text = generate_from_artifact(a["art"], a["prompt"], s,
                                       on_text=lambda t: first or first.append(time.perf_counter()))
    st = res.stats()
    out.update(first_token_in_process_s=(first[0] - T0) if first else None, decode_tok_s=st["decode_tokens_per_s"],
               prefill_s=st["prefill_s"], tokens=len(res.token_ids), avg_layers=st["avg_layers"],
               token_ids=list(res.token_ids), exit_histogram=st.get("exit_histogram"))
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
    ap.add_argument("--restamp", action="store_true",
                    help="--artifacts come from another model of the same layer count and vocabulary (e.g. "
                    "--shape l32-w256 --init settled --train cpu --keep): export a copy stamped with this model's "
                    "fingerprint (results.artifacts_restamped)")
    ap.add_argument("--ort-draft", choices=("ngram", "eagle"),
                    help="the ONNX Runtime run's candidate source (default: the artifacts'; their 'shallow' "
                    "needs the torch model, so give ngram there)")
    ap.add_argument("--train", metavar="DEVICE", help="train the predictors first (cpu | cuda) and export with them")
    ap.add_argument("--num-texts", type=int, default=24, help="--train: calibration texts")
    ap.add_argument("--draft", default="ngram", choices=("ngram", "shallow", "eagle"),
                    help="--train: the candidate source (eagle trains a draft head first)")
    ap.add_argument("--draft-budget", type=float, default=DRAFT_BUDGET_S,
                    help="--train --draft eagle: the draft's time budget in seconds (train-draft --time-budget; "
                    "after the model loads)")
    ap.add_argument("--draft-conversations", type=int, default=DRAFT_CONVERSATIONS,
                    help="--train --draft eagle: ShareGPT conversations it trains on (the carry holds 400)")
    ap.add_argument("--draft-self-generated", type=int, default=0,
                    help="--train --draft eagle: prompts whose reply is the model's own greedy output")
    ap.add_argument("--target-precision", type=float, default=0.95,
                    help="--train: exit precision an exit point must reach (random weights reach none at 0.95)")
    ap.add_argument("--compare", metavar="DEVICE", help="run the eager backend there (same dtype, same "
                    "artifacts) and compare its tokens with ONNX Runtime's")
    ap.add_argument("--build-device", default="cpu", help="where the random model is initialised (cuda: fast)")
    ap.add_argument("--init", default="random", choices=("random", "settled"),
                    help="settled: random weights, the tail layers damped (the token is decided after ~65%% of the "
                    "layers) and a frequent-token prior (see the module doc): exit points and If nodes; proves the "
                    "pipeline only")
    ap.add_argument("--settle-fraction", type=float, default=SETTLE_FRACTION,
                    help="--init settled: layers from round(F * L) on are damped")
    ap.add_argument("--settle-scale", type=float, default=SETTLE_SCALE,
                    help="--init settled: their o_proj and down_proj are multiplied by this")
    ap.add_argument("--prior-scale", type=float, default=PRIOR_SCALE,
                    help="--init settled: the LM-head rows of a few frequent tokens are multiplied by this (1: off)")
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
    if a.restamp and not a.artifacts:
        print("export7b: --restamp needs --artifacts", file=sys.stderr)
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
    init_tag = "" if a.init == "random" else f"-settled{a.settle_fraction:g}x{a.settle_scale:g}p{a.prior_scale:g}"
    model_dir, art = work / f"llama-{a.shape}{init_tag}-fp16", work / f"art-{a.shape}"
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
                            "device": a.build_device, "init": a.init, "settle_fraction": a.settle_fraction,
                            "settle_scale": a.settle_scale, "prior_scale": a.prior_scale,
                            "bench_dir": str(Path(__file__).resolve().parent)}, log)
        res["params"] = b["params"]
        res["build_peak_rss_gb"] = round(b["peak_rss_gb"], 2)
        stages["build_s"] = round(b["process_s"], 1)
    init_file = model_dir / "init.json"  # written by the build (absent in a directory built before --init)
    res["init"] = json.loads(init_file.read_text()) if init_file.exists() else {"kind": "random"}
    res["checkpoint_gb"] = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e9, 3)

    artifacts = a.artifacts
    if a.restamp:  # the record keeps the source and both fingerprints
        artifacts = str(work / f"restamped-{a.shape}")
        r = stage("restamp", {"model": str(model_dir), "artifacts": str(Path(a.artifacts).resolve()),
                              "out": artifacts}, log)
        res["artifacts_restamped"] = {k: r[k] for k in ("source", "source_model", "source_fingerprint",
                                                        "fingerprint")}
        src_train = Path(a.artifacts).resolve().parent / "train-record.json"
        if src_train.exists():  # written by the source run's --train (below)
            res["artifacts_restamped"]["source_train"] = json.loads(src_train.read_text())
        stages["restamp_s"] = round(r["process_s"], 1)
    if a.train:
        artifacts = str(work / f"trained-{a.shape}")
        dopts = None
        if a.draft == "eagle":
            dopts = {"time_budget_s": a.draft_budget, "conversations": a.draft_conversations,
                     "self_generated": a.draft_self_generated, "progress": False}
        t = stage("train", {"model": str(model_dir), "out": artifacts, "num_texts": a.num_texts,
                            "device": a.train, "draft": a.draft, "target_precision": a.target_precision,
                            "draft_options": dopts}, log)
        res["train"] = {"device": a.train, "num_texts": a.num_texts, "draft": a.draft, "draft_options": dopts,
                        "target_precision": a.target_precision, "process_s": round(t["process_s"], 1),
                        "peak_rss_gb": round(t["peak_rss_gb"], 2), "exit_layers": t["exit_layers"],
                        "offline_layers": t["offline_layers"], "times": t["times"],
                        **{k: t.get(k) for k in ("thresholds", "dense_in_candidates", "label_positive_rate",
                                                 "positions")}}
        stages["train_s"] = res["train"]["process_s"]
        # what a later --restamp run of another shape records about these artifacts
        (work / "train-record.json").write_text(json.dumps(
            {"shape": a.shape, "shape_config": SHAPES[a.shape], "init": res["init"], "model_dir": str(model_dir),
             "train": res["train"]}, indent=1))

    e = stage("export", {"model": str(model_dir), "out": str(art), "max_context": a.max_context, "dtype": a.dtype,
                         "artifacts": artifacts}, log)
    manifest = json.loads((art / "manifest.json").read_text())
    res.update(weights_gb=round((art / "weights.bin").stat().st_size / 1e9, 3), export_s=round(e["process_s"], 1),
               export_peak_rss_gb=round(e["peak_rss_gb"], 2), if_nodes=manifest["if_nodes"], dtype=manifest["dtype"])
    stages["export_s"] = res["export_s"]

    o = None if a.no_ort else stage("ort", {"art": str(art), "tokens": a.tokens, "max_context": a.max_context, "prompt": a.prompt,
                      "specee": bool(artifacts), "draft_source": a.ort_draft}, log)
    startup = o["process_s"] - o["wall_s"] if o else 0.0  # interpreter start before the child's clock began
    if o:
        res.update(ort_peak_rss_gb=round(o["peak_rss_gb"], 2),
                   ort_first_token_s=round(o["first_token_in_process_s"] + startup, 1),
                   ort_decode_tok_s=round(o["decode_tok_s"], 2), ort_prefill_s=round(o["prefill_s"], 2),
                   ort_draft=a.ort_draft, ort_tokens=o["tokens"], ort_avg_layers=o["avg_layers"], ort_specee=bool(artifacts),
                   ort_exit_histogram=o.get("exit_histogram"))
        stages["ort_s"] = round(o["process_s"], 1)

    if o and a.compare:
        g = stage("eager", {"model": str(model_dir), "prompt": a.prompt, "device": a.compare, "dtype": manifest["dtype"],
                            "tokens": a.tokens, "max_context": a.max_context, "artifacts": artifacts,
                            "work": str(work), "ort_ids": o["token_ids"]}, log)
        stages["eager_s"] = round(g["process_s"], 1)
        n = min(len(g["tokens"]), len(o["token_ids"]))
        res["eager_vs_ort"] = {"device": a.compare, "dtype": manifest["dtype"], "specee": bool(artifacts),
                               "tokens": n, "identical": g["tokens"][:n] == o["token_ids"][:n],
                               "agreement": round(sum(x == y for x, y in zip(g["tokens"], o["token_ids"])) / max(1, n), 3),
                               "first_difference": g["first_difference"], "gap": g.get("gap"),
                               "artifacts_restamped": g.get("restamped"),
                               "eager_avg_layers": g["avg_layers"], "eager_exit_histogram": g.get("exit_histogram"),
                               "eager_exit_cost_check": False, "ort_ids": o["token_ids"], "eager_ids": g["tokens"]}

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
