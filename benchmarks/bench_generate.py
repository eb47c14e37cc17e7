"""How fast does latentseek decode on a CPU, per route, next to llama.cpp on the same GGUF?

Decode tokens/s at batch 1 and batch 8 (the demo problems, chat-formatted; greedy; no stop token, so every row
decodes --new-tokens tokens) for each route over the Qwen2.5-Coder-0.5B-Instruct Q4 GGUF
(``bash tools/fetch_qwen_gguf.sh MODEL.gguf``):

  torch fp32 / bf16     latentseek.generation.extend on the model that transformers dequantises from the GGUF,
                        weights in that dtype
  torch int8 / int4     the same with ``latentseek.quant.quantize_weights`` (``load_model(weights=...)``): the decoder's
                        linears and a decoding copy of the LM head weight-only quantised, on torch's own CPU kernels
                        (int8 per channel; int4 in groups of 32, or of N with ``int4gN``), quantised from the fp32
                        weights, bf16 activations
  torch int8wo          the same with torchao's weight-only int8 on every Linear (bf16 activations), where torchao is
                        importable (``pip install torchao``; not a requirement of the project)
  llama.cpp             llama-cpp-python on the GGUF itself (Q4 weights as stored), batch 1 only (its ``Llama``
                        object decodes one sequence), where llama_cpp is importable

each at the thread counts of --threads (torch.set_num_threads; llama.cpp's n_threads; default 1 and all), and the
torch routes with each decode path of --decodes (``extend(decode=...)``): ``eager`` (the default), ``graph`` (the
static-shape step) and ``compiled`` (that step through torch.compile, weights frozen; compiled during the warm-up,
which for these routes decodes --new-tokens tokens so that the measured calls reuse its buffer size). For a route
other than eager the result gives how many of its greedy tokens equal the eager route's (same weights and threads)
in the last repetition.

--pickers chooses how torch routes pick tokens: ``greedy`` (the default), ``sample-logits`` and ``sample-fused``
(best-of-N's and self-consistency's sampling, temperature and top-p at those methods' defaults, from each step's
[b, V] logits or through the fused op without them; ``latentseek.generation.sampling_picker``). For sample-fused the
result counts the row-steps whose nucleus was not closed within the op's top-32 and so took their logits.

Accuracy of each torch route against fp32 (the dequantised GGUF): fp32 decodes --accuracy-tokens tokens greedily
for the first --accuracy-prompts demo problems; each route then reads prompt + those tokens in one forward (teacher
forcing) and the result gives, per generated position, whether its greedy token equals fp32's (greedy agreement;
the first disagreement is where that route's own greedy decoding would leave fp32's) and the cosine similarity of
its last-layer hidden state to fp32's.

Decode time is measured from the first token's pick (the prompt's forward is done) to the last token's pick, so the
prompt's forward is excluded: tokens/s = batch * (new tokens - 1) / that time. Routes run interleaved, one
measurement of each per repetition, and each row reports the median and p20-p80 band over --reps repetitions.

    python benchmarks/bench_generate.py --model MODEL.gguf --new-tokens 48 --tag generate-cpu-epyc

Writes <out-dir>/<tag>.json, .md and .png; the file records the model's name and sha256, not its path.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from latentseek import ModelAdapter, build_prompt_ids, load_model  # noqa: E402
from latentseek.eval.data import DEMO_PROBLEMS_PATH, read_records  # noqa: E402
from latentseek.eval.methods import SelfConsistencySettings  # noqa: E402
from latentseek.generation import SAMPLERS, DecodeStep, extend, greedy_picker, sampling_picker  # noqa: E402
from latentseek.quant import INT4_GROUP_SIZE, quantize_weights  # noqa: E402
from latentseek.static_decode import DECODES  # noqa: E402

BATCHES = (1, 8)


@dataclasses.dataclass(frozen=True)
class Route:
    engine: str  # "torch" or "llama.cpp"
    weights: str  # fp32 | bf16 | int8 | int4 | int4gN | int8wo | gguf
    threads: int
    picker: str = "greedy"  # greedy | sample-logits | sample-fused (torch routes)
    decode: str = "eager"  # eager | graph | compiled (torch routes: extend's decode)

    @property
    def name(self) -> str:
        name = f"{self.engine} {self.weights}, {self.threads} thread{'s' if self.threads > 1 else ''}"
        name = name if self.decode == "eager" else f"{name}, {self.decode}"
        return name if self.picker == "greedy" else f"{name}, {self.picker}"


@dataclasses.dataclass(frozen=True)
class Row:
    route: Route
    batch: int
    new_tokens: int
    decode_s: tuple[float, ...]  # per repetition: first pick to last pick

    @property
    def tokens_per_s(self) -> common.Band:
        return common.Band.of([self.batch * (self.new_tokens - 1) / t for t in self.decode_s])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# --- decoders: (prompts, new tokens) -> seconds from the first pick to the last ---------------------------------------


PICKERS = ("greedy", *(f"sample-{sampler}" for sampler in SAMPLERS))
#: The sampling of best-of-N and self-consistency (their default temperature and top-p).
SAMPLING = SelfConsistencySettings()


@dataclasses.dataclass
class LogitRows:
    """Row-steps picked, and those whose logits were formed (the fused sampler's fallback), over a route's calls."""

    picked: int = 0
    with_logits: int = 0


def torch_decoder(
    adapter: ModelAdapter,
    threads: int,
    picker: str = "greedy",
    counts: LogitRows | None = None,
    decode_path: str = "eager",
    tokens_out: list[list[int]] | None = None,
) -> Callable[[list[list[int]], int], float]:
    """A decoder of ``prompts`` for ``new_tokens`` that returns its decode time; it leaves the tokens of its last call
    in ``tokens_out`` (when given)."""

    def decode(prompts: list[list[int]], new_tokens: int) -> float:
        torch.set_num_threads(threads)
        picks: list[float] = []
        if picker == "greedy":
            inner = greedy_picker()
        else:
            sampler = picker.removeprefix("sample-")
            inner = sampling_picker(SAMPLING.temperature, SAMPLING.top_p, 0, len(prompts), sampler=sampler)

        def pick(step: DecodeStep, rows: list[int]) -> torch.Tensor:
            picks.append(time.perf_counter())
            if counts is not None:
                counts.picked += len(rows)
            return inner(step, rows)

        if counts is not None:  # count the rows whose logits the picker asks for

            def logits(h: torch.Tensor) -> torch.Tensor:
                counts.with_logits += h.shape[0]
                return ModelAdapter.logits(adapter, h)

            adapter.logits = logits  # type: ignore[method-assign]
        try:
            out = extend(adapter, [(None, p) for p in prompts], new_tokens, [], picker=pick, decode=decode_path)
        finally:
            if counts is not None:
                del adapter.logits
        if any(len(t) != new_tokens for t in out.tokens):
            raise RuntimeError(f"a row stopped before {new_tokens} tokens: {[len(t) for t in out.tokens]}")
        if tokens_out is not None:
            tokens_out[:] = out.tokens
        return picks[-1] - picks[0]

    return decode


def llama_cpp_decoder(model_path: str, threads: int) -> Callable[[list[list[int]], int], float]:
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    llm = Llama(model_path=model_path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the argmax of the last evaluated token's logits
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def decode(prompts: list[list[int]], new_tokens: int) -> float:
        if len(prompts) != 1:
            raise ValueError(f"the llama.cpp route decodes one sequence, got a batch of {len(prompts)}")
        llm.reset()
        llm.eval(prompts[0])
        t0 = time.perf_counter()  # the first pick: the prompt's logits are there
        for _ in range(new_tokens - 1):
            llm.eval([greedy()])
        greedy()  # the last pick
        return time.perf_counter() - t0

    return decode


def quantized(model: torch.nn.Module, weights: str) -> torch.nn.Module:
    """A bf16 copy of the fp32 ``model`` with ``weights`` ("int8", "int4" or "int4gN": int4 in groups of N)
    quantised from its fp32 weights by latentseek.quant."""
    scheme, _, group = weights.partition("g")
    model = copy.deepcopy(model)
    quantize_weights(model, scheme, group_size=int(group) if group else INT4_GROUP_SIZE)
    return model.to(torch.bfloat16)


@torch.inference_mode()
def accuracy(
    reference: ModelAdapter, routes: dict[str, ModelAdapter], prompts: list[list[int]], new_tokens: int
) -> dict[str, dict]:
    """Each route against ``reference`` on the reference's greedy continuations of ``prompts`` (teacher forcing).

    Per route: ``agreement`` (the fraction of the ``len(prompts) * new_tokens`` positions whose greedy token equals
    the reference's), ``first_disagreement`` per prompt (the position of the first differing greedy token, or
    ``new_tokens`` if none), and the cosine similarity of the last-layer hidden states per position (mean, min).
    """
    out = extend(reference, [(None, p) for p in prompts], new_tokens, [])
    sequences = [torch.tensor([*p, *t[:-1]])[None] for p, t in zip(prompts, out.tokens, strict=True)]

    def read(adapter: ModelAdapter) -> list[tuple[torch.Tensor, torch.Tensor]]:  # (hidden, greedy) per prompt
        rows = []
        for ids in sequences:
            h = adapter.hidden(ids)[0, -new_tokens:]
            rows.append((h.float(), adapter.logits(h).argmax(-1)))
        return rows

    ref = read(reference)
    result = {}
    for name, adapter in routes.items():
        got = read(adapter)
        same = [(g == r).tolist() for (_, g), (_, r) in zip(got, ref, strict=True)]
        cos = torch.cat(
            [torch.nn.functional.cosine_similarity(a, b, dim=-1) for (a, _), (b, _) in zip(got, ref, strict=True)]
        )
        result[name] = {
            "agreement": sum(map(sum, same)) / sum(map(len, same)),
            "first_disagreement": [s.index(False) if False in s else len(s) for s in same],
            "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(),
        }
    return result


def int8_weight_only(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    return model


# --- report --------------------------------------------------------------------------------------------------------


def decode_agreement(last_tokens: dict[tuple[Route, int], list[list[int]]]) -> list[dict]:
    """For each route whose decode path is not eager: how many of its last call's tokens equal the eager route's."""
    out = []
    for (route, batch), tokens in last_tokens.items():
        eager = last_tokens.get((dataclasses.replace(route, decode="eager"), batch))
        if route.decode == "eager" or not eager or not tokens:
            continue
        same = sum(a == b for x, y in zip(tokens, eager, strict=True) for a, b in zip(x, y, strict=True))
        out.append({"route_name": route.name, "batch": batch, "same": same, "tokens": sum(map(len, eager))})
    return out


def to_markdown(payload: dict, rows: list[Row]) -> str:
    s = payload["setup"]
    table = []
    for r in rows:
        b, best = r.tokens_per_s, r.batch * (r.new_tokens - 1) / min(r.decode_s)
        table.append(
            [
                r.route.engine,
                r.route.weights,
                r.route.threads,
                r.route.picker,
                r.route.decode if r.route.engine == "torch" else "n/a",
                r.batch,
                f"{b.median:.1f}",
                f"{b.p20:.1f}-{b.p80:.1f}",
                f"{best:.1f}",
                b.runs,
            ]
        )
    md = "# Decode speed: latentseek routes and llama.cpp\n\n" + common.stamp_markdown(payload["stamp"]) + "\n"
    md += f"Command: `{payload['command']}`\n\n"
    md += (
        f"Model: {s['model_file']} (sha256 {s['model_sha256'][:12]}...), {s['params_m']:.0f}M parameters; "
        f"prompts: the {s['prompt_tokens'][0]}-token first demo problem (batch 1), the 8 demo problems "
        f"({min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens, left-padded; batch 8); "
        f"{s['new_tokens']} new tokens per row, no stop token. Pickers: greedy, or sampling at temperature "
        f"{s['sampling']['temperature']} and top-p {s['sampling']['top_p']} from the logits (sample-logits) or "
        "through the fused op (sample-fused).\n\n"
    )
    md += common.markdown_table(
        ["engine", "weights", "threads", "picker", "decode", "batch", "tokens/s (median)", "p20-p80", "best", "reps"],
        table,
    )
    md += (
        "\ntokens/s = batch * (new tokens - 1) / (time from the first token's pick to the last's): the prompt's "
        "forward is not counted. Routes ran interleaved, one measurement of each per repetition. best: the "
        "fastest repetition, the closest to what the route does on an idle machine.\n"
    )
    loads = ", ".join(f"{x:.1f}" for x in payload["load_average_1min"])
    done = len(payload["load_average_1min"])
    if done < s["reps_asked"]:
        md += f"\n**Partial run: {done} of {s['reps_asked']} repetitions were measured.**\n"
    md += (
        f"\nLoad average (1 min) at the start of each repetition, on {payload['stamp']['host_cores']} cores: {loads}.\n"
    )
    if payload["skipped"]:
        md += "\nNot measured: " + "; ".join(payload["skipped"]) + ".\n"
    if payload.get("fused_logit_rows"):
        md += (
            "\nsample-fused formed the logits only for rows whose nucleus was not closed within the op's top-32 "
            "log-probs: "
            + "; ".join(
                f"{c['route_name']}, batch {c['batch']}: {c['with_logits']} of {c['picked']} row-steps"
                for c in payload["fused_logit_rows"]
            )
            + ".\n"
        )
    if payload.get("decode_agreement"):
        md += (
            "\nGreedy tokens of the last repetition equal to the eager route's (same weights and threads): "
            + "; ".join(
                f"{a['route_name']}, batch {a['batch']}: {a['same']} of {a['tokens']}"
                for a in payload["decode_agreement"]
            )
            + ".\n"
        )
    if payload.get("accuracy"):
        md += (
            f"\n## Accuracy against torch fp32\n\nfp32 decoded {s['accuracy_tokens']} tokens greedily for each of "
            f"the first {s['accuracy_prompts']} demo problems; each route read prompt + those tokens in one forward. "
            "Greedy agreement: the fraction of those positions whose greedy token equals fp32's. First "
            "disagreement: per prompt, the position of the first differing token (where the route's own greedy "
            f"decoding leaves fp32's; {s['accuracy_tokens']}: none). Cosine: the last-layer hidden state's cosine "
            "similarity to fp32's, per position.\n\n"
        )
        md += common.markdown_table(
            ["weights", "greedy agreement", "first disagreement per prompt", "cosine mean", "cosine min"],
            [
                [
                    name,
                    f"{a['agreement']:.3f}",
                    ", ".join(map(str, a["first_disagreement"])),
                    f"{a['cosine_mean']:.4f}",
                    f"{a['cosine_min']:.4f}",
                ]
                for name, a in payload["accuracy"].items()
            ],
        )
        md += (
            f"\nLoad average (1 min) at the start of the accuracy check: {payload['load_average_1min_accuracy']:.1f}.\n"
        )
    return md


def plot(rows: list[Row], stamp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = list(dict.fromkeys(r.route for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(routes) + 2), 4))
    width = 0.8 / len(BATCHES)
    for i, batch in enumerate(BATCHES):
        xs, ys, lo, hi = [], [], [], []
        for j, route in enumerate(routes):
            row = next((r for r in rows if r.route == route and r.batch == batch), None)
            if row is not None:
                b = row.tokens_per_s
                xs.append(j + i * width)
                ys.append(b.median)
                lo.append(b.median - b.p20)
                hi.append(b.p80 - b.median)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=f"batch {batch}")
    ax.set_xticks([j + width / 2 for j in range(len(routes))])
    ax.set_xticklabels([r.name.replace(", ", "\n") for r in routes], fontsize=8)
    ax.set_ylabel("decode tokens/s (median, p20-p80)")
    ax.set_title(f"Qwen2.5-Coder-0.5B decode\n{stamp['device']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the Qwen2.5-Coder-0.5B-Instruct Q4 .gguf file")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per row (>= 2)")
    ap.add_argument("--reps", type=int, default=3, help="measurements of each route and batch")
    ap.add_argument(
        "--weights",
        default="fp32,bf16,int8,int4,int8wo",
        help="torch routes: fp32, bf16, int8, int4 (groups of 32), int4gN (groups of N), int8wo (needs torchao)",
    )
    ap.add_argument("--threads", default="1,all", help="thread counts, comma-separated (all: torch's default)")
    ap.add_argument("--accuracy-prompts", type=int, default=4, help="demo problems of the accuracy check (0: none)")
    ap.add_argument("--accuracy-tokens", type=int, default=96, help="greedy fp32 tokens per accuracy prompt")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp reference")
    ap.add_argument(
        "--pickers", default="greedy", help=f"token pickers of the torch routes, comma-separated: {', '.join(PICKERS)}"
    )
    ap.add_argument(
        "--decodes", default="eager", help=f"decode paths of the torch routes, comma-separated: {', '.join(DECODES)}"
    )
    common.add_output_args(ap, default_tag="generate-cpu")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be >= 2 (decode time runs from the first pick), got {args.new_tokens}")
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}")
    if not os.path.isfile(args.model):
        raise SystemExit(f"--model must be a .gguf file, got {args.model!r} (bash tools/fetch_qwen_gguf.sh OUT.gguf)")
    dirty = common.check_tree(args.out_dir, args.allow_dirty)
    all_threads = torch.get_num_threads()
    try:
        thread_counts = list(dict.fromkeys(all_threads if t == "all" else int(t) for t in args.threads.split(",")))
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated counts or 'all', got {args.threads!r}") from None
    if not thread_counts or min(thread_counts) < 1:
        raise SystemExit(f"--threads must be counts >= 1, got {args.threads!r}")
    pickers = list(dict.fromkeys(args.pickers.split(",")))
    if not set(pickers) <= set(PICKERS):
        raise SystemExit(f"--pickers must be a comma-separated subset of {', '.join(PICKERS)}, got {args.pickers!r}")
    decodes = list(dict.fromkeys(args.decodes.split(",")))
    if not set(decodes) <= set(DECODES):
        raise SystemExit(f"--decodes must be a comma-separated subset of {', '.join(DECODES)}, got {args.decodes!r}")
    skipped = []

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    questions = [r["question"] for r in read_records(DEMO_PROBLEMS_PATH)][: max(BATCHES)]
    if len(questions) < max(BATCHES):
        raise SystemExit(f"batch {max(BATCHES)} needs {max(BATCHES)} demo problems, found {len(questions)}")
    prompts = [build_prompt_ids(tokenizer, q) for q in questions]
    models = {}
    for weights in args.weights.split(","):
        if weights == "fp32":
            models[weights] = model
        elif weights == "bf16":
            models[weights] = copy.deepcopy(model).to(torch.bfloat16)
        elif weights in ("int8", "int4") or (weights.startswith("int4g") and weights[5:].isdigit()):
            models[weights] = quantized(model, weights)
        elif weights == "int8wo":
            if importlib.util.find_spec("torchao") is None:
                skipped.append("torch int8wo (torchao is not installed)")
                continue
            models[weights] = int8_weight_only(model)
        else:
            raise SystemExit(f"unknown --weights entry {weights!r}: fp32, bf16, int8, int4, int4gN or int8wo")
    adapters = {weights: ModelAdapter(m) for weights, m in models.items()}
    decoders: dict[tuple[Route, int], Callable[[list[list[int]], int], float]] = {}
    fallback: dict[tuple[Route, int], LogitRows] = {}
    last_tokens: dict[tuple[Route, int], list[list[int]]] = {}
    for (weights, adapter), threads, picker, decode_path, batch in itertools.product(
        adapters.items(), thread_counts, pickers, decodes, BATCHES
    ):
        route = Route("torch", weights, threads, picker, decode_path)
        counts = fallback.setdefault((route, batch), LogitRows()) if picker == "sample-fused" else None
        sink = last_tokens.setdefault((route, batch), [])
        decoders[(route, batch)] = torch_decoder(adapter, threads, picker, counts, decode_path, sink)
    if args.no_llama_cpp:
        skipped.append("llama.cpp (--no-llama-cpp)")
    elif importlib.util.find_spec("llama_cpp") is None:
        skipped.append("llama.cpp (llama-cpp-python is not installed)")
    else:
        for threads in thread_counts:
            decoders[(Route("llama.cpp", "gguf", threads), 1)] = llama_cpp_decoder(args.model, threads)
        skipped.append("llama.cpp at batch 8 (llama-cpp-python's Llama decodes one sequence)")

    for (route, batch), decode in decoders.items():  # warm-up: allocations, oneDNN primitives, llama.cpp graphs
        decode(prompts[:batch], args.new_tokens if route.decode == "compiled" else 4)  # compiled: its buffer size
    for counts in fallback.values():  # count the measured calls only
        counts.picked = counts.with_logits = 0
    payload = {
        "stamp": common.stamp("cpu", dirty),
        "command": common.command_line(sys.argv if argv is None else [__file__, *argv]),
        "setup": {
            "model_file": os.path.basename(args.model),
            "model_sha256": sha256(args.model),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "prompt_tokens": [len(p) for p in prompts],
            "new_tokens": args.new_tokens,
            "reps_asked": args.reps,
            "sampling": {"temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p},
            "versions": {name: _version(name) for name in ("transformers", "torchao", "llama_cpp_python")},
        },
        "skipped": skipped,
    }
    if args.accuracy_prompts > 0:
        torch.set_num_threads(min(thread_counts))
        reference = adapters.get("fp32") or ModelAdapter(model)
        payload["load_average_1min_accuracy"] = os.getloadavg()[0]
        payload["accuracy"] = accuracy(
            reference,
            {w: a for w, a in adapters.items() if w != "fp32"},
            prompts[: args.accuracy_prompts],
            args.accuracy_tokens,
        )
        payload["setup"]["accuracy_prompts"] = args.accuracy_prompts
        payload["setup"]["accuracy_tokens"] = args.accuracy_tokens
    times: dict[tuple[Route, int], list[float]] = {key: [] for key in decoders}
    payload["load_average_1min"] = []  # other processes on the machine: the noise of this run
    for rep in range(args.reps):
        payload["load_average_1min"].append(os.getloadavg()[0])
        for (route, batch), decode in decoders.items():
            times[(route, batch)].append(decode(prompts[:batch], args.new_tokens))
            tps = batch * (args.new_tokens - 1) / times[(route, batch)][-1]
            print(f"rep {rep + 1}/{args.reps}: {route.name}, batch {batch}: {tps:.1f} tokens/s", flush=True)
        rows = [Row(route, batch, args.new_tokens, tuple(t)) for (route, batch), t in times.items()]
        payload["rows"] = [
            {**dataclasses.asdict(r), "route_name": r.route.name, "tokens_per_s": dataclasses.asdict(r.tokens_per_s)}
            for r in rows
        ]
        payload["decode_agreement"] = decode_agreement(last_tokens)
        payload["fused_logit_rows"] = [
            {"route_name": route.name, "batch": batch, **dataclasses.asdict(c)}
            for (route, batch), c in fallback.items()
        ]
        md = to_markdown(payload, rows)
        common.write_results(args.tag, payload, md, args.out_dir)  # every repetition: a partial run survives
        plot(rows, payload["stamp"], args.out_dir / f"{args.tag}.png")
    torch.set_num_threads(all_threads)
    print(md)
    print(f"wrote {args.tag}.json, .md and .png")


if __name__ == "__main__":
    main()
