"""Reports: the Markdown table's numbers equal what the JSONL holds, and the plots are written."""

import dataclasses
import json
from pathlib import Path

import pytest

from fake_method_run import FakeMethod, make_problems
from latentseek.errors import RunError
from latentseek.eval.record import LatentSeekRecord, Record, StoredRecord
from latentseek.eval.report import (
    ACCURACY_PLOT,
    BUDGET_PLOT,
    ITERATIONS_PLOT,
    REPORT_FILE,
    REWARD_PLOT,
    TOKENS_PLOT,
    RunStats,
    accuracy_at_budgets,
    answer_at_budget,
    budget_curve,
    budget_token_curve,
    default_report_dir,
    markdown_table,
    mean_reward_by_iteration,
    report,
)
from latentseek.eval.runner import run_eval
from latentseek.eval.storage import RESULTS_FILE, SHARD_DIR, RecordWriter, Run, load_run

COMMITTED_RUNS = Path(__file__).resolve().parent.parent / "runs"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class NoRewardMethod(FakeMethod):
    """Like a greedy chain-of-thought baseline: no iterations, no rewards, all answers right."""

    def solve_batch(self, problems):
        return [
            dataclasses.replace(r, prediction=p.gold, correct=True, iterations=0, rewards=[])
            for p, r in zip(problems, super().solve_batch(problems), strict=True)
        ]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    a, b = tmp_path / "runs" / "latentseek-8", tmp_path / "runs" / "cot-5"
    run_eval(FakeMethod(), make_problems(8), a, {"method": "latentseek"}, batch_size=3, progress=False)
    run_eval(NoRewardMethod(), make_problems(5), b, {"method": "cot"}, progress=False)
    return [a, b]


def table_rows(markdown: str) -> dict[str, list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")][2:]  # after the header and rule
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def expected_from_jsonl(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / RESULTS_FILE).read_text().splitlines()]
    n = len(records)
    return {
        "problems": n,
        "correct": sum(r["correct"] for r in records),
        "iterations": sum(r["iterations"] for r in records) / n,
        "tokens": sum(r["tokens"] for r in records) / n,
        "seconds": sum(r["seconds"] for r in records) / n,
    }


def rounds_to(cell: str, value: float, decimals: int) -> bool:
    """Whether a table cell is `value` rounded to `decimals` places (half a unit, plus float noise)."""
    return abs(float(cell) - value) <= 0.5 * 10**-decimals + 1e-9


def test_report_table_equals_the_jsonl_and_files_exist(runs, tmp_path):
    out = tmp_path / "report"
    result = report(runs, out)
    assert result.markdown_path == out / REPORT_FILE
    assert result.markdown_path.read_text() == result.markdown and result.table in result.markdown
    assert [p.name for p in result.plot_paths] == [
        ACCURACY_PLOT,
        REWARD_PLOT,
        ITERATIONS_PLOT,
        BUDGET_PLOT,
        TOKENS_PLOT,
    ]
    for plot in result.plot_paths:
        assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 5000
        assert f"({plot.name})" in result.markdown

    rows = table_rows(result.markdown)
    assert list(rows) == [r.name for r in runs]
    for run_dir, method in zip(runs, ["latentseek", "cot"], strict=True):
        want = expected_from_jsonl(run_dir)
        got_method, problems, accuracy, iterations, tokens, seconds, initial = rows[run_dir.name]
        assert got_method == method and int(problems) == want["problems"]
        assert accuracy == f"{100 * want['correct'] / want['problems']:.1f}% ({want['correct']}/{want['problems']})"
        assert rounds_to(iterations, want["iterations"], 2)
        assert rounds_to(tokens, want["tokens"], 1)
        assert rounds_to(seconds, want["seconds"], 2)
        assert initial == "n/a"


def test_fixture_numbers_are_the_ones_the_fake_method_gives(runs):
    # p000..p007: wrong when i % 3 == 0 (3 of 8); iterations i % 4; tokens 10 (i + 1); seconds 0.5 + i / 50
    rows = table_rows(report(runs).markdown)
    assert rows["latentseek-8"] == ["latentseek", "8", "62.5% (5/8)", "1.50", "45.0", "0.57", "n/a"]
    assert rows["cot-5"] == ["cot", "5", "100.0% (5/5)", "0.00", "30.0", "0.54", "n/a"]


def test_mean_reward_by_iteration_counts_only_problems_that_got_there(runs):
    # iterations i % 4 over i = 0..7 gives two problems each with 1, 2, 3, 4 rewards of -1 + 0.25 k
    assert mean_reward_by_iteration(load_run(runs[0])) == [-1.0, -0.75, -0.5, -0.25]
    assert mean_reward_by_iteration(load_run(runs[1])) == []


def test_default_report_dir(runs):
    assert default_report_dir(runs[:1]) == runs[0].resolve() / "report"
    assert default_report_dir(runs) == runs[0].resolve().parent / "report"
    assert report(runs[:1]).markdown_path == runs[0].resolve() / "report" / REPORT_FILE


def test_report_reads_a_run_still_in_progress(tmp_path):
    out = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(2), out, {"method": "latentseek"}, progress=False)
    with RecordWriter(out / SHARD_DIR / "rank1.jsonl") as writer:
        record = FakeMethod().solve_batch(make_problems(3)[2:])[0]
        writer.append(StoredRecord("p002", "3", record).to_json())
    (out / SHARD_DIR / "rank1.jsonl").open("ab").write(b'{"id": "p00')  # a line being written right now
    rows = table_rows(report([out], tmp_path / "r").markdown)
    assert rows["run"][:2] == ["latentseek", "3"]


def test_empty_run_and_missing_config(tmp_path):
    empty = tmp_path / "empty"
    run_eval(FakeMethod(), [], empty, {"method": "bon"}, progress=False)
    assert table_rows(report([empty], tmp_path / "r").markdown)["empty"] == [
        "bon",
        "0",
        "n/a",
        "n/a",
        "n/a",
        "n/a",
        "n/a",
    ]
    with pytest.raises(RunError, match="not a run directory"):
        report([tmp_path / "nothing"], tmp_path / "r")


def test_markdown_table_header():
    header = markdown_table([]).splitlines()[0]
    for column in ("accuracy", "mean iterations", "tokens / problem", "seconds / problem"):
        assert column in header


def test_initial_accuracy_of_runs_that_record_it(tmp_path):
    class WithInitial(FakeMethod):
        def solve_batch(self, problems):
            return [
                LatentSeekRecord(
                    **{f.name: getattr(r, f.name) for f in dataclasses.fields(Record)},
                    initial_prediction=None,
                    initial_correct=p.id in ("p001", "p004"),
                    initial_response="",
                    final_index=r.iterations,
                    update_length=3,
                    solved=r.correct,
                    generated_tokens=r.tokens,
                    verifier_tokens=0,
                )
                for p, r in zip(problems, super().solve_batch(problems), strict=True)
            ]

    out = tmp_path / "ls"
    run_eval(WithInitial(), make_problems(5), out, {"method": "latentseek-self"}, progress=False)
    assert table_rows(report([out], tmp_path / "r").markdown)["ls"][-1] == "40.0% (2/5)"


COMMITTED_REPORTS = sorted(p.name for p in COMMITTED_RUNS.glob("*-report"))


def test_the_committed_reports_are_found():
    assert {"gsm8k30-report", "gsm8k100-report"} <= set(COMMITTED_REPORTS)


@pytest.mark.parametrize("report_name", COMMITTED_REPORTS)
def test_committed_runs_load_and_give_the_committed_report_table(report_name):
    # runs/ holds results written before the records were typed: they read back typed, to the same table
    committed = (COMMITTED_RUNS / report_name / REPORT_FILE).read_text()
    names = list(table_rows(committed))
    runs = [load_run(COMMITTED_RUNS / name) for name in names]
    assert markdown_table([RunStats.of(run) for run in runs]) in committed
    for run in runs:  # a record writes back the line it was read from
        lines = (run.path / RESULTS_FILE).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == [r.to_json() for r in run.records]


def test_the_committed_gsm8k30_runs_read_back_as_their_record_types():
    runs = [
        load_run(COMMITTED_RUNS / name)
        for name in table_rows((COMMITTED_RUNS / "gsm8k30-report" / REPORT_FILE).read_text())
    ]
    kinds = {run.path.name: {type(r.record).__name__ for r in run.records} for run in runs}
    assert kinds == {
        "gsm8k30-cot": {"Record"},
        "gsm8k30-latentseek-oracle": {"LatentSeekRecord"},
        "gsm8k30-latentseek-self": {"LatentSeekRecord"},
        "gsm8k30-bon-self": {"BestOfNRecord"},
        "gsm8k30-self-consistency": {"SelfConsistencyRecord"},
        "gsm8k30-latentseek-confidence": {"LatentSeekRecord"},
        "gsm8k30-latentseek-samples": {"LatentSeekRecord"},
        "gsm8k30-slot": {"SlotRecord"},
    }


def step_record(predictions, rewards, gold, keep_best=False) -> StoredRecord:
    """A LatentSeek record built by hand from its per-step answers and rewards (the loop's final answer chosen
    as the loop chooses it)."""
    iterations = len(predictions) - 1
    final = max(range(iterations + 1), key=lambda i: (rewards[i], -i)) if keep_best else iterations
    correct = predictions[final] == gold
    record = LatentSeekRecord(
        prediction=predictions[final],
        correct=correct,
        tokens=10,
        seconds=0.1,
        iterations=iterations,
        rewards=rewards,
        initial_prediction=predictions[0],
        initial_correct=predictions[0] == gold,
        initial_response="",
        final_index=final,
        update_length=2,
        solved=rewards[final] > -0.2,
        generated_tokens=10,
        verifier_tokens=0,
        step_predictions=predictions,
    )
    return StoredRecord(f"q{gold}", gold, record)


# Threshold -0.2, max_steps 3. A stopped on its threshold at step 2; B's initial answer passed (no steps);
# C ran out of steps, its best reward at step 1; D failed.
A = (["1", "2", "3"], [-1.0, -1.0, 0.0], "3")
B = (["5"], [0.0], "5")
C = (["7", "8", "9", "9"], [-1.0, -0.6, -1.0, -1.0], "8")


def test_answer_at_budget_follows_the_loop():
    a, b, c = (step_record(*x).record for x in (A, B, C))
    assert [answer_at_budget(a, k, keep_best=False) for k in range(4)] == [0, 1, 2, 2]  # stopped early at 2
    assert [answer_at_budget(b, k, keep_best=False) for k in range(4)] == [0, 0, 0, 0]  # budget 0 = initial CoT
    assert [answer_at_budget(c, k, keep_best=False) for k in range(4)] == [0, 1, 2, 3]  # the last answer
    assert [answer_at_budget(c, k, keep_best=True) for k in range(4)] == [0, 1, 1, 1]  # the best so far
    assert [answer_at_budget(a, k, keep_best=True) for k in range(4)] == [0, 0, 2, 2]  # the earliest of equals
    with pytest.raises(ValueError, match="budget must be >= 0"):
        answer_at_budget(a, -1, keep_best=False)


def test_accuracy_at_budgets_from_hand_built_records():
    failed = StoredRecord("qf", "4", Record.unsolved("failed", "reward raised"))
    for keep_best, want in ((False, [0.25, 0.5, 0.5, 0.5]), (True, [0.25, 0.5, 0.75, 0.75])):
        records = [step_record(*x, keep_best=keep_best) for x in (A, B, C)] + [failed]
        assert accuracy_at_budgets(records, range(4), keep_best) == want
        # the full budget gives back the run's own accuracy
        assert want[-1] == sum(r.record.correct for r in records) / len(records)
    old = StoredRecord("qo", "5", dataclasses.replace(step_record(*B).record, step_predictions=[]))
    with pytest.raises(ValueError, match="step_predictions"):
        accuracy_at_budgets([old], [0], keep_best=False)
    # under the oracle reward the rewards are the verdicts (0 right, -1 wrong): older records suffice
    older = [
        StoredRecord(s.id, s.gold, dataclasses.replace(s.record, step_predictions=[]))
        for s in map(lambda x: step_record(*x), (A, B))
    ]
    assert accuracy_at_budgets(older, range(4), keep_best=False, oracle=True) == [0.5, 0.5, 1.0, 1.0]


class StepMethod(FakeMethod):
    """Returns the hand-built records A, B, C (with or without their per-step answers)."""

    def __init__(self, with_steps: bool) -> None:
        super().__init__()
        self.with_steps = with_steps

    def solve_batch(self, problems):
        out = []
        for p in problems:
            r = step_record(*(A, B, C)[int(p.id[1:])]).record
            out.append(r if self.with_steps else dataclasses.replace(r, step_predictions=[]))
        return out


def test_report_draws_the_budget_curve_and_notes_runs_without_steps(tmp_path):
    problems = [dataclasses.replace(p, gold=x[2]) for p, x in zip(make_problems(3), (A, B, C), strict=True)]
    config = {"method": "latentseek-self", "knobs": {"max_steps": 3, "keep_best": True}}
    new, old = tmp_path / "new", tmp_path / "old"
    run_eval(StepMethod(with_steps=True), problems, new, config, progress=False)
    run_eval(StepMethod(with_steps=False), problems, old, config, progress=False)
    assert budget_curve(load_run(new)) == ([0, 1, 2, 3], [1 / 3, 2 / 3, 1.0, 1.0])
    assert budget_curve(load_run(old)) is None
    line = json.loads((old / RESULTS_FILE).read_text().splitlines()[0])
    assert "step_predictions" not in line  # an older record's line is unchanged
    result = report([new, old], tmp_path / "r")
    assert "leaves out old:" in result.markdown and "leaves out new" not in result.markdown
    for plot in result.plot_paths[3:]:
        assert plot.read_bytes().startswith(PNG_SIGNATURE) and f"({plot.name})" in result.markdown


def test_budget_token_curve_puts_the_step_budgets_on_the_token_axis(tmp_path):
    def with_tokens(x, step_tokens):
        stored = step_record(*x)
        record = dataclasses.replace(stored.record, step_tokens=step_tokens, tokens=step_tokens[-1])
        return StoredRecord(stored.id, stored.gold, record)

    failed = StoredRecord("qf", "4", Record.unsolved("failed", "reward raised"))
    records = [with_tokens(A, [4, 7, 10]), with_tokens(B, [5]), with_tokens(C, [3, 6, 8, 11]), failed]
    run = Run(tmp_path, {"method": "latentseek-oracle", "knobs": {"max_steps": 3, "keep_best": False}}, records)
    tokens, accuracy = budget_token_curve(run)
    assert tokens == [(4 + 5 + 3) / 4, (7 + 5 + 6) / 4, (10 + 5 + 8) / 4, (10 + 5 + 11) / 4]
    assert accuracy == budget_curve(run)[1] == [0.25, 0.5, 0.5, 0.5]
    stats = RunStats.of(run)  # the full budget is the table's point
    assert (tokens[-1], accuracy[-1]) == (stats.tokens_per_problem, stats.accuracy)
    older = Run(tmp_path, run.config, [with_tokens(A, [4, 7, 10]), step_record(*B)])
    assert budget_token_curve(older) is None
    line = step_record(*B).to_json()
    assert "step_tokens" not in line and "sample_rewards" not in line  # a record without them writes no field
