"""Rewards: score many (question, answer[, gold]) triples at once.

A reward is either a :class:`BatchReward` (``score(questions, answers, golds) -> list[Score]``) or any Python
callable ``f(question, answer)`` / ``f(question, answer, gold)`` returning a float (wrapped by :func:`as_reward`).
:func:`evaluate` is the one place where a reward's output is checked (count, finiteness).

A reward that runs a model on prompts built from the question and the answer may also define
``context_need(question, answer_tokens) -> ContextNeed``: its longest prompt for an answer of that many tokens and the
tokens it generates after it, against its model's context. :class:`~latentseek.loop.LatentSeek` checks it for every
problem before any model work (:meth:`~latentseek.loop.LatentSeek.check_context`).

- :class:`SelfReward`: the paper's self-verification. The same model answers four verification questions about
  each answer; every check that does not end in an explicit ``Verdict: True`` costs its weight:
  ``R = -(sum of failed weights + format_penalty * [format rule failed]) / (sum of weights)``.
- :class:`OracleReward`: 0 when the answer's final value matches the gold answer, else -1 (PSRM).
- :class:`ConfidenceReward`: an intrinsic reward from the answer's own token distributions (no verifier, no gold):
  ``R = -log(k) / C`` with ``C`` the mean over the answer's positions of the mean negative log-probability of the
  k most likely tokens (LTPO's confidence); see the class for its definition, scale and cost.

A reward that reads the answer's hidden states instead of its text is a :class:`HiddenStateReward`
(``score_hidden(hidden) -> list[Score]``): :class:`~latentseek.loop.LatentSeek` passes it, for each answer, the
last-layer hidden state behind every answer token (``lm_head(hidden[t])`` is the distribution token t was chosen
from), and :func:`evaluate` checks its output like any other reward's.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

import latentseek_ext

from .chat import build_prompt_ids, stop_token_ids
from .context import ContextNeed, model_context_length
from .generation import extend, greedy_picker
from .model import ModelAdapter


@dataclass(frozen=True)
class Score:
    """A reward value with per-answer details (which checks failed, missing verdicts, ...) for the record."""

    value: float
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class BatchReward(Protocol):
    def score(self, questions: Sequence[str], answers: Sequence[str], golds: Sequence[str | None]) -> list[Score]:
        """One :class:`Score` per answer; ``golds[i]`` is None when problem i has no reference answer."""
        ...


class CallableReward:
    """Wraps ``f(question, answer)`` or ``f(question, answer, gold)`` (chosen by its signature) returning a float
    or a :class:`Score`; the answers are scored one by one."""

    def __init__(self, fn: Callable[..., float | Score]) -> None:
        self.fn = fn
        try:
            inspect.signature(fn).bind(None, None, None)
            self.takes_gold = True
        except TypeError:
            self.takes_gold = False
        except ValueError:  # builtins without a signature: call them with (question, answer)
            self.takes_gold = False

    def score(self, questions: Sequence[str], answers: Sequence[str], golds: Sequence[str | None]) -> list[Score]:
        out = []
        for q, a, g in zip(questions, answers, golds, strict=True):
            value = self.fn(q, a, g) if self.takes_gold else self.fn(q, a)
            out.append(value if isinstance(value, Score) else Score(_as_float(value)))
        return out


@runtime_checkable
class HiddenStateReward(Protocol):
    def score_hidden(self, hidden: Sequence[torch.Tensor]) -> list[Score]:
        """One :class:`Score` per answer from its ``[n_i, H]`` hidden states (row t: the last-layer state whose
        LM-head distribution answer token t was chosen from)."""
        ...


RewardLike = BatchReward | HiddenStateReward | Callable[..., float | Score]


def as_reward(reward: RewardLike) -> BatchReward | HiddenStateReward:
    """A :class:`BatchReward` or :class:`HiddenStateReward` as is; any other callable wrapped in
    :class:`CallableReward`."""
    if isinstance(reward, (BatchReward, HiddenStateReward)):
        return reward
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(f"a reward must be a BatchReward or a callable, got {type(reward).__name__}")


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a reward must be one number per answer, got a tensor of shape {list(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"a reward must be a number per answer, got {value!r}") from e


def evaluate(
    reward: BatchReward | HiddenStateReward,
    questions: Sequence[str],
    answers: Sequence[str],
    golds: Sequence[str | None],
    hidden: Sequence[torch.Tensor] | None = None,
) -> list[Score]:
    """Score the answers and check the result: one finite value per answer, else ValueError.

    A :class:`HiddenStateReward` gets `hidden` (one ``[n_i, H]`` tensor per answer; required for it), any other
    reward the texts.
    """
    if isinstance(reward, HiddenStateReward):
        if hidden is None or len(hidden) != len(answers):
            got = "none" if hidden is None else f"{len(hidden)}"
            raise ValueError(
                f"{type(reward).__name__} needs the hidden states of the {len(answers)} answers, got {got}"
            )
        scores = reward.score_hidden(list(hidden))
    else:
        scores = reward.score(list(questions), list(answers), list(golds))
    if not isinstance(scores, (list, tuple)) or len(scores) != len(answers):
        got = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise ValueError(f"the reward returned {got} scores for {len(answers)} answers")
    checked = []
    for i, s in enumerate(scores):
        s = s if isinstance(s, Score) else Score(_as_float(s))
        if not math.isfinite(s.value):
            raise ValueError(f"the reward returned {s.value} for answer {i} (question {questions[i][:80]!r})")
        checked.append(s)
    return checked


# --- self-verification ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One verification question: ``prompt`` is formatted with ``question`` and ``answer``."""

    name: str
    weight: float
    prompt: str


VERDICT_INSTRUCTION = (
    "Explain your reasoning briefly. Then write, as the very last line of your reply, exactly `Verdict: True` "
    "if {criterion}, or exactly `Verdict: False` otherwise."
)

_HEADER = "Here is a problem and a proposed solution.\n\nProblem:\n{question}\n\nProposed solution:\n{answer}\n\n"

#: The four self-verification checks of the paper (weights 2, 1, 2, 1), in our own words.
CHECKS: tuple[Check, ...] = (
    Check(
        "calculation",
        2.0,
        _HEADER
        + "Redo every arithmetic step of the proposed solution yourself. "
        + VERDICT_INSTRUCTION.format(criterion="every calculation in it is correct"),
    ),
    Check(
        "final_answer",
        1.0,
        _HEADER
        + "Solve the problem independently and compare your result with the solution's final answer. "
        + VERDICT_INSTRUCTION.format(criterion="the solution's final answer is correct"),
    ),
    Check(
        "completeness",
        2.0,
        _HEADER
        + "Check that the solution reaches the end of the problem and states one definite final value. "
        + VERDICT_INSTRUCTION.format(criterion="the solution is complete and ends with a definite final value"),
    ),
    Check(
        "understanding",
        1.0,
        _HEADER
        + "Check that the solution answers the question that was actually asked and uses the given facts correctly. "
        + VERDICT_INSTRUCTION.format(criterion="the solution understood the problem correctly"),
    ),
)

# A verdict is a whole line "Verdict: True" / "Verdict: False" (case-insensitive, optional markdown bold and a
# final period); inline mentions and fenced code blocks do not count.
_VERDICT_LINE = re.compile(
    r"^[ \t]*\**[ \t]*verdict[ \t]*:[ \t]*\**[ \t]*(true|false)[ \t]*\**[ \t]*\.?[ \t]*$", re.I | re.M
)
_FENCED = re.compile(r"```.*?(```|\Z)", re.S)

#: The rule-format regex of the original code for a boxed final answer.
BOXED_FORMAT = r"\\boxed\{.*\}"


def parse_verdict(response: str) -> bool | None:
    """The verdict of a verifier response: the last verdict line's value, or None when it has none.

    Only the generated response is read (never the prompt, whose instructions contain example verdicts).
    """
    matches = _VERDICT_LINE.findall(_FENCED.sub("", response))
    return None if not matches else matches[-1].lower() == "true"


class SelfReward:
    """Self-verification reward: the answering model grades each answer with the :data:`CHECKS`.

    All verifier prompts of all answers go through one batched greedy generation.

    Args:
        model: the causal LM (or its :class:`~latentseek.model.ModelAdapter`).
        tokenizer: its tokenizer (chat template required).
        checks: the verification questions and their weights.
        max_new_tokens: most tokens per verifier response; a response cut before its verdict fails its check.
        format_rule: optional regex the answer must match (e.g. :data:`BOXED_FORMAT`).
        format_penalty: added to the failed weight when ``format_rule`` does not match (the original used 2).

    ``Score.details``: ``failed`` (names of failed checks), ``missing_verdicts`` (how many responses had no
    verdict), ``format_ok`` (None without a rule), ``verifier_tokens`` (tokens generated for this answer).
    """

    def __init__(
        self,
        model: torch.nn.Module | ModelAdapter,
        tokenizer,
        *,
        checks: Sequence[Check] = CHECKS,
        max_new_tokens: int = 512,
        format_rule: str | None = None,
        format_penalty: float = 2.0,
    ) -> None:
        if not checks:
            raise ValueError("SelfReward needs at least one check")
        if max_new_tokens < 1:
            raise ValueError(f"SelfReward.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.adapter = ModelAdapter.of(model)
        self.tokenizer = tokenizer
        self.checks = tuple(checks)
        self.max_new_tokens = max_new_tokens
        self.format_rule = None if format_rule is None else re.compile(format_rule, re.S)
        self.format_penalty = float(format_penalty)
        self.stop_ids = stop_token_ids(tokenizer, self.adapter)
        self.context = model_context_length(self.adapter, tokenizer)

    def context_need(self, question: str, answer_tokens: int) -> ContextNeed:
        """The longest verifier prompt for `question` with an answer of up to `answer_tokens` tokens, and the
        verifier's max_new_tokens after it (the answer's tokens are counted as they are, not re-tokenized)."""
        longest = max(
            len(build_prompt_ids(self.tokenizer, check.prompt.format(question=question, answer="")))
            for check in self.checks
        )
        detail = (
            f"an answer of up to {answer_tokens} tokens included; the verifier's max_new_tokens {self.max_new_tokens}"
        )
        return ContextNeed("verifier prompt", longest + answer_tokens, self.max_new_tokens, self.context, detail)

    def responses(self, questions: Sequence[str], answers: Sequence[str]) -> tuple[list[list[str]], list[int]]:
        """The verifier responses ``[answer][check]`` and the tokens generated per answer (one batched call)."""
        prompts = [
            build_prompt_ids(self.tokenizer, check.prompt.format(question=q, answer=a))
            for q, a in zip(questions, answers, strict=True)
            for check in self.checks
        ]
        k = len(self.checks)
        for i, p in enumerate(prompts):
            need = ContextNeed("verifier prompt", len(p), self.max_new_tokens, self.context)
            need.check(i // k, "shorten the question or the answer, or lower the verifier's max_new_tokens")
        gen = extend(
            self.adapter, [(None, p) for p in prompts], self.max_new_tokens, self.stop_ids, picker=greedy_picker()
        )
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
        per_answer = [texts[i * k : (i + 1) * k] for i in range(len(answers))]
        tokens = [sum(len(t) for t in gen.tokens[i * k : (i + 1) * k]) for i in range(len(answers))]
        return per_answer, tokens

    def score(self, questions: Sequence[str], answers: Sequence[str], golds: Sequence[str | None]) -> list[Score]:
        if not answers:
            return []
        responses, tokens = self.responses(questions, answers)
        total = sum(c.weight for c in self.checks)
        scores = []
        for answer, replies, n_tokens in zip(answers, responses, tokens, strict=True):
            verdicts = [parse_verdict(r) for r in replies]
            failed = [c.name for c, v in zip(self.checks, verdicts, strict=True) if v is not True]
            penalty = sum(c.weight for c, v in zip(self.checks, verdicts, strict=True) if v is not True)
            format_ok = None if self.format_rule is None else self.format_rule.search(answer) is not None
            if format_ok is False:
                penalty += self.format_penalty
            details = {
                "failed": failed,
                "missing_verdicts": sum(v is None for v in verdicts),
                "format_ok": format_ok,
                "verifier_tokens": n_tokens,
            }
            scores.append(Score(-penalty / total, details))
        return scores


# --- oracle ----------------------------------------------------------------------------------------------------------


class OracleReward:
    """PSRM: 0 when ``judge(answer, gold)`` says the answer's final value is right, else -1.

    Args:
        judge: ``judge(response_text, gold) -> bool``. The evaluation harness passes
            :func:`latentseek.eval.judge.answers_match` (numbers as numbers, MATH answers by math-verify equivalence);
            the algorithm does not import the harness, so the judge is always given.
    """

    def __init__(self, judge: Callable[[str, str], bool]) -> None:
        if not callable(judge):
            raise TypeError(
                f"OracleReward: judge must be callable (response, gold) -> bool, got {type(judge).__name__}"
            )
        self.judge = judge

    def score(self, questions: Sequence[str], answers: Sequence[str], golds: Sequence[str | None]) -> list[Score]:
        judge = self.judge
        out = []
        for i, (answer, gold) in enumerate(zip(answers, golds, strict=True)):
            if gold is None:
                raise ValueError(f"OracleReward needs a gold answer, problem {i} has none")
            out.append(Score(0.0 if judge(answer, gold) else -1.0))
        return out


# --- confidence ------------------------------------------------------------------------------------------------------

#: How many of each position's most likely tokens the confidence averages over (the op allows up to 32).
CONFIDENCE_TOPK = 10
#: Answer tokens per op call of the confidence reward: bounds the memory of the op's reference (which materialises
#: the [rows, V] logits, 0.6 GB in fp32 for Qwen2.5's V) where no kernel serves the call; a kernel call streams W.
CONFIDENCE_ROWS_PER_CALL = 1024


class ConfidenceReward:
    r"""An intrinsic reward from the answer's own token distributions: no verifier generations, no gold answer.

    For answer position t with LM-head distribution ``p_t = softmax(lm_head(h_t))`` (h_t: the hidden state the
    answer's token t was chosen from) and its k largest probabilities ``p_t^(1) >= ... >= p_t^(k)``:

        c_t = -(1/k) sum_{j<=k} log p_t^(j)          (the confidence of position t; c_t >= log k)
        C   = (1/n) sum_{t<n} c_t                      (the answer's confidence, over its n tokens)
        R   = -log(k) / C                              (the reward, in [-1, 0))

    ``c_t`` is LTPO's confidence (Ye, Liang and Shan 2025, "Thinking on the Fly: Test-Time Reasoning Enhancement
    via Latent Thought Policy Optimization", arXiv 2510.04182: the reward is the mean negative log-probability of
    the top-k tokens, averaged over positions). We differ in where and how it is used: LTPO averages it over the
    positions of its latent thought tokens, which it optimises with a Gaussian-perturbation policy; here it is
    averaged over the answer's tokens (the kept ones, the optimised prefix, the continuation) and enters
    LatentSeek's REINFORCE update as the reward. And we map it to the loop's scale: the paper's rewards are <= 0
    with 0 the best (the oracle's 0 / -1, the self-reward's minus the failed fraction of the checks) and a
    threshold of -0.2. By Jensen's inequality ``c_t >= log k``, with equality exactly when p_t spreads all its mass
    evenly over k tokens (the least confident a position can be under this measure), and c_t grows without bound
    as p_t concentrates on one token (its other top-k log-probabilities go to -inf). So ``R = -log(k) / C`` is -1
    for an answer whose every position is evenly torn between k tokens and tends to 0 as the answer becomes
    certain; the default threshold -0.2 then asks for ``C > 5 log k`` (11.5 nats for k = 10), and the reward of
    a step is comparable across answers of any length. ``Score.details``: ``confidence`` (C), ``tokens`` (n).

    Cost: :func:`latentseek_ext.lm_head_logprob` with ``topk=k`` over the answers' tokens of a whole batch, one call
    per :data:`CONFIDENCE_ROWS_PER_CALL` tokens (each a single pass over the LM head; the kernel keeps no ``[n, V]``
    logits, the reference's are bounded by the chunk), and no model forward: the loop passes the hidden states it
    already has (the first generation's, the optimised latents, the continuation's).

    Args:
        model: the causal LM (or its :class:`~latentseek.model.ModelAdapter`): its LM head scores the states.
        k: how many top tokens each position's confidence averages (2 <= k <= 32, at most the vocabulary; k = 1
            would make log k, so every reward, 0).
        impl: the op's implementation (``"auto"``, ``"ext"``, ``"reference"``).
    """

    def __init__(self, model: torch.nn.Module | ModelAdapter, *, k: int = CONFIDENCE_TOPK, impl: str = "auto") -> None:
        self.adapter = ModelAdapter.of(model)
        vocab = self.adapter.weight.shape[0]
        if not (isinstance(k, int) and 2 <= k <= min(32, vocab)):
            raise ValueError(f"ConfidenceReward.k must be an int in [2, {min(32, vocab)}], got {k!r}")
        self.k = k
        self.impl = impl

    def confidence(self, hidden: Sequence[torch.Tensor]) -> list[float]:
        """C of each answer (see the class), all answers in one op call."""
        sizes = [h.shape[0] for h in hidden]
        if any(n == 0 for n in sizes):
            raise ValueError(f"ConfidenceReward: every answer needs at least one token, got lengths {sizes}")
        z = torch.cat([h.to(self.adapter.dtype) for h in hidden])
        parts = []
        with torch.no_grad():
            for chunk in z.split(CONFIDENCE_ROWS_PER_CALL):
                *_, topk_logp, _ = latentseek_ext.lm_head_logprob(
                    chunk, self.adapter.weight, bias=self.adapter.bias, topk=self.k, impl=self.impl
                )
                parts.append(topk_logp)
        per_position = -torch.cat(parts).double().mean(-1)
        return [c.mean().item() for c in per_position.split(sizes)]

    def score_hidden(self, hidden: Sequence[torch.Tensor]) -> list[Score]:
        if not hidden:
            return []
        log_k = math.log(self.k)
        return [
            Score(-log_k / c, {"confidence": c, "tokens": int(h.shape[0])})
            for c, h in zip(self.confidence(hidden), hidden, strict=True)
        ]
