"""The engine on a GPU: ``bench_loop.py --device cuda`` (``--sweep --device cpu`` runs the same code on the CPU, as the
tests' smoke run on a tiny model).

Random weights with real architectures (default Qwen2.5-1.5B and Qwen2.5-7B), built on the device in --dtype
(default: :func:`latentseek.model.default_dtype`, bf16 on CUDA); chat prompts of exactly --prompt-tokens tokens (a
word-level tokenizer over the model's vocabulary); answers of --answer-tokens tokens (a random model almost never
emits its end-of-turn token; the tokens generated are counted, not assumed); a scripted reward (-1 for --steps
answers, then 0), so every problem takes exactly --steps LatentSeek steps. In one run, per architecture:

1. **LatentSeek per batch size** (--batches; a batch that runs out of memory is recorded as such), for each --impls
   of the fused op (``reference`` is our loop with the logits materialised): problems per minute, tokens per second
   of the generate phase (prefills included), seconds per phase (generate / reward / update) and the op's share of
   update, peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS so far).
2. **Decode rate per batch size and decode path** (--decodes: ``eager`` and the static-shape ``graph`` step): a
   generation of --answer-tokens tokens per row minus a prefill-only one (capture included, as every call pays
   it), next to the **floor**: the bytes a decode step must read (the weights the step multiplies by, plus the
   keys and values at the answer's mean length) at the copy bandwidth measured in this run.
3. **The original's way** at B=1 (tests/naive_loop.py with ``all_logits``): no KV cache, a full forward over the
   whole sequence per token with the LM head over every position, autograd through the LM head; per generated
   token and per problem, next to the engine's B=1 problem.
4. **The memory story** (CUDA, --memory-arch): with ``torch.cuda.set_per_process_memory_fraction`` emulating a
   --card-gib card, the largest batch of problems with --memory-answer-tokens answers and --memory-latents
   optimised latents each (one step) that runs with each of --impls (doubling, then bisection to 1/8).

Times on CUDA come from CUDA events (phases: events around each phase of the loop; the op: events around each call);
on CPU from the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import bench_loop  # noqa: E402
import common  # noqa: E402
import latentseek_ext  # noqa: E402
from latentseek import LatentSeek, LatentSeekConfig  # noqa: E402
from latentseek.chat import build_prompt_ids  # noqa: E402
from latentseek.config import update_length  # noqa: E402
from latentseek.generation import extend  # noqa: E402
from latentseek.model import ModelAdapter, default_dtype  # noqa: E402
from latentseek.static_decode import DECODES  # noqa: E402
from naive_loop import Scripted, naive_latentseek  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30


# --- timing ----------------------------------------------------------------------------------------------------------


class Clock:
    """Intervals on one device: CUDA events on CUDA (read after a synchronize), the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start

    def time(self, fn: Callable[[], object]) -> float:
        start = self.mark()
        fn()
        return self.seconds(start, self.mark())


class PhaseTimed(LatentSeek):
    """LatentSeek whose phases are also timed on the device clock (the loop's own times are wall times)."""

    def __init__(self, *args, clock: Clock, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.marks: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def _timed(self, searches, phase: str):
        with super()._timed(searches, phase):
            start = self.clock.mark()
            yield
            self.marks[phase].append((start, self.clock.mark()))

    def phase_seconds(self) -> dict[str, float]:
        return {p: sum(self.clock.seconds(a, b) for a, b in marks) for p, marks in self.marks.items()}


@contextlib.contextmanager
def op_timed(clock: Clock) -> Iterator[list]:
    """Every call of ``latentseek_ext.lm_head_policy_grad`` (as the loop makes it) between two clock marks."""
    marks: list = []
    real = latentseek_ext.lm_head_policy_grad

    def timed(*args, **kwargs):
        start = clock.mark()
        out = real(*args, **kwargs)
        marks.append((start, clock.mark()))
        return out

    latentseek_ext.lm_head_policy_grad = timed
    try:
        yield marks
    finally:
        latentseek_ext.lm_head_policy_grad = real


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return common.peak_rss_bytes()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write (median of ``reps``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock = Clock(device)
    times = [clock.time(lambda: dst.copy_(src)) for _ in range(reps)]
    return 2 * src.numel() * 4 / statistics.median(times)


# --- the model and the problems -------------------------------------------------------------------------------------


def build_model(arch: str, device: torch.device, dtype: torch.dtype, seed: int, init_std: float):
    """Random weights with the architecture of ``bench_loop.ARCHS[arch]``, made on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kind, cfg = bench_loop.ARCHS[arch]
    config_cls = LlamaConfig if kind == "llama" else Qwen2Config
    config = config_cls(
        **cfg,
        max_position_embeddings=4096,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def exact_questions(tok, n: int, prompt_tokens: int, vocab_size: int, seed: int) -> list[str]:
    """``n`` random questions whose chat-formatted prompts have exactly ``prompt_tokens`` tokens."""
    overhead = len(build_prompt_ids(tok, "w3"))
    words = prompt_tokens - overhead + 1
    if words < 1:
        raise SystemExit(
            f"--prompt-tokens must be at least {overhead} (the chat template's tokens), got {prompt_tokens}"
        )
    qs = bench_loop.questions(n, words, vocab_size, seed)
    lengths = {len(build_prompt_ids(tok, q)) for q in qs}
    if lengths != {prompt_tokens}:
        raise RuntimeError(f"the prompts have {sorted(lengths)} tokens, not {prompt_tokens}")
    return qs


def read_bytes_per_step(model, batch: int, context: float) -> int:
    """What one decode step of ``batch`` rows must read: every weight it multiplies by (the input embedding is a
    lookup of ``batch`` rows, unless it is the LM head too), and the keys and values of ``context`` tokens per row."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        weights -= embedding.numel() * embedding.element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * embedding.element_size()
    return int(weights + batch * context * per_token)


# --- the measurements ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problems:
    """What every LatentSeek measurement of one architecture runs on."""

    questions: list[str]
    prompt_tokens: int
    answer_tokens: int
    steps: int
    rho: float


def latentseek_row(adapter: ModelAdapter, tok, problems: Problems, batch: int, impl: str, decode: str | None) -> dict:
    """LatentSeek on the first ``batch`` problems: throughput, phases, the op's share, peak memory."""
    device = adapter.device
    clock = Clock(device)
    script = [-1.0] * problems.steps + [0.0]
    cfg = LatentSeekConfig(
        rho=problems.rho, max_steps=problems.steps, max_new_tokens=problems.answer_tokens, impl=impl, decode=decode
    )
    engine = PhaseTimed(adapter, tok, Scripted(script), cfg, clock=clock)
    reset_peak(device)
    results = []
    with op_timed(clock) as op_marks:
        wall = clock.time(lambda: results.extend(engine.solve_batch(problems.questions[:batch])))
    phases = engine.phase_seconds()
    op = sum(clock.seconds(a, b) for a, b in op_marks)
    generated = sum(r.generated_tokens for r in results)
    return {
        "batch": batch,
        "impl": impl,
        "seconds": wall,
        "problems_per_min": 60 * batch / wall,
        "generated_tokens": generated,
        "generate_tokens_per_s": generated / phases["generate"],
        "phases_s": phases,
        "op_s": op,
        "op_share_of_update": op / phases["update"] if phases.get("update") else None,
        "peak_bytes": peak_memory(device),
        "steps": [r.steps for r in results],
        "update_length": results[0].update_length,
    }


def decode_row(
    adapter: ModelAdapter, prompts: list[list[int]], new_tokens: int, decode: str, floor: dict, reps: int
) -> dict:
    """Decode tokens/s of ``len(prompts)`` rows on one decode path: the median time of a generation of
    ``new_tokens`` tokens per row minus the median time of a prefill-only call (``reps`` of each, interleaved)."""
    clock = Clock(adapter.device)
    rows = [(None, p) for p in prompts]
    extend(adapter, rows, 2, [], decode=decode)  # warm-up of this path and batch size

    def full():
        extend(adapter, rows, new_tokens, [], decode=decode)  # no stop token: every row decodes new_tokens

    def prefill():
        extend(adapter, rows, 1, [], decode=decode)

    fulls, prefills = [], []
    for _ in range(reps):
        fulls.append(clock.time(full))
        prefills.append(clock.time(prefill))
    decode_s = statistics.median(fulls) - statistics.median(prefills)
    tokens = len(rows) * (new_tokens - 1)
    rate = tokens / decode_s
    return {
        "batch": len(rows),
        "decode": decode,
        "decode_s": decode_s,
        "full_s": fulls,
        "prefill_s": prefills,
        "tokens_per_s": rate,
        "floor_tokens_per_s": floor["tokens_per_s"],
        "fraction_of_floor": rate / floor["tokens_per_s"],
    }


def floor_of(model, batch: int, prompt_tokens: int, answer_tokens: int, bandwidth: float) -> dict:
    context = prompt_tokens + (answer_tokens - 1) / 2  # the mean context of the answer's decode steps
    nbytes = read_bytes_per_step(model, batch, context)
    return {"bytes_per_step": nbytes, "tokens_per_s": batch * bandwidth / nbytes}


def original_row(model, tok, problems: Problems, engine_row: dict | None) -> dict:
    """The original's way on one problem (B=1); per generated token = the problem's time / its generated tokens
    (its few autograd updates included)."""
    clock = Clock(next(model.parameters()).device)
    cfg = LatentSeekConfig(rho=problems.rho, max_steps=problems.steps, max_new_tokens=problems.answer_tokens)
    script = [-1.0] * problems.steps + [0.0]
    out: list = []
    question = problems.questions[0]
    seconds = clock.time(
        lambda: out.append(naive_latentseek(model, tok, question, Scripted(script), cfg, all_logits=True))
    )
    ids, _ = out[0]
    prompt = len(build_prompt_ids(tok, question))
    # one full forward per generated token: the first answer, then each later answer's continuation after its kept
    # tokens and its L decoded latents
    L = update_length(len(ids[0]), problems.rho, 0)
    generated = len(ids[0]) + sum(max(0, len(a) - L) for a in ids[1:])
    row = {
        "seconds_per_problem": seconds,
        "generated_tokens": generated,
        "seconds_per_token": seconds / generated,
        "answers": len(ids),
        "prompt_tokens": prompt,
    }
    if engine_row is not None:
        row["engine_seconds_per_problem"] = engine_row["seconds"]
        row["speedup"] = seconds / engine_row["seconds"]
    return row


def largest_batch(fits: Callable[[int], bool], start: int, most: int) -> tuple[int, int | None]:
    """``(largest batch that fits, smallest that does not or None)``: doubling from ``start``, then bisection until
    the gap is at most 1/8 of the largest. ``fits(b)`` runs batch b; 0 when even ``start`` does not fit."""
    lo, hi, b = 0, None, start
    while b <= most:
        if not fits(b):
            hi = b
            break
        lo, b = b, 2 * b
    if hi is None:
        return lo, None
    if lo == 0:  # even `start` failed: bisect below it
        lo_bound = 0
        while hi - lo_bound > 1:
            mid = (lo_bound + hi) // 2
            if fits(mid):
                lo_bound = mid
            else:
                hi = mid
        return lo_bound, hi
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def memory_story(adapter: ModelAdapter, tok, args, impl: str) -> dict:
    """The largest batch that runs with ``impl`` under a --card-gib memory limit (CUDA only)."""
    device = adapter.device
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, args.card_gib * GIB / total)
    rho = args.memory_latents / args.memory_answer_tokens
    qs = exact_questions(tok, args.memory_max, args.prompt_tokens, adapter.vocab_size, args.seed + 1)
    peaks: dict[int, int] = {}

    def fits(batch: int) -> bool:
        reset_peak(device)
        cfg = LatentSeekConfig(
            rho=rho, max_steps=1, max_new_tokens=args.memory_answer_tokens, impl=impl, decode=args.decode
        )
        ok = True
        try:
            LatentSeek(adapter, tok, Scripted([-1.0, 0.0]), cfg).solve_batch(qs[:batch])
            peaks[batch] = torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            ok = False
        reset_peak(device)
        print(f"  memory story {impl}: B={batch} {'runs' if ok else 'out of memory'}", flush=True)
        return ok

    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        lo, hi = largest_batch(fits, args.memory_start, args.memory_max)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {
        "impl": impl,
        "card_gib": args.card_gib,
        "fraction": fraction,
        "largest_batch": lo,
        "smallest_failing_batch": hi,
        "peak_bytes": peaks.get(lo),
        "answer_tokens": args.memory_answer_tokens,
        "latents": int(rho * args.memory_answer_tokens),
    }


# --- output ----------------------------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def to_markdown(payload: dict) -> str:
    s = payload["setup"]
    out = [
        f"# LatentSeek engine sweep ({payload['stamp']['device_kind']})\n\n",
        common.stamp_markdown(payload["stamp"]),
        f"\nCommand: `{payload['command']}`\n\n",
        f"Random weights, {s['dtype']}; prompts of {s['prompt_tokens']} tokens, answers of {s['answer_tokens']} "
        f"tokens, {s['steps']} LatentSeek steps per problem (scripted reward), rho {s['rho']}; decode path of the "
        f"LatentSeek runs: {s['decode']}. Copy bandwidth measured in this run: "
        f"{payload['copy_bandwidth'] / 1e9:.0f} GB/s (read + write).\n",
    ]
    for arch in payload["archs"]:
        out.append(f"\n## {arch['arch']} ({arch['params_m']:.4g}M parameters)\n\n### LatentSeek per batch size\n\n")
        rows = []
        for r in arch["latentseek"]:
            if "error" in r:
                rows.append([r["batch"], r["impl"], r["error"], "", "", "", "", "", ""])
                continue
            p = r["phases_s"]
            share = "-" if r["op_share_of_update"] is None else f"{100 * r['op_share_of_update']:.0f}%"
            rows.append(
                [
                    r["batch"],
                    r["impl"],
                    f"{r['problems_per_min']:.1f}",
                    f"{r['generate_tokens_per_s']:.0f}",
                    f"{p.get('generate', 0):.2f}",
                    f"{p.get('reward', 0):.3f}",
                    f"{p.get('update', 0):.3f}",
                    share,
                    _gib(r["peak_bytes"]),
                ]
            )
        out.append(
            common.markdown_table(
                [
                    "B",
                    "impl",
                    "problems/min",
                    "generate tok/s",
                    "generate s",
                    "reward s",
                    "update s",
                    "op/update",
                    "peak GiB",
                ],
                rows,
            )
        )
        out.append("\n### Decode rate (tokens/s) and its floor\n\n")
        rows = [
            [
                r["batch"],
                r["decode"],
                f"{r['tokens_per_s']:.0f}",
                f"{r['floor_tokens_per_s']:.0f}",
                f"{100 * r['fraction_of_floor']:.0f}%",
            ]
            if "error" not in r
            else [r["batch"], r["decode"], r["error"], "", ""]
            for r in arch["decode"]
        ]
        out.append(common.markdown_table(["B", "decode", "tokens/s", "floor tokens/s", "of floor"], rows))
        o = arch.get("original")
        if o is not None:
            out.append(
                f"\n### The original's way (B=1: no KV cache, logits over the whole sequence, autograd)\n\n"
                f"{o['seconds_per_problem']:.1f} s per problem ({o['answers']} answers, {o['generated_tokens']} "
                f"tokens: {1e3 * o['seconds_per_token']:.1f} ms per token)"
                + (
                    f"; the engine's B=1 problem: {o['engine_seconds_per_problem']:.2f} s ({o['speedup']:.1f}x)"
                    if "speedup" in o
                    else ""
                )
                + ".\n"
            )
        if arch.get("memory"):
            m0 = arch["memory"][0]
            out.append(
                f"\n### Memory story: a {m0['card_gib']} GiB card (set_per_process_memory_fraction {m0['fraction']:.3f}), "
                f"{m0['answer_tokens']}-token answers, {m0['latents']} latents per problem\n\n"
            )
            rows = [
                [m["impl"], m["largest_batch"], m["smallest_failing_batch"] or "-", _gib(m["peak_bytes"])]
                for m in arch["memory"]
            ]
            out.append(
                common.markdown_table(["impl", "largest batch that runs", "smallest that fails", "peak GiB"], rows)
            )
    return "".join(out)


# --- main ------------------------------------------------------------------------------------------------------------


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="this benchmark on a CPU (implied by --device cuda)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--archs", type=_csv(str), default=["qwen2.5-1.5b", "qwen2.5-7b"], help=f"of {sorted(bench_loop.ARCHS)}"
    )
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="LatentSeek steps per problem (scripted reward)")
    p.add_argument("--rho", type=float, default=0.2)
    p.add_argument("--batches", type=_csv(int), default=[1, 8, 32, 64])
    p.add_argument("--impls", type=_csv(str), default=["ext", "reference"])
    p.add_argument(
        "--decode", choices=DECODES, default=None, help="decode path of the LatentSeek runs (default: the device's)"
    )
    p.add_argument(
        "--decodes",
        type=_csv(str),
        default=[d for d in DECODES if d != "compiled"],  # CPU only, compiles per shape: bench_generate measures it
        help="decode paths of the decode-rate rows (default: eager and graph)",
    )
    p.add_argument("--reps", type=int, default=3, help="timings per decode-rate row (median)")
    p.add_argument("--no-original", action="store_true", help="skip the original's way")
    p.add_argument("--memory-arch", default="qwen2.5-7b", help="the architecture of the memory story (CUDA; '' skips)")
    p.add_argument("--card-gib", type=float, default=24.0)
    p.add_argument("--memory-answer-tokens", type=int, default=300)
    p.add_argument("--memory-latents", type=int, default=60)
    p.add_argument("--memory-start", type=int, default=16)
    p.add_argument("--memory-max", type=int, default=1024)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    common.add_output_args(p, default_tag=None)
    return p


def measure_arch(
    arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, bandwidth: float
) -> dict:
    """Every measurement of one architecture (the model lives only inside this call)."""
    print(f"{arch}: building the model ...", flush=True)
    model = build_model(arch, device, dtype, args.seed, args.init_std)
    adapter = ModelAdapter(model)
    tok = bench_loop.build_tokenizer(adapter.vocab_size)
    questions = exact_questions(tok, max(args.batches), args.prompt_tokens, adapter.vocab_size, args.seed)
    problems = Problems(questions, args.prompt_tokens, args.answer_tokens, args.steps, args.rho)
    prompts = [build_prompt_ids(tok, q) for q in questions]
    entry = {"arch": arch, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "latentseek": [], "decode": []}
    warm = dataclasses.replace(problems, answer_tokens=4, steps=1)
    latentseek_row(adapter, tok, warm, 1, args.impls[0], args.decode)
    for batch in args.batches:
        for impl in args.impls:
            key = {"batch": batch, "impl": impl}
            row = _guarded(device, key, latentseek_row, adapter, tok, problems, batch, impl, args.decode)
            entry["latentseek"].append(row)
            _show(arch, row)
        floor = floor_of(model, batch, args.prompt_tokens, args.answer_tokens, bandwidth)
        for decode in args.decodes:
            key = {"batch": batch, "decode": decode}
            row = _guarded(
                device, key, decode_row, adapter, prompts[:batch], args.answer_tokens, decode, floor, args.reps
            )
            entry["decode"].append(row)
            _show(arch, row)
    if not args.no_original:
        one = next((r for r in entry["latentseek"] if r["batch"] == 1 and "error" not in r), None)
        print(f"{arch}: the original's way on one problem ...", flush=True)
        entry["original"] = original_row(model, tok, problems, one)
    if device.type == "cuda" and arch == args.memory_arch:
        entry["memory"] = [memory_story(adapter, tok, args, impl) for impl in args.impls]
    return entry


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    unknown = [a for a in args.archs if a not in bench_loop.ARCHS]
    if unknown:
        raise SystemExit(f"--archs: unknown {unknown}; choose from {sorted(bench_loop.ARCHS)}")
    bad = [i for i in args.impls if i not in latentseek_ext.IMPLS] + [d for d in args.decodes if d not in DECODES]
    if bad:
        raise SystemExit(f"--impls / --decodes: unknown {bad}; impls {latentseek_ext.IMPLS}, decodes {DECODES}")
    tag = args.tag or f"loop-{device.type}"
    dirty = common.check_tree(args.out_dir, args.allow_dirty)
    bandwidth = copy_bandwidth(device, GIB if device.type == "cuda" else 64 * 2**20)
    payload = {
        "stamp": common.stamp(str(device), dirty),
        "command": common.command_line(),
        "setup": {
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_tokens": args.prompt_tokens,
            "answer_tokens": args.answer_tokens,
            "steps": args.steps,
            "rho": args.rho,
            "batches": args.batches,
            "impls": args.impls,
            "decode": args.decode or "default",
            "init_std": args.init_std,
            "seed": args.seed,
        },
        "copy_bandwidth": bandwidth,
        "archs": [],
    }
    for arch in args.archs:
        payload["archs"].append(measure_arch(arch, args, device, dtype, bandwidth))
        reset_peak(device)
    json_path, md_path = common.write_results(tag, payload, to_markdown(payload), args.out_dir)
    print(to_markdown(payload))
    print(f"wrote {json_path} and {md_path}")


def _guarded(device: torch.device, key: dict, run: Callable[..., dict], *args) -> dict:
    """``run(*args)``, or ``{**key, "error": "out of memory"}`` when the device runs out of memory."""
    try:
        return run(*args)
    except torch.OutOfMemoryError:
        pass
    reset_peak(device)
    return {**key, "error": "out of memory"}


def _show(arch: str, row: dict) -> None:
    keys = ("batch", "impl", "decode", "problems_per_min", "tokens_per_s", "error")
    print(
        f"  {arch}: "
        + ", ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in keys if k in row),
        flush=True,
    )


if __name__ == "__main__":
    main()
