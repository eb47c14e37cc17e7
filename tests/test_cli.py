"""The command line: `latentseek report` (eval and solve come with the methods)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_method_run import FakeMethod, make_problems
from latentseek.eval.cli import main
from latentseek.eval.methods import make_method, run_config
from latentseek.eval.record import LatentSeekRecord
from latentseek.eval.report import ACCURACY_PLOT, REPORT_FILE
from latentseek.eval.runner import run_eval
from latentseek.eval.storage import CONFIG_FILE, config_fingerprint, load_run, local_source


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


# --- eval and solve on a tiny model (load_model replaced) ----------------------------------------------------------


@pytest.fixture
def tiny(monkeypatch, device):
    """`latentseek.eval.cli.load_model` returning a tiny random model on `device` (every device of the tests:
    the commands then run on it whatever their --device, which only load_model reads); records the calls."""
    import latentseek.eval.cli as cli
    from tiny_lm import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), device=device)
    calls = Calls()

    def fake_load(path, gguf_file=None, dtype=None, device="cpu", weights="dense"):
        calls.append((path, gguf_file, dtype, device))
        calls.weights.append(weights)
        return model, tok

    monkeypatch.setattr(cli, "load_model", fake_load)
    calls.model, calls.tokenizer = model, tok
    return calls


class Calls(list):
    """The load_model calls, and the model and tokenizer it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[str] = []  # the weights= of each call


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"id": f"q{i}", "question": f"what is {i} + 1 ?", "answer": str(i + 1)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval_args(dataset, out, *extra):
    return ["eval", "--model", "tiny", "--dataset", str(dataset), "--out", str(out), "--no-progress", *extra]


def test_eval_writes_a_run_resumes_it_and_refuses_another_config(tmp_path, dataset, tiny, capsys, monkeypatch):
    from latentseek.eval.methods import CoT

    solved = []
    original = CoT.solve_batch

    def spy(self, problems):
        solved.append([p.id for p in problems])
        return original(self, problems)

    monkeypatch.setattr(CoT, "solve_batch", spy)
    out = tmp_path / "runs" / "cot"
    args = _eval_args(dataset, out, "--method", "cot", "--max-new-tokens", "6", "--batch-size", "2")
    assert main([*args, "--limit", "2"]) == 0
    assert solved == [["q0", "q1"]]
    assert "cot on" in capsys.readouterr().out
    run = load_run(out)
    assert [r.id for r in run.records] == ["q0", "q1"]
    assert run.config["method"] == "cot" and run.config["dtype"] == "fp32"
    assert run.config["knobs"] == {"prompt": "boxed", "max_new_tokens": 6}
    assert run.config["dataset"]["source"] == {"name": dataset.name} == local_source(str(dataset), content=False)
    assert run.config["weights"] == "dense"
    assert str(tmp_path) not in (out / CONFIG_FILE).read_text()  # no local path in the run directory
    assert tiny == [("tiny", None, None, "cpu")]

    assert main(args) == 0  # no --limit: only the third problem is left
    assert solved == [["q0", "q1"], ["q2"]]
    assert "3/3 problems done" in capsys.readouterr().out

    changed = _eval_args(dataset, out, "--method", "cot", "--max-new-tokens", "7")
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "knobs.max_new_tokens: 6 -> 7" in err
    assert len(solved) == 2
    assert main([*changed, "--force", "--limit", "1"]) == 0
    assert load_run(out).config["knobs"]["max_new_tokens"] == 7
    assert [r.id for r in load_run(out).records] == ["q0"]


def test_eval_latentseek_records_its_knobs(tmp_path, dataset, tiny, capsys):
    out = tmp_path / "ls"
    args = _eval_args(dataset, out, "--method", "latentseek", "--reward", "oracle", "--max-steps", "2")
    assert (
        main([*args, "--max-new-tokens", "6", "--rho", "0.5", "--keep-best", "--prompt", "json", "--limit", "2"]) == 0
    )
    run = load_run(out)
    assert run.config["method"] == "latentseek-oracle"
    knobs = run.config["knobs"]
    assert (knobs["rho"], knobs["max_steps"], knobs["keep_best"], knobs["prompt"]) == (0.5, 2, True, "json")
    assert all(isinstance(r.record, LatentSeekRecord) for r in run.records)


def test_eval_refuses_knobs_the_method_does_not_use_before_loading(tmp_path, dataset, tiny, capsys):
    assert main(_eval_args(dataset, tmp_path / "x", "--method", "cot", "--rho", "0.3")) == 2
    assert "does not use rho" in capsys.readouterr().err
    assert tiny == []


def test_solve_streams_every_answer_and_reward(tiny, capsys):
    argv = ["solve", "--model", "tiny", "--reward", "oracle", "--gold", "98765", "--max-steps", "2"]
    assert main([*argv, "--rho", "1.0", "--max-new-tokens", "6", "what is 2 + 3 ?"]) == 0
    out = capsys.readouterr().out
    assert "=== initial answer: reward -1" in out
    assert "=== step 1: reward -1" in out and "=== step 2: reward -1" in out
    assert "=== final answer (answer 2 of 3, 2 steps" in out
    assert "gold '98765': wrong" in out


def test_solve_with_the_oracle_needs_a_gold_answer(tiny, capsys):
    assert main(["solve", "--model", "tiny", "--reward", "oracle", "what is 2 + 3 ?"]) == 2
    assert "--gold" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, flags, knobs",
    [
        ("cot", ["--max-new-tokens", "6"], {"max_new_tokens": 6}),
        (
            "latentseek",
            ["--reward", "oracle", "--max-steps", "1", "--max-new-tokens", "6", "--keep-best", "--rho", "0.5"],
            {"reward": "oracle", "max_steps": 1, "max_new_tokens": 6, "keep_best": True, "rho": 0.5},
        ),
    ],
)
def test_a_python_caller_gets_the_config_the_cli_writes(tmp_path, dataset, tiny, method, flags, knobs):
    out = tmp_path / "cli"
    extra = ["--method", method, *flags, "--question-field", "question", "--limit", "1"]
    assert main(_eval_args(dataset, out, *extra)) == 0
    written = json.loads((out / CONFIG_FILE).read_text())

    python = make_method(method, tiny.model, tiny.tokenizer, **knobs)
    config = run_config(python, model="tiny", dataset=str(dataset), question_field="question")
    assert config == written["config"]
    assert config_fingerprint(config) == written["fingerprint"]
    summary = run_eval(python, [], out, config, progress=False)  # the same run: accepted, nothing to do
    assert summary.done == 0 and load_run(out).config == written["config"]


def test_help_shows_each_knob_with_the_defaults_of_its_methods(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at the terminal's width, splitting "self-consistency"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--n-candidates N_CANDIDATES candidates (bon) / samples (self-consistency); default bon 3, " in text
    assert "self-consistency 5" in text
    assert "--temperature TEMPERATURE sampling temperature; default 0.7 (bon, self-consistency)" in text
    assert "--prompt {boxed,json} solver prompt style; default boxed " in text
    assert "--keep-best return the best-rewarded answer, not the last; default off (latentseek)" in text
    assert "--impl {auto,ext,reference}" in text and "--grad-clip GRAD_CLIP" in text
    with pytest.raises(SystemExit):
        main(["solve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--rho RHO fraction of the answer's latents optimised; default 0.2 " in text
    assert (
        "--reward {self,oracle,confidence} self-verification, the gold answer, or (latentseek) the answer's own "
        "confidence; default self " in text
    )
    assert "--samples SAMPLES prefixes drawn from the latents per step" in text
    assert "--n-candidates" not in text


def test_dtype_auto_leaves_the_choice_to_load_model(tmp_path, dataset, tiny):
    import torch

    for dtype in ("auto", "bf16"):
        args = _eval_args(dataset, tmp_path / dtype, "--method", "cot", "--max-new-tokens", "2", "--limit", "1")
        assert main([*args, "--dtype", dtype]) == 0
    assert [call[2] for call in tiny] == [None, torch.bfloat16]  # None: load_model's default_dtype(device)
    assert tiny.weights == ["dense", "dense"]


def test_weights_reach_load_model(tmp_path, dataset, tiny):
    args = _eval_args(dataset, tmp_path / "int4", "--method", "cot", "--max-new-tokens", "2", "--limit", "1")
    assert main([*args, "--weights", "int4"]) == 0
    assert tiny.weights == ["int4"]
