"""Progress within a batch: what the loop is doing (phase, step) and how many tokens it has generated so far.

A caller opens :func:`reporting` around a batch; inside it, :func:`~latentseek.generation.extend` (every generation,
a reward's verifier generations included) reports its tokens as it decodes, and the loop and the methods announce
their phases with :func:`enter_phase`. The callback gets a :class:`ProgressEvent` at every phase change and, while a
generation runs, at most every ``interval`` seconds; outside a :func:`reporting` block nothing is reported and the
decode loop pays one None check per step.

Example::

    with latentseek.progress.reporting(lambda e: print(e.describe())):
        seek.solve_batch(problems)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """Where a batch stands.

    Attributes:
        phase: what it is doing: ``"generate"``, ``"reward"`` or ``"update"`` (``""`` before the first phase).
        step: LatentSeek's optimiser steps taken so far by the problems in the phase (0 while the initial answer is
            made and rewarded, and during the first update); 0 for methods without steps.
        max_steps: the most steps a problem may take (0 for methods without steps).
        problems: problems taking part in the phase.
        tokens: tokens generated since :func:`reporting` began (every generation's, verifiers' included); never
            decreases.
        rows: rows of the running generation still decoding (0 between generations).
        elapsed: seconds since :func:`reporting` began.
    """

    phase: str
    step: int
    max_steps: int
    problems: int
    tokens: int
    rows: int
    elapsed: float

    def describe(self) -> str:
        """One line for a progress bar, e.g. ``step 2/10 · generate · 8 rows · 1,234 tok · 41 tok/s``."""
        parts = [f"step {self.step}/{self.max_steps}"] if self.max_steps else []
        parts.append(self.phase or "starting")
        if self.rows:
            parts.append(f"{self.rows} row" + ("s" if self.rows > 1 else ""))
        parts.append(f"{self.tokens:,} tok")
        if self.elapsed >= 1.0:
            parts.append(f"{self.tokens / self.elapsed:.0f} tok/s")
        return " · ".join(parts)


ProgressCallback = Callable[[ProgressEvent], None]

#: The default most seconds between two decode-progress events.
INTERVAL = 0.5


class _Tracker:
    """The state behind one :func:`reporting` block."""

    def __init__(self, callback: ProgressCallback, interval: float) -> None:
        self.callback = callback
        self.interval = interval
        self.start = time.monotonic()
        self.next = self.start + interval
        self.phase, self.step, self.max_steps, self.problems = "", 0, 0, 0
        self.finished_tokens = 0  # of the generations that have ended
        self.tokens = 0  # of the running generation
        self.rows = 0

    def emit(self, now: float) -> None:
        self.next = now + self.interval
        self.callback(
            ProgressEvent(
                phase=self.phase,
                step=self.step,
                max_steps=self.max_steps,
                problems=self.problems,
                tokens=self.finished_tokens + self.tokens,
                rows=self.rows,
                elapsed=now - self.start,
            )
        )

    def start_generation(self) -> Callable[[int, int], None]:
        self.finished_tokens += self.tokens
        self.tokens = self.rows = 0
        return self.decoded

    def decoded(self, tokens: int, rows: int) -> None:
        self.tokens, self.rows = tokens, rows
        now = time.monotonic()
        if now >= self.next:
            self.emit(now)


_current: ContextVar[_Tracker | None] = ContextVar("latentseek_progress", default=None)


@contextmanager
def reporting(callback: ProgressCallback, interval: float | None = None) -> Iterator[None]:
    """Reports the progress of the work inside the block to `callback` (see the module's docstring).

    Args:
        callback: gets each :class:`ProgressEvent`; it runs inside the decode loop, so it should return quickly.
        interval: the most seconds between two events while a generation runs (phase changes are reported at once);
            None: :data:`INTERVAL`.

    A nested block reports to its own callback until it ends.
    """
    interval = INTERVAL if interval is None else interval
    if interval < 0:
        raise ValueError(f"interval must be >= 0 seconds, got {interval}")
    token = _current.set(_Tracker(callback, interval))
    try:
        yield
    finally:
        _current.reset(token)


def enter_phase(name: str, *, problems: int, step: int = 0, max_steps: int = 0) -> None:
    """Announces that the batch enters phase `name` (with `problems` problems taking part); no-op outside
    :func:`reporting`."""
    tracker = _current.get()
    if tracker is None:
        return
    tracker.finished_tokens += tracker.tokens
    tracker.tokens = tracker.rows = 0
    tracker.phase, tracker.step, tracker.max_steps, tracker.problems = name, step, max_steps, problems
    tracker.emit(time.monotonic())


def decode_reporter() -> Callable[[int, int], None] | None:
    """For a generation loop: ``report(tokens generated so far by this generation, rows still decoding)`` to call
    after each decode step, or None outside :func:`reporting`."""
    tracker = _current.get()
    return None if tracker is None else tracker.start_generation()
