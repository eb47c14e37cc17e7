"""The GPU session's scripts, checked without a GPU: a GPU lease is short, so a script bug must not cost one.

benchmarks/sanitizer_case.py and time_split.py run on the CPU kernel; bench_op.py's explicit case lists and the CUDA
issue's target lines, and time_split.py's kernel groups and crossover, are checked on made-up rows; gpu_session.sh
prints its usage and its plan (which must fit 8 minutes), and skips the stages its budget cannot hold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_op  # noqa: E402
import time_split  # noqa: E402


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
    assert lines[-1] == f"sanitizer_case: done, {len(lines) - 1} calls"
    assert all(line.endswith(": ok") for line in lines[:-1])
    calls = lines[:-1]
    # Every kernel path, with both tile configurations of the tensor-core kernel, and every reward form.
    for kernel in ("fused", "chunked", "simt", "sm90"):
        assert any(line.startswith(kernel) for line in calls), kernel
    assert calls[-1].startswith("sm90"), "the sm90 calls come last (a hang there must not hide the others)"
    for tiles in ("large", "small"):
        assert sum(line.startswith("fused") and f"tiles={tiles}" in line for line in calls) >= 7, tiles
    for form in ("rows", "scalar", "float"):
        assert any(f"reward={form}" in line for line in calls), form
    assert any("grad=False" in line for line in calls)


def test_gpu_session_usage():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Stages, in order" in proc.stdout and "PYTEST_ARGS" in proc.stdout
    assert "set -uo pipefail" not in proc.stdout  # the usage is the header comment only


def _session(out: Path, *stages: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(out), *stages],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_session_plan_fits_eight_minutes(tmp_path):
    proc = _session(tmp_path, PLAN_ONLY="1")
    assert proc.returncode == 0, proc.stderr
    plan = [line.split() for line in proc.stdout.splitlines() if line.startswith("plan: ") and "total" not in line]
    # In order of value: build, the CUDA suite, the sm90 kernel's tests, the sanitizers, the benchmark, then the time
    # split and ncu.
    assert [p[1] for p in plan] == ["env", "wheels", "build", "test", "sm90", "sanitize", "bench", "timesplit", "ncu"]
    total = sum(int(p[2]) for p in plan)
    budget = int(proc.stdout.split("budget ")[1].split()[0])
    assert total <= budget <= 480


def test_gpu_session_skips_what_its_budget_cannot_hold(tmp_path):
    # A stand-in for the CUDA interpreter that takes 6 s: the env stage runs it and passes; then 30 s of budget less
    # those 6 s and the 10 s kill grace leave under 15 s, so the next stages are skipped, not started. (Only stages
    # that touch nothing of the checkout run here: the build stage would delete the built extension.)
    fake_py = tmp_path / "python"
    fake_py.write_text("#!/bin/sh\nsleep 6\n")
    fake_py.chmod(0o755)
    proc = _session(tmp_path / "out", "env", "sanitize", "ncu", BUDGET="30", PY=str(fake_py))
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "env: ok" in summary
    assert "sanitize: skipped" in summary and "ncu: skipped" in summary
    assert proc.returncode == 1  # a skipped stage is not a pass


def test_time_split_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "time_split.py"),
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
            "--tag",
            "ts",
            "--split-cases",
            "16:64:1000,5:24:300",
            "--sweep-n",
            "16,32",
            "--sweep-h",
            "64",
            "--vocab",
            "1000",
            "--reps",
            "3",
            "--min-time",
            "0",
            "--max-reps",
            "3",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((tmp_path / "ts.json").read_text())
    assert [r["shape"] for r in payload["split"]] == ["16x64x1000", "5x24x300"]
    for row in payload["split"]:
        assert row["kernels_us"]["op (cpu)"] > 0 and row["stream_us"] > 0 and row["graph_us"] is None
    assert [(r["N"], r["H"], r["V"], r["kernel"], r["runs"]) for r in payload["sweep"]] == [
        (16, 64, 1000, "cpu", 3),
        (32, 64, 1000, "cpu", 3),
    ]
    md = (tmp_path / "ts.md").read_text()
    assert "Time split per call" in md and "Fused vs chunked" in md and "| 64 | 32 |" in md


def test_time_split_groups_and_crossover():
    assert time_split.kernel_group("void latentseek::fused_mma_kernel<latentseek::MmaTileConfig<3, 8>, ...>") == (
        "fused_mma"
    )
    assert time_split.kernel_group("void latentseek::merge_splits_kernel<c10::BFloat16, float>(...)") == "merge_splits"
    assert time_split.kernel_group("nvjet_tst_128x64_64x8_1x2_h_bz_NNT") == "cublas"
    assert time_split.kernel_group("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "cublas"
    assert time_split.kernel_group("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise"

    def rows(times):  # {N: (fused us, chunked us)} at H = 896
        return [
            time_split.SweepRow(n, 896, 151936, "bf16", k, t, t, t, 5)
            for n, pair in times.items()
            for k, t in zip(("fused", "chunked"), pair, strict=True)
        ]

    assert time_split.crossover(rows({64: (1, 2), 128: (2, 1), 256: (3, 1)}), 896) == "N >= 128"
    assert time_split.crossover(rows({64: (1, 2), 128: (2, 1), 256: (1, 3)}), 896) == "no N up to 256"
    assert time_split.crossover(rows({64: (3, 2), 128: (4, 1)}), 896) == "N >= 64"
    assert time_split.crossover(rows({64: (3, 2)}), 1536) == "not measured"
    three = rows({64: (1, 2), 128: (2, 1)}) + [
        time_split.SweepRow(64, 896, 151936, "bf16", "sm90", 0.5, 0.5, 0.5, 5),
        time_split.SweepRow(128, 896, 151936, "bf16", "sm90", 3, 3, 3, 5),
    ]
    assert time_split.fastest(three, 896) == "N=64 sm90, N=128 chunked"
    assert time_split.fastest(three, 3584) == "not measured"


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


def _case_run(n, h, v, times, *, compute_s=1.0, bytes_s=0.5, peaks=None):
    """A CaseRun with made-up floors and per-round times (a provider's list of seconds, one per round)."""
    case = bench_op.Case("m", n, h, v, "bf16")
    nbytes = 1_000_000
    floors = bench_op.Floors(case.flops / compute_s, "bf16", nbytes / bytes_s, case.flops, nbytes)
    peaks = peaks or {}
    results = tuple(bench_op.Result(case, p, tuple(t), peaks.get(p)) for p, t in times.items())
    return bench_op.CaseRun(case, floors, results)


def test_cuda_targets_pass_fail_or_undecided_on_the_band():
    big = (4096, 3584, 152064)
    small = (64, 896, 151936)
    mid = (2048, 4096, 128256)
    runs = [
        # 0.80 of the physical floor: pass; ext slower than Liger in every round: fail; faster than Cut CE: pass
        _case_run(*big, {"ext": [1.25] * 5, "liger": [1.0] * 5, "cce": [2.0] * 5}, compute_s=1.0),
        # 0.60 of the copy bandwidth: fail
        _case_run(
            *small,
            {"ext": [1.0] * 5, "reference": [3.0] * 5},
            bytes_s=0.6,
            compute_s=0.1,
            peaks={"ext": 64 * 896 * 4 * 3, "reference": 64 * 896 * 4 * 100},
        ),
        # ext / liger per round 0.8 .. 1.2: the median meets "< 1" but the band does not, so it is undecided
        _case_run(*mid, {"ext": [0.8, 0.9, 1.0, 1.1, 1.2], "liger": [1.0] * 5}),
    ]
    lines = bench_op.target_lines(runs, "cuda")

    def verdict(case: str, target: str) -> str:
        (line,) = [line for line in lines if f" {case} bf16: {target}: " in line]
        return line.rsplit("-> ", 1)[1]

    big_case, small_case, mid_case = "N=4096 H=3584 V=152064", "N=64 H=896 V=151936", "N=2048 H=4096 V=128256"
    assert verdict(big_case, "physical-floor / ext time (fraction of the floor) >= 0.6") == "PASS"
    assert verdict(small_case, "copy-floor / ext time (fraction of the floor) >= 0.7") == "FAIL"
    assert verdict(big_case, "ext / liger time < 1") == "FAIL"
    assert verdict(big_case, "ext / cce time < 1") == "PASS"
    assert verdict(mid_case, "ext / liger time < 1") == "UNDECIDED, more runs"
    text = "\n".join(lines)
    assert "(fraction of the floor) >= 0.6: 0.8 (p20-p80 0.80-0.80, 5 rounds)" in text
    assert "ext peak extra memory = 3.00 x N*H*4 bytes; the reference's 100 x" in text
    assert bench_op.target_lines(runs, "cpu") == []  # the CUDA issue's targets are judged on CUDA only


def test_bench_loop_cuda_benchmark_runs_on_cpu(tmp_path):
    """bench_loop.py --device cuda's benchmark (loop_sweep.py) with --device cpu on a tiny model: every row it
    writes, so a lease is not spent finding a bug in it. (The numbers of a loaded CPU mean nothing.)"""
    script = ROOT / "benchmarks" / "bench_loop.py"
    args = ["--sweep", "--device", "cpu", "--archs", "tiny", "--batches", "1,2", "--impls", "auto,reference"]
    args += ["--prompt-tokens", "16", "--answer-tokens", "5", "--steps", "1", "--reps", "1"]
    args += ["--out-dir", str(tmp_path), "--tag", "smoke"]
    proc = subprocess.run([sys.executable, str(script), *args], env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((tmp_path / "smoke.json").read_text())
    (arch,) = payload["archs"]
    assert [(r["batch"], r["impl"]) for r in arch["latentseek"]] == [
        (1, "auto"),
        (1, "reference"),
        (2, "auto"),
        (2, "reference"),
    ]
    for row in arch["latentseek"]:
        assert row["steps"] == [1] * row["batch"] and row["generated_tokens"] > 0
        assert set(row["phases_s"]) == {"generate", "reward", "update"}
        assert 0 < row["op_share_of_update"] <= 1
    assert [(r["batch"], r["decode"]) for r in arch["decode"]] == [
        (1, "eager"),
        (1, "graph"),
        (2, "eager"),
        (2, "graph"),
    ]
    assert all(r["floor_tokens_per_s"] > 0 for r in arch["decode"])
    original = arch["original"]
    assert original["answers"] == 2 and 5 <= original["generated_tokens"] <= 5 + 5  # first answer, continuation
    assert "memory" not in arch  # the memory story needs CUDA's memory fraction
    assert "### The original's way" in (tmp_path / "smoke.md").read_text()


@pytest.mark.parametrize("limit", [0, 5, 16, 17, 100, 300, 511, 4096])
def test_memory_story_finds_the_largest_batch_that_runs(limit):
    import loop_sweep

    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit

    lo, hi = loop_sweep.largest_batch(fits, start=16, most=512)
    if limit >= 512:
        assert (lo, hi) == (512, None)
    else:
        assert lo <= limit < hi and hi - lo <= max(1, lo // 8)
    assert len(tried) == len(set(tried)) <= 12
