"""How fast and how lean is the fused LM-head op compared with the obvious PyTorch code and public kernels?

Providers (each computes tokens / logp / grad of the LatentSeek update, or the closest outputs it can):
  reference           latentseek_ext.reference, eager: materialises the [N, V] logits and softmax
  reference-compile   the same under torch.compile
  ext                 latentseek_ext.lm_head_policy_grad, impl="ext" (the compiled kernel of the device)
  liger, cce          CUDA only, when importable: Liger's fused linear cross-entropy and Cut Cross-Entropy, which
                      give -logp of given tokens and, through backward, the input gradient (= our grad, reward 1)

For each case (N, H, V, dtype) it reports the median time with its p20-p80 band (providers interleaved run by run so
that a noisy machine slows all of them alike), GFLOP/s as 4NHV / t, and the fraction of the floor: the floor is
max(4NHV / the fastest matmul rate measured in this run for these shapes, bytes that must move / measured copy
bandwidth). Peak extra memory of each provider is measured after a warm-up call: on CPU as the peak resident set
over the call, in a fresh subprocess; on CUDA as torch.cuda.max_memory_allocated, in this process.

    python benchmarks/bench_op.py --device cpu --cases headline --tag op-cpu-headline
    python benchmarks/bench_op.py --device cpu --cases grid --tag op-cpu-grid
    python benchmarks/bench_op.py --device cuda --cases gpu --out-dir OUT --tag op-h100

Writes <out-dir>/<tag>.json, .md and .png.
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
    seen, out = set(), []
    for dt in dtypes:
        for m, n in shapes:
            c = Case(m, n, *MODELS[m], dt)
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


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


def provider_fn(name: str, inputs: dict) -> Callable[[], object]:
    h, w, r = inputs["hidden"], inputs["weight"], inputs["reward"]
    if name == "reference":
        return lambda: reference.lm_head_policy_grad(h, w, r)
    if name == "reference-compile":
        compiled = torch.compile(reference.lm_head_policy_grad, dynamic=False)
        return lambda: compiled(h, w, r)
    if name == "ext":
        return lambda: latentseek_ext.lm_head_policy_grad(h, w, r, impl="ext")
    if name == "liger":
        return _liger(inputs)
    if name == "cce":
        return _cce(inputs)
    raise SystemExit(f"unknown provider {name!r}")


def available_providers(device: str) -> list[str]:
    names = ["reference", "reference-compile"]
    if latentseek_ext.extension_available(device):
        names.append("ext")
    if device.startswith("cuda"):
        for name, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
            try:
                __import__(module)
                names.append(name)
            except ImportError:
                pass
    return names


# --- the floor -----------------------------------------------------------------------------------------------------


def _best_time(fn: Callable[[], object], device: str, reps: int = 3) -> float:
    fn()
    return min(common.time_once(fn, device) for _ in range(reps))


FLOOR = "gemm-pair"  # the pseudo-provider whose time is the matmul floor


def floor_setup(case: Case, inputs: dict, device: str) -> tuple[Callable[[], object], dict]:
    """The matmul floor as something to time beside the providers: the two plain GEMMs of the op,
    Z @ W^T ([N, V] logits) and P @ W (P an [N, V] matrix), 4NHV flops in all.

    They run in the input dtype or in float32 on upcast inputs, whichever this device multiplies faster (on CPUs
    without bf16 matrix units float32 wins, and it is exact for bf16/fp16 inputs): a quick slice of both decides.
    Also returns the memory floor: the bytes the op must move (W once, Z in, grad out) over the measured copy
    bandwidth.
    """
    h, w = inputs["hidden"], inputs["weight"]
    N, H, V = case.N, case.H, case.V
    gemm_dtype = h.dtype
    if h.dtype != torch.float32:
        T = min(V, 1024)
        rate = {}
        for dt in (h.dtype, torch.float32):
            z, wt = h.to(dt), w[:T].to(dt)
            rate[dt] = 2 * N * H * T / _best_time(lambda z=z, wt=wt: (F.linear(z, wt), z.new_ones(N, T) @ wt), device)
        gemm_dtype = max(rate, key=rate.get)
    z, wg = h.to(gemm_dtype), w.to(gemm_dtype)
    p = torch.rand(N, V, dtype=gemm_dtype, device=h.device)

    def gemm_pair():
        return F.linear(z, wg), p @ wg

    nbytes = w.numel() * w.element_size() + h.numel() * h.element_size() + N * H * 4 + N * 16
    buf = torch.empty(max(nbytes // 4, 1 << 26), dtype=torch.float32, device=h.device)
    dst = torch.empty_like(buf)
    bandwidth = 2 * buf.numel() * 4 / _best_time(lambda: dst.copy_(buf), device)  # read + write
    info = {
        "gemm_dtype": str(gemm_dtype).replace("torch.", ""),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "bytes_floor_s": nbytes / bandwidth,
    }
    return gemm_pair, info


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
    fn = provider_fn(provider, inputs)
    fn()  # warm-up: compilation, caches
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = common.current_rss_bytes()
    out = fn()
    extra = _vm_hwm_bytes() - base
    del out
    return {"peak_extra_bytes": int(extra)}


def measure_memory(provider: str, case: Case) -> dict:
    """CPU peak memory in a fresh subprocess (the resident set has no reset that ignores what earlier providers left
    behind). CUDA memory needs no fresh process: cuda_peak_extra, called in the benchmark's own process."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-probe",
        provider,
        "--probe-case",
        json.dumps(dataclasses.asdict(case)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"peak_extra_bytes": None, "memory_error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_peak_extra(fn: Callable[[], object]) -> dict:
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
    return {"peak_extra_bytes": int(extra)}


# --- the run -------------------------------------------------------------------------------------------------------


def run_case(
    case: Case, providers: list[str], device: str, min_time: float, max_runs: int, with_memory: bool
) -> list[dict]:
    inputs = make_inputs(case, device)
    gemm_pair, floor = floor_setup(case, inputs, device)
    fns, errors = {FLOOR: gemm_pair}, {}
    gemm_pair()
    for name in providers:
        try:
            fns[name] = provider_fn(name, inputs)
            fns[name]()  # warm-up (and compilation)
        except Exception as e:  # a provider that cannot run this case is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
            fns.pop(name, None)
    cuda_memory = {}
    if with_memory and device.startswith("cuda"):
        cuda_memory = {name: cuda_peak_extra(fn) for name, fn in fns.items() if name != FLOOR}
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while fns and (
        min(len(t) for t in times.values()) < 3
        or (time.perf_counter() - start < min_time and min(len(t) for t in times.values()) < max_runs)
    ):
        for name, fn in fns.items():  # interleaved: one run of each provider per round
            times[name].append(common.time_once(fn, device))
    del fns, gemm_pair
    gc.collect()
    floor["gemm_floor_s"] = common.summarize(times[FLOOR])["median_s"]
    floor["floor_s"] = max(floor["gemm_floor_s"], floor["bytes_floor_s"])
    rows = []
    for name in [FLOOR] + providers:
        row = {**dataclasses.asdict(case), "provider": name, "floor": floor}
        if name in errors:
            row["error"] = errors[name]
        else:
            s = common.summarize(times[name])
            row.update(s)
            row["gflops"] = case.flops / s["median_s"] / 1e9
            row["fraction_of_floor"] = floor["floor_s"] / s["median_s"]
        if name in cuda_memory:
            row.update(cuda_memory[name])
        elif with_memory and name not in errors and name != FLOOR:  # on CPU; CUDA rows came from cuda_memory
            row.update(measure_memory(name, case))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "floor"}), flush=True)
    return rows


def _fmt_bytes(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def acceptance(rows: list[dict]) -> list[str]:
    """The op issue's targets on its headline case, checked against this run's own numbers."""
    lines = []
    for dt, speed_target in (("bf16", 0.5), ("fp32", 0.9)):
        by = {r["provider"]: r for r in rows if (r["N"], r["H"], r["V"], r["dtype"]) == (300, 896, 151936, dt)}
        ext, ref = by.get("ext"), by.get("reference")
        if not ext or not ref or "median_s" not in ext or "median_s" not in ref:
            continue
        ratio = ext["median_s"] / ref["median_s"]
        vs_floor = ext["median_s"] / ext["floor"]["floor_s"]
        lines.append(
            f"- {dt}: ext / reference = {ratio:.2f} (target <= {speed_target}) "
            f"{'PASS' if ratio <= speed_target else 'FAIL'}; ext / floor = {vs_floor:.2f} (target <= 1.5) "
            f"{'PASS' if vs_floor <= 1.5 else 'FAIL'}"
        )
        if ext.get("peak_extra_bytes") is not None and ref.get("peak_extra_bytes"):
            mem = ext["peak_extra_bytes"] / ref["peak_extra_bytes"]
            lines.append(
                f"- {dt}: ext peak extra memory / reference's = {mem:.3f} (target <= 0.10) "
                f"{'PASS' if mem <= 0.10 else 'FAIL'}"
            )
    return lines


def cuda_acceptance(rows: list[dict]) -> list[str]:
    """The CUDA issue's targets, checked against this run's own numbers (bf16)."""
    lines = []

    def ext_row(n, h, v):
        return next(
            (r for r in rows if r["provider"] == "ext" and (r["N"], r["H"], r["V"], r["dtype"]) == (n, h, v, "bf16")),
            None,
        )

    big = ext_row(4096, 3584, 152064)
    if big and "median_s" in big:
        f = big["fraction_of_floor"]
        lines.append(f"- N=4096 H=3584 V=152064 bf16: fraction of the floor {f:.2f} (target >= 0.60) {_pass(f >= 0.6)}")
    small = ext_row(64, 896, 151936)
    if small and "median_s" in small:
        f = small["floor"]["bytes_floor_s"] / small["median_s"]
        lines.append(
            f"- N=64 H=896 V=151936 bf16: fraction of the copy bandwidth {f:.2f} (target >= 0.70) {_pass(f >= 0.7)}"
        )
    cases = list(dict.fromkeys((r["model"], r["N"], r["H"], r["V"], r["dtype"]) for r in rows))
    for c in cases:
        by = {r["provider"]: r for r in rows if (r["model"], r["N"], r["H"], r["V"], r["dtype"]) == c}
        ext = by.get("ext")
        if not ext or "median_s" not in ext:
            continue
        label = f"{c[0]} N={c[1]} {c[4]}"
        for other in ("liger", "cce"):
            o = by.get(other)
            if o and "median_s" in o:
                ratio = ext["median_s"] / o["median_s"]
                lines.append(f"- {label}: ext / {other} time = {ratio:.2f} (target < 1) {_pass(ratio < 1)}")
        if ext.get("peak_extra_bytes") is not None:
            nh = c[1] * c[2] * 4
            ref = by.get("reference", {}).get("peak_extra_bytes")
            ref_txt = f"; the reference's {ref / nh:.0f} x" if ref else ""
            lines.append(
                f"- {label}: ext peak extra memory = {ext['peak_extra_bytes'] / nh:.2f} x N*H*4 bytes{ref_txt}"
            )
    return lines


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def to_markdown(payload: dict) -> str:
    rows = payload["rows"]
    table = []
    for r in rows:
        case = [r["model"], r["N"], r["H"], r["V"], r["dtype"], r["provider"]]
        if "median_s" in r:
            table.append(
                case
                + [
                    f"{r['median_s'] * 1e3:.1f}",
                    f"{r['p20_s'] * 1e3:.1f}-{r['p80_s'] * 1e3:.1f}",
                    f"{r['gflops']:.1f}",
                    f"{r['floor']['floor_s'] * 1e3:.1f}",
                    f"{r['fraction_of_floor']:.2f}",
                    _fmt_bytes(r.get("peak_extra_bytes")),
                    r["runs"],
                ]
            )
        else:
            table.append(case + ["error", "", "", "", "", "", r.get("error", "")[:80]])
    md = f"# Fused LM-head op benchmark: {payload['tag']}\n\n" + common.stamp_markdown(payload["stamp"]) + "\n"
    md += "Command: `" + payload["command"] + "`\n\n"
    md += common.markdown_table(
        [
            "model",
            "N",
            "H",
            "V",
            "dtype",
            "provider",
            "median ms",
            "p20-p80 ms",
            "GFLOP/s",
            "floor ms",
            "fraction of floor",
            "peak extra mem",
            "runs",
        ],
        table,
    )
    md += (
        "\nGFLOP/s = 4NHV / median time. floor = max(4NHV / fastest measured matmul rate for these shapes, "
        "bytes / measured copy bandwidth); fraction of floor = floor / median (1.0 = at the floor).\n"
    )
    checks = acceptance(rows)
    if checks:
        md += "\n## Targets of the op issue (N=300, H=896, V=151936)\n\n" + "\n".join(checks) + "\n"
    if payload["stamp"].get("device_kind") == "cuda":
        checks = cuda_acceptance(rows)
        if checks:
            md += "\n## Targets of the CUDA issue\n\n" + "\n".join(checks) + "\n"
    return md


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "median_s" in r]
    dtypes = sorted({r["dtype"] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    n_cases = max(len({(r["model"], r["N"]) for r in rows if r["dtype"] == dt}) for dt in dtypes) if rows else 1
    width = min(24.0, max(6.0, 0.25 * n_cases * len(providers) + 2))  # a quarter inch per bar
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, 4 * len(dtypes)), squeeze=False)
    for ax, dt in zip(axes[:, 0], dtypes, strict=True):
        cases = list(dict.fromkeys((r["model"], r["N"]) for r in rows if r["dtype"] == dt))
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for j, c in enumerate(cases):
                for r in rows:
                    if r["dtype"] == dt and r["provider"] == p and (r["model"], r["N"]) == c:
                        xs.append(j + i * width)
                        ys.append(r["median_s"])
                        lo.append(r["median_s"] - r["p20_s"])
                        hi.append(r["p80_s"] - r["median_s"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=p, capsize=2)
        floors = [
            next(r["floor"]["floor_s"] for r in rows if r["dtype"] == dt and (r["model"], r["N"]) == c) for c in cases
        ]
        ax.scatter(
            [j + 0.4 - width / 2 for j in range(len(cases))],
            floors,
            marker="_",
            s=400,
            color="k",
            label="floor",
            zorder=3,
        )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{m}\nN={n}" for m, n in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median, p20-p80)")
        ax.set_title(f"{dt} on {payload['stamp']['device'][:60]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="headline", help="headline | grid | gpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--providers", default=None, help="comma list; default: all available on the device")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    ap.add_argument("--min-time", type=float, default=10.0, help="seconds of timed runs per case (at least 3 runs)")
    ap.add_argument("--max-runs", type=int, default=15)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider peak-memory measurement")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, Case(**json.loads(args.probe_case)))))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    providers = args.providers.split(",") if args.providers else available_providers(args.device)
    cases = cases_for(args.cases, args.dtypes.split(","))
    tag = args.tag or f"op-{args.device}-{args.cases}"
    payload = {
        "tag": tag,
        "stamp": {**common.stamp(args.device), "device_kind": torch.device(args.device).type},
        "command": " ".join(["python"] + sys.argv),
        "providers": providers,
        "rows": [],
    }
    for case in cases:
        payload["rows"] += run_case(case, providers, args.device, args.min_time, args.max_runs, not args.no_memory)
        common.write_results(tag, payload, to_markdown(payload), args.out_dir)  # partial results survive a crash
    json_path, md_path = common.write_results(tag, payload, to_markdown(payload), args.out_dir)
    plot(payload, args.out_dir / f"{tag}.png")
    print(f"wrote {json_path}, {md_path}, {args.out_dir / (tag + '.png')}")
    print("\n".join(acceptance(payload["rows"])))
    if args.device.startswith("cuda"):
        print("\n".join(cuda_acceptance(payload["rows"])))


if __name__ == "__main__":
    main()
