"""`make demo`: the shipped demo problems (the first GSM8K test records, byte for byte) and tools/demo.py on a tiny
model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from latentseek.eval.data import DEMO_PROBLEMS_PATH, load_problems
from latentseek.eval.storage import load_run

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ASSETS = DEMO_PROBLEMS_PATH.parent


@pytest.fixture
def demo(monkeypatch):
    """tools/demo.py as a module (registered while the test runs: its dataclass looks its module up)."""
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_demo_problems_are_the_first_gsm8k_test_records():
    shipped = DEMO_PROBLEMS_PATH.read_bytes().splitlines(keepends=True)
    fixture = (FIXTURES / "gsm8k_test.jsonl").read_bytes().splitlines(keepends=True)
    assert shipped[: len(fixture)] == fixture
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    assert f"- `{DEMO_PROBLEMS_PATH.name}`: the first {len(shipped)} problems of the GSM8K test set" in readme
    assert (ASSETS / "LICENSE.grade-school-math").read_text().startswith("MIT License")


@pytest.mark.shared_data
def test_the_demo_problems_are_the_first_lines_of_the_full_test_set(shared_data):
    shipped = DEMO_PROBLEMS_PATH.read_bytes().splitlines(keepends=True)
    full = (shared_data / "gsm8k_test.jsonl").read_bytes().splitlines(keepends=True)
    assert shipped == full[: len(shipped)]


def test_the_demo_prints_the_table_and_a_line_per_row(demo, tmp_path, monkeypatch, capsys):
    from tiny_lm import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    loads = []

    def fake_load(path, dtype=None):
        loads.append((path, dtype))
        return model, tok

    monkeypatch.setattr(demo, "load_model", fake_load)
    argv = ["--model", "tiny.gguf", "--out", str(tmp_path), "--max-new-tokens", "10", "--oracle-steps", "2"]
    argv += ["--self-steps", "1", "--verifier-tokens", "3", "--dtype", "fp32"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    n = len(load_problems("demo"))
    assert f"{n} problems from {DEMO_PROBLEMS_PATH.name} (the first {n} problems of the GSM8K test set" in out
    for name in ("demo-cot", "demo-latentseek-oracle", "demo-latentseek-self"):
        assert f"| {name} |" in out and len(load_run(tmp_path / name).records) == n
    lines = out.splitlines()
    below = lines[lines.index(next(line for line in lines if line.startswith("| demo-latentseek-self"))) + 1 :]
    assert below[0].startswith("  cot: one greedy step-by-step answer per problem")
    assert below[1].startswith("  latentseek-oracle: LatentSeek from that same answer, up to 2 steps")
    oracle = [r.record for r in load_run(tmp_path / "demo-latentseek-oracle").records]
    searched = [r for r in oracle if r.update_length > 0]
    assert searched, "no problem was searched: the line would be vacuous"
    assert all(r.iterations == 2 for r in searched)  # a random model never matches the gold answer
    assert f"; it searched {len(searched)} of {n} problems ({2 * len(searched)} steps), fixed 0, broke 0." in below[1]
    assert below[2].startswith("  latentseek-self: LatentSeek up to 1 step, rewarded by the model checking its own")
    assert "; its own check accepted " in below[2]
    assert (tmp_path / "demo-report" / "report.md").exists()
    assert loads == [("tiny.gguf", demo.DTYPES["fp32"])]

    capsys.readouterr()
    assert demo.main(argv) == 0  # finished runs: the same table again, nothing solved again
    again = capsys.readouterr()
    assert "| demo-cot |" in again.out and "generate" not in again.err


def test_without_self_steps_the_line_under_the_table_says_the_self_reward_was_not_run(
    demo, tmp_path, monkeypatch, capsys
):
    from tiny_lm import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    monkeypatch.setattr(demo, "load_model", lambda path, dtype=None: (model, tok))
    argv = ["--model", "tiny.gguf", "--out", str(tmp_path), "--max-new-tokens", "3", "--oracle-steps", "1"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "| demo-latentseek-self |" not in out and not (tmp_path / "demo-latentseek-self").exists()
    assert "  latentseek-self: not run (each of its steps adds 4 verifier generations per problem" in out


def test_a_negative_self_steps_is_refused(demo, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--model", "m.gguf", "--self-steps", "-1"])
    assert "--self-steps must be >= 0, got -1" in capsys.readouterr().err
