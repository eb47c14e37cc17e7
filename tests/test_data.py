"""Problem loaders: local JSONL / JSON / parquet, field detection, gold answers, stable ids, hub names and errors."""

import json
import sys
import types
from pathlib import Path

import pytest

from latentseek.eval import data
from latentseek.eval.data import (
    BENCHMARKS,
    DEMO_PROBLEMS_PATH,
    DatasetError,
    gold_from_answer,
    load_problems,
    read_records,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A car costs $1,200 more than $800. Price?", "answer": "1200 + 800 = 2000\n#### 2,000"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
]
MATH_ROWS = [
    {"problem": "Simplify 2/4.", "answer": "\\frac{1}{2}", "unique_id": "test/algebra/1.json"},
    {"problem": "Compute 3 + 4.", "answer": "7", "unique_id": "test/algebra/2.json"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_jsonl_gold_is_the_number_after_the_marker(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))
    assert [p.gold for p in problems] == ["5", "2000", "4.5"]
    assert [p.question for p in problems] == [r["question"] for r in GSM8K_ROWS]
    assert all(p.answer_kind == "number" for p in problems)
    assert problems[1].raw == GSM8K_ROWS[1]


def test_gold_from_answer():
    assert gold_from_answer("work #### 1,450,000") == "1450000"
    assert gold_from_answer(" 025 ") == "025"
    assert gold_from_answer(204) == "204"


def test_math_json_list_uses_problem_field_and_unique_id(tmp_path):
    path = tmp_path / "math.json"
    path.write_text(json.dumps(MATH_ROWS), encoding="utf-8")
    problems = load_problems(path)
    assert [p.id for p in problems] == ["test/algebra/1.json", "test/algebra/2.json"]
    assert [p.gold for p in problems] == ["\\frac{1}{2}", "7"]
    assert {p.answer_kind for p in problems} == {"math"}  # one non-number makes the whole set "math"


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, "data": MATH_ROWS}), encoding="utf-8")
    assert len(load_problems(path)) == 2


def test_aime_zero_padded_answers_stay_strings(tmp_path):
    rows = [{"id": 60, "problem": "p1", "answer": "025"}, {"id": 61, "problem": "p2", "answer": "204"}]
    problems = load_problems(write_jsonl(tmp_path / "aime.jsonl", rows))
    assert [(p.id, p.gold, p.answer_kind) for p in problems] == [("60", "025", "number"), ("61", "204", "number")]


def test_user_defined_fields(tmp_path):
    rows = [{"q": "1+1?", "a": 2, "key": "x"}, {"q": "2+2?", "a": 4, "key": "y"}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    problems = load_problems(path, question_field="q", answer_field="a", id_field="key")
    assert [(p.id, p.question, p.gold) for p in problems] == [("x", "1+1?", "2"), ("y", "2+2?", "4")]


def test_ids_are_stable_unique_and_independent_of_limit(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    full = [p.id for p in load_problems(path)]
    assert full == [p.id for p in load_problems(path)]
    assert len(set(full)) == len(full)
    assert [p.id for p in load_problems(path, limit=2)] == full[:2]
    edited = [dict(GSM8K_ROWS[0], answer="#### 6"), *GSM8K_ROWS[1:]]
    changed = [p.id for p in load_problems(write_jsonl(tmp_path / "edited.jsonl", edited))]
    assert changed[0] != full[0] and changed[1:] == full[1:]  # an edited record is a new problem


def test_a_non_unique_id_column_is_not_used_as_id(tmp_path):
    rows = [{"id": 1, "question": "a", "answer": "1"}, {"id": 1, "question": "b", "answer": "2"}]
    problems = load_problems(write_jsonl(tmp_path / "dup.jsonl", rows))
    assert len({p.id for p in problems}) == 2
    with pytest.raises(DatasetError, match="duplicate"):
        load_problems(tmp_path / "dup.jsonl", id_field="id")


@pytest.mark.parametrize(
    ("content", "name", "kwargs", "message"),
    [
        ('{"question": "q"}\n', "noanswer.jsonl", {}, "no answer field"),
        ('{"question": "q", "answer": "1"}\n', "f.jsonl", {"question_field": "prompt"}, "'prompt' is missing"),
        ('{"question": "q", "answer": "1"}\n{"question": \n', "broken.jsonl", {}, "broken.jsonl:2"),
        ("[1, 2]", "numbers.json", {}, "list of JSON objects"),
        ('{"a": [], "b": []}', "two_lists.json", {}, "exactly one list"),
        ("question,answer\n", "table.csv", {}, "unsupported file type"),
        ("", "empty.jsonl", {}, "empty"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, name, kwargs, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_problems(path, **kwargs)


def test_unknown_source(tmp_path):
    with pytest.raises(DatasetError, match="neither a file"):
        load_problems(tmp_path / "missing.jsonl")


def test_parquet_without_pyarrow_or_pandas_names_them(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(DatasetError, match="pyarrow"):
        read_records(tmp_path / "set.parquet")


def test_parquet_with_pyarrow(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), tmp_path / "math.parquet")
    assert [p.gold for p in load_problems(tmp_path / "math.parquet")] == ["\\frac{1}{2}", "7"]


def test_hub_without_datasets_package_says_to_pass_a_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match="pass a local"):
        load_problems("gsm8k")


def fake_datasets(monkeypatch, rows=None, error=None):
    calls = []

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        if error is not None:
            raise error
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_offline_says_to_pass_a_path(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach the Hub"))
    with pytest.raises(DatasetError, match="Couldn't reach.*pass a local"):
        load_problems("math500")


@pytest.mark.parametrize(
    ("name", "rows", "golds"),
    [
        ("gsm8k", GSM8K_ROWS, ["5", "2000", "4.5"]),
        ("math500", MATH_ROWS, ["\\frac{1}{2}", "7"]),
        ("aime24", [{"id": 60, "problem": "p", "answer": "025", "url": "u", "year": "2024"}], ["025"]),
    ],
)
def test_benchmark_names_load_their_hub_sets(monkeypatch, name, rows, golds):
    calls = fake_datasets(monkeypatch, rows=rows)
    problems = load_problems(name)
    bench = BENCHMARKS[name]
    assert calls == [(bench.hub_id, bench.hub_config, bench.split)]
    assert [p.gold for p in problems] == golds


def test_other_hub_ids_take_split_and_fields(monkeypatch):
    calls = fake_datasets(monkeypatch, rows=[{"Problem": "p", "Answer": 3}])
    problems = load_problems("someone/aime_2025", split="train")
    assert calls == [("someone/aime_2025", None, "train")]
    assert (problems[0].question, problems[0].gold) == ("p", "3")


def test_demo_problems_are_shipped_numeric_and_unique():
    assert DEMO_PROBLEMS_PATH.parent.parent == Path(data.__file__).resolve().parent
    problems = load_problems("demo")
    assert len(problems) == 16
    assert len({p.id for p in problems}) == 16
    assert all(p.answer_kind == "number" and p.gold.isdigit() for p in problems)


# The public sets' formats: tests/fixtures holds their first records byte for byte (run in CI), the full files are
# checked with `pytest --shared-data DIR` (deselected without it, and a failure, not a skip, if DIR is missing).
PUBLIC_SETS = [
    ("gsm8k_test.jsonl", "18", "number"),
    ("math500_test.jsonl", "\\left( 3, \\frac{\\pi}{2} \\right)", "math"),
    ("aime24_test.jsonl", "204", "number"),
]
FULL_SIZES = {"gsm8k_test.jsonl": 1319, "math500_test.jsonl": 500, "aime24_test.jsonl": 30}


@pytest.mark.parametrize(("file", "first_gold", "kind"), PUBLIC_SETS)
def test_the_public_sets_formats_load_from_the_fixtures(file, first_gold, kind):
    problems = load_problems(FIXTURES / file)
    assert len(problems) == 3 and len({p.id for p in problems}) == 3
    assert problems[0].gold == first_gold and all(p.answer_kind == kind for p in problems)


@pytest.mark.shared_data
@pytest.mark.parametrize(("file", "first_gold", "kind"), PUBLIC_SETS)
def test_the_public_sets_load_from_full_copies(shared_data, file, first_gold, kind):
    problems = load_problems(shared_data / file)
    assert len(problems) == FULL_SIZES[file] and len({p.id for p in problems}) == FULL_SIZES[file]
    assert problems[0].gold == first_gold and problems[0].answer_kind == kind


# --- record errors name the file, the record (line or index, and id) and the field ----------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        # the case: the second record lacks its answer
        (
            ['{"question": "q1", "answer": "1"}', '{"question": "q2"}'],
            r"set\.jsonl: line 2: answer field 'answer' is missing \(its fields: \['question'\]\)",
        ),
        # line numbers are the file's, blank lines counted
        (
            ['{"question": "q1", "answer": "1"}', "", '{"question": "q2"}'],
            r"set\.jsonl: line 3: answer field 'answer' is missing",
        ),
        # a field some records have and others lack: the first record without it
        (
            ['{"question": "q1", "answer": "1"}', '{"problem": "q2", "answer": "2"}'],
            r"line 2: question field 'question' is missing \(its fields: \['answer', 'problem'\]\)",
        ),
        (
            ['{"question": "q1", "answer": "1", "id": "a"}', '{"question": "  ", "answer": "2", "id": "b"}'],
            r"line 2 \(id 'b'\): question field 'question' is empty",
        ),
        (['{"question": 7, "answer": "1"}'], r"line 1: question field 'question' is a number \(7\), expected text"),
        (['{"question": null, "answer": "1"}'], r"line 1: question field 'question' is null"),
        (
            ['{"question": "q", "answer": null}'],
            r"line 1: answer field 'answer' is null, expected text or a finite number",
        ),
        (['{"question": "q", "answer": [1, 2]}'], r"answer field 'answer' is a list"),
        (['{"question": "q", "answer": {"value": 1}}'], r"answer field 'answer' is an object"),
        (['{"question": "q", "answer": true}'], r"answer field 'answer' is a boolean \(true\)"),
        (['{"question": "q", "answer": NaN}'], r"answer field 'answer' is a number \(nan\)"),
        (['{"question": "q", "answer": "  "}'], r"answer field 'answer' holds no answer"),
        (['{"question": "q", "answer": "work, no number ####"}'], r"answer field 'answer' holds no answer"),
        (
            [
                '{"question": "q", "answer": "1", "unique_id": "u1"}',
                '{"question": "r", "answer": "", "unique_id": "u2"}',
            ],
            r"line 2 \(unique_id 'u2'\): answer field",
        ),
        (
            ['{"text": "q", "label": "1"}'],
            r"line 1: no question field: none of \['question', 'problem', 'Question', 'Problem'\] is among its fields \['label', 'text'\]; name the field with question_field \(--question-field\)",
        ),
        (["[1, 2]"], r"set\.jsonl:1: expected a JSON object, got a list"),
    ],
)
def test_record_errors_name_the_file_the_record_and_the_field(tmp_path, lines, message):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as caught:
        load_problems(path)
    assert "\n" not in str(caught.value)


def test_numeric_answers_are_accepted_as_their_text(tmp_path):
    rows = [{"question": "q1", "answer": 18}, {"question": "q2", "answer": 4.5}, {"question": "q3", "answer": -3}]
    problems = load_problems(write_jsonl(tmp_path / "numbers.jsonl", rows))
    assert [p.gold for p in problems] == ["18", "4.5", "-3"]
    assert {p.answer_kind for p in problems} == {"number"}


def test_a_named_id_field_must_be_unique_and_present(tmp_path):
    rows = [{"k": "a", "question": "q1", "answer": "1"}, {"k": "b", "question": "q2", "answer": "2"}]
    rows.append({"k": "a", "question": "q3", "answer": "3"})
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    with pytest.raises(DatasetError, match=r"ids\.jsonl: line 3: duplicate id 'a' \(field 'k'\): line 1 has it too"):
        load_problems(path, id_field="k")
    rows[2]["k"] = None
    with pytest.raises(DatasetError, match=r"line 3: id field 'k' is null"):
        load_problems(write_jsonl(path, rows), id_field="k")
    del rows[2]["k"]
    with pytest.raises(
        DatasetError, match=r"line 3: id field 'k' is missing \(its fields: \['answer', 'question'\]\); add it"
    ):
        load_problems(write_jsonl(path, rows), id_field="k")


def test_a_named_field_that_no_record_has(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(
        DatasetError, match=r"f\.jsonl: line 1: answer field 'solution' is missing .*\(--answer-field\)"
    ):
        load_problems(path, answer_field="solution")


def test_json_and_parquet_records_are_named_by_index(tmp_path):
    rows = [{"problem": "p1", "answer": "1", "id": 10}, {"problem": "p2", "answer": None, "id": 11}]
    (tmp_path / "set.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"set\.json: index 1 \(id '11'\): answer field 'answer' is null"):
        load_problems(tmp_path / "set.json")
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "set.parquet")
    with pytest.raises(DatasetError, match=r"set\.parquet: index 1 \(id '11'\): answer field 'answer' is null"):
        load_problems(tmp_path / "set.parquet")


def test_hub_records_are_named_by_hub_id_split_and_index(monkeypatch):
    fake_datasets(monkeypatch, rows=[{"Problem": "p", "Answer": 3}, {"Problem": "", "Answer": 4}])
    with pytest.raises(DatasetError, match=r"someone/set \(train\): index 1: question field 'Problem' is empty"):
        load_problems("someone/set", split="train")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.json", '[\n  {"question": "q",\n  "answer": }\n]', r"broken\.json:3:13: not valid JSON"),
        ("binary.jsonl", b"\xff\xfe\x00q", r"binary\.jsonl is not UTF-8 text"),
        ("corrupt.parquet", b"not parquet at all", r"corrupt\.parquet is not a readable Parquet file"),
        ("scalar.json", "42", r"scalar\.json: expected a list of JSON objects, got a number \(42\)"),
        ("mixed.json", '[{"question": "q", "answer": "1"}, "text"]', r"mixed\.json: .* index 1 is a string"),
    ],
)
def test_unreadable_files_give_one_line_errors(tmp_path, name, content, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as caught:
        load_problems(path)
    assert "\n" not in str(caught.value)


def test_a_directory_or_a_negative_limit_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="is a directory"):
        load_problems(tmp_path)
    with pytest.raises(DatasetError, match="limit must be >= 0, got -1"):
        load_problems("demo", limit=-1)


def test_dataset_error_is_a_latentseek_error_and_a_value_error():
    from latentseek.errors import DatasetError as Typed
    from latentseek.errors import LatentSeekError

    assert DatasetError is Typed and issubclass(DatasetError, LatentSeekError) and issubclass(DatasetError, ValueError)
