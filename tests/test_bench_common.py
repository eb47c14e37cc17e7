"""benchmarks/common.py: the verdict on a band, the committed-result rule, and results that name no local path."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def test_band_is_the_median_and_p20_p80():
    band = common.Band.of([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    assert (band.median, band.runs) == (3.5, 6)
    assert band.p20 == pytest.approx(2.0) and band.p80 == pytest.approx(5.0)
    assert common.Band.of([2.0]) == common.Band(2.0, 2.0, 2.0, 1)
    with pytest.raises(ValueError, match="at least one value"):
        common.Band.of([])


@pytest.mark.parametrize(
    ("p20", "p80", "op", "limit", "want"),
    [
        (0.40, 0.48, "<=", 0.5, common.PASS),
        (0.45, 0.55, "<=", 0.5, common.UNDECIDED),  # median 0.5 meets it, the band does not
        (0.51, 0.60, "<=", 0.5, common.FAIL),
        (0.50, 0.50, "<", 0.5, common.FAIL),
        (0.65, 0.80, ">=", 0.6, common.PASS),
        (0.55, 0.65, ">=", 0.6, common.UNDECIDED),
        (0.30, 0.59, ">=", 0.6, common.FAIL),
    ],
)
def test_verdict_needs_the_whole_band(p20, p80, op, limit, want):
    assert common.verdict(common.Band((p20 + p80) / 2, p20, p80, 10), op, limit) == want


def test_verdict_rejects_an_unknown_comparison():
    with pytest.raises(ValueError, match="op must be one of"):
        common.verdict(common.Band(1.0, 1.0, 1.0, 1), "=<", 1.0)


def test_committed_results_refuse_a_dirty_tree(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "changed_tracked_files", lambda: ["python/latentseek/loop.py"])
    with pytest.raises(SystemExit, match=r"uncommitted changes to tracked files \(python/latentseek/loop.py\)"):
        common.check_tree(common.RESULTS_DIR, allow_dirty=False)
    with pytest.raises(SystemExit, match="--allow-dirty"):
        common.check_tree(common.RESULTS_DIR / "sub", allow_dirty=False)
    assert common.check_tree(common.RESULTS_DIR, allow_dirty=True) is True
    assert common.check_tree(tmp_path, allow_dirty=False) is True  # elsewhere: written, stamped dirty
    monkeypatch.setattr(common, "changed_tracked_files", lambda: [])
    assert common.check_tree(common.RESULTS_DIR, allow_dirty=False) is False


def test_a_dirty_stamp_says_so_in_the_markdown():
    stamp = common.stamp("cpu", dirty=True)
    assert stamp["git"].endswith("-dirty")
    assert "Uncommitted changes" in common.stamp_markdown(stamp)
    assert "Uncommitted changes" not in common.stamp_markdown(common.stamp("cpu", dirty=False))


def test_results_record_no_local_path():
    line = common.command_line([str(ROOT / "benchmarks" / "bench_op.py"), "--out-dir", "/home/someone/runs/out"])
    assert line == "python benchmarks/bench_op.py --out-dir out"
    error = f"RuntimeError: bad input in {ROOT}/latentseek_ext/ops.py and /usr/lib/python3/site.py, ratio 4/3"
    assert common.scrub_paths(error) == "RuntimeError: bad input in latentseek_ext/ops.py and site.py, ratio 4/3"


def test_cpu_name_lists_matrix_units_or_their_absence(monkeypatch):
    monkeypatch.setattr(common, "_cpuinfo", lambda: {"model name": "Some CPU", "flags": "fpu avx2 avx512f amx_bf16"})
    assert common.cpu_name() == "Some CPU (avx2 avx512f amx_bf16)"
    monkeypatch.setattr(common, "_cpuinfo", lambda: {"model name": "Other CPU", "flags": "avx2 fma avx512_bf16"})
    assert common.cpu_name() == "Other CPU (avx2 fma avx512_bf16 no AMX)"
