"""Evaluation runs on disk: the JSONL records, the shards of a multi-process run, and the config with its fingerprint.

A run directory ``runs/NAME/`` holds

- ``config.json``: ``{"fingerprint": ..., "config": {...}}``, everything that decides what a record contains (model,
  method, its knobs, data set, prompt style; :func:`latentseek.eval.methods.run_config` builds it). Which problems
  to run (``--limit``) and how many processes run them are not part of it, so a run can be extended or resumed with
  other values.
- ``results.jsonl``: one JSON object per finished problem, in problem order (the schema is
  :class:`latentseek.eval.record.StoredRecord`). Each line is written with a single ``write`` and then ``fsync``-ed,
  so a killed process leaves at most one incomplete last line, which readers drop and the next writer truncates away.
- ``shards/rank{R}.jsonl`` while a multi-process run is going: rank R's records. Rank 0 merges them into
  ``results.jsonl`` at the end; readers also read shards left behind by a killed multi-process run.
- ``run.lock``: held (``flock``) by the process that writes, so two runs cannot write the same directory
  (:mod:`latentseek.eval.runner` takes it).
- ``superseded/<fingerprint>/``: the config and results that ``force`` moved out of the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentseek.errors import RunError
from latentseek.eval.record import StoredRecord

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
SHARD_DIR = "shards"
LOCK_FILE = "run.lock"
SUPERSEDED_DIR = "superseded"


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
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror or e}; a results file must be a readable file") from e
    return _parse_lines(data, path)[0]


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


def _unwritable(path: Path, e: OSError) -> RunError:
    return RunError(
        f"cannot write {path}: {e.strerror or e} (errno {e.errno}); the records written before are intact: "
        "free space or fix the permissions, then rerun the same command to resume"
    )


class RecordWriter:
    """Appends records to a JSONL file, one ``write`` + ``fsync`` per record, after repairing a torn last line.

    A write that fails (the disk full, the file no longer writable) raises RunError after cutting the file back to
    its last complete record (where it can), so the records before stay readable and a rerun resumes after them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            repair_jsonl(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(self.path, e) from e

    def append(self, record: Mapping[str, Any]) -> None:
        view = memoryview(record_line(record))
        try:
            size = os.fstat(self._fd).st_size
            try:
                while view:  # a regular file takes it in one write; the loop only guards the rare short write
                    view = view[self._write(view) :]
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):  # readers and the next writer drop a torn line anyway
                    os.ftruncate(self._fd, size)
                raise
        except OSError as e:
            raise _unwritable(self.path, e) from e

    def _write(self, data: memoryview) -> int:
        return os.write(self._fd, data)

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


def shard_path(run_dir: str | Path, rank: int) -> Path:
    """Where rank `rank` of a multi-process run writes its records."""
    return Path(run_dir) / SHARD_DIR / f"rank{rank}.jsonl"


def _raw_records(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every finished problem's JSON object with its file: results.jsonl, then any shards; one per id."""
    seen: set[Any] = set()
    found = []
    for path in [run_dir / RESULTS_FILE, *_shard_paths(run_dir)]:
        for data in read_jsonl(path):
            if data.get("id") not in seen:  # a merge killed before it removed the shards leaves copies
                seen.add(data.get("id"))
                found.append((path, data))
    return found


def load_records(run_dir: str | Path) -> list[StoredRecord]:
    """Every finished problem's record in a run directory: results.jsonl, then any shards; one record per id.

    Raises RunError naming the file and the record when a line breaks the record schema.
    """
    records = []
    for path, data in _raw_records(Path(run_dir)):
        try:
            records.append(StoredRecord.from_json(data))
        except ValueError as e:
            raise RunError(f"{path}: the record of problem {data.get('id')!r} does not fit the schema: {e}") from e
    return records


def drop_records(run_dir: str | Path, ids: set[str]) -> int:
    """Removes the records of `ids` from results.jsonl (rewritten atomically, other lines copied as they are).

    Shards must have been merged first. Returns the number of records removed.
    """
    path = Path(run_dir) / RESULTS_FILE
    records = read_jsonl(path)
    kept = [r for r in records if r.get("id") not in ids]
    if len(kept) < len(records):
        _write_atomically(path, b"".join(record_line(r) for r in kept))
    return len(records) - len(kept)


def merge_shards(run_dir: str | Path, order: Sequence[str] = ()) -> int:
    """Folds shard files into results.jsonl (sorted by `order`, unknown ids last) and removes them.

    Returns the number of records in results.jsonl afterwards; does nothing when there are no shards. The lines
    are copied as they are (a record is not rewritten).
    """
    run_dir = Path(run_dir)
    shards = _shard_paths(run_dir)
    if not shards:
        return len(read_jsonl(run_dir / RESULTS_FILE))
    records = [data for _, data in _raw_records(run_dir)]
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


#: A file up to this size is hashed whole for its identity; a larger one by its first and last _ENDS bytes.
_WHOLE_FILE = 64 << 20
_ENDS = 1 << 20


def local_source(source: str, *, content: bool = True) -> str | dict[str, Any]:
    """How a run's config names a model or a data set: a local file or folder by its name and content, never by where
    it lies (so a run resumes after a move or on another machine, and no run directory records a local path);
    anything else (a hub id, a name such as ``"demo"``) as given. With ``content=False``, only ``{"name": ...}``
    (for a data set, whose finished problems the runner checks one by one, so that the file may grow).

    The identity of a local source is ``{"name": its file or folder name, "bytes": total size, "sha256": ...}``, the
    SHA-256 over its files (a folder's regular files in sorted relative-path order, hidden ones left out) of each
    file's relative path, size and content: the whole content of a file up to 64 MiB, the first and last MiB of a
    larger one (a multi-GB weights file is identified in milliseconds; two equally long files that differ only in
    between would get the same identity, the price of that).
    """
    path = Path(source)
    if not path.exists():
        return source
    if not content:
        return {"name": path.resolve().name}
    files = (
        [path]
        if path.is_file()
        else sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
    )
    digest, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        rel = f.name if f == path else f.relative_to(path).as_posix()
        digest.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _WHOLE_FILE:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_ENDS))
                fh.seek(size - _ENDS)
                digest.update(fh.read(_ENDS))
    return {"name": path.resolve().name, "bytes": total, "sha256": digest.hexdigest()}


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
    try:
        config = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError) as e:  # JSON or UTF-8 errors, no "config" key, not an object
        raise RunError(
            f"{path} is not a run config ({type(e).__name__}: {e}); restore it or move the run directory away"
        ) from e
    if not isinstance(config, dict):
        raise RunError(f"{path}: 'config' must be a JSON object, got {type(config).__name__}")
    return config


def check_config(run_dir: Path, config: Mapping[str, Any], force: bool) -> bool:
    """Raises ConfigMismatchError for a changed config without `force`; True when the old results must go."""
    old = load_config(run_dir)
    if old is None:
        if _raw_records(run_dir):
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


def supersede(run_dir: Path) -> None:
    """Moves the old config and results out of the way, into superseded/<old fingerprint>/."""
    old = load_config(run_dir)
    assert old is not None
    target = run_dir / SUPERSEDED_DIR / config_fingerprint(old)[:12]
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, RESULTS_FILE, SHARD_DIR):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(target / name))


def write_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Writes config.json (atomically), with the config's fingerprint."""
    content = {"fingerprint": config_fingerprint(config), "config": config}
    _write_atomically(run_dir / CONFIG_FILE, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode())


@dataclass(frozen=True)
class Run:
    """A run directory as read back: its config and finished records."""

    path: Path
    config: dict[str, Any]
    records: list[StoredRecord]


def load_run(run_dir: str | Path) -> Run:
    """Reads a run directory (also one still being written to); RunError if it has no config.json."""
    path = Path(run_dir)
    config = load_config(path)
    if config is None:
        raise RunError(f"{path} is not a run directory (no {CONFIG_FILE})")
    return Run(path=path, config=config, records=load_records(path))
