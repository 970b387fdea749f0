"""`torch.compile(..., backend="specee")`: SpecEE early exit under a model's own `generate()`.

    model.forward = torch.compile(model.forward, backend="specee",
                                  options={"artifacts": "exported/smollm2", "threshold": 0.6})
    out = model.generate(input_ids, max_new_tokens=64, do_sample=False)

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so "specee" appears in
`torch._dynamo.list_backends()` once the package is installed.

What happens: dynamo traces the Hugging Face forward into one FX graph and hands it here. This
backend does not run that graph. It reads from it what it needs and returns a function that, per
forward call, drives the SpecEE runtime instead:
  * the model: `options["model"]` if given, else the `*ForCausalLM` whose LM-head and embedding
    parameters are among the graph's inputs (dynamo passes parameters as graph inputs), found among
    live objects;
  * the architecture: `model_step.step_spec` accepts the config (Llama / Mistral / Qwen2 families,
    SmolLM2 included; others raise UnsupportedArchitecture) and `passes.tag_layers` must find one
    decoder-layer tag per configured layer in the graph;
  * which inputs are `input_ids` / `position_ids` (placeholder sources) and which output is the
    logits tensor ([1, q, vocab]).
A forward call whose rows start at position 0 is a prefill: the runtime's `Decoder.start()` runs it
densely and picks the first token. Every later single-row call is one `Decoder.step()`: layers run
until an exit point fires (Inductor-compiled segments, see backends/inductor.py). The runtime keeps
its own static KV cache keyed by position; the HF cache object is left alone: the graph's other
outputs (the HF cache's K/V tensors) are returned as uninitialised tensors of the shapes the graph
declares, so generate()'s bookkeeping (cache length, positions) stays consistent, at no compute.

The returned logits carry the runtime's decision: 0 at the chosen token, -inf elsewhere, in every
row (only the last row, the one generate() reads, is meaningful). Greedy decoding, any logits
processor that keeps the argmax, and even sampling then yield exactly the runtime's token; a
processor that forces another token is detected at the next call and raises.

Options (`torch.compile(..., options={...})`): `artifacts` (directory), any `Settings` field
(threshold, kv_policy, max_pending, use_schedule, max_context, cuda_graphs, specee, backend=eager|
inductor, ...), and `model`, `program`, `draft`, `scheduler` objects (tests and custom sources pass a
SpecEEProgram and candidate source directly). Without artifacts or a program, `specee: False` runs
the dense model on compiled segments. `mode="lossless"` is refused: its rollbacks would rewrite
tokens generate() has already appended (generate() has no rollback); use `api.build_decoder`.

Limits: batch 1, prompts fed in one prefill call (no chunked prefill or continuation of an earlier
cache), greedy semantics. `last_result(model)` returns the runtime's GenerationResult of the latest
generate() (exit layers, avg_layers, ...).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import weakref
from types import SimpleNamespace

import torch

from ..config import Settings
from ..errors import ArtifactError, SpecEEError, UnsupportedArchitecture

_OBJECT_OPTIONS = ("model", "program", "draft", "scheduler")
_INPUT_NAMES = re.compile(r"\['(input_ids|position_ids|cache_position|inputs_embeds)'\]$")
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {options key: runner}


def specee_backend(
    gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None, **kwargs
):
    """The dynamo backend (see module docstring)."""
    options = dict(options or {})
    sig = _GraphSignature(gm)
    if sig.ids is None and sig.logits is None:
        return gm.forward  # a fragment outside the model body (none in HF Llama forwards): run as traced
    if sig.ids is None or sig.logits is None:
        raise SpecEEError(
            "the traced forward is split by a graph break: one graph has "
            f"{'the logits but not input_ids' if sig.ids is None else 'input_ids but not the logits'}; "
            "the specee backend needs the whole forward in one graph (see TORCH_LOGS=graph_breaks)"
        )
    model = options.get("model") or _find_model(example_inputs)
    _check_architecture(gm, model)
    sig.check_logits(model.config.vocab_size)
    runner = _runner_for(model, options)

    def specee_forward(*args):
        return runner.forward(sig, args)

    return specee_forward


def last_result(model):
    """The runtime's GenerationResult of the latest generate() through the backend (or None)."""
    for runner in _RUNNERS.get(model, {}).values():
        if runner.dec is not None:
            return runner.dec.res
    return None


# ---------------------------------------------------------------- graph facts


class _GraphSignature:
    """Where input_ids / positions enter the dynamo graph, which output is the logits, and how to
    compute every output's shape from the actual inputs."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.ids = self.position_ids = self.cache_position = None
        for i, n in enumerate(self.placeholders):
            arg = n.meta.get("grapharg")
            m = _INPUT_NAMES.search(arg.source.name) if arg is not None and arg.source is not None else None
            if m and m.group(1) == "inputs_embeds":
                raise SpecEEError(
                    "generate() with inputs_embeds is not supported by the specee backend; pass input_ids"
                )
            if m:
                setattr(self, {"input_ids": "ids"}.get(m.group(1), m.group(1)), i)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        self.outputs = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a for a in flat]
        cands = [j for j, v in enumerate(self.outputs) if isinstance(v, torch.Tensor) and v.dim() == 3]
        self._cands = cands
        self.logits = cands[-1] if cands else None
        self._bind = self._bindings()

    def check_logits(self, vocab: int) -> None:
        cands = [j for j in self._cands if _static(self.outputs[j].shape[-1]) == vocab]
        if len(cands) != 1:
            raise SpecEEError(
                f"expected exactly one [batch, rows, {vocab}] logits output in the traced forward, "
                f"found {len(cands)}"
            )
        self.logits = cands[0]

    def _bindings(self) -> dict:
        """symbol -> (placeholder index, dim or None) from which its value is read at run time."""
        import sympy

        bind = {}
        for i, n in enumerate(self.placeholders):
            v = n.meta.get("example_value")
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                bind.setdefault(v.node.expr, (i, None))
            elif isinstance(v, torch.Tensor):
                for d, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                        bind.setdefault(size.node.expr, (i, d))
        return bind

    def shape(self, sizes, args) -> list[int]:
        out = []
        for size in sizes:
            if not isinstance(size, torch.SymInt):
                out.append(int(size))
                continue
            expr = size.node.expr
            subs = {}
            for sym in expr.free_symbols:
                if sym not in self._bind:
                    raise SpecEEError(f"cannot size a graph output: symbol {sym} is bound to no input")
                i, d = self._bind[sym]
                subs[sym] = int(args[i]) if d is None else args[i].shape[d]
            out.append(int(expr.xreplace(subs)))
        return out


def _static(size):
    return int(size) if not isinstance(size, torch.SymInt) else None


def _find_model(example_inputs):
    """The HF model whose LM-head and input-embedding weights are inputs of the traced graph."""
    inputs = {id(t) for t in example_inputs if isinstance(t, torch.Tensor)}
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): gc also lists weak proxies, and isinstance() on a dead one raises
        if not issubclass(type(obj), torch.nn.Module) or not hasattr(obj, "get_output_embeddings"):
            continue
        try:
            head, emb = obj.get_output_embeddings(), obj.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            continue
        if head is not None and emb is not None and id(head.weight) in inputs and id(emb.weight) in inputs:
            found.append(obj)
    if len(found) != 1:
        raise SpecEEError(
            f"the specee backend could not tell which model the traced forward belongs to ({len(found)} candidates "
            "among live objects); pass it explicitly: torch.compile(model.forward, backend='specee', "
            "options={'model': model, ...})"
        )
    return found[0]


def _check_architecture(gm, model) -> None:
    from ..model_step import step_spec
    from ..passes.tag_layers import tag_layers

    step_spec(model.config, 1)  # raises UnsupportedArchitecture for non-Llama families
    layers = tag_layers(gm).counts["layers"]
    want = model.config.num_hidden_layers
    if layers != want:
        raise UnsupportedArchitecture(
            f"the traced forward of {type(model).__name__} has {layers} tagged decoder layers (module paths "
            f"`...layers.<i>`), its config says {want}; the specee backend supports Llama-family *ForCausalLM models"
        )


# ---------------------------------------------------------------- the runtime behind the graph


def _settings(model, options: dict) -> Settings:
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(options) - fields - set(_OBJECT_OPTIONS))
    if unknown:
        raise SpecEEError(
            f"unknown specee backend option(s) {unknown}; expected Settings fields "
            f"({', '.join(sorted(fields))}) or {', '.join(_OBJECT_OPTIONS)}"
        )
    values = {k: v for k, v in options.items() if k in fields}
    p = next(model.parameters())
    values.setdefault("device", str(p.device))
    values.setdefault("dtype", str(p.dtype).replace("torch.", ""))
    values.setdefault("backend", "inductor")
    values.setdefault("specee", True)
    if values["backend"] not in ("eager", "inductor"):
        raise SpecEEError(
            f"backend={values['backend']!r}: the specee torch.compile backend runs eager or inductor "
            "segments; onnx/tensorrt run from an exported artifact directory"
        )
    settings = Settings(**values)
    if settings.specee and settings.mode == "lossless":
        raise SpecEEError(
            "mode='lossless' cannot run under generate(): it rolls back tokens after verifying them, and "
            "generate() has already appended them (it has no rollback). Use mode='approximate' here, or "
            "specee_compile.api.build_decoder(...).generate() / the CLI for lossless decoding"
        )
    return settings


def _runner_for(model, options: dict) -> _Runner:
    key = tuple(
        sorted((k, id(v) if k in _OBJECT_OPTIONS or not _hashable(v) else v) for k, v in options.items())
    )
    per_model = _RUNNERS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _Runner(model, options)
    return per_model[key]


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


class _Runner:
    """Segments (built on the first call, not inside dynamo's compile) + one Decoder per generate()."""

    def __init__(self, model, options: dict):
        self.model = model
        self.options = options
        self.settings = _settings(model, options)
        self.seg = None
        self.dec = None

    def _build(self):
        from . import make_segments

        s = self.settings
        self.program = self.draft = self.scheduler = None
        if s.specee:
            self.program, self.draft, self.scheduler = _load_program(self.model, s, self.options)
        self.seg = make_segments(self.model, s, self.program)

    def forward(self, sig: _GraphSignature, args):
        from ..runtime.decoder import Decoder

        if self.seg is None:
            self._build()
        ids = args[sig.ids]  # [b, q]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise SpecEEError(
                f"the specee backend decodes batch 1; got input_ids of shape {tuple(ids.shape)}"
            )
        q = ids.shape[1]
        start = self._position(sig, args)
        if start == 0:
            prompt = [int(t) for t in ids[0].tolist()]
            s = self.settings.replace(max_new_tokens=max(1, self.seg.max_len - len(prompt)))
            self.dec = Decoder(self.seg, s, program=self.program, draft=self.draft, scheduler=self.scheduler)
            token = self.dec.start(prompt)
        else:
            token = self._decode(int(ids[0, -1]), start, q)
        return self._outputs(sig, args, token)

    def _position(self, sig, args) -> int:
        for idx in (sig.position_ids, sig.cache_position):
            if idx is not None:
                return int(args[idx].reshape(-1)[0])
        return 0 if self.dec is None or args[sig.ids].shape[1] > 1 else len(self.dec.seq) - 1

    def _decode(self, token: int, pos: int, q: int) -> int:
        dec = self.dec
        if q != 1 or dec is None:
            raise SpecEEError(
                "the specee backend runs one prefill (from position 0) then one token per call; "
                f"got {q} rows at position {pos}: chunked prefill and continuing an earlier "
                "cache are not supported"
            )
        if pos != len(dec.seq) - 1 or token != dec.seq[-1]:
            raise SpecEEError(
                f"generate() fed token {token} at position {pos}, but the SpecEE runtime emitted "
                f"{dec.seq[-1]} at position {len(dec.seq) - 1}: a logits processor changed the token, or the "
                "cache was reused across generate() calls; decode greedily without token-forcing processors"
            )
        n = len(dec.seq)
        dec.step()
        if len(dec.seq) != n + 1:
            raise SpecEEError(
                f"the SpecEE runtime's context of {self.seg.max_len} tokens is full; "
                "raise options['max_context']"
            )
        return dec.seq[-1]

    def _outputs(self, sig: _GraphSignature, args, token: int):
        device = self.seg.device
        outs = []
        for j, v in enumerate(sig.outputs):
            if isinstance(v, torch.Tensor):
                shape = sig.shape(v.shape, args)
                if j == sig.logits:
                    t = torch.full(shape, float("-inf"), dtype=v.dtype, device=device)
                    t[..., token] = 0.0
                else:
                    t = torch.empty(shape, dtype=v.dtype, device=v.device)
                outs.append(t)
            elif isinstance(v, torch.SymInt):
                outs.append(sig.shape([v], args)[0])
            else:
                outs.append(v)
        return tuple(outs)


def _load_program(model, settings: Settings, options: dict):
    """(program, draft, scheduler): from options objects, an artifact directory, or shipped artifacts."""
    if options.get("program") is not None:
        if options.get("draft") is None:
            raise SpecEEError("options['program'] needs options['draft'] (a candidate source) as well")
        return options["program"], options["draft"], options.get("scheduler")
    from ..api import default_artifacts_dir, load_program
    from ..models import model_fingerprint

    loaded = SimpleNamespace(
        model=model,
        config=model.config,
        tokenizer=None,
        name=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        fingerprint=model_fingerprint(model),
    )
    directory = settings.artifacts or default_artifacts_dir(loaded)
    if directory is None:
        raise ArtifactError(
            "the specee backend needs SpecEE artifacts (predictors + draft): pass options={'artifacts': DIR} "
            "(from `specee-compile train MODEL -o DIR`), or options={'specee': False} for dense compiled decoding"
        )
    program, draft, scheduler, _ = load_program(directory, loaded, settings)
    return program, draft, scheduler
