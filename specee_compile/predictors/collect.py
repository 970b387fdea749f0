"""Training data for the exit predictors: features and labels at every layer of a dense run.

Teacher forcing, not generation: for each calibration item (a prompt and a reference reply, e.g. a
ShareGPT first turn) one dense forward runs over chat_template(prompt) + reply. At a position t the
"dense token" is the model's own final-layer argmax there, which is exactly what dense greedy
decoding would emit after that prefix, so no token needs to be generated (SmolLM2-135M generates
~15 tok/s on two cores; a teacher-forced forward handles thousands of positions per second).
Positions used: the last prompt position and every reply position (the decode-time regime).

At every position t and predictor slot l (layers 0 .. L-2):
    hn_l       = final_norm(h_l[t])                        (the model's own norm module)
    S_t        = candidate_fn(...)[t]                      k candidate ids for the token after t
    z_l, p_l   = exit_features(hn_l, lm_head[S_t], .)      (features.py, the op's own math)
    T_l        = argmax over the FULL vocabulary of lm_head(hn_l)
    label_match[t, l]   = T_l == dense_t                   exiting here emits the dense token
    exit_in_cands[t, l] = T_l in S_t                       the paper's verification would pass
    cand_match[t, l]    = S_t[argmax z_l] == dense_t       lossless-mode exit token is right
    in_cands[t]         = dense_t in S_t
    settled[t]          = first layer from which T_l == dense_t at every deeper layer (L-1 if only
                          the last layer gets it)
z and p are stored per layer, not x: `FeatureDataset.x(evaluated_layers)` builds delta against the
previous *evaluated* layer for any layer subset, so training can match scheduled inference. With
every layer evaluated (the default) delta is against the adjacent layer and slot 0 gets delta = p.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import SpecEEError
from .features import exit_features, features_from_zp

# candidate_fn(layer_outputs [L, T, D] raw decoder-layer outputs (before the final norm),
#              token_ids [T], k) -> LongTensor [T, k]: row t = candidates for token t+1.
CandidateFn = Callable[[Tensor, Tensor, int], Tensor]

LABEL_KINDS = ("match", "match_in_cands", "cand_argmax")


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------
@dataclass
class FeatureDataset:
    """N positions x Lp predictor slots (Lp = num_layers - 1), candidate set size k."""

    z: Tensor  # [N, Lp, k] float32 candidate logits per layer
    p: Tensor  # [N, Lp, k] float32 softmax(z)
    exit_token: Tensor  # [N, Lp] int64 full-vocab argmax at each layer
    dense: Tensor  # [N] int64 final-layer argmax (the dense greedy token)
    cands: Tensor  # [N, k] int64 candidate ids S_t
    label_match: Tensor  # [N, Lp] bool exit_token == dense
    exit_in_cands: Tensor  # [N, Lp] bool exit_token in S_t
    cand_match: Tensor  # [N, Lp] bool S_t[argmax z] == dense
    in_cands: Tensor  # [N] bool dense in S_t
    settled: Tensor  # [N] int64 settled layer (0 .. L-1)
    text_index: Tensor  # [N] int64 which calibration item
    position: Tensor  # [N] int64 position inside that item's token sequence
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.z.shape[0]

    @property
    def num_slots(self) -> int:
        return self.z.shape[1]

    @property
    def num_layers(self) -> int:
        return self.num_slots + 1

    @property
    def k(self) -> int:
        return self.z.shape[2]

    def x(self, evaluated_layers=None) -> Tensor:
        """Features [N, Lp, 3k]; delta against the previous evaluated layer (see features_from_zp)."""
        return features_from_zp(self.z, self.p, evaluated_layers)

    def labels(self, kind: str = "match") -> Tensor:
        """[N, Lp] bool. match: exit token == dense token (the paper's label); match_in_cands: that and
        the dense token is among the candidates (the exit would also pass verification);
        cand_argmax: the best candidate by z is the dense token (lossless mode's exit token)."""
        if kind == "match":
            return self.label_match
        if kind == "match_in_cands":
            return self.label_match & self.in_cands.unsqueeze(1)
        if kind == "cand_argmax":
            return self.cand_match
        raise SpecEEError(f"label kind {kind!r} is not one of {', '.join(LABEL_KINDS)}")

    @property
    def label(self) -> Tensor:
        return self.label_match

    _TENSORS = ("z", "p", "exit_token", "dense", "cands", "label_match", "exit_in_cands", "cand_match",
                "in_cands", "settled", "text_index", "position")

    def subset(self, index: Tensor) -> "FeatureDataset":
        tensors = {name: getattr(self, name)[index] for name in self._TENSORS}
        return FeatureDataset(**tensors, meta=dict(self.meta))

    def split_by_text(self, val_fraction: float = 0.2, seed: int = 0
                      ) -> tuple["FeatureDataset", "FeatureDataset"]:
        """Train/validation split by calibration item (positions of one text are correlated)."""
        texts = torch.unique(self.text_index)
        g = torch.Generator().manual_seed(seed)
        perm = texts[torch.randperm(len(texts), generator=g)]
        n_val = max(1, int(round(len(texts) * val_fraction))) if len(texts) > 1 else 0
        val_texts = perm[:n_val]
        is_val = torch.isin(self.text_index, val_texts)
        return self.subset(~is_val), self.subset(is_val)

    def save(self, path) -> None:
        from ..artifacts import save_tensors

        tensors = {}
        for name in self._TENSORS:
            t = getattr(self, name)
            tensors[name] = (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous()
        save_tensors(tensors, path, metadata={"meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> "FeatureDataset":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata().get("meta", "{}"))
            tensors = {name: f.get_tensor(name) for name in cls._TENSORS}
        for name in ("label_match", "exit_in_cands", "cand_match", "in_cands"):
            tensors[name] = tensors[name].bool()
        return cls(**tensors, meta=meta)


# ---------------------------------------------------------------------------------------------
# model access
# ---------------------------------------------------------------------------------------------
def _hf(model):
    """Accept an HF LlamaForCausalLM or the package's LoadedModel (which has .model)."""
    from ..draft.base import unwrap_model

    hf = unwrap_model(model)
    if getattr(hf, "get_output_embeddings", lambda: None)() is None:
        raise SpecEEError(f"expected a Llama-family causal LM (or LoadedModel), got {type(model).__name__}")
    return hf


def _parts(hf):
    body = hf.model
    return body, body.layers, body.norm, hf.get_output_embeddings().weight


@torch.no_grad()
def layer_outputs(hf, ids: Tensor) -> Tensor:
    """Raw output of every decoder layer for one sequence. ids [T] -> [L, T, D] (before final norm).
    Forward hooks rather than output_hidden_states: what HF puts last in hidden_states (normed or
    not) has changed between versions; the hooks see exactly what each layer returns."""
    body, layers, _, _ = _parts(hf)
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0])

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        body(input_ids=ids.unsqueeze(0).to(hf.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured)  # [L, T, D]


# ---------------------------------------------------------------------------------------------
# candidate sources for teacher forcing
# ---------------------------------------------------------------------------------------------
def layer_candidates(model, layer: int) -> CandidateFn:
    """Stand-in draft: top-k of lm_head(final_norm(h_layer)) at the *same* position. Available at
    decode time once `layer` has run; needs no training and never sees the final layer, so its
    misses (dense token not in S) are realistic negatives. Not the runtime's `shallow` source
    (draft/shallow.py), which reads the previous step's feature."""
    hf = _hf(model)
    _, _, norm, head = _parts(hf)

    def fn(outs: Tensor, token_ids: Tensor, k: int) -> Tensor:
        logits = norm(outs[layer]).float() @ head.float().T  # [T, V]
        return logits.topk(k, dim=-1).indices

    fn.description = f"layer:{layer} (top-k of that layer's logits at the same position)"  # type: ignore[attr-defined]
    return fn


DRAFT_KINDS = ("eagle", "ngram", "shallow")


def resolve_candidate_source(source_kind, model, k: int, artifacts: dict | None = None):
    """Turn a string into something `candidates_for_sequence` drives: "eagle" / "ngram" / "shallow"
    -> draft.make_candidate_source(kind, model, artifacts, k) (eagle needs a trained draft in
    `artifacts`, e.g. {"draft_path": DIR}); "layer[:N]" -> layer_candidates. Others pass through."""
    if not isinstance(source_kind, str):
        return source_kind
    name, _, arg = source_kind.partition(":")
    if name in DRAFT_KINDS:
        from ..draft import make_candidate_source

        source = make_candidate_source(name, model, artifacts, k)
        source.description = f"draft:{name}"
        return source
    if name == "layer":
        L = len(_parts(_hf(model))[1])
        return layer_candidates(model, int(arg) if arg else max(0, L // 3))
    raise SpecEEError(
        f"candidate source {source_kind!r} is not one of eagle, ngram, shallow, layer[:N] "
        "(or pass a callable / CandidateSource)"
    )


def candidates_for_sequence(source_kind, model, hidden_states: Tensor, token_ids: Tensor, k: int,
                            *, start: int = 0, artifacts: dict | None = None) -> Tensor:
    """Candidates [T, k] for every position of a teacher-forced sequence.

    source_kind: a CandidateFn, a draft.CandidateSource (reset/propose/observe, driven step by step
        from `start`), or a string: "eagle" / "ngram" / "shallow" (the runtime's draft sources, built
        with `artifacts`), "layer:N" (top-k of layer N's own logits at the same position; "layer"
        alone: N = L // 3).
    hidden_states: [L, T, D] raw decoder-layer outputs (layer_outputs()).
    """
    hf = _hf(model)
    L = hidden_states.shape[0]
    if callable(source_kind) and not hasattr(source_kind, "propose"):
        return source_kind(hidden_states, token_ids, k)
    source = resolve_candidate_source(source_kind, hf, k, artifacts)
    if callable(source) and not hasattr(source, "propose"):
        return source(hidden_states, token_ids, k)
    if not all(hasattr(source, m) for m in ("reset", "propose", "observe")):
        raise SpecEEError(f"candidate source {type(source).__name__} has no reset/propose/observe")
    _, _, norm, _ = _parts(hf)
    with torch.no_grad():
        f = norm(hidden_states[-1]).float()  # [T, D] final_norm(final hidden)
    # Drive it as a dense decode would: at position t propose() gives candidates for x_{t+1}, then
    # observe(x_{t+1}, f_t, L-1) (the step at t emitted x_{t+1} at full depth). Rows < start stay -1.
    out = torch.full((token_ids.shape[0], k), -1, dtype=torch.long)
    ids = [int(t) for t in token_ids.tolist()]
    source.reset(ids[: start + 1], f[: start + 1])
    for t in range(start, len(ids)):
        c = torch.as_tensor(source.propose()).reshape(-1)[:k]
        out[t, : c.numel()] = c
        if t + 1 < len(ids):
            source.observe(ids[t + 1], f[t], L - 1)
    return out


# ---------------------------------------------------------------------------------------------
# calibration items -> token ids
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenizedItem:
    prompt_ids: list[int]  # chat-templated prompt, ending with the assistant header
    reply_ids: list[int]  # reference reply tokens (may be empty)


def _prompt_reply(item) -> tuple[str, str]:
    if isinstance(item, str):
        return item, ""
    if isinstance(item, dict):
        prompt = item.get("prompt") or item.get("question") or item.get("instruction") or item.get("text")
        reply = item.get("reply") or item.get("response") or item.get("answer") or item.get("output") or ""
        if prompt is None:
            raise SpecEEError(f"calibration item has no prompt field (keys: {sorted(item)})")
        return str(prompt), str(reply)
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item):
        return item[0], item[1]
    for pa, ra in (("prompt", "reply"), ("prompt", "response"), ("question", "answer")):
        if hasattr(item, pa):
            return str(getattr(item, pa)), str(getattr(item, ra, "") or "")
    raise SpecEEError(f"cannot read a prompt/reply from calibration item of type {type(item).__name__}")


def tokenize_item(tokenizer, item, *, chat_template: bool = True) -> TokenizedItem:
    if isinstance(item, TokenizedItem):
        return item
    prompt, reply = _prompt_reply(item)
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
    return TokenizedItem(list(prompt_ids), list(reply_ids))


# ---------------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------------
class _LabelCache:
    """Per-item full-vocab top-k token ids at every layer ([n, L, k] int32) in one safetensors file."""

    def __init__(self, path, hf, k: int) -> None:
        self.path = None if path is None else str(path)
        self.k = k
        self.entries: dict[str, Tensor] = {}
        self.dirty = False
        self.hits = 0
        if self.path is None:
            return
        from ..models import model_fingerprint

        self.fingerprint = model_fingerprint(hf)
        try:
            from safetensors import safe_open

            with safe_open(self.path, "pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") == self.fingerprint and int(meta.get("k", -1)) == k:
                    self.entries = {name: f.get_tensor(name) for name in f.keys()}
        except (FileNotFoundError, OSError, ValueError, RuntimeError):
            self.entries = {}  # missing or unreadable: start a new cache

    def key(self, ids: Tensor, positions: Tensor) -> str:
        import hashlib

        h = hashlib.sha256(ids.to(torch.int64).numpy().tobytes())
        h.update(positions.to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:32]

    def get(self, key: str) -> Tensor | None:
        t = self.entries.get(key)
        if t is not None:
            self.hits += 1
            return t.to(torch.long)
        return None

    def put(self, key: str, topk: Tensor) -> None:
        if self.path is not None:
            self.entries[key] = topk.to(torch.int32).contiguous()
            self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        from ..artifacts import save_tensors

        save_tensors(self.entries, self.path, metadata={"fingerprint": self.fingerprint, "k": str(self.k)})


@torch.no_grad()
def collect_features(
    model,
    tokenizer,
    texts: Sequence,
    candidate_source_fn=None,
    *,
    max_tokens: int = 16384,
    k: int = 4,
    max_prompt_tokens: int = 768,
    max_reply_tokens: int = 256,
    chat_template: bool = True,
    head_chunk: int = 4096,
    draft_artifacts: dict | None = None,
    label_cache=None,
    progress: bool = True,
) -> FeatureDataset:
    """Dense teacher-forced run over calibration items -> FeatureDataset of about `max_tokens` positions.

    texts: items of str (prompt only: only the last prompt position is used), (prompt, reply),
        dict with prompt/reply keys, or TokenizedItem (then `tokenizer` may be None).
    candidate_source_fn: see `candidates_for_sequence` (CandidateFn, CandidateSource or "layer[:N]");
        None = "layer" (layer L // 3).
        Strings "eagle" / "ngram" / "shallow" build the runtime's draft source from `draft_artifacts`.
    Items whose prompt exceeds `max_prompt_tokens` are skipped; replies are cut at `max_reply_tokens`.
    label_cache: optional safetensors path. The full-vocabulary argmax at every layer (the expensive,
        candidate-independent part: labels and settled layers) is read from / added to it, keyed by the
        model fingerprint and each item's token ids, so re-collecting with another draft is cheap.
    """
    hf = _hf(model)
    hf.eval()
    body, layers, norm, head = _parts(hf)
    L = len(layers)
    Lp = L - 1
    if Lp < 1:
        raise SpecEEError(f"early exit needs at least 2 decoder layers, the model has {L}")
    source = resolve_candidate_source("layer" if candidate_source_fn is None else candidate_source_fn,
                                      hf, k, draft_artifacts)
    cache = _LabelCache(label_cache, hf, k)
    head32 = head.float()

    times = {"tokenize": 0.0, "forward": 0.0, "candidates": 0.0, "features": 0.0, "full_head": 0.0}
    chunks: dict[str, list[Tensor]] = {name: [] for name in FeatureDataset._TENSORS}
    layer_topk_hits = torch.zeros(L)  # dense token in the top-k of layer l's full logits (analysis)
    total = 0
    skipped = 0
    used_items = 0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="collect", unit="pos")
    t_all = time.perf_counter()
    for text_index, item in enumerate(texts):
        if total >= max_tokens:
            break
        t0 = time.perf_counter()
        tok = tokenize_item(tokenizer, item, chat_template=chat_template)
        times["tokenize"] += time.perf_counter() - t0
        if not tok.prompt_ids or len(tok.prompt_ids) > max_prompt_tokens:
            skipped += 1
            continue
        ids = torch.tensor(tok.prompt_ids + tok.reply_ids[:max_reply_tokens], dtype=torch.long)
        P, T = len(tok.prompt_ids), ids.shape[0]
        positions = torch.arange(P - 1, T)[: max_tokens - total]  # last prompt position + reply
        n = positions.shape[0]

        t0 = time.perf_counter()
        outs = layer_outputs(hf, ids)  # [L, T, D]
        times["forward"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        cands_all = candidates_for_sequence(source, hf, outs, ids, k, start=P - 1)  # [T, k]
        cands = cands_all[positions].to(torch.long).cpu()  # [n, k]
        if (cands < 0).any():
            raise SpecEEError("candidate source returned fewer than k candidates for some position")
        times["candidates"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        hn = norm(outs[:, positions]).float()  # [L, n, D]
        rows = head32[cands.to(head32.device)]  # [n, k, D]
        zs, ps = [], []
        p_prev = None
        for layer in range(Lp):
            _, z, p = exit_features(hn[layer], rows, p_prev)  # [n, k]
            zs.append(z)
            ps.append(p)
            p_prev = p
        z = torch.stack(zs, 1).cpu()  # [n, Lp, k]
        p = torch.stack(ps, 1).cpu()
        times["features"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        key = cache.key(ids, positions)
        hit = cache.get(key)
        if hit is None:
            flat = hn.reshape(L * n, -1)
            tops = []
            for s in range(0, flat.shape[0], head_chunk):
                logits = flat[s : s + head_chunk] @ head32.T  # [c, V]
                tops.append(logits.topk(k, dim=-1).indices.cpu())  # [c, k]
            topk = torch.cat(tops).reshape(L, n, k).permute(1, 0, 2).contiguous()  # [n, L, k]
            cache.put(key, topk)
        else:
            topk = hit
        top1 = topk[..., 0]  # [n, L] full-vocab argmax per layer
        dense = top1[:, -1]  # [n]
        layer_topk_hits += (topk == dense.view(n, 1, 1)).any(-1).sum(0).float()
        times["full_head"] += time.perf_counter() - t0

        match_all = top1 == dense.unsqueeze(1)  # [n, L]; last column all True
        # settled: first l with match at l..L-1: count the trailing run of matches
        trailing = torch.flip(torch.cumprod(torch.flip(match_all, [1]).to(torch.int64), 1), [1]).sum(1)
        settled = L - trailing
        exit_token = top1[:, :Lp]
        chunks["z"].append(z)
        chunks["p"].append(p)
        chunks["exit_token"].append(exit_token)
        chunks["dense"].append(dense)
        chunks["cands"].append(cands)
        chunks["label_match"].append(match_all[:, :Lp])
        chunks["exit_in_cands"].append((exit_token.unsqueeze(-1) == cands.unsqueeze(1)).any(-1))
        best = cands.gather(1, z.argmax(-1))  # [n, Lp] best candidate by z at each layer
        chunks["cand_match"].append(best == dense.unsqueeze(1))
        chunks["in_cands"].append((cands == dense.unsqueeze(1)).any(-1))
        chunks["settled"].append(settled)
        chunks["text_index"].append(torch.full((n,), text_index, dtype=torch.long))
        chunks["position"].append(positions.clone())
        total += n
        used_items += 1
        if bar is not None:
            bar.update(n)
            bar.set_postfix(items=used_items)
    if bar is not None:
        bar.close()
    cache.save()
    if total == 0:
        raise SpecEEError(
            f"no calibration positions collected from {len(texts)} items ({skipped} skipped as longer than "
            f"max_prompt_tokens={max_prompt_tokens}); pass more or shorter texts"
        )
    data = {name: torch.cat(chunks[name]) for name in FeatureDataset._TENSORS}
    times["total"] = time.perf_counter() - t_all
    description = getattr(source, "description", source if isinstance(source, str) else type(source).__name__)
    meta = {
        "num_layers": L,
        "k": k,
        "positions": total,
        "items": used_items,
        "skipped_items": skipped,
        "candidate_source": str(description),
        "delta": "adjacent layer during collection; FeatureDataset.x(evaluated_layers) rebuilds it",
        "dense_in_layer_topk": [round(float(v) / total, 4) for v in layer_topk_hits],
        "times_s": {name: round(v, 2) for name, v in times.items()},
        "label_cache_hits": cache.hits,
    }
    if progress:
        print("collect: " + ", ".join(f"{name} {v:.1f}s" for name, v in times.items())
              + f"; {total} positions from {used_items} items")
    return FeatureDataset(**data, meta=meta)


__all__ = [
    "FeatureDataset", "TokenizedItem", "collect_features", "candidates_for_sequence", "layer_candidates",
    "resolve_candidate_source",
    "layer_outputs", "tokenize_item", "LABEL_KINDS",
]
