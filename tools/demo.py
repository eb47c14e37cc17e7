"""`make demo`: LatentSeek next to chain of thought on a small model and the demo problems, in one process.

    python tools/demo.py --model qwen2.5-coder-0.5b-instruct-q4.gguf [--out runs] [--self-steps 1] ...

The runs, on the problems of ``latentseek/eval/assets/demo_problems.jsonl`` (``--dataset demo``; its source and the
rule that picked them are in ``assets/README.md``), all with the same prompt, model and token cap:

- ``cot``: one greedy chain-of-thought answer per problem;
- ``latentseek-oracle``: LatentSeek rewarded by the gold answer (an upper bound: the reward knows the answer);
- ``latentseek-self`` (with ``--self-steps`` above 0): LatentSeek rewarded by the model's own verification.

The model is loaded once for all runs. Runs are resumable (``OUT/demo-*``): a second call finds them finished and
prints the table again; changed settings start the affected runs over (the old results go to ``superseded/``).
Under the table, one line per row says what the row is and, for LatentSeek, what its search did.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentseek.eval.data import DEMO_PROBLEMS_PATH, load_problems
from latentseek.eval.methods import DTYPES, make_method, run_config
from latentseek.eval.record import LatentSeekRecord
from latentseek.eval.report import report
from latentseek.eval.runner import run_eval
from latentseek.eval.storage import load_run
from latentseek.model import load_model
from latentseek.rewards import CHECKS

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoRun:
    """One row of the demo's table: a method with its knobs, run into OUT/<name>."""

    name: str
    method: str
    knobs: dict[str, Any]
    meaning: str  # the first half of its line under the table


def demo_runs(args: argparse.Namespace) -> list[DemoRun]:
    """The rows: cot, latentseek-oracle, and latentseek-self when ``--self-steps`` is above 0."""
    common = {"max_new_tokens": args.max_new_tokens}
    runs = [
        DemoRun("demo-cot", "cot", common, "cot: one greedy step-by-step answer per problem, no search"),
        DemoRun(
            "demo-latentseek-oracle",
            "latentseek",
            {**common, "reward": "oracle", "max_steps": args.oracle_steps},
            f"latentseek-oracle: LatentSeek from that same answer, up to {_steps(args.oracle_steps)}, rewarded by the "
            "gold answer (an upper bound: the reward knows the answer)",
        ),
    ]
    if args.self_steps > 0:
        knobs = {"reward": "self", "max_steps": args.self_steps, "verifier_max_new_tokens": args.verifier_tokens}
        runs.append(
            DemoRun(
                "demo-latentseek-self",
                "latentseek",
                {**common, **knobs},
                f"latentseek-self: LatentSeek up to {_steps(args.self_steps)}, rewarded by the model checking its own "
                f"answer ({len(CHECKS)} checks of up to {args.verifier_tokens} tokens each)",
            )
        )
    return runs


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


#: The line under the table when the self-reward run is left out.
SELF_SKIPPED = (
    "latentseek-self: not run (each of its steps adds {checks} verifier generations per problem, too slow for the "
    "demo's budget on 2 cores; --self-steps 1, or `make demo SELF_STEPS=1`, adds it); the README's GSM8K table has "
    "it on 30 problems."
)


def search_summary(run_dir: Path) -> str:
    """What a LatentSeek run's search did, from its records: problems searched, steps, answers fixed and broken, and
    for a self-reward run how many final answers its reward accepted ("" for another method)."""
    run = load_run(run_dir)
    records = [r.record for r in run.records]
    if not records or not all(isinstance(r, LatentSeekRecord) for r in records):
        return ""
    searched = sum(r.iterations > 0 for r in records)
    steps = sum(r.iterations for r in records)
    fixed = sum(r.correct and not r.initial_correct for r in records)
    broken = sum(r.initial_correct and not r.correct for r in records)
    text = f"; it searched {searched} of {len(records)} problems ({steps} steps), fixed {fixed}, broke {broken}"
    if run.config["knobs"].get("reward") == "self":
        accepted = sum(r.solved for r in records)
        right = sum(r.solved and r.correct for r in records)
        text += f"; its own check accepted {accepted} final answers, {right} of them right"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the demo model: a GGUF file or a model folder")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weights dtype (default bf16)")
    parser.add_argument("--out", default=str(ROOT / "runs"), help="where the demo-* run folders go")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="token cap of every answer")
    parser.add_argument("--oracle-steps", type=int, default=2, help="LatentSeek steps with the oracle reward")
    parser.add_argument(
        "--self-steps", type=int, default=0, help="LatentSeek steps with the self reward (0: no self-reward run)"
    )
    parser.add_argument("--verifier-tokens", type=int, default=96, help="token cap of each self-verification")
    parser.add_argument("--batch-size", type=int, default=16, help="problems solved together")
    args = parser.parse_args(argv)
    if args.self_steps < 0:
        parser.error(f"--self-steps must be >= 0, got {args.self_steps}")

    import torch
    import transformers

    start = time.perf_counter()
    problems = load_problems("demo")
    runs = demo_runs(args)
    out = Path(args.out)
    print(f"LatentSeek demo: {len(problems)} problems from {DEMO_PROBLEMS_PATH.name} ({_rule()})", flush=True)
    print(f"loading {args.model} ({args.dtype}, {torch.get_num_threads()} threads) ...", flush=True)
    transformers.logging.set_verbosity_error()  # its GGUF notes are for its own kernels, not this dequantised load
    transformers.logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    loaded = time.perf_counter() - start
    print(f"loaded in {loaded:.0f} s", flush=True)
    for run in runs:
        method = make_method(run.method, model, tokenizer, **run.knobs)
        config = run_config(method, model=args.model, dataset="demo")
        run_eval(method, problems, out / run.name, config, batch_size=args.batch_size, force=True)

    result = report([out / run.name for run in runs], out / "demo-report")
    print()
    print(result.table, end="")
    for run in runs:
        print(f"  {run.meaning}{search_summary(out / run.name)}.")
    if not args.self_steps:
        print("  " + SELF_SKIPPED.format(checks=len(CHECKS)))
    print(
        "  accuracy: final answers judged against the gold answers; initial accuracy: LatentSeek's first answer, "
        "which is the cot answer."
    )
    print(
        f"demo took {time.perf_counter() - start:.0f} s (model load {loaded:.0f} s); plots in {result.markdown_path.parent}"
    )
    return 0


def _rule() -> str:
    """The first line of assets/README.md's entry for the demo problems: where they come from and how they were
    picked."""
    readme = DEMO_PROBLEMS_PATH.parent / "README.md"
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"- `{DEMO_PROBLEMS_PATH.name}`:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{readme} has no line for {DEMO_PROBLEMS_PATH.name}")


if __name__ == "__main__":
    sys.exit(main())
