"""EAGLE-1 draft head, the paper's candidate source.

Architecture (as in EAGLE-1, SafeAILab ``eagle/model/cnets.py``):
    x_t  = fc(concat[embed(token_{t+1}), f_t])          fc: Linear(2d -> d, bias)
    g_t  = DecoderLayer(x_t) over draft positions 0..t    (one Llama layer, causal, RoPE at position t;
                                                          EAGLE-1's layer 0 has NO input_layernorm)
    logits = g_t @ lm_head[vocab_ids]^T                   (shared, frozen; restricted vocabulary)
g_t regresses f_{t+1}; the logits predict token_{t+2}.

Features: f_t = final_norm(h_t), the *normed* hidden state, in training and inference alike. This is
what EAGLE-1 uses too (the HF LlamaModel output it reads is already normed), so the draft output goes
to the LM head without another norm, and public EAGLE-1 checkpoints load unchanged. At an early exit
the runtime passes final_norm(h_l) of the exit layer l instead of the final layer's.

The embedding and LM head are the base model's (shared, never saved). Our own drafts are saved as
safetensors (fp16 weights + the int64 ``vocab_ids``) with a small JSON config; never pickle.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its exception type: checkpoints are read with weights_only=True
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled_fns import CompiledFns
from ..errors import ArtifactError, SpecEEError
from .base import CandidateSource, as_token_list, base_parts, check_truncate, fill_unique

DRAFT_FORMAT = "specee-eagle1-draft"
DRAFT_VERSION = 1
WEIGHTS_NAME = "draft.safetensors"
CONFIG_NAME = "draft_config.json"


def _gather_rows(head_w: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """LM-head rows for vocab_ids; the head itself (no copy) when vocab_ids is the full range."""
    head_w = head_w.detach()
    if vocab_ids.numel() == head_w.shape[0] and torch.equal(
        vocab_ids.cpu(), torch.arange(head_w.shape[0])
    ):
        return head_w
    return head_w[vocab_ids.to(head_w.device)].clone()


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


class _Linear(nn.Linear):
    """nn.Linear whose inference calls run in the CPU matmul library the target's backend chose, once the draft
    is told to (`EagleDraft.use_cpu_gemm`): oneDNN copies of the weight, kept current by `OneDnnWeights`."""

    gemm = None  # a backends.cpu_gemm.OneDnnWeights, or None (F.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is None or torch.is_grad_enabled():
            return super().forward(x)
        return self.gemm.linear(x, self.weight, self.bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class DraftAttention(nn.Module):
    """Llama attention (GQA, RoPE) over the draft's own cached positions. Keys: q/k/v/o_proj."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or d // self.num_heads
        bias = bool(getattr(cfg, "attention_bias", False))
        self.q_proj = _Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = _Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = _Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = _Linear(self.num_heads * self.head_dim, d, bias=bias)

    def _qkv(self, x, cos, sin):
        # x [B, T, D]; cos/sin [B, T, hd] -> q [B, H, T, hd], k, v [B, kvh, T, hd] (RoPE applied)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos = cos.unsqueeze(1)
        sin = sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def forward(self, x, cos, sin, past=None):
        """x [B, T, D]; cos/sin [B, T, hd]; past (K, V) each [B, kvh, C, hd] post-RoPE, or None.
        Returns (out [B, T, D], (k_new, v_new)) where k_new/v_new [B, kvh, T, hd] are this chunk only."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        new = (k, v)
        if past is not None and past[0].shape[2] > 0:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        C = k.shape[2] - T
        if T == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif C == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            i = torch.arange(T, device=x.device)[:, None]
            j = torch.arange(C + T, device=x.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=j <= C + i)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out), new

    def forward_masked(self, x, cos, sin, k_prefix, v_prefix, mask):
        """T rows (batch 1) attending to a K/V prefix [1, kvh, C, hd] and to each other under an explicit
        mask [T, C + T] (the draft tree). Returns (out [1, T, D], (k, v) of these rows)."""
        T = x.shape[1]
        q, k, v = self._qkv(x, cos, sin)
        kk, vv = torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[None, None],
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(1, T, self.num_heads * self.head_dim)), (k, v)


class DraftMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from transformers.activations import ACT2FN

        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_proj = _Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = _Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = _Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act_fn = ACT2FN[getattr(cfg, "hidden_act", "silu")]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """A Llama decoder layer; ``input_norm=False`` is EAGLE-1's layer 0 (no input_layernorm: identity)."""

    def __init__(self, cfg, input_norm: bool):
        super().__init__()
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        if input_norm:
            self.input_layernorm = _RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, eps)

    def _in(self, x):
        return self.input_layernorm(x) if hasattr(self, "input_layernorm") else x

    def forward(self, x, cos, sin, past=None):
        a, new = self.self_attn(self._in(x), cos, sin, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new

    def forward_masked(self, x, cos, sin, k_prefix, v_prefix, mask):
        """`forward` for rows under an explicit mask (DraftAttention.forward_masked)."""
        a, new = self.self_attn.forward_masked(self._in(x), cos, sin, k_prefix, v_prefix, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new


class EagleDraft(nn.Module):
    """EAGLE-1 draft head bound to a base model's (frozen, shared) embeddings and LM head.

    State-dict keys follow EAGLE's layout: ``fc.weight``, ``fc.bias``, ``layers.{i}.self_attn.*``,
    ``layers.{i}.mlp.*``, ``layers.{i}.post_attention_layernorm.weight`` (+ ``input_layernorm`` when
    present), plus our ``vocab_ids`` (int64, frequent-token vocabulary, most frequent first).
    """

    def __init__(
        self,
        model,
        vocab_ids: torch.Tensor | None = None,
        *,
        num_layers: int = 1,
        input_norm: bool = False,
        fc_bias: bool = True,
    ):
        super().__init__()
        cfg, embed_w, head_w, _norm = base_parts(model)
        self.base_config = cfg
        d = cfg.hidden_size
        self.hidden_size = d
        self.vocab_size = head_w.shape[0]
        self.input_norm = bool(input_norm)
        self.fc = _Linear(2 * d, d, bias=fc_bias)
        self.layers = nn.ModuleList([DraftDecoderLayer(cfg, self.input_norm) for _ in range(num_layers)])
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.rotary = LlamaRotaryEmbedding(config=cfg)
        if vocab_ids is None:
            vocab_ids = torch.arange(self.vocab_size)
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).reshape(-1)
        if vocab_ids.numel() == 0 or int(vocab_ids.max()) >= self.vocab_size or int(vocab_ids.min()) < 0:
            raise ArtifactError(
                f"draft vocab_ids must be non-empty ids in [0, {self.vocab_size}); got {vocab_ids.numel()} ids"
            )
        self.register_buffer("vocab_ids", vocab_ids.to(head_w.device), persistent=True)
        # shared, frozen, never saved
        self.register_buffer("embed_weight", embed_w.detach(), persistent=False)
        self.register_buffer("head_weight", head_w.detach(), persistent=False)  # full head (context vocab)
        self.register_buffer("head_rows", _gather_rows(head_w, self.vocab_ids), persistent=False)
        self.to(device=head_w.device, dtype=head_w.dtype)
        self.quant = "none"  # `quantize`
        self._gemm = None  # `use_cpu_gemm`
        self._fused_layers: list | None = None  # `fused_layers`
        self._int8: dict = {}  # quantize("int8"): "layers" (LayerWeights of int8 pairs), "fc", "head"
        # the draft tree shape measured best with this head, per device (key: `Settings.tree_shape_key`, "cuda",
        # "cpu" or "cpu-onednn"; value: (budget, depth, top-k)): draft_config.json's `tree_shapes`, which
        # `Settings.tree_shape` takes over the device's default
        self.tree_shapes: dict[str, tuple[int, int, int]] = {}

    # ---------------------------------------------------------------- compute
    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def set_vocab_ids(self, vocab_ids: torch.Tensor, head_weight: torch.Tensor) -> None:
        """(Re)bind the restricted vocabulary; gathers the matching LM-head rows (shared when full)."""
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).reshape(-1).to(head_weight.device)
        self.vocab_ids = vocab_ids
        self.head_rows = _gather_rows(head_weight, vocab_ids).to(self.dtype)
        if self.quant == "int8":
            self._quantize_head()

    def fused_layers(self) -> list:
        """The layers' weights as `model_step.LayerWeights` (q/k/v and gate/up fused once; the modules are
        re-pointed at views of them, so the draft is held once): what `model_step`'s layer function runs."""
        from ..model_step import fuse_layer

        if self._fused_layers is None:
            self._fused_layers = [
                fuse_layer(layer.self_attn, layer.mlp,
                           layer.input_layernorm.weight if hasattr(layer, "input_layernorm") else None,
                           layer.post_attention_layernorm.weight)
                for layer in self.layers]
        return self._fused_layers

    @torch.no_grad()
    def cast(self, dtype: torch.dtype) -> None:
        """Compute in `dtype` from now on (`Settings.draft_dtype`): the fc, the layers and the draft's copies of the
        base model's embeddings and head rows are cast (the base model is untouched); the rotary embedding stays as
        built, so its angles keep their precision. Before `quantize`, and before a source binds the buffers (a
        source built earlier re-allocates them: `EagleSource.retype`)."""
        if dtype == self.dtype:
            return
        if self.quant != "none":
            raise SpecEEError(f"cast a draft before quantizing it; this one is already {self.quant}")
        self._fused_layers = None  # the fused q/k/v and gate/up weights are fused again, in the new dtype
        self.fc.to(dtype=dtype)
        self.layers.to(dtype=dtype)
        for name in ("embed_weight", "head_weight", "head_rows"):
            setattr(self, name, getattr(self, name).to(dtype))
        if self._gemm is not None:  # no oneDNN copies of the old weights (`use_cpu_gemm`)
            self.use_cpu_gemm("onednn")

    @torch.no_grad()
    def quantize(self, kind: str) -> None:
        """`--draft-quant`: "int8" rounds every matmul weight of the draft (fc, each layer's q/k/v/o/gate/up/down,
        the static vocabulary's head rows) to int8 with one scale per output row (`ops.quantize_rows`), in
        place. The modules then compute with the rounded weights (q * scale), so every path proposes the same
        tokens, and `matmul_weights(int8=True)` gives the int8 pairs the CUDA kernels stream: half the bytes
        of an fp16 draft per pass. The target model is untouched (the output stays the target's); the
        context-vocabulary rows stay as they are. Idempotent; a quantized draft cannot go back."""
        from ..ops import dequantize_rows, quantize_rows

        if kind == self.quant:
            return
        if kind != "int8":
            raise SpecEEError(f"draft quantization {kind!r}: this draft is already {self.quant}; expected "
                               "'int8' (or reload the draft for 'none')")
        layers = self.fused_layers()
        self._int8["layers"] = [lw.quantized() for lw in layers]
        for lw, q in zip(layers, self._int8["layers"]):
            for name in ("wqkv", "wo", "wgu", "wd"):
                getattr(lw, name).copy_(dequantize_rows(*getattr(q, name), self.dtype))
        self._int8["fc"] = quantize_rows(self.fc.weight)
        self.fc.weight.copy_(dequantize_rows(*self._int8["fc"], self.dtype))
        self.quant = "int8"
        self._quantize_head()

    def _quantize_head(self) -> None:
        from ..ops import dequantize_rows, quantize_rows

        self._int8["head"] = quantize_rows(self.head_rows)
        # a new tensor: with the full vocabulary head_rows is the base model's own LM head, never written
        self.head_rows = dequantize_rows(*self._int8["head"], self.dtype)

    def matmul_weights(self, int8: bool) -> tuple[list, Any, Any]:
        """(layers as `LayerWeights`, fc weight, head rows) for `model_step`'s functions: the int8 pairs where
        `int8` and the draft is quantized, else the modules' own (float) weights."""
        if int8 and self.quant == "int8":
            return self._int8["layers"], self._int8["fc"], self._int8["head"]
        return self.fused_layers(), self.fc.weight, self.head_rows

    def forward(self, feats, next_ids, positions, past=None):
        """feats [B, T, D] (f_t), next_ids [B, T] (token_{t+1}), positions [B, T] (t).
        past: per-layer (K, V) [B, kvh, C, hd] for draft positions < positions[:, 0], or None.
        Returns (g [B, T, D] ~ f_{t+1}, per-layer (k_new, v_new) for these T positions)."""
        emb = F.embedding(next_ids, self.embed_weight).to(self.dtype)
        x = self.fc(torch.cat([emb, feats.to(self.dtype)], dim=-1))
        cos, sin = self.rotary(x, positions)
        presents = []
        for i, layer in enumerate(self.layers):
            x, new = layer(x, cos, sin, None if past is None else past[i])
            presents.append(new)
        return x, presents

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """Logits over the restricted vocabulary (index i <-> token vocab_ids[i])."""
        if self._gemm is not None and not torch.is_grad_enabled():
            return self._gemm.linear(g, self.head_rows)
        return g @ self.head_rows.T

    def use_cpu_gemm(self, library: str) -> None:
        """Run the draft's inference matmuls (its linears and head rows) in `library`, the CPU matmul library the
        target's eager backend chose (`backends/cpu_gemm.py`): "onednn" over copies of the weights kept current
        as they change (quantization, a new vocabulary), "mkl" = F.linear. Training is unaffected. The choice was
        timed in float32: a draft cast to 16 bits (`cast`) keeps F.linear (oneDNN's fp16 path needs CPU features
        many hosts lack)."""
        from ..backends.cpu_gemm import OneDnnWeights

        self._gemm = OneDnnWeights() if library == "onednn" and self.dtype == torch.float32 else None
        for m in self.modules():
            if isinstance(m, _Linear):
                m.gemm = self._gemm

    # ---------------------------------------------------------------- config / io
    def draft_config(self, **extra) -> dict[str, Any]:
        cfg = self.base_config
        attn = self.layers[0].self_attn
        out = {
            "format": DRAFT_FORMAT,
            "version": DRAFT_VERSION,
            "architecture": "eagle1",
            "feature": "final_norm(hidden) of the exit layer",
            "hidden_size": self.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": attn.num_heads,
            "num_key_value_heads": attn.num_kv_heads,
            "head_dim": attn.head_dim,
            "num_layers": len(self.layers),
            "input_norm": self.input_norm,
            "fc_bias": self.fc.bias is not None,
            "base_vocab_size": self.vocab_size,
            "num_vocab_ids": int(self.vocab_ids.numel()),
            "weights": WEIGHTS_NAME,
            "weights_dtype": "float16",
        }
        if self.tree_shapes:
            out["tree_shapes"] = {kind: list(shape) for kind, shape in self.tree_shapes.items()}
        out.update(extra)
        return out

    def save(self, out_dir: str | os.PathLike, **extra_config) -> dict[str, Any]:
        """Write draft.safetensors (fp16 weights, int64 vocab_ids) + draft_config.json; return the config."""
        from ..artifacts import save_tensors

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            tensors[k] = v.contiguous() if k == "vocab_ids" else v.to(torch.float16).contiguous()
        config = self.draft_config(**extra_config)
        save_tensors(tensors, out / WEIGHTS_NAME, metadata={"format": DRAFT_FORMAT})
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return config

    @classmethod
    def from_state_dict(
        cls, model, sd: dict[str, torch.Tensor], config: dict | None = None, *, source: str = "state dict"
    ) -> EagleDraft:
        """Build from our own state dict (keys as produced by ``save``), checking it fits the base model."""
        _cfg, _embed_w, head_w, _ = base_parts(model)
        config = dict(config or {})
        if config.get("format", DRAFT_FORMAT) != DRAFT_FORMAT:
            raise ArtifactError(f"{source}: draft format {config.get('format')!r}, expected {DRAFT_FORMAT!r}")
        if "vocab_ids" not in sd:
            raise ArtifactError(f"{source}: no 'vocab_ids' tensor; re-run `specee-compile train-draft`")
        layer_idx = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
        num_layers = (max(layer_idx) + 1) if layer_idx else 0
        if num_layers == 0:
            raise ArtifactError(f"{source}: no 'layers.N.*' weights found")
        input_norm = any(k.endswith("input_layernorm.weight") for k in sd)
        draft = cls(
            model, sd["vocab_ids"], num_layers=num_layers, input_norm=input_norm, fc_bias="fc.bias" in sd
        )
        want = draft.state_dict()
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        if missing or unexpected:
            raise ArtifactError(
                f"{source}: draft weights do not fit this model (missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}); was it trained for another model?"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(want[k].shape):
                raise ArtifactError(
                    f"{source}: {k} has shape {tuple(v.shape)}, this model needs {tuple(want[k].shape)}; "
                    "the draft was trained for another model (hidden size mismatch)"
                )
        if "base_vocab_size" in config and int(config["base_vocab_size"]) != draft.vocab_size:
            raise ArtifactError(
                f"{source}: draft made for a vocabulary of {config['base_vocab_size']}, "
                f"this model has {draft.vocab_size}"
            )
        draft.tree_shapes = tree_shapes_from_config(config.get("tree_shapes"), source)
        sd = {k: (v if k == "vocab_ids" else v.to(draft.dtype)) for k, v in sd.items()}
        draft.load_state_dict(sd, strict=True)
        draft.set_vocab_ids(draft.vocab_ids, head_w)
        draft.eval()
        return draft

    @classmethod
    def load(cls, path: str | os.PathLike, model, *, manifest_checked: bool = False) -> EagleDraft:
        """Load our draft from a directory (draft.safetensors + draft_config.json) or the .safetensors file; where
        the directory has a manifest (artifacts, train-draft's output), both files are checked against it first,
        unless the caller has just verified that manifest whole (`manifest_checked`: `api.load_program`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..artifacts import verify_listed

        p = Path(path)
        weights = p / WEIGHTS_NAME if p.is_dir() else p
        cfg_path = weights.parent / CONFIG_NAME
        if not weights.is_file():
            raise ArtifactError(f"draft weights not found at {weights}; run `specee-compile train-draft MODEL`")
        if not manifest_checked:
            verify_listed(weights.parent, [weights.name, CONFIG_NAME])  # where a manifest covers them
        try:
            sd = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:  # corrupt / partial file
            raise ArtifactError(f"cannot read draft weights {weights}: {e}") from None
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        return cls.from_state_dict(model, sd, config, source=str(weights))


def tree_shapes_from_config(value, source: str) -> dict[str, tuple[int, int, int]]:
    """draft_config.json's optional `tree_shapes` ({device key: [budget, depth, top-k]}, the shapes measured best
    with this head; keys as `Settings.tree_shape_key`) as a dict of tuples; ArtifactError (one line) where it is
    anything else."""
    if value is None:
        return {}
    from ..config import TREE_SHAPES

    kinds = tuple(TREE_SHAPES)  # the keys `Settings.tree_shape_key` gives
    ok = isinstance(value, dict) and all(
        k in kinds and isinstance(v, list) and len(v) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v) for k, v in value.items())
    if not ok:
        raise ArtifactError(f"{source}: draft_config.json's tree_shapes is {value!r}, expected an object mapping "
                            f"a device ({', '.join(kinds)}) to [budget, depth, top-k], three positive "
                            "integers; fix or remove the entry")
    return {k: tuple(v) for k, v in value.items()}


# ------------------------------------------------------------------ public EAGLE-1 checkpoints
_EAGLE_PREFIXES = ("ea_layer.", "module.", "model.")
_EAGLE_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rotary_emb\.(cos|sin)_cached)$")


def load_eagle_state_dict(
    sd: dict[str, torch.Tensor], model, vocab_ids: torch.Tensor | None = None, *, source: str = "EAGLE checkpoint"
) -> EagleDraft:
    """Build an EagleDraft from a public EAGLE-1 head state dict (``fc.*``, ``layers.0.self_attn.*``,
    ``layers.0.mlp.*``, ``layers.0.post_attention_layernorm.weight``, optionally ``embed_tokens.weight``;
    EAGLE-1 has no ``layers.0.input_layernorm`` -> identity). ``embed_tokens`` is checked against the
    base model's embedding shape and otherwise ignored (the base model's embedding is used).
    ``vocab_ids`` restricts the head (default: full vocabulary)."""
    cfg, embed_w, head_w, _ = base_parts(model)
    clean: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for pre in _EAGLE_PREFIXES:
            k = k.removeprefix(pre)
        if _EAGLE_IGNORED.search(k):
            continue
        clean[k] = v
    emb = clean.pop("embed_tokens.weight", None)
    if emb is not None and tuple(emb.shape) != tuple(embed_w.shape):
        raise ArtifactError(
            f"{source}: embed_tokens {tuple(emb.shape)} does not match the base model's "
            f"{tuple(embed_w.shape)}; this EAGLE head belongs to another model"
        )
    if "fc.weight" not in clean:
        raise ArtifactError(f"{source}: no fc.weight; not an EAGLE-1 head (keys: {sorted(clean)[:6]})")
    if tuple(clean["fc.weight"].shape) != (cfg.hidden_size, 2 * cfg.hidden_size):
        raise ArtifactError(
            f"{source}: fc.weight {tuple(clean['fc.weight'].shape)} does not fit hidden size {cfg.hidden_size}"
        )
    if vocab_ids is None:
        vocab_ids = torch.arange(head_w.shape[0])
    clean["vocab_ids"] = torch.as_tensor(vocab_ids, dtype=torch.long)
    return EagleDraft.from_state_dict(model, clean, None, source=source)


def load_eagle_checkpoint(path: str | os.PathLike, model, vocab_ids=None) -> EagleDraft:
    """Public EAGLE-1 head from a .safetensors file, or a pytorch_model.bin read with weights_only=True
    (tensors only, no code objects), or a directory holding either."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
    if not p.is_file():
        raise ArtifactError(f"EAGLE checkpoint not found at {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:
            raise ArtifactError(f"cannot read {p} as a tensors-only checkpoint: {e}") from None
    return load_eagle_state_dict(sd, model, vocab_ids, source=str(p))


# ------------------------------------------------------------------ runtime source
class EagleSource(CandidateSource):
    """Candidate source over an EagleDraft with its own KV cache of draft positions.

    Draft position t holds the pair (f_t, x_{t+1}); it is valid while both are. propose() runs the draft
    on all pairs not yet cached (the prompt at once after reset, one per step after) and returns the
    top-k of the last one. truncate(length) keeps pairs t <= length - 2.

    ``context_vocab`` (default on): tokens of the sequence itself (prompt + generated) that are not in
    the draft's frequent vocabulary are added to its restricted head for this sequence, so names and
    rare words copied from the prompt can still be proposed (on SmolLM2 / MT-Bench this lifts the share
    of dense tokens the head can express from ~89% to ~94% at 8192 rows). Rollback-exact: each extra
    row is dropped again when the position that introduced it is truncated.
    """

    def __init__(self, draft: EagleDraft, k: int = 4, context_vocab: bool = True):
        self.draft = draft.eval()
        self.k = int(k)
        self.context_vocab = bool(context_vocab)
        self._dev = draft.fc.weight.device
        self._static = set(draft.vocab_ids.tolist())
        self._nstatic = draft.vocab_ids.numel()
        self.ids: list[int] = []
        self.retype()

    def to(self, device) -> EagleSource:
        """The head and this source's buffers onto `device` (before the first sequence): the draft of a model
        loaded on the host follows the decoder onto its device (`api.build_decoder`)."""
        self.draft.to(device)
        self._dev = self.draft.fc.weight.device
        self.retype()
        return self

    # ---- buffers
    def _reset_buffers(self, cap: int) -> None:
        d = self.draft
        a = d.layers[0].self_attn
        self._cap = cap
        self._feats = torch.zeros(cap, d.hidden_size, dtype=self._dt, device=self._dev)
        self._k = [torch.zeros(1, a.num_kv_heads, cap, a.head_dim, dtype=self._dt, device=self._dev) for _ in d.layers]
        self._v = [torch.zeros_like(t) for t in self._k]
        self._cache_len = 0
        self._proposal: torch.Tensor | None = None

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, 2 * self._cap)
        feats, ks, vs = self._feats, self._k, self._v
        self._feats = torch.zeros(cap, feats.shape[1], dtype=self._dt, device=self._dev)
        self._feats[: feats.shape[0]] = feats
        self._k = [torch.zeros(1, k.shape[1], cap, k.shape[3], dtype=self._dt, device=self._dev) for k in ks]
        self._v = [torch.zeros_like(t) for t in self._k]
        for new, old in zip(self._k + self._v, ks + vs):
            new[:, :, : old.shape[2]] = old
        self._cap = cap

    def retype(self) -> None:
        """(Re)allocate the buffers in the draft's dtype: at construction, and after `EagleDraft.cast` (before the
        first sequence)."""
        self._dt = self.draft.dtype
        self._cap = 0
        self._reset_buffers(64)
        self._extra_rows = torch.zeros(64, self.draft.hidden_size, dtype=self._dt, device=self._dev)
        self._clear_extra()

    # ---- context vocabulary
    def _clear_extra(self) -> None:
        self._extra_ids: list[int] = []
        self._extra_first: list[int] = []  # position that introduced each extra id (ascending)
        self._extra_set: set[int] = set()

    def _add_context_token(self, tok: int, pos: int) -> None:
        if not self.context_vocab or tok in self._static or tok in self._extra_set:
            return
        if not 0 <= tok < self.draft.vocab_size:
            return
        n = len(self._extra_ids)
        if n >= self._extra_rows.shape[0]:
            rows = torch.zeros(2 * n, self._extra_rows.shape[1], dtype=self._dt, device=self._dev)
            rows[:n] = self._extra_rows
            self._extra_rows = rows
        self._extra_rows[n] = self.draft.head_weight[tok].to(self._dt)
        self._extra_ids.append(tok)
        self._extra_first.append(pos)
        self._extra_set.add(tok)

    def clear(self) -> None:
        """Zero the draft's cache and state buffers (after runs on junk state: `KVCache.junk`). The next
        reset rewrites every slot before it is read as valid, but a masked attention still multiplies the
        slots it masks by zero, and a non-finite junk value turns that product into NaN."""
        for t in (self._feats, *self._k, *self._v, self._extra_rows):
            t.zero_()

    # ---- interface
    def reset(self, prompt_ids, prompt_hidden: torch.Tensor) -> None:
        ids = as_token_list(prompt_ids)
        hid = prompt_hidden.reshape(-1, self.draft.hidden_size)
        if hid.shape[0] != len(ids):
            raise ValueError(f"prompt_hidden has {hid.shape[0]} rows for {len(ids)} prompt tokens")
        self.ids = ids
        if len(ids) + 1 > self._cap:
            cap = 64
            while cap < len(ids) + 1:
                cap *= 2
            self._reset_buffers(cap)
        self._cache_len = 0
        self._proposal = None
        self._feats[: len(ids)] = hid.to(device=self._dev, dtype=self._dt)
        self._clear_extra()
        for j, t in enumerate(ids):
            self._add_context_token(t, j)

    def _catch_up(self) -> torch.Tensor | None:
        """Run the draft over the committed pairs not cached yet; return g [D] of the last pair
        (predicts the feature after the last token), or None when there is no pair yet."""
        n = len(self.ids)
        if n < 2:
            return None
        d = self.draft
        end = n - 1  # pairs t = c .. n-2; at least the last one (its output was not kept)
        c = min(self._cache_len, end - 1)
        feats = self._feats[c:end].unsqueeze(0)
        nxt = torch.tensor(self.ids[c + 1 : n], dtype=torch.long, device=self._dev).unsqueeze(0)
        pos = torch.arange(c, end, device=self._dev).unsqueeze(0)
        past = [(self._k[i][:, :, :c], self._v[i][:, :, :c]) for i in range(len(d.layers))]
        g, presents = d(feats, nxt, pos, past)
        for i, (kn, vn) in enumerate(presents):
            self._k[i][:, :, c:end] = kn
            self._v[i][:, :, c:end] = vn
        self._cache_len = end
        return g[0, -1]

    @torch.inference_mode()
    def propose(self) -> torch.Tensor:
        if self._proposal is not None:
            return self._proposal
        n = len(self.ids)
        d = self.draft
        if n < 2:  # no (feature, next token) pair yet: most frequent tokens
            out = d.vocab_ids[: self.k].tolist()
            fill_unique(out, set(out), range(d.vocab_size), self.k)
            self._proposal = torch.tensor(out, dtype=torch.long, device=self._dev)
            return self._proposal
        g = self._catch_up()
        logits = d.logits(g)
        ne = len(self._extra_ids)
        if ne:
            logits = torch.cat([logits, self._extra_rows[:ne] @ g])
        kk = min(self.k, logits.shape[-1])
        top = torch.topk(logits, kk).indices.tolist()
        vocab = d.vocab_ids
        out = [int(vocab[i]) if i < self._nstatic else self._extra_ids[i - self._nstatic] for i in top]
        if kk < self.k:  # tiny vocabularies only
            fill_unique(out, set(out), range(d.vocab_size), self.k)
        self._proposal = torch.tensor(out, dtype=torch.long, device=self._dev)
        return self._proposal

    def observe(self, token: int, hidden: torch.Tensor, layer: int) -> None:
        p = len(self.ids) - 1
        self._grow(p + 2)
        self._feats[p] = hidden.reshape(-1).to(device=self._dev, dtype=self._dt)
        self.ids.append(int(token))
        self._add_context_token(int(token), p + 1)
        self._cache_len = min(self._cache_len, p)  # pair p is new; pairs < p unchanged
        self._proposal = None

    def truncate(self, length: int) -> None:
        check_truncate(length, len(self.ids))
        del self.ids[length:]
        while self._extra_first and self._extra_first[-1] >= length:
            self._extra_first.pop()
            self._extra_set.discard(self._extra_ids.pop())
        self._cache_len = min(self._cache_len, length - 1)
        self._proposal = None



class DeviceEagleSource(EagleSource):
    """EagleSource whose steady-state step can run inside a captured CUDA graph.

    Why: on the GPU the eager draft step (a dozen small launches, a top-k read back to the host, a
    new candidate tensor) costs more than several decoder layers (benchmarks/GPU_NOTES.md). Here the
    buffers are static (draft K/V for the whole context, context-vocabulary rows up to `max_extra`,
    the candidate map on the device), so `device_step` -- the one-pair step right after a token was
    chosen -- is plain tensor code a whole-step backend records into its graph. The loop then calls
    `observe_device` (host bookkeeping only), and the next `propose()` returns the candidates the graph
    already wrote, with no launch and no sync. After
    reset / truncate (prompt, rollback) the eager path of EagleSource runs on the same buffers.
    Same candidates as EagleSource up to float rounding (the attention runs over a static prefix).
    """

    capturable = True

    def __init__(self, draft: EagleDraft, k: int = 4, context_vocab: bool = True, max_len: int = 2048,
                 max_extra: int = 512, compile: bool = False, fused_ops: bool | None = None):
        self.max_len = int(max_len)
        self._fused_ops = fused_ops  # None: on CUDA (`_bind_layer_fn`)
        self.max_extra = int(max_extra)
        self._fns = CompiledFns("the draft", compile)  # `_run`
        self._keys: dict[int, torch.Tensor] = {}
        super().__init__(draft, k=k, context_vocab=context_vocab)  # (`retype`: buffers, extra rows, bound layers)
        d, dev = draft, self._dev
        nv = self._nstatic
        self.vocab_map = torch.zeros(nv + self.max_extra, dtype=torch.long, device=dev)
        self.vocab_map[:nv] = d.vocab_ids
        self.known = torch.zeros(d.vocab_size, dtype=torch.bool, device=dev)  # static vocab + extras
        self.known[d.vocab_ids] = True
        self.n_extra = torch.zeros(1, dtype=torch.long, device=dev)
        self.next_cands = torch.zeros(self.k, dtype=torch.long, device=dev)
        self._slot = torch.arange(self.max_extra, device=dev)

    def _bind_layer_fn(self, d: EagleDraft) -> None:
        """The device step runs the draft layer as `model_step.make_layer_fn` (the target's layer
        definition; on CUDA its fused Triton GEMVs and decode attention) over fused weights: q/k/v and
        gate/up fused once per draft, its modules re-pointed at views (one copy in memory).
        `fused_ops` (default: on CUDA) runs the matmuls as `specee::fused_linear` ops, which take the int8 pairs of
        a quantized draft; without them the plain matmuls run its rounded float weights (a CPU's faster form)."""
        from ..model_step import CUDA_FUSED, make_layer_fn, plain_linear, rows_fused, step_spec

        fused = self._dev.type == "cuda" if self._fused_ops is None else self._fused_ops
        self._w8 = fused and d.quant == "int8"  # stream the int8 pairs
        layers, _fc, _head = d.matmul_weights(int8=self._w8)
        self._lw = [lw.as_tuple() for lw in layers]
        spec = step_spec(d.base_config, self.max_len)
        self._layer_fn = make_layer_fn(spec, fused=CUDA_FUSED if fused else ())
        # several rows at once (a tree's levels, the catch-up of a verify step's accepted tokens): the multi-row
        # ops (`model_step.rows_fused`); where those have no matmul op (fp32 by default), the draft's own fused ops
        rows = rows_fused(self._dt) if fused and self._dev.type == "cuda" else ()
        self._rows_layer_fn = make_layer_fn(spec, fused=rows) if "matmul" in rows else self._layer_fn
        from .. import ops  # noqa: F401  # torch.ops.specee.fused_linear, .topk_rows

        self._linear = _op_linear if fused else plain_linear
        probe = torch.zeros(1, dtype=self._dt, device=self._dev)
        cos, sin = d.rotary(probe, torch.arange(self.max_len, device=self._dev)[None])
        self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()  # [T, hd]
        self._valid = torch.ones(self.max_len, dtype=torch.bool, device=self._dev)  # causal mask only

    @classmethod
    def from_source(cls, src: EagleSource, max_len: int, compile: bool = False) -> DeviceEagleSource:
        return cls(src.draft, k=src.k, context_vocab=src.context_vocab, max_len=max_len, compile=compile)

    def retype(self) -> None:
        """`EagleSource.retype`, with the device step's extra rows (`max_extra`), bound weights and rotary tables."""
        super().retype()
        self._extra_rows = torch.zeros(self.max_extra, self.draft.hidden_size, dtype=self._dt, device=self._dev)
        self._bind_layer_fn(self.draft)

    # ---- static buffers: allocated once at full context, never moved (a graph holds their addresses)
    def _reset_buffers(self, cap: int) -> None:
        if getattr(self, "_cap", 0) >= self.max_len:
            self._cache_len = 0
            self._proposal = None
            return
        super()._reset_buffers(max(cap, self.max_len))

    def _clear_extra(self) -> None:
        super()._clear_extra()
        if hasattr(self, "known"):
            self.known.zero_()
            self.known[self.draft.vocab_ids] = True
            self.n_extra.zero_()

    def _note_context_token(self, tok: int, pos: int) -> int | None:
        """Host bookkeeping of the context vocabulary: the extra slot `tok` takes, or None."""
        n = len(self._extra_ids)
        if (not self.context_vocab or tok in self._static or tok in self._extra_set
                or not 0 <= tok < self.draft.vocab_size or n >= self.max_extra):
            return None
        self._extra_ids.append(tok)
        self._extra_first.append(pos)
        self._extra_set.add(tok)
        return n

    def _add_context_token(self, tok: int, pos: int) -> None:
        n = self._note_context_token(tok, pos)
        if n is None:
            return
        self._extra_rows[n] = self.draft.head_weight[tok].to(self._dt)
        self.vocab_map[self._nstatic + n] = tok
        self.known[tok] = True
        self.n_extra.fill_(n + 1)

    def truncate(self, length: int) -> None:
        super().truncate(length)
        n = len(self._extra_ids)
        self.known.zero_()
        self.known[self.draft.vocab_ids] = True
        if n:
            self.known[self.vocab_map[self._nstatic : self._nstatic + n]] = True
        self.n_extra.fill_(n)

    # ---- the captured step
    def device_step(self, tok: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor, S: int) -> None:
        """tok [1] the token just chosen, feat [D] final_norm(h) that chose it, pos [1] its position - 1
        (the draft position of the new pair). Writes the next step's candidates into `next_cands`.
        Only fixed-shape tensor code: recordable in a CUDA graph (S = attended draft prefix).

        With `compile` (the CUDA default, api._device_draft) the step runs as one Inductor-compiled
        program around the fused Triton GEMVs: 215 us per token on the H200 at 7B shapes, against ~410 us
        for the eager step's ~60 launches (benchmarks/GPU_NOTES.md).
        S enters as the length of a dynamic-dimension tensor, so one compile serves every bucket. If the
        compile fails, the eager step runs and `compile_error` says why."""
        self._run("step", self._step, self.keys_for(S), tok, feat, pos, tune=self._dev.type == "cuda")

    def keys_for(self, S: int) -> torch.Tensor:
        """A tensor whose only meaning is its length S (the attended draft prefix): a dynamic dimension for
        the compiled functions, so one compile serves every bucket."""
        keys = self._keys.get(S)
        if keys is None:
            keys = self._keys[S] = torch.empty(S, dtype=torch.int8, device=self._dev)
        return keys

    def _run(self, name: str, fn, keys: torch.Tensor, *args, tune: bool = False):
        """fn(*args, keys), Inductor-compiled (once per name) where `compile` is on (`CompiledFns`); `tune`:
        coordinate-descent tuning. Any compile failure runs the eager function from then on and
        `compile_error` says why."""
        return self._fns(name, fn, *args, keys=keys, tune=tune)

    @property
    def compile(self) -> bool:
        return self._fns.enabled

    @compile.setter
    def compile(self, on: bool) -> None:
        self._fns.enabled = bool(on)

    @property
    def compile_error(self) -> str | None:
        return self._fns.error

    @property
    def step_mode(self) -> str:
        """How device_step runs: "compiled", "eager", or "eager (compile failed: ...)"."""
        if self._fns.fns:
            return "compiled"
        return f"eager (compile failed: {self.compile_error})" if self.compile_error else "eager"

    def _step(self, tok: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> None:
        d = self.draft
        S = keys.shape[0]
        if self.context_vocab:  # the chosen token joins the context vocabulary, as observe() will do
            self._device_add_context(tok, None)
        x = self._rows_forward(feat.view(1, d.hidden_size), tok, pos, S)  # [1, D]
        g = x[0]  # [D]
        logits = self._linear(x[None], self._head_w())[0, 0]  # [Vd]
        if self.context_vocab:
            ex = self._extra_rows @ g  # [max_extra]
            ex = torch.where(self._slot < self.n_extra, ex, torch.full_like(ex, float("-inf")))
            logits = torch.cat([logits, ex])
        top = torch.ops.specee.topk_rows(logits, self.k)[1]  # CUDA: one Triton launch (plugins/triton_topk.py)
        self.next_cands.copy_(self.vocab_map[top])

    def _rows_forward(self, feats: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, S: int,
                      slots: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The draft over T pairs (feats [T, D], ids [T] the next tokens, pos [T] draft positions) on the
        static cache, fixed-shape: returns g [T, D]. slots / mask as in `model_step`'s layer (a draft tree's
        rows: cache slots of their own and an ancestor mask); without them causal over the cache."""
        d = self.draft
        emb = d.embed_weight[ids].to(self._dt)  # [T, D]
        x = self._linear(torch.cat([emb, feats.to(self._dt)], dim=-1)[None], self._fc_w())  # [1, T, D]
        if d.fc.bias is not None:
            x = x + d.fc.bias
        fn = self._layer_fn if ids.numel() == 1 else self._rows_layer_fn
        for i, lw in enumerate(self._lw):
            x = fn(x, pos, self._valid, self._cos, self._sin, self._k[i][0], self._v[i][0], S, *lw, slots=slots,
                   mask=mask)
        return x[0]

    def _fc_w(self):
        return self.draft.matmul_weights(self._w8)[1]

    def _head_w(self):  # read per use: the head rows follow set_vocab_ids (and the bench's sharpening)
        return self.draft.matmul_weights(self._w8)[2]

    def _device_add_context(self, tok: torch.Tensor, on: torch.Tensor | None) -> None:
        """The context vocabulary on the device: tok [1] joins it if new (and `on` [1] bool, if given)."""
        n = self.n_extra  # [1]
        new = (~self.known[tok]) & (n < self.max_extra)  # [1]
        if on is not None:
            new = new & on
        row = self.draft.head_weight[tok].to(self._dt)  # [1, D]
        put = (self._slot == n) & new  # [max_extra]
        self._extra_rows.copy_(torch.where(put[:, None], row, self._extra_rows))
        self.vocab_map[self._nstatic :].copy_(torch.where(put, tok, self.vocab_map[self._nstatic :]))
        self.known.index_put_((tok,), self.known[tok] | new)
        n.add_(new.long())

    def observe_device(self, token: int, hidden: torch.Tensor, layer: int) -> None:
        """`observe` for a token whose draft step already ran on the device:
        host bookkeeping only. The device buffers (context vocabulary, candidates) are the graph's: a
        step launched ahead may already have moved them past this token, so the host must not write them."""
        p = len(self.ids) - 1
        self._feats[p].copy_(hidden.reshape(-1))
        self.ids.append(int(token))
        self._note_context_token(int(token), p + 1)
        self._cache_len = len(self.ids) - 1
        self._proposal = self.next_cands


def _op_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T as one `specee::fused_linear` (Triton on CUDA); w may be an int8 pair (q, scale)."""
    if isinstance(w, tuple):
        return torch.ops.specee.fused_linear(x, w[0], None, None, 0.0, "none", w[1])
    return torch.ops.specee.fused_linear(x, w, None, None, 0.0, "none")


def draft_param_count(draft: EagleDraft) -> int:
    return sum(v.numel() for k, v in draft.state_dict().items() if k != "vocab_ids")


__all__ = [
    "CONFIG_NAME",
    "DRAFT_FORMAT",
    "WEIGHTS_NAME",
    "EagleDraft",
    "EagleSource",
    "draft_param_count",
    "load_eagle_checkpoint",
    "load_eagle_state_dict",
]
