"""The evaluation methods that ``latentseek eval --method`` runs, and the table they are declared in.

- ``cot``: one greedy chain-of-thought answer per problem.
- ``bon``: best-of-N. N candidates (the first greedy, the others sampled), the one with the best reward
  (self-verification by default) is the answer; ties go to the earliest candidate.
- ``self-consistency``: N sampled answers, the most frequent final answer wins (answers the judge finds
  equivalent count together; ties go to the answer seen first).
- ``latentseek``: the LatentSeek loop (:class:`~latentseek.loop.LatentSeek`) with the self-verification reward
  (``self``), the gold-answer reward (``oracle``) or the answer's own confidence (``confidence``,
  :class:`~latentseek.rewards.ConfidenceReward`); ``samples`` K > 1 draws K prefixes per step (see the loop).
- ``slot``: SLOT (:class:`~latentseek.slot.Slot`): a vector per problem added to the final hidden states, fitted
  for a few AdamW steps to the prompt's own next-token loss, then kept while the greedy answer is generated.

The table. :data:`METHOD_TABLE` maps each method's name to its class, and each class's ``settings_type`` (a frozen
dataclass) declares its knobs: their names, types, defaults and checks; a nested dataclass field
(:class:`~latentseek.config.LatentSeekConfig`) contributes its own fields as knobs. The knob checks
(:func:`settings_of`) and the command line's flags and help (:func:`knob_table`, with one line of :data:`KNOB_HELP`
per knob) are built from it, so a new knob is a settings field, its help line, and the code that uses it.
:func:`run_config` builds a run's config next to the method, so the CLI and a Python caller of
:func:`latentseek.eval.runner.run_eval` record the same config and fingerprint.

Every method prompts with :func:`latentseek.eval.prompts.solver_messages` and judges its final answer against the gold
answer with :mod:`latentseek.eval.judge` (never with a reward: the oracle reward is LatentSeek's signal, not the verdict).
Every record (:mod:`latentseek.eval.record`) counts the tokens the model generated for the problem, the verifier's
included, so methods can be compared at equal compute, and the wall seconds spent on it (a batch's time is shared
equally by its problems, LatentSeek's per phase by the problems taking part in it).

Sampled candidates are seeded per problem id and candidate number, so a problem's samples do not depend on the
batch size, the problem's place in the batch, or the rank that solves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import torch

from ..chat import build_prompt_ids, question_text, stop_token_ids
from ..config import LatentSeekConfig
from ..context import ContextNeed, model_context_length
from ..errors import ConfigError
from ..generation import Picker, Sampler, check_sampling, extend, greedy_picker, sampling_picker
from ..loop import AnswerCallback, LatentSeek, Result
from ..model import ModelAdapter
from ..progress import enter_phase
from ..quant import weights_of
from ..rewards import (
    BOXED_FORMAT,
    BatchReward,
    ConfidenceReward,
    HiddenStateReward,
    OracleReward,
    RewardLike,
    SelfReward,
    as_reward,
    evaluate,
)
from ..slot import Slot, SlotConfig
from .data import Problem
from .judge import answers_match, extract_answer, is_equivalent
from .prompts import PromptStyle, solver_messages
from .record import (
    BestOfNRecord,
    LatentSeekRecord,
    Record,
    SelfConsistencyRecord,
    SlotRecord,
    check_types,
    type_hints,
)
from .storage import local_source

#: The rewards a method can be given by name; a reward object given instead is recorded as ``custom``.
RewardName = Literal["self", "oracle", "confidence"]
REWARDS: tuple[str, ...] = get_args(RewardName)
CUSTOM_REWARD = "custom"

#: Weight dtypes by the names the command line takes and run configs record.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Settings: each method's knobs with their types, defaults and checks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Settings:
    """Checks every field against its annotation (ConfigError), then the class's own rules (``_check``)."""

    def __post_init__(self) -> None:
        check_types(self, ConfigError)
        self._check()

    def _check(self) -> None:
        """Range checks; each class calls ``super()._check()`` first."""


@dataclass(frozen=True, kw_only=True)
class PromptSettings(_Settings):
    prompt: PromptStyle = "boxed"


@dataclass(frozen=True, kw_only=True)
class GenerationSettings(PromptSettings):
    """The knobs of a method that generates its answers directly (``cot``)."""

    max_new_tokens: int = LatentSeekConfig.max_new_tokens

    def _check(self) -> None:
        super()._check()
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True, kw_only=True)
class SamplingSettings(GenerationSettings):
    """Generation plus N sampled candidates (each method sets its own N)."""

    n_candidates: int
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    sampler: Sampler = "fused"

    def _check(self) -> None:
        super()._check()
        if self.n_candidates < 1:
            raise ConfigError(f"n_candidates must be >= 1, got {self.n_candidates}")
        try:
            check_sampling(self.temperature, self.top_p, self.sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from e


@dataclass(frozen=True, kw_only=True)
class RewardSettings(_Settings):
    """A reward by name (or a reward object, recorded as ``custom``) and the self-verification's length."""

    reward: RewardName | RewardLike = "self"
    verifier_max_new_tokens: int = 512

    def _check(self) -> None:
        super()._check()
        if self.verifier_max_new_tokens < 1:
            raise ConfigError(f"verifier_max_new_tokens must be >= 1, got {self.verifier_max_new_tokens}")


@dataclass(frozen=True, kw_only=True)
class BestOfNSettings(SamplingSettings, RewardSettings):
    n_candidates: int = 3  # as in the paper's baseline

    def _check(self) -> None:
        super()._check()
        if self.reward == "confidence":
            raise ConfigError("reward 'confidence' reads the hidden states of LatentSeek's loop: latentseek only")


@dataclass(frozen=True, kw_only=True)
class SelfConsistencySettings(SamplingSettings):
    # an odd number (fewer ties) that spends about the tokens of BoN-3 plus a couple of LatentSeek steps
    n_candidates: int = 5


@dataclass(frozen=True, kw_only=True)
class LatentSeekSettings(PromptSettings, RewardSettings):
    """The prompt, the reward, and the loop's :class:`~latentseek.config.LatentSeekConfig` (its fields are knobs)."""

    config: LatentSeekConfig = field(default_factory=LatentSeekConfig)


@dataclass(frozen=True, kw_only=True)
class SlotSettings(PromptSettings):
    """The prompt and SLOT's :class:`~latentseek.slot.SlotConfig` (its fields are knobs)."""

    config: SlotConfig = field(default_factory=SlotConfig)


def _is_nested(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) and isinstance(hint, type)


def _knob_fields(settings_type: type) -> list[tuple[str, Any, Any]]:
    """``(name, annotation, default)`` of every knob of a settings class, a nested dataclass's fields in its place."""
    hints = type_hints(settings_type)
    found = []
    for f in dataclasses.fields(settings_type):
        if _is_nested(hints[f.name]):
            found += _knob_fields(hints[f.name])
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            found.append((f.name, hints[f.name], default))
    return found


def _build(settings_type: type, knobs: Mapping[str, Any]) -> Any:
    hints = type_hints(settings_type)
    kwargs = {}
    for f in dataclasses.fields(settings_type):
        if _is_nested(hints[f.name]):
            mine = {g.name: knobs[g.name] for g in dataclasses.fields(hints[f.name]) if g.name in knobs}
            if mine:
                kwargs[f.name] = _build(hints[f.name], mine)
        elif f.name in knobs:
            kwargs[f.name] = knobs[f.name]
    return settings_type(**kwargs)


def flat_knobs(settings: Any) -> dict[str, Any]:
    """A settings object as knob name -> value, a nested dataclass's fields in its place."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            flat.update(flat_knobs(value))
        else:
            flat[f.name] = value
    return flat


def _reward_name(reward: str | RewardLike) -> str:
    return reward if isinstance(reward, str) else CUSTOM_REWARD


# ---------------------------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------------------------


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


def _judged(response: str, gold: str) -> dict[str, Any]:
    """The record fields of a final response: its extracted answer, the judge's verdict, the text."""
    return {"prediction": extract_answer(response), "correct": answers_match(response, gold), "response": response}


class MethodBase:
    """What the methods share: the model, the settings, the prompt, and the knobs recorded in the run's config.

    ``MethodClass(model, tokenizer, **settings)``: `settings` are the fields of the class's ``settings_type`` (unset ones
    keep their defaults), checked before the model is touched.
    """

    name: str = "method"
    settings_type: ClassVar[type[_Settings]] = PromptSettings

    def __init__(self, model: torch.nn.Module | ModelAdapter, tokenizer, **settings: Any) -> None:
        self.settings = self.settings_type(**settings)
        self.adapter = ModelAdapter.of(model)
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, self.adapter)

    @property
    def knobs(self) -> dict[str, Any]:
        """The settings that decide this method's records (the run config's ``knobs``), flat.

        A reward object is recorded as ``custom``; ``verifier_max_new_tokens`` only with the self reward, the one
        that uses it.
        """
        knobs = flat_knobs(self.settings)
        if "reward" in knobs:
            knobs["reward"] = _reward_name(knobs["reward"])
            if knobs["reward"] != "self":
                del knobs["verifier_max_new_tokens"]
        return knobs

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return solver_messages(problem.question, self.settings.prompt, problem.answer_kind)

    def solve_batch(self, problems: Sequence[Problem]) -> list[Record]:
        """One record per problem, in order."""
        raise NotImplementedError

    def _seconds(self, t0: float, problems: Sequence[Problem]) -> float:
        _sync(self.adapter)
        return (time.perf_counter() - t0) / len(problems)

    def _make_reward(self) -> BatchReward | HiddenStateReward:
        """The reward of ``settings.reward``: self-verification (with the boxed format rule for the boxed prompt),
        the gold answer, the answer's confidence (LatentSeek only), or the reward object given."""
        reward, settings = self.settings.reward, self.settings
        if not isinstance(reward, str):
            return as_reward(reward)
        if reward == "self":
            rule = BOXED_FORMAT if settings.prompt == "boxed" else None
            return SelfReward(
                self.adapter, self.tokenizer, max_new_tokens=settings.verifier_max_new_tokens, format_rule=rule
            )
        if reward == "confidence":
            return ConfidenceReward(self.adapter, impl=settings.config.impl)
        return OracleReward(answers_match)


class _Generating(MethodBase):
    """A method that generates its answers directly, greedy or sampled."""

    settings_type: ClassVar[type[_Settings]] = GenerationSettings

    def _generate(self, prompts: list[list[int]], picker: Picker) -> list[list[int]]:
        rows = [(None, p) for p in prompts]
        return extend(self.adapter, rows, self.settings.max_new_tokens, self.stop_ids, picker=picker).tokens

    def _prompt_ids(self, problems: Sequence[Problem]) -> list[list[int]]:
        """Each problem's prompt ids, checked against the model's context before any model work: a problem whose
        prompt plus ``max_new_tokens`` does not fit raises :class:`~latentseek.errors.ContextLengthError` naming its
        index in the batch (the runner then records it as skipped)."""
        prompts = [build_prompt_ids(self.tokenizer, self.messages(p)) for p in problems]
        context = model_context_length(self.adapter, self.tokenizer)
        for i, ids in enumerate(prompts):
            need = ContextNeed("prompt", len(ids), self.settings.max_new_tokens, context, "max_new_tokens")
            need.check(i, "shorten the question or lower --max-new-tokens")
        return prompts

    def _greedy(self, problems: Sequence[Problem]) -> list[list[int]]:
        return self._generate(self._prompt_ids(problems), greedy_picker())

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _sample(self, problems: Sequence[Problem], first: int) -> list[list[list[int]]]:
        """Candidates ``first .. n-1`` of every problem, sampled, all in one batch: ``[problem][candidate]``."""
        s = self.settings
        if s.n_candidates <= first:
            return [[] for _ in problems]
        prompts, seeds = [], []
        for p, ids in zip(problems, self._prompt_ids(problems), strict=True):
            for k in range(first, s.n_candidates):
                prompts.append(ids)
                seeds.append(row_seed(s.seed, p.id, k))
        picker = sampling_picker(s.temperature, s.top_p, s.seed, len(prompts), row_seeds=seeds, sampler=s.sampler)
        tokens = self._generate(prompts, picker)
        per = s.n_candidates - first
        return [tokens[i * per : (i + 1) * per] for i in range(len(problems))]


class CoT(_Generating):
    """Greedy chain of thought: one answer per problem, all problems of a batch in one generation."""

    name = "cot"

    def solve_batch(self, problems: Sequence[Problem]) -> list[Record]:
        t0 = time.perf_counter()
        enter_phase("generate", problems=len(problems))
        tokens = self._greedy(problems)
        seconds = self._seconds(t0, problems)
        return [
            Record(**_judged(self._decode(t), p.gold), tokens=len(t), seconds=seconds)
            for p, t in zip(problems, tokens, strict=True)
        ]


class BestOfN(_Generating):
    """Best-of-N: candidate 0 greedy, candidates 1..N-1 sampled; the best-rewarded one (earliest among equals).

    ``reward``: ``"self"`` (self-verification, with the boxed format rule for the boxed prompt), ``"oracle"`` (gold
    answer, an upper bound), or any reward object. Records: :class:`~latentseek.eval.record.BestOfNRecord`.
    """

    name = "bon"
    settings_type = BestOfNSettings

    def __init__(self, model: torch.nn.Module | ModelAdapter, tokenizer, **settings: Any) -> None:
        super().__init__(model, tokenizer, **settings)
        self.reward = self._make_reward()

    def solve_batch(self, problems: Sequence[Problem]) -> list[BestOfNRecord]:
        n = self.settings.n_candidates
        t0 = time.perf_counter()
        enter_phase("generate", problems=len(problems))
        greedy = self._greedy(problems)
        sampled = self._sample(problems, first=1)
        candidates = [[g, *s] for g, s in zip(greedy, sampled, strict=True)]
        texts = [[self._decode(t) for t in c] for c in candidates]
        flat_q = [question_text(self.messages(p)) for p in problems for _ in range(n)]
        flat_a = [t for ts in texts for t in ts]
        flat_g = [p.gold for p in problems for _ in range(n)]
        enter_phase("reward", problems=len(problems))
        scores = evaluate(self.reward, flat_q, flat_a, flat_g)
        seconds = self._seconds(t0, problems)
        records = []
        for i, p in enumerate(problems):
            mine = scores[i * n : (i + 1) * n]
            values = [s.value for s in mine]
            chosen = max(range(n), key=lambda k: (values[k], -k))
            verifier = sum(int(s.details.get("verifier_tokens", 0)) for s in mine)
            records.append(
                BestOfNRecord(
                    **_judged(texts[i][chosen], p.gold),
                    tokens=sum(len(t) for t in candidates[i]) + verifier,
                    seconds=seconds,
                    rewards=[values[chosen]],
                    candidate_rewards=values,
                    chosen=chosen,
                    verifier_tokens=verifier,
                )
            )
        return records


class SelfConsistency(_Generating):
    """Self-consistency: N sampled answers, majority vote of their final answers (see :func:`majority_vote`).

    Records: :class:`~latentseek.eval.record.SelfConsistencyRecord`.
    """

    name = "self-consistency"
    settings_type = SelfConsistencySettings

    def solve_batch(self, problems: Sequence[Problem]) -> list[SelfConsistencyRecord]:
        t0 = time.perf_counter()
        enter_phase("generate", problems=len(problems))
        samples = self._sample(problems, first=0)
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
                SelfConsistencyRecord(
                    prediction=winner,
                    correct=winner is not None and is_equivalent(winner, p.gold),
                    response=response,
                    tokens=sum(len(t) for t in tokens),
                    seconds=seconds,
                    answers=answers,
                    votes=votes,
                )
            )
        return records


class LatentSeekMethod(MethodBase):
    """LatentSeek (:class:`~latentseek.loop.LatentSeek`) on the solver prompt.

    ``reward``: ``"self"`` (self-verification, with the boxed format rule for the boxed prompt), ``"oracle"``
    (0 when the answer matches the gold answer, else -1), or any reward object; ``config``: the loop's
    :class:`~latentseek.config.LatentSeekConfig`. Records: :class:`~latentseek.eval.record.LatentSeekRecord`
    (``correct`` is the judge's verdict on the returned answer, never the reward).
    """

    settings_type = LatentSeekSettings

    def __init__(self, model: torch.nn.Module | ModelAdapter, tokenizer, **settings: Any) -> None:
        super().__init__(model, tokenizer, **settings)
        self.reward_name = _reward_name(self.settings.reward)
        self.engine = LatentSeek(self.adapter, tokenizer, self._make_reward(), self.settings.config)
        self.name = f"latentseek-{self.reward_name}"

    @property
    def config(self) -> LatentSeekConfig:
        return self.settings.config

    @property
    def knobs(self) -> dict[str, Any]:
        """:attr:`MethodBase.knobs`, without ``seed`` when ``samples`` is 1 (nothing is sampled then)."""
        knobs = super().knobs
        if knobs["samples"] == 1:
            del knobs["seed"]
        return knobs

    def seek(self, problems: Sequence[Problem], on_answer: AnswerCallback | None = None) -> list[Result]:
        """The LatentSeek results of the problems (an empty gold answer is passed as none)."""
        return self.engine.solve_batch(
            [self.messages(p) for p in problems], [p.gold or None for p in problems], on_answer=on_answer
        )

    def solve_batch(self, problems: Sequence[Problem]) -> list[LatentSeekRecord]:
        records = []
        for p, r in zip(problems, self.seek(problems), strict=True):
            spent = [int(d.get("verifier_tokens", 0)) for d in r.scored_details]
            verifier = sum(spent)
            step_tokens = [g + sum(spent[:n]) for g, n in zip(r.generated_by_step, r.scored_by_step, strict=True)]
            records.append(
                LatentSeekRecord(
                    **_judged(r.final_answer, p.gold),
                    tokens=r.generated_tokens + verifier,
                    seconds=r.total_time,
                    iterations=r.steps,
                    rewards=list(r.rewards),
                    initial_prediction=extract_answer(r.initial_answer),
                    initial_correct=answers_match(r.initial_answer, p.gold),
                    initial_response=r.initial_answer,
                    final_index=r.final_index,
                    update_length=r.update_length,
                    solved=r.solved,
                    generated_tokens=r.generated_tokens,
                    verifier_tokens=verifier,
                    step_predictions=[extract_answer(a) for a in r.answers],
                    sample_rewards=r.sample_rewards,
                    step_tokens=step_tokens,
                )
            )
        return records


class SlotMethod(MethodBase):
    """SLOT (:class:`~latentseek.slot.Slot`) on the solver prompt, each problem with its own delta.

    Records: :class:`~latentseek.eval.record.SlotRecord` (``iterations`` = the steps on delta, ``tokens`` = the
    answer's; the prompt is read once, as for every method).
    """

    name = "slot"
    settings_type = SlotSettings

    def __init__(self, model: torch.nn.Module | ModelAdapter, tokenizer, **settings: Any) -> None:
        super().__init__(model, tokenizer, **settings)
        self.engine = Slot(self.adapter, tokenizer, self.settings.config)

    def solve_batch(self, problems: Sequence[Problem]) -> list[SlotRecord]:
        results = self.engine.solve_batch([self.messages(p) for p in problems])
        return [
            SlotRecord(
                **_judged(r.answer, p.gold),
                tokens=r.generated_tokens,
                seconds=r.total_time,
                iterations=len(r.losses),
                prompt_losses=r.losses,
                delta_norm=float(r.delta.norm()),
                optimise_seconds=r.time["prompt"] + r.time["optimise"],
            )
            for p, r in zip(problems, results, strict=True)
        ]


# ---------------------------------------------------------------------------------------------------------------
# The table, the knob checks, the command line's view of the knobs, and the run config
# ---------------------------------------------------------------------------------------------------------------

#: Every method by the name ``--method`` takes.
METHOD_TABLE: dict[str, type[MethodBase]] = {
    "cot": CoT,
    "bon": BestOfN,
    "self-consistency": SelfConsistency,
    "latentseek": LatentSeekMethod,
    "slot": SlotMethod,
}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)

#: One line of help per knob, for ``--help`` (the defaults are added from the settings classes).
KNOB_HELP: dict[str, str] = {
    "prompt": "solver prompt style",
    "max_new_tokens": "most tokens per answer / continuation",
    "reward": "self-verification, the gold answer, or (latentseek) the answer's own confidence",
    "verifier_max_new_tokens": "most tokens per self-verification",
    "n_candidates": "candidates (bon) / samples (self-consistency)",
    "temperature": "sampling temperature",
    "top_p": "sampling nucleus mass",
    "seed": "sampling seed (latentseek: of the --samples draws)",
    "sampler": "draw samples from the logits, or through the fused LM-head op without them (top-p read from its "
    "top-32 log-probs)",
    "rho": "fraction of the answer's latents optimised",
    "lr": "Adam learning rate on the latents (latentseek) / on delta (slot)",
    "steps": "AdamW steps on each problem's delta over its prompt",
    "max_steps": "most optimiser steps",
    "samples": "prefixes drawn from the latents per step (1: the paper's argmax; K > 1: REINFORCE, mean baseline)",
    "reward_threshold": "stop once the reward is above this",
    "start_index": "first answer token whose latent is optimised",
    "grad_clip": "clip each problem's gradient to this L2 norm",
    "keep_best": "return the best-rewarded answer, not the last",
    "impl": "fused LM-head op",
    "context_policy": "a problem longer than the model's context: error, or cut the question's middle, or clamp "
    "max_new_tokens",
    "decode": "decode steps: eager, graph (static shapes, captured in CUDA graphs on CUDA) or compiled "
    "(torch.compile, CPU); unset: the device's",
}


def _method_type(name: str) -> type[MethodBase]:
    if name not in METHOD_TABLE:
        raise ConfigError(f"method must be one of {METHODS}, got {name!r}")
    return METHOD_TABLE[name]


def settings_of(name: str, knobs: Mapping[str, Any]) -> _Settings:
    """The settings of method `name` from flat knobs (a knob set to None keeps its default).

    Raises ConfigError (a ValueError) for an unknown method, a knob the method does not use (``--rho`` with ``cot``
    is a mistake, not a no-op), or a value its checks refuse; nothing is loaded, so this is cheap.
    """
    settings_type = _method_type(name).settings_type
    given = {k: v for k, v in knobs.items() if v is not None}
    unused = sorted(given.keys() - {knob for knob, _, _ in _knob_fields(settings_type)})
    if unused:
        raise ConfigError(f"method {name!r} does not use {', '.join(unused)}")
    return _build(settings_type, given)


def check_knobs(name: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs that are set (not None), after :func:`settings_of` checked them."""
    settings_of(name, knobs)
    return {k: v for k, v in knobs.items() if v is not None}


def make_method(name: str, model: torch.nn.Module | ModelAdapter, tokenizer, **knobs: Any) -> MethodBase:
    """The method called `name` (one of :data:`METHODS`) with its flat knobs; a knob set to None keeps its default.

    Knobs: ``prompt`` for all; ``max_new_tokens`` for all (LatentSeek's is a :class:`LatentSeekConfig` field);
    ``n_candidates``, ``temperature``, ``top_p``, ``seed`` for ``bon`` and ``self-consistency``; ``reward``
    (``self`` / ``oracle``, or a reward object) and ``verifier_max_new_tokens`` for ``bon`` and ``latentseek``; the
    :class:`~latentseek.config.LatentSeekConfig` fields for ``latentseek``; the :class:`~latentseek.slot.SlotConfig`
    fields for ``slot``. See :func:`settings_of` for the checks.
    """
    settings = settings_of(name, knobs)
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return METHOD_TABLE[name](model, tokenizer, **fields)


@dataclass(frozen=True)
class Knob:
    """A knob as the command line offers it (``--name-with-dashes``), for the methods that use it."""

    name: str
    type: type  # int, float or str; bool for a flag that sets True
    choices: tuple[str, ...] | None
    help: str
    defaults: dict[str, Any]  # method name -> its default, for each method that uses the knob

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _cli_form(name: str, hint: Any) -> tuple[type, tuple[str, ...] | None]:
    """The command-line type and choices of an annotation; a union is given as its first arm that is not None."""
    if get_origin(hint) in (Union, type(int | None)):
        return _cli_form(name, next(arm for arm in get_args(hint) if arm is not type(None)))
    if get_origin(hint) is Literal:
        return str, get_args(hint)
    if hint in (bool, int, float, str):
        return hint, None
    raise TypeError(f"knob {name!r} has type {hint!r}, which has no command-line form")


def knob_table(methods: Sequence[str] = METHODS) -> list[Knob]:
    """Every knob of `methods`, in the order the table first declares it, with each method's default."""
    knobs: dict[str, Knob] = {}
    for method in methods:
        for name, hint, default in _knob_fields(_method_type(method).settings_type):
            kind, choices = _cli_form(name, hint)
            if name not in knobs:  # a knob without a help line still works (test_methods asks for the line)
                knobs[name] = Knob(name, kind, choices, KNOB_HELP.get(name, name.replace("_", " ")), {})
            elif (knobs[name].type, knobs[name].choices) != (kind, choices):
                raise TypeError(f"knob {name!r} has different types in different methods")
            if kind is bool and default is not False:
                raise TypeError(f"flag knob {name!r} must default to False (a flag can only set True)")
            knobs[name].defaults[method] = default
    return list(knobs.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The name :data:`DTYPES` gives `dtype` (its torch name for another dtype)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def run_config(
    method: MethodBase,
    *,
    model: str,
    dataset: str,
    gguf_file: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """The config of a run of `method` (its config.json), what ``latentseek eval`` records for the same run.

    Args:
        method: the method, with the model it was made with (its weights' dtype is recorded).
        model, gguf_file: what :func:`latentseek.load_model` was given (a local file or folder is recorded by its
            content, :func:`~latentseek.eval.storage.local_source`, not by its path).
        dataset, question_field, answer_field, id_field, split: what :func:`latentseek.eval.data.load_problems`
            was given (``limit`` is not part of a run's config; a local file by its name only: the runner checks
            each finished problem's gold answer against the data on resume, so the file may grow).

    The weights' dtype and their quantisation (:func:`latentseek.quant.weights_of`) are read from the method's model.
    """
    return {
        "model": local_source(model),
        "gguf_file": gguf_file,
        "dtype": dtype_name(next(method.adapter.model.parameters()).dtype),
        "weights": weights_of(method.adapter.model),
        "dataset": {
            "source": local_source(dataset, content=False),
            "question_field": question_field,
            "answer_field": answer_field,
            "id_field": id_field,
            "split": split,
        },
        "method": method.name,
        "knobs": method.knobs,
    }
