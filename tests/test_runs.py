"""Run storage and the runner: records, resume, config refusal, torn lines, SIGKILL / Ctrl-C, torchrun sharding."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fake_method_run import FakeMethod, make_problems
from latentseek.errors import RunError
from latentseek.eval.record import StoredRecord
from latentseek.eval.runner import run_eval
from latentseek.eval.storage import (
    CONFIG_FILE,
    LOCK_FILE,
    RESULTS_FILE,
    SHARD_DIR,
    SUPERSEDED_DIR,
    ConfigMismatchError,
    RecordWriter,
    config_differences,
    config_fingerprint,
    load_records,
    load_run,
    merge_shards,
    read_jsonl,
    repair_jsonl,
)

WORKER = Path(__file__).with_name("fake_method_run.py")
CONFIG = {"method": "fake", "model": "none"}


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(p).resolve()) for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    return env


def start_worker(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *args],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(read_jsonl(path)) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} records")


def raw_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def ids_of(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in raw_lines(path)]


# --- records on disk ---------------------------------------------------------------------------------------------


def test_run_writes_config_and_one_line_per_problem(tmp_path):
    method = FakeMethod()
    summary = run_eval(method, make_problems(7), tmp_path / "run", CONFIG, batch_size=3, progress=False)
    run = load_run(tmp_path / "run")
    assert run.config == CONFIG
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert saved["fingerprint"] == config_fingerprint(CONFIG)
    assert ids_of(tmp_path / "run" / RESULTS_FILE) == [f"p{i:03d}" for i in range(7)]
    fields = ["id", "gold", "prediction", "correct", "response", "tokens", "seconds", "iterations", "rewards", "rank"]
    assert all(list(line) == fields for line in read_jsonl(tmp_path / "run" / RESULTS_FILE))
    assert [r.record for r in run.records] == method.solve_batch(make_problems(7))  # read back as written
    correct = sum(r.record.correct for r in run.records)
    assert (summary.total, summary.done, summary.correct, summary.interrupted) == (7, 7, correct, False)
    assert correct == 4  # p000, p003, p006 are wrong


def test_rerun_skips_finished_problems_and_extends_with_a_larger_limit(tmp_path):
    out = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(4), out, CONFIG, progress=False)
    again = FakeMethod()
    summary = run_eval(again, make_problems(10), out, dict(reversed(CONFIG.items())), batch_size=4, progress=False)
    assert again.solved == [f"p{i:03d}" for i in range(4, 10)]  # key order is not a config change
    assert ids_of(out / RESULTS_FILE) == [f"p{i:03d}" for i in range(10)]
    assert summary.done == 10
    assert run_eval(FakeMethod(), make_problems(3), out, CONFIG, progress=False).done == 3  # a smaller limit


def test_changed_config_is_refused_and_force_starts_over(tmp_path):
    out = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(3), out, CONFIG, progress=False)
    before = (out / RESULTS_FILE).read_bytes()
    changed = {**CONFIG, "model": "other", "knobs": {"lr": 0.03}}
    with pytest.raises(ConfigMismatchError, match=r"model: 'none' -> 'other'") as err:
        run_eval(FakeMethod(), make_problems(3), out, changed, progress=False)
    assert "knobs.lr: (absent) -> 0.03" in str(err.value)
    assert (out / RESULTS_FILE).read_bytes() == before and load_run(out).config == CONFIG

    method = FakeMethod()
    run_eval(method, make_problems(3), out, changed, force=True, progress=False)
    assert method.solved == ["p000", "p001", "p002"] and load_run(out).config == changed
    old = out / SUPERSEDED_DIR / config_fingerprint(CONFIG)[:12]
    assert (old / RESULTS_FILE).read_bytes() == before and json.loads((old / CONFIG_FILE).read_text())[
        "config"
    ] == CONFIG


def test_changed_data_under_the_same_ids_is_refused(tmp_path):
    run_eval(FakeMethod(), make_problems(2), tmp_path / "run", CONFIG, progress=False)
    edited = [make_problems(2)[0], replace(make_problems(2)[1], gold="7")]
    with pytest.raises(RunError, match="gold answer of 1 finished problem"):
        run_eval(FakeMethod(), edited, tmp_path / "run", CONFIG, progress=False)


def test_config_differences_and_fingerprint():
    assert config_fingerprint({"a": 1, "b": {"c": 2}}) == config_fingerprint({"b": {"c": 2}, "a": 1})
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 1.5})
    assert config_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ["b.c: 2 -> 3"]


def test_results_without_config_are_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RESULTS_FILE).write_text('{"id": "p000", "correct": true}\n')
    with pytest.raises(RunError, match="no config.json"):
        run_eval(FakeMethod(), make_problems(1), tmp_path / "run", CONFIG, progress=False)


def test_a_torn_last_line_is_dropped_on_read_and_cut_before_appending(tmp_path):
    out = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(3), out, CONFIG, progress=False)
    results = out / RESULTS_FILE
    with results.open("ab") as f:
        f.write(b'{"id": "p003", "gold": "4", "predic')  # the process died inside this write
    assert [r.id for r in load_records(out)] == ["p000", "p001", "p002"]
    method = FakeMethod()
    run_eval(method, make_problems(5), out, CONFIG, progress=False)
    assert method.solved == ["p003", "p004"]
    assert ids_of(results) == [f"p{i:03d}" for i in range(5)]  # every line parses: the fragment is gone


def test_repair_and_read_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "x": \x00\x00\n')  # a torn write of a full line
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert repair_jsonl(path) == len(b'{"id": "c", "x": \x00\x00\n')
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    assert repair_jsonl(path) == 0
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(RunError, match=r"r.jsonl:2"):
        read_jsonl(path)


def test_record_writer_appends_whole_lines(tmp_path):
    path = tmp_path / "sub" / "w.jsonl"
    with RecordWriter(path) as writer:
        writer.append({"id": "a", "text": "line one\nline two", "value": 1})
    with RecordWriter(path) as writer:
        writer.append({"id": "b", "text": "ünïcode"})
    assert read_jsonl(path) == [{"id": "a", "text": "line one\nline two", "value": 1}, {"id": "b", "text": "ünïcode"}]
    assert len(raw_lines(path)) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"correct": 1}, "Record.correct must be bool, got 1"),
        ({"tokens": 3.5}, "Record.tokens must be int, got 3.5"),
        ({"rewards": [0.1, "x"]}, "Record.rewards must be a list of float"),
        ({"extras": {"id": "other"}}, "extras may not hold 'id'"),
        ({"extras": {"tokens": 3}}, "extras may not hold 'tokens'"),
        ({"prediction": 5}, "Record.prediction must be str or None, got 5"),
    ],
)
def test_bad_records_are_refused_before_writing(tmp_path, change, message):
    class Bad(FakeMethod):
        def solve_batch(self, problems):
            return [replace(r, **change) for r in super().solve_batch(problems)]

    with pytest.raises(ValueError, match=message):
        run_eval(Bad(), make_problems(2), tmp_path / "run", CONFIG, progress=False)
    assert read_jsonl(tmp_path / "run" / RESULTS_FILE) == []


def test_a_batch_with_one_bad_record_writes_none_of_it(tmp_path):
    class PlainDict(FakeMethod):  # the second record is a dict, as methods returned before the typed record
        def solve_batch(self, problems):
            records: list[Any] = super().solve_batch(problems)
            records[-1] = records[-1].to_json()
            return records

    class Short(FakeMethod):
        def solve_batch(self, problems):
            return super().solve_batch(problems)[:-1]

    with pytest.raises(TypeError, match="p001: PlainDict.solve_batch returned a dict, expected a latentseek"):
        run_eval(PlainDict(), make_problems(2), tmp_path / "a", CONFIG, batch_size=2, progress=False)
    assert read_jsonl(tmp_path / "a" / RESULTS_FILE) == []
    with pytest.raises(TypeError, match="1 records for 2 problems"):
        run_eval(Short(), make_problems(2), tmp_path / "b", CONFIG, batch_size=2, progress=False)


def test_a_line_that_breaks_the_schema_is_named_when_read(tmp_path):
    out = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(2), out, CONFIG, progress=False)
    with (out / RESULTS_FILE).open("a") as f:
        f.write(json.dumps({"id": "p002", "gold": "3", "prediction": "3", "correct": "yes", "tokens": 1}) + "\n")
    with pytest.raises(RunError, match=r"results.jsonl: the record of problem 'p002' .*has no 'seconds' field"):
        load_records(out)
    (out / RESULTS_FILE).write_text(
        json.dumps({"id": "p0", "gold": "1", "prediction": "1", "correct": "yes", "tokens": 1, "seconds": 1}) + "\n"
    )
    with pytest.raises(RunError, match=r"Record.correct must be bool, got 'yes'"):
        load_run(out)


def test_a_locked_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RunError, match="another process"):
            run_eval(FakeMethod(), make_problems(1), out, CONFIG, progress=False)
    finally:
        os.close(fd)
    assert run_eval(FakeMethod(), make_problems(1), out, CONFIG, progress=False).done == 1


def test_shards_left_by_a_killed_multi_process_run_are_read_and_merged(tmp_path):
    out = tmp_path / "run"
    run_eval(FakeMethod(), make_problems(2), out, CONFIG, progress=False)
    method = FakeMethod()
    records = {r["id"]: r for r in [*read_jsonl(out / RESULTS_FILE)]}
    extra = method.solve_batch(make_problems(6)[2:6])
    for rank, problem_ids in enumerate([["p004", "p002"], ["p003", "p004"]]):  # p004 twice: a merge cut short
        with RecordWriter(out / SHARD_DIR / f"rank{rank}.jsonl") as writer:
            for pid in problem_ids:
                writer.append(StoredRecord(pid, str(int(pid[1:]) + 1), extra[int(pid[1:]) - 2]).to_json())
    assert sorted(r.id for r in load_records(out)) == ["p000", "p001", "p002", "p003", "p004"]
    again = FakeMethod()
    summary = run_eval(again, make_problems(6), out, CONFIG, progress=False)
    assert again.solved == ["p005"] and summary.done == 6
    assert ids_of(out / RESULTS_FILE) == [f"p{i:03d}" for i in range(6)]
    assert not (out / SHARD_DIR).exists()
    assert read_jsonl(out / RESULTS_FILE)[:2] == list(records.values())
    assert merge_shards(out) == 6  # nothing left to merge


# --- processes -----------------------------------------------------------------------------------------------------


def test_sigkill_mid_run_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    proc = start_worker(out, "--problems", "40", "--sleep", "0.05")
    wait_for_lines(out / RESULTS_FILE, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = read_jsonl(out / RESULTS_FILE)
    assert 5 <= len(before) < 40

    proc = start_worker(out, "--problems", "40")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["done"] == 40
    after = read_jsonl(out / RESULTS_FILE)
    assert [r["id"] for r in after] == [f"p{i:03d}" for i in range(40)]
    assert after[: len(before)] == before


def test_ctrl_c_stops_after_the_batch_in_flight(tmp_path):
    out = tmp_path / "run"
    proc = start_worker(out, "--problems", "40", "--sleep", "0.1", "--batch-size", "2")
    wait_for_lines(out / RESULTS_FILE, 4, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "stopping after the batch in flight" in stderr
    summary = json.loads(stdout)
    records = read_jsonl(out / RESULTS_FILE)
    assert summary["interrupted"] and summary["done"] == len(records) < 40
    assert len(records) % 2 == 0  # the batch in flight was finished, not cut
    assert len(raw_lines(out / RESULTS_FILE)) == len(records)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    out = tmp_path / "run"
    # p000 finishes at once; p001 hangs, so both signals arrive while its batch is in flight (a first signal that
    # came between batches would end the run before a second one could).
    proc = start_worker(out, "--problems", "40", "--hang-from", "1", "--batch-size", "1")
    assert any(line.strip() == "solving p001" for line in proc.stderr)
    proc.send_signal(signal.SIGINT)
    # Two signals that arrive before Python runs the handler count as one, so wait until the first was handled.
    assert any("stopping after the batch in flight" in line for line in proc.stderr)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted at once" in stderr
    assert [r["id"] for r in read_jsonl(out / RESULTS_FILE)] == ["p000"]  # the batch in flight was dropped
    assert len(raw_lines(out / RESULTS_FILE)) == 1


@pytest.mark.slow
def test_torchrun_two_processes_shard_and_merge(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(WORKER), str(out), "--problems", "11", "--batch-size", "2"]
    proc = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"total": 11, "done": 11, "correct": 7, "interrupted": False}
    records = read_jsonl(out / RESULTS_FILE)
    assert [r["id"] for r in records] == [f"p{i:03d}" for i in range(11)]
    assert sorted({r["rank"] for r in records}) == [0, 1]
    assert not (out / SHARD_DIR).exists()


def test_a_local_source_is_named_by_its_content_not_its_place(tmp_path, monkeypatch):
    import latentseek.eval.storage as storage

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "data.jsonl").write_bytes(b'{"q": 1}\n')
    (b / "data.jsonl").write_bytes(b'{"q": 1}\n')
    first = storage.local_source(str(a / "data.jsonl"))
    assert first == storage.local_source(str(b / "data.jsonl"))  # moved or on another machine: the same source
    assert first["name"] == "data.jsonl" and first["bytes"] == 9 and str(tmp_path) not in json.dumps(first)
    (b / "data.jsonl").write_bytes(b'{"q": 2}\n')
    assert storage.local_source(str(b / "data.jsonl")) != first  # same name and size, other content
    assert storage.local_source("owner/model") == "owner/model" and storage.local_source("demo") == "demo"
    assert storage.local_source(str(b / "data.jsonl"), content=False) == {"name": "data.jsonl"}

    # A folder: its files' relative paths, sizes and contents, hidden ones left out.
    for d in (a, b):
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(bytes(range(256)) * 40)
    (b / "data.jsonl").write_bytes(b'{"q": 1}\n')
    (b / ".cache").write_text("local state")
    assert storage.local_source(str(a)) == {**storage.local_source(str(b)), "name": "a"}
    (b / "sub" / "w.bin").write_bytes(bytes(range(256)) * 39 + bytes(reversed(range(256))))
    assert storage.local_source(str(b))["sha256"] != storage.local_source(str(a))["sha256"]

    # A file above the whole-file limit is read at both ends: a change there shows, the size too.
    monkeypatch.setattr(storage, "_WHOLE_FILE", 1000)
    monkeypatch.setattr(storage, "_ENDS", 100)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(2000))
    base = storage.local_source(str(big))
    for pos in (0, 1999):
        data = bytearray(2000)
        data[pos] = 1
        big.write_bytes(bytes(data))
        assert storage.local_source(str(big)) != base
    big.write_bytes(bytes(2001))
    assert storage.local_source(str(big)) != base
