"""Train an EAGLE-1 draft head by self-distillation from the frozen base model (CPU-friendly).

1. Collect (once): run the base model densely over training texts (chat template applied to
   first user turn + assistant reply), recording per position
     * f_t      = final_norm(final-layer hidden)                      (regression target, input)
     * f_t^(l)  = final_norm(hidden after layer l) for a few exit layers (inputs only, see below)
     * y_t      = argmax of the base model's logits at t               (the dense greedy next token)
2. Train: draft input (f_t, x_{t+1}) -> g_t; loss = reg_weight * SmoothL1(g_t, f_{t+1})
                                                 + ce_weight  * CE(g_t @ W_r^T, y_{t+1})
   where W_r are the LM-head rows of the frequent-token vocabulary (``vocab_size_limit`` most frequent
   tokens of the training text and of the base model's own predictions). Targets outside the vocab
   are ignored by the CE term (the draft cannot propose them anyway).
   Exit-layer mixing: with probability ``exit_mix`` an input feature f_t is replaced by f_t^(l) from
   a random recorded layer, because at an early exit the runtime feeds the exit layer's feature.
   Targets stay final-layer.
The base model is never updated; only fc + the decoder layer train.

Unrolled training (``unroll`` > 1, "training-time test" as in HASS / EAGLE-3): in a draft tree the
head runs on its own output from depth 2 on. Step s >= 1 feeds g^(s-1)_{t-1} (the previous step's
prediction, detached) as the feature of position t and attends exactly as the runtime would: to the
true pairs 0..t-s and to the chain's own earlier steps (``unrolled_mask``). Each step has the same
targets; step s weighs ``unroll_decay`` ** s.

On ``device="cuda"`` the teacher data (fp16) stays on the GPU, the base model collects in batches
(right padding: causal attention leaves the real positions unchanged) and the draft trains under bf16
autocast with fp32 master weights. ``pack_training_data`` writes pre-tokenised conversations (and
their generation prompts) to a small safetensors file for a machine that reaches no package registry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SpecEEError
from .base import base_parts, unwrap_model
from .eagle import CONFIG_NAME, WEIGHTS_NAME, EagleDraft

# ------------------------------------------------------------------ text formatting


def _messages(item) -> list[dict[str, str]] | None:
    """Normalise one conversation to [{'role','content'}, ...] (first user turn + first reply), or None."""
    if isinstance(item, dict):
        for key in ("conversations", "messages", "turns"):
            if key in item:
                return _messages(item[key])
        if "prompt" in item or "user" in item:
            user = item.get("prompt", item.get("user"))
            reply = item.get("response", item.get("assistant", item.get("reply")))
            return _messages([user, reply] if reply else [user])
        return None
    if isinstance(item, (list, tuple)):
        out = []
        for turn in item:
            if isinstance(turn, str):
                role = "user" if len(out) % 2 == 0 else "assistant"
                out.append({"role": role, "content": turn})
            elif isinstance(turn, dict):
                role = turn.get("role", turn.get("from", ""))
                content = turn.get("content", turn.get("value", ""))
                role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                        "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}.get(role)
                if role is None:
                    continue  # system / unknown turns
                if out and out[-1]["role"] == role:
                    break
                if not out and role != "user":
                    continue
                out.append({"role": role, "content": str(content)})
            if len(out) == 2:
                break
        return out or None
    return None


def format_text(tokenizer, item, use_chat_template: bool = True, max_user_chars: int | None = 600) -> str | None:
    """A training string: chat template over (first user turn, assistant reply) when available.
    Long user turns are cut to ``max_user_chars`` so that the reply (what the model will generate at
    inference) still fits in the training window."""
    if isinstance(item, str):
        return item
    msgs = _messages(item)
    if not msgs:
        return None
    if max_user_chars and len(msgs) > 1 and len(msgs[0]["content"]) > max_user_chars:
        msgs[0] = {"role": "user", "content": msgs[0]["content"][:max_user_chars]}
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        except (TemplateError, ValueError, TypeError, KeyError):
            pass  # e.g. a template that rejects this role order: fall back to plain text
    return "\n\n".join(m["content"] for m in msgs)


# ------------------------------------------------------------------ progress


class _Progress:
    """tqdm on a terminal; elsewhere (a log file, a remote run) one plain stderr line every ``every_s``
    seconds and one at the end, so a long run shows it is alive without flooding the log."""

    def __init__(self, total: int | None, desc: str, enabled: bool, unit: str, every_s: float = 15.0):
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every_s
        self.n = self.shown = 0
        self.post: dict[str, Any] = {}
        self.t0 = self.last = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int = 1, **post) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if post:
                self.bar.set_postfix(**post)
            return
        self.post.update(post)
        if self.enabled and time.time() - self.last >= self.every:
            self.last = time.time()
            self._line()

    def _line(self) -> None:
        self.shown = self.n
        tot = f"/{self.total}" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.post.items())
        print(f"{self.desc}: {self.n}{tot} {self.unit} in {time.time() - self.t0:.0f} s{extra}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.shown != self.n:
            self._line()


def _is_ids(item) -> bool:
    return isinstance(item, (list, tuple)) and bool(item) and isinstance(item[0], int)


def _is_ids_with_start(item) -> bool:
    """(token ids, reply start): a training sequence whose reply (what the draft will be asked for at
    inference) begins at index ``start``; pairs before it are not trained on."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int) and _is_ids(item[0])


def _reply_start(tokenizer, item, ids: list[int]) -> int:
    """Index of the first reply token of a conversation tokenised to ``ids``: the length of its
    generation prompt when that is a prefix of ``ids``, else 0 (unknown: every position trains)."""
    if isinstance(item, str):
        return 0
    p = prompt_ids(tokenizer, item)
    return len(p) if p and ids[: len(p)] == p else 0


def _deadline(time_budget_s: float | None, deadline: float | None, start: float) -> float | None:
    if deadline is not None:
        return deadline
    return None if time_budget_s is None else start + time_budget_s


# ------------------------------------------------------------------ collection


def prompt_ids(tokenizer, item, max_user_chars: int = 600) -> list[int] | None:
    """Token ids of the first user turn wrapped for generation (chat template + assistant header)."""
    msgs = [{"role": "user", "content": item}] if isinstance(item, str) else _messages(item)
    if not msgs:
        return None
    user = {"role": "user", "content": msgs[0]["content"][:max_user_chars]}
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(user["content"] + "\n")["input_ids"]]


def _eos_set(model, tokenizer) -> set[int]:
    out = set()
    for e in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                "eos_token_id", None)):
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(x) for x in e)
    return out


@torch.inference_mode()
def generate_replies(
    model,
    tokenizer,
    items: Iterable,
    *,
    max_new_tokens: int = 128,
    seq_len: int = 256,
    batch_size: int = 16,
    progress: bool = True,
    time_budget_s: float | None = None,
    deadline: float | None = None,
    return_starts: bool = False,
):
    """Self-distillation data: prompt ids + the base model's own greedy reply, batched (left padding),
    in the order of ``items`` (conversations, strings, or generation-prompt token ids). Prompts are cut
    so prompt + reply fits ``seq_len``. No new batch starts once ``time_budget_s`` is spent (or after
    the absolute ``deadline``, a ``time.time()`` value); at least one batch runs. ``return_starts``:
    return (sequences, the index where each reply starts)."""
    hf = unwrap_model(model)
    dev = next(hf.parameters()).device
    deadline = _deadline(time_budget_s, deadline, time.time())
    room = max(16, seq_len - max_new_tokens)
    prompts = []
    for it in items:
        p = [int(t) for t in it] if _is_ids(it) else prompt_ids(tokenizer, it)
        if p:
            prompts.append(p[-room:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_set(hf, tokenizer)
    out: list[list[int]] = []
    starts: list[int] = []
    bar = _Progress(len(prompts), "generate (base model)", progress, "seq")
    b = 0
    while b < len(prompts):
        if deadline is not None and out and time.time() > deadline:
            break
        chunk = prompts[b : b + batch_size]
        width = max(len(p) for p in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, p in enumerate(chunk):
            x[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        try:
            gen = hf.generate(x.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                              do_sample=False, num_beams=1, pad_token_id=pad).cpu()
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)  # retry this chunk in smaller batches
            torch.cuda.empty_cache()
            print(f"specee-compile: out of memory while generating; batch size now {batch_size}", file=sys.stderr)
            continue
        b += len(chunk)
        for i, p in enumerate(chunk):
            reply = gen[i, width:].tolist()
            cut = next((j for j, t in enumerate(reply) if t in eos), None)
            if cut is not None:
                reply = reply[: cut + 1]
            out.append(p + reply)
            starts.append(len(p))
        bar.update(len(chunk))
    bar.close()
    return (out, starts) if return_starts else out


def default_aux_layers(num_layers: int) -> list[int]:
    """Exit layers whose features are recorded for exit-layer mixing: every 2nd from L/3 to L-2."""
    lo = max(1, num_layers // 3)
    return list(range(lo, num_layers - 1, 2))


@torch.inference_mode()
def collect_teacher_data(
    model,
    tokenizer,
    texts: Iterable,
    *,
    seq_len: int = 256,
    aux_layers: list[int] | None = None,
    min_tokens: int = 16,
    progress: bool = True,
    time_budget_s: float | None = None,
    min_sequences: int = 16,
    batch_size: int = 1,
    store_device: str | torch.device | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Run the frozen base model over ``texts``; see the module doc. Returns padded tensors
    (``ids`` [S, T], ``lengths`` [S], ``starts`` [S] (reply start: earlier pairs are not trained or
    scored), ``final`` [S, T, D] fp16, ``aux`` [A, S, T, D] fp16,
    ``argmax`` [S, T]) on ``store_device`` (default the CPU) plus ``aux_layers``. ``batch_size``
    sequences run per forward (right padding). Stops early (keeping what it has, at least
    ``min_sequences``) once ``time_budget_s`` is spent or the absolute ``deadline`` has passed."""
    hf = unwrap_model(model)
    cfg, _e, _h, norm = base_parts(hf)
    layers = hf.model.layers
    L = len(layers)
    aux_layers = default_aux_layers(L) if aux_layers is None else sorted(set(aux_layers))
    if any(l < 0 or l >= L - 1 for l in aux_layers):
        raise SpecEEError(f"aux_layers must be in [0, {L - 2}], got {aux_layers}")
    if batch_size < 1:
        raise SpecEEError(f"collection batch size must be >= 1, got {batch_size}")
    dev = next(hf.parameters()).device
    store = torch.device(store_device) if store_device is not None else torch.device("cpu")
    t0 = time.time()
    deadline = _deadline(time_budget_s, deadline, t0)

    seqs: list[list[int]] = []
    seq_starts: list[int] = []
    for item in texts:
        start = 0
        if _is_ids_with_start(item):
            ids, start = [int(t) for t in item[0]][:seq_len], int(item[1])
        elif _is_ids(item):
            ids = [int(t) for t in item][:seq_len]  # already token ids (e.g. from generate_replies)
        else:
            text = format_text(tokenizer, item)
            if not text:
                continue
            ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
            ids = [int(t) for t in ids][:seq_len]
            start = _reply_start(tokenizer, item, ids)
        # a reply starting at s is drafted from pair s - 1 on; keep sequences with at least 2 such pairs
        if len(ids) >= min_tokens and len(ids) - max(0, start - 1) >= 3:
            seqs.append(ids)
            seq_starts.append(max(0, start))
    if not seqs:
        raise SpecEEError(f"no usable training text (every text was empty or shorter than {min_tokens} tokens)")

    S, T, D = len(seqs), max(len(s) for s in seqs), cfg.hidden_size
    ids_t = torch.zeros(S, T, dtype=torch.long, device=store)
    lengths = torch.tensor([len(s) for s in seqs], device=store)
    starts = torch.tensor(seq_starts, device=store)
    final = torch.zeros(S, T, D, dtype=torch.float16, device=store)
    aux = torch.zeros(len(aux_layers), S, T, D, dtype=torch.float16, device=store)
    argmax = torch.zeros(S, T, dtype=torch.long, device=store)

    captured: dict[int, torch.Tensor] = {}

    def hook(idx):
        def fn(_mod, _inp, out):
            captured[idx] = out[0] if isinstance(out, (tuple, list)) else out

        return fn

    handles = [layers[l].register_forward_hook(hook(l)) for l in aux_layers]
    head = hf.get_output_embeddings()
    done = 0
    bar = _Progress(S, "collect (base model)", progress, "seq")
    try:
        while done < S:
            if deadline is not None and done >= min_sequences and time.time() > deadline:
                break
            chunk = seqs[done : done + batch_size]
            b, width = len(chunk), max(len(s) for s in chunk)
            x = torch.zeros(b, width, dtype=torch.long)
            for j, s in enumerate(chunk):
                x[j, : len(s)] = torch.tensor(s)  # right padding: causal attention never reads it
            x = x.to(dev)
            try:
                h = hf.model(input_ids=x, use_cache=False).last_hidden_state  # already final-normed
                am = head(h).argmax(-1)
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                captured.clear()
                batch_size = max(1, batch_size // 2)  # retry this chunk in smaller batches
                torch.cuda.empty_cache()
                continue
            ids_t[done : done + b, :width] = x.to(store)
            final[done : done + b, :width] = h.to(torch.float16).to(store)
            argmax[done : done + b, :width] = am.to(store)
            for a, l in enumerate(aux_layers):
                aux[a, done : done + b, :width] = norm(captured[l]).to(torch.float16).to(store)
            captured.clear()
            done += b
            bar.update(b)
    finally:
        for hd in handles:
            hd.remove()
        bar.close()
    T = int(lengths[:done].max())
    return {"ids": ids_t[:done, :T], "lengths": lengths[:done], "starts": starts[:done], "final": final[:done, :T],
            "aux": aux[:, :done, :T], "argmax": argmax[:done, :T], "aux_layers": aux_layers,
            "seconds": time.time() - t0, "offered_sequences": S}


def _valid_mask(data) -> torch.Tensor:
    T = data["ids"].shape[1]
    return torch.arange(T, device=data["ids"].device)[None, :] < data["lengths"][:, None]


def choose_vocab(data: dict, vocab_size_limit: int | None, vocab_size: int, extra_counts: Counter | None = None,
                 always: Iterable[int] = ()) -> torch.Tensor:
    """The ``vocab_size_limit`` most frequent tokens among the base model's own predictions (counted
    twice) and the training text; ``always`` ids (EOS, end-of-turn) are kept. Most frequent first
    (ties: lower id first)."""
    valid = _valid_mask(data)
    ids, am = data["ids"][valid], data["argmax"][valid]
    top = int(max(int(ids.max()) if ids.numel() else 0, int(am.max()) if am.numel() else 0, vocab_size - 1)) + 1
    counts = torch.bincount(ids, minlength=top) + 2 * torch.bincount(am, minlength=top)
    counts = counts[:vocab_size].cpu()
    if extra_counts:
        for t, c in extra_counts.items():
            if 0 <= t < vocab_size:
                counts[t] += c
    limit = vocab_size if not vocab_size_limit else min(vocab_size_limit, vocab_size)
    order = torch.sort(-counts, stable=True).indices
    ranked = order[counts[order] > 0].tolist()
    keep = [t for t in always if 0 <= t < vocab_size]
    chosen = list(dict.fromkeys(ranked[:limit] + keep))
    if len(chosen) > limit:
        chosen = [t for t in chosen if t not in set(keep)][: limit - len(keep)] + keep
    if len(chosen) < limit:  # pad with unseen ids so the head always has `limit` rows
        seen = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in seen][: limit - len(chosen)]
    return torch.tensor(chosen, dtype=torch.long)


# ------------------------------------------------------------------ training


def _init_draft(draft: EagleDraft, seed: int) -> None:
    """Start as 'g_t = f_t' (identity fc on the feature half, zero-init residual outputs): the untrained
    draft then proposes the base model's own top-k at f_t, and training only has to learn the shift."""
    g = torch.Generator().manual_seed(seed)
    d = draft.hidden_size
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.dim() == 2:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        draft.fc.weight[:, d:] += torch.eye(d, device=draft.fc.weight.device, dtype=draft.fc.weight.dtype)
        for layer in draft.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)


def _split(n: int, val_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_frac)) if n > 4 else 0
    return perm[n_val:], perm[:n_val]


def _batch(data, idx, vocab_map, aux_mix: float, gen: torch.Generator | None):
    """Inputs/targets for sequences ``idx``: pairs t = 0..n-2 of each, on the data's device
    (``vocab_map`` and ``gen`` live there too)."""
    dev = data["final"].device
    idx = idx.to(dev)
    lengths = data["lengths"][idx]
    T = int(lengths.max()) - 1
    B = len(idx)
    ids = data["ids"][idx, : T + 1]
    feats = data["final"][idx, :T].float()
    A = data["aux"].shape[0]
    if aux_mix > 0 and A > 0:
        use = torch.rand((B, T), generator=gen, device=dev) < aux_mix
        which = torch.randint(0, A, (B, T), generator=gen, device=dev)
        picked = data["aux"][which, idx[:, None].expand(B, T), torch.arange(T, device=dev)[None, :].expand(B, T)]
        feats = torch.where(use[..., None], picked.float(), feats)
    nxt = ids[:, 1 : T + 1]
    tgt_feat = data["final"][idx, 1 : T + 1].float()
    tgt_tok = vocab_map[data["argmax"][idx, 1 : T + 1]]
    t = torch.arange(T, device=dev)[None, :]
    valid = t < (lengths[:, None] - 1)
    if "starts" in data:  # only pairs the runtime drafts from: t >= reply start - 1
        valid = valid & (t >= data["starts"][idx][:, None] - 1)
    tgt_tok = torch.where(valid, tgt_tok, torch.full_like(tgt_tok, -100))
    pos = t.expand(B, T)
    return feats, nxt, pos, tgt_feat, tgt_tok, valid


def unrolled_mask(T: int, step: int, device=None) -> torch.Tensor:
    """Attention mask [T, (step + 1) * T] of unroll step ``step`` >= 1 over the keys of steps 0..step
    (step 0 = the true pairs), concatenated in that order. The query at position t continues the chain
    that left the true pairs at m = t - step: it sees the true keys 0..m and, of each step i >= 1, the
    key at m + i (the chain's own earlier drafts; i = step is itself). This is what the runtime's draft
    cache holds at tree depth step + 1. Rows t < step have no true start: only their own key."""
    t = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    blocks = [j <= t - step] + [j == t - step + i for i in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


def unrolled_forward(draft: EagleDraft, feats, nxt, positions, unroll: int = 1) -> list[torch.Tensor]:
    """Outputs g of each unroll step (list of [B, T, D]). Step 0 is ``draft(feats, nxt, positions)``;
    step s >= 1 feeds the previous step's g at t - 1 (detached) as the feature of position t, with
    ``unrolled_mask``. Row t of step s is meaningful for t >= s only (earlier rows start nowhere)."""
    g, presents = draft(feats, nxt, positions)
    outs = [g]
    if unroll <= 1:
        return outs
    B, T, _ = feats.shape
    emb = F.embedding(nxt, draft.embed_weight).to(draft.dtype)
    keys = [[k] for k, _v in presents]
    vals = [[v] for _k, v in presents]
    for s in range(1, unroll):
        prev = outs[-1].detach()
        fs = torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], dim=1)
        x = draft.fc(torch.cat([emb, fs.to(draft.dtype)], dim=-1))
        cos, sin = draft.rotary(x, positions)
        mask = unrolled_mask(T, s, x.device)[None, None]
        for li, layer in enumerate(draft.layers):
            attn = layer.self_attn
            q, k, v = attn._qkv(layer._in(x), cos, sin)
            keys[li].append(k)
            vals[li].append(v)
            o = F.scaled_dot_product_attention(q, torch.cat(keys[li], dim=2), torch.cat(vals[li], dim=2),
                                               attn_mask=mask, enable_gqa=attn.num_heads != attn.num_kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        outs.append(x)
    return outs


@torch.no_grad()
def evaluate_hits(draft: EagleDraft, data, idx, vocab_map, k: int = 4, aux_index: int | None = None,
                  batch_size: int = 16, unroll: int = 1) -> dict[str, Any]:
    """Teacher-forced hit rates on sequences ``idx``: is the base model's argmax next token the draft's
    top-1 / in its top-k? ``aux_index`` = use recorded exit-layer features as inputs (exit case).
    ``unroll`` > 1 adds ``top1_by_depth``: top-1 of unroll step s (the draft fed its own features for
    s steps, tree depth s + 1), over positions t >= s."""
    dev = draft.fc.weight.device
    hit1 = hitk = total = 0
    deep = [[0, 0] for _ in range(max(1, unroll))]
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        feats, nxt, pos, _tf, _tt, valid = _batch(data, b, vocab_map, 0.0, None)
        T = feats.shape[1]
        if aux_index is not None:
            feats = data["aux"][aux_index, b.to(feats.device), :T].float()
        outs = unrolled_forward(draft, feats.to(dev), nxt.to(dev), pos.to(dev), unroll)
        truth = data["argmax"][b.to(data["argmax"].device), 1 : T + 1].to(dev)
        valid = valid.to(dev)
        for d, g in enumerate(outs):
            top = draft.vocab_ids[torch.topk(draft.logits(g.to(draft.dtype)), k, dim=-1).indices]  # [B, T, k]
            ok = valid & (pos.to(dev) >= d)
            deep[d][0] += ((top[..., 0] == truth) & ok).sum().item()
            deep[d][1] += ok.sum().item()
            if d == 0:
                hit1 += ((top[..., 0] == truth) & valid).sum().item()
                hitk += (((top == truth[..., None]).any(-1)) & valid).sum().item()
                total += valid.sum().item()
    out: dict[str, Any] = {"top1": hit1 / max(total, 1), f"top{k}": hitk / max(total, 1), "positions": total}
    if unroll > 1:
        out["top1_by_depth"] = [round(h / max(n, 1), 4) for h, n in deep]
    return out


def _step_losses(draft, outs, tgt_feat, tgt_tok, valid, pos, reg_weight, ce_weight, decay):
    """Weighted mean over unroll steps of reg_weight * SmoothL1 + ce_weight * CE; and step 0's parts."""
    total = wsum = 0.0
    first = None
    for s, g in enumerate(outs):
        ok = valid & (pos >= s)
        n = ok.sum().clamp(min=1)
        gf = g.float()
        reg = (F.smooth_l1_loss(gf, tgt_feat, reduction="none").mean(-1) * ok).sum() / n
        tt = torch.where(ok, tgt_tok, torch.full_like(tgt_tok, -100))
        ce = F.cross_entropy(draft.logits(g).float().flatten(0, 1), tt.flatten(), ignore_index=-100,
                             reduction="sum") / n
        w = decay ** s
        total = total + w * (reg_weight * reg + ce_weight * ce)
        wsum += w
        if first is None:
            first = (reg, ce)
    return total / wsum, first[0], first[1]


def train_draft(
    model,
    tokenizer,
    texts,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    seq_len: int = 256,
    vocab_size_limit: int | None = 8192,
    progress: bool = True,
    batch_size: int = 8,
    aux_layers: list[int] | None = None,
    exit_mix: float = 0.5,
    reg_weight: float = 1.0,
    ce_weight: float = 0.5,
    weight_decay: float = 0.0,
    val_frac: float = 0.1,
    seed: int = 0,
    data: dict | None = None,
    vocab_texts: Iterable | None = None,
    k_eval: int = 4,
    time_budget_s: float | None = 540.0,
    collect_frac: float = 0.4,
    device: str | torch.device | None = None,
    unroll: int = 1,
    unroll_decay: float = 0.8,
    collect_batch_size: int | None = None,
    store_device: str | torch.device | None = None,
    amp: bool | None = None,
    deadline: float | None = None,
    reserve_s: float = 15.0,
    init: EagleDraft | None = None,
    num_layers: int = 1,
) -> tuple[EagleDraft, dict[str, Any]]:
    """Self-distil an EAGLE-1 draft from ``model`` (frozen) on ``texts`` (strings, conversations or
    token-id lists). Returns (draft bound to ``model``, report). ``data`` reuses a
    ``collect_teacher_data`` result.

    ``time_budget_s`` (or the absolute ``deadline``, a ``time.time()`` value) bounds the wall time of
    everything here: collection stops after ``collect_frac`` of it, and training runs ``steps`` steps
    or until the budget less ``reserve_s`` (validation, rebinding) is spent, whichever is first (the
    learning-rate schedule follows whichever is closer to done). None = no limit.

    ``device``: where the draft trains (default: the CPU). ``"cuda"`` trains on the GPU: the teacher
    data is kept on ``store_device`` (default: the training device), the base model collects on its
    own device in batches of ``collect_batch_size`` (default 64 on CUDA, 1 on the CPU), and the
    forward/backward runs under bf16 autocast (``amp``, default on for CUDA) with fp32 weights.
    ``unroll`` > 1: training-time test over that many draft steps (module doc).

    ``init``: a trained draft of this model to continue from (warm start): its weights, layer count and
    vocabulary (``vocab_size_limit`` and the data's token counts are then not used) in place of the
    identity start. ``num_layers``: decoder layers of a fresh head (EAGLE's is one)."""
    t0 = time.time()
    deadline = _deadline(time_budget_s, deadline, t0)
    if not isinstance(unroll, int) or isinstance(unroll, bool) or not 1 <= unroll <= 8:
        raise SpecEEError(f"unroll must be an integer in [1, 8], got {unroll!r}")
    hf = unwrap_model(model)
    hf.eval()
    cfg, _embed_w, head_w, _ = base_parts(hf)
    torch.manual_seed(seed)
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        from ..config import check_device

        check_device(str(dev))
    store = torch.device(store_device) if store_device is not None else dev
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    if collect_batch_size is None:
        collect_batch_size = 64 if dev.type == "cuda" else 1
    if data is None:
        data = collect_teacher_data(
            hf, tokenizer, texts, seq_len=seq_len, aux_layers=aux_layers, progress=progress,
            deadline=None if deadline is None else t0 + collect_frac * (deadline - t0),
            batch_size=collect_batch_size, store_device=store,
        )
    t_collect = time.time() - t0

    extra = Counter()
    if vocab_texts is not None:
        for item in vocab_texts:
            if _is_ids_with_start(item):
                item = item[0]
            if _is_ids(item):
                extra.update(int(t) for t in item)
                continue
            text = format_text(tokenizer, item)
            if text:
                extra.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    always = [t for t in [tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)] if t is not None]
    if init is not None:  # warm start: the head's own vocabulary, so its head rows keep their meaning
        if init.vocab_size != head_w.shape[0] or init.hidden_size != cfg.hidden_size:
            raise SpecEEError(f"the draft to continue from was made for another model (vocabulary {init.vocab_size}, "
                              f"width {init.hidden_size}; this model: {head_w.shape[0]}, {cfg.hidden_size})")
        vocab_ids = init.vocab_ids.detach().cpu()
    else:
        vocab_ids = choose_vocab(data, vocab_size_limit, head_w.shape[0], extra, always)
    data_dev = data["final"].device
    vocab_map = torch.full((head_w.shape[0],), -100, dtype=torch.long)
    vocab_map[vocab_ids] = torch.arange(len(vocab_ids))
    vocab_map = vocab_map.to(data_dev)

    shape = ({"num_layers": num_layers} if init is None else
             {"num_layers": len(init.layers), "input_norm": init.input_norm, "fc_bias": init.fc.bias is not None})
    draft = EagleDraft(hf, vocab_ids, **shape)
    draft.float()  # train in fp32 whatever the base dtype (embed/head buffers are copies then)
    draft.embed_weight = draft.embed_weight.float().to(dev)
    draft.head_rows = draft.head_rows.float().to(dev)
    draft.to(dev)
    if init is None:
        _init_draft(draft, seed)
    else:
        with torch.no_grad():
            for name, p in draft.named_parameters():
                p.copy_(init.get_parameter(name).detach().to(p.device, p.dtype))
    draft.train()

    tr_idx, val_idx = _split(int(data["ids"].shape[0]), val_frac, seed)
    if len(tr_idx) == 0:
        raise SpecEEError(f"too little training data ({int(data['ids'].shape[0])} sequences)")
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warm = max(1, min(steps // 20, 200))

    def lr_at(step, frac):
        if step < warm:
            return lr * (step + 1) / warm
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    gen = torch.Generator().manual_seed(seed + 1)  # batch order (CPU)
    mix_gen = torch.Generator(device=data_dev).manual_seed(seed + 2)  # exit-layer mixing (data device)
    curve: list[dict[str, float]] = []
    order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
    ptr = 0
    bar = _Progress(steps if steps < 10**6 else None, "train draft", progress, "step")
    ema = None
    t1 = time.time()
    # validation + rebinding after the loop: reserve_s, or a quarter of a small budget
    reserve = 0.0 if deadline is None else min(reserve_s, 0.25 * max(0.0, deadline - t0))
    train_budget = None if deadline is None else max(0.5, deadline - t1 - reserve)
    stopped_early = False
    for step in range(steps):
        elapsed = time.time() - t1
        frac = (step - warm) / max(1, steps - warm)
        if train_budget is not None:
            if elapsed >= train_budget:
                stopped_early = True
                break
            frac = max(frac, elapsed / train_budget)
        if ptr + batch_size > len(order):
            order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
            ptr = 0
        idx = order[ptr : ptr + batch_size]
        ptr += batch_size
        feats, nxt, pos, tgt_feat, tgt_tok, valid = (
            t.to(dev, non_blocking=True) for t in _batch(data, idx, vocab_map, exit_mix, mix_gen))
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            outs = unrolled_forward(draft, feats, nxt, pos, unroll)
            loss, reg, ce = _step_losses(draft, outs, tgt_feat, tgt_tok, valid, pos, reg_weight, ce_weight,
                                         unroll_decay)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "loss": loss.item(), "reg": reg.item(), "ce": ce.item()}
        if not math.isfinite(rec["loss"]):
            raise SpecEEError(f"draft training diverged at step {step} (loss {rec['loss']}); lower --lr")
        curve.append(rec)
        ema = rec["loss"] if ema is None else 0.9 * ema + 0.1 * rec["loss"]
        bar.update(1, loss=f"{ema:.3f}", ce=f"{rec['ce']:.3f}")
    bar.close()
    t_train = time.time() - t1
    draft.eval()

    n_tr = len(tr_idx)
    report: dict[str, Any] = {
        "sequences": int(data["ids"].shape[0]),
        "offered_sequences": int(data.get("offered_sequences", data["ids"].shape[0])),
        "train_sequences": n_tr,
        "val_sequences": len(val_idx),
        "tokens": int(data["lengths"].sum()),
        "seq_len": seq_len,
        "steps": len(curve),
        "steps_requested": steps,
        "stopped_by_time_budget": stopped_early,
        "time_budget_s": time_budget_s if time_budget_s is not None else (
            None if deadline is None else round(deadline - t0, 1)),
        "batch_size": batch_size,
        "epochs": round(len(curve) * batch_size / max(1, n_tr), 2),
        "lr": lr,
        "reg_weight": reg_weight,
        "ce_weight": ce_weight,
        "exit_mix": exit_mix,
        "unroll": unroll,
        "unroll_decay": unroll_decay,
        "amp_bf16": amp,
        "aux_layers": list(data["aux_layers"]),
        "vocab_size_limit": None if init is not None else vocab_size_limit,
        "num_vocab_ids": len(vocab_ids),
        "warm_start": init is not None,
        "draft_layers": len(draft.layers),
        "collect_seconds": round(t_collect, 1),
        "train_seconds": round(t_train, 1),
        "steps_per_second": round(len(curve) / max(t_train, 1e-9), 2),
        "first_loss": sum(r["loss"] for r in curve[:5]) / max(1, len(curve[:5])),
        "final_loss": sum(r["loss"] for r in curve[-10:]) / max(1, len(curve[-10:])),
        "loss_curve": [round(r["loss"], 4) for r in curve[:: max(1, len(curve) // 50)]],
    }
    # how many dense-model next tokens the restricted vocabulary can express at all
    valid = _valid_mask(data)
    report["vocab_coverage"] = (vocab_map[data["argmax"][valid]] >= 0).float().mean().item()
    eval_bs = 64 if dev.type == "cuda" else 16
    if len(val_idx):
        report["val_final_layer"] = evaluate_hits(draft, data, val_idx, vocab_map, k_eval, batch_size=eval_bs,
                                                  unroll=max(unroll, 3))
        if data["aux"].shape[0]:
            target = (2 * len(hf.model.layers)) // 3  # the benchmark's "middle" exit layer
            mid = min(range(len(data["aux_layers"])), key=lambda a: abs(data["aux_layers"][a] - target))
            report["val_exit_layer"] = {
                "layer": data["aux_layers"][mid],
                **evaluate_hits(draft, data, val_idx, vocab_map, k_eval, aux_index=mid, batch_size=eval_bs),
            }
    # rebind to the base model's own (shared) embeddings/head, in its dtype and device
    sd = {k: v.detach().clone() for k, v in draft.state_dict().items()}
    bound = EagleDraft.from_state_dict(hf, sd, None, source="trained draft")
    report["total_seconds"] = round(time.time() - t0, 1)
    return bound, report


# ------------------------------------------------------------------ packed training data

DATA_FORMAT = "specee-draft-data"
DATA_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what the tokenizer does (its size, a probe text's ids and, with a chat template,
    the ids of a rendered probe conversation): packed training data is only valid for a tokenizer that
    does the same. Behaviour, not file contents, so the same tokenizer loaded from a GGUF file or from
    a Hugging Face directory matches."""
    probe = "Hello, world! 1234 naïve café, 東京\n\tdef f(x): return x ** 2  # done."
    ids = [int(t) for t in tokenizer(probe, add_special_tokens=False)["input_ids"]]
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    chat = prompt_ids(tokenizer, probe) if getattr(tokenizer, "chat_template", None) else None
    text = json.dumps([size, ids, chat])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _pack(lists: list[list[int]], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.tensor([t for ids in lists for t in ids], dtype=torch.long)
    offsets = torch.zeros(len(lists) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(x) for x in lists], dtype=torch.long), 0)
    if kind == "uint16-as-int16":  # ids < 65536 as uint16 bit patterns in int16 (half the size of int32)
        return torch.where(flat >= 32768, flat - 65536, flat).to(torch.int16), offsets
    return flat.to(torch.int32), offsets


def _unpack(ids: torch.Tensor, offsets: torch.Tensor, kind: str) -> list[list[int]]:
    flat = ids.to(torch.int32)
    if kind == "uint16-as-int16":
        flat = flat & 0xFFFF
    elif kind != "int32":
        raise SpecEEError(f"packed training data: unknown id encoding {kind!r}")
    flat_l, off = flat.tolist(), offsets.tolist()
    return [flat_l[off[i] : off[i + 1]] for i in range(len(off) - 1)]


def pack_training_data(tokenizer, items: Iterable, out_path: str | os.PathLike, *, seq_len: int = 256,
                       prompt_tokens: int = 128, max_texts: int | None = None, min_tokens: int = 16,
                       source: str = "", progress: bool = True) -> dict[str, Any]:
    """Tokenise conversations once into ``out_path`` (safetensors; xz-compressed when the name ends in
    ``.xz``): per item its generation prompt (``prompt_ids``, last ``prompt_tokens`` tokens) and, for
    the first ``max_texts`` usable items (None = all), its training text (``format_text``, cut to
    ``seq_len`` tokens). Items without a user turn or with a text shorter than ``min_tokens`` are
    dropped. Returns the metadata. ``train-draft --data`` reads it on a machine without the data
    package (``load_training_data``)."""
    import lzma

    from safetensors.torch import save

    texts: list[list[int]] = []
    text_starts: list[int] = []
    prompts: list[list[int]] = []
    chat = bool(getattr(tokenizer, "chat_template", None))
    bar = _Progress(None, "pack (tokenise)", progress, "conv")
    for item in items:
        bar.update(1)
        text = format_text(tokenizer, item)
        if not text:
            continue
        want_text = max_texts is None or len(prompts) < max_texts
        full = [int(t) for t in tokenizer(text, add_special_tokens=not chat)["input_ids"]]
        ids = full[:seq_len]
        p = prompt_ids(tokenizer, item)
        if len(ids) < min_tokens or not p:
            continue
        start = len(p) if full[: len(p)] == p else 0  # 0: unknown, every position trains
        if start >= len(ids) - 1:  # the prompt fills the window: no reply left to learn from
            want_text = False
        texts.append(ids if want_text else [])
        text_starts.append(start if want_text else 0)
        prompts.append(p[-prompt_tokens:])
    bar.close()
    if not prompts:
        raise SpecEEError("pack_training_data: no usable conversation")
    top = max(max(x) for x in texts + prompts if x)
    kind = "uint16-as-int16" if top < 65536 else "int32"
    c_ids, c_off = _pack(texts, kind)
    p_ids, p_off = _pack(prompts, kind)
    meta = {"format": DATA_FORMAT, "version": str(DATA_VERSION), "tokenizer": tokenizer_fingerprint(tokenizer),
            "ids": kind, "count": str(len(prompts)), "texts": str(sum(1 for x in texts if x)),
            "seq_len": str(seq_len), "prompt_tokens": str(prompt_tokens), "source": source}
    blob = save({"conv_ids": c_ids.contiguous(), "conv_offsets": c_off, "prompt_ids": p_ids.contiguous(),
                 "prompt_offsets": p_off, "conv_starts": torch.tensor(text_starts, dtype=torch.int32)},
                metadata=meta)
    out = Path(out_path)
    if out.suffix == ".xz":
        blob = lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    return meta


def load_training_data(path: str | os.PathLike, tokenizer, *, allow_tokenizer_mismatch: bool = False
                       ) -> tuple[list[tuple[list[int], int]], list[list[int]], dict]:
    """(training texts as (token ids, reply start), generation prompts as token ids, metadata) from a
    ``pack_training_data`` file (plain or xz); refuses a file made for another tokenizer unless
    ``allow_tokenizer_mismatch`` (then only a warning on stderr, and ``meta["tokenizer_mismatch"]``).
    Items packed without their text have none in the first list."""
    import lzma

    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    if not p.is_file():
        raise SpecEEError(f"--data {p}: no such file (make one with `python benchmarks/gpu_train_draft.py pack`)")
    try:
        blob = p.read_bytes()
        if blob[:6] == b"\xfd7zXZ\x00":
            blob = lzma.decompress(blob)
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {} if 0 < n < len(blob) else {}
        if meta.get("format") != DATA_FORMAT:
            raise SpecEEError(f"--data {p}: not packed draft training data (format {meta.get('format')!r})")
        t = load(blob)
        starts = t["conv_starts"].tolist() if "conv_starts" in t else None
        t = {k: t[k] for k in ("conv_ids", "conv_offsets", "prompt_ids", "prompt_offsets")}
    except (SafetensorError, OSError, ValueError, KeyError, lzma.LZMAError) as e:
        raise SpecEEError(f"--data {p}: cannot read it as packed draft training data ({e})") from None
    want = tokenizer_fingerprint(tokenizer)
    if meta.get("tokenizer") != want and allow_tokenizer_mismatch:
        print(f"specee-compile: warning: --data {p} was tokenised by a tokenizer that behaves differently "
              f"({meta.get('tokenizer')} != {want}); using it anyway", file=sys.stderr, flush=True)
        meta = {**meta, "tokenizer_mismatch": want}
    elif meta.get("tokenizer") != want:
        raise SpecEEError(f"--data {p} was tokenised by another tokenizer ({meta.get('tokenizer')} != {want}); "
                          "pack it again for this model")
    texts = _unpack(t["conv_ids"], t["conv_offsets"], meta.get("ids", ""))
    prompts = _unpack(t["prompt_ids"], t["prompt_offsets"], meta.get("ids", ""))
    if len(texts) != len(prompts):
        raise SpecEEError(f"--data {p}: {len(texts)} texts but {len(prompts)} prompts; the file is damaged")
    starts = starts if starts is not None and len(starts) == len(texts) else [0] * len(texts)
    return [(x, int(st)) for x, st in zip(texts, starts) if x], prompts, meta


# ------------------------------------------------------------------ CLI entry


def _check_number(flag: str, value, lo, hi=None, integer: bool = True) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    if not ok or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SpecEEError(f"{flag} must be {'an integer' if integer else 'a number'} {rng}, got {value!r}")


def train_draft_command(
    model_name: str,
    out_dir: str | os.PathLike,
    settings=None,
    *,
    conversations: int = 400,
    steps: int | None = None,
    lr: float = 3e-3,
    seq_len: int = 256,
    vocab_size_limit: int | None = 8192,
    batch_size: int = 8,
    progress: bool = True,
    seed: int = 0,
    time_budget_s: float | None = 540.0,
    self_generated: int = 0,
    gen_tokens: int = 128,
    device: str | None = None,
    aux_layers: list[int] | None = None,
    data_file: str | os.PathLike | None = None,
    unroll: int = 1,
    exit_mix: float = 0.5,
    gen_batch_size: int | None = None,
    collect_batch_size: int | None = None,
    gen_frac: float = 0.35,
    loaded=None,
    allow_tokenizer_mismatch: bool = False,
    tf32: bool = True,
    init: str | os.PathLike | None = None,
    draft_layers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``specee-compile train-draft MODEL``: load MODEL, self-distil a draft on ShareGPT first turns
    (+ replies), write ``out_dir``/draft.safetensors + draft_config.json + manifest.json; return the config dict
    (which embeds the training report under "train").

    Data: ShareGPT from its PyPI package, or ``data_file`` (``--data``): conversations packed by
    ``pack_training_data`` (for a machine without a package registry). ``self_generated`` > 0: for
    that many prompts the reply is the base model's own greedy output (``gen_tokens`` tokens, batches
    of ``gen_batch_size``), closer to what the draft sees at inference; with ``data_file`` these are
    its first prompts, and the ``conversations`` texts are its first texts (the same conversations
    with their original replies).

    ``time_budget_s`` (None or 0 = no limit) counts from after the model and data load and covers
    generation (at most ``gen_frac`` of it), collection and training.

    ``device`` (``--device cuda``): the base model loads there (fp32), generates and collects the
    teacher data (the target's own hidden states) there in batches, and the draft trains there under
    bf16 autocast with the data on the GPU; None = the settings' device, else the CPU. ``tf32``: on
    CUDA the teacher's fp32 matmuls (generation, collection) may use TF32 tensor cores (restored after).
    ``aux_layers``: exit layers whose features are recorded for exit-layer mixing (default: every 2nd
    from L/3; fewer layers = less memory for large runs). ``loaded``: an already loaded model (then
    ``model_name`` only names it in the config). ``allow_tokenizer_mismatch``: see ``load_training_data``.
    ``out_dir`` is written atomically with a manifest (`artifacts.atomic_directory`): checked before any work,
    an earlier train-draft output there is replaced, and a directory holding other files is refused unless
    ``force`` (then the head is added beside them, none of them overwritten).
    ``init`` (``--init``): a draft directory (train-draft's output, or an artifact directory with a draft,
    whose manifest is verified first) to continue training from; see ``train_draft``. ``draft_layers``
    (``--draft-layers``): decoder layers of a fresh head (default 1; with ``init``, the head's own)."""
    from ..data import sharegpt_conversations
    from ..models import load_model

    if steps is not None:
        _check_number("--steps", steps, 1)
    _check_number("--conversations", conversations, 0)
    _check_number("--self-generated", self_generated, 0)
    _check_number("--gen-tokens", gen_tokens, 1)
    _check_number("--batch-size", batch_size, 1)
    _check_number("--seq-len", seq_len, 16)
    _check_number("--unroll", unroll, 1, 8)
    _check_number("--exit-mix", exit_mix, 0.0, 1.0, integer=False)
    _check_number("--lr", lr, 1e-8, 1.0, integer=False)
    if draft_layers is not None:
        _check_number("--draft-layers", draft_layers, 1, 4)
    if time_budget_s is not None:
        _check_number("--time-budget", time_budget_s, 0.0, integer=False)
    if conversations + self_generated == 0:
        raise SpecEEError("nothing to train on: --conversations and --self-generated are both 0")
    if data_file is not None and not Path(data_file).is_file():
        raise SpecEEError(f"--data {data_file}: no such file")
    if init is not None:
        _check_init_dir(init, out_dir)
    from ..artifacts import plan_output

    plan_output(out_dir, force=force, flag="-o")  # before the model loads and the training runs
    if device is None and settings is not None:
        device = getattr(settings, "device", None)
    if device is not None and torch.device(device).type == "cuda":
        from ..config import check_device

        check_device(device)  # one clear line before anything loads
    t_load = time.time()
    if loaded is None:
        if settings is None and device is None:
            loaded = load_model(model_name)
        else:  # fp32 on the training device; the trained draft is cast to the runtime dtype on load
            loaded = load_model(model_name, dtype=torch.float32, device=device or "cpu")
    tok = loaded.tokenizer
    init_draft = _load_init(init, loaded.model) if init is not None else None
    if init_draft is not None and draft_layers is not None and draft_layers != len(init_draft.layers):
        raise SpecEEError(f"--draft-layers {draft_layers}, but the --init head has {len(init_draft.layers)}: "
                          "drop --draft-layers to continue that head")
    if data_file is not None:
        texts, prompts, meta = load_training_data(data_file, tok, allow_tokenizer_mismatch=allow_tokenizer_mismatch)
        gen_items = prompts[:self_generated]  # the packed prompts and texts are of the same conversations
        train_convs, vocab_convs = texts[:conversations], texts[conversations:]
        source = (f"{meta.get('source') or 'packed conversations'} ({Path(data_file).name}: {len(prompts)} "
                  f"prompts, {len(texts)} texts)")
        vocab = base_parts(unwrap_model(loaded.model))[2].shape[0]
        if any(t >= vocab for x in [x for x, _s in texts] + prompts for t in x):
            raise SpecEEError(f"--data {data_file} holds token ids >= the model's vocabulary ({vocab}): "
                              "packed for another model")
    else:
        convs = list(sharegpt_conversations(conversations + self_generated + 2000))
        train_convs = convs[:conversations]
        gen_items = convs[conversations : conversations + self_generated]
        vocab_convs = convs[conversations + self_generated :]
        source = "ShareGPT first turn + reply"
    load_s = time.time() - t_load
    t0 = time.time()
    deadline = t0 + time_budget_s if time_budget_s else None
    on_cuda = device is not None and torch.device(device).type == "cuda"
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    if on_cuda and tf32:  # the teacher's fp32 matmuls on tensor cores (generation, collection); restored below
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _train_draft_run(loaded, tok, out_dir, model_name, device, on_cuda, t0, deadline, load_s, source,
                                gen_items, train_convs, vocab_convs, init_path=init, init_draft=init_draft,
                                steps=steps, lr=lr, seq_len=seq_len, vocab_size_limit=vocab_size_limit,
                                batch_size=batch_size, progress=progress, seed=seed, time_budget_s=time_budget_s,
                                gen_tokens=gen_tokens, aux_layers=aux_layers, unroll=unroll, exit_mix=exit_mix,
                                gen_batch_size=gen_batch_size, collect_batch_size=collect_batch_size,
                                gen_frac=gen_frac, tf32=on_cuda and tf32, draft_layers=draft_layers, force=force)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


def _check_init_dir(init, out_dir) -> None:
    """--init names a directory holding draft.safetensors, other than -o (one clear line otherwise, before the
    model loads)."""
    d = Path(init)
    if not (d / WEIGHTS_NAME).is_file():
        raise SpecEEError(f"--init {init}: no {WEIGHTS_NAME} there; expected a draft directory (the -o of an earlier "
                          "train-draft, or artifacts that hold a draft)")
    if Path(out_dir).resolve() == d.resolve():
        raise SpecEEError(f"--init {init} is also -o: the new head would overwrite the one it starts from; "
                          "pick another -o")


def _load_init(init, model) -> EagleDraft:
    """The draft to continue from, fp32 on the model (`EagleDraft.load` checks its files against the directory's
    manifest, where it has one)."""
    draft = EagleDraft.load(Path(init), model)
    draft.float()
    return draft


def _train_draft_run(loaded, tok, out_dir, model_name, device, on_cuda, t0, deadline, load_s, source, gen_items,
                     train_convs, vocab_convs, *, init_path, init_draft, steps, lr, seq_len, vocab_size_limit,
                     batch_size, progress, seed, time_budget_s, gen_tokens, aux_layers, unroll, exit_mix,
                     gen_batch_size, collect_batch_size, gen_frac, tf32, draft_layers, force) -> dict[str, Any]:
    generated: list[tuple[list[int], int]] = []
    gen_s = 0.0
    if gen_items:
        seqs, starts = generate_replies(
            loaded.model, tok, gen_items, max_new_tokens=gen_tokens, seq_len=seq_len, progress=progress,
            batch_size=gen_batch_size or (256 if on_cuda else 16),
            deadline=None if deadline is None else t0 + gen_frac * time_budget_s, return_starts=True)
        generated = list(zip(seqs, starts))
        gen_s = time.time() - t0
    items = generated + list(train_convs)  # generated first: never cut by the collection time budget
    if steps is None:
        if deadline is not None and on_cuda:
            steps = 1_000_000  # the time budget decides; the learning-rate schedule follows the clock
        else:  # ~6 epochs over the training split
            steps = max(50, int(6 * len(items) * 0.9 / batch_size))
    draft, report = train_draft(
        loaded.model, tok, items, steps=steps, lr=lr, seq_len=seq_len,
        vocab_size_limit=vocab_size_limit, progress=progress, batch_size=batch_size, seed=seed,
        vocab_texts=vocab_convs, time_budget_s=None, deadline=deadline, device=device, aux_layers=aux_layers,
        unroll=unroll, exit_mix=exit_mix, collect_batch_size=collect_batch_size, init=init_draft,
        num_layers=draft_layers or 1,
    )
    report["init"] = None if init_path is None else str(init_path)
    report["time_budget_s"] = time_budget_s or None
    report["device"] = str(device or "cpu")
    report["load_seconds"] = round(load_s, 1)
    report["self_generated"] = len(generated)
    report["self_generated_requested"] = len(gen_items)
    report["gen_tokens"] = gen_tokens if generated else None
    report["gen_seconds"] = round(gen_s, 1)
    report["teacher_tf32"] = tf32
    report["total_seconds"] = round(time.time() - t0, 1)
    report["data"] = f"{source}: {len(train_convs)} conversations" + (
        f", + {len(generated)} prompts with the model's own greedy reply" if generated else "")
    extra = {"train": report, "model": model_name}
    fp = getattr(loaded, "fingerprint", None)
    if fp is not None:
        extra["base_fingerprint"] = fp if isinstance(fp, (str, int, float, dict, list)) else str(fp)
    from ..artifacts import atomic_directory, write_manifest

    with atomic_directory(out_dir, force=force, flag="-o") as tmp:
        config = draft.save(tmp, **extra)
        write_manifest(tmp, model=model_name, fingerprint="" if fp is None else str(fp), info={"kind": "draft"})
    return config


__all__ = [
    "CONFIG_NAME",
    "DATA_FORMAT",
    "WEIGHTS_NAME",
    "choose_vocab",
    "collect_teacher_data",
    "evaluate_hits",
    "format_text",
    "generate_replies",
    "load_training_data",
    "pack_training_data",
    "prompt_ids",
    "tokenizer_fingerprint",
    "train_draft",
    "train_draft_command",
    "unrolled_forward",
    "unrolled_mask",
]
