"""The runner: a method over problems into a run directory (:mod:`latentseek.eval.storage`), resumable and sharded.

It takes the directory's lock, refuses a run directory of another configuration, skips the problems already
finished, deals the others out over the ranks of a torchrun group, and writes one line per problem as soon as its
batch is done. Ctrl-C or SIGTERM stops after the batch in flight; a second signal stops at once.

Faults of one problem do not end the run. A batch that raises is solved again one problem at a time (a problem's
result does not depend on its batch) to find the problem at fault: a problem longer than the model's context
(ContextLengthError) is recorded as ``skipped``, one on which the method raised otherwise (a reward callable or
verifier) as ``failed`` with the error text, unless ``on_error="stop"``. A batch out of memory (CUDA or host) is
split in halves, down to one problem, and the smaller size is kept for the rest of the run. Errors of the user's
setup (:class:`latentseek.errors.LatentSeekError` other than ContextLengthError) and a method building or returning
records that break the schema still end the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from latentseek.errors import ConfigError, ContextLengthError, DatasetError, LatentSeekError, RunError
from latentseek.eval.data import Problem
from latentseek.eval.record import Record, RecordSchemaError, StoredRecord
from latentseek.eval.storage import (
    LOCK_FILE,
    RESULTS_FILE,
    RecordWriter,
    check_config,
    config_fingerprint,
    drop_records,
    load_records,
    merge_shards,
    shard_path,
    supersede,
    write_config,
)
from latentseek.progress import ProgressEvent, reporting


class Method(Protocol):
    """What the runner runs: a batch of problems in, one :class:`Record` per problem out, in the same order."""

    def solve_batch(self, problems: Sequence[Problem]) -> Sequence[Record]: ...


# ---------------------------------------------------------------------------------------------------------------
# Processes and signals
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a multi-process run (rank 0 of 1 for a plain run)."""

    rank: int
    world_size: int
    local_rank: int


def init_distributed(backend: str | None = None) -> DistInfo:
    """Joins the torch.distributed group that torchrun describes in the environment (once; later calls just report).

    A process not started by torchrun (WORLD_SIZE unset or 1) is rank 0 of 1 and never imports torch.distributed.
    The backend defaults to NCCL on a CUDA machine (after selecting the GPU of LOCAL_RANK) and gloo elsewhere.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, local_rank=0)
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def _barrier(dist_info: DistInfo) -> bool:
    """Waits for all ranks; False when the group is broken (a rank died), so the caller can skip shared work."""
    if dist_info.world_size == 1:
        return True
    import torch.distributed as dist

    try:
        dist.barrier()
    except Exception as e:  # gloo and NCCL report a dead peer with several exception types
        print(f"[rank {dist_info.rank}] a process of the run is gone ({e}); skipping the merge", file=sys.stderr)
        return False
    return True


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the batch in flight.

    A second signal raises KeyboardInterrupt at once, losing only the batch in flight. Signal handlers can only be
    installed from the main thread; elsewhere signals keep their usual meaning.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after the batch in flight (again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    fd = os.open(run_dir / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"another process is running into {run_dir} ({LOCK_FILE} is locked)") from None
        yield
    finally:
        os.close(fd)  # also releases the lock; the kernel does the same for a killed process


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """How far a run has got on the problems it was given (over all ranks once merged)."""

    out_dir: Path
    total: int
    done: int
    correct: int
    interrupted: bool
    failed: int = 0  # records of problems the method raised on (counted in done, never correct)
    skipped: int = 0  # records of problems longer than the model's context (counted in done, never correct)
    batch_size: int | None = None  # the batch size the run settled on (smaller than asked after running out of memory)

    @property
    def accuracy(self) -> float:
        """Correct over done: failed and skipped problems count as wrong."""
        return self.correct / self.done if self.done else float("nan")


def _check_batch(method: Method, batch: Sequence[Problem], records: Sequence[Record]) -> None:
    """Raises TypeError unless `records` holds one Record per problem of the batch (checked before any is written)."""
    if len(records) != len(batch):
        raise TypeError(
            f"{type(method).__name__}.solve_batch returned {len(records)} records for {len(batch)} problems"
        )
    for problem, record in zip(batch, records, strict=True):
        if not isinstance(record, Record):
            raise TypeError(
                f"problem {problem.id}: {type(method).__name__}.solve_batch returned a {type(record).__name__}, "
                "expected a latentseek.eval.record.Record"
            )


#: What a problem the method raises on becomes: a ``failed`` record (the run goes on), or the end of the run.
OnError = Literal["record", "stop"]
ON_ERROR: tuple[str, ...] = ("record", "stop")


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError))


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


class _Solver:
    """Solves a batch with the method, isolating the faults of single problems (see the module's docstring)."""

    def __init__(self, method: Method, batch_size: int, on_error: OnError) -> None:
        self.method = method
        self.batch_size = batch_size  # lowered, never raised, when a batch runs out of memory
        self.on_error = on_error

    def solve(self, batch: Sequence[Problem]) -> list[Record]:
        records: list[Record] = []
        start = 0
        while start < len(batch):
            part = batch[start : start + self.batch_size]
            records += self._solve(part)
            start += len(part)
        return records

    def _solve(self, batch: Sequence[Problem]) -> list[Record]:
        started = time.perf_counter()
        try:
            records = self.method.solve_batch(batch)
        except ContextLengthError as e:
            if len(batch) == 1:
                return [Record.unsolved("skipped", str(e), time.perf_counter() - started)]
            fault = "one by one"
        except (LatentSeekError, RecordSchemaError):  # the user's setup, or a bug of the method: not one problem's
            raise
        except Exception as e:
            if _is_out_of_memory(e) and len(batch) > 1:
                fault = "split"
            elif len(batch) == 1:
                if self.on_error == "stop":
                    raise RunError(
                        f"problem {batch[0].id}: the method raised {_one_line(e)}; stopped (--on-error stop); "
                        "the records written before are kept and a rerun resumes"
                    ) from e
                return [Record.unsolved("failed", _one_line(e), time.perf_counter() - started)]
            else:
                fault = "one by one"
        else:
            _check_batch(self.method, batch, records)
            return list(records)
        # Here, outside the except clause, the exception and the tensors its frames hold are released.
        if fault == "split":
            self.batch_size = min(self.batch_size, (len(batch) + 1) // 2)
            _release_memory()
            return self.solve(batch)
        return [record for problem in batch for record in self._solve([problem])]


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: On a stream that is not a terminal (a CI log), the most seconds between two progress lines.
LINE_INTERVAL = 30.0
#: The most seconds between two redraws of the bar for progress within a batch.
BAR_INTERVAL = 0.5


class _Display:
    """The run's progress on stderr: problems finished, and within the batch in flight the method's phase, step and
    tokens (:mod:`latentseek.progress`), so that a slow batch can be told from a hung one.

    On a terminal, a tqdm bar (one per rank under torchrun). Elsewhere (a CI log) plain lines: the first news at once,
    then at most one line every :data:`LINE_INTERVAL` seconds, and one at the end; each rank writes its own.
    """

    def __init__(self, total: int, done: int, correct: int, batches: int, dist_info: DistInfo, label: str) -> None:
        from tqdm.auto import tqdm

        self.total, self.done, self.correct, self.batches = total, done, correct, batches
        self.label = f"{label} [rank {dist_info.rank}/{dist_info.world_size}]" if dist_info.world_size > 1 else label
        self.batch = 0
        self.event: ProgressEvent | None = None
        self.next_draw = 0.0
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=done, desc=self.label, unit="problem", position=dist_info.rank)

    def status(self) -> str:
        parts = [f"acc {self.correct}/{self.done} = {self.correct / self.done:.1%}"] if self.done else []
        if self.batch:
            parts.append(f"batch {self.batch}/{self.batches}")
        if self.event is not None:
            parts.append(self.event.describe())
        return " · ".join(parts)

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_draw:
            return
        if self.bar is not None:
            self.next_draw = now + BAR_INTERVAL
            self.bar.set_postfix_str(self.status())
        else:
            self.next_draw = now + LINE_INTERVAL
            line = " · ".join(filter(None, [f"{self.label}: {self.done}/{self.total} problems", self.status()]))
            print(line, file=sys.stderr, flush=True)

    def start_batch(self) -> None:
        self.batch += 1
        self.event = None
        if self.bar is not None:  # a line waits for news: the batch's first phase, or a problem done
            self.draw()

    def on_event(self, event: ProgressEvent) -> None:
        self.event = event
        self.draw()

    def finished(self, correct: bool) -> None:
        self.done += 1
        self.correct += correct
        if self.bar is not None:
            self.bar.update(1)
        self.draw()

    def close(self) -> None:
        self.event = None
        self.batch = 0
        self.draw(force=True)
        if self.bar is not None:
            self.bar.close()


def run_eval(
    method: Method,
    problems: Sequence[Problem],
    out_dir: str | Path,
    config: Mapping[str, Any],
    *,
    batch_size: int = 1,
    force: bool = False,
    progress: bool = True,
    on_error: OnError = "record",
    retry_failed: bool = False,
) -> RunSummary:
    """Solves the problems not yet in `out_dir` with `method`, one JSONL record each, and returns the summary.

    Resumes: problems whose id already has a record are skipped. A `config` other than the one the directory was
    made with raises ConfigMismatchError unless `force`, which moves the old results to superseded/ and starts over.
    Under torchrun (or after `init_distributed`), the unfinished problems are dealt out by rank, each rank writes
    its own shard, and rank 0 merges them into results.jsonl when all ranks are done.

    Ctrl-C or SIGTERM stops after the batch in flight (a second one stops at once) and the summary says
    ``interrupted``; a killed process loses at most the batch in flight.

    A problem the method raises on is recorded as ``failed`` (``on_error="record"``) or ends the run with RunError
    (``"stop"``); one longer than the model's context is recorded as ``skipped``. Failed and skipped problems count
    as finished: a rerun keeps them unless `retry_failed`. A batch out of memory is split in halves (the summary's
    ``batch_size`` is the size the run settled on). A results file that cannot be written raises RunError; the
    records written before it stay, and a rerun resumes after them.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error (--on-error) must be one of {ON_ERROR}, got {on_error!r}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(
            f"problem ids are not unique: {twice!r} appears more than once; give each problem its own id"
        )
    config_fingerprint(config)  # a config that is not plain JSON fails here, before anything is written
    dist_info = init_distributed()
    out = Path(out_dir)
    lead = dist_info.rank == 0
    if lead:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make the run directory {out}: {e.strerror or e}; choose another --out") from e
    _barrier(dist_info)
    with _run_lock(out) if lead else contextlib.nullcontext():
        start_over = check_config(out, config, force)  # every rank reads it, so every rank raises alike
        _barrier(dist_info)
        if lead:
            if start_over:
                supersede(out)
            write_config(out, config)
            if retry_failed:
                merge_shards(out, ids)
                drop_records(out, {r.id for r in load_records(out) if r.record.status != "ok"})
        _barrier(dist_info)
        finished = {r.id: r for r in load_records(out)}
        _barrier(dist_info)  # all ranks know what was finished before any rank adds to it
        changed = [p.id for p in problems if p.id in finished and finished[p.id].gold != p.gold]
        if changed:
            raise RunError(f"{out}: the gold answer of {len(changed)} finished problem(s) changed, e.g. {changed[0]}")

        todo = [p for p in problems if p.id not in finished]
        mine = todo[dist_info.rank :: dist_info.world_size]
        prior = [finished[i] for i in ids if i in finished] if lead else []
        done, correct = len(prior), sum(r.record.correct for r in prior)
        path = out / RESULTS_FILE if dist_info.world_size == 1 else shard_path(out, dist_info.rank)
        interrupted = False
        batches = -(-len(mine) // batch_size)
        display = _Display(done + len(mine), done, correct, batches, dist_info, out.name) if progress else None
        solver = _Solver(method, batch_size, on_error)
        try:
            with StopRequest() as stop, RecordWriter(path) as writer:
                for start in range(0, len(mine), batch_size):
                    batch = mine[start : start + batch_size]
                    if display is None:
                        records = solver.solve(batch)
                    else:
                        display.start_batch()
                        with reporting(display.on_event):
                            records = solver.solve(batch)
                    for problem, record in zip(batch, records, strict=True):
                        writer.append(StoredRecord(problem.id, problem.gold, record).to_json())
                        if display is not None:
                            display.finished(record.correct)
                    if stop.requested and start + batch_size < len(mine):
                        interrupted = True
                        break
        finally:
            if display is not None:
                display.close()

        if _barrier(dist_info) and lead:
            merge_shards(out, ids)
        _barrier(dist_info)
    wanted = set(ids)
    records = [r for r in load_records(out) if r.id in wanted]
    return RunSummary(
        out_dir=out,
        total=len(problems),
        done=len(records),
        correct=sum(r.record.correct for r in records),
        interrupted=interrupted,
        failed=sum(r.record.status == "failed" for r in records),
        skipped=sum(r.record.status == "skipped" for r in records),
        batch_size=solver.batch_size,
    )
