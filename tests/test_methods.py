"""latentseek.eval.methods on a tiny random model: valid records, token and time accounting, the choice rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

import latentseek_ext
from latentseek.chat import build_prompt_ids
from latentseek.config import LatentSeekConfig
from latentseek.errors import ConfigError
from latentseek.eval.data import Problem
from latentseek.eval.judge import answers_match, extract_answer
from latentseek.eval.methods import (
    KNOB_HELP,
    METHODS,
    REWARDS,
    BestOfN,
    CoT,
    LatentSeekMethod,
    SelfConsistency,
    check_knobs,
    knob_table,
    majority_vote,
    make_method,
)
from latentseek.eval.prompts import PROMPT_STYLES, solver_messages
from latentseek.eval.record import BestOfNRecord, LatentSeekRecord, Record, SelfConsistencyRecord
from latentseek.generation import generate
from latentseek.model import ModelAdapter
from latentseek.rewards import Score
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer

MAX_NEW = 8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok, device):
    return ModelAdapter(tiny_model("qwen2", vocab_size=len(tok), device=device))


@pytest.fixture(scope="module")
def problems():
    return [Problem(id=f"p{i}", question=q, gold="5", answer_kind="number") for i, q in enumerate(QUESTIONS[:3])]


class Listed:
    """A reward handing out the given values in order, over all calls; it records what it was asked."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.calls: list[tuple[list[str], list[str], list[str | None]]] = []

    def score(self, questions, answers, golds):
        self.calls.append((list(questions), list(answers), list(golds)))
        out, self.values = self.values[: len(answers)], self.values[len(answers) :]
        return [Score(v) for v in out]


def check_records(records, problems, iterations=None):
    assert len(records) == len(problems)
    for record in records:
        assert isinstance(record, Record)
        assert record.tokens > 0 and record.seconds > 0
        if iterations is not None:
            assert record.iterations == iterations


# --- every method -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, knobs, iterations, kind",
    [
        ("cot", {}, 0, Record),
        ("bon", {"verifier_max_new_tokens": 3, "n_candidates": 2}, 0, BestOfNRecord),
        ("self-consistency", {"n_candidates": 3}, 0, SelfConsistencyRecord),
        ("latentseek", {"reward": "oracle", "max_steps": 2, "rho": 1.0}, None, LatentSeekRecord),
        (
            "latentseek",
            {"reward": "self", "max_steps": 1, "rho": 1.0, "verifier_max_new_tokens": 3},
            None,
            LatentSeekRecord,
        ),
    ],
    ids=["cot", "bon-self", "sc", "latentseek-oracle", "latentseek-self"],
)
def test_every_method_writes_valid_records(model, tok, problems, name, knobs, iterations, kind):
    method = make_method(name, model, tok, max_new_tokens=MAX_NEW, **knobs)
    records = method.solve_batch(problems)
    check_records(records, problems, iterations)
    for record in records:
        assert type(record) is kind
        assert Record.from_json(record.to_json()) == record  # reads back as the class that wrote it
        if name != "self-consistency":
            assert record.prediction == extract_answer(record.response)
            assert record.correct == answers_match(record.response, "5")


def test_cot_is_the_greedy_answer_of_the_solver_prompt_and_counts_its_tokens(model, tok, problems):
    records = CoT(model, tok, max_new_tokens=MAX_NEW, prompt="json").solve_batch(problems)
    for record, problem in zip(records, problems, strict=True):
        ids = build_prompt_ids(tok, solver_messages(problem.question, "json", "number"))
        (tokens,) = generate(model, tok, [ids], MAX_NEW).tokens
        assert record.response == tok.decode(tokens, skip_special_tokens=True)
        assert record.tokens == len(tokens)
        assert record.rewards == [] and record.iterations == 0


def test_self_reward_methods_count_the_verifier_tokens(model, tok, problems):
    bon = make_method("bon", model, tok, max_new_tokens=MAX_NEW, n_candidates=2, verifier_max_new_tokens=3)
    for record in bon.solve_batch(problems):
        # 2 candidates x 4 checks, each verifier response 1..3 tokens
        assert 8 <= record.verifier_tokens <= 24
        assert record.tokens > record.verifier_tokens
    seek = make_method("latentseek", model, tok, max_new_tokens=MAX_NEW, reward="self", verifier_max_new_tokens=3)
    for record in seek.solve_batch(problems):
        assert record.verifier_tokens >= 4 * len(record.rewards)
        assert record.tokens == record.generated_tokens + record.verifier_tokens


# --- best of N ------------------------------------------------------------------------------------------------------


def test_bon_picks_the_best_reward_and_the_earliest_among_equals(model, tok, problems):
    # candidates are scored problem by problem: p0 -> [-1, 0, 0], p1 -> [-0.5, -0.5, -1], p2 -> [-1, -1, -0.25]
    reward = Listed([-1, 0, 0, -0.5, -0.5, -1, -1, -1, -0.25])
    method = BestOfN(model, tok, reward=reward, n_candidates=3, max_new_tokens=MAX_NEW, seed=3)
    records = method.solve_batch(problems)
    assert [r.chosen for r in records] == [1, 0, 2]
    assert [r.rewards for r in records] == [[0.0], [-0.5], [-0.25]]
    assert records[0].candidate_rewards == [-1.0, 0.0, 0.0]
    ((questions, answers, golds),) = reward.calls
    assert len(answers) == 9 and golds == ["5"] * 9
    assert questions[0] == solver_messages(problems[0].question, "boxed", "number")[0]["content"]
    assert [answers[3 * i + r.chosen] for i, r in enumerate(records)] == [r.response for r in records]
    # candidate 0 is the greedy CoT answer
    cot = CoT(model, tok, max_new_tokens=MAX_NEW).solve_batch(problems)
    assert [answers[3 * i] for i in range(3)] == [r.response for r in cot]
    check_records(records, problems, 0)


def test_sampled_candidates_do_not_depend_on_the_batch(model, tok, problems):
    def candidates(batch):
        reward = Listed([0.0] * 3 * len(batch))
        BestOfN(model, tok, reward=reward, n_candidates=3, max_new_tokens=MAX_NEW, temperature=1.5).solve_batch(batch)
        answers = reward.calls[0][1]
        return [answers[3 * i : 3 * i + 3] for i in range(len(batch))]

    together = candidates(problems)
    alone = candidates([problems[2]])
    assert together[2] == alone[0]
    assert len({tuple(c) for c in together}) > 1  # the problems' samples differ


# --- self-consistency ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answers, winner, votes",
    [
        (["5", "6", "6"], "6", 2),
        (["3", "4", "3.0", "4"], "3", 2),  # a tie goes to the answer seen first; 3.0 counts as 3
        ([None, "1/2", "7", "0.5", None], "1/2", 2),
        (["\\frac{1}{2}", "x", "0.5"], "\\frac{1}{2}", 2),
        ([None, " ", None], None, 0),
        ([], None, 0),
    ],
)
def test_majority_vote(answers, winner, votes):
    assert majority_vote(answers) == (winner, votes)


def test_self_consistency_answers_the_majority(model, tok, problems, monkeypatch):
    texts = {"p0": ["so 4", "so 5", "the answer is 5", "no"], "p1": ["7", "8", "8", "7"], "p2": ["x", "y", "z", "x"]}

    def fake_sample(self, batch, first):
        assert (self.settings.n_candidates, first) == (4, 0)
        return [[tok.encode(t, add_special_tokens=False) for t in texts[p.id]] for p in batch]

    monkeypatch.setattr(SelfConsistency, "_sample", fake_sample)
    records = SelfConsistency(model, tok, n_candidates=4).solve_batch(problems)
    assert [(r.prediction, r.votes, r.correct) for r in records] == [
        ("5", 2, True),
        ("7", 2, False),
        (None, 0, False),
    ]
    assert records[0].response == "so 5"
    assert records[0].answers == ["4", "5", "5", None]
    assert records[1].tokens == 4
    check_records(records, problems, 0)


# --- LatentSeek ----------------------------------------------------------------------------------------------------


def test_latentseek_records_the_search(model, tok, problems):
    reward = Listed([-1.0, -1.0, -1.0] + [-1.0, -1.0, -1.0] + [-0.1] * 3)  # initial, step 1, step 2
    method = LatentSeekMethod(model, tok, reward=reward, config=_config(max_steps=2, rho=1.0))
    records = method.solve_batch(problems)
    check_records(records, problems, 2)
    for record in records:
        assert record.rewards == [-1.0, -1.0, -0.1]
        assert record.final_index == 2 and record.solved
        assert record.verifier_tokens == 0 and record.tokens == record.generated_tokens
        assert record.initial_correct == answers_match(record.initial_response, "5")
        assert record.initial_prediction == extract_answer(record.initial_response)
        # every answer's extraction, for the report's step-budget curve: the initial one first, the returned last
        assert len(record.step_predictions) == 3
        assert record.step_predictions[0] == record.initial_prediction
        assert record.step_predictions[record.final_index] == record.prediction
    assert method.name == "latentseek-custom"


def test_latentseek_correct_is_the_judges_verdict_not_the_reward(model, tok, problems):
    # the reward calls every first answer right: nothing is optimised, yet the judge finds them wrong
    problems = [Problem(id=p.id, question=p.question, gold="98765", answer_kind="number") for p in problems]
    method = LatentSeekMethod(model, tok, reward=Listed([0.0] * 3), config=_config())
    records = method.solve_batch(problems)
    assert [r.iterations for r in records] == [0, 0, 0]
    assert [r.rewards for r in records] == [[0.0]] * 3
    assert not any(r.correct for r in records)


def test_latentseek_oracle_searches_until_the_judge_accepts(model, tok, problems):
    method = make_method("latentseek", model, tok, reward="oracle", max_new_tokens=MAX_NEW, max_steps=3, rho=1.0)
    records = method.solve_batch(problems)
    for record in records:
        assert record.rewards[-1] == (0.0 if record.correct else -1.0)
        assert record.iterations == (len(record.rewards) - 1)
        assert record.correct or record.iterations == 3


def _config(**kw):
    return LatentSeekConfig(**{"max_new_tokens": MAX_NEW, **kw})


# --- the factory -----------------------------------------------------------------------------------------------------


def test_make_method_knobs_and_names(model, tok):
    sc = make_method("self-consistency", model, tok, n_candidates=7, seed=None, max_new_tokens=MAX_NEW)
    assert sc.name == "self-consistency"
    assert sc.knobs == {
        "prompt": "boxed",
        "max_new_tokens": MAX_NEW,
        "n_candidates": 7,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": 0,
        "sampler": "fused",
    }
    assert make_method("bon", model, tok).knobs["n_candidates"] == 3
    seek = make_method("latentseek", model, tok, reward="oracle", rho=0.5, prompt="json")
    assert seek.name == "latentseek-oracle"
    assert seek.knobs["rho"] == 0.5 and seek.knobs["prompt"] == "json" and "verifier_max_new_tokens" not in seek.knobs
    custom = LatentSeekMethod(model, tok, reward=Listed([]), config=_config(rho=0.5))
    assert custom.knobs == {  # the sampler's seed only with samples > 1
        "prompt": "boxed",
        "reward": "custom",
        **{k: v for k, v in dataclasses.asdict(_config(rho=0.5)).items() if k != "seed"},
    }
    assert make_method("latentseek", model, tok, samples=2, seed=3).knobs["seed"] == 3


def test_the_knob_table_is_the_settings_classes():
    knobs = {k.name: k for k in knob_table()}
    assert list(knobs)[:2] == ["prompt", "max_new_tokens"]
    assert set(knobs) == set(KNOB_HELP)  # every knob has its help line, and no help line is stale
    assert knobs["prompt"].defaults == dict.fromkeys(METHODS, "boxed") and knobs["prompt"].choices == PROMPT_STYLES
    assert knobs["max_new_tokens"].defaults == dict.fromkeys(METHODS, LatentSeekConfig().max_new_tokens)
    assert knobs["n_candidates"].defaults == {"bon": 3, "self-consistency": 5}
    assert knobs["reward"].choices == REWARDS and knobs["reward"].defaults == {"bon": "self", "latentseek": "self"}
    assert knobs["impl"].choices == latentseek_ext.IMPLS and knobs["impl"].flag == "--impl"
    assert (knobs["keep_best"].type, knobs["grad_clip"].type, knobs["top_p"].flag) == (bool, float, "--top-p")
    for field in dataclasses.fields(LatentSeekConfig):
        assert knobs[field.name].defaults["latentseek"] == getattr(LatentSeekConfig(), field.name)
    assert [k.name for k in knob_table(["cot"])] == ["prompt", "max_new_tokens"]


def test_knobs_are_checked_before_the_model_is_touched(tok):
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1, got 0"):
        make_method("cot", None, tok, max_new_tokens=0)
    with pytest.raises(ConfigError, match="n_candidates must be >= 1"):
        BestOfN(None, tok, n_candidates=0)
    with pytest.raises(ConfigError, match=r"prompt must be one of \('boxed', 'json'\), got 'latex'"):
        check_knobs("latentseek", {"prompt": "latex"})
    with pytest.raises(ConfigError, match="verifier_max_new_tokens must be >= 1"):
        check_knobs("bon", {"verifier_max_new_tokens": 0})
    with pytest.raises(ConfigError, match="seed must be int, got 1.5"):
        check_knobs("self-consistency", {"seed": 1.5})


@pytest.mark.parametrize(
    "name, knobs, message",
    [
        ("cot", {"rho": 0.3}, "does not use rho"),
        ("self-consistency", {"reward": "self"}, "does not use reward"),
        ("latentseek", {"reward": "judge"}, "reward must be"),
        ("latentseek", {"rho": 2.0}, "rho must lie"),
        ("beam", {}, "method must be"),
    ],
)
def test_make_method_refuses_bad_knobs(model, tok, name, knobs, message):
    with pytest.raises(ValueError, match=message):
        check_knobs(name, knobs)
    with pytest.raises(ValueError, match=message):
        make_method(name, model, tok, **knobs)
