"""Run an exported SpecEE artifact with ONNX Runtime, as a backend of the one decode loop.

`open_artifact(directory, settings)` (the registry's factory for "onnx" and "tensorrt") returns an
`ArtifactRun`: the `OnnxStep` backend plus what `runtime.decoder.Decoder` needs beside it (tokenizer,
program, candidate source, scheduler, EOS ids); `ArtifactRun.decoder()` builds the Decoder. There is
no decode loop here: the runtime's loop drives the step.

`OnnxStep` implements `runtime.contract.Backend` + `WholeStep` (not `Segments`: the exported graph is
one program per step, its control flow inside `decode_step.onnx`):

    prefill(ids)   -> prefill.onnx: logits [V] of the last row, hn [P, D]; K/V rows -> cache[:, :, :P]
    run_step(plan) -> decode_step.onnx(token, position, K[0..L-1], V[0..L-1], valid, candidates,
                                       active [L] bool, thresholds [L])
                      K[:e+1, :, p] = k_new[:e+1]; V likewise; valid = valid_out   (e = exit layer)
    can_run(plan)  -> dense plans, and the paper's exit policy (approximate: full head, verified in the
                      candidates, no rollback); KV policy skip (checked when the backend opens)

The cache length T grows in buckets of 64 positions (the graph's T axis is dynamic).

Backfill and lossless mode need a step with several query rows and a rollback; they run on the
eager / inductor backends (`SpecEEError` here says so, before anything runs). Sampling
(--temperature, dense): the step returns the head's logits (`StepPlan.want_logits`) and the loop
samples from them, as it does for every backend.

One copy of the weights: prefill.onnx and decode_step.onnx keep their weights in one external-data
file (weights.bin). `SharedWeights` maps it once (read-only `np.memmap`) and hands every session the
same buffers as ORT initializers (`SessionOptions.add_initializer`, no copy), so the process holds
the weights once, in the page cache, whatever the number of sessions. ORT's weight pre-packing and
constant folding (each makes a per-session rewritten copy of MatMul weights: a packed one, a
transposed one) are off for these sessions for the same reason. float16 graphs on the CPU provider
(no float16 MatMul there) are rewritten when the session opens (`cast_weights_at_use`): each weight
is cast to float32 right before its use into a reused buffer, so they too hold the float16 weights
once (exported/README.md, "dtype"). Graphs with If nodes run without ORT's memory pattern
(`make_session` says why: nested branch frames would each keep a float32 block).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Settings
from ..draft.base import CandidateSource, check_truncate, fill_unique
from ..errors import ArtifactError, BackendUnavailable, SpecEEError
from ..model_step import StepSpec
from ..program import SpecEEProgram
from ..runtime.contract import StepOut, StepPlan

_chdir_lock = threading.Lock()
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
# ONNX TensorProto element type -> numpy (the external-data tensors weights.bin holds)
_ONNX_NP = {1: np.float32, 10: np.float16, 7: np.int64, 9: np.bool_, 6: np.int32}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "the onnx backend needs onnxruntime; install it with `pip install 'specee-compile[onnx]'`"
        ) from None
    return onnxruntime


class SharedWeights:
    """weights.bin mapped once; `initializers(graph_path)` -> {name: OrtValue} views into the map.

    ORT uses an initializer given with `SessionOptions.add_initializer` in place of the model's own
    (it neither reads nor copies the external data for it), and an OrtValue made from a numpy array
    on the CPU wraps that array's memory. So every session of a process reads the same mapped pages."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self._maps: dict[str, np.memmap] = {}
        self._values: dict[tuple, object] = {}
        self._names: dict[str, dict] = {}  # graph path -> {initializer name: key} of its mapped initializers

    def _map(self, location: str) -> np.memmap:
        if location not in self._maps:
            p = self.dir / location
            if not p.is_file():
                raise ArtifactError(f"{p} not found; export the model again (`specee-compile export MODEL -o DIR`)")
            self._maps[location] = np.memmap(p, dtype=np.uint8, mode="r")
        return self._maps[location]

    def has_float16(self, graph_path) -> bool:
        """Whether the graph keeps any weight of weights.bin in float16."""
        return bool(self.float16_names(graph_path))

    def float16_names(self, graph_path) -> set[str]:
        return {name for name, k in self._names.get(str(graph_path), {}).items() if k[3] == 10}

    def initializers(self, graph_path) -> dict:
        import onnx

        ort = _ort()
        out = {}
        for t in onnx.load(str(graph_path), load_external_data=False).graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type not in _ONNX_NP:
                continue
            ext = {e.key: e.value for e in t.external_data}
            key = (ext["location"], int(ext.get("offset", 0)), int(ext["length"]), t.data_type, tuple(t.dims))
            if key not in self._values:
                dt = np.dtype(_ONNX_NP[t.data_type])
                n = int(np.prod(t.dims)) if len(t.dims) else 1
                if n * dt.itemsize != key[2]:
                    raise ArtifactError(f"{graph_path}: initializer {t.name} has {key[2]} bytes for shape "
                                        f"{list(t.dims)}; re-export the model")
                arr = np.frombuffer(self._map(key[0]), dtype=dt, count=n, offset=key[1]).reshape(tuple(t.dims))
                self._values[key] = (arr, ort.OrtValue.ortvalue_from_numpy(arr))  # keep arr alive
            out[t.name] = self._values[key][1]
            self._names.setdefault(str(graph_path), {})[t.name] = key
        return out


def cast_weights_at_use(graph_path, names: set[str]) -> bytes:
    """The graph at `graph_path` (read without its external data), rewritten for ONNX Runtime's CPU
    provider when its weights are float16; returns the serialized model.

    That provider has no float16 MatMul: it inserts a Cast (float16 -> float32) in front of each
    `MatMul(x, Transpose(W))` that `F.linear` exports to. Those Casts and Transposes read only
    initializers, so ORT schedules all of them at the start of the step: every weight then lives
    three times at once (the float16 map, a transposed float16 copy, its float32 cast): 6x the
    float16 size at the step's peak. And at ORT_ENABLE_ALL its FuseInitializersTransformer folds each
    such Cast into a float32 initializer: a per-session float32 copy of every weight.

    Here each `MatMul(x, Transpose(W))` with W one of `names` (2-D float16) becomes
        FusedMatMul(Cast(x, float32), Cast(Reshape(W, [-1, D(x)]), float32), transB=1) -> Cast(float16)
    where D(x) is x's last dimension, read from x at run time (Shape -> Slice): a no-op Reshape that
    gives the weight's Cast a data dependency on x, so ORT casts each weight right before its use,
    into an arena buffer the next weight reuses. Peak memory: the float16 weights once (the shared
    map) + about the largest float32 weight. Compute runs in float32, as it did before."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(graph_path), load_external_data=False)
    counter = [0]

    def fresh(hint):
        counter[0] += 1
        return f"castuse_{counter[0]}_{hint}"

    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    axis_m1 = helper.make_tensor(fresh("m1"), TensorProto.INT64, [1], [-1])
    big = helper.make_tensor(fresh("big"), TensorProto.INT64, [1], [2**62])
    zero_c = helper.make_tensor(fresh("zero"), TensorProto.INT64, [1], [0])
    model.graph.initializer.extend([axis_m1, big, zero_c])
    d_consts: dict[int, str] = {}

    def helper_d(value: int) -> str:
        if value not in d_consts:
            t = helper.make_tensor(fresh(f"d{value}"), TensorProto.INT64, [1], [value])
            model.graph.initializer.append(t)
            d_consts[value] = t.name
        return d_consts[value]

    def rewrite(graph) -> None:
        producer = {o: n for n in graph.node for o in n.output}
        uses: dict[str, int] = {}
        for n in graph.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        new_nodes, dropped = [], set()
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    rewrite(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        rewrite(g)
            if n.op_type in ("Gather", "GatherND") and n.input[0] in names and len(dims.get(n.input[0], ())) == 2:
                # ORT moves the float32 Cast of gathered rows in front of the gather: a float32 copy of
                # the whole table, scheduled at the step's start. Tie the table to the indices instead.
                w, idx = n.input[0], n.input[1]
                shape, zero, d, shp, wr = (fresh(h) for h in ("shape", "zero", "d", "shp", "wr"))
                new_nodes += [
                    helper.make_node("Shape", [idx], [shape], name=fresh("Shape"), start=0, end=1),
                    helper.make_node("Mul", [shape, zero_c.name], [zero], name=fresh("Mul")),
                    helper.make_node("Add", [zero, helper_d(dims[w][1])], [d], name=fresh("Add")),
                    helper.make_node("Concat", [axis_m1.name, d], [shp], axis=0, name=fresh("Concat")),
                    helper.make_node("Reshape", [w, shp], [wr], name=fresh("Reshape")),
                ]
                n.input[0] = wr
                new_nodes.append(n)
                continue
            t = producer.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None) if t is not None else None
            if t is None or t.op_type != "Transpose" or t.input[0] not in names or perm != [1, 0] \
                    or len(dims.get(t.input[0], ())) != 2:
                new_nodes.append(n)
                continue
            w, x = t.input[0], n.input[0]
            shape, d, shp, wr, wf, xf, yf = (fresh(h) for h in ("shape", "d", "shp", "wr", "wf", "xf", "yf"))
            new_nodes += [
                helper.make_node("Shape", [x], [shape], name=fresh("Shape")),
                helper.make_node("Slice", [shape, axis_m1.name, big.name], [d], name=fresh("Slice")),
                helper.make_node("Concat", [axis_m1.name, d], [shp], axis=0, name=fresh("Concat")),
                helper.make_node("Reshape", [w, shp], [wr], name=fresh("Reshape")),
                helper.make_node("Cast", [wr], [wf], to=TensorProto.FLOAT, name=fresh("Cast")),
                helper.make_node("Cast", [x], [xf], to=TensorProto.FLOAT, name=fresh("Cast")),
                helper.make_node("FusedMatMul", [xf, wf], [yf], domain="com.microsoft", transB=1,
                                 name=fresh("FusedMatMul")),
                helper.make_node("Cast", [yf], [n.output[0]], to=TensorProto.FLOAT16, name=fresh("Cast")),
            ]
            uses[t.output[0]] -= 1
            if uses[t.output[0]] == 0:
                dropped.add(id(t))
        del graph.node[:]
        graph.node.extend(x for x in new_nodes if id(x) not in dropped)

    rewrite(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def _cpu_only(providers) -> bool:
    return all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in (providers or ["CPUExecutionProvider"]))


def has_subgraphs(path) -> bool:
    """Whether the graph at `path` (read without its external data) holds control flow (If, Loop, Scan)."""
    import onnx

    graph_attr = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graph_attr for n in onnx.load(str(path), load_external_data=False).graph.node
               for a in n.attribute)


def make_session(path, providers=None, threads: int | None = None, profile_prefix: str | None = None,
                 weights: SharedWeights | None = None):
    """An ORT InferenceSession with full graph optimizations (CPU provider unless told otherwise).
    weights: the directory's `SharedWeights`; the session then reads the shared mapped weights instead
    of loading its own copy (and does not pre-pack them).

    Graphs with If nodes run without ORT's memory pattern. From the second run on, that pattern gives
    every (sub)graph's execution frame one block sized for all the frame's planned tensors; a nested
    If's branch frame lives while the branches inside it run, so with the exits' nesting (layer e+1 in
    the else-branch of exit e) each deeper layer's block (its float32 weight casts) stayed allocated at
    once: the float32 size of about one weight per nested layer on top of the model (1.1B float16, 18 If
    nodes: peak RSS 3.79 GB from the second step on, 2.98 GB without the pattern, 2.96 GB dense). Without
    it the tensors come from the arena one by one and a deeper frame reuses what the outer one freed."""
    ort = _ort()
    if not Path(path).is_file():
        raise ArtifactError(f"{path} not found; export the model first (`specee-compile export MODEL -o DIR`)")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no busy-waiting between runs: the loop does Python/torch work (draft, scheduler) in between
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if has_subgraphs(path):
        so.enable_mem_pattern = False  # see above: nested If frames would each keep a block
    model = None
    if weights is not None:
        for name, value in weights.initializers(path).items():
            so.add_initializer(name, value)
        # a pre-packed MatMul weight is a second, per-session copy of that weight; so is every weight
        # constant folding rewrites (ORT folds Transpose(W) of each F.linear into a new initializer)
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        if _cpu_only(providers) and weights.has_float16(path):
            # float16 weights on the CPU provider (no float16 MatMul there): see `cast_weights_at_use`
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            model = cast_weights_at_use(path, weights.float16_names(path))
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = providers or ["CPUExecutionProvider"]
    if model is None:
        return ort.InferenceSession(str(path), so, providers=providers)
    # the rewritten graph loads from bytes, and ORT resolves (checks, not reads: every external
    # initializer is overridden above) its external data against the working directory. ORT's
    # in-memory external files (`add_external_initializers_from_files_in_memory`) would copy weights.bin.
    with _chdir_lock:
        cwd = os.getcwd()
        os.chdir(Path(path).parent)
        try:
            return ort.InferenceSession(model, so, providers=providers)
        finally:
            os.chdir(cwd)


def session_meta(sess) -> dict:
    raw = sess.get_modelmeta().custom_metadata_map
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def graph_meta(path) -> dict:
    """metadata_props of an exported graph (JSON values decoded), read without its weights."""
    import onnx

    if not Path(path).is_file():
        raise ArtifactError(f"{path} not found; export the model first (`specee-compile export MODEL -o DIR`)")
    out = {}
    for p in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


class OnnxEagleSource(CandidateSource):
    """The EAGLE draft run by `draft.onnx`, with the bookkeeping of `draft.eagle.EagleSource`
    (draft position t holds the pair (f_t, x_{t+1}); propose() runs every pair not yet cached and
    returns the top-k of the last one). The draft K/V cache lives here as numpy arrays."""

    def __init__(self, session, k: int | None = None):
        self.sess = session
        m = session_meta(session)
        cfg = m["draft_config"]
        self.k = int(k or m["num_candidates"])
        self.vocab_size = int(m["vocab"])
        self.first_ids = [int(t) for t in m["draft_first_ids"]]
        self.hidden = int(cfg["hidden_size"])
        self.n_layers, self.kvh, self.hd = int(cfg["num_layers"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])
        self.dtype = _NP_DTYPES[m["dtype"]]
        self.ids: list[int] = []
        self._alloc(64)

    def _alloc(self, cap: int) -> None:
        self._cap = cap
        self._feats = np.zeros((cap, self.hidden), self.dtype)
        self._k = np.zeros((self.n_layers, self.kvh, cap, self.hd), self.dtype)
        self._v = np.zeros_like(self._k)
        self._cache_len = 0
        self._proposal = None

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, 2 * self._cap)
        feats, k, v, n = self._feats, self._k, self._v, self._cache_len
        self._alloc(cap)
        self._feats[: feats.shape[0]] = feats
        self._k[:, :, : k.shape[2]] = k
        self._v[:, :, : v.shape[2]] = v
        self._cache_len = n

    def reset(self, prompt_ids, prompt_hidden) -> None:
        ids = [int(t) for t in prompt_ids]
        hid = np.asarray(prompt_hidden, dtype=self.dtype).reshape(-1, self.hidden)
        if hid.shape[0] != len(ids):
            raise ValueError(f"prompt_hidden has {hid.shape[0]} rows for {len(ids)} prompt tokens")
        self.ids = ids
        cap = 64
        while cap < len(ids) + 1:
            cap *= 2
        self._alloc(cap)
        self._feats[: len(ids)] = hid

    def propose(self) -> torch.Tensor:
        if self._proposal is not None:
            return self._proposal
        n = len(self.ids)
        if n < 2:
            self._proposal = torch.tensor(self.first_ids[: self.k], dtype=torch.long)
            return self._proposal
        c, end = self._cache_len, n - 1  # pairs t = c .. n-2
        cand, k_rows, v_rows = self.sess.run(None, {
            "feats": np.ascontiguousarray(self._feats[c:end]),
            "next_ids": np.asarray(self.ids[c + 1 : n], dtype=np.int64),
            "positions": np.arange(c, end, dtype=np.int64),
            "past_k": np.ascontiguousarray(self._k[:, :, :c]),
            "past_v": np.ascontiguousarray(self._v[:, :, :c]),
        })
        self._k[:, :, c:end] = k_rows
        self._v[:, :, c:end] = v_rows
        self._cache_len = end
        out = [int(t) for t in cand]
        if len(out) < self.k:  # tiny restricted vocabularies only
            fill_unique(out, set(out), range(self.vocab_size), self.k)
        self._proposal = torch.tensor(out, dtype=torch.long)
        return self._proposal

    def observe(self, token: int, hidden, layer: int) -> None:
        p = len(self.ids) - 1
        self._grow(p + 2)
        self._feats[p] = np.asarray(hidden, dtype=self.dtype).reshape(-1)
        self.ids.append(int(token))
        self._cache_len = min(self._cache_len, p)
        self._proposal = None

    def truncate(self, length: int) -> None:
        check_truncate(length, len(self.ids))
        del self.ids[length:]
        self._cache_len = min(self._cache_len, length - 1)
        self._proposal = None


class OnnxCache:
    """The static KV cache of the exported step, as numpy arrays the sessions read in place.

    k, v [L, Hkv, T, hd]; valid [L, T] bool (layer l holds K/V for position t: the KV contract of
    `model_step`). T grows in buckets of `bucket` positions up to max_len."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, bucket: int, dtype):
        self.L, self.Hkv, self.hd, self.max_len, self.bucket, self.dtype = (
            num_layers, num_kv_heads, head_dim, max_len, bucket, dtype)
        self.k = self.v = self.valid = None

    def reset(self) -> None:
        self.k = self.v = self.valid = None

    def truncate(self, length: int) -> None:
        """Forget every position >= length in every layer (rollback)."""
        if self.valid is not None:
            self.valid[:, length:] = False

    def ensure(self, pos: int) -> None:
        """Grow the cache so that position `pos` fits (bucketed, like the eager attended prefix)."""
        cap = min(self.max_len, (pos // self.bucket + 1) * self.bucket)
        if self.k is not None and self.k.shape[2] >= cap:
            return
        shape = (self.L, self.Hkv, cap, self.hd)
        k, v, valid = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype), np.zeros((self.L, cap), bool)
        if self.k is not None:
            n = self.k.shape[2]
            k[:, :, :n], v[:, :, :n], valid[:, :n] = self.k, self.v, self.valid
        self.k, self.v, self.valid = k, v, valid

    def feed(self) -> dict:
        """Layer l's cache k[l] [Hkv, T, hd] is a contiguous slice: ORT reads it in place (no copy)."""
        feed = {}
        for i in range(self.L):
            feed[f"k_cache_{i}"] = self.k[i]
            feed[f"v_cache_{i}"] = self.v[i]
        return feed


class OnnxStep:
    """`Backend` + `WholeStep` (runtime/contract.py) over an exported directory's ONNX Runtime sessions
    (prefill.onnx + decode_step.onnx, sharing one mapped copy of weights.bin). See the module docstring.

    settings: Settings; specee runs need mode=approximate, kv_policy=skip and greedy decoding (refused
        here otherwise, before anything runs). providers / threads: ORT execution providers and intra-op
    threads. Exit layers and the number of candidates are read from the graph."""

    name = "onnx"

    def __init__(self, directory, settings: Settings, providers=None, threads: int | None = None):
        s = settings
        if s.specee and (s.mode != "approximate" or s.kv_policy != "skip"):
            raise SpecEEError(
                f"the onnx backend runs the paper's configuration (mode=approximate, kv_policy=skip); "
                f"got mode={s.mode}, kv_policy={s.kv_policy}. Backfill and lossless mode run on the eager or "
                "inductor backends: pass --backend eager (or inductor)"
            )
        d = Path(directory)
        self.dir = d
        m = graph_meta(d / "decode_step.onnx")
        self.meta = m
        if m.get("dtype") not in _NP_DTYPES:
            raise SpecEEError(
                f"the onnx runner handles float32 and float16 artifacts (ONNX Runtime's CPU kernels lack "
                f"bfloat16); {d} was exported as {m.get('dtype')}: re-export with --dtype float16 or float32"
            )
        self.weights = SharedWeights(d)
        self.decode = make_session(d / "decode_step.onnx", providers, threads, weights=self.weights)
        self.prefill_sess = make_session(d / "prefill.onnx", providers, threads, weights=self.weights)
        self.np_dtype = _NP_DTYPES[m["dtype"]]
        self.L = L = int(m["num_layers"])
        self.max_len = int(m["max_len"])
        self.spec = StepSpec(num_layers=L, hidden=int(m["hidden"]), num_heads=int(m["num_heads"]),
                             num_kv_heads=int(m["num_kv_heads"]), head_dim=int(m["head_dim"]),
                             vocab=int(m["vocab"]), eps=float(m.get("eps", 1e-6)), max_len=self.max_len)
        self.device = torch.device("cpu")
        self.exit_layers = [int(e) for e in m["exit_layers"]]
        self.k = int(m["num_candidates"])
        self.cache = OnnxCache(L, self.spec.num_kv_heads, self.spec.head_dim, self.max_len,
                               int(m.get("cache_bucket", 64)), self.np_dtype)
        self._no_exit = np.zeros(L, dtype=bool)
        self._no_cands = np.zeros(self.k, dtype=np.int64)

    # ---- Backend
    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # ids [P] -> (logits [V] float32 of the last row, hn [P, D]); K/V rows of the prompt -> cache
        c, P = self.cache, len(ids)
        c.reset()
        c.ensure(P)
        logits, hn, k_rows, v_rows = self.prefill_sess.run(None, {"input_ids": np.asarray(ids, dtype=np.int64)})
        c.k[:, :, :P], c.v[:, :, :P] = k_rows, v_rows
        c.valid[:, :P] = True
        return torch.from_numpy(logits), torch.from_numpy(hn)

    # ---- WholeStep
    def can_run(self, plan: StepPlan) -> bool:
        """Dense steps, and exits of the paper's policy at the graph's exit layers with its k."""
        if plan.forced_exit is not None:
            return False
        if plan.candidates is None:
            return True  # dense; with want_logits the graph's head logits come back for sampling
        p = plan.policy
        if p is None or getattr(p, "forced", False) or p.exit_token != "full_head" or not p.verify_in_candidates \
                or p.needs_rollback:
            return False
        return int(plan.candidates.numel()) == self.k and set(plan.active) <= set(self.exit_layers)

    def prepare(self, plan: StepPlan, max_pos: int) -> None:
        """Nothing to compile or capture: the sessions were built when the backend opened."""

    def _thresholds(self, thresholds: dict) -> np.ndarray:
        thr = np.ones(self.L, dtype=np.float32)  # layers without an exit point never reach a predictor
        for layer, t in thresholds.items():
            if 0 <= int(layer) < self.L:
                thr[int(layer)] = t
        return thr

    def run_step(self, plan: StepPlan) -> StepOut:
        c, p = self.cache, plan.pos
        c.ensure(p)
        if plan.candidates is None:
            cands, active, thr = self._no_cands, self._no_exit, self._thresholds({})
        else:
            cands = plan.candidates.cpu().numpy().astype(np.int64)
            active = np.zeros(self.L, dtype=bool)
            active[sorted(plan.active)] = True
            thr = self._thresholds(plan.thresholds)
        tok, e, hn, logits, k_new, v_new, valid, heads = self.decode.run(None, {
            "token": np.asarray([plan.token], dtype=np.int64), "position": np.asarray([p], dtype=np.int64),
            **c.feed(), "valid": c.valid, "candidates": cands, "active": active, "thresholds": thr,
        })
        e = int(e[0])
        c.k[: e + 1, :, p] = k_new[: e + 1]  # only the layers that ran hold K/V for p
        c.v[: e + 1, :, p] = v_new[: e + 1]
        c.valid = valid
        return StepOut(token=int(tok[0]), exit_layer=e, hn=torch.from_numpy(hn),
                       predictor_calls=int(active[: e + 1].sum()), head_calls=int(heads[0]),
                       logits=torch.from_numpy(logits).reshape(-1) if plan.want_logits else None)


def _artifact_tokenizer(directory: Path, manifest: dict):
    """The tokenizer saved in the artifact directory, else the one of the model the manifest names."""
    from transformers import AutoTokenizer

    if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    from ..models import load_model  # loads the weights too: save the tokenizer into the artifacts instead

    return load_model(manifest["model"]).tokenizer


def _artifact_program(directory: Path, manifest: dict, num_layers: int) -> SpecEEProgram | None:
    if not (directory / "predictors.safetensors").exists():
        return None
    from ..api import program_from_bank
    from ..predictors.mlp import PredictorBank

    cfg = directory / "predictors_config.json"
    bank = PredictorBank.load(directory / "predictors.safetensors", cfg if cfg.exists() else None)
    return program_from_bank(bank, manifest, num_layers)


def _default_draft(directory: Path, settings: Settings, program, k: int, providers, threads):
    """settings.draft_source (None = the program's draft kind): eagle -> draft.onnx; ngram -> prompt
    lookup in Python."""
    src = settings.draft_source or (program.draft_kind if program is not None else None)
    if src is None:
        src = "eagle" if (directory / "draft.onnx").is_file() else "ngram"
    if src == "eagle":
        if not (directory / "draft.onnx").is_file():
            raise ArtifactError(
                f"{directory} holds no draft.onnx (the program's draft is not an EAGLE head); use "
                "--draft ngram, or pass a candidate source as draft="
            )
        return OnnxEagleSource(make_session(directory / "draft.onnx", providers, threads), k)
    if src == "ngram":
        from ..draft.ngram import NgramDraft

        return NgramDraft(k=k)
    raise SpecEEError(f"draft source {src!r} needs the torch model; pass it as draft= (e.g. draft.ShallowDraft)")


@dataclass
class ArtifactRun:
    """What the runtime loop needs to run an exported directory (`open_artifact`)."""

    backend: OnnxStep
    settings: Settings
    tokenizer: object = None
    program: SpecEEProgram | None = None
    draft: object = None  # candidate source (specee runs)
    scheduler: object = None
    eos_ids: set[int] = field(default_factory=set)
    manifest: dict = field(default_factory=dict)

    def decoder(self, policy=None):
        """The runtime's `Decoder` over this backend (the one decode loop)."""
        from ..runtime.decoder import Decoder

        return Decoder(self.backend, self.settings, eos_ids=self.eos_ids, program=self.program, draft=self.draft,
                       scheduler=self.scheduler, policy=policy)


def open_artifact(directory, settings: Settings, *, program="auto", draft=None, scheduler="auto",
                  tokenizer="auto", eos_ids=None, providers=None, threads: int | None = None) -> ArtifactRun:
    """Open an exported directory (the registry's factory for the onnx and tensorrt backends).

    program: "auto" = from the directory's predictors (the scheduler's offline layers and the
        per-exit-point thresholds come from it), or a SpecEEProgram, or None.
    draft: a candidate source; None = by settings.draft_source (eagle -> draft.onnx of the directory,
        ngram -> `NgramDraft`). Built only for specee runs.
    scheduler: "auto" = `OnlineScheduler` from the program + settings (when settings.use_schedule),
        None = every exit layer active, or a scheduler object.
    tokenizer / eos_ids: "auto" / None = the directory's tokenizer and the manifest's EOS ids.

    TensorRT engines are run by a C++ deployment (exported/README.md); in Python the ONNX graphs run
    with ONNX Runtime, so --backend tensorrt runs them too."""
    from ..artifacts import read_manifest

    d = Path(directory)
    backend = OnnxStep(d, settings, providers, threads)  # refuses unsupported settings before the rest loads
    # a bare `export_onnx` directory (library use) has no manifest; `specee-compile export` writes one
    manifest = read_manifest(d) if (d / "manifest.json").exists() else {}
    if isinstance(program, str) and program == "auto":
        program = _artifact_program(d, manifest, backend.L)
    if isinstance(tokenizer, str) and tokenizer == "auto":
        tokenizer = _artifact_tokenizer(d, manifest)
    if eos_ids is None:
        eos_ids = set(manifest.get("eos_ids") or ())
        if not eos_ids and getattr(tokenizer, "eos_token_id", None) is not None:
            eos_ids = {int(tokenizer.eos_token_id)}
    if settings.specee:
        if program is None:
            raise SpecEEError(f"--specee needs exit predictors, and {d} holds none (it was exported dense); "
                              "export with --artifacts DIR, or drop --specee")
        if draft is None:
            draft = _default_draft(d, settings, program, backend.k, providers, threads)
        if int(getattr(draft, "k", backend.k)) != backend.k:
            raise SpecEEError(f"the draft proposes {draft.k} candidates, the graph was exported for {backend.k}")
        if isinstance(scheduler, str) and scheduler == "auto":
            scheduler = None
            if settings.use_schedule:
                from ..predictors.schedule import OnlineScheduler

                scheduler = OnlineScheduler.from_settings(settings, program.offline_layers, program.predictors.layers)
    elif isinstance(scheduler, str):
        scheduler = None
    return ArtifactRun(backend=backend, settings=settings, tokenizer=tokenizer, program=program, draft=draft,
                       scheduler=scheduler, eos_ids=set(eos_ids), manifest=manifest)


def generate_from_artifact(directory, prompt: str, settings: Settings, on_text: Callable[[str], None] | None = None):
    """`specee-compile generate DIR PROMPT --backend onnx`: `api.generate_from_artifact` (the runtime
    loop over `open_artifact`). Returns (GenerationResult, generated text)."""
    from ..api import generate_from_artifact as run

    return run(directory, prompt, settings, on_text=on_text)


__all__ = ["ArtifactRun", "OnnxCache", "OnnxEagleSource", "OnnxStep", "SharedWeights", "generate_from_artifact",
           "graph_meta", "has_subgraphs", "make_session", "open_artifact", "session_meta"]
