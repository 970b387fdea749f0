"""The one settings dataclass. Passed explicitly everywhere; no global config flips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .backends.registry import backend_names, get_backend
from .runtime.policies import EXIT_POLICIES
from .runtime.policies import KV_POLICIES as _KV_POLICIES

MODES = tuple(EXIT_POLICIES)  # exit policies (runtime/policies.py)
KV_POLICIES = tuple(_KV_POLICIES)
BACKENDS = backend_names()  # the one backend registry (backends/registry.py)
DRAFT_SOURCES = ("eagle", "ngram", "shallow")
DRAFT_QUANTS = ("auto", "none", "int8")  # the EAGLE draft's matmul weights (draft/eagle.py EagleDraft.quantize)
DRAFT_DTYPES = ("auto", "float16", "bfloat16", "float32")  # what the EAGLE draft computes in (EagleDraft.cast)
SPECULATE = ("none", "tree")  # tree: EAGLE-2 draft tree verified in one forward (runtime/tree.py)
TREE_PROGRAMS = ("auto", "fixed", "host")  # how a tree step runs (runtime/tree.py)
TREE_GUARD_STEPS = 8  # verify steps the tree guard waits for before it judges the tree (runtime/tree.py)
# tokens a verify step is expected to emit, where nothing measured says (an acceptance trace does): what the exit
# points of SpecEE on the tree are weighed with (a path leaves only where every token on it has;
# runtime/exit_costs.py `path_rates`). 3: between SmolLM2's measured 2.57 (H200 head) and EAGLE-2's ~4 on 7B models.
TREE_PATH_TOKENS = 3.0
# the default tree (budget, depth, top-k) and prompt lookup per device type, measured with SmolLM2
# (benchmarks/RESULTS.md, sessions 4 and 5): a GPU verifies 25 rows for about what it verifies 7
# (launch-bound); on a CPU, MKL's fp32 GEMM streams the weights once per 3 rows (the cost of 1-3 rows is one
# weight pass, 4-6 two, 7-9 three), so the CPU tree is 2 nodes + the root = 3 rows, and both are draft nodes
# (lookup off: its reserved rows are empty unless the text repeats). 2-core CPU, H200-trained head, 16
# MT-Bench turns x 128 tokens: 2:2:2 without lookup 1.41x dense, 6:4:2 with lookup 1.21x (session 4's default).
# "cpu-onednn": where the eager backend runs its matmuls in oneDNN (backends/cpu_gemm.py), 1 to 8 rows cost about
# one row, so the tree takes 4 nodes over 3 levels (2026-12-05, 2-core AMD EPYC, 10 MT-Bench turns x 128 tokens,
# lookup first: 4:3:2 1.73x dense, 2:2:2 1.61x; RESULTS.md session 19). A draft head may carry the shape measured
# best with it (draft_config.json `tree_shapes`), which replaces these: the shipped SmolLM2 head's CUDA shape is
# 31:4:8 (H100, session 35: 0.905x dense against 24:6:8's 0.766x, the same rounds; 32 rows, 2.891 tokens a step).
TREE_SHAPES = {"cuda": (24, 6, 8), "cpu": (2, 2, 2), "cpu-onednn": (4, 3, 2)}
TREE_LOOKUP = {"cuda": True, "cpu": False}

# lookup first (the host tree step): when the last n tokens recur, the step verifies the continuation that followed
# them instead of the draft's tree (no draft expansion that step). 2-core CPU, 16 MT-Bench turns x 128 tokens,
# 2:2:2, same run: 1.83 -> 1.90 tokens per verify step, 1.50x -> 1.56x dense at n = 3 (benchmarks/RESULTS.md,
# session 10). 0 on CUDA: the fixed tree program verifies the draft's tree.
TREE_LOOKUP_FIRST = {"cuda": 0, "cpu": 3}


def parse_tree_shape(text: str, flag: str) -> tuple[int, int, int]:
    """budget:depth:topk from a flag's text; SpecEEError (one line) where it is not three positive integers."""
    from .errors import SpecEEError

    try:
        shape = tuple(int(t) for t in text.split(":"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise SpecEEError(f"{flag} {text}: expected budget:depth:topk, three positive integers (e.g. 24:6:8)")
    return shape  # type: ignore[return-value]


@dataclass
class Settings:
    # ---- decoding ----
    max_new_tokens: int = 128
    """Tokens to generate after the prompt (stops earlier at EOS)."""
    temperature: float = 0.0
    """0 = greedy. Early exit is defined for greedy decoding (as in the paper); sampling runs dense."""
    top_p: float = 1.0
    """Nucleus sampling mass, used when temperature > 0."""
    seed: int = 0
    """Seed for sampling."""
    max_context: int = 2048
    """Static KV-cache length: prompt + new tokens must fit. Capped by the model's max positions."""
    chat_template: bool = True
    """Wrap the prompt with the tokenizer's chat template when it has one."""
    device: str = "cpu"
    """torch device for the model and cache."""
    dtype: str = "float32"
    """Compute dtype: float32 | float16 | bfloat16."""
    backend: str = "eager"
    """Which backend runs the segments: eager | inductor | onnx | tensorrt."""
    cuda_graphs: bool = True
    """Inductor backend on CUDA: capture each segment as a CUDA graph."""

    # ---- SpecEE ----
    specee: bool = False
    """Enable speculative early exit (needs artifacts: predictors, draft, schedule)."""
    mode: str = "approximate"
    """approximate = the paper (exit when predictor > threshold and the full-head argmax is in the
    candidate set); lossless = exit token is argmax over candidates, verified later by backfill and
    rolled back on mismatch, so output equals dense greedy."""
    kv_policy: str = "skip"
    """skip = the paper (deeper layers never hold K/V of exited tokens; masked out);
    backfill = pending exited rows are pushed through skipped layers with the next deep token."""
    threshold: float | None = None
    """Predictor score above which an exit is proposed. None = the artifacts' per-layer thresholds
    (chosen at training time for a target precision); a number overrides every layer."""
    num_candidates: int = 4
    """|S|: speculative candidate tokens per step."""
    draft_source: str | None = None
    """Where candidates come from: eagle (trained head) | ngram (prompt lookup) | shallow (layer
    logits). None = the source the artifacts were trained with (manifest `draft.source`)."""
    draft_quant: str = "auto"
    """The EAGLE draft's matmul weights: none = as trained; int8 = one int8 per weight with a scale per output
    row, which the CUDA kernels stream at half the bytes (the draft's cost per token and per tree level).
    Only the candidates can change: the output is still the target's (lossless stays identical to dense).
    auto = int8 where it was measured to pay (`draft_quant_for`): a draft computing in 16 bits on CUDA (the tree's
    and SpecEE's one-token draft); none elsewhere."""
    draft_dtype: str = "auto"
    """What the EAGLE draft computes in: auto = the target's dtype; float16 / bfloat16 run an fp32 target's draft
    in 16 bits (tensor-core matmuls, half the bytes per draft pass and tree level; the rotary stays as built).
    Only the candidates can change: the output is still the target's (lossless stays identical to dense)."""
    max_pending: int = 8
    """backfill: at most this many exited tokens wait for K/V; one more forces a full-depth step."""
    min_exit_layer: int = 0
    """No exit before this layer index (0-based), whatever the predictors say."""
    exit_cost_check: bool = True
    """Measure at build time what each exit point costs on this device against what it saves, keep only
    the points that pay, and decode as dense when none does (runtime/exit_costs.py). False keeps every
    exit point (studies of the exits themselves)."""

    # ---- tree speculative decoding (runtime/tree.py) ----
    speculate: str = "none"
    """none = one token per step; tree = an EAGLE-2 dynamic draft tree from the EAGLE draft head,
    verified in one forward with a tree attention mask; the longest matching path + a bonus token is
    accepted (greedy: output = dense greedy; temperature > 0: speculative sampling, the target's
    distribution). With --specee the exit predictors score every node (merged mapping)."""
    tree_budget: int | None = None
    """Tree: at most this many draft nodes verified per step (the root, the last token, not counted).
    None = the shape measured with the draft head on this device where its draft_config.json has one (keyed
    as `TREE_SHAPES`), else the device's default (`TREE_SHAPES`, see `tree_shape()`)."""
    tree_depth: int | None = None
    """Tree: at most this many levels below the root (the most tokens one step can accept, bonus aside).
    None = as tree_budget."""
    tree_topk: int | None = None
    """Tree: children proposed per expanded node, and nodes expanded per level (EAGLE-2's top-k).
    None = as tree_budget."""
    tree_lookup: bool | None = None
    """Tree: merge the prompt-lookup continuation (the tokens that followed the last n-gram's earlier
    occurrence) into the tree, on rows reserved for it. None = the device's default (`TREE_LOOKUP`)."""
    tree_lookup_first: int | None = None
    """Tree, host step: when the last n tokens (n = this; 0 = never) occurred earlier in the text, verify the
    continuation that followed them (prompt-lookup decoding) on the tree's rows instead of the draft's tree.
    None = the device's default (`TREE_LOOKUP_FIRST`: 3 on a CPU, 0 on CUDA; 0 with tree_program fixed). n > 0
    runs the host step (auto does not pick the fixed program; fixed refuses it)."""
    tree_program: str = "auto"
    """Tree: fixed = the whole tree step as one fixed-shape program (`FixedTree`: a CUDA graph per
    attention bucket on CUDA; greedy; SpecEE on the tree in approximate mode, its exits decided on the device);
    host = the step driven from the host (any mode, sampling, SpecEE on the tree with lossless pruning, prompt
    lookup); auto = fixed on CUDA where it applies (greedy, an EAGLE draft on the device), else host."""
    tree_guard: bool = True
    """Tree: never slower than dense. Where the fixed program runs beside a whole-step dense program (CUDA,
    inductor), both are timed on this device before the first token; their ratio is the tokens a verify step
    must accept to pay. Once the decoder's verify steps (at least `TREE_GUARD_STEPS`) accept fewer on average,
    it decodes densely from then on, the same tokens (greedy), and the stats say why (`tree_guard`).
    False = always the tree."""

    # ---- two-level scheduling ----
    use_schedule: bool = True
    """False = run every predictor at every layer (no scheduling)."""
    online_window: int = 5
    """Online set: remember the last N exit layers."""
    online_offsets: tuple[int, ...] = (-2, 0, 2)
    """Online set: activate predictors at e + offset for each remembered exit layer e."""
    offline_coverage: float = 0.6
    """Offline set: the fewest most-frequent exit layers that cover this share of calibration exits."""
    offline_max_layers: int = 8
    """Offline set: at most this many layers."""

    # ---- artifacts ----
    artifacts: str | None = None
    """Artifact directory (predictors, draft, schedule). None = shipped artifacts for the model."""

    def __post_init__(self) -> None:
        from .errors import SpecEEError

        _check_fields(self)  # types and ranges first: the checks below compare values

        def check(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise SpecEEError(f"{name}={value!r} is not one of {', '.join(allowed)}")

        check("mode", MODES)
        check("kv_policy", KV_POLICIES)
        check("backend", BACKENDS)
        check("speculate", SPECULATE)
        check("tree_program", TREE_PROGRAMS)
        if self.tree_program == "fixed" and self.temperature > 0:
            raise SpecEEError("--tree-program fixed decodes greedily; drop --temperature or use --tree-program host")
        if self.tree_program == "fixed" and self.specee and self.speculate == "tree" and self.mode == "lossless":
            raise SpecEEError("--tree-program fixed runs no lossless exits on the tree (their pruning saves rows, not "
                              "layer passes); use --mode approximate, --tree-program host, or drop --specee")
        if self.tree_program == "fixed" and self.tree_lookup_first:
            raise SpecEEError("--tree-program fixed verifies the draft's tree; lookup first runs on the host step: "
                              "drop --tree-lookup-first or use --tree-program host")
        if self.draft_source is not None:
            check("draft_source", DRAFT_SOURCES)
        check("draft_quant", DRAFT_QUANTS)
        check("draft_dtype", DRAFT_DTYPES)
        if self.device_kind == "cpu":  # the CPU matmul settings, checked before any model is loaded
            from .backends.cpu_gemm import setting
            from .plugins.inductor_cpu_gemv import enabled

            setting()
            enabled()
        if self.device_kind == "cuda":  # the CUDA kernels' variables (README), checked before any model is loaded
            from .model_step import tree_linears
            from .plugins import compile_cache, pdl, triton_gemv

            pdl.inductor_options()  # the mode, and under `all` whether this torch's Inductor can be held to it
            compile_cache.enabled()
            tree_linears()
            triton_gemv.max_rows()
            triton_gemv.fixed_config()
        for flag, v, off in (("--draft-quant", self.draft_quant, ("auto", "none")),
                             ("--draft-dtype", self.draft_dtype, ("auto",))):
            if v not in off and not (self.specee or self.speculate == "tree"):
                raise SpecEEError(f"{flag} {v} changes the draft, which runs only with --specee or --speculate tree: "
                                  f"add one, or drop {flag}")
            if v not in off and get_backend(self.backend).kind == "artifact":
                raise SpecEEError(f"{flag} {v}: the {self.backend} backend runs an exported directory's draft as "
                                  f"exported; use --backend eager or inductor, or drop {flag}")
        needs_kv = EXIT_POLICIES[self.mode].needs_kv
        if needs_kv is not None and self.kv_policy != needs_kv:
            raise SpecEEError(
                f"mode={self.mode} needs kv_policy={needs_kv} (the backfill pass is what verifies exits); "
                f"pass --kv {needs_kv}"
            )
        if self.max_new_tokens < 1:
            raise SpecEEError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise SpecEEError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.num_candidates < 1:
            raise SpecEEError(f"num_candidates must be >= 1, got {self.num_candidates}")
        self.online_offsets = tuple(self.online_offsets)

    def tree_shape_key(self, gemm: str | None = None) -> str:
        """The key of this device's tree shape (`TREE_SHAPES`, a head's `tree_shapes`): "cuda", "cpu", or
        "cpu-onednn" where the backend's CPU matmul library (its `gemm`) is oneDNN."""
        kind = self.device_kind
        return "cpu-onednn" if kind == "cpu" and gemm == "onednn" else kind

    def tree_shape(self, gemm: str | None = None, measured: dict | None = None) -> tuple[int, int, int]:
        """(budget, depth, top-k) of the draft tree: the fields given; for those left None, the shape measured
        best with the draft head on this device (`measured`, its draft_config.json's `tree_shapes`), else the
        device's default (`TREE_SHAPES`), both under `tree_shape_key(gemm)`."""
        key = self.tree_shape_key(gemm)
        dflt = (measured or {}).get(key) or TREE_SHAPES[key]
        given = (self.tree_budget, self.tree_depth, self.tree_topk)
        return tuple(d if v is None else v for v, d in zip(given, dflt))  # type: ignore[return-value]

    def tree_lookup_on(self) -> bool:
        """Whether the draft tree merges the prompt-lookup path: the field, else the device's default."""
        if self.tree_lookup is not None:
            return self.tree_lookup
        return TREE_LOOKUP[self.device_kind]

    def tree_lookup_first_n(self) -> int:
        """The n of lookup first (0 = off): the field, else the device's default (off for the fixed program,
        which verifies the draft's tree)."""
        if self.tree_lookup_first is not None:
            return self.tree_lookup_first
        return 0 if self.tree_program == "fixed" else TREE_LOOKUP_FIRST[self.device_kind]

    def draft_quant_for(self, device_type: str, draft_dtype) -> str:
        """What draft_quant asks of an EAGLE draft computing in `draft_dtype` (a torch dtype) on `device_type`:
        "none" or "int8"; auto = int8 for a 16-bit draft on CUDA, none elsewhere.
        Why there: the int8 draft rows of the 7B bench beat the 16-bit ones by 5.3% (tree), 5.7% (tree + SpecEE)
        and 1.6% (SpecEE's one-token draft) on an H100 (session 25, the turned int8 rows kernel), 0.6% (SpecEE) on
        the H200 (session 20). The tree stays lossless whatever the draft proposes, and an int8 head accepted 2.44
        tokens per verify step on SmolLM2 against 2.46 (session 22). The exit decisions fed by an int8 draft's
        candidates were as good as the float draft's on SmolLM2 (session 27, `eval --configs paper,paper_q8,
        lossless,lossless_q8 --every-exit-point`: 27.32 / 27.44 layers, the same first divergence from dense, 6.82 /
        6.86 lossless rollbacks per 100 tokens on MT-Bench). Not for fp32 drafts (their int8 rows, widened to fp32,
        were never timed on a GPU) or the CPU (no int8 kernels: the rounded weights run as floats)."""
        import torch

        if self.draft_quant != "auto":
            return self.draft_quant
        sixteen = draft_dtype in (torch.float16, torch.bfloat16)
        return "int8" if device_type == "cuda" and sixteen else "none"

    @property
    def device_kind(self) -> str:
        """"cuda" or "cpu": the key of the per-device defaults."""
        return "cuda" if str(self.device).startswith("cuda") else "cpu"

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


# Settings fields: (kind, lower bound, lower inclusive, upper bound). Fields not listed are not
# checked here (their own checks live in __post_init__).
_FIELD_RULES: dict[str, tuple] = {
    "max_new_tokens": ("int", 1, True, None),
    "seed": ("int", None, True, None),
    "max_context": ("int", 1, True, None),
    "num_candidates": ("int", 1, True, None),
    "max_pending": ("int", 0, True, None),
    "min_exit_layer": ("int", 0, True, None),
    "tree_budget": ("int?", 1, True, None),
    "tree_depth": ("int?", 1, True, None),
    "tree_topk": ("int?", 1, True, None),
    "speculate": ("str",),
    "tree_program": ("str",),
    "tree_lookup": ("bool?",),
    "tree_guard": ("bool",),
    "tree_lookup_first": ("int?", 0, True, None),
    "online_window": ("int", 0, True, None),
    "offline_max_layers": ("int", 0, True, None),
    "temperature": ("float", 0.0, True, None),
    "top_p": ("float", 0.0, False, 1.0),
    "threshold": ("float?", 0.0, True, 1.0),
    "offline_coverage": ("float", 0.0, False, 1.0),
    "chat_template": ("bool",),
    "cuda_graphs": ("bool",),
    "specee": ("bool",),
    "use_schedule": ("bool",),
    "exit_cost_check": ("bool",),
    "device": ("device",),
    "dtype": ("str",),
    "draft_source": ("str?",),
    "draft_quant": ("str",),
    "draft_dtype": ("str",),
    "artifacts": ("path?",),
}


# the numeric bounds of Settings fields, (lower, lower inclusive, upper): the CLI checks its flags with them
FIELD_BOUNDS: dict[str, tuple] = {name: rule[1:] for name, rule in _FIELD_RULES.items() if len(rule) == 4}


def range_problem(v, lo, lo_incl: bool, hi) -> str | None:
    """What `v` must be ("in (0.0, 1.0]", ">= 1") when it lies outside the bounds, else None."""
    if (lo is not None and (v < lo if lo_incl else v <= lo)) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            return f"in {'[' if lo_incl else '('}{lo}, {hi}]"
        return f"{'>=' if lo_incl else '>'} {lo}"
    return None


def _check_fields(s: Settings) -> None:
    """Raise SpecEEError for a Settings field of the wrong type or out of range (e.g. max_new_tokens="8",
    top_p=5, temperature=-1); integral/real numbers of other types (numpy) are converted."""
    import math
    import numbers
    import os

    from .errors import SpecEEError

    for name, rule in _FIELD_RULES.items():
        if not hasattr(s, name):
            continue
        v, kind = getattr(s, name), rule[0]
        if kind.endswith("?"):
            if v is None:
                continue
            kind = kind[:-1]
        got = f"got {v!r} ({type(v).__name__})"
        if kind == "bool":
            if not isinstance(v, bool):
                raise SpecEEError(f"Settings.{name} must be True or False, {got}")
            continue
        if kind == "str":
            if not isinstance(v, str):
                raise SpecEEError(f"Settings.{name} must be a string, {got}")
            continue
        if kind == "device":  # a string, or a torch.device (kept as its string form)
            if type(v).__name__ == "device" and not isinstance(v, str):
                v = str(v)
                setattr(s, name, v)
            if not isinstance(v, str):
                raise SpecEEError(f"Settings.{name} must be a device string such as 'cpu' or 'cuda:0', {got}")
            continue
        if kind == "path":
            if not isinstance(v, (str, os.PathLike)):
                raise SpecEEError(f"Settings.{name} must be a directory path, {got}")
            setattr(s, name, os.fspath(v))
            continue
        lo, lo_incl, hi = rule[1], rule[2], rule[3]
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise SpecEEError(f"Settings.{name} must be an integer, {got}")
            v = int(v)
        else:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise SpecEEError(f"Settings.{name} must be a finite number, {got}")
            v = float(v)
        want = range_problem(v, lo, lo_incl, hi)
        if want:
            raise SpecEEError(f"{name} must be {want}, got {getattr(s, name)!r}")
        setattr(s, name, v)
    offsets = getattr(s, "online_offsets", ())
    try:
        ok = all(isinstance(o, numbers.Integral) and not isinstance(o, bool) for o in offsets)
    except TypeError:
        ok = False
    if not ok:
        raise SpecEEError(f"Settings.online_offsets must be a sequence of integers, got {offsets!r}")


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        from .errors import SpecEEError

        raise SpecEEError(f"dtype {name!r} is not one of float32, float16, bfloat16") from None


def check_device(device: str) -> None:
    """Fail with a clear message for a device this machine cannot use (before any weight moves)."""
    import torch

    from .errors import BackendUnavailable

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackendUnavailable(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {device!r} asked for, but this torch has no usable CUDA device "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )


__all__ = ["Settings", "check_device", "torch_dtype"]
