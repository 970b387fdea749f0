"""How often each candidate source contains the dense model's next token, and what it costs.

Protocol (greedy, batch 1, CPU):
  * prompts: MT-Bench first turns (every 4th of the 80, i.e. 20 prompts spread over all 8 categories;
    the draft is trained on ShareGPT, so these are held out), wrapped in the chat template;
  * the dense model decodes 64 new tokens greedily with HF ``generate`` (this gives the reference
    tokens and the base model's time per token);
  * one dense pass over prompt + output records f_t = final_norm(h_t) at the final layer and at a
    middle layer (default 20 of 30 for SmolLM2);
  * each source is driven exactly like the runtime does: reset(prompt, final-layer prompt features),
    observe(first generated token, f_{P-1}) (prefill is dense), then per step: propose() -> check the
    dense next token is top-1 / in the top-k -> observe(dense token, f_t at the chosen layer, layer).
    "final" = every step ran full depth (best case); "middle" = every step exited at the middle layer
    (the exit case: features of a shallower layer, fed back step after step).
  * cost = wall time of propose() + observe() per step, against the base model's time per token.

Run:  .venv/bin/python benchmarks/draft_hit_rates.py [--model smollm2-135m] [--draft DIR]
Writes benchmarks/results/draft_hit_rates.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specee_compile.draft import EagleDraft, EagleSource, NgramAssist, NgramDraft, ShallowDraft

DEFAULT_DRAFT = ROOT / "specee_compile" / "shipped" / "smollm2-135m"


def prompts_ids(tokenizer, n: int, stride: int) -> list[list[int]]:
    from specee_compile.data import mtbench_first_turns

    turns = mtbench_first_turns()[::stride][:n]
    out = []
    for q in turns:
        msgs = [{"role": "user", "content": q}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


@torch.inference_mode()
def dense_reference(hf, prompt: list[int], new_tokens: int, mid_layer: int, cached=None):
    """Greedy output, generate wall time, final/mid features for all positions.
    ``cached`` = (seq, gen_s) from an earlier run of the same model/prompt (skips generate)."""
    if cached is None:
        x = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                          num_beams=1)
        gen_s = time.perf_counter() - t0
        seq = out[0].tolist()
    else:
        seq, gen_s = cached
    captured = {}
    h = hf.model.layers[mid_layer].register_forward_hook(
        lambda _m, _i, o: captured.__setitem__("mid", o[0] if isinstance(o, (tuple, list)) else o))
    try:
        body = hf.model(input_ids=torch.tensor([seq]), use_cache=False)
    finally:
        h.remove()
    final = body.last_hidden_state[0].float()
    mid = hf.model.norm(captured["mid"][0]).float()
    # sanity: the dense pass reproduces generate's tokens (fp32, same math)
    am = hf.get_output_embeddings()(body.last_hidden_state[0]).argmax(-1)
    agree = (am[len(prompt) - 1 : len(seq) - 1] == torch.tensor(seq[len(prompt):])).float().mean().item()
    return seq, gen_s, final, mid, agree


def drive(src, seq, P, final, feats, layer, k, L):
    """Runtime-style drive; returns (hits1, hitsk, steps, seconds in propose+observe)."""
    src.reset(seq[:P], final[:P])
    src.observe(seq[P], final[P - 1], L - 1)  # first token comes from the dense prefill
    h1 = hk = n = 0
    spent = 0.0
    for t in range(P + 1, len(seq)):
        t0 = time.perf_counter()
        cand = src.propose()
        spent += time.perf_counter() - t0
        c = cand.tolist()
        truth = seq[t]
        h1 += c[0] == truth
        hk += truth in c[:k]
        n += 1
        t0 = time.perf_counter()
        src.observe(truth, feats[t - 1], layer)
        spent += time.perf_counter() - t0
    return h1, hk, n, spent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft", default=str(DEFAULT_DRAFT), help="dir with draft.safetensors + draft_config.json")
    ap.add_argument("--compare-draft", default=None,
                    help="a second draft dir, reported as 'eagle[NAME]' rows (NAME = its folder name)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--stride", type=int, default=4, help="take every STRIDE-th MT-Bench question")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--mid-layer", type=int, default=None, help="0-based; default 2/3 of depth (20 of 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "draft_hit_rates.json"))
    ap.add_argument("--seqs-cache", default=None,
                    help="JSON file: reuse dense outputs (and their generate timings) from it, or write them")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from specee_compile.models import load_model

    lm = load_model(args.model)
    hf, tok = lm.model, lm.tokenizer
    L = hf.config.num_hidden_layers
    mid = args.mid_layer if args.mid_layer is not None else (2 * L) // 3
    draft = EagleDraft.load(args.draft, hf)
    draft_cfg = json.loads((Path(args.draft) / "draft_config.json").read_text()) \
        if Path(args.draft).is_dir() else {}
    vocab = draft.vocab_ids
    sources = {
        "eagle": lambda: EagleSource(draft, k=args.k),
        "eagle+ngram-assist": lambda: NgramAssist(EagleSource(draft, k=args.k)),
    }
    if args.compare_draft:
        other = EagleDraft.load(args.compare_draft, hf)
        name = Path(args.compare_draft).name
        sources[f"eagle[{name}]"] = lambda: EagleSource(other, k=args.k)
        sources[f"eagle[{name}]+ngram-assist"] = lambda: NgramAssist(EagleSource(other, k=args.k))
    sources["ngram"] = lambda: NgramDraft(k=args.k, fallback_ids=vocab[: 4 * args.k])
    sources["shallow"] = lambda: ShallowDraft(hf, k=args.k, vocab_ids=vocab)
    vocab_set = set(vocab.tolist())

    stats = {(s, m): [0, 0, 0, 0.0] for s in sources for m in ("final", "middle")}
    gen_s = gen_tok = 0.0
    in_vocab = total = 0
    agrees = []
    prompts = prompts_ids(tok, args.prompts, args.stride)
    cache_key = f"{lm.fingerprint}|{args.new_tokens}"
    cache = {}
    if args.seqs_cache and Path(args.seqs_cache).is_file():
        cache = json.loads(Path(args.seqs_cache).read_text()).get(cache_key, {})
    new_cache = {}
    for i, prompt in enumerate(prompts):
        hit = cache.get(",".join(map(str, prompt)))
        seq, g_s, final, midf, agree = dense_reference(hf, prompt, args.new_tokens, mid, hit)
        new_cache[",".join(map(str, prompt))] = (seq, g_s)
        P = len(prompt)
        gen_s += g_s
        gen_tok += len(seq) - P
        agrees.append(agree)
        in_vocab += sum(t in vocab_set for t in seq[P + 1 :])
        total += len(seq) - P - 1
        for s, make in sources.items():
            for mode, feats, layer in (("final", final, L - 1), ("middle", midf, mid)):
                src = make()
                r = drive(src, seq, P, final, feats, layer, args.k, L)
                for j in range(4):
                    stats[(s, mode)][j] += r[j]
        print(f"[{i + 1}/{len(prompts)}] prompt {P} tok, {len(seq) - P} new", file=sys.stderr)

    if args.seqs_cache:
        Path(args.seqs_cache).write_text(json.dumps({cache_key: new_cache}))
    base_ms = 1000 * gen_s / max(gen_tok, 1)
    rows = []
    for (s, mode), (h1, hk, n, sec) in stats.items():
        ms = 1000 * sec / max(n, 1)
        rows.append({"source": s, "features": mode, "layer": (L - 1) if mode == "final" else mid,
                     "top1": h1 / max(n, 1), f"top{args.k}": hk / max(n, 1), "steps": n,
                     "ms_per_step": ms, "cost_vs_base_token": ms / base_ms})
    result = {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "draft": str(args.draft),
        "compare_draft": args.compare_draft,
        "draft_num_vocab_ids": int(vocab.numel()),
        "draft_train": {k: v for k, v in draft_cfg.get("train", {}).items() if k != "loss_curve"},
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "k": args.k,
        "num_layers": L,
        "mid_layer": mid,
        "base_ms_per_token_hf_generate": base_ms,
        "dense_pass_agrees_with_generate": statistics.mean(agrees),
        "dense_tokens_in_draft_vocab": in_vocab / max(total, 1),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    k = args.k
    print(f"\n{lm.name}: {len(prompts)} MT-Bench prompts x {args.new_tokens} tokens, k={k}, "
          f"middle = layer {mid} (0-based) of {L}; base model {base_ms:.1f} ms/token (HF generate, "
          f"{args.threads} threads); dense next token in draft vocab: {100 * result['dense_tokens_in_draft_vocab']:.1f}%\n")
    print(f"| source | features | top-1 | top-{k} | ms/step | vs base token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['features']} (layer {r['layer']}) | {100 * r['top1']:.1f}% | "
              f"{100 * r[f'top{k}']:.1f}% | {r['ms_per_step']:.2f} | {100 * r['cost_vs_base_token']:.1f}% |")
    return result


if __name__ == "__main__":
    main()
