"""Conditional ONNX export of a SpecEE program: the form a C++ deployment loads.

    prefill.onnx      dense prefill of P prompt rows (dynamic P)
    decode_step.onnx  one token, with the early exits inside the graph as nested `If` nodes
    draft.onnx        the EAGLE draft head (only when the program's draft is an EAGLE head)
    weights.bin       the model and predictor weights, shared by prefill.onnx and decode_step.onnx
                      (ONNX external data, 4 KiB aligned), so models past 2 GB export and the
                      weights are stored once

`decode_step.onnx`, for exit layers e_1 < ... < e_n (program.exit_points below the last layer):

    layers 0..e_1
    propose_1 = active[e_1] & exit_score(h) > thresholds[e_1]    (predictor as plain ops)
    If(propose_1): full head -> T = argmax, in_S = T in candidates   (else: nothing runs)
    If(propose_1 & in_S)
        then: emit T, exit layer e_1                                 (the paper's exit rule)
        else: layers e_1+1..e_2, propose_2, If(propose_2) ..., If(exit_2) ... else ... full depth

Each exit point adds two `If` nodes: the *verification* If (the full LM head runs only when the
predictor proposes an exit) and the *exit* If (its else-branch holds every deeper layer). ONNX
Runtime executes only the taken branch, so an exit skips the deeper layers' work.

`structure="flat"` builds the same step as a sequence instead of a nest: segment j > 0 runs inside
`If(alive)` (else: h passes through, zero K/V rows), `alive &= !exit_j` after each exit point, and
the outputs are selected with `Where`. Nesting depth 2 whatever the number of exit points, the same
2 Ifs per exit point, the same results. TensorRT needs it: it refuses If nesting deeper than 24 and
builds deep nests very slowly (see `backends/tensorrt.py`).

How the graph is made. The math comes from the one definition in `model_step` / `ops` (layer,
head, `exit_score_reference`), exported with `torch.onnx.export(dynamo=True)` as a handful of small
*blocks* whose weights are inputs (prologue, one decoder layer, exit score, verification head,
epilogue). The decode graph is then assembled here: each block is inlined once per use with the
layer's weights bound, and the nested Ifs are written directly. This costs the same few seconds for
any depth; the alternative (`torch.cond` around the whole step) exported in 7 s with no exit and
71 s with 5 exits on a 6-layer toy model (the decomposition re-traces every nesting level), i.e.
hours for a 30-layer model with an exit after every layer.

KV design (the cheaper one). The step takes the static caches *read only*, one input per layer
(`k_cache_{l}`, `v_cache_{l}` [Hkv, T, hd]: the slices k[l], v[l] of the runner's [L, Hkv, T, hd]
cache, which are contiguous, so binding them copies nothing; a single [L, ...] input would make the
graph Gather, i.e. copy, each layer's slice every step). It returns only this position's new rows
`k_new, v_new [L, Hkv, hd]`; rows of layers deeper than `exit_layer` are zeros and must not be
written. The runner scatters rows 0..exit_layer to position `position`. Returning whole updated
caches would copy L*Hkv*T*hd elements per step (ONNX has no in-place update). Attention reads the
cache without writing it: the cached keys (masked by `valid & t < position`) and the row's own key are
scored side by side under one softmax. `valid_out` ([L, T] bool, cheap) is the updated validity.

The cache length T is a dynamic axis: the runner allocates T in buckets of 64 (the eager backend's
attended prefix) and grows the cache when the position crosses a bucket, so attention costs
O(current length), not O(max context).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Settings, torch_dtype
from ..errors import BackendUnavailable, SpecEEError
from ..model_step import (
    ModelWeights,
    StepSpec,
    _rotate_half,
    extract_weights,
    make_head_fn,
    make_layer_parts,
    rms_norm,
)
from ..ops import exit_score_reference
from ..program import SpecEEProgram

FORMAT = "specee-onnx"
FORMAT_VERSION = 1
OPSET = 18
CACHE_BUCKET = 64  # the runner's cache length grows in steps of this (dynamic axis T)
WEIGHTS_FILE = "weights.bin"
ALIGN = 4096  # external-data offsets aligned so ORT can map the file
DRAFT_EXTERNAL_BYTES = 1 << 30  # draft.onnx keeps its weights inline below this

PREFILL_INPUTS = ["input_ids"]
PREFILL_OUTPUTS = ["logits", "hidden_normed", "k_rows", "v_rows"]
DECODE_OUTPUTS = ["next_token", "exit_layer", "hidden_normed", "logits", "k_new", "v_new", "valid_out",
                  "head_calls"]
DRAFT_INPUTS = ["feats", "next_ids", "positions", "past_k", "past_v"]
DRAFT_OUTPUTS = ["candidates", "k_rows", "v_rows"]


def _at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for a 0-d int64 `idx` without a data-dependent index: torch.export of torch 2.11 cannot
    trace `x[idx]` there (GuardOnDataDependentSymNode, seen on the H200 machine); a Gather of one row can."""
    return x.index_select(0, idx.reshape(1)).squeeze(0)


def decode_inputs(num_layers: int) -> list[str]:
    """Input names of decode_step.onnx, in order."""
    kv = [f"k_cache_{i}" for i in range(num_layers)] + [f"v_cache_{i}" for i in range(num_layers)]
    return ["token", "position", *kv, "valid", "candidates", "active", "thresholds"]


# ------------------------------------------------------------------------------------------ math
def make_row_layer_fn(spec: StepSpec):
    """Return `layer(h, pos, c, s, past_k, past_v, past_ok, ln1, wqkv, bqkv, wo, ln2, wgu, wd)
    -> (h, k_rows, v_rows)`: `model_step.make_layer_fn` without writing the cache.

    The same math as `make_layer_fn` (same norms, fused projections, RoPE, GQA head grouping); the
    difference is where the row's own K/V go: instead of `index_copy_` into the cache and attending
    over the cache, the cached keys and the q new keys are scored side by side and softmaxed together.
    The exported step needs this: its cache inputs are read only (an in-graph cache update would copy
    the whole cache every step; the runner writes the new rows). `tests/test_onnx.py` checks it
    against `make_layer_fn`. (model_step could own this variant so there is one definition.)

    h [1, q, D]; pos [q]; c, s [q, hd] (cos/sin at pos); past_k, past_v [Hkv, T, hd] or None;
    past_ok [q, T] bool (cached positions each row may attend) or None; the q new rows attend
    causally among themselves (pos_j <= pos_i). Returns h [1, q, D], k_rows, v_rows [Hkv, q, hd].
    """
    H, Hkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rep = H // Hkv
    scale = hd**-0.5
    qkv, rope, out_mlp = make_layer_parts(spec)

    def layer(h, pos, c, s, past_k, past_v, past_ok, ln1, wqkv, bqkv, wo, ln2, wgu, wd):
        q_rows = h.shape[1]
        q, k, v = qkv(h, ln1, wqkv, bqkv)
        q, k = rope(q, k, c, s)
        # GQA without expanding the cache: query head j*rep + r reads kv head j
        qg = q.reshape(Hkv, rep * q_rows, hd) * scale  # [Hkv, rep q, hd]
        new_ok = pos[None, :] <= pos[:, None]  # [q, q]
        scores = torch.matmul(qg, k.transpose(1, 2)).float()  # [Hkv, rep q, q]
        oks = new_ok.repeat(rep, 1)  # [rep q, q]
        if past_k is not None:
            past = torch.matmul(qg, past_k.transpose(1, 2)).float()  # [Hkv, rep q, T]
            scores = torch.cat([past, scores], dim=-1)
            oks = torch.cat([past_ok.repeat(rep, 1), oks], dim=-1)
        scores = scores.masked_fill(~oks[None], float("-inf"))
        p = torch.softmax(scores, dim=-1).to(h.dtype)
        a = torch.matmul(p[..., -q_rows:], v)  # [Hkv, rep q, hd]
        if past_k is not None:
            a = a + torch.matmul(p[..., :-q_rows], past_v)
        a = a.reshape(H, q_rows, hd).transpose(0, 1).reshape(1, q_rows, H * hd)
        return out_mlp(h, a, wo, ln2, wgu, wd), k, v

    return layer


class _Blocks:
    """The pieces of the step as small torch modules whose weights are inputs, one export each."""

    class Prologue(nn.Module):
        # token [1], position [1], valid [L, T], candidates [k], embed [V, D], cos/sin [Tmax, hd], head [V, D]
        # -> h [1, 1, D], c, s [1, hd], past_ok [L, T] (cached positions the row may attend), rows [k, D]
        def forward(self, token, position, valid, candidates, embed, cos, sin, head):
            T = valid.shape[1]
            past_ok = valid & (torch.arange(T) < position)[None, :]
            return embed[token][None], cos[position], sin[position], past_ok, head[candidates]

    class StepLayer(nn.Module):
        # h [1, 1, D], c, s [1, hd], k_cache, v_cache [Hkv, T, hd], past_ok [1, T], layer weights
        # -> h [1, 1, D], k_row, v_row [1, Hkv, hd]
        def __init__(self, spec):
            super().__init__()
            self.layer = make_row_layer_fn(spec)

        def forward(self, h, c, s, k_cache, v_cache, past_ok, ln1, wqkv, wo, ln2, wgu, wd, bqkv=None):
            pos = torch.zeros(1, dtype=torch.int64)  # one row: the mask among new rows is [[True]]
            h, k, v = self.layer(h, pos, c, s, k_cache, v_cache, past_ok, ln1, wqkv, bqkv, wo, ln2, wgu, wd)
            return h, k.transpose(0, 1), v.transpose(0, 1)

    class ExitScore(nn.Module):
        # the predictor at exit layer idx: propose [] bool = active[idx] & score > thresholds[idx];
        # p_prev advances only where the predictor ran; n_head counts proposals (verification heads)
        def __init__(self, eps):
            super().__init__()
            self.eps = eps

        def forward(self, h, norm, rows, p_prev, w1, b1, w2, b2, active, thresholds, idx, n_head):
            w1, b1, w2, b2 = (_at(x, idx) for x in (w1, b1, w2, b2))
            score, _z, p = exit_score_reference(h, norm, rows, p_prev, w1, b1, w2, b2, self.eps)
            on = _at(active, idx)
            propose = on & (score[0] > _at(thresholds, idx))
            return propose, torch.where(on, p, p_prev), n_head + propose.to(torch.int64)

    class ExitDecide(nn.Module):
        # ExitScore's decision part, for the plugin graph where the score comes from the plugin node
        def forward(self, score, p, p_prev, active, thresholds, idx, n_head):
            on = _at(active, idx)
            propose = on & (score[0] > _at(thresholds, idx))
            return propose, torch.where(on, p, p_prev), n_head + propose.to(torch.int64)

    class Verify(nn.Module):
        # full head at this layer: tok [1] = argmax, hn [D], logits [V] float32, in_s [1] = tok in candidates
        def __init__(self, spec):
            super().__init__()
            self.head = make_head_fn(spec)

        def forward(self, h, norm, head, candidates):
            hn, logits = self.head(h, norm, head)
            logits = logits[0].float()  # [1, V]: TensorRT's ArgMax wants >= 2 dimensions
            tok = torch.argmax(logits, dim=-1)  # [1]
            return tok, hn[0, 0], logits[0], (candidates == tok).any().reshape(1)

    class Epilogue(nn.Module):
        # valid_out [L, T] = valid with position set in layers 0..exit_layer
        def forward(self, valid, exit_layer, position):
            L, T = valid.shape
            ran = torch.arange(L) <= exit_layer
            return valid | (ran[:, None] & (torch.arange(T) == position)[None, :])

    class PrefillPrologue(nn.Module):
        # input_ids [P] -> h [1, P, D], pos [P], c, s [P, hd]
        def forward(self, input_ids, embed, cos, sin):
            P = input_ids.shape[0]
            pos = torch.arange(P)
            return embed[input_ids][None], pos, cos[:P], sin[:P]

    class PrefillLayer(nn.Module):
        # P rows, causal among themselves, no cache -> h, k_rows, v_rows [1, Hkv, P, hd]
        def __init__(self, spec):
            super().__init__()
            self.layer = make_row_layer_fn(spec)

        def forward(self, h, pos, c, s, ln1, wqkv, wo, ln2, wgu, wd, bqkv=None):
            h, k, v = self.layer(h, pos, c, s, None, None, None, ln1, wqkv, bqkv, wo, ln2, wgu, wd)
            return h, k[None], v[None]

    class PrefillHead(nn.Module):
        # -> logits [V] float32 of the last row, hidden_normed [P, D] (every row, for the draft)
        def __init__(self, eps):
            super().__init__()
            self.eps = eps

        def forward(self, h, norm, head):
            hn = rms_norm(h, norm, self.eps)[0]
            return F.linear(hn[-1:], head)[0].float(), hn


class DraftStep(nn.Module):
    """The EAGLE draft over T new (feature, next token) pairs with C cached draft positions.

    feats [T, D] (f_t), next_ids [T] int64 (x_{t+1}), positions [T] int64 (t = C..C+T-1),
    past_k, past_v [n_layers, Hkv, C, hd] (C may be 0) -> candidates [k] int64 (top-k of the last
    row, as base-vocabulary ids), k_rows, v_rows [n_layers, Hkv, T, hd] (the runner appends them).
    Same math as `draft.eagle.EagleDraft.forward` + `logits` + top-k; written without the C == 0 / T == 1
    special cases so one graph serves every call.
    """

    def __init__(self, draft, max_len: int, k: int):
        super().__init__()
        self.draft = draft
        self.k = min(int(k), int(draft.vocab_ids.numel()))
        dev = draft.fc.weight.device
        probe = torch.zeros(1, device=dev, dtype=draft.dtype)
        cos, sin = draft.rotary(probe, torch.arange(max_len, device=dev)[None])
        self.register_buffer("cos", cos[0].to(draft.dtype).contiguous())
        self.register_buffer("sin", sin[0].to(draft.dtype).contiguous())

    def forward(self, feats, next_ids, positions, past_k, past_v):
        d = self.draft
        T = feats.shape[0]
        C = past_k.shape[2]
        emb = F.embedding(next_ids, d.embed_weight).to(d.dtype)
        x = d.fc(torch.cat([emb, feats.to(d.dtype)], dim=-1))[None]  # [1, T, D]
        c, s = self.cos[positions], self.sin[positions]  # [T, hd]
        i = torch.arange(T)[:, None]
        jj = torch.arange(C + T)[None, :]
        mask = jj <= C + i  # [T, C + T]
        ks, vs = [], []
        for li, layer in enumerate(d.layers):
            a = layer.self_attn
            hin = layer.input_layernorm(x) if hasattr(layer, "input_layernorm") else x
            q = a.q_proj(hin).view(T, a.num_heads, a.head_dim).transpose(0, 1)  # [H, T, hd]
            k = a.k_proj(hin).view(T, a.num_kv_heads, a.head_dim).transpose(0, 1)  # [Hkv, T, hd]
            v = a.v_proj(hin).view(T, a.num_kv_heads, a.head_dim).transpose(0, 1)
            q = q * c + _rotate_half(q) * s
            k = k * c + _rotate_half(k) * s
            ks.append(k)
            vs.append(v)
            kk = torch.cat([past_k[li], k], dim=1)  # [Hkv, C + T, hd]
            vv = torch.cat([past_v[li], v], dim=1)
            rep = a.num_heads // a.num_kv_heads
            if rep > 1:
                kk = kk.repeat_interleave(rep, dim=0)
                vv = vv.repeat_interleave(rep, dim=0)
            o = F.scaled_dot_product_attention(q[None], kk[None], vv[None], attn_mask=mask[None, None])
            o = o[0].transpose(0, 1).reshape(1, T, a.num_heads * a.head_dim)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = d.logits(x[0, -1:])  # [1, Vr] (TensorRT's TopK wants >= 2 dimensions)
        top = torch.topk(logits, self.k, dim=-1).indices[0]
        return d.vocab_ids[top], torch.stack(ks), torch.stack(vs)


# ------------------------------------------------------------------------------------------ streaming
class SafetensorsWeights:
    """A model directory's *.safetensors read lazily, one tensor at a time, with plain reads (the
    header is parsed here; `os.pread` copies one tensor's bytes into a fresh buffer). No file is
    memory-mapped, so pages already written out do not stay in the process's resident set: what keeps
    export memory bounded is that no tensor is read before it is written and none is kept after."""

    _DT: ClassVar[dict] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                           "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8}

    def __init__(self, directory):
        import os

        self.dir = Path(directory)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise SpecEEError(f"{self.dir} holds no *.safetensors")
        self.where: dict[str, tuple] = {}  # name -> (fd, dtype, shape, begin, end)
        self._fds = []
        for f in files:
            fd = os.open(str(f), os.O_RDONLY)
            self._fds.append(fd)
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in self._DT:
                    raise SpecEEError(f"{f}: tensor {name} has dtype {info['dtype']}, which the export does not read")
                b, e = info["data_offsets"]
                self.where[name] = (fd, self._DT[info["dtype"]], tuple(info["shape"]), 8 + n + b, 8 + n + e)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import os

        fd, dt, shape, b, e = self.where[name]
        buf = bytearray(e - b)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(fd, [view[done:]], b + done)
            if got <= 0:
                raise SpecEEError(f"{self.dir}: truncated safetensors file (tensor {name})")
            done += got
        t = torch.frombuffer(buf, dtype=dt).reshape(shape) if buf else torch.empty(shape, dtype=dt)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point tensors (its first one)."""
        for _fd, dt, *_ in self.where.values():
            if dt.is_floating_point:
                return dt
        return torch.float32


class _LazyState(dict):
    """state_dict stand-in for `model_fingerprint`: each tensor read (and cast like `load_model`)
    only when asked for, so the fingerprint never holds more than one tensor."""

    def __init__(self, names: list[str], read):
        super().__init__({n: None for n in names})
        self._read = read

    def __getitem__(self, name):
        return self._read(name)


class _FingerprintView:
    def __init__(self, config, state):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state


def _source_name(meta_model, name: str, weights: SafetensorsWeights) -> str:
    """The checkpoint tensor holding state_dict entry `name` (a tied LM head reads the embedding)."""
    if name in weights:
        return name
    if name == "lm_head.weight" and "model.embed_tokens.weight" in weights:
        return "model.embed_tokens.weight"
    raise SpecEEError(f"the checkpoint has no tensor {name!r}; is it a complete Hugging Face model directory?")


def stream_model(model_name: str, load_dtype: torch.dtype = torch.float32):
    """A `LoadedModel` whose weights stay on disk: for a local (or cached zoo) directory of
    *.safetensors, the HF module is built on the meta device and only the embedding, final norm and LM
    head are read (what an EAGLE draft shares with the model); the layers are read tensor by tensor
    while the export writes them (`export_onnx(weights_from=...)`). The fingerprint is computed the
    same way, one tensor at a time, and equals `load_model(model_name, load_dtype)`'s.
    Returns None for other sources (GGUF, hub ids): those load whole (`models.load_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..model_step import step_spec
    from ..models import LoadedModel, model_fingerprint
    from ..models.loader import _locate

    src = _locate(str(model_name))
    d = Path(src.location)
    if src.kind != "dir" or not any(d.glob("*.safetensors")):
        return None
    config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    step_spec(config, 1)  # Llama family, or UnsupportedArchitecture
    weights = SafetensorsWeights(d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inner = model.model
    with torch.device("cpu"):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)  # inv_freq is computed, not stored
    state_names = list(model.state_dict().keys())

    def param(name):
        return torch.nn.Parameter(weights.get(_source_name(model, name, weights), load_dtype), requires_grad=False)

    inner.embed_tokens.weight = param("model.embed_tokens.weight")
    inner.norm.weight = param("model.norm.weight")
    tied = "lm_head.weight" not in weights
    model.lm_head.weight = inner.embed_tokens.weight if tied else param("lm_head.weight")
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(d), local_files_only=True)
    model.eval()
    state = _LazyState(state_names, lambda n: weights.get(_source_name(model, n, weights), load_dtype))
    fingerprint = model_fingerprint(_FingerprintView(model.config, state))
    tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if tokenizer.pad_token_id is None:
        eos = model.generation_config.eos_token_id
        model.generation_config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=src.name, config=model.config, fingerprint=fingerprint)
    loaded.weights = weights  # read by export_onnx(weights_from=...)
    loaded.checkpoint_dtype = weights.dtype()
    return loaded


def own_dtype(loaded) -> str:
    """The model's own dtype, the export's default: the checkpoint's (streamed), else its config's."""
    dt = getattr(loaded, "checkpoint_dtype", None) or getattr(loaded.config, "dtype", None) \
        or getattr(loaded.config, "torch_dtype", None)
    name = str(dt).replace("torch.", "") if dt is not None else "float32"
    return name if name in ("float32", "float16", "bfloat16") else "float32"


class _LazyLayers:
    """model_step.LayerWeights of layer i, read from the checkpoint on demand (q/k/v and gate/up fused
    as `extract_weights` fuses them), cast to the export dtype. Only layer 0 is kept (block examples)."""

    def __init__(self, weights: SafetensorsWeights, num_layers: int, dtype: torch.dtype):
        self.w, self.n, self.dtype = weights, num_layers, dtype
        self._first = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def __getitem__(self, i: int):
        from ..model_step import LayerWeights

        if i == 0 and self._first is not None:
            return self._first
        p, g, dt = f"model.layers.{i}.", self.w.get, self.dtype
        a, m = p + "self_attn.", p + "mlp."
        bias = a + "q_proj.bias" in self.w
        lw = LayerWeights(
            ln1=g(p + "input_layernorm.weight", dt),
            wqkv=torch.cat([g(a + f"{x}_proj.weight", dt) for x in "qkv"], 0),
            bqkv=torch.cat([g(a + f"{x}_proj.bias", dt) for x in "qkv"], 0) if bias else None,
            wo=g(a + "o_proj.weight", dt),
            ln2=g(p + "post_attention_layernorm.weight", dt),
            wgu=torch.cat([g(m + "gate_proj.weight", dt), g(m + "up_proj.weight", dt)], 0),
            wd=g(m + "down_proj.weight", dt),
        )
        if i == 0:
            self._first = lw
        return lw


def _streamed_weights(model, weights: SafetensorsWeights, max_len: int, dtype: torch.dtype) -> ModelWeights:
    """ModelWeights with the layers read lazily (`_LazyLayers`); embedding, norm and head are the
    model's (already read by `stream_model`), cast to the export dtype."""
    from ..model_step import step_spec

    inner = model.model
    spec = step_spec(model.config, max_len)
    positions = torch.arange(max_len)[None]
    cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dtype), positions)
    embed = inner.embed_tokens.weight.detach().to(dtype)
    head = model.lm_head.weight.detach()
    head = embed if head is inner.embed_tokens.weight else head.to(dtype)  # tied: stored once
    return ModelWeights(spec=spec, embed=embed, layers=_LazyLayers(weights, spec.num_layers, dtype),
                        norm=inner.norm.weight.detach().to(dtype), head=head,
                        cos=cos[0].to(dtype).contiguous(), sin=sin[0].to(dtype).contiguous())


# ------------------------------------------------------------------------------------------ assembly
def _check_deps():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            f"ONNX export needs onnx and onnxscript ({e}); install them with `pip install 'specee-compile[onnx]'`"
        ) from None


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[specee export] {msg}", file=sys.stderr, flush=True)


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
            torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64,
            torch.bool: TensorProto.BOOL}[dtype]


def _torch_export(module, args, input_names, output_names, dynamic_shapes=None, what="block"):
    """torch.onnx.export (dynamo) without its console chatter; failures become SpecEEError."""
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter (axis renames, deprecations), not ours to fix
            return torch.onnx.export(
                module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, verbose=False, optimize=True,
            )
    except Exception as e:
        raise SpecEEError(
            f"ONNX export of the {what} failed: {type(e).__name__}: {str(e)[:2000]}\n"
            f"(exporter output: {sink.getvalue()[-2000:]})"
        ) from e
    finally:
        quiet.setLevel(level)


class _WeightFile:
    """Writes tensors once into one external-data file; returns TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115  # closed by close(), after the last tensor
        self.offset = 0
        self.protos: dict[str, object] = {}
        self._seen: dict[tuple, str] = {}

    def add(self, name: str, t: torch.Tensor) -> str:
        """Store `t` as `name`; a tensor already stored (same storage view: tied weights) keeps its name."""
        from onnx import TensorProto

        owner, t = t, t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        seen = self._seen.get(key)
        # the same memory is the same tensor only while the first one lives: streamed layers are freed
        # after writing, and the next layer's tensors may be allocated at the same address
        if seen is not None and seen[1]() is not None:
            return seen[0]
        raw = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()  # written as is: no bytes copy
        pad = -self.offset % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        self.f.write(memoryview(raw))
        tp = TensorProto()
        tp.name = name
        tp.data_type = _onnx_dtype(t.dtype)
        tp.dims.extend(t.shape)
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        self.offset += len(raw)
        self.protos[name] = tp
        self._seen[key] = (name, weakref.ref(owner))
        return name

    def close(self) -> None:
        self.f.close()


class _Builder:
    """Inlines exported blocks into one graph (and nested If branches) with unique value names."""

    def __init__(self, blocks: dict):
        self.blocks = blocks  # name -> GraphProto
        self.consts: dict[str, object] = {}  # small initializers: block constants and glue constants
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}__{self._n}"

    def const(self, name: str, value) -> str:
        import numpy as np
        from onnx import numpy_helper

        if name not in self.consts:
            self.consts[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def op(self, nodes: list, op_type: str, inputs: list[str], outputs: list[str] | None = None, n_out: int = 1,
           **attrs) -> list[str]:
        from onnx import helper

        outputs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), **attrs))
        return outputs

    def call(self, nodes: list, block: str, inputs: list[str], outputs: list[str] | None = None) -> list[str]:
        """Inline block `block` with its inputs bound to `inputs`; returns its output names."""
        from onnx import AttributeProto, NodeProto

        g = self.blocks[block]
        if len(inputs) != len(g.input):
            raise SpecEEError(f"internal: block {block} takes {len(g.input)} inputs, got {len(inputs)}")
        tag = self.fresh(block)
        m = {gi.name: a for gi, a in zip(g.input, inputs)}
        for init in g.initializer:
            name = f"{block}.{init.name}"
            if name not in self.consts:
                from onnx import TensorProto

                t = TensorProto()
                t.CopyFrom(init)
                t.name = name
                self.consts[name] = t
            m[init.name] = name
        outs = list(outputs) if outputs else [f"{tag}.{o.name}" for o in g.output]
        passthrough = []
        produced = {o for node in g.node for o in node.output}
        for o, n in zip(g.output, outs):
            if o.name in produced:
                m[o.name] = n
            else:  # the block returns one of its inputs or a constant
                passthrough.append((o.name, n))
        for node in g.node:
            if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                raise SpecEEError(f"internal: block {block} has a subgraph node ({node.op_type})")
            new = NodeProto()
            new.CopyFrom(node)
            new.name = f"{tag}/{node.name}"
            del new.input[:]
            new.input.extend(m[x] if x else "" for x in node.input)
            for x in node.output:
                if x and x not in m:
                    m[x] = f"{tag}.{x}"
            del new.output[:]
            new.output.extend(m[x] if x else "" for x in node.output)
            nodes.append(new)
        for src, dst in passthrough:
            self.op(nodes, "Identity", [m[src]], [dst])
        return outs


def _softmax_rank2(graph) -> int:
    """Run every Softmax on at least two dimensions: TensorRT(-RTX) rejects 1-D Softmax, and the exit op
    softmaxes the k candidate logits [k]. Unsqueeze(0) -> Softmax -> Squeeze(0), same numbers.
    Returns how many nodes were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    axes = "softmax_rank2.axes0"
    if not any(i.name == axes for i in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    new_nodes, n = [], 0
    for node in graph.node:
        if node.op_type != "Softmax":
            new_nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        x, y = node.input[0], node.output[0]
        x2, y2 = f"{x}.rank2", f"{y}.rank2"
        new_nodes.append(helper.make_node("Unsqueeze", [x, axes], [x2], name=f"{node.name}.unsqueeze"))
        new_nodes.append(helper.make_node("Softmax", [x2], [y2], name=node.name, axis=axis if axis < 0 else axis + 1))
        new_nodes.append(helper.make_node("Squeeze", [y2, axes], [y], name=f"{node.name}.squeeze"))
        n += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return n


def _vi(name: str, elem: int, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _used(graph) -> set[str]:
    from onnx import AttributeProto

    names = set()
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                names |= _used(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    names |= _used(g)
    return names


def _finish(graph_nodes, name, inputs, outputs, b: _Builder, wf: _WeightFile, meta: dict, path: Path,
            extra_opsets: dict | None = None):
    import onnx
    from onnx import helper

    graph = helper.make_graph(graph_nodes, name, inputs, outputs)
    used = _used(graph)
    graph.initializer.extend(t for n, t in wf.protos.items() if n in used)
    graph.initializer.extend(t for n, t in b.consts.items() if n in used)
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="specee-compile")
    model.ir_version = 9
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, (v if isinstance(v, str) else json.dumps(v))
    onnx.save_model(model, str(path))
    return model


class _Exporter:
    """Exports the blocks of one model and assembles prefill.onnx / decode_step.onnx from them."""

    def __init__(self, weights: ModelWeights, program: SpecEEProgram | None, k: int, out: Path, progress: bool):
        self.w, self.spec, self.program, self.k, self.out, self.progress = weights, weights.spec, program, k, out, progress
        spec = self.spec
        L = spec.num_layers
        self.exit_layers = sorted({ep.layer for ep in program.exit_points if ep.layer < L - 1}) if program else []
        self.dtype = weights.embed.dtype
        self.dt = _onnx_dtype(self.dtype)
        self.has_bias = weights.layers[0].bqkv is not None
        wf = self.wf = _WeightFile(out / WEIGHTS_FILE)
        self.names = {n: wf.add(n, getattr(weights, n)) for n in ("embed", "norm", "head", "cos", "sin")}
        self.layer_names = []
        for i in range(len(weights.layers)):  # one layer in memory at a time when the layers stream
            lw = weights.layers[i]
            names = {}
            for n, t in zip(("ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd"), lw.as_tuple()):
                if t is not None:
                    names[n] = wf.add(f"layers.{i}.{n}", t)
            self.layer_names.append(names)
        if self.exit_layers:
            P = program.predictors
            self.pred = [wf.add(f"predictor.{n}", t.float()) for n, t in
                         (("w1", P.w1), ("b1", P.b1), ("w2", P.w2), ("b2", P.b2.reshape(L, -1)))]
        wf.close()

    def _layer_inputs(self, i: int) -> list[str]:
        n = self.layer_names[i]
        return [n["ln1"], n["wqkv"], n["wo"], n["ln2"], n["wgu"], n["wd"]] + ([n["bqkv"]] if self.has_bias else [])

    def _layer_examples(self, i: int = 0) -> tuple:
        lw = self.w.layers[i]
        return (lw.ln1, lw.wqkv, lw.wo, lw.ln2, lw.wgu, lw.wd) + ((lw.bqkv,) if self.has_bias else ())

    def _layer_weight_names(self) -> list[str]:
        return ["ln1", "wqkv", "wo", "ln2", "wgu", "wd"] + (["bqkv"] if self.has_bias else [])

    def _block(self, module, args, inputs, outputs, dyn=None):
        # example inputs must not alias one another (torch.export would merge them into one input)
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        t0 = time.perf_counter()
        g = _torch_export(module, args, inputs, outputs, dyn, what=type(module).__name__).model_proto.graph
        _softmax_rank2(g)
        _log(self.progress, f"  block {type(module).__name__}: {len(g.node)} nodes, {time.perf_counter() - t0:.1f} s")
        return g

    # ---- prefill.onnx
    def prefill(self, meta: dict) -> str:
        spec, w, Bk = self.spec, self.w, _Blocks
        L, Hkv, hd, D, V = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden, spec.vocab
        Pd = torch.export.Dim("P", min=1, max=spec.max_len)
        Pe = 5
        ids = torch.arange(Pe) % V
        h = torch.zeros(1, Pe, D, dtype=self.dtype)
        pos = torch.arange(Pe)
        c = w.cos[:Pe]
        nw = len(self._layer_examples())
        blocks = {
            "prefill_prologue": self._block(Bk.PrefillPrologue(), (ids, w.embed, w.cos, w.sin),
                                            ["input_ids", "embed", "cos", "sin"], ["h", "pos", "c", "s"],
                                            ({0: Pd}, None, None, None)),
            "prefill_layer": self._block(Bk.PrefillLayer(spec), (h, pos, c, c, *self._layer_examples()),
                                         ["h", "pos", "c", "s", *self._layer_weight_names()], ["h_out", "k", "v"],
                                         ({1: Pd}, {0: Pd}, {0: Pd}, {0: Pd}, *([None] * nw))),
            "prefill_head": self._block(Bk.PrefillHead(spec.eps), (h, w.norm, w.head), ["h", "norm", "head"],
                                        ["logits", "hidden_normed"], ({1: Pd}, None, None)),
        }
        b = _Builder(blocks)
        n = self.names
        nodes: list = []
        h, pos, c, s = b.call(nodes, "prefill_prologue", ["input_ids", n["embed"], n["cos"], n["sin"]])
        ks, vs = [], []
        for i in range(L):
            h, k, v = b.call(nodes, "prefill_layer", [h, pos, c, s, *self._layer_inputs(i)])
            ks.append(k)
            vs.append(v)
        b.call(nodes, "prefill_head", [h, n["norm"], n["head"]], ["logits", "hidden_normed"])
        b.op(nodes, "Concat", ks, ["k_rows"], axis=0)
        b.op(nodes, "Concat", vs, ["v_rows"], axis=0)
        from onnx import TensorProto as TP

        inputs = [_vi("input_ids", TP.INT64, ["P"])]
        outputs = [_vi("logits", TP.FLOAT, [V]), _vi("hidden_normed", self.dt, ["P", D]),
                   _vi("k_rows", self.dt, [L, Hkv, "P", hd]), _vi("v_rows", self.dt, [L, Hkv, "P", hd])]
        _finish(nodes, "specee_prefill", inputs, outputs, b, self.wf, {**meta, "graph": "prefill"},
                self.out / "prefill.onnx")
        return "prefill.onnx"

    # ---- decode_step.onnx
    def decode(self, meta: dict, plugin: bool = False, structure: str = "nested") -> str:
        """decode_step.onnx; plugin=True: decode_step.plugin.onnx, the exit score as one
        `specee::exit_score` TensorRT plugin node per exit point (TensorRT only).
        structure: "nested" (exit If's else-branch holds the rest) or "flat" (see `export_onnx`)."""
        from onnx import TensorProto as TP
        from onnx import helper

        spec, w, Bk, k = self.spec, self.w, _Blocks, self.k
        L, Hkv, hd, D, V = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden, spec.vocab
        Td = torch.export.Dim("T", min=1, max=spec.max_len)
        Te = min(spec.max_len, CACHE_BUCKET)
        tok, posn = torch.tensor([3]), torch.tensor([2])
        valid = torch.zeros(L, Te, dtype=torch.bool)
        cands = torch.arange(k) % V
        h = torch.zeros(1, 1, D, dtype=self.dtype)
        c = w.cos[:1]
        kc = torch.zeros(Hkv, Te, hd, dtype=self.dtype)
        nw = len(self._layer_examples())
        blocks = {
            "prologue": self._block(Bk.Prologue(), (tok, posn, valid, cands, w.embed, w.cos, w.sin, w.head),
                                    ["token", "position", "valid", "candidates", "embed", "cos", "sin", "head"],
                                    ["h", "c", "s", "past_ok", "rows"],
                                    (None, None, {1: Td}, None, None, None, None, None)),
            "layer": self._block(Bk.StepLayer(spec), (h, c, c, kc, kc, valid[:1], *self._layer_examples()),
                                 ["h", "c", "s", "k_cache", "v_cache", "past_ok", *self._layer_weight_names()],
                                 ["h_out", "k_row", "v_row"],
                                 (None, None, None, {1: Td}, {1: Td}, {1: Td}, *([None] * nw))),
            "verify": self._block(Bk.Verify(spec), (h, w.norm, w.head, cands), ["h", "norm", "head", "candidates"],
                                  ["tok", "hn", "logits", "in_s"]),
            "epilogue": self._block(Bk.Epilogue(), (valid, torch.tensor([1]), posn),
                                    ["valid", "exit_layer", "position"], ["valid_out"], ({1: Td}, None, None)),
        }
        if self.exit_layers and plugin:
            blocks["exit_decide"] = self._block(
                Bk.ExitDecide(), (torch.zeros(1), torch.zeros(k), torch.zeros(k), torch.zeros(L, dtype=torch.bool),
                                  torch.zeros(L), torch.tensor(0), torch.zeros(1, dtype=torch.int64)),
                ["score", "p", "p_prev", "active", "thresholds", "idx", "n_head"], ["propose", "p_next", "n_head_out"])
        elif self.exit_layers:
            P = self.program.predictors
            blocks["exit_score"] = self._block(
                Bk.ExitScore(spec.eps),
                (h, w.norm, w.head[:k], torch.zeros(k), P.w1.float(), P.b1.float(), P.w2.float(),
                 P.b2.float().reshape(L, -1), torch.zeros(L, dtype=torch.bool), torch.zeros(L), torch.tensor(0),
                 torch.zeros(1, dtype=torch.int64)),
                ["h", "norm", "rows", "p_prev", "w1", "b1", "w2", "b2", "active", "thresholds", "idx", "n_head"],
                ["propose", "p_next", "n_head_out"])
        b = _Builder(blocks)
        n = self.names
        nodes: list = []
        h, c, s, past_ok, rows = b.call(nodes, "prologue", ["token", "position", "valid", "candidates", n["embed"],
                                                            n["cos"], n["sin"], n["head"]])
        import numpy as np

        p0 = b.const("p_prev0", np.zeros(k, np.float32))
        n0 = b.const("head_calls0", np.zeros(1, np.int64))
        bounds = [0] + [e + 1 for e in self.exit_layers] + [L]
        out_types = [(TP.INT64, [1]), (TP.INT64, [1]), (self.dt, [D]), (TP.FLOAT, [V]), (self.dt, [L, Hkv, hd]),
                     (self.dt, [L, Hkv, hd]), (TP.INT64, [1])]
        def run_layers(nodes, j, h):
            """Layers of segment j -> (h, [k_row], [v_row]) (each row [1, Hkv, hd])."""
            krows, vrows = [], []
            for i in range(bounds[j], bounds[j + 1]):
                ok = b.op(nodes, "Gather", [past_ok, b.const(f"layer_idx_{i}", np.array([i], np.int64))], axis=0)[0]
                h, kr, vr = b.call(nodes, "layer", [h, c, s, f"k_cache_{i}", f"v_cache_{i}", ok, *self._layer_inputs(i)])
                krows.append(kr)
                vrows.append(vr)
            return h, krows, vrows

        def zeros(nodes, shape, elem=None):
            name = "shape_" + "x".join(map(str, shape))
            value = helper.make_tensor("value", elem if elem is not None else self.dt, [1],
                                       [0.0] if elem == TP.FLOAT else [0])
            return b.op(nodes, "ConstantOfShape", [b.const(name, np.array(shape, np.int64))], value=value)[0]

        def exit_point(nodes, i, h, p_prev, n_head):
            """Predictor + verification If after layer i -> (do_exit, tok, hn, logits, p_next, n_next)."""
            idx = b.const(f"exit_idx_{i}", np.array(i, np.int64))
            if plugin:
                mlp = [b.op(nodes, "Gather", [w_, idx], axis=0)[0] for w_ in self.pred]
                score, _z, p_new = b.op(nodes, "exit_score", [h, n["norm"], rows, p_prev, *mlp], n_out=3,
                                        domain="specee", plugin_namespace="specee", plugin_version="1", aot=1,
                                        eps=float(spec.eps))
                propose, p_next, n_next = b.call(nodes, "exit_decide", [score, p_new, p_prev, "active", "thresholds",
                                                                        idx, n_head])
            else:
                propose, p_next, n_next = b.call(nodes, "exit_score", [h, n["norm"], rows, p_prev, *self.pred,
                                                                       "active", "thresholds", idx, n_head])
            # verification If: the full head runs only when the predictor proposes an exit
            then_v: list = []
            vt = b.call(then_v, "verify", [h, n["norm"], n["head"], "candidates"])
            else_v: list = []
            ve = [b.op(else_v, "Identity", [b.const("zero_tok", np.zeros(1, np.int64))])[0], zeros(else_v, [D]),
                  zeros(else_v, [V], TP.FLOAT), b.op(else_v, "Identity", [b.const("false1", np.zeros(1, bool))])[0]]
            vtypes = [(TP.INT64, [1]), (self.dt, [D]), (TP.FLOAT, [V]), (TP.BOOL, [1])]
            v_out = [b.fresh(x) for x in ("verify_tok", "verify_hn", "verify_logits", "verify_in_s")]
            nodes.append(helper.make_node(
                "If", [propose], v_out, name=b.fresh(f"verify_if_{i}"),
                then_branch=helper.make_graph(then_v, f"verify_{i}", [], [_vi(x, *t) for x, t in zip(vt, vtypes)]),
                else_branch=helper.make_graph(else_v, f"no_verify_{i}", [], [_vi(x, *t) for x, t in zip(ve, vtypes)]),
            ))
            do_exit = b.op(nodes, "And", [propose, v_out[3]])[0]
            return do_exit, v_out[0], v_out[1], v_out[2], p_next, n_next

        def pad(nodes, rows_):
            if len(rows_) == L:
                return b.op(nodes, "Concat", rows_, axis=0)[0]
            return b.op(nodes, "Concat", [*rows_, zeros(nodes, [L - len(rows_), Hkv, hd])], axis=0)[0]

        def segment(j, nodes, h, p_prev, n_head, krows, vrows, outs):
            """Nested form: emit segment j and everything after it into `nodes`; results named `outs`."""
            h, kr, vr = run_layers(nodes, j, h)
            krows, vrows = krows + kr, vrows + vr
            if j == len(bounds) - 2:  # the last segment: full depth
                t, hn, logits, _ = b.call(nodes, "verify", [h, n["norm"], n["head"], "candidates"])
                b.op(nodes, "Identity", [t], [outs[0]])
                b.op(nodes, "Identity", [b.const("exit_full", np.array([L - 1], np.int64))], [outs[1]])
                b.op(nodes, "Identity", [hn], [outs[2]])
                b.op(nodes, "Identity", [logits], [outs[3]])
                b.op(nodes, "Concat", krows, [outs[4]], axis=0)
                b.op(nodes, "Concat", vrows, [outs[5]], axis=0)
                b.op(nodes, "Identity", [n_head], [outs[6]])
                return
            i = bounds[j + 1] - 1
            do_exit, vtok, vhn, vlogits, p_next, n_next = exit_point(nodes, i, h, p_prev, n_head)
            # exit If: then = emit the verified token; else = every deeper layer
            then_e: list = []
            te = [b.op(then_e, "Identity", [vtok])[0],
                  b.op(then_e, "Identity", [b.const(f"exit_{i}", np.array([i], np.int64))])[0],
                  b.op(then_e, "Identity", [vhn])[0],
                  b.op(then_e, "Identity", [vlogits])[0],
                  pad(then_e, krows), pad(then_e, vrows),
                  b.op(then_e, "Identity", [n_next])[0]]
            else_e: list = []
            ee = [b.fresh(x) for x in ("tok", "exit", "hn", "logits", "k_new", "v_new", "heads")]
            segment(j + 1, else_e, h, p_next, n_next, krows, vrows, ee)
            nodes.append(helper.make_node(
                "If", [do_exit], outs, name=b.fresh(f"exit_if_{i}"),
                then_branch=helper.make_graph(then_e, f"exit_{i}", [], [_vi(x, *t) for x, t in zip(te, out_types)]),
                else_branch=helper.make_graph(else_e, f"continue_{i}", [],
                                              [_vi(x, *t) for x, t in zip(ee, out_types)]),
            ))

        def flat(outs):
            """Flat form: one `If(alive)` per segment after the first, in sequence (nesting depth 2: the
            verification If inside). A segment's else-branch passes h through and returns zero rows."""
            nseg = len(bounds) - 1
            alive = None  # None: still alive for sure (before the first exit point)
            acc = {"tok": b.const("zero_tok", np.zeros(1, np.int64)), "hn": zeros(nodes, [D]),
                   "logits": zeros(nodes, [V], TP.FLOAT)}
            exit_acc = b.const("exit_full", np.array([L - 1], np.int64))
            ks, vs = [], []
            h_cur, p_cur, n_cur = h, p0, n0
            for j in range(nseg):
                last = j == nseg - 1
                nrows = bounds[j + 1] - bounds[j]

                def body(nodes_, j=j, last=last, h_in=h_cur, p_in=p_cur, n_in=n_cur):
                    hh, kr, vr = run_layers(nodes_, j, h_in)
                    kc = b.op(nodes_, "Concat", kr, axis=0)[0]
                    vc = b.op(nodes_, "Concat", vr, axis=0)[0]
                    if last:
                        t, hn, lg, _ = b.call(nodes_, "verify", [hh, n["norm"], n["head"], "candidates"])
                        return [kc, vc, t, hn, lg]
                    d, t, hn, lg, p_n, n_n = exit_point(nodes_, bounds[j + 1] - 1, hh, p_in, n_in)
                    return [kc, vc, t, hn, lg, d, hh, p_n, n_n]

                types = [(self.dt, [nrows, Hkv, hd])] * 2 + [(TP.INT64, [1]), (self.dt, [D]), (TP.FLOAT, [V])]
                if not last:
                    types += [(TP.BOOL, [1]), (self.dt, [1, 1, D]), (TP.FLOAT, [k]), (TP.INT64, [1])]
                if alive is None:
                    out = body(nodes)
                else:
                    then_s: list = []
                    t_out = body(then_s)
                    else_s: list = []
                    e_out = [zeros(else_s, [nrows, Hkv, hd]), zeros(else_s, [nrows, Hkv, hd]),
                             b.op(else_s, "Identity", [acc["tok"]])[0], zeros(else_s, [D]),
                             zeros(else_s, [V], TP.FLOAT)]
                    if not last:
                        e_out += [b.op(else_s, "Identity", [b.const("false1", np.zeros(1, bool))])[0],
                                  b.op(else_s, "Identity", [h_cur])[0], b.op(else_s, "Identity", [p_cur])[0],
                                  b.op(else_s, "Identity", [n_cur])[0]]
                    out = [b.fresh(f"seg{j}_out") for _ in types]
                    nodes.append(helper.make_node(
                        "If", [alive], out, name=b.fresh(f"segment_if_{j}"),
                        then_branch=helper.make_graph(then_s, f"segment_{j}", [],
                                                      [_vi(x, *t) for x, t in zip(t_out, types)]),
                        else_branch=helper.make_graph(else_s, f"skip_segment_{j}", [],
                                                      [_vi(x, *t) for x, t in zip(e_out, types)]),
                    ))
                ks.append(out[0])
                vs.append(out[1])
                if last:
                    take = alive  # full depth happened iff still alive here
                    layer = b.const("exit_full", np.array([L - 1], np.int64))
                else:
                    d = out[5]
                    take = d if alive is None else b.op(nodes, "And", [alive, d])[0]
                    layer = b.const(f"exit_{bounds[j + 1] - 1}", np.array([bounds[j + 1] - 1], np.int64))
                if take is None:  # no exit point at all: the only segment ran
                    acc = {"tok": out[2], "hn": out[3], "logits": out[4]}
                    exit_acc = layer
                else:
                    for key, val in zip(("tok", "hn", "logits"), out[2:5]):
                        acc[key] = b.op(nodes, "Where", [take, val, acc[key]])[0]
                    exit_acc = b.op(nodes, "Where", [take, layer, exit_acc])[0]
                if not last:
                    stay = b.op(nodes, "Not", [out[5]])[0]
                    alive = stay if alive is None else b.op(nodes, "And", [alive, stay])[0]
                    h_cur, p_cur, n_cur = out[6], out[7], out[8]
            for src, dst in zip((acc["tok"], exit_acc, acc["hn"], acc["logits"]), outs[:4]):
                b.op(nodes, "Identity", [src], [dst])
            b.op(nodes, "Concat", ks, [outs[4]], axis=0)
            b.op(nodes, "Concat", vs, [outs[5]], axis=0)
            b.op(nodes, "Identity", [n_cur], [outs[6]])

        final = ["next_token", "exit_layer", "hidden_normed", "logits", "k_new", "v_new", "head_calls"]
        if structure == "nested":
            segment(0, nodes, h, p0, n0, [], [], final)
        else:
            flat(final)
        b.call(nodes, "epilogue", ["valid", "exit_layer", "position"], ["valid_out"])

        inputs = [_vi("token", TP.INT64, [1]), _vi("position", TP.INT64, [1])]
        inputs += [_vi(f"{kv}_cache_{i}", self.dt, [Hkv, "T", hd]) for kv in "kv" for i in range(L)]
        inputs += [_vi("valid", TP.BOOL, [L, "T"]), _vi("candidates", TP.INT64, [k]), _vi("active", TP.BOOL, [L]),
                   _vi("thresholds", TP.FLOAT, [L])]
        outputs = [_vi(x, *t) for x, t in zip(final, out_types)]
        outputs.insert(6, _vi("valid_out", TP.BOOL, [L, "T"]))
        name = "decode_step.plugin.onnx" if plugin else "decode_step.onnx"
        _finish(nodes, "specee_decode_step", inputs, outputs, b, self.wf,
                {**meta, "graph": "decode_step", "exit_op": "trt_plugin" if plugin else "onnx_ops",
                 "structure": structure}, self.out / name,
                extra_opsets={"specee": 1} if plugin else None)
        return name


def _load_draft(model, program: SpecEEProgram | None, draft):
    """The EagleDraft to export, or None (the draft then runs in Python: ngram, shallow, or no state)."""
    if draft is not None:
        return getattr(draft, "draft", draft)  # an EagleSource or the EagleDraft itself
    if program is None or program.draft_kind != "eagle" or not program.draft_state:
        return None
    from ..draft.eagle import EagleDraft

    return EagleDraft.from_state_dict(model, program.draft_state, program.draft_config or None)


def io_spec(spec: StepSpec, k: int, exit_layers: list[int], draft=None, structure: str = "nested") -> dict:
    """Names, dtypes and shapes of every graph's inputs and outputs (for the manifest and README).
    "dtype" = the export dtype (settings.dtype); T = cache length (dynamic), P = prompt length."""
    L, Hkv, hd, D, V = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden, spec.vocab
    out = {
        "prefill.onnx": {
            "inputs": {"input_ids": ["int64", "[P]"]},
            "outputs": {"logits": ["float32", f"[{V}]"], "hidden_normed": ["dtype", f"[P,{D}]"],
                        "k_rows": ["dtype", f"[{L},{Hkv},P,{hd}]"], "v_rows": ["dtype", f"[{L},{Hkv},P,{hd}]"]},
        },
        "decode_step.onnx": {
            "inputs": {"token": ["int64", "[1]"], "position": ["int64", "[1]"],
                       f"k_cache_0..{L - 1}": ["dtype", f"[{Hkv},T,{hd}]"],
                       f"v_cache_0..{L - 1}": ["dtype", f"[{Hkv},T,{hd}]"],
                       "valid": ["bool", f"[{L},T]"], "candidates": ["int64", f"[{k}]"],
                       "active": ["bool", f"[{L}]"], "thresholds": ["float32", f"[{L}]"]},
            "outputs": {"next_token": ["int64", "[1]"], "exit_layer": ["int64", "[1]"],
                        "hidden_normed": ["dtype", f"[{D}]"], "logits": ["float32", f"[{V}]"],
                        "k_new": ["dtype", f"[{L},{Hkv},{hd}]"], "v_new": ["dtype", f"[{L},{Hkv},{hd}]"],
                        "valid_out": ["bool", f"[{L},T]"], "head_calls": ["int64", "[1]"]},
            "exit_layers": list(exit_layers),
            "structure": structure,
            "if_nodes": 2 * len(exit_layers),
        },
    }
    if draft is not None:
        a = draft.layers[0].self_attn
        n = len(draft.layers)
        kv = f"[{n},{a.num_kv_heads},C,{a.head_dim}]"
        out["draft.onnx"] = {
            "inputs": {"feats": ["dtype", f"[T,{D}]"], "next_ids": ["int64", "[T]"], "positions": ["int64", "[T]"],
                       "past_k": ["dtype", kv], "past_v": ["dtype", kv]},
            "outputs": {"candidates": ["int64", f"[{min(k, int(draft.vocab_ids.numel()))}]"],
                        "k_rows": ["dtype", f"[{n},{a.num_kv_heads},T,{a.head_dim}]"],
                        "v_rows": ["dtype", f"[{n},{a.num_kv_heads},T,{a.head_dim}]"]},
        }
    return out


def export_onnx(model, program: SpecEEProgram | None, out_dir, settings: Settings, *, progress: bool = True,
                draft=None, graphs=("prefill", "decode_step", "draft"), trt_exit_plugin: bool = False,
                structure: str = "nested", weights_from: SafetensorsWeights | None = None) -> dict:
    """Write prefill.onnx, decode_step.onnx, weights.bin and (EAGLE drafts) draft.onnx into `out_dir`.

    model: a Hugging Face *ForCausalLM (Llama family); it is cast to settings.dtype on the CPU and its
        q/k/v and gate/up weights are fused in place (`model_step.extract_weights`). With weights_from
        (`stream_model`'s checkpoint reader) the model is the meta-device module of `stream_model` and
        the layers are read, cast and written one at a time: memory does not grow with depth.
    program: the SpecEE program (exit points, predictors, draft); None exports a dense decode step.
    draft: an EagleDraft / EagleSource to export instead of the program's draft state.
    trt_exit_plugin: also write decode_step.plugin.onnx, whose exit scores are `specee::exit_score`
        TensorRT plugin nodes (`plugins/trt_exit_plugin.py`); TensorRT only, off by default.
    structure: "nested" (the exit If's else-branch holds every deeper layer; nesting depth = exit
        points + 1) or "flat" (one `If(alive)` per segment after the first, in sequence; nesting depth
        2). Both have 2 Ifs per exit point (verification + exit/segment). Same inputs, outputs and results; ONNX Runtime skips the
        remaining layers either way. TensorRT rejects nesting deeper than 24 (SmolLM2 with an exit
        after each of 29 layers fails to parse nested) and builds deep nests very slowly: use "flat"
        for TensorRT engines.
    Returns {"files": [...], "graphs": {file: io spec}, "meta": {...}, "draft_runtime": "onnx" | "python",
    "export_s": seconds}. The same meta is stored in each graph's metadata_props (values JSON).
    """
    _check_deps()
    if structure not in ("nested", "flat"):
        raise SpecEEError(f"structure must be 'nested' or 'flat', got {structure!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch_dtype(settings.dtype)
    max_pos = getattr(model.config, "max_position_embeddings", settings.max_context)
    max_len = min(settings.max_context, max_pos)
    if weights_from is not None:
        weights = _streamed_weights(model, weights_from, max_len, dtype)
    else:
        model = model.to(device="cpu", dtype=dtype).eval()
        weights = extract_weights(model, max_len)
    spec = weights.spec
    L = spec.num_layers
    k = program.num_candidates if program is not None else settings.num_candidates
    eagle = _load_draft(model, program, draft) if "draft" in graphs else None
    if eagle is not None:
        eagle = eagle.to(device="cpu", dtype=dtype).eval()
    ex = _Exporter(weights, program, k, out, progress)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "num_layers": L, "hidden": spec.hidden,
        "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "vocab": spec.vocab, "eps": spec.eps, "max_len": max_len, "dtype": settings.dtype, "num_candidates": k,
        "exit_layers": ex.exit_layers, "cache_bucket": CACHE_BUCKET,
        "thresholds": {str(ep.layer): ep.threshold for ep in program.exit_points} if program else {},
        "draft": "onnx" if eagle is not None else (program.draft_kind if program else "none"),
    }
    _log(progress, f"{WEIGHTS_FILE}: {ex.wf.offset / 2**20:.1f} MiB")
    files = [WEIGHTS_FILE]
    if "prefill" in graphs:
        t = time.perf_counter()
        files.append(ex.prefill(meta))
        _log(progress, f"prefill.onnx: {time.perf_counter() - t:.1f} s")
    if "decode_step" in graphs:
        t = time.perf_counter()
        files.append(ex.decode(meta, structure=structure))
        _log(progress, f"decode_step.onnx: {len(ex.exit_layers)} exit points, {time.perf_counter() - t:.1f} s")
        if trt_exit_plugin and ex.exit_layers:
            files.append(ex.decode(meta, plugin=True, structure=structure))
    if eagle is not None:
        files += _export_draft(eagle, spec, max_len, k, out, dtype, {
            **meta, "graph": "draft", "draft_config": eagle.draft_config(),
            "draft_first_ids": eagle.vocab_ids[:k].tolist()}, progress)
    return {
        "files": files,
        "graphs": io_spec(spec, k, ex.exit_layers, eagle, structure),
        "meta": meta,
        "draft_runtime": "onnx" if eagle is not None else "python",
        "export_s": round(time.perf_counter() - t0, 1),
    }


def _export_draft(eagle, spec: StepSpec, max_len: int, k: int, out: Path, dtype, meta: dict, progress: bool):
    t0 = time.perf_counter()
    a = eagle.layers[0].self_attn
    n = len(eagle.layers)
    Tn, C = torch.export.Dim("T", min=1, max=max_len), torch.export.Dim("C", min=0, max=max_len)
    args = (torch.zeros(3, spec.hidden, dtype=dtype), torch.tensor([1, 2, 3]) % spec.vocab, torch.arange(4, 7),
            torch.zeros(n, a.num_kv_heads, 4, a.head_dim, dtype=dtype),
            torch.zeros(n, a.num_kv_heads, 4, a.head_dim, dtype=dtype))
    module = DraftStep(eagle, max_len, k)
    prog = _torch_export(module, args, DRAFT_INPUTS, DRAFT_OUTPUTS, ({0: Tn}, {0: Tn}, {0: Tn}, {2: C}, {2: C}),
                         what="EAGLE draft")
    for key, v in meta.items():
        prog.model.metadata_props[key] = v if isinstance(v, str) else json.dumps(v)
    nbytes = sum(b.numel() * b.element_size() for b in module.state_dict().values())
    external = nbytes > DRAFT_EXTERNAL_BYTES
    prog.save(str(out / "draft.onnx"), external_data=external)
    _log(progress, f"draft.onnx: {nbytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return ["draft.onnx"] + (["draft.onnx.data"] if external else [])


def count_nodes(path, op_type: str) -> int:
    """Nodes of `op_type` in an ONNX file, counting those nested in subgraphs."""
    import onnx

    def walk(g):
        n = 0
        for node in g.node:
            n += node.op_type == op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += walk(attr.g)
        return n

    return walk(onnx.load(str(path), load_external_data=False).graph)


def count_if_nodes(path) -> int:
    """If nodes in an ONNX file, counting those nested in subgraphs."""
    return count_nodes(path, "If")


__all__ = [
    "CACHE_BUCKET",
    "DECODE_OUTPUTS",
    "DRAFT_INPUTS",
    "DRAFT_OUTPUTS",
    "PREFILL_INPUTS",
    "PREFILL_OUTPUTS",
    "WEIGHTS_FILE",
    "DraftStep",
    "SafetensorsWeights",
    "count_if_nodes",
    "count_nodes",
    "decode_inputs",
    "export_onnx",
    "io_spec",
    "make_row_layer_fn",
    "own_dtype",
    "stream_model",
]
