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
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterable
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
) -> list[list[int]]:
    """Self-distillation data: prompt ids + the base model's own greedy reply, batched (left padding).
    Prompts are cut so prompt + reply fits ``seq_len``. Stops early once ``time_budget_s`` is spent."""
    from tqdm.auto import tqdm

    hf = unwrap_model(model)
    dev = next(hf.parameters()).device
    room = max(16, seq_len - max_new_tokens)
    prompts = [p[-room:] for p in (prompt_ids(tokenizer, it) for it in items) if p]
    prompts.sort(key=len)  # similar lengths per batch: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    t0 = time.time()
    bar = tqdm(total=len(prompts), desc="generate (base model)", disable=not progress, unit="seq")
    for b in range(0, len(prompts), batch_size):
        if time_budget_s is not None and out and time.time() - t0 > time_budget_s:
            break
        chunk = prompts[b : b + batch_size]
        width = max(len(p) for p in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, p in enumerate(chunk):
            x[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen = hf.generate(x.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, pad_token_id=pad)
        for i, p in enumerate(chunk):
            reply = gen[i, width:].tolist()
            if eos is not None and eos in reply:
                reply = reply[: reply.index(eos) + 1]
            out.append(p + reply)
        bar.update(len(chunk))
    bar.close()
    return out


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
) -> dict[str, Any]:
    """Run the frozen base model over ``texts``; see the module doc. Returns padded tensors
    (``ids`` [S, T], ``lengths`` [S], ``final`` [S, T, D] fp16, ``aux`` [A, S, T, D] fp16,
    ``argmax`` [S, T]) plus ``aux_layers``. Stops early (keeping what it has, at least
    ``min_sequences``) once ``time_budget_s`` is spent."""
    from tqdm.auto import tqdm

    hf = unwrap_model(model)
    cfg, _e, _h, norm = base_parts(hf)
    layers = hf.model.layers
    L = len(layers)
    aux_layers = default_aux_layers(L) if aux_layers is None else sorted(set(aux_layers))
    if any(l < 0 or l >= L - 1 for l in aux_layers):
        raise SpecEEError(f"aux_layers must be in [0, {L - 2}], got {aux_layers}")
    dev = next(hf.parameters()).device

    seqs: list[list[int]] = []
    for item in texts:
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], int):
            ids = list(item)[:seq_len]  # already token ids (e.g. from generate_replies)
        else:
            text = format_text(tokenizer, item)
            if not text:
                continue
            ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
            ids = list(ids)[:seq_len]
        if len(ids) >= min_tokens:
            seqs.append(ids)
    if not seqs:
        raise SpecEEError("no usable training text (every text was empty or shorter than 16 tokens)")

    S, T, D = len(seqs), max(len(s) for s in seqs), cfg.hidden_size
    ids_t = torch.zeros(S, T, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    final = torch.zeros(S, T, D, dtype=torch.float16)
    aux = torch.zeros(len(aux_layers), S, T, D, dtype=torch.float16)
    argmax = torch.zeros(S, T, dtype=torch.long)

    captured: dict[int, torch.Tensor] = {}

    def hook(idx):
        def fn(_mod, _inp, out):
            captured[idx] = out[0] if isinstance(out, (tuple, list)) else out

        return fn

    handles = [layers[l].register_forward_hook(hook(l)) for l in aux_layers]
    t0 = time.time()
    done = 0
    try:
        for i, s in enumerate(tqdm(seqs, desc="collect (base model)", disable=not progress, unit="seq")):
            if time_budget_s is not None and i >= min_sequences and time.time() - t0 > time_budget_s:
                break
            x = torch.tensor([s], device=dev)
            body = hf.model(input_ids=x, use_cache=False)
            h = body.last_hidden_state[0]  # already final-normed
            logits = hf.get_output_embeddings()(h)
            n = len(s)
            ids_t[i, :n] = x[0].cpu()
            final[i, :n] = h.float().cpu().half()
            argmax[i, :n] = logits.argmax(-1).cpu()
            for a, l in enumerate(aux_layers):
                aux[a, i, :n] = norm(captured[l][0]).float().cpu().half()
            done = i + 1
    finally:
        for hd in handles:
            hd.remove()
    T = int(lengths[:done].max())
    return {"ids": ids_t[:done, :T], "lengths": lengths[:done], "final": final[:done, :T],
            "aux": aux[:, :done, :T], "argmax": argmax[:done, :T], "aux_layers": aux_layers,
            "seconds": time.time() - t0}


def choose_vocab(data: dict, vocab_size_limit: int | None, vocab_size: int, extra_counts: Counter | None = None,
                 always: Iterable[int] = ()) -> torch.Tensor:
    """The ``vocab_size_limit`` most frequent tokens among the base model's own predictions (counted
    twice) and the training text; ``always`` ids (EOS, end-of-turn) are kept. Most frequent first."""
    counts: Counter = Counter()
    for i, n in enumerate(data["lengths"].tolist()):
        counts.update(data["ids"][i, :n].tolist())
        for t in data["argmax"][i, :n].tolist():
            counts[t] += 2
    if extra_counts:
        counts.update(extra_counts)
    limit = vocab_size if not vocab_size_limit else min(vocab_size_limit, vocab_size)
    ranked = [t for t, _ in counts.most_common()]
    keep = [t for t in always if 0 <= t < vocab_size]
    chosen = list(dict.fromkeys([t for t in ranked if t < vocab_size][:limit] + keep))
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
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        draft.fc.weight[:, d:] += torch.eye(d)
        for layer in draft.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)


def _split(n: int, val_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_frac)) if n > 4 else 0
    return perm[n_val:], perm[:n_val]


def _batch(data, idx, vocab_map, aux_mix: float, gen: torch.Generator | None):
    """Inputs/targets for sequences ``idx``: pairs t = 0..n-2 of each."""
    lengths = data["lengths"][idx]
    T = int(lengths.max()) - 1
    ids = data["ids"][idx, : T + 1]
    feats = data["final"][idx, :T].float()
    if aux_mix > 0 and data["aux"].shape[0] > 0:
        A = data["aux"].shape[0]
        use = torch.rand(feats.shape[:2], generator=gen) < aux_mix
        which = torch.randint(0, A, feats.shape[:2], generator=gen)
        aux = data["aux"][:, idx, :T].float()  # [A, B, T, D]
        picked = torch.gather(aux, 0, which[None, :, :, None].expand(1, *feats.shape)).squeeze(0)
        feats = torch.where(use[..., None], picked, feats)
    nxt = ids[:, 1 : T + 1]
    tgt_feat = data["final"][idx, 1 : T + 1].float()
    tgt_tok = vocab_map[data["argmax"][idx, 1 : T + 1]]
    valid = torch.arange(T)[None, :] < (lengths[:, None] - 1)
    tgt_tok = torch.where(valid, tgt_tok, torch.full_like(tgt_tok, -100))
    pos = torch.arange(T)[None, :].expand(len(idx), T)
    return feats, nxt, pos, tgt_feat, tgt_tok, valid


@torch.no_grad()
def evaluate_hits(draft: EagleDraft, data, idx, vocab_map, k: int = 4, aux_index: int | None = None,
                  batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced hit rates on sequences ``idx``: is the base model's argmax next token the draft's
    top-1 / in its top-k? ``aux_index`` = use recorded exit-layer features as inputs (exit case)."""
    hit1 = hitk = total = 0
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        feats, nxt, pos, _tf, _tt, valid = _batch(data, b, vocab_map, 0.0, None)
        if aux_index is not None:
            T = feats.shape[1]
            feats = data["aux"][aux_index, b, :T].float()
        dev = draft.fc.weight.device
        g, _ = draft(feats.to(dev), nxt.to(dev), pos.to(dev))
        top = draft.vocab_ids[torch.topk(draft.logits(g), k, dim=-1).indices].cpu()  # [B, T, k]
        truth = data["argmax"][b, 1 : feats.shape[1] + 1]
        hit1 += ((top[..., 0] == truth) & valid).sum().item()
        hitk += (((top == truth[..., None]).any(-1)) & valid).sum().item()
        total += valid.sum().item()
    return {"top1": hit1 / max(total, 1), f"top{k}": hitk / max(total, 1), "positions": total}


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
) -> tuple[EagleDraft, dict[str, Any]]:
    """Self-distil an EAGLE-1 draft from ``model`` (frozen) on ``texts`` (strings or conversations).
    Returns (draft bound to ``model``, report). ``data`` reuses a ``collect_teacher_data`` result.

    ``time_budget_s`` bounds the wall time: collection stops after ``collect_frac`` of it, and
    training runs ``steps`` steps or until the budget is spent, whichever is first (the learning-rate
    schedule follows whichever is closer to done). None = no limit.

    ``device``: where the draft trains (default: the CPU). ``"cuda"`` trains on the GPU: the teacher
    data stays in host memory (fp16) and each batch moves over; the base model collects on its own
    device (load it on the GPU too, ``train_draft_command(device="cuda")``)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    hf = unwrap_model(model)
    hf.eval()
    _cfg, _embed_w, head_w, _ = base_parts(hf)
    torch.manual_seed(seed)
    if data is None:
        data = collect_teacher_data(
            hf, tokenizer, texts, seq_len=seq_len, aux_layers=aux_layers, progress=progress,
            time_budget_s=None if time_budget_s is None else collect_frac * time_budget_s,
        )
    t_collect = time.time() - t0

    extra = Counter()
    if vocab_texts is not None:
        for item in vocab_texts:
            text = format_text(tokenizer, item)
            if text:
                extra.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    always = [t for t in [tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)] if t is not None]
    vocab_ids = choose_vocab(data, vocab_size_limit, head_w.shape[0], extra, always)
    vocab_map = torch.full((head_w.shape[0],), -100, dtype=torch.long)
    vocab_map[vocab_ids] = torch.arange(len(vocab_ids))

    draft = EagleDraft(hf, vocab_ids)
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        from ..config import check_device

        check_device(str(dev))
    draft.float()  # train in fp32 whatever the base dtype (embed/head buffers are copies then)
    draft.embed_weight = draft.embed_weight.float().to(dev)
    draft.head_rows = draft.head_rows.float().to(dev)
    draft.to(dev)
    _init_draft(draft, seed)
    draft.train()

    tr_idx, val_idx = _split(int(data["ids"].shape[0]), val_frac, seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warm = max(1, steps // 20)

    def lr_at(step, frac):
        if step < warm:
            return lr * (step + 1) / warm
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    gen = torch.Generator().manual_seed(seed + 1)
    curve: list[dict[str, float]] = []
    order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
    ptr = 0
    bar = tqdm(range(steps), desc="train draft", disable=not progress, unit="step")
    ema = None
    t1 = time.time()
    train_budget = None if time_budget_s is None else max(10.0, time_budget_s - (t1 - t0) - 15.0)
    stopped_early = False
    for step in bar:
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
            t.to(dev, non_blocking=True) for t in _batch(data, idx, vocab_map, exit_mix, gen))
        g, _ = draft(feats, nxt, pos)
        reg = (F.smooth_l1_loss(g, tgt_feat, reduction="none").mean(-1) * valid).sum() / valid.sum()
        ce = F.cross_entropy(draft.logits(g).flatten(0, 1), tgt_tok.flatten(), ignore_index=-100)
        loss = reg_weight * reg + ce_weight * ce
        for group in opt.param_groups:
            group["lr"] = lr_at(step, frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "loss": loss.item(), "reg": reg.item(), "ce": ce.item()}
        curve.append(rec)
        ema = rec["loss"] if ema is None else 0.9 * ema + 0.1 * rec["loss"]
        bar.set_postfix(loss=f"{ema:.3f}", ce=f"{rec['ce']:.3f}")
    t_train = time.time() - t1
    draft.eval()

    report: dict[str, Any] = {
        "sequences": int(data["ids"].shape[0]),
        "train_sequences": len(tr_idx),
        "val_sequences": len(val_idx),
        "tokens": int(data["lengths"].sum()),
        "seq_len": seq_len,
        "steps": len(curve),
        "steps_requested": steps,
        "stopped_by_time_budget": stopped_early,
        "time_budget_s": time_budget_s,
        "batch_size": batch_size,
        "epochs": round(len(curve) * batch_size / max(1, len(tr_idx)), 2),
        "lr": lr,
        "reg_weight": reg_weight,
        "ce_weight": ce_weight,
        "exit_mix": exit_mix,
        "aux_layers": list(data["aux_layers"]),
        "vocab_size_limit": vocab_size_limit,
        "num_vocab_ids": len(vocab_ids),
        "collect_seconds": round(t_collect, 1),
        "train_seconds": round(t_train, 1),
        "first_loss": sum(r["loss"] for r in curve[:5]) / max(1, len(curve[:5])),
        "final_loss": sum(r["loss"] for r in curve[-10:]) / max(1, len(curve[-10:])),
        "loss_curve": [round(r["loss"], 4) for r in curve[:: max(1, len(curve) // 50)]],
    }
    # how many dense-model next tokens the restricted vocabulary can express at all
    tot = inv = 0
    for i, n in enumerate(data["lengths"].tolist()):
        a = data["argmax"][i, :n]
        tot += n
        inv += (vocab_map[a] >= 0).sum().item()
    report["vocab_coverage"] = inv / max(tot, 1)
    if len(val_idx):
        report["val_final_layer"] = evaluate_hits(draft, data, val_idx, vocab_map, k_eval)
        if data["aux"].shape[0]:
            target = (2 * len(hf.model.layers)) // 3  # the benchmark's "middle" exit layer
            mid = min(range(len(data["aux_layers"])), key=lambda a: abs(data["aux_layers"][a] - target))
            report["val_exit_layer"] = {
                "layer": data["aux_layers"][mid],
                **evaluate_hits(draft, data, val_idx, vocab_map, k_eval, aux_index=mid),
            }
    # rebind to the base model's own (shared) embeddings/head, in its dtype and device
    sd = {k: v.detach().clone() for k, v in draft.state_dict().items()}
    bound = EagleDraft.from_state_dict(hf, sd, None, source="trained draft")
    report["total_seconds"] = round(time.time() - t0, 1)
    return bound, report


# ------------------------------------------------------------------ CLI entry


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
) -> dict[str, Any]:
    """``specee-compile train-draft MODEL``: load MODEL, self-distil a draft on ShareGPT first turns
    (+ replies), write ``out_dir``/draft.safetensors + draft_config.json; return the config dict
    (which embeds the training report under "train").

    ``self_generated`` > 0: for that many extra conversations the reply is the base model's own greedy
    output (``gen_tokens`` tokens), closer to what the draft sees at inference; costly on CPU
    (several seconds per conversation), so off by default. It is not counted in ``time_budget_s``.

    ``device`` (``--device cuda``): the base model loads there (fp32) and collects the teacher data
    (the target's own hidden states) there, and the draft trains there; None = the settings' device,
    else the CPU. ``aux_layers``: exit layers whose features are recorded for exit-layer mixing
    (default: every 2nd from L/3; fewer layers = less host memory for large runs)."""
    from ..data import sharegpt_conversations
    from ..errors import SpecEEError
    from ..models import load_model

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise SpecEEError(f"--steps must be an integer >= 1, got {steps!r}")
    if device is None and settings is not None:
        device = getattr(settings, "device", None)
    if device is not None and torch.device(device).type == "cuda":
        from ..config import check_device

        check_device(device)  # one clear line before anything loads
    if settings is None and device is None:
        loaded = load_model(model_name)
    else:  # fp32 on the training device; the trained draft is cast to the runtime dtype on load
        loaded = load_model(model_name, dtype=torch.float32, device=device or "cpu")
    convs = list(sharegpt_conversations(conversations + self_generated + 2000))
    train_convs = convs[:conversations]
    gen_convs = convs[conversations : conversations + self_generated]
    vocab_convs = convs[conversations + self_generated :]
    if gen_convs:
        generated = generate_replies(loaded.model, loaded.tokenizer, gen_convs, max_new_tokens=gen_tokens,
                                     seq_len=seq_len, progress=progress)
        train_convs = generated + train_convs  # first: never cut by the collection time budget
    if steps is None:  # ~6 epochs over the training split
        steps = max(50, int(6 * conversations * 0.9 / batch_size))
    draft, report = train_draft(
        loaded.model, loaded.tokenizer, train_convs, steps=steps, lr=lr, seq_len=seq_len,
        vocab_size_limit=vocab_size_limit, progress=progress, batch_size=batch_size, seed=seed,
        vocab_texts=vocab_convs, time_budget_s=time_budget_s, device=device, aux_layers=aux_layers,
    )
    report["device"] = str(device or "cpu")
    report["data"] = f"ShareGPT first turn + reply, {conversations} conversations" + (
        f", + {len(gen_convs)} with the model's own greedy reply" if gen_convs else "")
    extra = {"train": report, "model": model_name}
    fp = getattr(loaded, "fingerprint", None)
    if fp is not None:
        extra["base_fingerprint"] = fp if isinstance(fp, (str, int, float, dict, list)) else str(fp)
    config = draft.save(out_dir, **extra)
    return config


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "choose_vocab",
    "collect_teacher_data",
    "evaluate_hits",
    "format_text",
    "generate_replies",
    "prompt_ids",
    "train_draft",
    "train_draft_command",
]
