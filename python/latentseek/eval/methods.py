"""The evaluation methods that ``latentseek eval --method`` runs, one record per problem for :mod:`latentseek.eval.runs`.

- ``cot``: one greedy chain-of-thought answer per problem.
- ``bon``: best-of-N. N candidates (the first greedy, the others sampled), the one with the best reward
  (self-verification by default) is the answer; ties go to the earliest candidate.
- ``self-consistency``: N sampled answers, the most frequent final answer wins (answers the judge finds
  equivalent count together; ties go to the answer seen first).
- ``latentseek``: the LatentSeek loop (:class:`~latentseek.loop.LatentSeek`) with the self-verification reward
  (``self``) or the gold-answer reward (``oracle``).

Every method prompts with :func:`latentseek.eval.prompts.solver_messages` and judges its final answer against the gold
answer with :mod:`latentseek.eval.judge` (never with a reward: the oracle reward is LatentSeek's signal, not the verdict).
Every record counts the tokens the model generated for the problem, the verifier's included, so methods can be
compared at equal compute, and the wall seconds spent on it (a batch's time is shared equally by its problems,
LatentSeek's per phase by the problems taking part in it).

Sampled candidates are seeded per problem id and candidate number, so a problem's samples do not depend on the
batch size, the problem's place in the batch, or the rank that solves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..chat import build_prompt_ids, question_text, stop_token_ids
from ..config import LatentSeekConfig
from ..generation import extend, greedy_picker, sampling_picker
from ..loop import AnswerCallback, LatentSeek, Result
from ..model import ModelAdapter
from ..rewards import BOXED_FORMAT, BatchReward, OracleReward, RewardLike, SelfReward, as_reward, evaluate
from .data import Problem
from .judge import answers_match, extract_answer, is_equivalent
from .prompts import PROMPT_STYLES, solver_messages

METHODS = ("cot", "bon", "self-consistency", "latentseek")
REWARDS = ("self", "oracle")

DEFAULT_MAX_NEW_TOKENS = LatentSeekConfig.max_new_tokens
DEFAULT_VERIFIER_MAX_NEW_TOKENS = 512
#: Best-of-N candidates, as in the paper's baseline.
DEFAULT_BON_CANDIDATES = 3
#: Self-consistency samples: an odd number (fewer ties) that spends about the tokens of the paper's BoN-3 plus a
#: couple of LatentSeek steps, a common small-budget setting.
DEFAULT_SC_SAMPLES = 5
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95


def row_seed(seed: int, problem_id: str, k: int) -> int:
    """The sampling seed of candidate k of a problem: a hash of (seed, id, k), whatever the batch."""
    digest = hashlib.sha256(f"{seed}\0{problem_id}\0{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most frequent answer and its count; equivalent answers (``judge.is_equivalent``) count as one.

    An answer stands for its group as first written; ties go to the group seen first; None (no answer) does not
    vote. Returns ``(None, 0)`` when no answer has a value.
    """
    groups: list[list[Any]] = []  # [representative, count]
    for answer in answers:
        if answer is None or not answer.strip():
            continue
        for group in groups:
            if is_equivalent(answer, group[0]):
                group[1] += 1
                break
        else:
            groups.append([answer, 1])
    if not groups:
        return None, 0
    best = groups[0]
    for group in groups[1:]:
        if group[1] > best[1]:  # strictly more: a tie keeps the earlier group
            best = group
    return best[0], best[1]


def _sync(adapter: ModelAdapter) -> None:
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)


class _Method:
    """What the methods share: the model, the prompt style, generation, and the record."""

    name = "method"

    def __init__(self, model, tokenizer, *, prompt: str = "boxed", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        if prompt not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {prompt!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.adapter = ModelAdapter.of(model)
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_token_ids(tokenizer, self.adapter)

    @property
    def knobs(self) -> dict[str, Any]:
        """The settings that decide this method's records (they go into the run's config)."""
        return {"prompt": self.prompt, "max_new_tokens": self.max_new_tokens}

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return solver_messages(problem.question, self.prompt, problem.answer_kind)

    def _generate(self, prompts: list[list[int]], picker) -> list[list[int]]:
        rows = [(None, p) for p in prompts]
        return extend(self.adapter, rows, self.max_new_tokens, self.stop_ids, picker=picker).tokens

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _seconds(self, t0: float, problems: Sequence[Problem]) -> float:
        _sync(self.adapter)
        return (time.perf_counter() - t0) / len(problems)

    def _sample(self, problems: Sequence[Problem], n: int, seed: int, temperature: float, top_p: float, first: int):
        """Candidates ``first .. n-1`` of every problem, sampled, all in one batch: ``[problem][candidate]``."""
        if n <= first:
            return [[] for _ in problems]
        prompts, seeds = [], []
        for p in problems:
            ids = build_prompt_ids(self.tokenizer, self.messages(p))
            for k in range(first, n):
                prompts.append(ids)
                seeds.append(row_seed(seed, p.id, k))
        picker = sampling_picker(temperature, top_p, seed, len(prompts), row_seeds=seeds)
        tokens = self._generate(prompts, picker)
        per = n - first
        return [tokens[i * per : (i + 1) * per] for i in range(len(problems))]


def _answer_fields(response: str, gold: str) -> dict[str, Any]:
    return {"prediction": extract_answer(response), "correct": answers_match(response, gold), "response": response}


class CoT(_Method):
    """Greedy chain of thought: one answer per problem, all problems of a batch in one generation."""

    name = "cot"

    def solve_batch(self, problems: Sequence[Problem]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        tokens = self._generate([build_prompt_ids(self.tokenizer, self.messages(p)) for p in problems], greedy_picker())
        seconds = self._seconds(t0, problems)
        return [
            {
                **_answer_fields(self._decode(t), p.gold),
                "tokens": len(t),
                "seconds": seconds,
                "iterations": 0,
                "rewards": [],
            }
            for p, t in zip(problems, tokens, strict=True)
        ]


class _Sampling(_Method):
    def __init__(
        self,
        model,
        tokenizer,
        *,
        n: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(model, tokenizer, **common)
        if n < 1:
            raise ValueError(f"{self.name} needs at least one candidate, got {n}")
        sampling_picker(temperature, top_p, seed, 1)  # checks temperature and top_p now, not mid-run
        self.n, self.temperature, self.top_p, self.seed = n, temperature, top_p, seed

    @property
    def knobs(self) -> dict[str, Any]:
        return {
            **super().knobs,
            "n_candidates": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


class BestOfN(_Sampling):
    """Best-of-N: candidate 0 greedy, candidates 1..N-1 sampled; the best-rewarded one (earliest among equals).

    ``reward``: ``"self"`` (self-verification, with the boxed format rule for the boxed prompt), ``"oracle"`` (gold
    answer, an upper bound), or any reward object. Record extras: ``candidate_rewards``, ``chosen`` (its index),
    ``verifier_tokens``; ``rewards`` holds the chosen candidate's reward.
    """

    name = "bon"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        n_candidates: int = DEFAULT_BON_CANDIDATES,
        reward: str | RewardLike = "self",
        verifier_max_new_tokens: int = DEFAULT_VERIFIER_MAX_NEW_TOKENS,
        **kw: Any,
    ) -> None:
        super().__init__(model, tokenizer, n=n_candidates, **kw)
        self.reward_name, self.reward = _make_reward(reward, self, verifier_max_new_tokens)
        self.verifier_max_new_tokens = verifier_max_new_tokens

    @property
    def knobs(self) -> dict[str, Any]:
        knobs = {**super().knobs, "reward": self.reward_name}
        if self.reward_name == "self":
            knobs["verifier_max_new_tokens"] = self.verifier_max_new_tokens
        return knobs

    def solve_batch(self, problems: Sequence[Problem]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        greedy = self._generate([build_prompt_ids(self.tokenizer, self.messages(p)) for p in problems], greedy_picker())
        sampled = self._sample(problems, self.n, self.seed, self.temperature, self.top_p, first=1)
        candidates = [[g, *s] for g, s in zip(greedy, sampled, strict=True)]
        texts = [[self._decode(t) for t in c] for c in candidates]
        flat_q = [question_text(self.messages(p)) for p in problems for _ in range(self.n)]
        flat_a = [t for ts in texts for t in ts]
        flat_g = [p.gold for p in problems for _ in range(self.n)]
        scores = evaluate(self.reward, flat_q, flat_a, flat_g)
        seconds = self._seconds(t0, problems)
        records = []
        for i, p in enumerate(problems):
            mine = scores[i * self.n : (i + 1) * self.n]
            values = [s.value for s in mine]
            chosen = max(range(self.n), key=lambda k: (values[k], -k))
            verifier = sum(int(s.details.get("verifier_tokens", 0)) for s in mine)
            records.append(
                {
                    **_answer_fields(texts[i][chosen], p.gold),
                    "tokens": sum(len(t) for t in candidates[i]) + verifier,
                    "seconds": seconds,
                    "iterations": 0,
                    "rewards": [values[chosen]],
                    "candidate_rewards": values,
                    "chosen": chosen,
                    "verifier_tokens": verifier,
                }
            )
        return records


class SelfConsistency(_Sampling):
    """Self-consistency: N sampled answers, majority vote of their final answers (see :func:`majority_vote`).

    Record extras: ``answers`` (each sample's extracted answer), ``votes`` (the winner's count); ``response`` is
    the first sample giving the winning answer.
    """

    name = "self-consistency"

    def __init__(self, model, tokenizer, *, n_candidates: int = DEFAULT_SC_SAMPLES, **kw: Any) -> None:
        super().__init__(model, tokenizer, n=n_candidates, **kw)

    def solve_batch(self, problems: Sequence[Problem]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        samples = self._sample(problems, self.n, self.seed, self.temperature, self.top_p, first=0)
        seconds = self._seconds(t0, problems)
        records = []
        for p, tokens in zip(problems, samples, strict=True):
            texts = [self._decode(t) for t in tokens]
            answers = [extract_answer(t) for t in texts]
            winner, votes = majority_vote(answers)
            response = next(
                (
                    t
                    for t, a in zip(texts, answers, strict=True)
                    if winner is not None and a is not None and is_equivalent(a, winner)
                ),
                texts[0],
            )
            records.append(
                {
                    "prediction": winner,
                    "correct": winner is not None and is_equivalent(winner, p.gold),
                    "response": response,
                    "tokens": sum(len(t) for t in tokens),
                    "seconds": seconds,
                    "iterations": 0,
                    "rewards": [],
                    "answers": answers,
                    "votes": votes,
                }
            )
        return records


class LatentSeekMethod(_Method):
    """LatentSeek (:class:`~latentseek.loop.LatentSeek`) on the solver prompt.

    ``reward``: ``"self"`` (self-verification, with the boxed format rule for the boxed prompt), ``"oracle"``
    (0 when the answer matches the gold answer, else -1), or any reward object.

    Record: ``prediction`` / ``correct`` of the returned answer, ``iterations`` = optimiser steps, ``rewards`` the
    reward history (initial answer first); extras ``initial_prediction`` / ``initial_correct`` (the greedy answer
    LatentSeek starts from, i.e. CoT inside LatentSeek), ``initial_response``, ``final_index``, ``update_length``,
    ``solved`` (reward above the threshold), ``generated_tokens`` and ``verifier_tokens`` (their sum is ``tokens``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        reward: str | RewardLike = "self",
        config: LatentSeekConfig | None = None,
        prompt: str = "boxed",
        verifier_max_new_tokens: int = DEFAULT_VERIFIER_MAX_NEW_TOKENS,
    ) -> None:
        config = config or LatentSeekConfig()
        super().__init__(model, tokenizer, prompt=prompt, max_new_tokens=config.max_new_tokens)
        self.config = config
        self.reward_name, reward_obj = _make_reward(reward, self, verifier_max_new_tokens)
        self.verifier_max_new_tokens = verifier_max_new_tokens
        self.engine = LatentSeek(self.adapter, tokenizer, reward_obj, config)
        self.name = f"latentseek-{self.reward_name}"

    @property
    def knobs(self) -> dict[str, Any]:
        knobs = {"prompt": self.prompt, "reward": self.reward_name, **dataclasses.asdict(self.config)}
        if self.reward_name == "self":
            knobs["verifier_max_new_tokens"] = self.verifier_max_new_tokens
        return knobs

    def seek(self, problems: Sequence[Problem], on_answer: AnswerCallback | None = None) -> list[Result]:
        """The LatentSeek results of the problems (an empty gold answer is passed as none)."""
        return self.engine.solve_batch(
            [self.messages(p) for p in problems], [p.gold or None for p in problems], on_answer=on_answer
        )

    def solve_batch(self, problems: Sequence[Problem]) -> list[dict[str, Any]]:
        records = []
        for p, r in zip(problems, self.seek(problems), strict=True):
            verifier = sum(int(d.get("verifier_tokens", 0)) for d in r.reward_details)
            records.append(
                {
                    **_answer_fields(r.final_answer, p.gold),
                    "tokens": r.generated_tokens + verifier,
                    "seconds": r.total_time,
                    "iterations": r.steps,
                    "rewards": list(r.rewards),
                    "initial_prediction": extract_answer(r.initial_answer),
                    "initial_correct": answers_match(r.initial_answer, p.gold),
                    "initial_response": r.initial_answer,
                    "final_index": r.final_index,
                    "update_length": r.update_length,
                    "solved": r.solved,
                    "generated_tokens": r.generated_tokens,
                    "verifier_tokens": verifier,
                }
            )
        return records


def _make_reward(reward: str | RewardLike, method: _Method, verifier_max_new_tokens: int) -> tuple[str, BatchReward]:
    """(name for the config, the reward): ``"self"``, ``"oracle"``, or a given reward object (named ``custom``)."""
    if not isinstance(reward, str):
        return "custom", as_reward(reward)
    if reward == "self":
        rule = BOXED_FORMAT if method.prompt == "boxed" else None
        return reward, SelfReward(
            method.adapter, method.tokenizer, max_new_tokens=verifier_max_new_tokens, format_rule=rule
        )
    if reward == "oracle":
        return reward, OracleReward(answers_match)
    raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}")


_COMMON = {"prompt", "max_new_tokens"}
_SAMPLING = {"n_candidates", "temperature", "top_p", "seed"}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LatentSeekConfig)}
KNOBS: dict[str, set[str]] = {
    "cot": _COMMON,
    "bon": _COMMON | _SAMPLING | {"reward", "verifier_max_new_tokens"},
    "self-consistency": _COMMON | _SAMPLING,
    "latentseek": {"prompt", "reward", "verifier_max_new_tokens"} | _CONFIG_FIELDS,
}


def check_knobs(name: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs that are set (not None), after checking that method `name` exists and uses them (ValueError)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    given = {k: v for k, v in knobs.items() if v is not None}
    unused = sorted(set(given) - KNOBS[name])
    if unused:
        raise ValueError(f"method {name!r} does not use {', '.join(unused)}")
    if given.get("reward", "self") not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {given['reward']!r}")
    if name == "latentseek":
        LatentSeekConfig(**{k: v for k, v in given.items() if k in _CONFIG_FIELDS})  # its checks, before any loading
    return given


def make_method(name: str, model, tokenizer, **knobs: Any) -> _Method:
    """The method called `name` (one of :data:`METHODS`) with its knobs; a knob set to None keeps its default.

    Knobs: ``prompt`` and ``max_new_tokens`` for all; ``n_candidates``, ``temperature``, ``top_p``, ``seed`` for
    ``bon`` and ``self-consistency``; ``reward`` (``self`` / ``oracle``) and ``verifier_max_new_tokens`` for
    ``bon`` and ``latentseek``; the :class:`~latentseek.config.LatentSeekConfig` fields for ``latentseek``.
    A knob the method does not use is an error (``--rho`` with ``cot`` is a mistake, not a no-op).
    """
    given = check_knobs(name, knobs)
    adapter = ModelAdapter.of(model)
    if name == "cot":
        return CoT(adapter, tokenizer, **given)
    if name == "bon":
        return BestOfN(adapter, tokenizer, **given)
    if name == "self-consistency":
        return SelfConsistency(adapter, tokenizer, **given)
    config = LatentSeekConfig(**{k: v for k, v in given.items() if k in _CONFIG_FIELDS})
    rest = {k: v for k, v in given.items() if k not in _CONFIG_FIELDS}
    return LatentSeekMethod(adapter, tokenizer, config=config, **rest)
