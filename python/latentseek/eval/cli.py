"""The ``latentseek`` command line (also ``python -m latentseek``; under torchrun ``torchrun ... -m latentseek``).

Subcommands:

- ``solve "QUESTION"``: LatentSeek on one question, printing each answer and its reward as the search goes.
- ``eval``: one method on a data set into a run directory (resumable; sharded over ranks under torchrun).
- ``report RUN [RUN ...]``: the Markdown table and plots of finished or running evaluation runs.

The error boundary is :func:`main`: a user's mistake (a bad flag or knob, a data file, a model that cannot be
loaded, a run directory in use or of another config, a prompt that does not fit) reaches it as a
:class:`latentseek.errors.LatentSeekError` and ends with one line ``latentseek: error: ...`` on stderr and exit
status 2. Nothing else is caught, so a bug in LatentSeek shows its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from latentseek.errors import LatentSeekError
from latentseek.eval.data import Problem, load_problems
from latentseek.eval.methods import DTYPES, METHODS, LatentSeekMethod, check_knobs, knob_table, make_method, run_config
from latentseek.eval.prompts import ANSWER_KINDS
from latentseek.eval.report import report
from latentseek.eval.runner import ON_ERROR, init_distributed, run_eval
from latentseek.eval.storage import RESULTS_FILE
from latentseek.model import load_model
from latentseek.quant import WEIGHTS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a model directory, a .gguf file, or a hub id")
    g.add_argument("--gguf-file", default=None, help="the GGUF file inside the --model directory")
    g.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weights dtype (auto: bf16 on CUDA and on CPUs with bf16 units, AMX or AVX512-BF16; else fp32)",
    )
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="dense",
        help="int8 / int4: the decoder's linears and a decoding copy of the LM head weight-only quantised on torch's "
        "CPU kernels (faster CPU decoding; cpu only); the op keeps the dense LM head",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun cuda means cuda:LOCAL_RANK)")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _defaults_text(defaults: dict[str, Any], methods: Sequence[str]) -> str:
    """``default 0.7 (bon, self-consistency)``, ``default bon 3, self-consistency 5``; no list for all `methods`."""
    shown = {method: _shown(value) for method, value in defaults.items()}
    if len(set(shown.values())) > 1:
        return "default " + ", ".join(f"{method} {value}" for method, value in shown.items())
    users = "" if len(shown) == len(methods) else f" ({', '.join(shown)})"
    return f"default {next(iter(shown.values()))}{users}"


#: The methods ``solve`` runs (their knobs are its flags).
SOLVE_METHODS = ("latentseek",)


def _add_knob_args(p: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """A flag per knob of `methods` (latentseek.eval.methods.knob_table), unset (None) unless given."""
    g = p.add_argument_group("method knobs (unset: the method's default)")
    for knob in knob_table(methods):
        help_text = f"{knob.help}; {_defaults_text(knob.defaults, methods)}".replace("%", "%%")
        if knob.type is bool:
            g.add_argument(knob.flag, action="store_const", const=True, default=None, help=help_text)
        else:
            g.add_argument(knob.flag, type=knob.type, choices=knob.choices, default=None, help=help_text)


def _knobs(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, Any]:
    return {knob.name: getattr(args, knob.name) for knob in knob_table(methods)}


class _Parser(argparse.ArgumentParser):
    """argparse with its error on one line (``latentseek eval: error: ...; see --help``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentseek", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    solve = commands.add_parser("solve", help="LatentSeek on one question, streaming its answers and rewards")
    solve.add_argument("question", help="the question (quote it)")
    _add_model_args(solve)
    solve.add_argument("--gold", default=None, help="the gold answer (needed by --reward oracle; judged if given)")
    solve.add_argument("--answer-kind", choices=ANSWER_KINDS, default="math", help="number: ask for a bare number")
    _add_knob_args(solve, SOLVE_METHODS)
    solve.set_defaults(handler=_solve)

    ev = commands.add_parser("eval", help="a method on a data set, into a resumable run directory")
    _add_model_args(ev)
    d = ev.add_argument_group("data")
    d.add_argument("--dataset", required=True, help="gsm8k, math500, aime24, demo, a local file, or a hub id")
    d.add_argument("--question-field", default=None)
    d.add_argument("--answer-field", default=None)
    d.add_argument("--id-field", default=None)
    d.add_argument("--split", default="test", help="split of a hub id that is not a named benchmark")
    d.add_argument("--limit", type=int, default=None, help="the first N problems (not part of the run's config)")
    m = ev.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, required=True)
    _add_knob_args(ev, METHODS)
    r = ev.add_argument_group("run")
    r.add_argument("--out", required=True, help="the run directory (runs/NAME)")
    r.add_argument("--batch-size", type=int, default=1, help="problems solved together")
    r.add_argument("--force", action="store_true", help="start over in --out when its config differs")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="record",
        help="a problem the method raises on (e.g. its reward): record it as failed and go on, or stop the run",
    )
    r.add_argument("--retry-failed", action="store_true", help="solve again the problems recorded as failed or skipped")
    ev.set_defaults(handler=_eval)

    report_parser = commands.add_parser("report", help="Markdown table and plots of evaluation runs")
    report_parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    report_parser.add_argument(
        "--out", default=None, help="where to write report.md and the plots (default: RUN/report for one run)"
    )
    report_parser.set_defaults(handler=_report)
    return parser


def _load(args: argparse.Namespace, device: str):
    return load_model(
        args.model,
        gguf_file=args.gguf_file,
        dtype=None if args.dtype == "auto" else DTYPES[args.dtype],
        device=device,
        weights=args.weights,
    )


def _fail(message: str) -> int:
    print(f"latentseek: error: {message}", file=sys.stderr)
    return 2


def _solve(args: argparse.Namespace) -> int:
    if not args.question.strip():
        return _fail("the question is empty: pass the question's text as the last argument")
    if args.reward == "oracle" and args.gold is None:
        return _fail("--reward oracle needs --gold")
    knobs = check_knobs("latentseek", _knobs(args, SOLVE_METHODS))
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = _load(args, args.device)
    method = make_method("latentseek", model, tokenizer, **knobs)
    assert isinstance(method, LatentSeekMethod)
    problem = Problem(id="question", question=args.question, gold=args.gold or "", answer_kind=args.answer_kind)
    cfg = method.config
    print(
        f"LatentSeek, reward {method.reward_name}: rho={cfg.rho} lr={cfg.lr} max_steps={cfg.max_steps} "
        f"threshold={cfg.reward_threshold} max_new_tokens={cfg.max_new_tokens}",
        flush=True,
    )

    def show(index: int, step: int, answer: str, reward: float) -> None:
        title = "initial answer" if step == 0 else f"step {step}"
        print(f"\n=== {title}: reward {reward:.4g}, answer {_extracted(answer)!r}", flush=True)
        print(answer.strip(), flush=True)

    (result,) = method.seek([problem], on_answer=show)
    print(
        f"\n=== final answer (answer {result.final_index} of {len(result.answers)}, {result.steps} steps, "
        f"{result.update_length} latents optimised, reward {result.final_reward:.4g}, "
        f"{'solved' if result.solved else 'not solved'}): {_extracted(result.final_answer)!r}"
    )
    if args.gold is not None:
        from latentseek.eval.judge import answers_match

        verdict = "correct" if answers_match(result.final_answer, args.gold) else "wrong"
        print(f"gold {args.gold!r}: {verdict}")
    print(f"{result.generated_tokens} tokens generated, {result.total_time:.1f} s")
    return 0


def _extracted(answer: str) -> str | None:
    from latentseek.eval.judge import extract_answer

    return extract_answer(answer)


def _eval(args: argparse.Namespace) -> int:
    knobs = check_knobs(args.method, _knobs(args, METHODS))
    dataset = {
        "question_field": args.question_field,
        "answer_field": args.answer_field,
        "id_field": args.id_field,
        "split": args.split,
    }
    problems = load_problems(args.dataset, **dataset, limit=args.limit)
    dist = init_distributed()
    device = args.device
    if dist.world_size > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    model, tokenizer = _load(args, device)
    method = make_method(args.method, model, tokenizer, **knobs)
    config = run_config(method, model=args.model, gguf_file=args.gguf_file, dataset=args.dataset, **dataset)
    summary = run_eval(
        method,
        problems,
        args.out,
        config,
        batch_size=args.batch_size,
        force=args.force,
        progress=not args.no_progress,
        on_error=args.on_error,
        retry_failed=args.retry_failed,
    )
    if dist.rank == 0:
        state = " (interrupted)" if summary.interrupted else ""
        faults = [f"{n} {what}" for n, what in ((summary.failed, "failed"), (summary.skipped, "skipped")) if n]
        counted = f" ({', '.join(faults)}: counted wrong)" if faults else ""
        print(
            f"{method.name} on {args.dataset}: {summary.done}/{summary.total} problems done{state}, "
            f"accuracy {summary.correct}/{summary.done} = {100 * summary.accuracy:.1f}%{counted}"
        )
        if summary.batch_size is not None and summary.batch_size < args.batch_size:
            print(
                f"out of memory at --batch-size {args.batch_size}: the run settled on batch size {summary.batch_size}"
            )
        print(f"records in {summary.out_dir / RESULTS_FILE}; table and plots: latentseek report {summary.out_dir}")
    return 130 if summary.interrupted else 0


def _report(args: argparse.Namespace) -> int:
    result = report(args.runs, args.out)
    print(result.table, end="")
    print(f"\nwrote {result.markdown_path} and {len(result.plot_paths)} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; a LatentSeekError ends it with one line on stderr and exit status 2 (see the module)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LatentSeekError as e:
        return _fail(str(e))
