"""latentseek.progress: events within a batch (phase, step, tokens), from generation, the loop, the methods, the
runner's display and the CLI."""

from __future__ import annotations

import io
import json
import sys

import pytest

from fake_method_run import make_problems
from latentseek import LatentSeek, LatentSeekConfig
from latentseek.chat import build_prompt_ids
from latentseek.eval import runner
from latentseek.eval.cli import main
from latentseek.eval.methods import make_method
from latentseek.eval.record import Record
from latentseek.eval.runner import run_eval
from latentseek.generation import extend, generate
from latentseek.model import ModelAdapter
from latentseek.progress import ProgressEvent, decode_reporter, enter_phase, reporting
from latentseek.rewards import OracleReward, SelfReward
from naive_loop import Scripted
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer

MAX_NEW = 12


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("qwen2", vocab_size=len(tok))


def collect(events: list[ProgressEvent]):
    return events.append


def test_nothing_listens_outside_a_reporting_block():
    assert decode_reporter() is None
    enter_phase("generate", problems=1)  # a no-op, not an error


def test_a_generation_reports_every_step_with_growing_token_counts(model, tok):
    prompts = [build_prompt_ids(tok, q) for q in QUESTIONS]
    events: list[ProgressEvent] = []
    with reporting(collect(events), interval=0.0):
        gen = generate(model, tok, prompts, max_new_tokens=MAX_NEW)
    longest = max(len(t) for t in gen.tokens)
    assert len(events) == longest  # one per decode step with interval 0
    tokens = [e.tokens for e in events]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert tokens[-1] == sum(len(t) for t in gen.tokens)
    rows = [e.rows for e in events]
    assert rows == sorted(rows, reverse=True) and rows[-1] == 0
    assert events[0].rows == sum(len(t) > 1 for t in gen.tokens)


def test_successive_generations_add_up_and_phases_are_reported_at_once(model, tok):
    adapter = ModelAdapter.of(model)
    rows = [(None, build_prompt_ids(tok, q)) for q in QUESTIONS[:2]]
    events: list[ProgressEvent] = []
    with reporting(collect(events), interval=3600.0):  # only the phases get through
        enter_phase("generate", problems=2, step=0, max_steps=5)
        first = extend(adapter, rows, MAX_NEW, [])
        enter_phase("reward", problems=2, step=0, max_steps=5)
        second = extend(adapter, rows, MAX_NEW, [])
        enter_phase("update", problems=1, step=1, max_steps=5)
    assert [(e.phase, e.step, e.max_steps, e.problems) for e in events] == [
        ("generate", 0, 5, 2),
        ("reward", 0, 5, 2),
        ("update", 1, 5, 1),
    ]
    assert [e.tokens for e in events] == [0, 2 * MAX_NEW, 4 * MAX_NEW]  # no stop ids: every row to the cap
    assert first.tokens == second.tokens


def test_nested_blocks_report_to_the_innermost_callback(model, tok):
    outer: list[ProgressEvent] = []
    inner: list[ProgressEvent] = []
    with reporting(collect(outer), interval=0.0):
        with reporting(collect(inner), interval=0.0):
            enter_phase("generate", problems=1)
        enter_phase("reward", problems=1)
    assert [e.phase for e in inner] == ["generate"] and [e.phase for e in outer] == ["reward"]


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="interval must be >= 0 seconds, got -1"):
        with reporting(print, interval=-1):
            pass


def test_describe():
    event = ProgressEvent(phase="generate", step=2, max_steps=10, problems=8, tokens=1234, rows=5, elapsed=10.0)
    assert event.describe() == "step 2/10 · generate · 5 rows · 1,234 tok · 123 tok/s"
    plain = ProgressEvent(phase="reward", step=0, max_steps=0, problems=8, tokens=0, rows=0, elapsed=0.2)
    assert plain.describe() == "reward · 0 tok"


# --- the loop ----------------------------------------------------------------------------------------------------


def test_latentseek_reports_its_phases_steps_and_every_token(model, tok):
    cfg = LatentSeekConfig(max_new_tokens=MAX_NEW, max_steps=2, rho=0.5)
    changes: list[ProgressEvent] = []
    with reporting(collect(changes), interval=3600.0):  # only the phase changes get through
        results = LatentSeek(model, tok, Scripted([-1.0]), cfg).solve_batch(QUESTIONS)
    assert [(e.phase, e.step) for e in changes] == [
        ("generate", 0),
        ("reward", 0),
        ("update", 0),  # x = argmax lm_head(z) of the first answers
        ("update", 0),  # the first Adam step
        ("generate", 1),
        ("reward", 1),
        ("update", 1),
        ("generate", 2),
        ("reward", 2),
    ]
    assert all(e.max_steps == 2 and e.problems == len(QUESTIONS) and e.rows == 0 for e in changes)
    tokens = [e.tokens for e in changes]
    assert tokens == sorted(tokens) and tokens[0] == 0
    assert tokens[-1] == sum(r.generated_tokens for r in results)

    every: list[ProgressEvent] = []
    with reporting(collect(every), interval=0.0):
        LatentSeek(model, tok, Scripted([-1.0]), cfg).solve_batch(QUESTIONS)
    tokens = [e.tokens for e in every]
    assert tokens == sorted(tokens) and tokens[-1] == sum(r.generated_tokens for r in results)
    decoding = [e for e in every if e.rows > 0]
    assert len(decoding) > len(changes), "decode steps report between the phase changes"
    assert {e.phase for e in decoding} == {"generate"}, "the oracle reward generates nothing"


def test_the_self_reward_counts_its_verifier_tokens_in_the_reward_phase(model, tok):
    cfg = LatentSeekConfig(max_new_tokens=MAX_NEW, max_steps=1, rho=0.5, reward_threshold=10.0)
    events: list[ProgressEvent] = []
    reward = SelfReward(model, tok, max_new_tokens=6)
    with reporting(collect(events), interval=0.0):
        results = LatentSeek(model, tok, reward, cfg).solve_batch(QUESTIONS[:2])
    verifier = sum(int(d.get("verifier_tokens", 0)) for r in results for d in r.reward_details)
    assert verifier > 0
    assert events[-1].tokens == sum(r.generated_tokens for r in results) + verifier
    assert any(e.phase == "reward" and e.rows > 0 for e in events)


def test_on_progress_gets_the_events_of_solve_batch(model, tok):
    cfg = LatentSeekConfig(max_new_tokens=MAX_NEW, max_steps=1, rho=0.5)
    events: list[ProgressEvent] = []
    LatentSeek(model, tok, Scripted([-1.0]), cfg).solve_batch(QUESTIONS[:2], on_progress=events.append)
    assert [e.phase for e in events if e.rows == 0][:3] == ["generate", "reward", "update"]
    assert events[-1].phase == "reward" and events[-1].step == 1


def test_reporting_changes_no_result(model, tok):
    cfg = LatentSeekConfig(max_new_tokens=MAX_NEW, max_steps=2, rho=0.5, lr=0.3)
    script = [-1.0, -0.5, 0.0]
    quiet = LatentSeek(model, tok, Scripted(script), cfg).solve_batch(QUESTIONS)
    events: list[ProgressEvent] = []
    with reporting(collect(events), interval=0.0):
        loud = LatentSeek(model, tok, Scripted(script), cfg).solve_batch(QUESTIONS)
    assert events
    for a, b in zip(quiet, loud, strict=True):
        assert (a.answer_ids, a.rewards, a.steps) == (b.answer_ids, b.rewards, b.steps)


@pytest.mark.parametrize(
    "method, knobs, want",
    [
        ("cot", {}, ["generate"]),
        ("self-consistency", {"n_candidates": 2}, ["generate"]),
        ("bon", {"n_candidates": 2, "reward": OracleReward(lambda a, g: a == g)}, ["generate", "reward"]),
    ],
)
def test_the_methods_announce_their_phases(model, tok, method, knobs, want):
    events: list[ProgressEvent] = []
    with reporting(collect(events), interval=3600.0):
        make_method(method, model, tok, max_new_tokens=MAX_NEW, **knobs).solve_batch(make_problems(2))
    assert [e.phase for e in events] == want and all(e.problems == 2 for e in events)


# --- the runner's display ----------------------------------------------------------------------------------------


class SlowPhases:
    """A method whose batches go through two phases and a generation that reports `steps` decode steps."""

    def __init__(self, steps: int = 3) -> None:
        self.steps = steps

    def solve_batch(self, problems):
        enter_phase("generate", problems=len(problems), step=1, max_steps=4)
        report = decode_reporter()
        for k in range(1, self.steps + 1):
            if report is not None:
                report(k * len(problems), len(problems))
        enter_phase("reward", problems=len(problems), step=1, max_steps=4)
        return [Record(prediction="1", correct=True, response="1", tokens=1, seconds=0.0) for _ in problems]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_the_first_news_at_once_then_a_line_at_most_every_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "LINE_INTERVAL", 3600.0)
    run_eval(SlowPhases(), make_problems(4), tmp_path / "run", {"method": "slow"}, batch_size=2)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "run: 0/4 problems · batch 1/2 · step 1/4 · generate · 0 tok",
        "run: 4/4 problems · acc 4/4 = 100.0%",
    ]


def test_a_log_line_follows_the_phase_and_tokens_within_a_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr("latentseek.progress.INTERVAL", 0.0)
    run_eval(SlowPhases(steps=2), make_problems(2), tmp_path / "run", {"method": "slow"}, batch_size=2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:4] == [
        "run: 0/2 problems · batch 1/1 · step 1/4 · generate · 0 tok",
        "run: 0/2 problems · batch 1/1 · step 1/4 · generate · 2 rows · 2 tok",
        "run: 0/2 problems · batch 1/1 · step 1/4 · generate · 2 rows · 4 tok",
        "run: 0/2 problems · batch 1/1 · step 1/4 · reward · 4 tok",
    ]
    assert lines[-1] == "run: 2/2 problems · acc 2/2 = 100.0%"


def test_a_terminal_gets_the_batch_status_in_the_bar(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(runner, "BAR_INTERVAL", 0.0)
    monkeypatch.setattr("latentseek.progress.INTERVAL", 0.0)
    run_eval(SlowPhases(), make_problems(2), tmp_path / "run", {"method": "slow"}, batch_size=1)
    drawn = terminal.getvalue()
    assert "batch 2/2 · step 1/4 · generate · 1 row · 3 tok" in drawn
    assert "2/2" in drawn and "acc 2/2 = 100.0%" in drawn


def test_each_rank_labels_its_lines(monkeypatch, capsys):
    monkeypatch.setattr(runner, "LINE_INTERVAL", 3600.0)
    display = runner._Display(10, 0, 0, 3, runner.DistInfo(rank=1, world_size=2, local_rank=1), "run")
    display.start_batch()
    display.on_event(ProgressEvent("generate", 0, 3, 4, 10, 4, 0.5))
    display.close()
    assert capsys.readouterr().err.splitlines() == [
        "run [rank 1/2]: 0/10 problems · batch 1/3 · step 0/3 · generate · 4 rows · 10 tok",
        "run [rank 1/2]: 0/10 problems",
    ]


def test_no_progress_shows_nothing(tmp_path, capsys):
    run_eval(SlowPhases(), make_problems(2), tmp_path / "run", {"method": "slow"}, progress=False)
    assert capsys.readouterr().err == ""


# --- the command line --------------------------------------------------------------------------------------------


def test_eval_shows_the_phase_within_a_batch(tmp_path, monkeypatch, capsys, model, tok):
    import latentseek.eval.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (model, tok))
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": q, "answer": "7"}) + "\n" for i, q in enumerate(QUESTIONS))
    )
    argv = [
        "eval",
        "--model",
        "tiny",
        "--dataset",
        str(data),
        "--out",
        str(tmp_path / "ls"),
        "--method",
        "latentseek",
        "--reward",
        "oracle",
        "--max-steps",
        "2",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ls: 0/4 problems · batch 1/1 · step 0/2 · generate · 0 tok" in err
    assert "ls: 4/4 problems · acc" in err
