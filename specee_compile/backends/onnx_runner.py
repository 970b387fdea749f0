"""Run an exported SpecEE artifact with ONNX Runtime: a thin loop around one session call per token.

The control flow of a step (which layers run, whether it exits) lives inside `decode_step.onnx`;
this loop only does what `runtime/decoder.py` does around a step, for the paper's configuration
(approximate mode, KV policy skip, greedy):

    first, hn[P]  = prefill(prompt)                 K/V rows of the prompt -> cache[:, :, :P]
    draft.reset(prompt, hn); draft.observe(first, hn[-1], L-1)
    loop until EOS / max_new_tokens:
        p = len(seq) - 1;  S = draft.propose()      (k candidate ids)
        active = scheduler set & exit layers & (>= min_exit_layer), as an [L] bool mask
        out = decode_step(seq[-1], p, K[0..L-1], V[0..L-1], valid, S, active, thresholds)
        K[:e+1, :, p] = k_new[:e+1]; V likewise; valid = valid_out      (e = exit_layer)
        draft.observe(next_token, hidden_normed, e); scheduler.record_exit(e) if e < L-1
The cache length T grows in buckets of 64 positions (the graph's T axis is dynamic).

Backfill and lossless mode need a step with several query rows and a rollback; they run on the
eager / inductor backends (`SpecEEError` here says so).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import Settings
from ..draft.base import CandidateSource, check_truncate, fill_unique
from ..errors import ArtifactError, BackendUnavailable, SpecEEError
from ..program import SpecEEProgram
from ..runtime.decoder import GenerationResult, check_prompt
from ..runtime.sampling import select_token

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "the onnx backend needs onnxruntime; install it with `pip install 'specee-compile[onnx]'`"
        ) from None
    return onnxruntime


def make_session(path, providers=None, threads: int | None = None, profile_prefix: str | None = None):
    """An ORT InferenceSession with full graph optimizations (CPU provider unless told otherwise)."""
    ort = _ort()
    if not Path(path).is_file():
        raise ArtifactError(f"{path} not found; export the model first (`specee-compile export MODEL -o DIR`)")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no busy-waiting between runs: the loop does Python/torch work (draft, scheduler) in between
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


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


class OnnxDecoder:
    """Greedy decoding from an exported artifact directory (prefill.onnx + decode_step.onnx [+ draft.onnx]).

    settings: the same Settings as the eager `Decoder` (specee, threshold, min_exit_layer, use_schedule,
        max_new_tokens, ...). Approximate mode + kv skip only.
    program: the SpecEE program the artifact was exported from: the scheduler's offline layers come
        from it. Exit layers are read from the graph.
    draft: a candidate source (ngram, shallow, an EagleSource in torch); None = by settings.draft_source:
        eagle -> `draft.onnx` from the directory, ngram -> `NgramDraft`.
    scheduler: "auto" = `OnlineScheduler` from program + settings (when settings.use_schedule); None =
        every exit layer active; or a scheduler object (`active(n)`, `record_exit(l)`, `reset()`).
    """

    def __init__(self, onnx_dir, settings: Settings, program: SpecEEProgram | None = None, draft=None,
                 eos_ids: set[int] | None = None, scheduler="auto", providers=None, threads: int | None = None):
        s = settings
        if s.specee and (s.mode != "approximate" or s.kv_policy != "skip"):
            raise SpecEEError(
                f"the onnx backend runs the paper's configuration (mode=approximate, kv_policy=skip); "
                f"got mode={s.mode}, kv_policy={s.kv_policy}. Backfill and lossless mode run on the eager or "
                "inductor backends: pass --backend eager (or inductor)"
            )
        if s.specee and s.temperature > 0:
            raise SpecEEError("--specee decodes greedily (as the paper); drop --temperature or --specee")
        d = Path(onnx_dir)
        self.dir = d
        self.s = s
        m = graph_meta(d / "decode_step.onnx")
        self.meta = m
        if m.get("dtype") not in _NP_DTYPES:
            raise SpecEEError(
                f"the onnx runner handles float32 and float16 artifacts (ONNX Runtime's CPU kernels lack "
                f"bfloat16); {d} was exported as {m.get('dtype')}: re-export with --dtype float16 or float32"
            )
        self.decode = make_session(d / "decode_step.onnx", providers, threads)
        self.prefill = make_session(d / "prefill.onnx", providers, threads)
        self.np_dtype = _NP_DTYPES[m["dtype"]]
        self.L = int(m["num_layers"])
        self.Hkv, self.hd = int(m["num_kv_heads"]), int(m["head_dim"])
        self.max_len = int(m["max_len"])
        self.bucket = int(m.get("cache_bucket", 64))
        self.exit_layers = [int(e) for e in m["exit_layers"]]
        self.k = int(m["num_candidates"])
        self.eos = set(eos_ids or ())
        self.program = program
        if s.specee:
            if draft is None:
                draft = self._default_draft(providers, threads)
            if int(getattr(draft, "k", self.k)) != self.k:
                raise SpecEEError(f"the draft proposes {draft.k} candidates, the graph was exported for {self.k}")
            if scheduler == "auto":
                scheduler = None
                if s.use_schedule and program is not None:
                    from ..predictors.schedule import OnlineScheduler

                    scheduler = OnlineScheduler.from_settings(s, program.offline_layers, program.predictors.layers)
        elif scheduler == "auto":
            scheduler = None
        self.draft = draft
        self.scheduler = scheduler
        self.thresholds = self._thresholds()
        self.k_cache = self.v_cache = self.valid = None

    def _thresholds(self) -> np.ndarray:
        """Per-layer thresholds input: settings.threshold everywhere if set, else each exit point's own
        (the program's, or the graph metadata's), as the eager Decoder does."""
        thr = np.ones(self.L, dtype=np.float32)  # layers without an exit point never reach a predictor
        if self.program is not None:
            per_layer = {ep.layer: ep.threshold for ep in self.program.exit_points}
        else:
            per_layer = {int(k): float(v) for k, v in (self.meta.get("thresholds") or {}).items()}
        for layer in self.exit_layers:
            thr[layer] = self.s.threshold if self.s.threshold is not None else per_layer.get(layer, 0.5)
        return thr

    def _default_draft(self, providers, threads):
        """settings.draft_source (None = the program's draft kind): eagle -> draft.onnx; ngram -> prompt
        lookup in Python."""
        src = self.s.draft_source or (self.program.draft_kind if self.program is not None else None)
        if src is None:
            src = "eagle" if (self.dir / "draft.onnx").is_file() else "ngram"
        if src == "eagle":
            if not (self.dir / "draft.onnx").is_file():
                raise ArtifactError(
                    f"{self.dir} holds no draft.onnx (the program's draft is not an EAGLE head); use "
                    "--draft ngram, or pass a candidate source as draft="
                )
            return OnnxEagleSource(make_session(self.dir / "draft.onnx", providers, threads), self.k)
        if src == "ngram":
            from ..draft.ngram import NgramDraft

            return NgramDraft(k=self.k)
        raise SpecEEError(f"draft source {src!r} needs the torch model; pass it as draft= (e.g. draft.ShallowDraft)")

    # ------------------------------------------------------------------ cache
    def _cap(self, pos: int) -> int:
        return min(self.max_len, (pos // self.bucket + 1) * self.bucket)

    def _ensure(self, pos: int) -> None:
        """Grow the cache so that position `pos` fits (bucketed, like the eager attended prefix)."""
        cap = self._cap(pos)
        if self.k_cache is not None and self.k_cache.shape[2] >= cap:
            return
        shape = (self.L, self.Hkv, cap, self.hd)
        k, v, valid = np.zeros(shape, self.np_dtype), np.zeros(shape, self.np_dtype), np.zeros((self.L, cap), bool)
        if self.k_cache is not None:
            n = self.k_cache.shape[2]
            k[:, :, :n], v[:, :, :n], valid[:, :n] = self.k_cache, self.v_cache, self.valid
        self.k_cache, self.v_cache, self.valid = k, v, valid

    def _kv_feed(self) -> dict:
        """Layer l's cache k[l] [Hkv, T, hd] is a contiguous slice: ORT reads it in place (no copy)."""
        feed = {}
        for i in range(self.L):
            feed[f"k_cache_{i}"] = self.k_cache[i]
            feed[f"v_cache_{i}"] = self.v_cache[i]
        return feed

    # ------------------------------------------------------------------ loop
    def _active_mask(self) -> np.ndarray:
        if self.scheduler is None or not self.s.use_schedule:
            layers = set(self.exit_layers)
        else:
            layers = set(self.scheduler.active(self.L)) & set(self.exit_layers)
        mask = np.zeros(self.L, dtype=bool)
        if self.s.max_pending > 0:  # the eager loop's `may_exit` (never pending under kv skip)
            for i in layers:
                if i >= self.s.min_exit_layer:
                    mask[i] = True
        return mask

    def generate(self, prompt_ids: list[int], on_token: Callable[[int], None] | None = None) -> GenerationResult:
        s = self.s
        check_prompt(prompt_ids, s.max_new_tokens, self.max_len, "re-export with a larger --max-context")
        L = self.L
        res = GenerationResult(prompt_len=len(prompt_ids), token_ids=[], num_layers=L, exit_layers=[])
        gen = torch.Generator().manual_seed(s.seed)
        seq = list(prompt_ids)
        emit = on_token or (lambda t: None)

        t0 = time.perf_counter()
        P = len(prompt_ids)
        self.k_cache = self.v_cache = self.valid = None
        self._ensure(P)
        logits, hn, k_rows, v_rows = self.prefill.run(None, {"input_ids": np.asarray(prompt_ids, dtype=np.int64)})
        self.k_cache[:, :, :P], self.v_cache[:, :, :P] = k_rows, v_rows
        self.valid[:, :P] = True
        first = select_token(torch.from_numpy(logits), s.temperature, s.top_p, gen)
        if s.specee:
            self.draft.reset(list(prompt_ids), torch.from_numpy(hn))
            self.draft.observe(first, torch.from_numpy(hn[-1]), L - 1)
            if self.scheduler is not None:
                self.scheduler.reset()
        res.prefill_s = time.perf_counter() - t0
        seq.append(first)
        res.exit_layers.append(L - 1)
        emit(first)

        t0 = time.perf_counter()
        no_exit = np.zeros(L, dtype=bool)
        while len(seq) - P < s.max_new_tokens and seq[-1] not in self.eos:
            p = len(seq) - 1
            self._ensure(p)
            if s.specee:
                cands = self.draft.propose().cpu().numpy().astype(np.int64)
                active = self._active_mask()
            else:
                cands, active = np.zeros(self.k, dtype=np.int64), no_exit
            tok, e, hn, logits, k_new, v_new, valid, heads = self.decode.run(None, {
                "token": np.asarray([seq[-1]], dtype=np.int64), "position": np.asarray([p], dtype=np.int64),
                **self._kv_feed(), "valid": self.valid,
                "candidates": cands, "active": active, "thresholds": self.thresholds,
            })
            e = int(e[0])
            self.k_cache[: e + 1, :, p] = k_new[: e + 1]  # only the layers that ran hold K/V for p
            self.v_cache[: e + 1, :, p] = v_new[: e + 1]
            self.valid = valid
            token = int(tok[0]) if s.specee else select_token(torch.from_numpy(logits), s.temperature, s.top_p, gen)
            res.decode_steps += 1
            res.layer_passes += e + 1  # one row per step (kv skip): passes == rows
            res.layer_rows += e + 1
            res.predictor_calls += int(active[: e + 1].sum())
            res.head_calls += int(heads[0])
            if s.specee:
                self.draft.observe(token, torch.from_numpy(hn), e)
                if e < L - 1 and self.scheduler is not None:
                    self.scheduler.record_exit(e)
            seq.append(token)
            res.exit_layers.append(e)
            emit(token)
        res.decode_s = time.perf_counter() - t0
        res.token_ids = seq[P:]
        return res


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


def generate_from_artifact(directory, prompt: str, settings: Settings, on_text: Callable[[str], None] | None = None):
    """`specee-compile generate DIR PROMPT --backend onnx`: everything from the artifact directory
    (manifest, ONNX graphs, predictors, tokenizer). Returns (GenerationResult, generated text).

    TensorRT engines are run by a C++ deployment (exported/README.md); in Python the ONNX graphs run
    with ONNX Runtime, so --backend tensorrt runs them too when no TensorRT runtime is wired in."""
    from ..api import encode_prompt
    from ..artifacts import read_manifest

    d = Path(directory)
    manifest = read_manifest(d)
    decode_meta = graph_meta(d / "decode_step.onnx")
    tokenizer = _artifact_tokenizer(d, manifest)
    program = _artifact_program(d, manifest, int(decode_meta["num_layers"]))
    eos = set(manifest.get("eos_ids") or ())
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = {int(tokenizer.eos_token_id)}
    dec = OnnxDecoder(d, settings, program, eos_ids=eos)
    ids = encode_prompt(tokenizer, prompt, settings.chat_template)
    out: list[int] = []
    printed = [0]

    def stream(token: int) -> None:
        out.append(token)
        if on_text is None:
            return
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for multi-byte pieces to complete
            on_text(text[printed[0] :])
            printed[0] = len(text)

    res = dec.generate(ids, on_token=stream)
    text = tokenizer.decode(res.token_ids, skip_special_tokens=True)
    if on_text is not None and len(text) > printed[0]:
        on_text(text[printed[0] :] + "\n")
    return res, text


__all__ = ["OnnxDecoder", "OnnxEagleSource", "generate_from_artifact", "graph_meta", "make_session", "session_meta"]
