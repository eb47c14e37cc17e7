"""Benchmark and user problem sets as a list of `Problem`.

A source is one of

- a benchmark name: ``gsm8k``, ``math500``, ``aime24`` (from the Hugging Face hub, needs the `datasets` package and a
  network), or ``demo`` (a handful of grade-school problems shipped with the package);
- a local ``.jsonl``, ``.json`` or ``.parquet`` file with the public sets' field names (or any names, given
  `question_field` / `answer_field`);
- any other Hugging Face dataset id (``owner/name``), with `split` and the field names.

Problem ids are stable across loads of the same data, so an interrupted run resumes by id: the set's own id field when
it has one, else the record's position plus a hash of its question and gold answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentseek.eval.judge import parse_number
from latentseek.eval.prompts import AnswerKind

DEMO_PROBLEMS_PATH = Path(__file__).resolve().parent / "assets" / "demo_problems.jsonl"

# GSM8K writes the gold answer after this marker, at the end of its worked solution.
GSM8K_ANSWER_MARKER = "####"

# Field names tried, in order, when a local file's fields are not given.
QUESTION_FIELDS = ("question", "problem", "Question", "Problem")
ANSWER_FIELDS = ("answer", "Answer")
ID_FIELDS = ("unique_id", "id", "ID")


@dataclass(frozen=True)
class Benchmark:
    """Where a named benchmark lives on the Hugging Face hub and which fields hold what."""

    hub_id: str
    hub_config: str | None
    split: str
    question_field: str
    answer_field: str
    id_field: str | None


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "question", "answer", None),
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "unique_id"),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "id"),
}


@dataclass(frozen=True)
class Problem:
    """One problem: a stable `id`, the `question` text and the `gold` final answer (as a string, e.g. "025").

    `answer_kind` is "number" when every gold answer of the set is a plain number (GSM8K, AIME), else "math"; the
    prompts ask for a bare number in the first case. `raw` is the source record, unchanged.
    """

    id: str
    question: str
    gold: str
    answer_kind: AnswerKind
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class DatasetError(ValueError):
    """A problem set that cannot be found, read, or understood."""


def gold_from_answer(answer: Any) -> str:
    """The gold final answer in an answer field: the number after GSM8K's "####" (commas dropped), else the field."""
    text = str(answer).strip()
    if GSM8K_ANSWER_MARKER in text:
        return text.rsplit(GSM8K_ANSWER_MARKER, 1)[1].strip().replace(",", "")
    return text


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a local .jsonl, .json (a list of objects, or one key holding such a list) or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = []
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{line_no}: not a JSON object: {e}") from e
    elif suffix == ".json":
        with path.open(encoding="utf-8") as f:
            content = json.load(f)
        if isinstance(content, dict):
            lists = [v for v in content.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DatasetError(f"{path}: expected a list of records, or an object with exactly one list in it")
            content = lists[0]
        records = content
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DatasetError(f"{path}: expected a list of JSON objects")
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd
    except ImportError:
        raise DatasetError(
            f"{path}: reading parquet needs the `pyarrow` or `pandas` package (pip install pyarrow); "
            "or convert the file to JSONL"
        ) from None
    return pd.read_parquet(path).to_dict(orient="records")


def _hub_records(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    hint = "or pass a local .jsonl/.json/.parquet path instead of a hub name"
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"loading {hub_id!r} from the Hugging Face hub needs the `datasets` package (pip install datasets); {hint}"
        ) from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # offline, unknown id, no such split: the hub client raises many unrelated types
        raise DatasetError(f"could not load {hub_id!r} (split {split!r}) from the Hugging Face hub: {e}; {hint}") from e
    return [dict(r) for r in ds]


def _pick_field(records: Sequence[dict[str, Any]], given: str | None, candidates: Sequence[str], what: str) -> str:
    available = sorted(records[0]) if records else []
    if given is not None:
        missing = [i for i, r in enumerate(records) if given not in r]
        if missing:
            raise DatasetError(f"{what} field {given!r} is missing from record {missing[0]}; fields: {available}")
        return given
    for name in candidates:
        if all(name in r for r in records):
            return name
    raise DatasetError(f"no {what} field among {list(candidates)}; fields: {available}; name it explicitly")


def _problem_ids(
    records: Sequence[dict[str, Any]], id_field: str | None, questions: list[str], golds: list[str]
) -> list[str]:
    if id_field is None:
        id_field = next((f for f in ID_FIELDS if all(f in r for r in records)), None)
        if id_field is not None and len({str(r[id_field]) for r in records}) != len(records):
            id_field = None  # a field called "id" that is not unique is not an id
    if id_field is not None:
        ids = [str(r[id_field]) for r in records]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"id field {id_field!r} has duplicate values")
        return ids
    # Position alone would silently pair a changed file with old results; the hash makes an edited record new.
    return [f"{i:05d}-{_digest(q, g)}" for i, (q, g) in enumerate(zip(questions, golds, strict=True))]


def _digest(question: str, gold: str) -> str:
    return hashlib.sha1(f"{question}\x00{gold}".encode()).hexdigest()[:10]


def problems_from_records(
    records: Sequence[dict[str, Any]],
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
) -> list[Problem]:
    """Problems from raw records; unnamed fields are looked up among the public sets' names."""
    if not records:
        raise DatasetError("the problem set is empty")
    q_field = _pick_field(records, question_field, QUESTION_FIELDS, "question")
    a_field = _pick_field(records, answer_field, ANSWER_FIELDS, "answer")
    if id_field is not None:
        _pick_field(records, id_field, (), "id")
    questions = [str(r[q_field]).strip() for r in records]
    golds = [gold_from_answer(r[a_field]) for r in records]
    ids = _problem_ids(records, id_field, questions, golds)
    kind: AnswerKind = "number" if all(parse_number(g) is not None for g in golds) else "math"
    return [
        Problem(id=i, question=q, gold=g, answer_kind=kind, raw=dict(r))
        for i, q, g, r in zip(ids, questions, golds, records, strict=True)
    ]


def load_problems(
    source: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str = "test",
    limit: int | None = None,
) -> list[Problem]:
    """The problems of a benchmark name, a local file, or a hub dataset id (see the module docstring).

    `split` only applies to hub ids that are not benchmark names. `limit` keeps the first N problems; ids do not
    depend on it, so a run can be extended with a larger limit.
    """
    source_text = str(source)
    if source_text == "demo":
        records = read_records(DEMO_PROBLEMS_PATH)
    elif source_text in BENCHMARKS:  # a local file with such a name is reached as ./gsm8k
        bench = BENCHMARKS[source_text]
        records = _hub_records(bench.hub_id, bench.hub_config, bench.split)
        question_field = question_field or bench.question_field
        answer_field = answer_field or bench.answer_field
        id_field = id_field or bench.id_field
    elif Path(source_text).exists():
        records = read_records(source_text)
    elif "/" in source_text and not Path(source_text).suffix:
        records = _hub_records(source_text, None, split)
    else:
        raise DatasetError(
            f"{source_text!r} is neither a file nor one of the benchmarks {sorted(BENCHMARKS)} / 'demo' "
            "nor a Hugging Face dataset id (owner/name)"
        )
    problems = problems_from_records(
        records, question_field=question_field, answer_field=answer_field, id_field=id_field
    )
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        problems = problems[:limit]
    return problems
