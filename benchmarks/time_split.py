"""Where does a call of the fused LM-head op spend its time, and where does the chunked path start to beat the fused
kernel?

1. Split, per case (N:H:V): torch.profiler over back-to-back calls gives each CUDA kernel's device time per call,
   grouped as fused_mma, fused_simt, merge_splits, sm90, chunk_rows, chunk_finish, cublas (the chunked path's GEMMs) and elementwise
   (zero_, add_, copies). Beside them, per call: the stream time of back-to-back calls between CUDA events, the
   sync-to-sync wall time (what benchmarks/bench_op.py's first H200 run measured), and the replay time of the call
   captured in a CUDA graph (no launch overhead: the op makes no host sync, so it can be captured). The host gap is
   stream time minus kernel time: the GPU idling between and before kernels while the host launches them.
2. Sweep: the median CUDA-event time of the fused kernel against the chunked path (LATENTSEEK_CUDA_KERNEL) over
   N in 16..4096 at H = 896, 1536, 3584 (Qwen2.5 0.5B / 1.5B / 7B vocabularies), and per H the smallest N from
   which chunked is faster: the data for kMaxFusedPasses in latentseek/cuda_plan.h. On a compute capability 9.0 GPU
   the sm_90a kernel (sm90) joins the split and the sweep, and the fastest kernel per N is listed: the data for
   letting the automatic choice take it.

    python benchmarks/time_split.py --device cuda --out-dir OUT --tag time-split-h200
    python benchmarks/time_split.py --device cpu --out-dir /tmp/ts --split-cases 16:64:1000 --sweep-n 16,32 \\
        --sweep-h 64 --vocab 1000    (a smoke test of the script: the CPU kernel, no kernels to split)

Writes <out-dir>/<tag>.json and .md after every measurement, so a run cut short by a time limit keeps what it did.
Writing into benchmarks/results/ needs a clean tree (or --allow-dirty).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import latentseek_ext  # noqa: E402

VOCAB = {896: 151936, 1536: 151936, 3584: 152064}  # Qwen2.5 0.5B / 1.5B / 7B LM heads
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Kernel name fragments -> group. cuBLAS / cuBLASLt GEMMs carry one of the GEMM fragments in their names.
GROUPS = (
    ("fused_mma_kernel", "fused_mma"),
    ("fused_simt_kernel", "fused_simt"),
    ("merge_splits_kernel", "merge_splits"),
    ("sm90_kernel", "sm90"),
    ("check_tokens_kernel", "sm90"),
    ("chunk_rows_kernel", "chunk_rows"),
    ("chunk_finish_kernel", "chunk_finish"),
    ("gemm", "cublas"),
    ("nvjet", "cublas"),
    ("xmma", "cublas"),
    ("cutlass", "cublas"),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    for fragment, group in GROUPS:
        if fragment in low:
            return group
    return "elementwise"


@dataclasses.dataclass(frozen=True)
class Shape:
    N: int
    H: int
    V: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        try:
            n, h, v = (int(x) for x in text.split(":"))
        except ValueError:
            raise SystemExit(f"a case is N:H:V (three integers), got {text!r}") from None
        return cls(n, h, v)

    def __str__(self) -> str:
        return f"{self.N}x{self.H}x{self.V}"


@dataclasses.dataclass(frozen=True)
class SplitRow:
    shape: str
    dtype: str
    kernel: str  # LATENTSEEK_CUDA_KERNEL
    kernels_us: dict[str, float]  # device time per call of each kernel group (CPU: the op's own time)
    kernel_sum_us: float
    stream_us: float  # back-to-back calls between events, per call
    sync_wall_us: float  # host clock around call + synchronize
    graph_us: float | None  # CUDA graph replay per call, None where not captured
    host_gap_us: float  # stream_us - kernel_sum_us
    note: str


@dataclasses.dataclass(frozen=True)
class SweepRow:
    N: int
    H: int
    V: int
    dtype: str
    kernel: str
    median_us: float
    p20_us: float
    p80_us: float
    runs: int


@contextlib.contextmanager
def cuda_kernel(name: str) -> Iterator[None]:
    """LATENTSEEK_CUDA_KERNEL set for the duration (the launcher reads it per call)."""
    old = os.environ.get("LATENTSEEK_CUDA_KERNEL")
    os.environ["LATENTSEEK_CUDA_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["LATENTSEEK_CUDA_KERNEL"]
        else:
            os.environ["LATENTSEEK_CUDA_KERNEL"] = old


def make_call(shape: Shape, dtype: torch.dtype, device: str, weight: torch.Tensor) -> Callable[[], object]:
    g = torch.Generator(device=device).manual_seed(shape.N * 7 + shape.H)
    z = torch.randn(shape.N, shape.H, generator=g, device=device).to(dtype)
    tokens = torch.randint(0, shape.V, (shape.N,), generator=g, device=device)
    return lambda: latentseek_ext.lm_head_policy_grad(z, weight, 0.5, tokens, impl="ext")


def make_weight(h: int, v: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """W ~ N(0, 1/H), drawn on the device (a 152064 x 3584 draw on the host would take seconds of the lease)."""
    g = torch.Generator(device=device).manual_seed(h + v)
    return (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype)


def timed_reps(fn: Callable[[], object], device: str, min_time: float, max_reps: int) -> list[float]:
    """Per-call seconds of separately timed calls (CUDA events / wall clock), after one warm-up call: at least 3,
    until min_time seconds have passed or max_reps calls were made."""
    fn()
    common.synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        times.append(common.time_once(fn, device))
    return times


def stream_time(fn: Callable[[], object], device: str, reps: int) -> float:
    """Seconds per call of `reps` back-to-back calls (no synchronisation between them)."""
    common.synchronize(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def sync_wall(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median seconds of call + synchronize on the host clock."""
    times = []
    for _ in range(reps):
        common.synchronize(device)
        t0 = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_time(fn: Callable[[], object], reps: int) -> tuple[float | None, str]:
    """Seconds per replay of one call captured in a CUDA graph, or None and why not."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as e:  # a capture failure is a result here, not a crash
        return None, f"graph capture failed: {str(e).splitlines()[0]}"
    return stream_time(graph.replay, "cuda", reps), ""


def profiled_kernels(fn: Callable[[], object], device: str, reps: int) -> dict[str, float]:
    """Microseconds per call of each kernel group (CUDA), or of the op itself (CPU), from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    common.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        common.synchronize(device)
    groups: dict[str, float] = {}
    for evt in prof.key_averages():
        if device.startswith("cuda"):
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            us = getattr(evt, "self_cuda_time_total", 0.0) if us is None else us
            key = kernel_group(evt.key)
        else:
            if not evt.key.startswith("latentseek_ext::"):
                continue
            us, key = evt.cpu_time_total, "op (cpu)"
        groups[key] = groups.get(key, 0.0) + us / reps
    return dict(sorted(groups.items()))


def split_row(shape: Shape, dtype_name: str, kernel: str, device: str, reps: int) -> SplitRow:
    dtype = DTYPES[dtype_name]
    weight = make_weight(shape.H, shape.V, dtype, device)
    with cuda_kernel(kernel):
        fn = make_call(shape, dtype, device, weight)
        fn()  # warm-up: module load, cuBLAS handles, the launcher's per-device caches
        kernels = profiled_kernels(fn, device, reps)
        stream = stream_time(fn, device, reps)
        wall = sync_wall(fn, device, reps)
        graph, note = graph_time(fn, reps) if device.startswith("cuda") else (None, "no graphs on CPU")
    total = sum(kernels.values())
    return SplitRow(
        str(shape),
        dtype_name,
        kernel,
        {k: round(v, 2) for k, v in kernels.items()},
        round(total, 2),
        round(stream * 1e6, 2),
        round(wall * 1e6, 2),
        None if graph is None else round(graph * 1e6, 2),
        round(stream * 1e6 - total, 2),
        note,
    )


def crossover(rows: list[SweepRow], h: int) -> str:
    """The smallest N from which chunked stays faster than fused at this H (by median), or why there is none."""
    by_n: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.H == h:
            by_n.setdefault(r.N, {})[r.kernel] = r.median_us
    ns = sorted(n for n, k in by_n.items() if {"fused", "chunked"} <= k.keys())
    if not ns:
        return "not measured"
    faster = [by_n[n]["chunked"] < by_n[n]["fused"] for n in ns]
    for i, n in enumerate(ns):
        if all(faster[i:]):
            return f"N >= {n}"
    return f"no N up to {ns[-1]}"


def fastest(rows: list[SweepRow], h: int) -> str:
    """Per N at this H, the kernel with the smallest median (the data for the automatic choice among all of them)."""
    by_n: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.H == h:
            by_n.setdefault(r.N, {})[r.kernel] = r.median_us
    return ", ".join(f"N={n} {min(k, key=k.get)}" for n, k in sorted(by_n.items())) or "not measured"


def default_kernels(device: str, kernels: str) -> list[str]:
    """The LATENTSEEK_CUDA_KERNEL values to measure: sm90 joins the list on a compute capability 9.0 GPU."""
    names = kernels.split(",")
    if device == "cuda" and torch.cuda.get_device_capability() == (9, 0) and "sm90" not in names:
        names.append("sm90")
    return names


def to_markdown(tag: str, stamp: dict, command: str, split: list[SplitRow], sweep: list[SweepRow]) -> str:
    out = [f"# {tag}\n", common.stamp_markdown(stamp), f"\n`{command}`\n", "\n## Time split per call (us)\n\n"]
    groups = sorted({g for r in split for g in r.kernels_us})
    out.append(
        common.markdown_table(
            ["case", "dtype", "kernel", *groups, "kernels", "stream", "host gap", "sync wall", "graph", "note"],
            [
                [
                    r.shape,
                    r.dtype,
                    r.kernel,
                    *(r.kernels_us.get(g, "") for g in groups),
                    r.kernel_sum_us,
                    r.stream_us,
                    r.host_gap_us,
                    r.sync_wall_us,
                    "" if r.graph_us is None else r.graph_us,
                    r.note,
                ]
                for r in split
            ],
        )
    )
    out.append(
        "\nstream: back-to-back calls between CUDA events; host gap = stream - kernels; sync wall: host clock "
        "around call + synchronize; graph: replay of the captured call.\n"
    )
    if sweep:
        out.append("\n## Fused vs chunked, median us per call (p20-p80)\n\n")
        keys = sorted({(r.H, r.N) for r in sweep})
        kernels = sorted({r.kernel for r in sweep})
        cell = {(r.H, r.N, r.kernel): f"{r.median_us:.1f} ({r.p20_us:.1f}-{r.p80_us:.1f})" for r in sweep}
        out.append(
            common.markdown_table(
                ["H", "N", *kernels], [[h, n, *(cell.get((h, n, k), "") for k in kernels)] for h, n in keys]
            )
        )
        if {"fused", "chunked"} <= set(kernels):
            hs = sorted({r.H for r in sweep})
            out.append("\n" + "\n".join(f"- H = {h}: chunked faster for {crossover(sweep, h)}" for h in hs) + "\n")
        if len(kernels) > 2:
            hs = sorted({r.H for r in sweep})
            out.append("\n" + "\n".join(f"- H = {h}, fastest: {fastest(sweep, h)}" for h in hs) + "\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument(
        "--split-cases",
        default="64:896:151936,300:896:151936,64:3584:152064",
        help="N:H:V cases of the time split (comma list)",
    )
    ap.add_argument(
        "--split-kernels",
        default="auto,fused,chunked",
        help="LATENTSEEK_CUDA_KERNEL values of the split (sm90 is added on a compute capability 9.0 GPU)",
    )
    ap.add_argument(
        "--sweep-kernels",
        default="fused,chunked",
        help="LATENTSEEK_CUDA_KERNEL values of the sweep (sm90 is added on a compute capability 9.0 GPU)",
    )
    ap.add_argument("--reps", type=int, default=20, help="calls per split measurement")
    ap.add_argument("--sweep-n", default="16,32,64,128,256,512,1024,2048,4096")
    ap.add_argument("--sweep-h", default="896,1536,3584")
    ap.add_argument("--vocab", type=int, default=None, help="V of the sweep (default: the Qwen2.5 vocabulary of H)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per sweep point (at least 3 calls)")
    ap.add_argument("--max-reps", type=int, default=30, help="most calls per sweep point")
    common.add_output_args(ap, default_tag=None)
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if not latentseek_ext.extension_available(args.device):
        raise SystemExit(f"latentseek_ext has no compiled kernel for {args.device}: {latentseek_ext.EXTENSION_ERROR}")
    dirty = common.check_tree(args.out_dir, args.allow_dirty)
    tag = args.tag or f"time-split-{args.device}"
    stamp = common.stamp(args.device, dirty)
    command = common.command_line(sys.argv if argv is None else [__file__, *argv])
    # On the CPU the kernel variable means nothing: one "cpu" row per case.
    split_kernels = default_kernels(args.device, args.split_kernels) if args.device == "cuda" else ["cpu"]
    sweep_kernels = default_kernels(args.device, args.sweep_kernels) if args.device == "cuda" else ["cpu"]
    split: list[SplitRow] = []
    sweep: list[SweepRow] = []

    def write() -> None:
        payload = {
            "tag": tag,
            "stamp": stamp,
            "command": command,
            "split": [dataclasses.asdict(r) for r in split],
            "sweep": [dataclasses.asdict(r) for r in sweep],
        }
        common.write_results(tag, payload, to_markdown(tag, stamp, command, split, sweep), args.out_dir)

    for case in args.split_cases.split(","):
        shape = Shape.parse(case)
        for kernel in split_kernels:
            row = split_row(shape, args.dtype, kernel, args.device, args.reps)
            split.append(row)
            write()
            print(f"split {row.shape} {kernel}: kernels {row.kernels_us} stream {row.stream_us} us", flush=True)

    dtype = DTYPES[args.dtype]
    for h in (int(x) for x in args.sweep_h.split(",")):
        v = args.vocab or VOCAB.get(h)
        if v is None:
            raise SystemExit(f"no default vocabulary for H = {h}: pass --vocab")
        weight = make_weight(h, v, dtype, args.device)
        for n in (int(x) for x in args.sweep_n.split(",")):
            for kernel in sweep_kernels:
                with cuda_kernel(kernel):
                    fn = make_call(Shape(n, h, v), dtype, args.device, weight)
                    band = common.Band.of(timed_reps(fn, args.device, args.min_time, args.max_reps))
                sweep.append(
                    SweepRow(
                        n,
                        h,
                        v,
                        args.dtype,
                        kernel,
                        *(round(x * 1e6, 2) for x in (band.median, band.p20, band.p80)),
                        band.runs,
                    )
                )
                write()
                print(f"sweep N={n} H={h} {kernel}: {band.median * 1e6:.1f} us", flush=True)
        del weight
    print(f"wrote {tag}.json and .md")
    if args.device == "cuda":
        for h in sorted({r.H for r in sweep}):
            print(f"H = {h}: chunked faster for {crossover(sweep, h)}; fastest: {fastest(sweep, h)}")


if __name__ == "__main__":
    main()
