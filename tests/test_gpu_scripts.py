"""The GPU session's scripts, checked without a GPU: a GPU lease is short, so a script bug must not cost one.

benchmarks/sanitizer_case.py runs on the CPU kernel; bench_op.py's explicit case lists and the CUDA issue's target
lines are checked on made-up rows; gpu_session.sh parses and prints its usage.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_op  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p)}


def test_sanitizer_case_runs_every_call_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sanitizer_case.py"), "--device", "cpu"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "sanitizer_case: done"
    assert len(lines) == 16 and all(line.endswith(": ok") for line in lines[:-1])


def test_gpu_session_usage():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Stages, in order" in proc.stdout and "PYTEST_ARGS" in proc.stdout
    assert "set -uo pipefail" not in proc.stdout  # the usage is the header comment only


def test_bench_explicit_case_list():
    cases = bench_op.cases_for("Qwen2.5-0.5B:64,Qwen2.5-7B:4096", ["bf16", "fp32"])
    assert [(c.model, c.N, c.H, c.V, c.dtype) for c in cases] == [
        ("Qwen2.5-0.5B", 64, 896, 151936, "bf16"),
        ("Qwen2.5-7B", 4096, 3584, 152064, "bf16"),
        ("Qwen2.5-0.5B", 64, 896, 151936, "fp32"),
        ("Qwen2.5-7B", 4096, 3584, 152064, "fp32"),
    ]
    with pytest.raises(SystemExit, match="bad case 'GPT-9:12'"):
        bench_op.cases_for("GPT-9:12", ["bf16"])
    with pytest.raises(SystemExit, match="bad case 'Qwen2.5-7B:many'"):
        bench_op.cases_for("Qwen2.5-7B:many", ["bf16"])


def _row(provider, n, h, v, median, *, floor_s=1.0, bytes_floor_s=0.5, peak=None):
    row = {"model": "m", "N": n, "H": h, "V": v, "dtype": "bf16", "provider": provider, "median_s": median}
    row["floor"] = {"floor_s": floor_s, "bytes_floor_s": bytes_floor_s}
    row["fraction_of_floor"] = floor_s / median
    if peak is not None:
        row["peak_extra_bytes"] = peak
    return row


def test_cuda_targets_pass_and_fail_on_the_numbers():
    big = (4096, 3584, 152064)
    small = (64, 896, 151936)
    rows = [
        _row("ext", *big, 1.25, floor_s=1.0),  # 0.80 of the floor: pass
        _row("liger", *big, 1.0),  # ext slower than Liger: fail
        _row("cce", *big, 2.0),
        _row("ext", *small, 1.0, bytes_floor_s=0.6, peak=64 * 896 * 4 * 3),  # 0.60 of the bandwidth: fail
        _row("reference", *small, 3.0, peak=64 * 896 * 4 * 100),
    ]
    lines = bench_op.cuda_acceptance(rows)
    text = "\n".join(lines)
    assert "fraction of the floor 0.80 (target >= 0.60) PASS" in text
    assert "fraction of the copy bandwidth 0.60 (target >= 0.70) FAIL" in text
    assert "ext / liger time = 1.25 (target < 1) FAIL" in text
    assert "ext / cce time = 0.62 (target < 1) PASS" in text
    assert "ext peak extra memory = 3.00 x N*H*4 bytes; the reference's 100 x" in text
