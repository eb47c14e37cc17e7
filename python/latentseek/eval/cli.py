"""The ``latentseek`` command line (also ``python -m latentseek``; under torchrun ``torchrun ... -m latentseek``).

Subcommands:

- ``solve "QUESTION"``: LatentSeek on one question, printing each answer and its reward as the search goes.
- ``eval``: one method on a data set into a run directory (resumable; sharded over ranks under torchrun).
- ``report RUN [RUN ...]``: the Markdown table and plots of finished or running evaluation runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from latentseek.eval.data import DatasetError, Problem, load_problems
from latentseek.eval.methods import METHODS, REWARDS, LatentSeekMethod, check_knobs, make_method
from latentseek.eval.prompts import ANSWER_KINDS, PROMPT_STYLES
from latentseek.eval.report import report
from latentseek.eval.runs import RunError, init_distributed, run_eval
from latentseek.model import load_model

DTYPES = ("fp32", "bf16", "fp16")


def _torch_dtype(name: str | None):
    import torch

    return None if name is None else {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _dtype_name(model) -> str:
    import torch

    dtype = next(model.parameters()).dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a model directory, a .gguf file, or a hub id")
    g.add_argument("--gguf-file", default=None, help="the GGUF file inside the --model directory")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun cuda means cuda:LOCAL_RANK)")


def _add_latentseek_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation and LatentSeek (unset: the method's defaults)")
    g.add_argument("--prompt", choices=PROMPT_STYLES, default=None, help="solver prompt style (default boxed)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per answer / continuation")
    g.add_argument("--rho", type=float, default=None, help="fraction of the answer's latents optimised")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate on the latents")
    g.add_argument("--max-steps", type=int, default=None, help="most optimiser steps")
    g.add_argument("--reward-threshold", type=float, default=None, help="stop once the reward is above this")
    g.add_argument("--start-index", type=int, default=None, help="first answer token whose latent is optimised")
    g.add_argument("--grad-clip", type=float, default=None, help="clip each problem's gradient to this L2 norm")
    g.add_argument("--keep-best", action="store_const", const=True, default=None, help="return the best answer")
    g.add_argument("--impl", choices=("auto", "ext", "reference"), default=None, help="fused LM-head op")
    g.add_argument("--verifier-max-new-tokens", type=int, default=None, help="most tokens per self-verification")


_LATENTSEEK_KNOBS = (
    "prompt",
    "max_new_tokens",
    "rho",
    "lr",
    "max_steps",
    "reward_threshold",
    "start_index",
    "grad_clip",
    "keep_best",
    "impl",
    "verifier_max_new_tokens",
)
_EVAL_KNOBS = (*_LATENTSEEK_KNOBS, "reward", "n_candidates", "temperature", "top_p", "seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentseek", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    solve = commands.add_parser("solve", help="LatentSeek on one question, streaming its answers and rewards")
    solve.add_argument("question", help="the question (quote it)")
    _add_model_args(solve)
    solve.add_argument("--reward", choices=REWARDS, default="self", help="self-verification or the gold answer")
    solve.add_argument("--gold", default=None, help="the gold answer (needed by --reward oracle; judged if given)")
    solve.add_argument("--answer-kind", choices=ANSWER_KINDS, default="math", help="number: ask for a bare number")
    _add_latentseek_args(solve)
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
    m.add_argument("--reward", choices=REWARDS, default=None, help="bon / latentseek reward (default self)")
    m.add_argument("--n-candidates", type=int, default=None, help="bon candidates (3) / self-consistency samples (5)")
    m.add_argument("--temperature", type=float, default=None, help="bon / self-consistency sampling (0.7)")
    m.add_argument("--top-p", type=float, default=None, help="bon / self-consistency nucleus (0.95)")
    m.add_argument("--seed", type=int, default=None, help="bon / self-consistency sampling seed (0)")
    _add_latentseek_args(ev)
    r = ev.add_argument_group("run")
    r.add_argument("--out", required=True, help="the run directory (runs/NAME)")
    r.add_argument("--batch-size", type=int, default=1, help="problems solved together")
    r.add_argument("--force", action="store_true", help="start over in --out when its config differs")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(handler=_eval)

    report_parser = commands.add_parser("report", help="Markdown table and plots of evaluation runs")
    report_parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    report_parser.add_argument(
        "--out", default=None, help="where to write report.md and the plots (default: RUN/report for one run)"
    )
    report_parser.set_defaults(handler=_report)
    return parser


def _knobs(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _model_id(path: str) -> str:
    """A local model path made absolute (the run may be resumed from elsewhere); a hub id as given."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _load(args: argparse.Namespace, device: str):
    return load_model(args.model, gguf_file=args.gguf_file, dtype=_torch_dtype(args.dtype), device=device)


def _fail(message: str) -> int:
    print(f"latentseek: error: {message}", file=sys.stderr)
    return 2


def _solve(args: argparse.Namespace) -> int:
    if args.reward == "oracle" and args.gold is None:
        return _fail("--reward oracle needs --gold")
    knobs = {**_knobs(args, _LATENTSEEK_KNOBS), "reward": args.reward}
    try:
        check_knobs("latentseek", knobs)
    except ValueError as e:
        return _fail(str(e))
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
    knobs = _knobs(args, _EVAL_KNOBS)
    try:
        given = check_knobs(args.method, knobs)
        problems = load_problems(
            args.dataset,
            question_field=args.question_field,
            answer_field=args.answer_field,
            id_field=args.id_field,
            split=args.split,
            limit=args.limit,
        )
    except (ValueError, DatasetError) as e:
        return _fail(str(e))
    dist = init_distributed()
    device = args.device
    if dist.world_size > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    model, tokenizer = _load(args, device)
    method = make_method(args.method, model, tokenizer, **given)
    dataset = args.dataset if not os.path.exists(args.dataset) else os.path.abspath(args.dataset)
    config = {
        "model": _model_id(args.model),
        "gguf_file": args.gguf_file,
        "dtype": _dtype_name(model),
        "dataset": {
            "source": dataset,
            "question_field": args.question_field,
            "answer_field": args.answer_field,
            "id_field": args.id_field,
            "split": args.split,
        },
        "method": method.name,
        "knobs": method.knobs,
    }
    try:
        summary = run_eval(
            method,
            problems,
            args.out,
            config,
            batch_size=args.batch_size,
            force=args.force,
            progress=not args.no_progress,
        )
    except RunError as e:
        return _fail(str(e))
    if dist.rank == 0:
        state = " (interrupted)" if summary.interrupted else ""
        print(
            f"{method.name} on {args.dataset}: {summary.done}/{summary.total} problems done{state}, "
            f"accuracy {summary.correct}/{summary.done} = {100 * summary.accuracy:.1f}%"
        )
        print(f"records in {summary.out_dir / 'results.jsonl'}; table and plots: latentseek report {summary.out_dir}")
    return 130 if summary.interrupted else 0


def _report(args: argparse.Namespace) -> int:
    result = report(args.runs, args.out)
    print(result.table, end="")
    print(f"\nwrote {result.markdown_path} and {len(result.plot_paths)} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
