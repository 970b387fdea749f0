"""`torch.compile(..., backend="specee")`: SpecEE early exit under a model's own `generate()`.

    model.forward = torch.compile(model.forward, backend="specee", options={"threshold": 0.6})
    out = model.generate(input_ids, max_new_tokens=64, do_sample=False)

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so "specee" appears in
`torch._dynamo.list_backends()` once the package is installed.

What happens: dynamo traces the Hugging Face forward into one FX graph and hands it here. This
backend does not run that graph. It reads from it what it needs and returns a function that, per
forward call, drives the SpecEE runtime (`runtime/decoder.py`, the same loop as `api.build_decoder`)
instead:
  * the model: `options["model"]` if given, else the `*ForCausalLM` whose LM-head and embedding
    parameters are among the graph's inputs (dynamo passes parameters as graph inputs): first among
    the models this backend already serves, else among live objects;
  * the architecture: `model_step.step_spec` accepts the config (Llama / Mistral / Qwen2 families,
    SmolLM2 included; others raise UnsupportedArchitecture) and `passes.tag_layers` must find one
    decoder-layer tag per configured layer in the graph;
  * which inputs are `input_ids` / `position_ids` (placeholder sources) and which output is the
    logits tensor ([1, q, vocab]).

One runner per (model, options), built once: segments (Inductor-compiled by default), the program
(predictors, thresholds), the candidate source and the scheduler live as long as the model, and one
Decoder per prompt length is reused across `generate()` calls. A dynamo recompile (generate()'s prefill
graph, its decode graph, the decode graph again once the cache length turns dynamic) calls this
backend again and gets the same runner, so after the first `generate()` nothing is rebuilt or
recompiled (tests/test_dynamo_backend.py checks dynamo's counters). Nothing is built inside dynamo's
compile either: the runner builds on its first forward call.

A forward call whose rows start at position 0 is a prefill: `Decoder.start()` runs it densely and picks
the first token. Every later single-row call asks for the token after the one generate() feeds: the
runner steps the Decoder until that token is *final* (the Decoder's `on_token` stream: in approximate
and dense mode every emitted token; in lossless mode only tokens that no rollback can change any
more). So lossless mode runs ahead of generate() by the exits that still await verification (at most
`max_pending`) and hands it only verified tokens: generate() never sees a token that is later
replaced, and its output equals dense greedy. The work of the run-ahead is counted in the result's
layer passes; at the end of a generate() up to `max_pending` steps run ahead unused.

The runtime keeps its own static KV cache keyed by position; the HF cache object is left alone: the
graph's other outputs (the HF cache's K/V tensors) are returned as uninitialised tensors of the shapes
the graph declares (computed from the inputs by expressions compiled once per graph), so generate()'s
bookkeeping (cache length, positions) stays consistent, at no compute. The returned logits carry the
runtime's decision: 0 at the chosen token, -inf elsewhere, in every row (only the last row, the one
generate() reads, is meaningful). Greedy decoding, any logits processor that keeps the argmax, and even
sampling then yield exactly the runtime's token; a processor that forces another token is detected at
the next call and raises.

Options (`torch.compile(..., options={...})`): `artifacts` (directory; default: the shipped artifacts of
the model, found by name or by model fingerprint, so a model loaded from a cache path finds them too),
any `Settings` field (threshold, mode=approximate|lossless, kv_policy (lossless defaults to backfill),
max_pending, use_schedule, max_context, max_new_tokens (a cap on the tokens of one generate(); default:
the context), cuda_graphs, specee, backend=eager|inductor, ...), and `model`, `program`, `draft`,
`scheduler` objects (tests and custom sources pass a SpecEEProgram and candidate source directly).
`specee: False` runs the dense model on compiled segments.

Errors: a problem with the options, the model or the artifacts is a `SpecEEError` with a one-line
message, raised from the `generate()` (forward) call itself, not wrapped in dynamo's
BackendCompilerFailed: the backend returns a function that raises it.

Limits: batch 1, prompts fed in one prefill call (no chunked prefill or continuation of an earlier
cache), greedy semantics. A generate() with a prompt of a new length may retrace once (dynamo then marks
the length dynamic). `last_result(model)` returns the runtime's GenerationResult of the latest
generate() (exit layers, avg_layers, ...), cut to the tokens handed to generate().
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import re
import time
import weakref
from types import SimpleNamespace

import torch

from ..config import Settings
from ..errors import ArtifactError, SpecEEError, UnsupportedArchitecture

_OBJECT_OPTIONS = ("model", "program", "draft", "scheduler")
_INPUT_NAMES = re.compile(r"\['(input_ids|position_ids|cache_position|inputs_embeds)'\]$")
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {options key: runner}
_FILL_CHUNK = 32768  # ATen's intra-op grain size: fills up to this many elements stay on the calling thread


def specee_backend(
    gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None, **kwargs
):
    """The dynamo backend (see module docstring)."""
    try:
        return _compile(gm, example_inputs, dict(options or {}))
    except SpecEEError as e:
        return _raiser(e)


def _compile(gm, example_inputs, options: dict):
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


def _raiser(err: SpecEEError):
    """A compiled function that raises `err` when called: the error reaches the caller of forward()
    (generate()) as itself, not inside dynamo's BackendCompilerFailed."""
    err.__cause__, err.__suppress_context__ = None, True

    def specee_error(*args):
        raise err.with_traceback(None)

    return specee_error


def last_result(model):
    """The runtime's GenerationResult of the latest generate() through the backend (or None)."""
    runners = [r for r in _RUNNERS.get(model, {}).values() if r.dec is not None]
    return max(runners, key=lambda r: r.last_used).result() if runners else None


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
        self._sizer = _Sizer(self.placeholders, self.outputs)

    def check_logits(self, vocab: int) -> None:
        cands = [j for j in self._cands if _static(self.outputs[j].shape[-1]) == vocab]
        if len(cands) != 1:
            raise SpecEEError(
                f"expected exactly one [batch, rows, {vocab}] logits output in the traced forward, "
                f"found {len(cands)}"
            )
        self.logits = cands[0]

    def shapes(self, args) -> list:
        """Per output: its shape (tensor outputs), its value (SymInt outputs), or None."""
        return self._sizer(args)


class _Sizer:
    """Output shapes as functions of the inputs: each symbolic size of the graph is bound to the input
    (placeholder value, or a dimension of a placeholder tensor) that carries it; the distinct size
    expressions are compiled once (sympy.lambdify) and evaluated per call."""

    def __init__(self, placeholders, outputs):
        import sympy

        bind = {}  # symbol -> (placeholder index, dim or None)
        for i, n in enumerate(placeholders):
            v = n.meta.get("example_value")
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                bind.setdefault(v.node.expr, (i, None))
            elif isinstance(v, torch.Tensor):
                for d, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                        bind.setdefault(size.node.expr, (i, d))
        exprs: list = []  # distinct symbolic sizes

        def ref(size):
            if not isinstance(size, torch.SymInt):
                return int(size)
            expr = size.node.expr
            missing = [s for s in expr.free_symbols if s not in bind]
            if missing:
                raise SpecEEError(f"cannot size a graph output: symbol {missing[0]} is bound to no input")
            if expr not in exprs:
                exprs.append(expr)
            return _Ref(exprs.index(expr))

        self.templates = []
        for v in outputs:
            if isinstance(v, torch.Tensor):
                self.templates.append(("tensor", [ref(s) for s in v.shape]))
            elif isinstance(v, torch.SymInt):
                self.templates.append(("int", [ref(v)]))
            else:
                self.templates.append(("other", None))
        symbols = sorted({s for e in exprs for s in e.free_symbols}, key=str)
        self.sources = [bind[s] for s in symbols]
        self.exprs = exprs
        self._subs = symbols
        self._eval = None
        if exprs:
            try:
                self._eval = sympy.lambdify(symbols, exprs, modules="math")
                self._eval(*[3] * len(symbols))  # fails now (not mid-generate) on functions lambdify lacks
            except Exception:  # noqa: BLE001 -- torch's own sympy functions (FloorDiv, ...): substitute instead
                self._eval = None

    def __call__(self, args) -> list:
        vals = [int(args[i]) if d is None else args[i].shape[d] for i, d in self.sources]
        if self._eval is not None:
            ev = [int(x) for x in self._eval(*vals)]
        else:
            subs = dict(zip(self._subs, vals))
            ev = [int(e.xreplace(subs)) for e in self.exprs]
        out = []
        for kind, dims in self.templates:
            if kind == "other":
                out.append(None)
                continue
            size = [ev[d.i] if isinstance(d, _Ref) else d for d in dims]
            out.append(size if kind == "tensor" else size[0])
        return out


@dataclasses.dataclass(frozen=True)
class _Ref:
    i: int  # index into _Sizer.exprs


def _static(size):
    return int(size) if not isinstance(size, torch.SymInt) else None


def _find_model(example_inputs):
    """The HF model whose LM-head and input-embedding weights are inputs of the traced graph."""
    inputs = {id(t) for t in example_inputs if isinstance(t, torch.Tensor)}

    def owns(obj) -> bool:
        try:
            head, emb = obj.get_output_embeddings(), obj.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return False
        return head is not None and emb is not None and id(head.weight) in inputs and id(emb.weight) in inputs

    known = [m for m in list(_RUNNERS.keys()) if owns(m)]  # a recompile of a model already served
    if len(known) == 1:
        return known[0]
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): gc also lists weak proxies, and isinstance() on a dead one raises
        if issubclass(type(obj), torch.nn.Module) and hasattr(obj, "get_output_embeddings") and owns(obj):
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
    if values.get("mode") == "lossless":
        values.setdefault("kv_policy", "backfill")  # lossless verifies exits by backfilling them
    if not _is_model_backend(values["backend"]):
        raise SpecEEError(
            f"backend={values['backend']!r}: the specee torch.compile backend runs the segments of a model "
            "backend (eager or inductor); onnx/tensorrt run from an exported artifact directory"
        )
    try:
        return Settings(**values)
    except (TypeError, ValueError) as e:
        raise SpecEEError(f"bad specee backend option: {e}") from None


def _is_model_backend(name) -> bool:
    try:
        from .registry import get_backend

        return get_backend(name).kind == "model"
    except ImportError:  # pragma: no cover -- before the backend registry
        return name in ("eager", "inductor")
    except SpecEEError:
        return False


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


_USES = iter(range(1 << 62))


class _Runner:
    """One model + options: segments, program, draft, scheduler (built on the first forward call, not
    inside dynamo's compile) and one Decoder per prompt length, all reused across generate() calls."""

    def __init__(self, model, options: dict):
        self.model = model
        self.options = options
        self.settings = _settings(model, options)
        self.cap = options.get("max_new_tokens")  # None: as many tokens as the context holds
        self.seg = None
        self.dec = None
        self.decoders: dict[int, object] = {}  # prompt length -> Decoder
        self.final: list[int] = []  # prompt + tokens no rollback can change (the Decoder's stream)
        self.handed = 0  # tokens of `final` generate() has been given (prompt included)
        self.decode_s = 0.0
        self.last_used = -1

    def _build(self):
        from . import make_segments

        s = self.settings
        self.program = self.draft = self.scheduler = None
        if s.specee or getattr(s, "speculate", "none") == "tree":
            self.program, self.draft, self.scheduler = _load_program(self.model, s, self.options)
        # Building the segments re-points q/k/v and gate/up parameters at views of fused weights, as new
        # Parameters with requires_grad=False. Dynamo guarded the graphs traced so far (generate()'s
        # prefill) on the old flags: keep them, or the next generate() retraces its prefill.
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.seg = make_segments(self.model, s, self.program)
        for name, p in self.model.named_parameters():
            if name in flags and p.requires_grad != flags[name]:
                p.requires_grad_(flags[name])

    def _decoder(self, prompt_len: int):
        from ..runtime.decoder import Decoder

        dec = self.decoders.get(prompt_len)
        if dec is None:
            room = self.seg.max_len - prompt_len
            if room < 1:
                raise SpecEEError(
                    f"the prompt ({prompt_len} tokens) fills the specee backend's context of {self.seg.max_len} "
                    "tokens; raise options['max_context']"
                )
            s = self.settings.replace(max_new_tokens=min(room, self.cap or room))
            dec = Decoder(self.seg, s, program=self.program, draft=self.draft, scheduler=self.scheduler)
            self.decoders[prompt_len] = dec
        return dec

    def forward(self, sig: _GraphSignature, args):
        if self.seg is None:
            self._build()
        self.last_used = next(_USES)
        ids = args[sig.ids]  # [b, q]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise SpecEEError(f"the specee backend decodes batch 1; got input_ids of shape {tuple(ids.shape)}")
        q = ids.shape[1]
        start = self._position(sig, args)
        if start == 0:
            token = self._start([int(t) for t in ids[0].tolist()])
        else:
            token = self._next(int(ids[0, -1]), start, q)
        return self._outputs(sig, args, token)

    def _position(self, sig, args) -> int:
        for idx in (sig.position_ids, sig.cache_position):
            if idx is not None:
                return int(args[idx].reshape(-1)[0])
        return 0 if self.dec is None or args[sig.ids].shape[1] > 1 else self.handed - 1

    def _start(self, prompt: list[int]) -> int:
        self.dec = self._decoder(len(prompt))
        self.final = list(prompt)
        self.decode_s = 0.0
        self.dec.start(prompt, on_token=self.final.append)
        self.handed = len(prompt) + 1
        return self.final[len(prompt)]

    def _next(self, token: int, pos: int, q: int) -> int:
        """The final token at pos + 1, after generate() fed `token` at `pos`."""
        dec, final = self.dec, self.final
        if q != 1 or dec is None:
            raise SpecEEError(
                "the specee backend runs one prefill (from position 0) then one token per call; "
                f"got {q} rows at position {pos}: chunked prefill and continuing an earlier "
                "cache are not supported"
            )
        if pos != self.handed - 1 or token != final[pos]:
            raise SpecEEError(
                f"generate() fed token {token} at position {pos}, but the SpecEE runtime emitted "
                f"{final[min(pos, self.handed - 1)]} at position {min(pos, self.handed - 1)}: a logits processor "
                "changed the token, or the cache was reused across generate() calls; decode greedily without "
                "token-forcing processors"
            )
        t0 = time.perf_counter()
        if not self._advance(pos + 1):
            raise SpecEEError(
                f"the specee backend's decoder is full ({len(final) - dec.res.prompt_len} new tokens "
                f"after a {dec.res.prompt_len}-token prompt, context {self.seg.max_len}); raise "
                "options['max_context']" + (" or options['max_new_tokens']" if self.cap else "")
            )
        self.decode_s += time.perf_counter() - t0
        self.handed = pos + 2
        return final[pos + 1]

    def _advance(self, upto: int) -> bool:
        """Step the Decoder until `final` holds index `upto`; False if it is full first."""
        dec, final = self.dec, self.final
        while len(final) <= upto:
            if dec.done():  # context (or max_new_tokens cap) reached; nothing awaits verification now
                final.extend(dec.seq[len(final) :])
                return len(final) > upto
            dec.step()
        return True

    def result(self):
        """The Decoder's result cut to the tokens generate() was given (lossless runs ahead)."""
        dec = self.dec
        res = copy.copy(dec.res)
        P = res.prompt_len
        res.token_ids = self.final[P : self.handed]
        res.exit_layers = list(dec.res.exit_layers[: self.handed - P])
        res.decode_s = self.decode_s
        return res

    def _outputs(self, sig: _GraphSignature, args, token: int):
        shapes = sig.shapes(args)
        outs = []
        for j, v in enumerate(sig.outputs):
            if isinstance(v, torch.Tensor):
                if j == sig.logits:
                    outs.append(_one_hot_logits(shapes[j], v.dtype, self.seg.device, token))
                else:
                    outs.append(torch.empty(shapes[j], dtype=v.dtype, device=v.device))
            elif isinstance(v, torch.SymInt):
                outs.append(shapes[j])
            else:
                outs.append(v)
        return tuple(outs)


def _one_hot_logits(shape, dtype, device, token: int) -> torch.Tensor:
    """[..., V] logits: 0 at `token`, -inf elsewhere. On the CPU filled in slices of at most ATen's grain
    size: one larger fill goes through the intra-op thread pool, whose wake-up costs a scheduler slice
    (~20 ms measured) on a busy CPU -- more than a whole decode step of SmolLM2."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.numel() > _FILL_CHUNK:
        for chunk in t.view(-1).split(_FILL_CHUNK):
            chunk.fill_(float("-inf"))
    else:
        t.fill_(float("-inf"))
    t[..., token] = 0.0
    return t


# ---------------------------------------------------------------- artifacts


def _load_program(model, settings: Settings, options: dict):
    """(program, draft, scheduler): from options objects, an artifact directory, or shipped artifacts."""
    if options.get("program") is not None:
        if options.get("draft") is None:
            raise SpecEEError("options['program'] needs options['draft'] (a candidate source) as well")
        return options["program"], options["draft"], options.get("scheduler")
    from .. import api
    from ..models import model_fingerprint

    loaded = SimpleNamespace(
        model=model,
        config=model.config,
        tokenizer=None,
        name=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        fingerprint=model_fingerprint(model),
    )
    directory = settings.artifacts or api.default_artifacts_dir(loaded)
    if directory is None:
        raise ArtifactError(
            f"the specee backend needs SpecEE artifacts (predictors + draft) for {loaded.name} "
            f"(fingerprint {loaded.fingerprint}), and none are shipped for it: pass options={{'artifacts': DIR}} "
            "(from `specee-compile train MODEL -o DIR`), or options={'specee': False} for dense compiled decoding"
        )
    program, draft, scheduler, _ = api.load_program(directory, loaded, settings)
    if getattr(settings, "speculate", "none") == "tree" and hasattr(api, "tree_draft"):
        draft = api.tree_draft(loaded, settings, directory, draft)
    return program, draft, scheduler
