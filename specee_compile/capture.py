"""Capture: trace the decode step into one FX graph with torch.export, then segment it.

    capture_and_segment(model, settings, dump_dir=None) -> SegmentedProgram   (the CLI's entry point)

What is traced is `model_step` (the single definition of the math), not the Hugging Face module:
`DecodeStepModule` wraps it with submodules `embed`, `layers.{i}` and `head` whose buffers *alias*
the fused weights of `extract_weights` (no copies), so `nn_module_stack` metadata says which decoder
layer every node belongs to; `passes.tag_layers` turns that into `meta["specee_layer"]`.

Graph inputs (one decode step, batch 1; q = query rows, S = attended cache prefix, T = max context):
    ids        [q] int64      token ids of the rows
    pos        [q] int64      their positions
    keys       [S]            any tensor of length S; only its length is read (the S bucket)
    valid_i    [T] bool       layer i's validity row     } one placeholder per layer, so each
    k_cache_i  [Hkv, T, hd]   layer i's K cache           } layer segment owns its own cache and
    v_cache_i  [Hkv, T, hd]   layer i's V cache           } validity row
Outputs: hn [1, q, D] (final-normed hidden), logits [1, q, V].

The K/V caches and validity rows are *mutated in place* (export's training IR keeps `index_copy_` /
`index_fill_` on the placeholders, with `user_inputs_to_mutate` in the signature), exactly as the
eager layer function does: no functional cache outputs, no copy of the cache per step. (With the CUDA
path's fused ops the writes are one mutating custom op, `specee::rope_append`, which export keeps the
same way.)

The example has q = 2 rows (a 1-row example would specialise q to 1; backfill needs 1 + pending
rows) and S < T; q and S are exported symbolic, so one graph serves every step. q is a named `Dim`
in [1, T]; S is `Dim.DYNAMIC`, because tracing SDPA emits guards on S that export cannot prove from
a declared range (`S != T` on CPU, stride facts like `min(16 S, 32 S) != 64 S` on CUDA) and would
refuse; the graph holds no assertion and runs for every S, S = T included (the compiled backends
re-trace and guard on their own).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Settings, torch_dtype
from .model_step import ModelWeights, StepSpec, extract_weights, make_head_fn, make_layer_fn

LAYER_WEIGHTS = ("ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd")

# Canonical placeholder order of the segments; a role missing from a segment is simply skipped.
# Every layer segment has the same signature, so one compiled segment serves all layers.
INPUT_ROLES = (
    "h",
    "ids",
    "pos",
    "keys",
    "valid",
    "k_cache",
    "v_cache",
    "cos",
    "sin",
    "embed_weight",
    *LAYER_WEIGHTS,
    "norm_weight",
    "head_weight",
)
PER_LAYER_ROLES = frozenset({"valid", "k_cache", "v_cache", *LAYER_WEIGHTS})


# ---------------------------------------------------------------- the traced module


class EmbedSegment(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)  # [V, D], aliased

    def forward(self, ids):  # ids [q] -> h [1, q, D]
        return self.weight[ids][None]


class LayerSegment(nn.Module):
    def __init__(self, spec: StepSpec, w, native_gqa: bool = True, fused: tuple[str, ...] = ()):
        super().__init__()
        self.fn = make_layer_fn(spec, native_gqa=native_gqa, fused=fused)
        for name, t in zip(LAYER_WEIGHTS, w.as_tuple()):
            if t is not None:
                self.register_buffer(name, t, persistent=False)  # aliased, not copied
            else:
                setattr(self, name, None)

    def forward(self, h, pos, keys, valid, cos, sin, k_cache, v_cache):
        S = keys.shape[0]  # symbolic under export: the attended length travels as a tensor length
        return self.fn(
            h,
            pos,
            valid,
            cos,
            sin,
            k_cache,
            v_cache,
            S,
            self.ln1,
            self.wqkv,
            self.bqkv,
            self.wo,
            self.ln2,
            self.wgu,
            self.wd,
        )


class HeadSegment(nn.Module):
    def __init__(self, spec: StepSpec, norm: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.fn = make_head_fn(spec)
        self.register_buffer("norm", norm, persistent=False)  # [D]
        self.register_buffer("weight", weight, persistent=False)  # [V, D]

    def forward(self, h):  # -> (hn [1, q, D], logits [1, q, V])
        return self.fn(h, self.norm, self.weight)


class DecodeStepModule(nn.Module):
    """One decode step of the whole model over per-layer static caches (see module docstring)."""

    def __init__(
        self,
        weights: ModelWeights,
        native_gqa: bool = True,
        num_layers: int | None = None,
        fused: tuple[str, ...] = (),
    ):
        super().__init__()
        spec = weights.spec
        self.spec = spec
        self.embed = EmbedSegment(weights.embed)
        layers = weights.layers[:num_layers] if num_layers is not None else weights.layers
        self.layers = nn.ModuleList([LayerSegment(spec, w, native_gqa, fused) for w in layers])
        self.head = HeadSegment(spec, weights.norm, weights.head)
        self.register_buffer("cos", weights.cos, persistent=False)  # [T, hd], shared by every layer
        self.register_buffer("sin", weights.sin, persistent=False)

    def forward(self, ids, pos, keys, valid: list, k_cache: list, v_cache: list):
        h = self.embed(ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, pos, keys, valid[i], self.cos, self.sin, k_cache[i], v_cache[i])
        return self.head(h)


# ---------------------------------------------------------------- capture


@dataclass
class Captured:
    """What capture returns: the flat graph plus what is needed to run and segment it."""

    gm: torch.fx.GraphModule  # lifted: every weight is a placeholder with meta["specee_role"]
    spec: StepSpec
    weights: ModelWeights
    example_inputs: tuple  # (ids, pos, keys, valid list, k list, v list) as exported
    export_s: float


def _role_of_buffer(target: str) -> tuple[str, int | None]:
    parts = target.split(".")
    if parts[0] == "layers":
        return parts[2], int(parts[1])
    return {
        "embed.weight": ("embed_weight", None),
        "head.norm": ("norm_weight", None),
        "head.weight": ("head_weight", None),
        "cos": ("cos", None),
        "sin": ("sin", None),
    }[target]


def example_inputs(spec: StepSpec, dtype: torch.dtype, device, q: int = 2, S: int | None = None):
    """Inputs for one step of q rows (positions S-q .. S-1) over fresh per-layer caches."""
    T = spec.max_len
    S = S or min(64, T - 1)
    L, Hkv, hd = spec.num_layers, spec.num_kv_heads, spec.head_dim
    ids = torch.zeros(q, dtype=torch.long, device=device)
    pos = torch.arange(S - q, S, device=device)
    keys = torch.arange(S, device=device)
    valid = [torch.zeros(T, dtype=torch.bool, device=device) for _ in range(L)]
    k = [torch.zeros(Hkv, T, hd, dtype=dtype, device=device) for _ in range(L)]
    v = [torch.zeros(Hkv, T, hd, dtype=dtype, device=device) for _ in range(L)]
    return ids, pos, keys, valid, k, v


def capture_weights(
    weights: ModelWeights,
    native_gqa: bool = True,
    num_layers: int | None = None,
    fused: tuple[str, ...] = (),
) -> Captured:
    """torch.export the decode step of already-extracted weights (see module docstring).

    num_layers: capture only the first n layers (the graph is then that truncated model; every layer
    segment has the same code, so backends that compile one layer segment need not trace all L).
    fused: layer matmuls traced as `specee::fused_linear` ops (`model_step.make_layer_parts`)."""
    import dataclasses

    spec = weights.spec
    if spec.max_len < 4:
        from .errors import SpecEEError

        raise SpecEEError(f"capture needs a context of at least 4 positions, got max_len={spec.max_len}")
    if num_layers is not None:
        spec = dataclasses.replace(spec, num_layers=min(num_layers, spec.num_layers))
    mod = DecodeStepModule(weights, native_gqa=native_gqa, num_layers=spec.num_layers, fused=fused).eval()
    dtype, device = weights.embed.dtype, weights.embed.device
    args = example_inputs(spec, dtype, device)
    L, T = spec.num_layers, spec.max_len
    q = torch.export.Dim("q", min=1, max=T)
    S = torch.export.Dim.DYNAMIC
    dynamic = ({0: q}, {0: q}, {0: S}, [None] * L, [None] * L, [None] * L)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(mod, args, dynamic_shapes=dynamic)
    export_s = time.perf_counter() - t0
    gm = ep.graph_module
    _annotate_inputs(gm, ep, L)
    gm.meta["specee_step_spec"] = spec
    return Captured(gm=gm, spec=spec, weights=weights, example_inputs=args, export_s=export_s)


def _annotate_inputs(gm: torch.fx.GraphModule, ep, L: int) -> None:
    """meta["specee_role"] (+ meta["specee_input_layer"] for per-layer inputs) on every placeholder."""
    from torch.export.graph_signature import InputKind

    user_roles = ["ids", "pos", "keys"] + ["valid"] * L + ["k_cache"] * L + ["v_cache"] * L
    user_layers = [None, None, None] + list(range(L)) * 3
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    u = 0
    for spec in ep.graph_signature.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind == InputKind.USER_INPUT:
            role, layer = user_roles[u], user_layers[u]
            u += 1
        elif spec.kind in (InputKind.BUFFER, InputKind.PARAMETER, InputKind.CONSTANT_TENSOR):
            role, layer = _role_of_buffer(spec.target)
        else:  # pragma: no cover - nothing else is lifted from DecodeStepModule
            raise RuntimeError(f"unexpected export input {spec.kind} {spec.target}")
        node.meta["specee_role"] = role
        if layer is not None:
            node.meta["specee_input_layer"] = layer


# ---------------------------------------------------------------- the segmented program


@dataclass
class SegmentedProgram:
    """The passes' result: the whole step as one graph of segment calls, plus the segments.

    `graph` calls `embed`, `layer_0` .. `layer_{L-1}`, `head` (call_module) and, after every layer
    but the last, `torch.ops.specee.exit_score`; its outputs are (hn, logits, then score, z, p per
    exit point). The segments are the same GraphModules, taken out for backends to compile:
        embed(ids, embed_weight) -> h
        layers[i](h, pos, keys, valid, k_cache, v_cache, cos, sin, ln1, wqkv, [bqkv], wo, ln2, wgu, wd) -> h
        head(h, norm_weight, head_weight) -> (hn, logits)
        exit_point(h, norm_weight, rows, p_prev, w1, b1, w2, b2) -> (score, z, p)   (one for all layers)
    Every layer segment has the same structure and signature (`layer_inputs`), so a backend can
    compile one and call it with each layer's weights and cache.
    """

    spec: StepSpec
    graph: torch.fx.GraphModule
    embed: torch.fx.GraphModule
    layers: list[torch.fx.GraphModule]
    head: torch.fx.GraphModule
    exits: dict[int, torch.fx.GraphModule]  # exit point after layer i
    exit_point: torch.fx.GraphModule | None  # the shared exit-point module (None if no exits)
    layer_inputs: list[str]  # role of each layer-segment placeholder, in order
    pass_counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # export_s, passes_s

    def layer_args(self, weights: ModelWeights, i: int, h, pos, keys, valid, k_cache, v_cache) -> tuple:
        """Arguments of layer segment i in `layer_inputs` order."""
        w = weights.layers[i]
        bound = {
            "h": h,
            "pos": pos,
            "keys": keys,
            "valid": valid,
            "k_cache": k_cache,
            "v_cache": v_cache,
            "cos": weights.cos,
            "sin": weights.sin,
        }
        bound.update(zip(LAYER_WEIGHTS, w.as_tuple()))
        return tuple(bound[r] for r in self.layer_inputs)

    def summary(self) -> dict:
        return {
            "layers": len(self.layers),
            "exit_points": sorted(self.exits),
            "layer_inputs": list(self.layer_inputs),
            "layer_ops": len([n for n in self.layers[0].graph.nodes if n.op == "call_function"])
            if self.layers
            else 0,
            "pass_counts": self.pass_counts,
            "timings": self.timings,
        }


def segment_weights(
    weights: ModelWeights,
    settings: Settings | None = None,
    dump_dir=None,
    native_gqa: bool = True,
    num_layers: int | None = None,
    fused: tuple[str, ...] = (),
) -> SegmentedProgram:
    """Capture + passes for weights already extracted (backends use this to avoid a second extract).
    num_layers, fused: see `capture_weights`."""
    from .passes import run_passes
    from .passes.segment_layers import segments_of

    settings = settings or Settings()
    cap = capture_weights(weights, native_gqa=native_gqa, num_layers=num_layers, fused=fused)
    t0 = time.perf_counter()
    gm, counts = run_passes(cap.gm, settings, dump_dir=dump_dir)
    passes_s = time.perf_counter() - t0
    segs = segments_of(gm)
    from .passes.insert_exit_predictors import exit_point_module, exit_points_of

    exits = exit_points_of(gm)
    exit_point = exit_point_module(gm) if exits else None
    layer_inputs = list(segs.layers[0].meta["specee_inputs"]) if segs.layers else []
    return SegmentedProgram(
        spec=cap.spec,
        graph=gm,
        embed=segs.embed,
        layers=segs.layers,
        head=segs.head,
        exits={i: exit_point for i in exits},
        exit_point=exit_point,
        layer_inputs=layer_inputs,
        pass_counts=counts,
        timings={"export_s": cap.export_s, "passes_s": passes_s},
    )


def capture_and_segment(
    model, settings: Settings | None = None, dump_dir: str | Path | None = None, native_gqa: bool = True
) -> SegmentedProgram:
    """Trace `model`'s decode step and run the passes (the CLI's `--dump-graphs DIR` / `--dry-run`).

    `model` is a Hugging Face *ForCausalLM of the Llama family (or a LoadedModel); anything else
    raises UnsupportedArchitecture. The model is moved to settings.device/dtype and its q/k/v and
    gate/up weights are fused in place, as every backend does (`model_step.extract_weights`).
    With `dump_dir`, each pass writes its graph before and after as NN_<pass>_before/after.txt.
    """
    from .model_step import step_spec

    settings = settings or Settings()
    if not isinstance(model, torch.nn.Module):  # a LoadedModel
        model = model.model
    max_pos = getattr(model.config, "max_position_embeddings", settings.max_context)
    max_len = min(settings.max_context, max_pos)
    step_spec(model.config, max_len)  # UnsupportedArchitecture before any work
    model = model.to(device=settings.device, dtype=torch_dtype(settings.dtype))
    weights = extract_weights(model, max_len)
    return segment_weights(weights, settings, dump_dir=dump_dir, native_gqa=native_gqa)


__all__ = [
    "INPUT_ROLES",
    "Captured",
    "DecodeStepModule",
    "SegmentedProgram",
    "capture_and_segment",
    "capture_weights",
    "example_inputs",
    "segment_weights",
]
