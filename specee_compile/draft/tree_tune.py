"""`specee-compile tune-tree`: measure draft-tree shapes with one draft head on this device, and write a copy of the
artifacts whose draft_config.json carries the fastest (`tree_shapes`, per device: "cuda", "cpu" or "cpu-onednn" as
`Settings.tree_shape_key`, which `Settings.tree_shape` takes over the device's default).

Why per head and device: a shape's cost is its draft levels (one draft pass each) and its verified rows (on a GPU,
blocks of 32 rows cost about the same), its worth the tokens a verify step accepts, which depend on how often the
head's deeper guesses are right. On an H100 the shipped SmolLM2 head verified as many tokens per step at 31:4:8 as at
the device default 24:6:8 for two draft passes fewer: 0.905x dense against 0.766x (benchmarks/RESULTS.md, session 35).

How: dense and the tree alone (guard off) at every shape decode the same prompts (MT-Bench first turns) in the same
rounds, through `Decoder.generate()`, after one warm-up call each (compiles, captures and tunes, outside the timing).
A shape is eligible only where every prompt gave dense's tokens (greedy, lossless); the eligible shape with the
highest median tok/s ratio to dense wins, even below 1 (the tree guard still decides per generation whether the tree
pays). The output is a new artifact directory (`-o`, written atomically; never over files specee-compile did not
write): every file of the source, draft_config.json's `tree_shapes` set for this device, tree_tune.json (every
shape's figures) and tree_tune.png, and a manifest over all of them.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from ..errors import ArtifactError, SpecEEError

# the shapes timed when none are given, per device kind: the device default, shallower and wider trees (on a GPU up
# to 32 rows, one row block: 31 nodes verify in the block 24 nodes already take, and a superset of the nodes accepts
# at least as many tokens; 31:x:8 beat 24:x:8 at depths 4 and 5 in session 35), and on a CPU the small trees its
# matmul libraries verify for about one row's price
DEFAULT_SHAPES = {
    "cuda": ((24, 6, 8), (31, 6, 8), (24, 5, 8), (24, 4, 8), (31, 4, 8), (31, 5, 8), (31, 3, 8), (15, 4, 8)),
    "cpu": ((2, 2, 2), (3, 2, 2), (4, 3, 2), (6, 3, 2), (2, 1, 2)),
}
REPORT = "tree_tune.json"
PLOT = "tree_tune.png"


def _name(shape) -> str:
    return ":".join(map(str, shape))


def measure_shapes(loaded, base: dict, shapes, prompts: list[list[int]], log=print) -> tuple[dict, str]:
    """Every shape's figures against dense on `prompts` (token ids), the same rounds: {shape name: {ratio,
    tok_s, accepted_per_step, identical}} plus "dense": {tok_s}; and the key the figures belong under
    (`Settings.tree_shape_key`: the device, and on a CPU the matmul library the backend chose). `base`: the
    Settings fields every decoder shares (device, dtype, backend, max_new_tokens, artifacts)."""
    from ..api import build_decoder
    from ..config import Settings

    dense = build_decoder(loaded, Settings(**base))
    decs = {"dense": dense}
    for b, d, k in shapes:
        decs[_name((b, d, k))] = build_decoder(
            loaded, Settings(**base, speculate="tree", tree_guard=False, tree_budget=b, tree_depth=d, tree_topk=k),
            segments=dense.seg)
    for i, (name, dec) in enumerate(decs.items()):  # compiles, captures and tunes: outside the timed rounds
        t = time.perf_counter()
        dec.generate(prompts[0])
        log(f"warm-up {i + 1}/{len(decs)}: {name} ({time.perf_counter() - t:.1f} s)")
    speeds: dict[str, list[float]] = {n: [] for n in decs}
    acc = {n: [0, 0, 0] for n in decs}  # accepted tokens, verify steps, prompts identical to dense
    for j, ids in enumerate(prompts):
        ref = None
        for name, dec in decs.items():
            r = dec.generate(ids)
            speeds[name].append(r.decode_tok_s)
            if name == "dense":
                ref = r.token_ids
                continue
            acc[name][0] += r.accepted_tokens
            acc[name][1] += r.verify_steps
            acc[name][2] += int(r.token_ids == ref)
        log(f"prompt {j + 1}/{len(prompts)} timed")
    out: dict = {"dense": {"tok_s": round(statistics.median(speeds["dense"]), 1)}}
    for name in decs:
        if name == "dense":
            continue
        ratios = [a / b for a, b in zip(speeds[name], speeds["dense"])]
        out[name] = {"ratio": round(statistics.median(ratios), 3), "tok_s": round(statistics.median(speeds[name]), 1),
                     "accepted_per_step": round(acc[name][0] / max(acc[name][1], 1), 3),
                     "identical": f"{acc[name][2]}/{len(prompts)}"}
    return out, Settings(**base).tree_shape_key(getattr(dense.seg, "gemm", None))


def best_shape(figures: dict) -> tuple[int, int, int]:
    """The shape (a `measure_shapes` key) with the highest ratio among those identical to dense on every prompt;
    SpecEEError where none is."""
    ok = {n: f for n, f in figures.items() if n != "dense" and len(set(f["identical"].split("/"))) == 1}
    if not ok:
        raise SpecEEError("no tree shape gave dense's tokens on every prompt, so none is written; check the model's "
                          "dtype (a 16-bit verification may part from 16-bit dense at near-ties) or time more shapes")
    return tuple(int(t) for t in max(ok, key=lambda n: ok[n]["ratio"]).split(":"))  # type: ignore[return-value]


def plot(figures: dict, best: str, title: str, path: Path) -> bool:
    """Bars of each shape's tok/s ratio to dense, labelled with its tokens per verify step; the pick highlighted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in figures if n != "dense"]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.4))
    ax.bar(range(len(names)), [figures[n]["ratio"] for n in names],
           color=["#55a868" if n == best else "#dd8452" for n in names])
    for x, n in enumerate(names):
        ax.text(x, figures[n]["ratio"], f"{figures[n]['ratio']:.3f}x\n{figures[n]['accepted_per_step']:.2f} tok/step",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="#4c72b0", lw=1)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("tree shape (budget:depth:top-k)")
    ax.set_ylabel("decode tok/s vs dense")
    ax.margins(y=0.25)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def tune_tree_command(model: str, out, *, artifacts=None, shapes=None, prompts: int = 8, max_new_tokens: int = 64,
                      device: str = "cpu", backend: str | None = None, dtype: str = "float32",
                      force: bool = False, prompt_file: str | None = None) -> dict:
    """Measure `shapes` (default: DEFAULT_SHAPES of the device kind) with the draft head of `artifacts` (default:
    the model's shipped ones) on the first `prompts` MT-Bench turns (or of `prompt_file`'s JSON list of prompt
    strings) and write the artifacts with the fastest to `out`; return tree_tune.json's content."""
    from ..api import default_artifacts_dir, encode_prompt, load_model
    from ..artifacts import (
        atomic_directory,
        check_fingerprint,
        plan_output,
        read_manifest,
        write_manifest,
    )
    from ..config import Settings
    from ..data import mtbench_first_turns, read_json_list
    from ..models.pypi import progress

    if prompts < 1 or max_new_tokens < 1:
        raise SpecEEError(f"--prompts {prompts} / --max-new-tokens {max_new_tokens}: expected positive integers")
    plan_output(out, force=force)  # before the model loads and the shapes are timed
    given = read_json_list(prompt_file, "--prompt-file", str, "prompt strings") if prompt_file else None
    backend = backend or ("inductor" if str(device).startswith("cuda") else "eager")
    kind = Settings(device=device).device_kind
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES[kind])]

    def with_draft(src: Path | None, where: str) -> Path:
        if src is None or not (src / "draft.safetensors").is_file():
            raise ArtifactError(f"tune-tree needs an EAGLE draft head, and there is none {where}: train one with "
                                f"`specee-compile train-draft {model} -o DIR` and pass --artifacts DIR")
        return src

    if artifacts:  # (given: checked before the model loads)
        with_draft(Path(artifacts), f"in {artifacts}")
    loaded = load_model(model, dtype=dtype, device=device)
    src = Path(artifacts) if artifacts else with_draft(default_artifacts_dir(loaded), f"for {loaded.name}")
    manifest = read_manifest(src)  # every file's checksum, before it is timed or copied
    check_fingerprint(manifest, loaded.fingerprint, src)
    texts = (given or mtbench_first_turns())[:prompts]
    ids = [encode_prompt(loaded.tokenizer, t) for t in texts]
    base = {"device": device, "dtype": dtype, "backend": backend, "max_new_tokens": max_new_tokens,
            "artifacts": str(src)}
    progress(f"timing {len(shapes)} tree shapes against dense on {len(ids)} "
             f"{'prompts of ' + str(prompt_file) if prompt_file else 'MT-Bench turns'} x {max_new_tokens} "
             f"tokens ({backend} on {device})")
    figures, key = measure_shapes(loaded, base, shapes, ids, log=progress)
    best = best_shape(figures)
    report = {"model": loaded.name, "device": device, "shape_key": key, "backend": backend, "dtype": dtype,
              "prompts": len(ids), "prompt_source": prompt_file or "MT-Bench first turns",
              "max_new_tokens": max_new_tokens, "source_artifacts": str(src),
              "date": time.strftime("%Y-%m-%d"), "best": _name(best), "shapes": figures}
    if kind == "cuda":
        import torch

        report["card"] = torch.cuda.get_device_name(torch.device(device))
    with atomic_directory(out, force=force) as tmp:
        for rel in manifest["files"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        cfg_path = tmp / "draft_config.json"  # (a bare draft.safetensors loads without one: then it holds this alone)
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["tree_shapes"] = {**cfg.get("tree_shapes", {}), key: list(best)}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
        plot(figures, _name(best), f"{loaded.name}, {report.get('card', device)}, {report['date']}", tmp / PLOT)
        info = {k: v for k, v in manifest.items()
                if k not in ("format_version", "tool", "model", "fingerprint", "created", "files")}
        info["draft"] = {**info.get("draft", {}), "config": cfg}
        info["tree_tune"] = {"best": report["best"], "shape_key": key, "report": REPORT}
        write_manifest(tmp, model=manifest["model"], fingerprint=manifest["fingerprint"], info=info)
    for name, f in figures.items():
        if name != "dense":
            progress(f"{name:>8s}: {f['ratio']:.3f}x dense, {f['accepted_per_step']:.2f} tokens per verify step, "
                     f"{f['identical']} identical" + ("   <- written" if name == _name(best) else ""))
    return report
