"""Evaluation runs on disk, and the runner that fills them.

A run directory ``runs/NAME/`` holds

- ``config.json``: ``{"fingerprint": ..., "config": {...}}``, everything that decides what a record contains (model,
  method, its knobs, data set, prompt style). Which problems to run (``--limit``) and how many processes run them
  are not part of it, so a run can be extended or resumed with other values.
- ``results.jsonl``: one JSON object per finished problem, in problem order. Each line is written with a single
  ``write`` and then ``fsync``-ed, so a killed process leaves at most one incomplete last line, which readers drop
  and the next writer truncates away.
- ``shards/rank{R}.jsonl`` while a multi-process run is going: rank R's records. Rank 0 merges them into
  ``results.jsonl`` at the end; readers also read shards left behind by a killed multi-process run.
- ``run.lock``: held (``flock``) by the process that writes, so two runs cannot write the same directory.

A record is ``{"id", "gold"}`` from the runner plus what the method returns: at least the fields of
`RECORD_FIELDS`, and any method-specific ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from latentseek.errors import RunError
from latentseek.eval.data import Problem

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
SHARD_DIR = "shards"
LOCK_FILE = "run.lock"
SUPERSEDED_DIR = "superseded"

_NUMBER = (int, float)

# Fields every method must return for each problem, with the types they must have.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "prediction": (str, type(None)),  # the extracted final answer; None when the response has none
    "correct": (bool,),  # judged against the gold answer
    "tokens": (int,),  # tokens generated for this problem, over all samples and iterations
    "seconds": _NUMBER,  # wall time spent on this problem (its share of a batch)
    "iterations": (int,),  # optimisation steps taken (0 for methods without any)
    "rewards": (list,),  # reward per iteration, the initial answer first; empty for methods without a reward
}
# Fields the runner writes into every record; a method may not contradict them.
RUNNER_FIELDS = ("id", "gold")


class Method(Protocol):
    """What the runner runs: a batch of problems in, one record per problem out, in the same order."""

    def solve_batch(self, problems: Sequence[Problem]) -> list[dict[str, Any]]: ...


class ConfigMismatchError(RunError):
    """The run directory holds results of another configuration."""


# ---------------------------------------------------------------------------------------------------------------
# JSONL records
# ---------------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # numpy and torch scalars and arrays, which methods produce naturally
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"record value of type {type(value).__name__} is not JSON serialisable")


def record_line(record: Mapping[str, Any]) -> bytes:
    """One record as one JSONL line (no newlines inside, ending in one)."""
    return (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")


def _parse_lines(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records in JSONL bytes, and the byte length of the complete, valid prefix they come from.

    An incomplete last line (no newline: the writer died mid-line) or an unreadable last line (a torn write) is
    dropped; an unreadable line anywhere else is corruption and an error.
    """
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    valid_end = 0
    for line_no, line in enumerate(complete, 1):
        end = valid_end + len(line) + 1
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if line_no == len(complete) and not tail:
                    break
                raise RunError(f"{path}:{line_no}: unreadable record ({e}); the file is corrupt") from e
            records.append(record)
        valid_end = end
    return records, valid_end


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a JSONL file that may still be written to, or may end in a torn line."""
    path = Path(path)
    if not path.exists():
        return []
    return _parse_lines(path.read_bytes(), path)[0]


def repair_jsonl(path: str | Path) -> int:
    """Truncates a torn last line away so that appending starts on a fresh line; returns the bytes dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    _, valid_end = _parse_lines(data, path)
    if valid_end < len(data):
        os.truncate(path, valid_end)
    return len(data) - valid_end


class RecordWriter:
    """Appends records to a JSONL file, one ``write`` + ``fsync`` per record, after repairing a torn last line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: Mapping[str, Any]) -> None:
        view = memoryview(record_line(record))
        while view:  # a regular file takes it in one write; the loop only guards the rare short write
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_paths(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SHARD_DIR).glob("*.jsonl"))


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished problem's record in a run directory: results.jsonl, then any shards; one record per id."""
    run_dir = Path(run_dir)
    seen: set[str] = set()
    records = []
    for path in [run_dir / RESULTS_FILE, *_shard_paths(run_dir)]:
        for record in read_jsonl(path):
            if record.get("id") not in seen:  # a merge killed before it removed the shards leaves copies
                seen.add(record.get("id"))
                records.append(record)
    return records


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def merge_shards(run_dir: str | Path, order: Sequence[str] = ()) -> int:
    """Folds shard files into results.jsonl (sorted by `order`, unknown ids last) and removes them.

    Returns the number of records in results.jsonl afterwards; does nothing when there are no shards.
    """
    run_dir = Path(run_dir)
    shards = _shard_paths(run_dir)
    if not shards:
        return len(read_jsonl(run_dir / RESULTS_FILE))
    records = load_records(run_dir)
    position = {problem_id: i for i, problem_id in enumerate(order)}
    records.sort(key=lambda r: position.get(r["id"], len(position)))
    _write_atomically(run_dir / RESULTS_FILE, b"".join(record_line(r) for r in records))
    for shard in shards:
        shard.unlink()
    with contextlib.suppress(OSError):
        (run_dir / SHARD_DIR).rmdir()
    return len(records)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys): equal for equal configs, whatever the key order."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable ``key: old -> new`` lines for the (nested, dotted) keys whose values differ."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return [
        f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}".replace(repr(missing), "(absent)")
        for key in sorted(a.keys() | b.keys())
        if a.get(key, missing) != b.get(key, missing)
    ]


def load_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config a run directory was made with, or None when it has none yet."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["config"]


def _check_config(run_dir: Path, config: Mapping[str, Any], force: bool) -> bool:
    """Raises ConfigMismatchError for a changed config without `force`; True when the old results must go."""
    old = load_config(run_dir)
    if old is None:
        if load_records(run_dir):
            raise RunError(f"{run_dir} holds results but no {CONFIG_FILE}, so their config is unknown; move them away")
        return False
    if config_fingerprint(old) == config_fingerprint(config):
        return False
    if force:
        return True
    diff = "\n  ".join(config_differences(old, config))
    raise ConfigMismatchError(
        f"{run_dir} holds results of a different configuration:\n  {diff}\n"
        "Use another output directory, or force=True (--force) to start over there "
        f"(the old results move to {run_dir / SUPERSEDED_DIR})."
    )


def _supersede(run_dir: Path) -> None:
    """Moves the old config and results out of the way, into superseded/<old fingerprint>/."""
    old = load_config(run_dir)
    assert old is not None
    target = run_dir / SUPERSEDED_DIR / config_fingerprint(old)[:12]
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, RESULTS_FILE, SHARD_DIR):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(target / name))


def _write_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    content = {"fingerprint": config_fingerprint(config), "config": config}
    _write_atomically(run_dir / CONFIG_FILE, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode())


@dataclass(frozen=True)
class Run:
    """A run directory as read back: its config and finished records."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]


def load_run(run_dir: str | Path) -> Run:
    """Reads a run directory (also one still being written to); RunError if it has no config.json."""
    path = Path(run_dir)
    config = load_config(path)
    if config is None:
        raise RunError(f"{path} is not a run directory (no {CONFIG_FILE})")
    return Run(path=path, config=config, records=load_records(path))


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

    @property
    def accuracy(self) -> float:
        return self.correct / self.done if self.done else float("nan")


def validate_record(record: Mapping[str, Any], problem: Problem) -> None:
    """Raises ValueError when a method's record lacks a field of RECORD_FIELDS, has a wrong type, or another id."""
    if not isinstance(record, Mapping):
        raise ValueError(f"problem {problem.id}: the method returned {type(record).__name__}, not a dict")
    for name, types in RECORD_FIELDS.items():
        if name not in record:
            raise ValueError(f"problem {problem.id}: the method's record has no {name!r} field")
        value = record[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(t.__name__ for t in types)
            raise ValueError(f"problem {problem.id}: {name!r} is {type(value).__name__}, expected {expected}")
    if not all(isinstance(r, _NUMBER) and not isinstance(r, bool) for r in record["rewards"]):
        raise ValueError(f"problem {problem.id}: 'rewards' must be a list of numbers")
    for name in RUNNER_FIELDS:
        if name in record and record[name] != getattr(problem, name):
            raise ValueError(f"problem {problem.id}: the method's record has {name}={record[name]!r}")


def _progress_bar(total: int, initial: int, dist_info: DistInfo, label: str, enabled: bool):
    from tqdm.auto import tqdm

    desc = f"{label} [rank {dist_info.rank}/{dist_info.world_size}]" if dist_info.world_size > 1 else label
    return tqdm(total=total, initial=initial, desc=desc, unit="problem", position=dist_info.rank, disable=not enabled)


def run_eval(
    method: Method,
    problems: Sequence[Problem],
    out_dir: str | Path,
    config: Mapping[str, Any],
    *,
    batch_size: int = 1,
    force: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Solves the problems not yet in `out_dir` with `method`, one JSONL record each, and returns the summary.

    Resumes: problems whose id already has a record are skipped. A `config` other than the one the directory was
    made with raises ConfigMismatchError unless `force`, which moves the old results to superseded/ and starts over.
    Under torchrun (or after `init_distributed`), the unfinished problems are dealt out by rank, each rank writes
    its own shard, and rank 0 merges them into results.jsonl when all ranks are done.

    Ctrl-C or SIGTERM stops after the batch in flight (a second one stops at once) and the summary says
    ``interrupted``; a killed process loses at most the batch in flight.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids are not unique")
    config_fingerprint(config)  # a config that is not plain JSON fails here, before anything is written
    dist_info = init_distributed()
    out = Path(out_dir)
    lead = dist_info.rank == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(dist_info)
    with _run_lock(out) if lead else contextlib.nullcontext():
        start_over = _check_config(out, config, force)  # every rank reads it, so every rank raises alike
        _barrier(dist_info)
        if lead:
            if start_over:
                _supersede(out)
            _write_config(out, config)
        _barrier(dist_info)
        finished = {r["id"]: r for r in load_records(out)}
        _barrier(dist_info)  # all ranks know what was finished before any rank adds to it
        changed = [p.id for p in problems if p.id in finished and finished[p.id].get("gold") != p.gold]
        if changed:
            raise RunError(f"{out}: the gold answer of {len(changed)} finished problem(s) changed, e.g. {changed[0]}")

        todo = [p for p in problems if p.id not in finished]
        mine = todo[dist_info.rank :: dist_info.world_size]
        prior = [finished[i] for i in ids if i in finished] if lead else []
        done, correct = len(prior), sum(bool(r.get("correct")) for r in prior)
        path = out / RESULTS_FILE if dist_info.world_size == 1 else out / SHARD_DIR / f"rank{dist_info.rank}.jsonl"
        interrupted = False
        with (
            StopRequest() as stop,
            RecordWriter(path) as writer,
            _progress_bar(done + len(mine), done, dist_info, out.name, progress) as bar,
        ):
            for start in range(0, len(mine), batch_size):
                batch = mine[start : start + batch_size]
                records = method.solve_batch(batch)
                if len(records) != len(batch):
                    raise ValueError(f"solve_batch returned {len(records)} records for {len(batch)} problems")
                for problem, record in zip(batch, records, strict=True):
                    validate_record(record, problem)
                    writer.append({"id": problem.id, "gold": problem.gold, **record})
                    done += 1
                    correct += bool(record["correct"])
                    bar.update(1)
                    bar.set_postfix_str(f"acc {correct}/{done} = {correct / done:.1%}")
                if stop.requested and start + batch_size < len(mine):
                    interrupted = True
                    break

        if _barrier(dist_info) and lead:
            merge_shards(out, ids)
        _barrier(dist_info)
    wanted = set(ids)
    records = [r for r in load_records(out) if r["id"] in wanted]
    return RunSummary(
        out_dir=out,
        total=len(problems),
        done=len(records),
        correct=sum(bool(r["correct"]) for r in records),
        interrupted=interrupted,
    )
