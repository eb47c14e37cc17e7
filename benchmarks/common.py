"""Shared pieces of the benchmark scripts: the stamp every result carries, the committed-result rule, timing,
bands and verdicts, peak memory, and the JSON + Markdown writers for benchmarks/results/."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# The CPU flags that decide which kernels a CPU can run (the rest of /proc/cpuinfo's list says nothing about speed).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in fields.items()}


def cpu_name() -> str:
    """The CPU model and its vector / matrix flags, e.g. ``AMD EPYC (avx2 fma avx512f avx512_bf16, no AMX)``."""
    info = _cpuinfo()
    present = set(info.get("flags", "").split())
    flags = [f for f in CPU_FLAGS if f in present]
    if not any(f.startswith("amx") for f in flags):
        flags.append("no AMX")
    return f"{info.get('model name') or platform.processor() or 'cpu'} ({' '.join(flags)})"


def device_name(device: str) -> str:
    """A human-readable name of the device the numbers come from: the GPU's name, or the CPU with its flags."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch CPU capability {capability}"


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def changed_tracked_files() -> list[str]:
    """Tracked files with uncommitted changes, except results (a benchmark writes those itself)."""
    lines = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    paths = [line[3:].split(" -> ")[-1] for line in lines if line.strip()]
    results = RESULTS_DIR.relative_to(ROOT).as_posix() + "/"
    return [p for p in paths if not p.startswith(results)]


def is_committed_location(out_dir: Path) -> bool:
    out = out_dir.resolve()
    return out == RESULTS_DIR or RESULTS_DIR in out.parents


def check_tree(out_dir: Path, allow_dirty: bool) -> bool:
    """Refuse to write into benchmarks/results/ from a tree whose tracked sources differ from the commit the result
    is stamped with, unless ``allow_dirty`` (then the stamp says so). Returns whether the tree is dirty."""
    changed = changed_tracked_files()
    if changed and is_committed_location(out_dir) and not allow_dirty:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise SystemExit(
            f"--out-dir is benchmarks/results/ (committed results) but the tree has uncommitted changes to tracked "
            f"files ({shown}): commit them, pass another --out-dir, or pass --allow-dirty to stamp the result dirty"
        )
    return bool(changed)


def git_sha() -> str:
    try:
        return _git("rev-parse", "--short", "HEAD").strip()
    except (OSError, RuntimeError):
        return "unknown"


def scrub_paths(text: str) -> str:
    """Text with this machine's paths removed: the repository becomes relative, other absolute paths keep their
    last component only (a result file must not record where it ran)."""
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    return re.sub(r"(?<![\w.])(?:/[\w.+@-]+)+/([\w.+@-]+)", r"\1", text)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, as ``python <script relative to the repository> args``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    argv[0] = script.relative_to(ROOT).as_posix() if ROOT in script.parents else script.name
    return scrub_paths(" ".join(["python", *argv]))


def stamp(device: str, dirty: bool) -> dict:
    """Where and when a result was measured. ``dirty``: the tree had uncommitted changes to tracked files."""
    return {
        "device": device_name(device),
        "device_kind": torch.device(device).type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_sha() + ("-dirty" if dirty else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cores": os.cpu_count(),
    }


# --- timing --------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call: on CUDA between two events around the call on the current stream (the GPU's own
    clock, so host-side Python between calls is not counted unless it starves the GPU); on CPU wall time."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class Band:
    """Median and p20-p80 band of repeated measurements (of a time, or of a ratio of paired times)."""

    median: float
    p20: float
    p80: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Band:
        if not values:
            raise ValueError("Band.of needs at least one value, got none")
        xs = sorted(values)
        q = statistics.quantiles(xs, n=5, method="inclusive") if len(xs) > 1 else [xs[0]] * 4
        return cls(statistics.median(xs), q[0], q[3], len(xs))


PASS, FAIL, UNDECIDED = "PASS", "FAIL", "UNDECIDED, more runs"


def verdict(band: Band, op: str, limit: float) -> str:
    """PASS when the whole p20-p80 band meets ``value <op> limit``, FAIL when the whole band misses it, otherwise
    UNDECIDED: a median on the right side of the limit is not enough."""
    meets = {"<=": lambda x: x <= limit, "<": lambda x: x < limit, ">=": lambda x: x >= limit, ">": lambda x: x > limit}
    if op not in meets:
        raise ValueError(f"op must be one of {sorted(meets)}, got {op!r}")
    ok = meets[op]
    worst, best = (band.p80, band.p20) if op in ("<=", "<") else (band.p20, band.p80)
    if ok(worst):
        return PASS
    if not ok(best):
        return FAIL
    return UNDECIDED


# --- memory --------------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- output --------------------------------------------------------------------------------------------------------


def write_results(tag: str, payload: dict, markdown: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{tag}.json", out_dir / f"{tag}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def add_output_args(parser, default_tag: str | None) -> None:
    """The flags every benchmark shares: where results go, and the committed-result rule."""
    parser.add_argument("--tag", default=default_tag, help="file name of the results (without extension)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="default: benchmarks/results/ (committed)")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write into benchmarks/results/ even with uncommitted changes to tracked files (stamped -dirty)",
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def stamp_markdown(s: dict) -> str:
    dirty = (
        "  \n**Uncommitted changes to tracked files: this result does not match its commit.**"
        if s["git"].endswith("-dirty")
        else ""
    )
    return (
        f"Device: {s['device']}  \ntorch {s['torch']}, Python {s['python']}, git {s['git']}, {s['date']}, "
        f"{s['host_cores']} host cores{dirty}\n"
    )
