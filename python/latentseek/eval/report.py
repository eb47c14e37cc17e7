"""Reports over one or more run directories: a Markdown table and three PNG plots.

The table has one row per run (each run is one method on one model and data set): problems finished, accuracy,
mean optimisation iterations, and generated tokens and wall seconds per problem, so that methods can be compared
at equal compute. Problems recorded as failed (the method raised on them) or skipped (longer than the model's
context) count in ``problems`` and as wrong in the accuracy; the problems cell then says how many they were.
The plots show accuracy by method, the mean reward at each iteration, how many iterations the problems took, the
test-time scaling curve (accuracy of a LatentSeek run against the step budget, from its recorded per-step answers:
no extra compute) and accuracy against generated tokens per problem for every run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from latentseek.config import LatentSeekConfig
from latentseek.errors import RunError
from latentseek.eval.judge import is_equivalent
from latentseek.eval.record import LatentSeekRecord, StoredRecord
from latentseek.eval.storage import Run, load_run

REPORT_FILE = "report.md"
ACCURACY_PLOT = "accuracy_by_method.png"
REWARD_PLOT = "reward_by_iteration.png"
ITERATIONS_PLOT = "iterations_histogram.png"
BUDGET_PLOT = "accuracy_by_budget.png"
TOKENS_PLOT = "accuracy_by_tokens.png"


@dataclass(frozen=True)
class RunStats:
    """The numbers of one table row, computed from a run's records."""

    name: str
    method: str
    problems: int
    correct: int
    mean_iterations: float
    tokens_per_problem: float
    seconds_per_problem: float
    initial_correct: int | None = None  # LatentSeek runs: how many initial (greedy CoT) answers were correct
    failed: int = 0  # problems the method raised on (in `problems`, counted wrong)
    skipped: int = 0  # problems longer than the model's context (in `problems`, counted wrong)

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else math.nan

    @property
    def label(self) -> str:
        return self.method if self.method == self.name else f"{self.method} ({self.name})"

    @classmethod
    def of(cls, run: Run) -> RunStats:
        records = [r.record for r in run.records]
        n = len(records)

        def mean(values: list[float]) -> float:
            return sum(values) / n if n else math.nan

        return cls(
            name=run.path.name,
            method=str(run.config.get("method", run.path.name)),
            problems=n,
            correct=sum(r.correct for r in records),
            mean_iterations=mean([r.iterations for r in records]),
            tokens_per_problem=mean([r.tokens for r in records]),
            seconds_per_problem=mean([r.seconds for r in records]),
            initial_correct=(
                sum(r.initial_correct for r in records)
                if records and all(isinstance(r, LatentSeekRecord) for r in records)
                else None
            ),
            failed=sum(r.status == "failed" for r in records),
            skipped=sum(r.status == "skipped" for r in records),
        )


def _cell(value: float, fmt: str) -> str:
    return "n/a" if math.isnan(value) else format(value, fmt)


def markdown_table(stats: Sequence[RunStats]) -> str:
    """The report table: accuracy in percent with 1 decimal, iterations and seconds with 2, tokens with 1.

    The last column is the accuracy of the initial answers of methods that record one (LatentSeek's greedy CoT
    answer, before any optimisation), "n/a" for the others. A run with failed or skipped problems shows how many
    in its problems cell (``10 (2 failed, 1 skipped)``); they count as wrong.
    """
    lines = [
        "| run | method | problems | accuracy | mean iterations | tokens / problem | seconds / problem "
        "| initial accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        accuracy = "n/a" if s.problems == 0 else f"{100 * s.accuracy:.1f}% ({s.correct}/{s.problems})"
        initial = (
            "n/a"
            if s.initial_correct is None
            else f"{100 * s.initial_correct / s.problems:.1f}% ({s.initial_correct}/{s.problems})"
        )
        faults = [f"{n} {what}" for n, what in ((s.failed, "failed"), (s.skipped, "skipped")) if n]
        problems = f"{s.problems} ({', '.join(faults)})" if faults else str(s.problems)
        lines.append(
            f"| {s.name} | {s.method} | {problems} | {accuracy} | {_cell(s.mean_iterations, '.2f')} "
            f"| {_cell(s.tokens_per_problem, '.1f')} | {_cell(s.seconds_per_problem, '.2f')} | {initial} |"
        )
    return "\n".join(lines) + "\n"


def mean_reward_by_iteration(run: Run) -> list[float]:
    """Mean of ``rewards[i]`` over the problems that reached iteration i (early stopping drops problems out)."""
    rewards = [r.record.rewards for r in run.records]
    longest = max(map(len, rewards), default=0)
    means = []
    for i in range(longest):
        values = [float(r[i]) for r in rewards if len(r) > i]
        means.append(sum(values) / len(values))
    return means


def answer_at_budget(record: LatentSeekRecord, budget: int, keep_best: bool) -> int:
    """The index of the answer the loop would have returned had it been capped at `budget` optimiser steps.

    The capped loop takes the same steps as the recorded one up to the cap: it stops at the first answer whose
    reward passes the threshold, which the recorded run did too (at step ``iterations``, or never and then it ran
    out of steps or had no latents to optimise). So it has the answers 0..m with m = min(budget, iterations) and
    returns answer m, or with ``keep_best`` the best-rewarded of them (the earliest among equals), as
    ``LatentSeek._result`` picks. Budget 0 is the initial greedy CoT answer.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0 optimiser steps, got {budget}")
    m = min(budget, record.iterations)
    if not keep_best:
        return m
    return max(range(m + 1), key=lambda i: (record.rewards[i], -i))


#: OracleReward's score of an answer the judge accepts (latentseek.rewards.OracleReward: 0 right, -1 wrong).
ORACLE_RIGHT = 0.0


def has_step_answers(record: LatentSeekRecord, oracle: bool = False) -> bool:
    """Whether a record tells each step's answer right or wrong: it holds every step's extracted answer (records
    written before ``step_predictions`` existed do not), or, under the oracle reward, the reward of every step,
    which is the judge's verdict."""
    if len(record.rewards) != record.iterations + 1:
        return False
    return len(record.step_predictions) == record.iterations + 1 or oracle


def accuracy_at_budgets(
    records: Sequence[StoredRecord], budgets: Sequence[int], keep_best: bool, oracle: bool = False
) -> list[float]:
    """Accuracy at each step budget: the judge's verdict on `answer_at_budget`'s answer against the gold.

    The verdict comes from the record's ``step_predictions``; a record without them under the oracle reward
    (`oracle`) uses the step's reward, which is that verdict. Records that are not LatentSeek answers (failed or
    skipped problems) count as wrong at every budget. ValueError when a record tells neither
    (see `has_step_answers`).
    """
    n = len(records)
    correct = [0] * len(budgets)
    for stored in records:
        r = stored.record
        if not isinstance(r, LatentSeekRecord) or r.status != "ok":
            continue
        if not has_step_answers(r, oracle):
            raise ValueError(
                f"record {stored.id!r} must hold iterations + 1 = {r.iterations + 1} step_predictions and rewards, "
                f"got {len(r.step_predictions)} and {len(r.rewards)}"
            )
        for j, k in enumerate(budgets):
            i = answer_at_budget(r, k, keep_best)
            if r.step_predictions:
                correct[j] += is_equivalent(r.step_predictions[i], stored.gold)
            else:
                correct[j] += r.rewards[i] == ORACLE_RIGHT
    return [c / n if n else math.nan for c in correct]


def budget_curve(run: Run) -> tuple[list[int], list[float]] | None:
    """(budgets 0..max_steps, accuracy at each) of a LatentSeek run; None for other runs and for LatentSeek runs
    whose records do not tell each step's answer right or wrong (see `has_step_answers`)."""
    records = [s.record for s in run.records]
    ok = [r for r in records if r.status == "ok"]
    knobs = run.config.get("knobs", {})
    oracle = knobs.get("reward") == "oracle"
    if not ok or not all(isinstance(r, LatentSeekRecord) and has_step_answers(r, oracle) for r in ok):
        return None
    max_steps = int(knobs.get("max_steps", max(r.iterations for r in ok)))
    keep_best = bool(knobs.get("keep_best", LatentSeekConfig.keep_best))
    budgets = list(range(max_steps + 1))
    return budgets, accuracy_at_budgets(run.records, budgets, keep_best, oracle)


def budget_token_curve(run: Run) -> tuple[list[float], list[float]] | None:
    """(mean tokens per problem, accuracy) at each step budget 0..max_steps of a LatentSeek run: the budget curve
    of :func:`budget_curve` with the tokens the capped loop would have spent on its x axis. A record's tokens at
    budget k are its ``step_tokens[min(k, iterations)]`` (the capped loop takes the recorded run's first steps);
    failed and skipped problems count with their 0 tokens, as in the table, so the full budget's point is the
    table's tokens / problem and accuracy. None when `budget_curve` is None or a record has no ``step_tokens``
    (runs recorded before they existed)."""
    curve = budget_curve(run)
    if curve is None:
        return None
    ok = [s.record for s in run.records if s.record.status == "ok"]
    if not all(isinstance(r, LatentSeekRecord) and len(r.step_tokens) == r.iterations + 1 for r in ok):
        return None
    n = len(run.records)
    tokens = [sum(r.step_tokens[min(k, r.iterations)] for r in ok) / n for k in curve[0]]
    return tokens, curve[1]


def is_latentseek_run(run: Run) -> bool:
    return any(isinstance(s.record, LatentSeekRecord) for s in run.records)


def _figure():
    # The object-oriented API draws with the Agg canvas and never touches pyplot's global backend or display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    return fig, fig.add_subplot()


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_accuracy(stats: Sequence[RunStats], path: Path) -> None:
    fig, ax = _figure()
    labels = [s.label for s in stats]
    values = [100 * s.accuracy if s.problems else 0.0 for s in stats]
    bars = ax.bar(range(len(stats)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.1f}%" if s.problems else "n/a" for v, s in zip(values, stats, strict=True)])
    ax.set_xticks(range(len(stats)), labels, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 110)  # room for the label over a 100% bar
    ax.set_title("Accuracy by method")
    fig.savefig(path, dpi=120)


def plot_rewards(runs: Sequence[Run], stats: Sequence[RunStats], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    plotted = False
    for run, s in zip(runs, stats, strict=True):
        means = mean_reward_by_iteration(run)
        if means:
            ax.plot(range(len(means)), means, marker="o", label=s.label)
            plotted = True
    if plotted:
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _note(ax, "no rewards recorded")
    ax.set_xlabel("iteration (0 = initial answer)")
    ax.set_ylabel("mean reward of problems still running")
    ax.set_title("Reward by iteration")
    fig.savefig(path, dpi=120)


def plot_iterations(runs: Sequence[Run], stats: Sequence[RunStats], path: Path) -> None:
    fig, ax = _figure()
    counts = [[r.record.iterations for r in run.records] for run in runs]
    top = max((max(c) for c in counts if c), default=0)
    width = 0.8 / max(len(runs), 1)
    for k, (c, s) in enumerate(zip(counts, stats, strict=True)):
        if c:
            heights = [c.count(i) for i in range(top + 1)]
            ax.bar([i - 0.4 + width * (k + 0.5) for i in range(top + 1)], heights, width=width, label=s.label)
    if any(counts):
        ax.legend()
        ax.set_xticks(range(top + 1))
    else:
        _note(ax, "no records")
    ax.set_xlabel("iterations")
    ax.set_ylabel("problems")
    ax.set_title("Iterations per problem")
    fig.savefig(path, dpi=120)


def plot_budget(runs: Sequence[Run], stats: Sequence[RunStats], path: Path) -> list[str]:
    """The test-time scaling curve of every LatentSeek run with per-step answers; returns the names of the
    LatentSeek runs without them (drawn as a note instead)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    missing = []
    for run, s in zip(runs, stats, strict=True):
        curve = budget_curve(run)
        if curve is not None:
            ax.plot(curve[0], [100 * a for a in curve[1]], marker="o", label=s.label)
        elif is_latentseek_run(run):
            missing.append(s.name)
    if len(missing) < sum(map(is_latentseek_run, runs)):
        ax.legend(loc="lower right")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 105)
    if missing:
        drawn = ax.get_legend() is not None
        ax.text(
            *((0.02, 0.97) if drawn else (0.5, 0.5)),
            "no per-step answers recorded: " + ", ".join(missing),
            ha="left" if drawn else "center",
            va="top" if drawn else "center",
            transform=ax.transAxes,
            fontsize=8,
            wrap=True,
        )
    elif not ax.get_legend():
        _note(ax, "no LatentSeek runs")
    ax.set_xlabel("step budget (0 = initial CoT answer)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by LatentSeek step budget (from recorded answers)")
    fig.savefig(path, dpi=120)
    return missing


def plot_tokens(runs: Sequence[Run], stats: Sequence[RunStats], path: Path) -> None:
    """One labelled point per run: (mean generated tokens per problem, accuracy); for a LatentSeek run that records
    its tokens per step, the line through its step budgets 0..max_steps (:func:`budget_token_curve`), which ends at
    that point. Log-x when the tokens span 10x."""
    fig, ax = _figure()
    points = [
        (run, s) for run, s in zip(runs, stats, strict=True) if s.problems and not math.isnan(s.tokens_per_problem)
    ]
    tokens = []
    for run, s in points:
        x, y = s.tokens_per_problem, 100 * s.accuracy
        curve = budget_token_curve(run)
        if curve is None:  # a legend, as labels beside points overlap
            ax.plot([x], [y], marker="o", linestyle="none", label=s.label)
        else:
            ax.plot(
                curve[0],
                [100 * a for a in curve[1]],
                marker="o",
                label=f"{s.label}, step budget 0..{len(curve[0]) - 1}",
            )
            tokens += curve[0]
        tokens.append(x)
    if tokens and min(tokens) > 0 and max(tokens) / min(tokens) >= 10:
        ax.set_xscale("log")
    if points:
        ax.legend(fontsize=8)
    else:
        _note(ax, "no records")
    ax.set_ylim(0, 105)
    ax.set_xlabel("generated tokens per problem (answers and self-verification)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by compute")
    fig.savefig(path, dpi=120)


@dataclass(frozen=True)
class Report:
    """What `report` wrote: the Markdown file (its text and its table) and the plots."""

    markdown: str
    table: str
    markdown_path: Path
    plot_paths: list[Path]


def default_report_dir(run_dirs: Sequence[str | Path]) -> Path:
    """RUN/report for one run; for several, report/ in their common parent directory."""
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "report"
    return Path(os.path.commonpath(paths)) / "report"


def report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Report:
    """Writes report.md and the plots for the given run directories into `out_dir` (see `default_report_dir`)."""
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    stats = [RunStats.of(run) for run in runs]
    out = Path(out_dir) if out_dir is not None else default_report_dir(run_dirs)
    plots = [out / ACCURACY_PLOT, out / REWARD_PLOT, out / ITERATIONS_PLOT, out / BUDGET_PLOT, out / TOKENS_PLOT]
    table = markdown_table(stats)
    note = (
        "Failed and skipped problems (see the problems column) count as wrong in the accuracy.\n\n"
        if any(s.failed or s.skipped for s in stats)
        else ""
    )
    markdown_path = out / REPORT_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_accuracy(stats, plots[0])
        plot_rewards(runs, stats, plots[1])
        plot_iterations(runs, stats, plots[2])
        missing = plot_budget(runs, stats, plots[3])
        plot_tokens(runs, stats, plots[4])
        if missing:
            note += (
                f"The step-budget curve leaves out {', '.join(missing)}: recorded without the per-step answers "
                "(`step_predictions`) that LatentSeek records hold since the curve exists; rerun them to draw it. "
                "Under the oracle reward a step's reward is the judge's verdict, so older oracle runs are drawn "
                "from their rewards.\n\n"
            )
        markdown = (
            "# LatentSeek evaluation report\n\n"
            + table
            + "\n"
            + note
            + "".join(f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots)
        )
        markdown_path.write_text(markdown, encoding="utf-8")
    except OSError as e:
        raise RunError(f"cannot write the report into {out}: {e.strerror or e}; choose another --out") from e
    return Report(markdown=markdown, table=table, markdown_path=markdown_path, plot_paths=plots)
