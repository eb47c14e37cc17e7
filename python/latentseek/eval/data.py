"""Benchmark and user problem sets as a list of `Problem`.

A source is one of

- a benchmark name: ``gsm8k``, ``math500``, ``aime24`` (from the Hugging Face hub, needs the `datasets` package and a
  network), or ``demo`` (a handful of grade-school problems shipped with the package);
- a local ``.jsonl``, ``.json`` or ``.parquet`` file with the public sets' field names (or any names, given
  `question_field` / `answer_field`);
- any other Hugging Face dataset id (``owner/name``), with `split` and the field names.

Problem ids are stable across loads of the same data, so an interrupted run resumes by id: the set's own id field when
it has one, else the record's position plus a hash of its question and gold answer.

Every record is checked when the set is loaded, before any model work: a bad one raises
:class:`~latentseek.errors.DatasetError` with one line naming the file, the record ("line 7" in a JSONL file, "index 3"
in a JSON list, a Parquet table or a hub split, with its id when it has one) and the field. Questions must be non-empty
text; answers must be non-empty text or a finite number (JSON numbers, as some GSM8K-style files write them, become
their ``str()``: ``18`` -> "18"); null, lists, objects and booleans are refused. A field that some records have and
others lack names the first record without it; a named id field must be present, non-null and unique.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentseek.errors import DatasetError
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


Location = str  # where a record sits in its source: "line 7" (JSONL, 1-based) or "index 3" (JSON, Parquet, hub)


def gold_from_answer(answer: Any) -> str:
    """The gold final answer in an answer field: the number after GSM8K's "####" (commas dropped), else the field."""
    text = str(answer).strip()
    if GSM8K_ANSWER_MARKER in text:
        return text.rsplit(GSM8K_ANSWER_MARKER, 1)[1].strip().replace(",", "")
    return text


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a local .jsonl, .json (a list of objects, or one key holding such a list) or .parquet file."""
    return _read_located(Path(path))[0]


def _read_located(path: Path) -> tuple[list[dict[str, Any]], list[Location]]:
    """The records of a local file and where each one is ("line 7" in a JSONL file, else "index 3")."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DatasetError(f"{path} is a directory; pass a .jsonl, .json or .parquet file")
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    try:
        if suffix == ".parquet":
            records: Any = _read_parquet(path)
            return _objects(path, records), [f"index {i}" for i in range(len(records))]
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSON") from e
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    if suffix == ".jsonl":
        records, locations = [], []
        for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{line_no}: not a JSON object: {e}; fix or delete the line") from e
            if not isinstance(record, dict):
                raise DatasetError(
                    f"{path}:{line_no}: expected a JSON object, got {_kind(record)}; each line must be one record"
                )
            records.append(record)
            locations.append(f"line {line_no}")
        return records, locations
    try:
        content = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from e
    if isinstance(content, dict):
        lists = [v for v in content.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetError(f"{path}: expected a list of records, or an object with exactly one list in it")
        content = lists[0]
    if not isinstance(content, list):
        raise DatasetError(f"{path}: expected a list of JSON objects, got {_kind(content)}")
    return _objects(path, content), [f"index {i}" for i in range(len(content))]


def _objects(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DatasetError(f"{path}: expected a list of JSON objects, but index {bad} is {_kind(records[bad])}")
    return records


def _kind(value: Any) -> str:
    """How a message names a value's type: "null", "a list", "a number", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, numbers.Real):
        return f"a number ({value})"
    names = {str: "a string", list: "a list", dict: "an object"}
    return next((name for t, name in names.items() if isinstance(value, t)), f"a {type(value).__name__}")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        import pyarrow

        try:
            return pq.read_table(path).to_pylist()
        except pyarrow.ArrowException as e:
            raise DatasetError(f"{path} is not a readable Parquet file: {e}") from e
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


class _Records:
    """Records with their source and locations, so that every error names the file, the record and the field."""

    def __init__(self, records: Sequence[dict[str, Any]], source: str, locations: Sequence[Location] | None) -> None:
        self.records = records
        self.source = source
        self.locations = list(locations) if locations is not None else [f"index {i}" for i in range(len(records))]
        if len(self.locations) != len(records):
            raise ValueError(f"got {len(self.locations)} locations for {len(records)} records")
        self.id_field: str | None = None

    def where(self, i: int) -> str:
        """ "FILE: line 7 (id 'x')", with the id when the record has one."""
        record_id = self.records[i].get(self.id_field) if self.id_field is not None else None
        tail = f" ({self.id_field} {str(record_id)!r})" if record_id is not None else ""
        return f"{self.source}: {self.locations[i]}{tail}"

    def error(self, i: int, message: str) -> DatasetError:
        return DatasetError(f"{self.where(i)}: {message}")

    def pick_field(self, given: str | None, candidates: Sequence[str], what: str) -> str:
        """The field holding `what`: `given` (in every record), else the first candidate that any record has.

        A field that some records have and others lack is an error naming the first record without it.
        """
        option = f"{what}_field (--{what}-field)"
        names = [given] if given is not None else [c for c in candidates if any(c in r for r in self.records)][:1]
        if not names:
            raise self.error(
                0,
                f"no {what} field: none of {list(candidates)} is among its fields {sorted(self.records[0])}; "
                f"name the field with {option}",
            )
        missing = next((i for i, r in enumerate(self.records) if names[0] not in r), None)
        if missing is not None:
            raise self.error(
                missing,
                f"{what} field {names[0]!r} is missing (its fields: {sorted(self.records[missing])}); "
                f"add it there, or name the right field with {option}",
            )
        return names[0]

    def detect_id_field(self, given: str | None) -> str | None:
        """`given` (checked: present, not null, unique), else the first of ID_FIELDS that every record has with
        distinct non-null values (a column called "id" that repeats is not an id), else None."""
        if given is not None:
            self.pick_field(given, (), "id")
            self.check_ids(given)
            self.id_field = given
            return given
        for name in ID_FIELDS:
            values = [r.get(name) for r in self.records]
            if all(name in r for r in self.records) and None not in values:
                if len({str(v) for v in values}) == len(values):
                    self.id_field = name
                    return name
        return None

    def check_ids(self, name: str) -> None:
        seen: dict[str, int] = {}
        for i, r in enumerate(self.records):
            value = r[name]
            if value is None or isinstance(value, (list, dict)) or not str(value).strip():
                raise self.error(i, f"id field {name!r} is {_kind(value)}; every record needs its own id")
            key = str(value)
            if key in seen:
                raise self.error(
                    i,
                    f"duplicate id {key!r} (field {name!r}): {self.locations[seen[key]]} has it too; ids must be unique",
                )
            seen[key] = i

    def question(self, i: int, name: str) -> str:
        value = self.records[i][name]
        if not isinstance(value, str):
            raise self.error(i, f"question field {name!r} is {_kind(value)}, expected text")
        if not value.strip():
            raise self.error(i, f"question field {name!r} is empty; remove the record or fill in its question")
        return value.strip()

    def gold(self, i: int, name: str) -> str:
        """The gold answer: a string (GSM8K's "#### N" taken), or a finite number written with str()."""
        value = self.records[i][name]
        if isinstance(value, str):
            gold = gold_from_answer(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            gold = gold_from_answer(value)
        else:
            raise self.error(i, f"answer field {name!r} is {_kind(value)}, expected text or a finite number")
        if not gold:
            raise self.error(i, f"answer field {name!r} holds no answer ({value!r}); fill it in or remove the record")
        return gold


def _problem_ids(rows: _Records, id_field: str | None, questions: list[str], golds: list[str]) -> list[str]:
    if id_field is not None:
        return [str(r[id_field]) for r in rows.records]
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
    source: str = "records",
    locations: Sequence[Location] | None = None,
) -> list[Problem]:
    """Problems from raw records; unnamed fields are looked up among the public sets' names.

    Every record is checked, and the first bad one raises a :class:`DatasetError` that names `source`, the
    record's location (``locations[i]``, default "index i") and id, and the field: a question that is not text or is
    empty, an answer that is missing, null, a list/object/boolean, or empty, an id that is null or repeats, a field
    that some records have and others lack. Numeric answers (JSON numbers, common in GSM8K-like files) are accepted
    and written with ``str()``: ``18`` becomes "18", ``4.5`` "4.5".
    """
    if not records:
        raise DatasetError(f"{source}: the problem set is empty")
    rows = _Records(records, source, locations)
    id_name = rows.detect_id_field(id_field)
    q_field = rows.pick_field(question_field, QUESTION_FIELDS, "question")
    a_field = rows.pick_field(answer_field, ANSWER_FIELDS, "answer")
    questions = [rows.question(i, q_field) for i in range(len(records))]
    golds = [rows.gold(i, a_field) for i in range(len(records))]
    ids = _problem_ids(rows, id_name, questions, golds)
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
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    source_text = str(source)
    locations: list[Location] | None = None
    if source_text == "demo":
        records, locations = _read_located(DEMO_PROBLEMS_PATH)
    elif source_text in BENCHMARKS:  # a local file with such a name is reached as ./gsm8k
        bench = BENCHMARKS[source_text]
        records = _hub_records(bench.hub_id, bench.hub_config, bench.split)
        source_text = f"{bench.hub_id} ({bench.split})"
        question_field = question_field or bench.question_field
        answer_field = answer_field or bench.answer_field
        id_field = id_field or bench.id_field
    elif Path(source_text).exists():
        records, locations = _read_located(Path(source_text))
    elif "/" in source_text and not Path(source_text).suffix:
        records = _hub_records(source_text, None, split)
        source_text = f"{source_text} ({split})"
    else:
        raise DatasetError(
            f"{source_text!r} is neither a file nor one of the benchmarks {sorted(BENCHMARKS)} / 'demo' "
            "nor a Hugging Face dataset id (owner/name)"
        )
    problems = problems_from_records(
        records,
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
        source=source_text,
        locations=locations,
    )
    return problems if limit is None else problems[:limit]
