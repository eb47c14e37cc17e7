"""The ``latentseek`` command line (also ``python -m latentseek``).

Subcommands: ``report RUN [RUN ...]`` writes the Markdown table and plots of finished or running evaluation runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from latentseek.report import report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentseek", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    report_parser = commands.add_parser("report", help="Markdown table and plots of evaluation runs")
    report_parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    report_parser.add_argument(
        "--out", default=None, help="where to write report.md and the plots (default: RUN/report for one run)"
    )
    report_parser.set_defaults(handler=_report)
    return parser


def _report(args: argparse.Namespace) -> int:
    result = report(args.runs, args.out)
    print(result.table, end="")
    print(f"\nwrote {result.markdown_path} and {len(result.plot_paths)} plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
