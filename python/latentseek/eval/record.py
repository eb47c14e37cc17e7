"""The evaluation contract's record: what a method returns for one problem, and what a line of results.jsonl holds.

A method's ``solve_batch`` returns one :class:`Record` per problem: :class:`BestOfNRecord`,
:class:`SelfConsistencyRecord`, :class:`LatentSeekRecord` and :class:`SlotRecord` add the fields of their methods,
and any method may add free-form ``extras``. The runner writes each as one JSON line after the problem's ``id``
and ``gold`` answer (:class:`StoredRecord`); the fields come in declaration order, then the extras, all at the top
level of the line.

The field annotations are the schema: a record is checked against them when it is built (a method with a bug fails
before anything is written), and a line is checked again when it is read back. Reading picks the record class whose
fields the line has (a LatentSeek line reads back as a :class:`LatentSeekRecord`); the fields of no class go to
``extras``. A field with a default may be absent from a line.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

#: Fields the runner writes into every line; a record may not carry them.
RUNNER_FIELDS = ("id", "gold")

#: What became of a problem: solved (``ok``, whether right or wrong), ``failed`` (the method raised on it, e.g. a
#: reward callable or verifier; ``error`` holds the text) or ``skipped`` (it cannot fit the model's context).
Status = Literal["ok", "failed", "skipped"]
STATUSES: tuple[str, ...] = get_args(Status)


# ---------------------------------------------------------------------------------------------------------------
# Checking a dataclass against its annotations (records here, the methods' settings in latentseek.eval.methods)
# ---------------------------------------------------------------------------------------------------------------


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` has the type an annotation describes (a bool is no int or float; an int is a float)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(conforms(value, arm) for arm in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, Mapping)
    if origin is collections.abc.Callable:
        return callable(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """An annotation in words, for error messages: ``one of ('self', 'oracle') or a callable``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is None or hint is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arm) for arm in args)
    if origin is Literal:
        return f"one of {args}"
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is collections.abc.Callable:
        return "a callable"
    return getattr(hint, "__name__", str(hint))


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (its module's names, under ``from __future__ import annotations``)."""
    return get_type_hints(cls)


def check_types(obj: Any, error: type[Exception] = ValueError) -> None:
    """Raises `error` for the first dataclass field of `obj` whose value does not conform to its annotation."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not conforms(value, hints[f.name]):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise error(f"{type(obj).__name__}.{f.name} must be {describe(hints[f.name])}, got {shown}")


# ---------------------------------------------------------------------------------------------------------------
# The records
# ---------------------------------------------------------------------------------------------------------------


class RecordSchemaError(ValueError):
    """A record that breaks the schema: a bug of the method that built it (the runner never records it as a
    failed problem), or a results line that does not fit."""


@dataclass(frozen=True, kw_only=True)
class Record:
    """One problem's result, as every method returns it (the fields every line of results.jsonl has)."""

    prediction: str | None  # the extracted final answer; None when the response has none
    correct: bool  # the judge's verdict against the gold answer (never a reward)
    response: str | None = None  # the text the prediction was extracted from
    tokens: int  # tokens generated for the problem, over all samples, steps and self-verifications
    seconds: float  # wall seconds spent on the problem (its share of a batch)
    iterations: int = 0  # optimisation steps taken (0 for methods without any)
    rewards: list[float] = field(default_factory=list)  # reward per iteration, the initial answer first
    extras: Mapping[str, Any] = field(default_factory=dict)  # further fields, written beside the others
    status: Status = "ok"  # failed and skipped records are written by the runner, counted wrong by the report
    error: str | None = None  # why a problem failed or was skipped (one line); None when ok

    #: Every record class, base first: reading picks among them (see `from_json`).
    kinds: ClassVar[list[type[Record]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Record.kinds.append(cls)

    def __post_init__(self) -> None:
        check_types(self, RecordSchemaError)
        if (self.status == "ok") != (self.error is None):
            raise RecordSchemaError(
                f"{type(self).__name__}.error must be given exactly when status is not 'ok', got "
                f"status {self.status!r} and error {self.error!r}"
            )
        names = {f.name for f in dataclasses.fields(self)}
        for key in self.extras:
            if not isinstance(key, str) or key in names or key in RUNNER_FIELDS:
                raise RecordSchemaError(
                    f"{type(self).__name__}.extras may not hold {key!r}: extras are further fields, not "
                    f"{'a field of the record' if key in names else 'the runner fields ' + str(RUNNER_FIELDS)}"
                )

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object: its fields in declaration order, then the extras.

        ``status`` and ``error`` are left out of an ``ok`` record, so its line is what it was before they existed.
        """
        omitted = {"extras"} | ({"status", "error"} if self.status == "ok" else set())
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in omitted}
        return {**data, **self.extras}

    @classmethod
    def unsolved(cls, status: Status, error: str, seconds: float = 0.0) -> Record:
        """The record the runner writes for a problem that failed or was skipped: no answer, counted wrong."""
        if status == "ok":
            raise ValueError("Record.unsolved is for status 'failed' or 'skipped', got 'ok'")
        return Record(prediction=None, correct=False, tokens=0, seconds=seconds, status=status, error=error)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        """The record a JSON object holds (the runner fields excluded); ValueError when it breaks the schema.

        On :class:`Record` itself this picks the record class with the most fields among those whose required
        fields are all there; on a subclass it reads that class. Keys of no field go to ``extras``.
        """
        kind = cls
        if cls is Record:
            fitting = [k for k in Record.kinds if _required(k) <= data.keys()]
            kind = max(fitting, key=lambda k: len(dataclasses.fields(k)), default=Record)
        names = {f.name for f in dataclasses.fields(kind)} - {"extras"}
        missing = sorted(_required(kind) - data.keys())
        if missing:
            raise ValueError(f"{kind.__name__} has no {', '.join(map(repr, missing))} field")
        extras = {k: v for k, v in data.items() if k not in names and k not in RUNNER_FIELDS}
        return kind(**{k: v for k, v in data.items() if k in names}, extras=extras)


def _required(kind: type[Record]) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


Record.kinds.append(Record)


@dataclass(frozen=True, kw_only=True)
class BestOfNRecord(Record):
    """Best-of-N: ``rewards`` holds the chosen candidate's reward."""

    candidate_rewards: list[float]  # every candidate's reward, in candidate order (0 is the greedy one)
    chosen: int  # the index of the candidate that is the answer
    verifier_tokens: int  # tokens the self-verification generated (part of `tokens`)


@dataclass(frozen=True, kw_only=True)
class SelfConsistencyRecord(Record):
    """Self-consistency: ``response`` is the first sample that gives the winning answer."""

    answers: list[str | None]  # each sample's extracted answer
    votes: int  # how many samples gave the winning answer (equivalent answers count together)


@dataclass(frozen=True, kw_only=True)
class LatentSeekRecord(Record):
    """LatentSeek: ``iterations`` are optimiser steps, ``rewards`` the reward history (initial answer first)."""

    initial_prediction: str | None  # the greedy answer LatentSeek starts from (CoT inside LatentSeek), extracted
    initial_correct: bool  # ... and the judge's verdict on it
    initial_response: str  # ... and its text
    final_index: int  # which of the answers is returned
    update_length: int  # L, the number of optimised latents
    solved: bool  # the returned answer's reward is above the threshold
    generated_tokens: int  # tokens of the answers and continuations
    verifier_tokens: int  # tokens of the self-verification (generated_tokens + verifier_tokens = tokens)
    # The extracted answer of every answer, the initial one first (len = iterations + 1), so that the report can
    # judge the answer the loop would have returned under any smaller step budget. Empty in runs recorded before
    # the field existed.
    step_predictions: list[str | None] = field(default_factory=list)
    # With --samples K > 1, the K draws' rewards of each step (rewards[i] is the best of sample_rewards[i - 1]);
    # empty for K = 1.
    sample_rewards: list[list[float]] = field(default_factory=list)
    # `tokens` as they stood when each answer was complete (answers, continuations and verifications so far), so
    # that the report can put the step budget on a token axis. Empty in runs recorded before the field existed.
    step_tokens: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """As :meth:`Record.to_json`; an empty ``step_predictions``, ``sample_rewards`` or ``step_tokens`` (an older
        record, or K = 1) is left out, so its line writes back unchanged."""
        data = super().to_json()
        for name in ("step_predictions", "sample_rewards", "step_tokens"):
            if not data[name]:
                del data[name]
        return data


@dataclass(frozen=True, kw_only=True)
class SlotRecord(Record):
    """SLOT: ``iterations`` are its optimiser steps on delta; ``rewards`` stays empty (SLOT uses no reward)."""

    prompt_losses: list[float]  # the prompt's mean next-token loss at the delta each step started from (delta 0 first)
    delta_norm: float  # the L2 norm of the problem's fitted delta
    optimise_seconds: float  # the part of `seconds` spent reading the prompt and fitting delta (the rest: generating)


@dataclass(frozen=True)
class StoredRecord:
    """A line of results.jsonl: the problem's ``id`` and ``gold`` answer (from the runner) and the method's record."""

    id: str
    gold: str
    record: Record

    def __post_init__(self) -> None:
        if not isinstance(self.record, Record):
            raise ValueError(f"StoredRecord.record must be a Record, got {type(self.record).__name__}")
        for name in RUNNER_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"StoredRecord.{name} must be str, got {getattr(self, name)!r}")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "gold": self.gold, **self.record.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredRecord:
        """The line a JSON object holds; ValueError when it breaks the schema."""
        missing = [name for name in RUNNER_FIELDS if name not in data]
        if missing:
            raise ValueError(f"the line has no {', '.join(map(repr, missing))} field")
        return cls(id=data["id"], gold=data["gold"], record=Record.from_json(data))
