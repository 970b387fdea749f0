"""benchmarks/export7b.py --init settled: random weights whose next token is decided before the last layer.

The property the 7B export record relies on (trained predictors find exit points, so the export gets If
nodes): with the damped tail, the argmax of the final-norm LM head at ~0.7 L already equals the last
layer's at almost every position; with HF's i.i.d. init it does not. Fixed seed, float32, CPU, ~1 s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export7b():
    spec = importlib.util.spec_from_file_location("export7b", ROOT / "benchmarks" / "export7b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(layers: int = 16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_settled_tail_decides_the_token_by_0_7_L(export7b):
    L = 16
    k = round(0.7 * L) - 1  # the output of layer 11 of 16
    model = _model(L)
    random_agreement = export7b.layer_agreement(model, tokens=128)
    ptr = model.model.layers[-1].mlp.down_proj.weight.data_ptr()
    before = model.model.layers[-1].mlp.down_proj.weight[0, :4].clone()
    info = export7b.settle_tail_(model)  # the defaults the 7B command uses
    settled_agreement = export7b.layer_agreement(model, tokens=128)

    first = info["full_layers"]
    assert first == round(export7b.SETTLE_FRACTION * L) == 10 and info["scaled_layers"] == [10, 15]
    # in place: the same storage, scaled by SETTLE_SCALE
    w = model.model.layers[-1].mlp.down_proj.weight
    assert w.data_ptr() == ptr
    torch.testing.assert_close(w[0, :4], before * export7b.SETTLE_SCALE)
    assert random_agreement[-1] == settled_agreement[-1] == 1.0
    # measured: random 0.02-0.25, settled 0.95-0.99 over seeds 0-2 and 64/128 wide, 12/16 layers
    assert settled_agreement[k] >= 0.9 and settled_agreement[first - 1] >= 0.9, settled_agreement
    assert random_agreement[k] <= 0.5 and random_agreement[first - 1] <= 0.5, random_agreement
    # before the tail's first damped layer the token is not decided yet either way
    assert settled_agreement[first // 2] <= 0.5, settled_agreement


def test_frequent_token_prior_scales_only_its_rows(export7b):
    model = _model(layers=2)
    head = model.lm_head.weight
    before = head.detach().clone()

    class Tok:  # one id per word; a word of two tokens and an id past the vocabulary are skipped
        table = {".": [30], ",": [28], " the": [260], "xy": [5, 6], " big": [10_000]}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self.table[text]}

    info = export7b.frequent_token_prior_(model, Tok(), words=(".", ",", " the", "xy", " big", "."), scale=2.5)
    assert info["prior_ids"] == [30, 28, 260]
    scaled = torch.zeros(head.shape[0], dtype=torch.bool)
    scaled[[30, 28, 260]] = True
    torch.testing.assert_close(head[scaled], before[scaled] * 2.5)
    assert torch.equal(head[~scaled], before[~scaled])
