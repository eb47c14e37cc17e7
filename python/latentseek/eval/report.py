"""Reports over one or more run directories: a Markdown table and three PNG plots.

The table has one row per run (each run is one method on one model and data set): problems finished, accuracy,
mean optimisation iterations, and generated tokens and wall seconds per problem, so that methods can be compared
at equal compute. Problems recorded as failed (the method raised on them) or skipped (longer than the model's
context) count in ``problems`` and as wrong in the accuracy; the problems cell then says how many they were. The plots show accuracy by method, the mean reward at each iteration, and how many iterations the
problems took.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from latentseek.errors import RunError
from latentseek.eval.record import LatentSeekRecord
from latentseek.eval.storage import Run, load_run

REPORT_FILE = "report.md"
ACCURACY_PLOT = "accuracy_by_method.png"
REWARD_PLOT = "reward_by_iteration.png"
ITERATIONS_PLOT = "iterations_histogram.png"


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
    plots = [out / ACCURACY_PLOT, out / REWARD_PLOT, out / ITERATIONS_PLOT]
    table = markdown_table(stats)
    note = (
        "Failed and skipped problems (see the problems column) count as wrong in the accuracy.\n\n"
        if any(s.failed or s.skipped for s in stats)
        else ""
    )
    markdown = (
        "# LatentSeek evaluation report\n\n"
        + table
        + "\n"
        + note
        + "".join(f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots)
    )
    markdown_path = out / REPORT_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_accuracy(stats, plots[0])
        plot_rewards(runs, stats, plots[1])
        plot_iterations(runs, stats, plots[2])
        markdown_path.write_text(markdown, encoding="utf-8")
    except OSError as e:
        raise RunError(f"cannot write the report into {out}: {e.strerror or e}; choose another --out") from e
    return Report(markdown=markdown, table=table, markdown_path=markdown_path, plot_paths=plots)
