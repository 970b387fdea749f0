"""`specee-compile eval`: dense vs SpecEE on real prompts, in one process, on this machine.

For each prompt every configuration runs back to back (dense first), so speed is compared as a
ratio under the same load. Reported per configuration: average executed layers (layer-rows per
decode step, backfill and discarded work included), exit-layer histogram (PNG), rollback rate,
token agreement with dense greedy (% identical outputs, mean first-divergence position), SQuAD v2
exact match and F1, and decode tokens/s.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import atomic_file, free_suffix, write_file_atomic
from ..config import Settings

CONFIGS = {
    "dense": dict(specee=False),
    "paper": dict(specee=True, mode="approximate", kv_policy="skip"),
    "backfill": dict(specee=True, mode="approximate", kv_policy="backfill"),
    "lossless": dict(specee=True, mode="lossless", kv_policy="backfill"),
    "tree": dict(specee=False, speculate="tree"),
    "tree_lossless": dict(specee=True, mode="lossless", kv_policy="backfill", speculate="tree"),
    "tree_paper": dict(specee=True, mode="approximate", kv_policy="skip", speculate="tree"),  # trades accuracy
    # the same with the draft's weights rounded to int8 (Settings.draft_quant): what the int8 draft does to the
    # exit decisions (paper) and to the tree's acceptance, against the float draft's rows of the same run
    "paper_q8": dict(specee=True, mode="approximate", kv_policy="skip", draft_quant="int8"),
    "lossless_q8": dict(specee=True, mode="lossless", kv_policy="backfill", draft_quant="int8"),
    "tree_q8": dict(specee=False, speculate="tree", draft_quant="int8"),
}

SQUAD_INSTRUCTION = (
    "Answer the question using the context. Reply with only the answer, a few words, no sentence.\n\n"
    "Context: {context}\n\nQuestion: {question}"
)


@dataclass
class RunRecord:
    token_ids: list[int]
    exit_layers: list[int]
    layer_passes: int
    layer_rows: int
    decode_steps: int
    rollbacks: int
    decode_s: float
    text: str = ""


@dataclass
class ConfigReport:
    name: str
    runs: dict[str, list[RunRecord]] = field(default_factory=dict)  # suite -> records


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(dense: list[list[int]], other: list[list[int]]) -> dict:
    divs = [first_divergence(d, o) for d, o in zip(dense, other)]
    identical = sum(d is None for d in divs)
    # identical outputs count as diverging at their full length
    positions = [len(dense[i]) if d is None else d for i, d in enumerate(divs)]
    return {
        "identical_pct": 100.0 * identical / max(1, len(dense)),
        "mean_first_divergence": statistics.fmean(positions) if positions else 0.0,
    }


def summarize(report: ConfigReport, dense: ConfigReport, num_layers: int, squad_answers=None) -> dict:
    out = {}
    for suite, recs in report.runs.items():
        passes = sum(r.layer_passes for r in recs)
        rows = sum(r.layer_rows for r in recs)
        steps = sum(r.decode_steps for r in recs)
        tokens = sum(max(0, len(r.token_ids) - 1) for r in recs)  # decoded after the prefill's token
        secs = sum(r.decode_s for r in recs)
        exits = Counter(e for r in recs for e in r.exit_layers[1:])  # [0] comes from the prefill
        s = {
            "prompts": len(recs),
            "avg_layers": passes / steps if steps else float(num_layers),
            "avg_layers_pct": 100.0 * passes / steps / num_layers if steps else 100.0,
            "avg_layer_rows": rows / steps if steps else float(num_layers),
            "decode_tok_s": tokens / secs if secs else 0.0,
            "tokens_per_step": tokens / steps if steps else 1.0,  # > 1 for tree steps (bonus included)
            "rollbacks_per_100_tokens": 100.0 * sum(r.rollbacks for r in recs) / max(1, steps),
            "exit_histogram": {str(k): v for k, v in sorted(exits.items())},
            **agreement([r.token_ids for r in dense.runs[suite]], [r.token_ids for r in recs]),
        }
        dense_s = sum(r.decode_s for r in dense.runs[suite])
        dense_tokens = sum(max(0, len(r.token_ids) - 1) for r in dense.runs[suite])
        if dense_s and secs and dense_tokens:
            s["speed_vs_dense"] = (tokens / secs) / (dense_tokens / dense_s)
        if suite == "squad" and squad_answers is not None:
            from ..data import squad_exact_match, squad_f1

            s["squad_em"] = 100.0 * statistics.fmean(
                squad_exact_match(r.text, a) for r, a in zip(recs, squad_answers))
            s["squad_f1"] = 100.0 * statistics.fmean(squad_f1(r.text, a) for r, a in zip(recs, squad_answers))
        out[suite] = s
    return out


def plot_histograms(summary: dict, num_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if n != "dense"]
    suites = sorted({s for n in names for s in summary[n]})
    fig, axes = plt.subplots(len(suites), 1, figsize=(9, 3.2 * len(suites)), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, suite in zip(axes[:, 0], suites):
        for j, name in enumerate(names):
            hist = summary[name][suite]["exit_histogram"]
            total = max(1, sum(hist.values()))
            xs = list(range(num_layers))
            ys = [100.0 * hist.get(str(x), 0) / total for x in xs]
            avg = summary[name][suite]["avg_layers"]
            ax.bar([x + j * width for x in xs], ys, width=width, label=f"{name} (avg {avg:.1f} layers)")
        ax.set_title(f"exit layer per generated token: {suite}")
        ax.set_xlabel(f"exit after layer (0-based; {num_layers - 1} = full depth)")
        ax.set_ylabel("% of tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(summary: dict) -> str:
    lines = ["| config | suite | avg layers | % depth | layer-rows | identical % | mean 1st div | rollbacks/100 tok | "
             "SQuAD EM | SQuAD F1 | decode tok/s | vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, suites in summary.items():
        for suite, s in suites.items():
            em = f"{s['squad_em']:.1f}" if "squad_em" in s else ""
            f1 = f"{s['squad_f1']:.1f}" if "squad_f1" in s else ""
            lines.append(
                f"| {name} | {suite} | {s['avg_layers']:.2f} | {s['avg_layers_pct']:.1f} | {s['avg_layer_rows']:.2f} | "
                f"{s['identical_pct']:.1f} | "
                f"{s['mean_first_divergence']:.1f} | {s['rollbacks_per_100_tokens']:.2f} | {em} | {f1} | "
                f"{s['decode_tok_s']:.2f} | {s.get('speed_vs_dense', 1.0):.3f} |")
    return "\n".join(lines)


def _machine(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"


def eval_command(args) -> dict:
    import torch
    from tqdm import tqdm

    from ..api import build_decoder, encode_prompt
    from ..data import mtbench_first_turns, squad_v2
    from ..models import load_model

    t_start = time.time()
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    configs = ["dense"] + [c.strip() for c in args.configs.split(",") if c.strip() and c.strip() != "dense"]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        from ..errors import SpecEEError

        raise SpecEEError(f"unknown eval config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    suites = {}
    if args.mtbench:
        suites["mtbench"] = ([encode_prompt(tok, q) for q in mtbench_first_turns()[: args.mtbench]], 128, None)
    squad_answers = None
    if args.squad:
        items = squad_v2(args.squad, answerable_only=True, seed=0)
        squad_answers = [it["answers"] for it in items]
        prompts = [encode_prompt(tok, SQUAD_INSTRUCTION.format(**it)) for it in items]
        suites["squad"] = (prompts, 32, squad_answers)

    decoders = {}
    shared = None
    for name in configs:
        s = Settings(max_context=2048, threshold=args.threshold, draft_source=args.draft_source,
                     artifacts=args.artifacts, device=getattr(args, "device", "cpu"),
                     backend=getattr(args, "backend", "eager"),
                     exit_cost_check=not getattr(args, "every_exit_point", False), **CONFIGS[name])
        dec = build_decoder(loaded, s, segments=shared)
        shared = shared or dec.seg
        decoders[name] = dec
    reports = {name: ConfigReport(name) for name in configs}
    quants: dict = {}  # config -> its EAGLE draft's weights as run (None: no EAGLE draft)
    for suite, (prompts, max_new, _) in suites.items():
        for name in configs:
            reports[name].runs[suite] = []
        for j, ids in enumerate(tqdm(prompts, desc=f"eval {suite}", unit="prompt")):
            # the configurations take turns going first: the run after another one is measurably faster on
            # a small CPU (caches, frequency), and a fixed order would bias every speed ratio the same way
            for name in configs[j % len(configs):] + configs[:j % len(configs)]:
                dec = decoders[name]
                dec.s.max_new_tokens = max_new
                with torch.no_grad():
                    r = dec.generate(ids)
                quants[name] = r.draft_quant
                reports[name].runs[suite].append(RunRecord(
                    token_ids=r.token_ids, exit_layers=r.exit_layers, layer_passes=r.layer_passes, layer_rows=r.layer_rows,
                    decode_steps=r.decode_steps, rollbacks=r.rollbacks, decode_s=r.decode_s,
                    text=tok.decode(r.token_ids, skip_special_tokens=True).strip()))
    L = loaded.model.config.num_hidden_layers
    summary = {name: summarize(reports[name], reports["dense"], L, squad_answers) for name in configs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier eval in the same directory stays: this one's files get the first free "-N" suffix
    sfx = free_suffix(out, ["eval.json", "eval.md", "exit_histogram.png"])
    f_json, f_md, f_png = f"eval{sfx}.json", f"eval{sfx}.md", f"exit_histogram{sfx}.png"
    with atomic_file(out / f_png) as tmp:
        plot_histograms(summary, L, tmp)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": _machine(getattr(args, "device", "cpu")),
        "backend": getattr(args, "backend", "eager"),
        "model": loaded.name, "fingerprint": loaded.fingerprint, "dtype": "float32", "commit": git_commit(),
        "command": "specee-compile eval " + " ".join(getattr(args, "argv", []) or [args.model]),
        "threshold": args.threshold, "draft": args.draft_source, "wall_s": round(time.time() - t_start, 1),
        "exit_cost_check": not getattr(args, "every_exit_point", False), "draft_quant": quants,
    }
    result = {"meta": meta, "summary": summary,
              "samples": {n: {s: [r.text for r in recs[:5]] for s, recs in reports[n].runs.items()} for n in configs},
              "exit_trace": {n: [e for s in reports[n].runs.values() for r in s for e in r.exit_layers[1:]]
                             for n in configs if n != "dense"}}
    write_file_atomic(out / f_json, json.dumps(result, indent=1) + "\n")
    table = markdown_table(summary)
    write_file_atomic(out / f_md, table + "\n")
    print(table)
    print(f"\n{meta}\nwrote {out}/{f_json}, {f_md}, {f_png}")
    return result
