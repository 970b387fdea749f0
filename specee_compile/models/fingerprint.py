"""A short identity string for a model, so artifacts can refuse to run on the wrong one.

`model_fingerprint(model)` = `"cfg:<12 hex>-w:<12 hex>"`:
- `cfg` hashes the canonical JSON of `config.to_dict()` without the keys that change when the
  same model is merely loaded differently (transformers version, path, dtype, attention backend).
- `w` is a *sampled* checksum of the weights: for every state-dict tensor, in sorted name order,
  it hashes the name, shape, dtype and every k-th element (k chosen so that at most
  `SAMPLE_ELEMENTS` elements per tensor are read, cast to float32). Hashing every byte of a 7B
  model would take many seconds; the sample is cheap (a few MB read) and still catches another
  checkpoint, a fine-tune, a re-quantization or a wrong dtype. It can miss an edit confined to
  unsampled elements of a tensor larger than `SAMPLE_ELEMENTS`; tensors up to that size are
  hashed in full.

The weight part includes each tensor's dtype, so the same checkpoint in float32 and in float16 has
different fingerprints (the values differ after rounding anyway). It is deterministic across
processes and machines (no reductions whose order depends on threads).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

SAMPLE_ELEMENTS = 1 << 16
"""At most this many elements of each tensor enter the weight checksum."""

VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
    "attn_implementation", "_attn_implementation", "_commit_hash", "use_cache",
})
"""Config keys that differ between loads of the same weights; keys starting with `_` go too."""


def config_digest(config: Any) -> str:
    """sha256 hex of the canonical JSON of a transformers config (or a plain dict)."""
    raw = config if isinstance(config, dict) else config.to_dict()
    clean = _strip_volatile(raw)
    text = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items()
                if k not in VOLATILE_CONFIG_KEYS and not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_strip_volatile(v) for v in value]
    return value


def weight_digest(model: torch.nn.Module) -> str:
    """sha256 hex of the sampled weight checksum described in the module docstring."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        h.update(name.encode())
        h.update(repr(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        h.update(_sample_bytes(tensor))
    return h.hexdigest()


@torch.no_grad()
def _sample_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    stride = -(-n // SAMPLE_ELEMENTS)  # ceil: at most SAMPLE_ELEMENTS elements survive
    sample = flat[::stride].to(device="cpu", dtype=torch.float32).contiguous()
    return sample.numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> str:
    """`"cfg:<12 hex>-w:<12 hex>"` for a transformers model (config + sampled weight checksum)."""
    return f"cfg:{config_digest(model.config)[:12]}-w:{weight_digest(model)[:12]}"


def fingerprint_summary(model: torch.nn.Module) -> dict[str, Any]:
    """What went into the fingerprint, for messages that explain a mismatch."""
    config = model.config
    n_params = sum(t.numel() for t in model.parameters())
    return {
        "fingerprint": model_fingerprint(model),
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "parameters": n_params,
        "dtype": str(next(model.parameters()).dtype) if n_params else None,
    }
