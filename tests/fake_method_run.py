"""A fake method and a script that runs it, for the runner and report tests (subprocesses, torchrun).

    python tests/fake_method_run.py OUT --problems 30 [--sleep S] [--hang-from K] [--batch-size B] [--method NAME]
                                        [--force]

--hang-from K: problem K and later take 60 s each and announce "solving ID" on stderr when they start, so that a
test can signal the process while a known batch is in flight.

Prints the run summary as JSON (rank 0) and exits with 130 when the run was interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from latentseek.eval.data import Problem
from latentseek.eval.record import Record
from latentseek.eval.runner import init_distributed, run_eval


def make_problems(n: int) -> list[Problem]:
    return [
        Problem(id=f"p{i:03d}", question=f"What is {i} + 1?", gold=str(i + 1), answer_kind="number") for i in range(n)
    ]


class FakeMethod:
    (
        """Answers problem i wrongly when i % 3 == 0, takes i % 4 iterations with rising rewards, sleeps `sleep` each.

    Each record notes the torchrun rank that made it in ``extras["rank"]``.
    """
        ""
    )

    def __init__(self, sleep: float = 0.0, hang_from: int | None = None) -> None:
        self.sleep = sleep
        self.hang_from = hang_from
        self.solved: list[str] = []

    def solve_batch(self, problems: Sequence[Problem]) -> list[Record]:
        records = []
        for problem in problems:
            i = int(problem.id[1:])
            if self.hang_from is not None and i >= self.hang_from:
                print(f"solving {problem.id}", file=sys.stderr, flush=True)
                time.sleep(60.0)
            else:
                time.sleep(self.sleep)
            iterations = i % 4
            prediction = "0" if i % 3 == 0 else problem.gold
            records.append(
                Record(
                    prediction=prediction,
                    correct=prediction == problem.gold,
                    response=f"The answer is {prediction}.",
                    tokens=10 * (i + 1),
                    seconds=0.5 + i / 50,
                    iterations=iterations,
                    rewards=[-1.0 + 0.25 * k for k in range(iterations + 1)],
                    extras={"rank": int(os.environ.get("RANK", "0"))},
                )
            )
            self.solved.append(problem.id)
        return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--hang-from", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--method", default="fake")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    dist_info = init_distributed()
    try:
        summary = run_eval(
            FakeMethod(args.sleep, args.hang_from),
            make_problems(args.problems),
            args.out,
            {"method": args.method, "model": "none"},
            batch_size=args.batch_size,
            force=args.force,
            progress=False,
        )
    except KeyboardInterrupt:
        print("interrupted at once", file=sys.stderr)
        return 130
    if dist_info.rank == 0:
        fields = ("total", "done", "correct", "interrupted")
        print(json.dumps({name: getattr(summary, name) for name in fields}), flush=True)
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
