"""Bad input and injected faults, across the CLI verbs and the public API.

Each row of :data:`CLI_CASES` runs ``latentseek`` in-process (the model loader replaced by a tiny model unless the
row tests loading) and asserts the exit status, one line ``latentseek...: error: ...`` on stderr without a
traceback, and that every file already in the test's folder (a finished run among them) is byte-for-byte unchanged,
``results.jsonl`` excepted where the row lets the run append to it (then its old bytes must stay its prefix).
Faults are injected here (a method that raises on one problem, a writer that raises ENOSPC, a model call out of
memory above k problems) so that every row runs on the CPU. :data:`API_CASES` does the same for the Python API,
and a few subprocess rows check the real stderr.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_method_run import FakeMethod, make_problems
from latentseek.errors import ConfigError, DatasetError, LatentSeekError, ModelLoadError, RunError
from latentseek.eval.cli import main
from latentseek.eval.data import Problem
from latentseek.eval.record import Record, RecordSchemaError
from latentseek.eval.report import markdown_table, report
from latentseek.eval.runner import run_eval
from latentseek.eval.storage import CONFIG_FILE, LOCK_FILE, RESULTS_FILE, RecordWriter, load_run

# --- the fixtures every row shares ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    from tiny_lm import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model("qwen2", vocab_size=len(tok), device="cpu"), tok


@pytest.fixture
def ctx(tmp_path, tiny_lm, monkeypatch):
    """A folder with a data set of 3 problems, a finished fake run (`run`) and a cot run with q0 done (`cot`)."""
    import latentseek.eval.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: tiny_lm)
    dataset = tmp_path / "problems.jsonl"
    rows = [{"id": f"q{i}", "question": f"what is {i} + 1 ?", "answer": str(i + 1)} for i in range(3)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(3), run, {"method": "fake"}, progress=False)
    cot = tmp_path / "cot"
    assert main(_eval(dataset, cot, "--limit", "1")) == 0
    c = SimpleNamespace(tmp=tmp_path, dataset=dataset, run=run, cot=cot, new=tmp_path / "new", keep=[], lm=tiny_lm)
    yield c
    for fd in c.keep:
        os.close(fd)


def _eval(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", "tiny", "--dataset", str(dataset), "--out", str(out), "--no-progress",
            "--method", "cot", "--max-new-tokens", "2", *extra]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, bytes], after: dict[str, bytes], appends: bool) -> None:
    for name, data in before.items():
        assert name in after, f"{name} is gone"
        if appends and Path(name).name == RESULTS_FILE:
            assert after[name].startswith(data), f"{name}: the records written before changed"
        else:
            assert after[name] == data, f"{name} changed"


def assert_one_error_line(err: str, message: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("latentseek") and ": error: " in lines[0], lines[0]
    assert message in lines[0], lines[0]


# --- faults, injected into the cot method of the ctx runs ------------------------------------------------------------


def _wrap_cot(monkeypatch, before: Callable[[list[Problem]], None]) -> None:
    from latentseek.eval.methods import CoT

    original = CoT.solve_batch

    def solve_batch(self, problems):
        before(list(problems))
        return original(self, problems)

    monkeypatch.setattr(CoT, "solve_batch", solve_batch)


def raise_on(problem_id: str, error: Exception):
    def setup(c, monkeypatch):
        def before(problems):
            if any(p.id == problem_id for p in problems):
                raise error

        _wrap_cot(monkeypatch, before)

    return setup


def out_of_memory_above(k: int, error_type: type[BaseException]):
    def setup(c, monkeypatch):
        c.sizes = []

        def before(problems):
            c.sizes.append(len(problems))
            if len(problems) > k:
                raise error_type("out of memory (injected)")

        _wrap_cot(monkeypatch, before)

    return setup


def disk_full_after(writes: int, partial: bool = False):
    """RecordWriter's writes fail with ENOSPC after `writes` whole records (first writing half of one: `partial`)."""

    def setup(c, monkeypatch):
        count = [0]
        original = RecordWriter._write

        def write(self, data):
            count[0] += 1
            if count[0] <= writes:
                return original(self, data)
            if partial and count[0] == writes + 1:
                return original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(RecordWriter, "_write", write)

    return setup


def sigterm_in_first_batch(c, monkeypatch):
    calls = []

    def before(problems):
        calls.append(problems)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    _wrap_cot(monkeypatch, before)


def lock(c, monkeypatch):
    fd = os.open(c.cot / LOCK_FILE, os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    c.keep.append(fd)


def write(name: str, data: str | bytes):
    def setup(c, monkeypatch):
        path = c.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def edit(name: str, change: Callable[[bytes], bytes]):
    def setup(c, monkeypatch):
        path = c.tmp / name
        path.write_bytes(change(path.read_bytes()))

    return setup


def _gold_changed(c, monkeypatch):
    rows = [{"id": f"q{i}", "question": f"what is {i} + 1 ?", "answer": str(i + 7)} for i in range(3)]
    c.dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _corrupt_middle(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[1] = b"{not json"
    return b"\n".join(lines)


def _break_schema(data: bytes) -> bytes:
    first, rest = data.split(b"\n", 1)
    record = json.loads(first)
    record["correct"] = "yes"
    return json.dumps(record).encode() + b"\n" + rest


# --- the table --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[SimpleNamespace], list[str]]
    exit: int
    message: str  # in the error line (exit 2), or in stdout (a run that goes on)
    setup: Callable[[SimpleNamespace, pytest.MonkeyPatch], None] | None = None
    appends: bool = False  # the run may add records to results.jsonl
    check: Callable[[SimpleNamespace], None] | None = None  # further checks after the command
    extra: dict = field(default_factory=dict)


def _ev(*extra: str, out: str = "cot", dataset: str | None = None):
    return lambda c: _eval(c.tmp / dataset if dataset else c.dataset, getattr(c, out), *extra)


def _ids_and_status(c, folder: str = "cot") -> list[tuple[str, str]]:
    return [(r.id, r.record.status) for r in load_run(getattr(c, folder)).records]


def _one_failed(c):
    assert _ids_and_status(c) == [("q0", "ok"), ("q1", "failed"), ("q2", "ok")]
    (failed,) = [r.record for r in load_run(c.cot).records if r.record.status == "failed"]
    assert failed.error == "RuntimeError: the verifier broke" and not failed.correct
    assert main(["report", str(c.cot), "--out", str(c.tmp / "rep")]) == 0
    assert "| cot | cot | 3 (1 failed) |" in (c.tmp / "rep" / "report.md").read_text()


def _resumes(c):
    assert [r.id for r in load_run(c.cot).records] == ["q0"]  # cut back to the records whole before the fault
    assert main(_eval(c.dataset, c.cot)) == 0  # the disk has room again
    assert _ids_and_status(c) == [("q0", "ok"), ("q1", "ok"), ("q2", "ok")]


def _same_as_one_by_one(c):
    assert c.sizes == [3, 2, 1, 1, 1]  # halves down to one problem, which the rest of the run keeps
    assert _ids_and_status(c, "new") == [("q0", "ok"), ("q1", "ok"), ("q2", "ok")]
    one = c.tmp / "one"
    assert main(_eval(c.dataset, one, "--batch-size", "1")) == 0
    strip = [{k: v for k, v in r.record.to_json().items() if k != "seconds"} for r in load_run(one).records]
    assert strip == [{k: v for k, v in r.record.to_json().items() if k != "seconds"} for r in load_run(c.new).records]


def _no_more_after_the_batch(c):
    assert [r.id for r in load_run(c.cot).records] == ["q0", "q1"]


NOT_A_MODEL = "not a model"
CLI_CASES = [
    # the command line itself
    Case("no-subcommand", lambda c: [], 2, "required: command"),
    Case("unknown-subcommand", lambda c: ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    Case("eval-without-model", lambda c: ["eval", "--dataset", "demo", "--out", "x", "--method", "cot"], 2, "--model"),
    Case("unknown-method", lambda c: [*_eval(c.dataset, c.cot)[:-4], "--method", "magic"], 2, "'magic'"),
    Case("batch-size-not-int", _ev("--batch-size", "two"), 2, "invalid int value: 'two'"),
    Case("unknown-dtype", _ev("--dtype", "fp8"), 2, "'fp8'"),
    Case("unknown-on-error", _ev("--on-error", "ignore"), 2, "'ignore'"),
    Case("report-without-runs", lambda c: ["report"], 2, "runs"),
    Case("solve-with-an-eval-knob", lambda c: ["solve", "--model", "m", "--n-candidates", "3", "q"], 2, "unrecognized"),
    Case("max-new-tokens-not-int", _ev("--max-new-tokens", "1.5"), 2, "invalid int value: '1.5'"),
    # knobs
    Case("knob-of-another-method", _ev("--rho", "0.3"), 2, "does not use rho"),
    Case("max-new-tokens-zero", _ev("--max-new-tokens", "0"), 2, "max_new_tokens must be >= 1, got 0"),
    Case("temperature-negative", lambda c: [*_eval(c.dataset, c.new), "--method", "bon", "--temperature", "-1"], 2,
         "temperature"),
    Case("unknown-sampler", lambda c: [*_eval(c.dataset, c.new), "--method", "bon", "--sampler", "gumbel"], 2,
         "'gumbel'"),
    Case("sampler-of-another-method", _ev("--sampler", "fused"), 2, "does not use sampler"),
    Case("rho-above-one", lambda c: [*_eval(c.dataset, c.new), "--method", "latentseek", "--rho", "1.5"], 2, "rho"),
    Case("batch-size-zero", _ev("--batch-size", "0"), 2, "batch_size (--batch-size) must be >= 1, got 0"),
    Case("oracle-without-gold", lambda c: ["solve", "--model", "m", "--reward", "oracle", "q"], 2, "needs --gold"),
    Case("solve-empty-question", lambda c: ["solve", "--model", "m", "  "], 2, "the question is empty"),
    Case("limit-negative", _ev("--limit", "-1"), 2, "limit must be >= 0, got -1"),
    # data
    Case("dataset-missing", _ev(dataset="nope.jsonl"), 2, "nope.jsonl"),
    Case("dataset-empty", _ev(dataset="empty.jsonl"), 2, "empty.jsonl", setup=write("empty.jsonl", "")),
    Case("dataset-not-json", _ev(dataset="bad.jsonl"), 2, "bad.jsonl", setup=write("bad.jsonl", "{oops\n")),
    Case("dataset-without-answers", _ev(dataset="na.jsonl"), 2, "na.jsonl",
         setup=write("na.jsonl", '{"id": "a", "question": "q"}\n')),
    Case("question-field-absent", _ev("--question-field", "prompt"), 2, "prompt"),
    Case("dataset-duplicate-ids", _ev("--id-field", "id", dataset="dup.jsonl", out="new"), 2, "dup.jsonl",
         setup=write("dup.jsonl", '{"id": "a", "question": "q", "answer": "1"}\n' * 2)),
    # models (the real loader)
    Case("model-path-missing", _ev("--model", "nowhere/model", out="new"), 2, "nowhere/model",
         extra={"real_loader": True}),
    Case("model-is-a-text-file", _ev("--model", "notes.txt", out="new"), 2, "notes.txt",
         setup=write("notes.txt", NOT_A_MODEL), extra={"real_loader": True, "chdir": True}),
    Case("model-gguf-truncated", _ev("--model", "cut.gguf", out="new"), 2, "cut.gguf",
         setup=write("cut.gguf", b"GGUF\x03\x00\x00\x00"), extra={"real_loader": True, "chdir": True}),
    Case("solve-model-missing", lambda c: ["solve", "--model", "nowhere/model", "q"], 2, "nowhere/model",
         extra={"real_loader": True}),
    # run folders
    Case("report-not-a-run", lambda c: ["report", str(c.tmp)], 2, "is not a run directory"),
    Case("report-missing-folder", lambda c: ["report", str(c.tmp / "gone")], 2, "is not a run directory"),
    Case("report-corrupt-config", lambda c: ["report", str(c.run)], 2, "is not a run config",
         setup=write("run/config.json", "{")),
    Case("report-corrupt-record", lambda c: ["report", str(c.run)], 2, "results.jsonl:2: unreadable record",
         setup=edit("run/results.jsonl", _corrupt_middle)),
    Case("report-record-breaks-schema", lambda c: ["report", str(c.run)], 2, "does not fit the schema",
         setup=edit("run/results.jsonl", _break_schema)),
    Case("report-out-is-a-file", lambda c: ["report", str(c.run), "--out", str(c.dataset)], 2,
         "cannot write the report"),
    Case("eval-another-config", _ev("--max-new-tokens", "3"), 2, "different configuration"),
    Case("eval-run-in-use", _ev(), 2, "is locked", setup=lock),
    Case("eval-results-without-config", _ev(), 2, "holds results but no config.json",
         setup=lambda c, mp: (c.cot / CONFIG_FILE).unlink()),
    Case("eval-gold-changed", _ev(), 2, "gold answer of 1 finished problem", setup=_gold_changed),
    Case("eval-out-is-a-file", lambda c: _eval(c.dataset, c.dataset), 2, "cannot make the run directory"),
    Case("eval-results-file-is-a-folder", _ev(out="new"), 2, "cannot read",
         setup=lambda c, mp: (c.new / RESULTS_FILE).mkdir(parents=True)),
    # faults during a run
    Case("reward-raises-recorded", _ev("--batch-size", "3"), 0, "3/3 problems done",
         setup=raise_on("q1", RuntimeError("the verifier broke")), appends=True, check=_one_failed),
    Case("reward-raises-stop", _ev("--on-error", "stop"), 2, "problem q1: the method raised RuntimeError",
         setup=raise_on("q1", RuntimeError("the verifier broke")), appends=True,
         check=lambda c: _ids_and_status(c) == [("q0", "ok")]),
    Case("disk-full", _ev(), 2, "No space left on device", setup=disk_full_after(0), appends=True, check=_resumes),
    Case("disk-full-mid-line", _ev(), 2, "No space left on device", setup=disk_full_after(0, partial=True),
         appends=True, check=_resumes),
    Case("cuda-oom-above-1", _ev("--batch-size", "3", out="new"), 0, "settled on batch size 1",
         setup=out_of_memory_above(1, torch.OutOfMemoryError), check=_same_as_one_by_one),
    Case("cpu-memory-error-above-1", _ev("--batch-size", "3", out="new"), 0, "settled on batch size 1",
         setup=out_of_memory_above(1, MemoryError)),
    Case("oom-at-one-problem", _ev("--batch-size", "2"), 0, "2 failed",
         setup=out_of_memory_above(0, torch.OutOfMemoryError), appends=True),
    Case("sigterm-stops-after-the-batch", _ev(), 130, "(interrupted)", setup=sigterm_in_first_batch, appends=True,
         check=_no_more_after_the_batch),
]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli(case: Case, ctx, monkeypatch, capsys):
    if case.extra.get("real_loader"):
        import latentseek.eval.cli as cli
        from latentseek.model import load_model

        monkeypatch.setattr(cli, "load_model", load_model)
    if case.extra.get("chdir"):
        monkeypatch.chdir(ctx.tmp)
    if case.setup is not None:
        case.setup(ctx, monkeypatch)
    argv = case.argv(ctx)
    capsys.readouterr()
    before = snapshot(ctx.tmp)
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()
    assert status == case.exit, err
    if case.exit == 2:
        assert_one_error_line(err, case.message)
    else:
        assert "Traceback" not in err
        assert case.message in out, out
    assert_kept(before, snapshot(ctx.tmp), case.appends)
    if case.check is not None:
        monkeypatch.undo()  # the faults go away (a rerun on a disk with room again)
        import latentseek.eval.cli as cli

        monkeypatch.setattr(cli, "load_model", lambda *a, **k: ctx.lm)
        case.check(ctx)


# --- the API ----------------------------------------------------------------------------------------------------------


def _api_run(tmp: Path, **kwargs) -> None:
    run_eval(FakeMethod(), make_problems(2), tmp / "run", {"method": "fake"}, progress=False, **kwargs)


API_CASES = [
    ("run_eval-batch-size-zero", lambda t: _api_run(t, batch_size=0), ConfigError, "batch_size"),
    ("run_eval-on-error-unknown", lambda t: _api_run(t, on_error="ignore"), ConfigError, "on_error"),
    ("run_eval-duplicate-ids",
     lambda t: run_eval(FakeMethod(), make_problems(2) * 2, t / "run", {"method": "fake"}, progress=False),
     DatasetError, "'p000' appears more than once"),
    ("run_eval-config-not-json", lambda t: run_eval(FakeMethod(), [], t / "x", {"bad": object()}, progress=False),
     TypeError, "not JSON serializable"),
    ("load_run-not-a-run", lambda t: load_run(t), RunError, "is not a run directory"),
    ("report-not-a-run", lambda t: report([t]), RunError, "is not a run directory"),
    ("load_problems-missing", lambda t: __import__("latentseek.eval.data").eval.data.load_problems(str(t / "no.jsonl")),
     DatasetError, "no.jsonl"),
    ("make_method-unknown-knob",
     lambda t: __import__("latentseek.eval.methods").eval.methods.check_knobs("cot", {"rho": 0.2}), ConfigError, "rho"),
    ("load_model-missing", lambda t: __import__("latentseek.model").model.load_model(str(t / "m")), ModelLoadError,
     "m: no such file or folder"),
    ("LatentSeekConfig-rho", lambda t: __import__("latentseek.config").config.LatentSeekConfig(rho=2.0), ConfigError,
     "rho"),
    ("RecordWriter-parent-is-a-file", lambda t: RecordWriter(t / "problems.jsonl" / "r.jsonl"), RunError,
     "cannot write"),
    ("Record-unsolved-ok", lambda t: Record.unsolved("ok", "x"), ValueError, "'failed' or 'skipped'"),
    ("Record-failed-without-error",
     lambda t: Record(prediction=None, correct=False, tokens=0, seconds=0.0, status="failed"), RecordSchemaError,
     "error must be given"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "error", "message"), API_CASES, ids=[c[0] for c in API_CASES])
def test_api(name, call, error, message, tmp_path):
    (tmp_path / "problems.jsonl").write_text("{}\n")
    before = snapshot(tmp_path)
    with pytest.raises(error) as info:
        call(tmp_path)
    assert message in str(info.value)
    if isinstance(info.value, LatentSeekError):
        assert "\n" not in str(info.value)
    assert_kept(before, snapshot(tmp_path), appends=False)


# --- the policies behind the rows -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, knobs",
    [
        ("latentseek", {"reward": "oracle", "max_steps": 1}),
        ("cot", {}),
        ("bon", {"reward": "oracle", "n_candidates": 2}),
        ("self-consistency", {"n_candidates": 2}),
    ],
)
def test_a_problem_longer_than_the_context_is_skipped_and_the_others_solved(tmp_path, tiny_lm, name, knobs):
    from latentseek.eval.methods import make_method

    model, tok = tiny_lm  # its context: 1024 positions
    method = make_method(name, model, tok, max_new_tokens=2, **knobs)
    problems = make_problems(3)
    problems[1] = Problem(id="p001", question="what " * 1100, gold="2", answer_kind="number")
    summary = run_eval(method, problems, tmp_path / "r", {"method": "ls"}, batch_size=3, progress=False)
    statuses = [(r.id, r.record.status) for r in load_run(tmp_path / "r").records]
    assert statuses == [("p000", "ok"), ("p001", "skipped"), ("p002", "ok")]
    (skipped,) = [r.record for r in load_run(tmp_path / "r").records if r.record.status == "skipped"]
    assert "context is 1024 tokens" in skipped.error
    assert (summary.done, summary.skipped, summary.failed) == (3, 1, 0)


class Flaky(FakeMethod):
    """FakeMethod that raises on the problems in `broken`."""

    def __init__(self, broken: set[str]) -> None:
        super().__init__()
        self.broken = broken

    def solve_batch(self, problems):
        if any(p.id in self.broken for p in problems):
            raise ValueError("reward callable failed")
        return super().solve_batch(problems)


def test_failed_problems_are_kept_on_resume_unless_retry_failed(tmp_path):
    out = tmp_path / "r"
    summary = run_eval(Flaky({"p001"}), make_problems(3), out, {"method": "fake"}, batch_size=2, progress=False)
    assert (summary.done, summary.failed) == (3, 1)
    assert summary.correct == sum(r.record.correct for r in load_run(out).records)
    kept = (out / RESULTS_FILE).read_bytes()
    assert (
        run_eval(
            Flaky(set(make_problems(3)[i].id for i in range(3))),
            make_problems(3),
            out,
            {"method": "fake"},
            progress=False,
        ).failed
        == 1
    )  # nothing left to solve: a method that fails on all is not called
    assert (out / RESULTS_FILE).read_bytes() == kept
    summary = run_eval(FakeMethod(), make_problems(3), out, {"method": "fake"}, progress=False, retry_failed=True)
    assert (summary.done, summary.failed) == (3, 0)
    assert [r.id for r in load_run(out).records] == ["p000", "p002", "p001"]  # the retried one appended
    assert (out / RESULTS_FILE).read_bytes().startswith(kept.split(b"\n")[0] + b"\n")


def test_the_report_counts_failed_and_skipped_as_wrong(tmp_path):
    out = tmp_path / "r"
    run_eval(Flaky({"p000", "p001"}), make_problems(4), out, {"method": "fake"}, progress=False)
    result = report([out])
    assert "| r | fake | 4 (2 failed) | 25.0% (1/4) |" in result.table
    assert "count as wrong" in result.markdown
    assert "failed" not in markdown_table([])  # no failures, no note


def test_an_ok_record_is_written_as_before_status_existed():
    record = Record(prediction="1", correct=True, tokens=3, seconds=0.5)
    assert "status" not in record.to_json() and "error" not in record.to_json()
    failed = Record.unsolved("failed", "ValueError: x")
    assert failed.to_json()["status"] == "failed"
    assert Record.from_json(failed.to_json()) == failed


def test_a_bug_in_a_method_still_shows_its_traceback(tmp_path, ctx, monkeypatch):
    from latentseek.eval.methods import CoT

    monkeypatch.setattr(CoT, "solve_batch", lambda self, problems: [])  # one record short: our bug, not the user's
    with pytest.raises(TypeError, match="returned 0 records for 1 problems"):
        main(_eval(ctx.dataset, ctx.cot))


# --- the real stderr --------------------------------------------------------------------------------------------------


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "latentseek", *argv], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "{tmp}"], "is not a run directory"),
        (
            ["eval", "--model", "m", "--dataset", "{tmp}/none.jsonl", "--out", "{tmp}/o", "--method", "cot"],
            "none.jsonl",
        ),
        (["eval", "--model", "m", "--dataset", "demo", "--out", "{tmp}/o", "--method", "cot", "--rho", "1"], "rho"),
    ],
    ids=["report-not-a-run", "dataset-missing", "knob-of-another-method"],
)
def test_the_real_stderr_has_one_line_and_no_traceback(tmp_path, argv, message):
    proc = _cli(*(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, message)
    assert list(tmp_path.iterdir()) == []


def test_the_table_has_at_least_forty_rows():
    assert len(CLI_CASES) + len(API_CASES) >= 40
