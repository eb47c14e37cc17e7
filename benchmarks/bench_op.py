"""How fast and how lean is the fused LM-head op compared with the obvious PyTorch code and public kernels?

Providers (each computes tokens / logp / grad of the LatentSeek update, or the closest outputs it can):
  gemm-pair           the op's two plain GEMMs, Z W^T ([N, V] logits) and P W (P an [N, V] matrix), 4NHV flops:
                      what any unfused implementation pays before its softmax, timed like a provider
  reference           latentseek_ext.reference, eager: materialises the [N, V] logits and softmax
  reference-compile   the same under torch.compile
  ext                 latentseek_ext.lm_head_policy_grad, impl="ext" (the compiled kernel of the device)
  ext-temperature, ext-entropy, ext-topk, ext-sample, ext-all
                      the same with an option (issue 14): temperature 0.7, entropy=True, topk=32, sample=True
                      (Gumbel-max with a seed), or all four; where the device's kernel implements the options.
                      Their target: <= 1.10x ext in the same rounds (ext-all has none)
  liger, cce          CUDA only, when importable: Liger's fused linear cross-entropy and Cut Cross-Entropy, which
                      give -logp of given tokens and, through backward, the input gradient (= our grad, reward 1)

Providers run interleaved, one call of each per round, so a noisy machine slows all of them alike and every round
gives a paired ratio (ext / reference, ext / gemm-pair, ...). A target is judged on the p20-p80 band of its ratio
over the rounds: PASS when the whole band meets it, FAIL when the whole band misses it, otherwise UNDECIDED. After
--min-runs rounds and --min-time seconds, rounds continue while a target of the case is undecided, up to --max-runs.
CUDA calls are timed with CUDA events (no L2 flush: W is larger than the L2 of the GPUs this targets), CPU calls
with the wall clock.

The physical floor of a case, measured in the same run: max(4NHV / the machine's matmul peak, bytes the op must
move (W read once, Z in, grad out) / the machine's copy bandwidth). The peak is a large square GEMM in the case's
dtype (or in float32, where this device multiplies that faster: the op may widen its tiles); the bandwidth is
(read + write) bytes of a large tensor copy over its time. Both are sampled once per round and the best sample
counts, so a round slowed by other processes does not lower the floor.

Peak extra memory of each provider is measured after a warm-up call: on CPU as the peak resident set over the
call, in a fresh subprocess; on CUDA as torch.cuda.max_memory_allocated, in this process.

    python benchmarks/bench_op.py --device cpu --cases headline --tag op-cpu-headline
    python benchmarks/bench_op.py --device cpu --cases grid --tag op-cpu-grid
    python benchmarks/bench_op.py --device cpu --cases headline --tag op-cpu-options --no-memory \
        --providers ext,ext-temperature,ext-entropy,ext-topk,ext-sample,ext-all
    python benchmarks/bench_op.py --device cuda --cases gpu --out-dir OUT --tag op-h100

Writes <out-dir>/<tag>.json, .md and .png. Writing into benchmarks/results/ needs a clean tree (or --allow-dirty).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import latentseek_ext  # noqa: E402
from latentseek_ext import reference  # noqa: E402

# (H, V) of the LM heads the issue names.
MODELS = {
    "Qwen2.5-0.5B": (896, 151936),
    "Qwen2.5-1.5B": (1536, 151936),
    "Qwen2.5-7B": (3584, 152064),
    "Llama-3.1-8B": (4096, 128256),
}
GRID_N = (64, 300, 2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GEMM_PAIR = "gemm-pair"
PHYSICAL_FLOOR, COPY_FLOOR = "physical-floor", "copy-floor"  # constants that targets may compare a time with


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    N: int
    H: int
    V: int
    dtype: str

    @property
    def flops(self) -> float:
        return 4.0 * self.N * self.H * self.V  # two GEMMs of 2NHV each

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.N, self.H, self.V)


@dataclasses.dataclass(frozen=True)
class Floors:
    """What the machine allows for a case, from this run's own measurements."""

    peak_flops: float  # flop/s of a large square GEMM
    peak_dtype: str
    copy_bandwidth: float  # bytes/s, (read + write) of a large copy
    flops: float  # 4NHV
    bytes: int  # W read once, Z in, grad out

    @property
    def compute_s(self) -> float:
        return self.flops / self.peak_flops

    @property
    def bytes_s(self) -> float:
        return self.bytes / self.copy_bandwidth

    @property
    def physical_s(self) -> float:
        return max(self.compute_s, self.bytes_s)


@dataclasses.dataclass(frozen=True)
class Result:
    """One provider on one case: its time of every round (round k of every provider ran back to back)."""

    case: Case
    provider: str
    times_s: tuple[float, ...] = ()
    peak_extra_bytes: int | None = None
    error: str | None = None

    @property
    def band(self) -> common.Band:
        return common.Band.of(self.times_s)


@dataclasses.dataclass(frozen=True)
class CaseRun:
    case: Case
    floors: Floors
    results: tuple[Result, ...]

    def result(self, provider: str) -> Result | None:
        return next((r for r in self.results if r.provider == provider and r.times_s), None)


@dataclasses.dataclass(frozen=True)
class Target:
    """``num / den <op> limit``, judged on the band over paired rounds (times) or on one measurement (memory).
    num and den are providers, or PHYSICAL_FLOOR / COPY_FLOOR (constants of the case)."""

    issue: str
    num: str
    den: str
    op: str
    limit: float
    dtype: str | None = None  # None: every dtype
    shape: tuple[int, int, int] | None = None  # None: every case
    memory: bool = False

    def applies(self, case: Case) -> bool:
        return (self.dtype is None or self.dtype == case.dtype) and (self.shape is None or self.shape == case.shape)

    @property
    def label(self) -> str:
        what = "peak extra memory" if self.memory else "time"
        if self.num in (PHYSICAL_FLOOR, COPY_FLOOR):
            return f"{self.num} / {self.den} {what} (fraction of the floor) {self.op} {self.limit:g}"
        return f"{self.num} / {self.den} {what} {self.op} {self.limit:g}"

    def values(self, run: CaseRun) -> list[float] | None:
        """The ratio per round (or the one memory ratio); None when a side was not measured."""
        if self.memory:
            a, b = run.result(self.num), run.result(self.den)
            if a is None or b is None or a.peak_extra_bytes is None or not b.peak_extra_bytes:
                return None
            return [a.peak_extra_bytes / b.peak_extra_bytes]
        constants = {PHYSICAL_FLOOR: run.floors.physical_s, COPY_FLOOR: run.floors.bytes_s}
        rounds = max((len(r.times_s) for r in run.results), default=0)

        def times(name: str) -> list[float] | None:
            if name in constants:
                return [constants[name]] * rounds
            r = run.result(name)
            return list(r.times_s) if r else None

        num, den = times(self.num), times(self.den)
        if not num or not den:
            return None
        return [a / b for a, b in zip(num, den, strict=True)]


#: The option providers (issue 14): the kernel with one option, or all of them.
EXT_OPTIONS: dict[str, dict] = {
    "ext-temperature": {"temperature": 0.7},
    "ext-entropy": {"entropy": True},
    "ext-topk": {"topk": 32},
    "ext-sample": {"sample": True, "seed": 1234},
    "ext-all": {"temperature": 0.7, "entropy": True, "topk": 32, "sample": True, "seed": 1234},
}
HEADLINE = (300, 896, 151936)
TARGETS = (
    # The op issue, on its headline case.
    Target("op", "ext", "reference", "<=", 0.5, "bf16", HEADLINE),
    Target("op", "ext", "reference", "<=", 0.9, "fp32", HEADLINE),
    Target("op", "ext", GEMM_PAIR, "<=", 1.5, None, HEADLINE),
    Target("op", "ext", "reference", "<=", 0.10, None, HEADLINE, memory=True),
    # The options issue: each option costs at most 10 % over the plain kernel, measured in the same rounds.
    *(Target("options", name, "ext", "<=", 1.10, None, HEADLINE) for name in EXT_OPTIONS if name != "ext-all"),
    # The CUDA issue (bf16).
    Target("cuda", PHYSICAL_FLOOR, "ext", ">=", 0.60, "bf16", (4096, 3584, 152064)),
    Target("cuda", COPY_FLOOR, "ext", ">=", 0.70, "bf16", (64, 896, 151936)),
    Target("cuda", "ext", "liger", "<", 1.0, "bf16"),
    Target("cuda", "ext", "cce", "<", 1.0, "bf16"),
)


def targets_for(case: Case, device_kind: str) -> list[Target]:
    return [t for t in TARGETS if t.applies(case) and (t.issue != "cuda" or device_kind == "cuda")]


def cases_for(preset: str, dtypes: list[str]) -> list[Case]:
    if preset == "headline":  # the op issue's acceptance case
        shapes = [("Qwen2.5-0.5B", 300)]
    elif preset in ("grid", "gpu"):
        shapes = [(m, n) for m in MODELS for n in GRID_N]
        if preset == "gpu":  # the CUDA issue's two extra shapes
            shapes += [("Qwen2.5-7B", 4096), ("Qwen2.5-0.5B", 64)]
    elif ":" in preset:  # an explicit list, e.g. "Qwen2.5-0.5B:64,Qwen2.5-7B:4096"
        shapes = []
        for item in preset.split(","):
            model, _, n = item.partition(":")
            if model not in MODELS or not n.isdigit():
                raise SystemExit(f"bad case {item!r} in --cases: MODEL:N with MODEL one of {', '.join(MODELS)}")
            shapes.append((model, int(n)))
    else:
        raise SystemExit(f"unknown --cases {preset!r}: headline, grid, gpu or a list MODEL:N,...")
    for dt in dtypes:
        if dt not in DTYPES:
            raise SystemExit(f"unknown dtype {dt!r} in --dtypes: one of {', '.join(DTYPES)}")
    return list(dict.fromkeys(Case(m, n, *MODELS[m], dt) for dt in dtypes for m, n in shapes))


def make_inputs(case: Case, device: str) -> dict:
    """Inputs created directly in the target dtype, so no transient copy inflates the memory measurement."""
    dt = DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(case.N, case.H, dtype=dt, device=device, generator=g)
    weight = torch.randn(case.V, case.H, dtype=dt, device=device, generator=g)
    weight.mul_(2.0 / case.H**0.5)  # logits with a spread of a few units, as in a trained LM head
    reward = torch.randn(case.N, device=device, generator=g)
    targets = torch.randint(0, case.V, (case.N,), device=device, generator=g)
    return {"hidden": hidden, "weight": weight, "reward": reward, "targets": targets}


# --- providers -----------------------------------------------------------------------------------------------------


def _liger(inputs: dict) -> Callable[[], object]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    w = inputs["weight"]

    def run():
        z = inputs["hidden"].detach().requires_grad_()
        loss = loss_fn(w, z, inputs["targets"])  # Liger's argument order: (lin_weight, input, target)
        loss.backward()
        return loss, z.grad

    return run


def _cce(inputs: dict) -> Callable[[], object]:
    from cut_cross_entropy import linear_cross_entropy

    w = inputs["weight"]

    def run():
        z = inputs["hidden"].detach().requires_grad_()
        loss = linear_cross_entropy(z, w, inputs["targets"], reduction="none")
        loss.sum().backward()
        return loss, z.grad

    return run


def _best_time(fn: Callable[[], object], device: str, reps: int = 3) -> float:
    fn()
    return min(common.time_once(fn, device) for _ in range(reps))


def _gemm_pair(inputs: dict, device: str) -> Callable[[], object]:
    """Z W^T and P W, in the input dtype or in float32 on upcast inputs, whichever this device multiplies faster
    (on CPUs without bf16 matrix units float32 wins, and it is exact for bf16/fp16 inputs): a slice decides."""
    h, w = inputs["hidden"], inputs["weight"]
    N, H = h.shape
    gemm_dtype = h.dtype
    if h.dtype != torch.float32:
        T = min(w.shape[0], 1024)
        rate = {}
        for dt in (h.dtype, torch.float32):
            z, wt = h.to(dt), w[:T].to(dt)
            rate[dt] = 2 * N * H * T / _best_time(lambda z=z, wt=wt: (F.linear(z, wt), z.new_ones(N, T) @ wt), device)
        gemm_dtype = max(rate, key=rate.get)
    z, wg = h.to(gemm_dtype), w.to(gemm_dtype)
    p = torch.rand(N, w.shape[0], dtype=gemm_dtype, device=h.device)
    return lambda: (F.linear(z, wg), p @ wg)


def provider_fn(name: str, inputs: dict, device: str) -> Callable[[], object]:
    h, w, r = inputs["hidden"], inputs["weight"], inputs["reward"]
    if name == GEMM_PAIR:
        return _gemm_pair(inputs, device)
    if name == "reference":
        return lambda: reference.lm_head_policy_grad(h, w, r)
    if name == "reference-compile":
        compiled = torch.compile(reference.lm_head_policy_grad, dynamic=False)
        return lambda: compiled(h, w, r)
    if name == "ext":
        return lambda: latentseek_ext.lm_head_policy_grad(h, w, r, impl="ext")
    if name in EXT_OPTIONS:
        options = EXT_OPTIONS[name]
        return lambda: latentseek_ext.lm_head_policy_grad(h, w, r, impl="ext", **options)
    if name == "liger":
        return _liger(inputs)
    if name == "cce":
        return _cce(inputs)
    raise SystemExit(f"unknown provider {name!r}")


def available_providers(device: str) -> list[str]:
    names = [GEMM_PAIR, "reference", "reference-compile"]
    if latentseek_ext.extension_available(device):
        names.append("ext")
    if torch.device(device).type in latentseek_ext.EXTENSION_OPTIONS_DEVICES:
        names.extend(EXT_OPTIONS)
    if device.startswith("cuda"):
        for name, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
            try:
                __import__(module)
                names.append(name)
            except ImportError:
                pass
    return names


# --- the machine: matmul peak and copy bandwidth -------------------------------------------------------------------


class MachineProbe:
    """The machine's matmul peak (a large square GEMM in the case's dtype, and in float32 where that is faster: the op
    may widen its tiles) and copy bandwidth ((read + write) bytes of a copy far larger than the last-level cache),
    sampled once per round beside the providers. The floor uses the best sample, so rounds slowed by other processes
    do not lower it."""

    def __init__(self, device: str, dtype: str) -> None:
        # A CPU's rate peaks at n ~ 1024 (operands in L2/L3; measured on an AVX-512 EPYC); three calls per sample
        # give a shared CPU's idle moments a chance to show.
        n, self.calls = (8192, 1) if device.startswith("cuda") else (1024, 3)
        self.device, self.gemms = device, {}
        for name in dict.fromkeys([dtype, "fp32"]):
            a = torch.randn(n, n, dtype=DTYPES[name], device=device)
            b = torch.randn(n, n, dtype=DTYPES[name], device=device)
            self.gemms[name] = (lambda a=a, b=b: a @ b, 2.0 * n**3)
        numel = (1 << 28) if device.startswith("cuda") else (1 << 26)  # 1 GiB / 256 MiB of float32
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        self.copy = (lambda: dst.copy_(src), 2.0 * numel * 4)
        self.rate = dict.fromkeys(self.gemms, 0.0)
        self.bandwidth = 0.0

    def sample(self) -> None:
        for name, (fn, flops) in self.gemms.items():
            best = min(common.time_once(fn, self.device) for _ in range(self.calls))
            self.rate[name] = max(self.rate[name], flops / best)
        fn, nbytes = self.copy
        self.bandwidth = max(self.bandwidth, nbytes / common.time_once(fn, self.device))

    def floors(self, case: Case) -> Floors:
        peak_dtype = max(self.rate, key=self.rate.get)
        size = DTYPES[case.dtype].itemsize
        nbytes = case.V * case.H * size + case.N * case.H * size + case.N * case.H * 4 + case.N * 16
        return Floors(self.rate[peak_dtype], peak_dtype, self.bandwidth, case.flops, nbytes)


# --- memory: CPU in a fresh subprocess, CUDA in-process ---------------------------------------------------------------


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return common.peak_rss_bytes()


def memory_probe(provider: str, case: Case) -> dict:
    """Runs in its own process: peak resident memory of one CPU call beyond the inputs (after a warm-up call)."""
    inputs = make_inputs(case, "cpu")
    fn = provider_fn(provider, inputs, "cpu")
    fn()  # warm-up: compilation, caches
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = common.current_rss_bytes()
    out = fn()
    extra = _vm_hwm_bytes() - base
    del out
    return {"peak_extra_bytes": int(extra)}


def cpu_peak_extra(provider: str, case: Case) -> tuple[int | None, str | None]:
    """CPU peak memory in a fresh subprocess (the resident set has no reset that ignores what earlier providers left
    behind)."""
    cmd = [sys.executable, __file__, "--memory-probe", provider, "--probe-case", json.dumps(dataclasses.asdict(case))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return None, common.scrub_paths((proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"], None


def cuda_peak_extra(fn: Callable[[], object]) -> int:
    """Peak bytes allocated during one call beyond what was allocated before it (the caching allocator counts
    allocated bytes exactly, so this needs no fresh process; fn has already run, so compilation is done)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return int(extra)


# --- the run -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunOptions:
    min_runs: int
    max_runs: int
    min_time: float
    memory: bool


def _undecided(targets: list[Target], run: CaseRun) -> bool:
    for t in targets:
        values = None if t.memory else t.values(run)
        if values and common.verdict(common.Band.of(values), t.op, t.limit) == common.UNDECIDED:
            return True
    return False


def run_case(case: Case, providers: list[str], device: str, opts: RunOptions) -> CaseRun:
    inputs = make_inputs(case, device)
    probe = MachineProbe(device, case.dtype)
    probe.sample()  # warm-up
    fns, errors = {}, {}
    for name in providers:
        try:
            fns[name] = provider_fn(name, inputs, device)
            fns[name]()  # warm-up (and compilation)
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            errors[name] = common.scrub_paths(f"{type(e).__name__}: {e}")
            fns.pop(name, None)
    cuda_memory = {}
    if opts.memory and device.startswith("cuda"):
        cuda_memory = {name: cuda_peak_extra(fn) for name, fn in fns.items() if name != GEMM_PAIR}
    targets = targets_for(case, torch.device(device).type)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while fns:
        for name, fn in fns.items():  # interleaved: one run of each provider per round
            times[name].append(common.time_once(fn, device))
        probe.sample()
        runs = len(next(iter(times.values())))
        if runs >= opts.max_runs:
            break
        if runs < opts.min_runs or time.perf_counter() - start < opts.min_time:
            continue
        partial = CaseRun(case, probe.floors(case), tuple(Result(case, n, tuple(t)) for n, t in times.items()))
        if not _undecided(targets, partial):
            break
    floors = probe.floors(case)
    del fns, probe
    gc.collect()
    results = []
    for name in providers:
        peak, mem_error = cuda_memory.get(name), None
        if opts.memory and name not in errors and name != GEMM_PAIR and not device.startswith("cuda"):
            peak, mem_error = cpu_peak_extra(name, case)
        error = errors.get(name) or mem_error
        results.append(Result(case, name, tuple(times.get(name, ())), peak, error))
    run = CaseRun(case, floors, tuple(results))
    for line in table_rows(run):
        print(" | ".join(str(c) for c in line), flush=True)
    return run


# --- report --------------------------------------------------------------------------------------------------------


def _fmt_bytes(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def table_rows(run: CaseRun) -> list[list[object]]:
    c, pair = run.case, run.result(GEMM_PAIR)
    rows = []
    for r in run.results:
        head = [c.model, c.N, c.H, c.V, c.dtype, r.provider]
        if not r.times_s:
            rows.append(head + ["error", "", "", "", "", "", (r.error or "")[:80]])
            continue
        b = r.band
        vs_pair = common.Band.of([a / p for a, p in zip(r.times_s, pair.times_s, strict=True)]) if pair else None
        rows.append(
            head
            + [
                f"{b.median * 1e3:.2f}",
                f"{b.p20 * 1e3:.2f}-{b.p80 * 1e3:.2f}",
                f"{c.flops / b.median / 1e9:.1f}",
                f"{vs_pair.median:.2f} ({vs_pair.p20:.2f}-{vs_pair.p80:.2f})" if vs_pair else "n/a",
                f"{run.floors.physical_s / b.median:.2f}",
                _fmt_bytes(r.peak_extra_bytes) if r.error is None else f"error: {r.error[:60]}",
                b.runs,
            ]
        )
    return rows


TABLE_HEADERS = [
    "model",
    "N",
    "H",
    "V",
    "dtype",
    "provider",
    "median ms",
    "p20-p80 ms",
    "GFLOP/s",
    "x gemm-pair (p20-p80)",
    "fraction of physical floor",
    "peak extra mem",
    "runs",
]


def floor_rows(runs: list[CaseRun]) -> list[list[object]]:
    rows = []
    for run in runs:
        c, f, pair = run.case, run.floors, run.result(GEMM_PAIR)
        rows.append(
            [
                f"{c.model} N={c.N} {c.dtype}",
                f"{pair.band.median * 1e3:.2f}" if pair else "n/a",
                f"{f.compute_s * 1e3:.2f} ({f.peak_flops / 1e12:.2f} TFLOP/s {f.peak_dtype})",
                f"{f.bytes_s * 1e3:.2f} ({f.bytes / 1e6:.0f} MB at {f.copy_bandwidth / 1e9:.0f} GB/s)",
                f"{f.physical_s * 1e3:.2f}",
            ]
        )
    return rows


def target_lines(runs: list[CaseRun], device_kind: str) -> list[str]:
    """Every target of every case, judged on this run's numbers."""
    lines = []
    for run in runs:
        c = run.case
        for t in targets_for(c, device_kind):
            values = t.values(run)
            if values is None:
                continue
            band = common.Band.of(values)
            spread = "" if t.memory else f" (p20-p80 {band.p20:.2f}-{band.p80:.2f}, {band.runs} rounds)"
            lines.append(
                f"- {t.issue}: {c.model} N={c.N} H={c.H} V={c.V} {c.dtype}: {t.label}: {band.median:.3g}{spread} "
                f"-> {common.verdict(band, t.op, t.limit)}"
            )
        ext, ref = run.result("ext"), run.result("reference")
        if device_kind == "cuda" and ext and ext.peak_extra_bytes is not None:
            nh = c.N * c.H * 4
            ref_txt = f"; the reference's {ref.peak_extra_bytes / nh:.0f} x" if ref and ref.peak_extra_bytes else ""
            lines.append(
                f"- {c.model} N={c.N} {c.dtype}: ext peak extra memory = {ext.peak_extra_bytes / nh:.2f} "
                f"x N*H*4 bytes{ref_txt}"
            )
    return lines


def to_payload(tag: str, stamp: dict, command: str, providers: list[str], runs: list[CaseRun]) -> dict:
    cases = []
    for run in runs:
        cases.append(
            {
                "case": dataclasses.asdict(run.case),
                "floors": {
                    **dataclasses.asdict(run.floors),
                    "compute_s": run.floors.compute_s,
                    "bytes_s": run.floors.bytes_s,
                    "physical_s": run.floors.physical_s,
                },
                "results": [
                    {k: v for k, v in dataclasses.asdict(r).items() if k != "case"}
                    | (dataclasses.asdict(r.band) if r.times_s else {})
                    for r in run.results
                ],
            }
        )
    return {"tag": tag, "stamp": stamp, "command": command, "providers": providers, "cases": cases}


def to_markdown(tag: str, stamp: dict, command: str, runs: list[CaseRun]) -> str:
    md = f"# Fused LM-head op benchmark: {tag}\n\n" + common.stamp_markdown(stamp) + "\n"
    md += f"Command: `{command}`\n\n"
    if "ext_cpu_path" in stamp:
        paths = ", ".join(f"{dt}: {path}" for dt, path in stamp["ext_cpu_path"].items())
        md += f"The ext CPU kernel's tile products per input dtype: {paths} (widen: in fp32).\n\n"
    md += common.markdown_table(TABLE_HEADERS, [row for run in runs for row in table_rows(run)])
    md += (
        "\nProviders ran interleaved, one call each per round. GFLOP/s = 4NHV / median. x gemm-pair: the provider's "
        "time over the two plain GEMMs' time in the same round (median and p20-p80 over rounds). Fraction of "
        "physical floor = physical floor / median (1.0 = at the floor).\n\n## Floors\n\n"
    )
    md += common.markdown_table(
        ["case", "gemm-pair ms", "4NHV at the matmul peak, ms", "bytes at the copy bandwidth, ms", "physical floor ms"],
        floor_rows(runs),
    )
    md += (
        "\nThe matmul peak is a large square GEMM and the bandwidth a large copy, the best of one sample per round; "
        "the physical floor is the larger of the two times.\n"
    )
    lines = target_lines(runs, stamp["device_kind"])
    if lines:
        md += (
            "\n## Targets\n\nJudged on the p20-p80 band of the ratio over paired rounds: PASS when the whole band "
            "meets the target, FAIL when the whole band misses it.\n\n" + "\n".join(lines) + "\n"
        )
    return md


def plot(runs: list[CaseRun], stamp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.case.dtype for r in runs))
    providers = list(dict.fromkeys(r.provider for run in runs for r in run.results if r.times_s))
    n_cases = max(sum(r.case.dtype == dt for r in runs) for dt in dtypes) if runs else 1
    fig_width = min(24.0, max(6.0, 0.25 * n_cases * len(providers) + 2))  # a quarter inch per bar
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(fig_width, 4 * len(dtypes)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, dt in zip(axes[:, 0], dtypes, strict=True):
        dt_runs = [run for run in runs if run.case.dtype == dt]
        for i, p in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for j, run in enumerate(dt_runs):
                r = run.result(p)
                if r is not None:
                    b = r.band
                    xs.append(j + i * width)
                    ys.append(b.median)
                    lo.append(b.median - b.p20)
                    hi.append(b.p80 - b.median)
            ax.bar(xs, ys, width, yerr=[lo, hi], label=p, capsize=2)
        centres = [j + 0.4 - width / 2 for j in range(len(dt_runs))]
        floors = [run.floors.physical_s for run in dt_runs]
        ax.scatter(centres, floors, marker="_", s=400, color="k", label="physical floor", zorder=3)
        ax.set_xticks(centres)
        ax.set_xticklabels([f"{run.case.model}\nN={run.case.N}" for run in dt_runs], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median, p20-p80)")
        ax.set_title(f"{dt}\n{stamp['device']}", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="headline", help="headline | grid | gpu | MODEL:N,...")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--providers", default=None, help="comma list; default: all available on the device")
    common.add_output_args(ap, default_tag=None)
    ap.add_argument("--min-runs", type=int, default=10, help="rounds per case before the targets may stop it")
    ap.add_argument("--max-runs", type=int, default=30, help="most rounds per case (a target may stay undecided)")
    ap.add_argument("--min-time", type=float, default=10.0, help="seconds of rounds per case before stopping")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider peak-memory measurement")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, Case(**json.loads(args.probe_case)))))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    if args.max_runs < 1:
        raise SystemExit(f"--max-runs must be >= 1, got {args.max_runs}")
    dirty = common.check_tree(args.out_dir, args.allow_dirty)
    providers = args.providers.split(",") if args.providers else available_providers(args.device)
    if GEMM_PAIR not in providers:
        providers.insert(0, GEMM_PAIR)  # the x gemm-pair column and target need it
    cases = cases_for(args.cases, args.dtypes.split(","))
    tag = args.tag or f"op-{args.device}-{args.cases}"
    stamp, command = (
        common.stamp(args.device, dirty),
        common.command_line(sys.argv if argv is None else [__file__, *argv]),
    )
    if args.device == "cpu" and "ext" in providers:  # which tile products the CPU kernel runs, per dtype
        stamp["ext_cpu_path"] = {dt: torch.ops.latentseek_ext.cpu_path(DTYPES[dt]) for dt in args.dtypes.split(",")}
    opts = RunOptions(min(args.min_runs, args.max_runs), args.max_runs, args.min_time, not args.no_memory)
    runs: list[CaseRun] = []
    for case in cases:
        runs.append(run_case(case, providers, args.device, opts))
        payload = to_payload(tag, stamp, command, providers, runs)  # partial results survive a crash
        common.write_results(tag, payload, to_markdown(tag, stamp, command, runs), args.out_dir)
    plot(runs, stamp, args.out_dir / f"{tag}.png")
    print(f"wrote {tag}.json, .md and .png")
    print("\n".join(target_lines(runs, stamp["device_kind"])))


if __name__ == "__main__":
    main()
