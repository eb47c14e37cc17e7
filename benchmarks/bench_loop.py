"""Benchmark of the LatentSeek engine: per-problem wall time against the naive loop, and batched throughput.

Two measurements on the same model and problems, outputs asserted equal:

1. **engine vs naive**: one problem through :class:`latentseek.LatentSeek` and through ``tests/naive_loop.py``
   (the paper's code as it runs: a full forward over the whole sequence for every generated token, no KV cache,
   autograd through the LM head). Same answer tokens and reward history are asserted.
2. **B=1 vs B=8**: the same ``--batch`` problems solved one by one (``solve``) and together (``solve_batch``);
   problems per second of each, and how many results are identical (all must be for the target to pass).

The model is a randomly initialised causal LM with a real model's architecture (default SmolLM2-135M's: Llama,
30 layers, hidden 576, vocabulary 49152, tied LM head) and a word-level tokenizer over the whole vocabulary, so
no download is needed and every answer runs to ``--max-new-tokens`` (~300 tokens, as the issue asks: a random
model almost never emits its end-of-turn token). The reward is scripted (the same sequence of values for every
runner: ``-1`` for ``--steps`` answers, then ``0``), so every problem takes exactly ``--steps`` optimiser steps.

    python benchmarks/bench_loop.py                       # writes benchmarks/results/loop-cpu.{json,md,png}
    python benchmarks/bench_loop.py --arch qwen2.5-0.5b --max-new-tokens 100 --tag loop-qwen

``--device cuda`` runs the GPU benchmark instead (benchmarks/loop_sweep.py: Qwen2.5-1.5B and 7B architectures in
bf16, batch sizes 1-64, phases, decode rate against its floor, the original's way, the memory story); ``--sweep
--device cpu --archs tiny`` runs that benchmark on the CPU (the tests' smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import common  # noqa: E402
from latentseek import LatentSeek, LatentSeekConfig  # noqa: E402
from naive_loop import Scripted, naive_latentseek  # noqa: E402
from tiny_lm import CHAT_TEMPLATE, SPECIAL  # noqa: E402  (the tests' ChatML template and special tokens)

# (transformers class, config) of real architectures; the weights are random.
ARCHS = {
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    # not a real model: the GPU benchmark's smoke run on a CPU
    "tiny": (
        "qwen2",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one run measured: the model, the problem and the engine's settings."""

    arch: str
    params_m: float
    threads: int
    max_new_tokens: int
    steps: int
    rho: float
    init_std: float
    impl: str
    batch: int
    prompt_tokens: int


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary is the model's: the special tokens, then words ``w3 .. w{V-1}``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size - 1)})
    vocab["[UNK]"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIAL,
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def build_model(arch: str, seed: int, init_std: float):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, cfg = ARCHS[arch]
    torch.manual_seed(seed)
    common_cfg = dict(cfg, max_position_embeddings=4096, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    common_cfg["initializer_range"] = init_std
    model = (
        LlamaForCausalLM(LlamaConfig(**common_cfg)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common_cfg))
    )
    return model.float().eval().requires_grad_(False)


def questions(n: int, words: int, vocab_size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIAL), vocab_size - 1)}" for _ in range(words)) for _ in range(n)]


def to_markdown(payload: dict) -> str:
    a, b = payload["engine_vs_naive"], payload["batching"]
    rows = [
        ["naive loop (no KV cache)", f"{a['naive_s']:.1f}", "1.0x", a["generated_tokens"]],
        ["engine (B=1)", f"{a['engine_s']:.2f}", f"{a['speedup']:.1f}x", a["generated_tokens"]],
    ]
    rows2 = [
        ["B=1 (solve, one by one)", f"{b['b1_s']:.1f}", f"{b['b1_problems_per_s']:.3f}", "1.0x"],
        [f"B={b['batch']} (solve_batch)", f"{b['bn_s']:.1f}", f"{b['bn_problems_per_s']:.3f}", f"{b['speedup']:.2f}x"],
    ]
    s = payload["setup"]
    return (
        "# LatentSeek engine benchmark\n\n"
        + common.stamp_markdown(payload["stamp"])
        + f"\nCommand: `{payload['command']}`\n"
        + f"\nModel: random weights, {s['arch']} architecture ({s['params_m']:.0f}M parameters), fp32, "
        f"{s['threads']} threads; prompt {s['prompt_tokens']} tokens, answers of {s['max_new_tokens']} tokens, "
        f"{s['steps']} optimiser steps per problem (scripted reward), rho {s['rho']} (L = {a['update_length']}).\n\n"
        "## Per problem: engine vs the naive loop (identical answers and rewards asserted)\n\n"
        + common.markdown_table(["runner", "seconds", "speed-up", "tokens generated"], rows)
        + f"\nEngine phases (s): {', '.join(f'{k} {v:.2f}' for k, v in a['engine_phases'].items())}\n\n"
        f"## Throughput: {b['batch']} problems one by one vs batched (identical results counted)\n\n"
        + common.markdown_table(["mode", "seconds", "problems/s", "speed-up"], rows2)
        + "\n"
        + "\n".join(f"- {line}" for line in payload["acceptance"])
        + "\n"
    )


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = payload["engine_vs_naive"], payload["batching"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(["naive loop", "engine"], [a["naive_s"], a["engine_s"]], color=["tab:gray", "tab:blue"])
    ax1.set_ylabel("seconds per problem")
    ax1.set_title(f"one problem, {a['speedup']:.1f}x faster")
    ax2.bar(
        ["B=1", f"B={b['batch']}"], [b["b1_problems_per_s"], b["bn_problems_per_s"]], color=["tab:gray", "tab:blue"]
    )
    ax2.set_ylabel("problems / s")
    ax2.set_title(f"throughput, {b['speedup']:.2f}x")
    fig.suptitle(f"LatentSeek engine, {payload['setup']['arch']} shape (random), {payload['stamp']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_requested(argv: list[str]) -> bool:
    """Whether the command line asks for the GPU benchmark (--device other than cpu, or --sweep)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--sweep", action="store_true")
    known, _ = pre.parse_known_args(argv)
    return known.sweep or known.device != "cpu"


def main() -> None:
    if sweep_requested(sys.argv[1:]):
        import loop_sweep

        loop_sweep.main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="cuda: the GPU benchmark (see above)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per problem (scripted reward)")
    parser.add_argument("--rho", type=float, default=0.2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--engine-reps", type=int, default=3, help="engine timings of the single problem (median)")
    parser.add_argument(
        "--init-std",
        type=float,
        default=0.02,
        help="weight std (transformers' default; larger makes 30 layers chaotic: rounding flips tokens)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", default="auto", choices=["auto", "ext", "reference"])
    common.add_output_args(parser, default_tag="loop-cpu")
    args = parser.parse_args()
    dirty = common.check_tree(args.out_dir, args.allow_dirty)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.arch, args.seed, args.init_std)
    vocab = model.config.vocab_size
    tok = build_tokenizer(vocab)
    qs = questions(args.batch, args.prompt_words, vocab, args.seed)
    script = [-1.0] * args.steps + [0.0]
    cfg = LatentSeekConfig(rho=args.rho, max_steps=args.steps, max_new_tokens=args.max_new_tokens, impl=args.impl)
    payload = {"stamp": common.stamp("cpu", dirty), "command": common.command_line()}

    # 1. One problem: engine vs naive.
    print(f"naive loop on one problem ({args.max_new_tokens} tokens per answer, {args.steps} steps) ...", flush=True)
    t0 = time.perf_counter()
    want_ids, want_rewards = naive_latentseek(model, tok, qs[0], Scripted(script), cfg)
    naive_s = time.perf_counter() - t0
    print(f"  {naive_s:.1f} s", flush=True)
    engine_times, result = [], None
    for _ in range(args.engine_reps):
        engine = LatentSeek(model, tok, Scripted(script), cfg)
        t0 = time.perf_counter()
        result = engine.solve(qs[0])
        engine_times.append(time.perf_counter() - t0)
    if result.answer_ids != want_ids or result.rewards != want_rewards:
        raise SystemExit("the engine's answers differ from the naive loop's: no timing is reported")
    engine_s = common.Band.of(engine_times).median
    print(f"engine: {engine_s:.2f} s (x{naive_s / engine_s:.1f})", flush=True)
    setup = Setup(
        arch=args.arch,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        threads=torch.get_num_threads(),
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        rho=args.rho,
        init_std=args.init_std,
        impl=args.impl,
        batch=args.batch,
        prompt_tokens=result.prompt_tokens,
    )
    payload["setup"] = dataclasses.asdict(setup)
    payload["engine_vs_naive"] = {
        "naive_s": naive_s,
        "engine_s": engine_s,
        "engine_runs": engine_times,
        "speedup": naive_s / engine_s,
        "generated_tokens": result.generated_tokens,
        "answer_lengths": [len(a) for a in result.answer_ids],
        "update_length": result.update_length,
        "engine_phases": result.time,
    }

    # 2. Throughput: B problems one by one, then together.
    print(f"{args.batch} problems one by one ...", flush=True)
    engine = LatentSeek(model, tok, Scripted(script), cfg)
    t0 = time.perf_counter()
    singles = [engine.solve(q) for q in qs]
    b1_s = time.perf_counter() - t0
    print(f"  {b1_s:.1f} s; batched ...", flush=True)
    engine = LatentSeek(model, tok, Scripted(script), cfg)
    t0 = time.perf_counter()
    batched = engine.solve_batch(qs)
    bn_s = time.perf_counter() - t0
    print(f"  {bn_s:.1f} s", flush=True)
    identical = sum(
        one.answer_ids == many.answer_ids and one.rewards == many.rewards
        for one, many in zip(singles, batched, strict=True)
    )
    payload["batching"] = {
        "batch": args.batch,
        "b1_s": b1_s,
        "bn_s": bn_s,
        "b1_problems_per_s": args.batch / b1_s,
        "bn_problems_per_s": args.batch / bn_s,
        "speedup": b1_s / bn_s,
        "generated_tokens": sum(r.generated_tokens for r in batched),
        "identical_results": identical,
    }
    a, b = payload["engine_vs_naive"], payload["batching"]
    payload["acceptance"] = [
        f"engine >= 5x faster than the naive loop per problem: {a['speedup']:.1f}x -> "
        + ("PASS" if a["speedup"] >= 5 else "FAIL"),
        f"B={args.batch} >= 2.5x the problems/s of B=1 with identical results: {b['speedup']:.2f}x, "
        f"{identical}/{args.batch} identical -> "
        + ("PASS" if b["speedup"] >= 2.5 and identical == args.batch else "FAIL"),
    ]
    json_path, md_path = common.write_results(args.tag, payload, to_markdown(payload), args.out_dir)
    plot(payload, args.out_dir / f"{args.tag}.png")
    print(to_markdown(payload))
    print(f"wrote {json_path}, {md_path} and {args.tag}.png")


if __name__ == "__main__":
    main()
