"""latentseek.rewards: verdict parsing, self-verification weights, the oracle, callables and output checks."""

from __future__ import annotations

import math

import pytest
import torch

import latentseek.rewards as rewards
from latentseek.eval.judge import answers_match
from latentseek.model import ModelAdapter
from latentseek.rewards import (
    BOXED_FORMAT,
    CHECKS,
    CallableReward,
    ConfidenceReward,
    OracleReward,
    Score,
    SelfReward,
    as_reward,
    evaluate,
    parse_verdict,
)
from tiny_lm import tiny_model, tiny_tokenizer

# --- verdict parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, verdict",
    [
        ("The sums are right.\nVerdict: True", True),
        ("One product is wrong.\nVerdict: False", False),
        ("verdict: TRUE.", True),
        ("**Verdict:** False", False),
        ("**Verdict: True**", True),
        ("  Verdict:True  ", True),
        # several verdicts: the last one is the final word
        ("Verdict: True\nWait, 3 * 4 is 12, not 14.\nVerdict: False", False),
        ("Verdict: False\nOn reflection it is fine.\nVerdict: True", True),
    ],
)
def test_a_verdict_line_is_read(response, verdict):
    assert parse_verdict(response) is verdict


@pytest.mark.parametrize(
    "response",
    [
        "",
        "Everything checks out.",  # no verdict at all
        "Verdict: untrue",
        "Verdict: Truely",
        "Verdict: True or False",
        "Verdict:",
        'I must end with "Verdict: True" if it is right.',  # only a quoted example, inline
        "The format is `Verdict: True` or `Verdict: False`.",
        "> Verdict: True",  # a quoted line
        "Example:\n```\nVerdict: True\n```\nI am not sure.",  # only inside a code block
        "Verdict: True is what I would say if it were right.",
        "The answer is true.",
    ],
)
def test_anything_but_a_verdict_line_is_no_verdict(response):
    assert parse_verdict(response) is None


def test_every_check_prompt_asks_for_the_verdict_line_and_the_weights_are_the_papers():
    assert [c.weight for c in CHECKS] == [2.0, 1.0, 2.0, 1.0]
    for check in CHECKS:
        prompt = check.prompt.format(question="Q?", answer="A.")
        assert "`Verdict: True`" in prompt and "`Verdict: False`" in prompt
        assert "Q?" in prompt and "A." in prompt


# --- self-verification -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok, device):
    return tiny_model("qwen2", vocab_size=len(tok), device=device)


def _scripted(reward: SelfReward, replies: list[list[str]]) -> SelfReward:
    """Replace the verifier generation with fixed responses (one list of four per answer)."""
    reward.responses = lambda questions, answers: (replies, [7] * len(answers))
    return reward


def test_self_reward_weights_failed_checks(model, tok):
    ok, bad, none = "fine\nVerdict: True", "no\nVerdict: False", "I think it is right."
    reward = _scripted(
        SelfReward(model, tok),
        [[ok, ok, ok, ok], [bad, ok, ok, ok], [ok, bad, none, ok], [none, none, none, none]],
    )
    scores = reward.score(["q"] * 4, ["a"] * 4, [None] * 4)
    assert [s.value for s in scores] == [0.0, -2 / 6, -3 / 6, -1.0]
    assert scores[1].details["failed"] == ["calculation"]
    assert scores[2].details["failed"] == ["final_answer", "completeness"]
    assert [s.details["missing_verdicts"] for s in scores] == [0, 0, 1, 4]
    assert scores[0].details["format_ok"] is None
    assert scores[0].details["verifier_tokens"] == 7


def test_self_reward_format_rule_subtracts_its_penalty(model, tok):
    ok = "Verdict: True"
    reward = _scripted(SelfReward(model, tok, format_rule=BOXED_FORMAT, format_penalty=2.0), [[ok] * 4] * 2)
    boxed, plain = reward.score(["q"] * 2, ["so it is \\boxed{5}", "so it is 5"], [None] * 2)
    assert (boxed.value, boxed.details["format_ok"]) == (0.0, True)
    assert (plain.value, plain.details["format_ok"]) == (-2 / 6, False)


def test_self_reward_reads_only_the_generated_response(model, tok):
    """A random model never writes a verdict: every check fails although each prompt shows example verdicts."""
    reward = SelfReward(model, tok, max_new_tokens=8)
    (score,) = reward.score(["what is 2 + 3 ?"], ["2 + 3 = 5 so the answer is 5"], [None])
    assert score.value == -1.0
    assert score.details["missing_verdicts"] == 4
    assert 0 < score.details["verifier_tokens"] <= 4 * 8


def test_self_reward_runs_all_verifiers_in_one_batched_generation(model, tok, monkeypatch):
    calls = []
    real = rewards.extend

    def spy(adapter, rows, *args, **kwargs):
        calls.append(len(rows))
        return real(adapter, rows, *args, **kwargs)

    monkeypatch.setattr(rewards, "extend", spy)
    SelfReward(model, tok, max_new_tokens=4).score(["q1", "q2", "q3"], ["a1", "a2", "a3"], [None] * 3)
    assert calls == [3 * len(CHECKS)]


def test_self_reward_arguments_are_checked(model, tok):
    with pytest.raises(ValueError, match="max_new_tokens"):
        SelfReward(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one check"):
        SelfReward(model, tok, checks=())


# --- oracle --------------------------------------------------------------------------------------------------------


def _judge_twelve(response: str, gold: str) -> bool:
    return response.endswith(gold)


def test_oracle_is_zero_when_the_judge_accepts_else_minus_one():
    reward = OracleReward(judge=_judge_twelve)
    scores = reward.score(["q"] * 3, ["so 12", "so 13", "no number"], ["12", "12", "12"])
    assert [s.value for s in scores] == [0.0, -1.0, -1.0]


def test_oracle_needs_gold_answers():
    with pytest.raises(ValueError, match="gold"):
        OracleReward(judge=_judge_twelve).score(["q"], ["12"], [None])


def test_oracle_needs_a_callable_judge():
    with pytest.raises(TypeError, match="judge must be callable"):
        OracleReward(judge="answers_match")


def test_oracle_with_the_harness_judge():
    # Numbers compare as numbers and MATH answers by equivalence.
    answers = ["The total is \\boxed{\\frac{1}{2}}", "so the answer is $1,000.00", "\\boxed{7}"]
    golds = ["0.5", "1000", "8"]
    assert [s.value for s in OracleReward(answers_match).score(["q"] * 3, answers, golds)] == [0.0, 0.0, -1.0]


# --- callables and the output check ----------------------------------------------------------------------------


def test_callables_get_the_gold_answer_only_if_they_take_it():
    two = as_reward(lambda q, a: len(a))
    three = as_reward(lambda q, a, gold: float(a == gold))
    assert isinstance(two, CallableReward) and not two.takes_gold
    assert three.takes_gold
    assert [s.value for s in evaluate(two, ["q", "q"], ["ab", "c"], [None, None])] == [2.0, 1.0]
    assert [s.value for s in evaluate(three, ["q", "q"], ["x", "y"], ["x", "x"])] == [1.0, 0.0]


def test_a_callable_may_return_a_score_or_a_tensor():
    reward = as_reward(lambda q, a: Score(-0.5, {"why": a}) if a == "s" else torch.tensor(0.25))
    scores = evaluate(reward, ["q", "q"], ["s", "t"], [None, None])
    assert scores[0] == Score(-0.5, {"why": "s"})
    assert scores[1].value == 0.25


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_are_errors(value):
    with pytest.raises(ValueError, match="reward returned"):
        evaluate(as_reward(lambda q, a: value), ["q"], ["a"], [None])


def test_a_reward_returning_the_wrong_count_is_an_error():
    class Short:
        def score(self, questions, answers, golds):
            return [Score(0.0)] * (len(answers) - 1)

    with pytest.raises(ValueError, match="1 scores for 2 answers"):
        evaluate(Short(), ["q", "q"], ["a", "b"], [None, None])


def test_a_reward_returning_no_number_is_an_error():
    with pytest.raises(ValueError, match="number"):
        evaluate(as_reward(lambda q, a: "good"), ["q"], ["a"], [None])
    with pytest.raises(TypeError, match="callable"):
        as_reward(3.0)


# --- confidence --------------------------------------------------------------------------------------------------


def _direct_confidence(adapter: ModelAdapter, hidden: torch.Tensor, k: int) -> float:
    """C of one answer in float64 torch: the full logits, their log-softmax, the k largest, the means."""
    W, b = adapter.weight.double(), adapter.bias
    logits = hidden.double() @ W.T + (0.0 if b is None else b.double())
    return float(-logits.log_softmax(-1).topk(k, -1).values.mean(-1).mean())


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("k", [2, 10, 32])
def test_confidence_reward_equals_a_direct_torch_computation(model, impl, k):
    adapter = ModelAdapter.of(model)
    gen = torch.Generator().manual_seed(k)
    hidden = [torch.randn(n, adapter.weight.shape[1], generator=gen).to(adapter.device) for n in (1, 7, 30)]
    scores = ConfidenceReward(model, k=k, impl=impl).score_hidden(hidden)
    for h, score in zip(hidden, scores, strict=True):
        want = _direct_confidence(adapter, h, k)
        assert score.details == {"confidence": pytest.approx(want, rel=1e-5), "tokens": h.shape[0]}
        assert score.value == pytest.approx(-math.log(k) / want, rel=1e-5)
        assert -1.0 <= score.value < 0.0


def test_confidence_reward_calls_the_op_in_bounded_chunks(model, monkeypatch):
    """Over CONFIDENCE_ROWS_PER_CALL answer tokens the op is called per chunk, with the same scores."""
    adapter = ModelAdapter.of(model)
    hidden = [torch.randn(n, adapter.weight.shape[1], generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    want = ConfidenceReward(model).score_hidden(hidden)
    calls = []
    original = rewards.latentseek_ext.lm_head_logprob

    def counted(z, *args, **kwargs):
        calls.append(z.shape[0])
        return original(z, *args, **kwargs)

    monkeypatch.setattr(rewards.latentseek_ext, "lm_head_logprob", counted)
    monkeypatch.setattr(rewards, "CONFIDENCE_ROWS_PER_CALL", 4)
    got = ConfidenceReward(model).score_hidden(hidden)
    assert calls == [4, 4, 4, 4, 1]
    assert [g.value for g in got] == pytest.approx([w.value for w in want], rel=1e-6)


def test_confidence_reward_spans_minus_one_to_zero(tok):
    """-1 when every position spreads its mass evenly over k tokens, near 0 when it is certain of one."""
    model = tiny_model("qwen2", vocab_size=len(tok), tie=False)
    k, H = 4, model.config.hidden_size
    with torch.no_grad():
        model.lm_head.weight.zero_()
        # tokens 0..k-1 get (almost) the same logit, 60 (1 + j 1e-6), the others 0: no exact tie
        model.lm_head.weight[:k, 0] = 1.0 + 1e-6 * torch.arange(k)
        model.lm_head.weight[k, 1] = 1.0  # token k alone has the logit z_1
        # every token also gets the small logit 1e-3 v (no exact ties among the rest either)
        model.lm_head.weight[:, 2] = 1e-3 * torch.arange(model.lm_head.weight.shape[0])
    torn = torch.zeros(3, H)
    torn[:, 0] = 60.0  # e^-60: the other tokens' mass is below float32's resolution of 1
    certain = torch.zeros(3, H)
    certain[:, 1] = 60.0
    torn[:, 2] = certain[:, 2] = 1.0
    reward = ConfidenceReward(model, k=k)
    (torn_score, certain_score) = reward.score_hidden([torn, certain])
    assert torn_score.value == pytest.approx(-1.0, abs=1e-5)
    assert -0.1 < certain_score.value < 0.0


@pytest.mark.parametrize("k", [1, 0, 33, 2.5, True])
def test_confidence_reward_k_is_checked(model, k):
    with pytest.raises(ValueError, match="ConfidenceReward.k must be an int in"):
        ConfidenceReward(model, k=k)


def test_a_hidden_state_reward_needs_the_states(model):
    reward = as_reward(ConfidenceReward(model))
    with pytest.raises(ValueError, match="needs the hidden states of the 2 answers, got none"):
        evaluate(reward, ["q", "q"], ["a", "b"], [None, None])
    with pytest.raises(ValueError, match="at least one token"):
        reward.score_hidden([torch.zeros(0, model.config.hidden_size)])
