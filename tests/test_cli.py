"""The command line: `latentseek report` (eval and solve come with the methods)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_method_run import FakeMethod, make_problems
from latentseek.cli import main
from latentseek.report import ACCURACY_PLOT, REPORT_FILE
from latentseek.runs import run_eval


def test_report_subcommand_prints_the_table_and_writes_files(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "demo"
    run_eval(FakeMethod(), make_problems(4), run_dir, {"method": "latentseek"}, progress=False)
    assert main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| demo | latentseek | 4 | 50.0% (2/4) |" in printed
    assert (run_dir / "report" / REPORT_FILE).exists() and (run_dir / "report" / ACCURACY_PLOT).exists()
    assert main(["report", str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / REPORT_FILE).exists()


def test_python_dash_m_latentseek(tmp_path):
    run_dir = tmp_path / "r"
    run_eval(FakeMethod(), make_problems(1), run_dir, {"method": "cot"}, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "latentseek", "report", str(run_dir)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "| r | cot | 1 |" in proc.stdout


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
