"""latentseek.loop: the engine against the naive LatentSeek of naive_loop.py (no cache, autograd through the LM head)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import latentseek_ext
from conftest import DEVICES
from latentseek import LatentSeek, LatentSeekConfig
from latentseek.chat import build_prompt_ids
from latentseek.model import ModelAdapter
from latentseek.rewards import SelfReward
from naive_loop import Scripted, naive_latentseek
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer

MAX_NEW = 20


# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=[("qwen2", False), ("llama", True)], ids=["qwen2-untied", "llama-tied"])
def model(request, tok, device):
    arch, tie = request.param
    return tiny_model(arch, vocab_size=len(tok), tie=tie, device=device)


def config(**kw) -> LatentSeekConfig:
    return LatentSeekConfig(**{"max_new_tokens": MAX_NEW, "max_steps": 4, **kw})


# --- the engine == the naive loop --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [
        dict(rho=0.2, start_index=0, lr=0.03),
        dict(rho=0.5, start_index=2, lr=0.3),
        dict(rho=1.0, start_index=0, lr=1.0, grad_clip=0.5),
        dict(rho=0.3, start_index=5, lr=0.1),
    ],
    ids=["paper", "start2", "rho1-clip", "start5"],
)
def test_engine_matches_the_naive_loop(model, tok, knobs):
    cfg = config(**knobs)
    script = [-1.0, -0.5, -1.0, -0.5, 0.0]
    engine = LatentSeek(model, tok, Scripted(script), cfg)
    changed = 0
    for question in QUESTIONS:
        want_ids, want_rewards = naive_latentseek(model, tok, question, Scripted(script), cfg)
        got = engine.solve(question)
        assert got.answer_ids == want_ids
        assert got.rewards == want_rewards
        assert got.answers == [tok.decode(a, skip_special_tokens=True) for a in want_ids]
        assert got.steps == len(want_ids) - 1
        n = len(want_ids[0])
        assert got.update_length == max(0, min(int(cfg.rho * n), n - cfg.start_index))
        changed += len({tuple(a) for a in got.answer_ids}) > 1
    assert changed, "the optimisation never changed an answer: the comparison would be vacuous"


def test_the_loop_stops_as_soon_as_the_reward_passes_the_threshold(model, tok):
    engine = LatentSeek(model, tok, Scripted([-1.0, -1.0, -0.1, -1.0]), config(rho=0.5, max_steps=10))
    result = engine.solve(QUESTIONS[0])
    assert result.rewards == [-1.0, -1.0, -0.1]
    assert result.steps == 2 and result.solved
    assert result.final_answer == result.answers[2]


def test_a_good_first_answer_is_returned_without_optimising(model, tok):
    reward = Scripted([0.0])
    result = LatentSeek(model, tok, reward, config()).solve(QUESTIONS[0])
    assert result.steps == 0 and result.answers == [result.final_answer] and result.solved
    assert result.time["update"] == 0.0


def test_max_steps_bounds_the_updates_and_the_last_answer_is_returned(model, tok):
    result = LatentSeek(model, tok, Scripted([-1.0, -0.4, -0.9]), config(rho=0.5, max_steps=3)).solve(QUESTIONS[1])
    assert result.steps == 3 and len(result.answers) == 4 and not result.solved
    assert result.final_index == 3 and result.final_answer == result.answers[-1]


def test_keep_best_returns_the_best_rewarded_answer(model, tok):
    cfg = config(rho=0.5, max_steps=3, keep_best=True)
    result = LatentSeek(model, tok, Scripted([-1.0, -0.4, -0.9, -0.4]), cfg).solve(QUESTIONS[1])
    assert result.rewards == [-1.0, -0.4, -0.9, -0.4]
    assert result.final_index == 1  # the earliest of the best
    assert result.final_reward == -0.4


def test_zero_update_length_returns_the_answer_unchanged(model, tok):
    result = LatentSeek(model, tok, Scripted([-1.0]), config(rho=0.0)).solve(QUESTIONS[0])
    assert result.update_length == 0 and result.steps == 0 and len(result.answers) == 1
    far = LatentSeek(model, tok, Scripted([-1.0]), config(rho=0.5, start_index=10_000)).solve(QUESTIONS[0])
    assert far.update_length == 0 and far.steps == 0


def test_token_counts(model, tok):
    cfg = config(rho=0.5, max_steps=2)
    result = LatentSeek(model, tok, Scripted([-1.0]), cfg).solve(QUESTIONS[1])
    prompt = build_prompt_ids(tok, QUESTIONS[1])
    L = result.update_length
    assert result.prompt_tokens == len(prompt)
    assert result.prefill_tokens == len(prompt) + L * result.steps
    # every answer after the first is L prefix tokens (fed) then its generated continuation
    assert result.generated_tokens == len(result.answer_ids[0]) + sum(len(a) - L for a in result.answer_ids[1:])
    assert set(result.time) == {"generate", "reward", "update"} and all(t > 0 for t in result.time.values())


# --- a stop token in the new prefix ------------------------------------------------------------------------------


def test_a_stop_token_in_the_new_prefix_ends_the_answer(tok, device):
    """The answer is cut after the prefix's first stop token and nothing is generated after it."""
    model = tiny_model("qwen2", vocab_size=len(tok), device=device)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # the first answer of QUESTIONS[2] ends with EOS; optimise its last two latents with a tiny step, so the new
    # prefix is still (token, EOS)
    first = LatentSeek(model, tok, Scripted([0.0]), config()).solve(QUESTIONS[2]).answer_ids[0]
    assert first[-1] == eos and len(first) >= 2
    cfg = config(rho=1.0, start_index=len(first) - 2, lr=1e-6, max_steps=2)
    result = LatentSeek(model, tok, Scripted([-1.0]), cfg).solve(QUESTIONS[2])
    assert result.update_length == 2
    assert result.answer_ids == [first, first, first]
    assert result.generated_tokens == len(first)  # no continuation was decoded
    want_ids, _ = naive_latentseek(model, tok, QUESTIONS[2], Scripted([-1.0]), cfg)
    assert want_ids == result.answer_ids


# --- batching and implementations ------------------------------------------------------------------------------


@pytest.mark.parametrize("knobs", [dict(rho=0.2), dict(rho=0.6, start_index=3, lr=0.3)], ids=["paper", "start3"])
def test_solve_batch_equals_solve_one_by_one(model, tok, knobs):
    # each question gets its own script so that problems leave the batch at different steps
    scripts = {q: [-1.0] * (i + 1) + [0.0] for i, q in enumerate(QUESTIONS)}

    def fresh():
        calls = defaultdict(int)

        def reward(question: str, answer: str) -> float:
            i = calls[question]
            calls[question] += 1
            return scripts[question][min(i, len(scripts[question]) - 1)]

        return reward

    cfg = config(**knobs)
    batch = LatentSeek(model, tok, fresh(), cfg).solve_batch(QUESTIONS)
    alone = [LatentSeek(model, tok, fresh(), cfg).solve(q) for q in QUESTIONS]
    for b, a in zip(batch, alone, strict=True):
        assert b.answer_ids == a.answer_ids
        assert b.rewards == a.rewards
        assert (b.steps, b.update_length, b.generated_tokens, b.prefill_tokens) == (
            a.steps,
            a.update_length,
            a.generated_tokens,
            a.prefill_tokens,
        )
    assert len({r.steps for r in batch}) > 1, "the problems should leave the batch at different steps"


def test_ext_and_reference_implementations_agree(model, tok):
    if not latentseek_ext.extension_available(model.device):
        pytest.skip(f"latentseek_ext has no compiled kernel for {model.device.type}")
    cfg = dict(rho=0.5, lr=0.3, max_steps=4)
    script = [-1.0, -0.5, -1.0, -0.5, 0.0]
    ext = LatentSeek(model, tok, Scripted(script), config(impl="ext", **cfg)).solve_batch(QUESTIONS)
    ref = LatentSeek(model, tok, Scripted(script), config(impl="reference", **cfg)).solve_batch(QUESTIONS)
    for a, b in zip(ext, ref, strict=True):
        assert a.answer_ids == b.answer_ids and a.rewards == b.rewards


def test_bfloat16_model_runs_with_float32_latents(tok, device):
    model = tiny_model("qwen2", vocab_size=len(tok), device=device).to(torch.bfloat16)
    result = LatentSeek(model, tok, Scripted([-1.0, -1.0, 0.0]), config(rho=0.5, lr=0.3)).solve(QUESTIONS[1])
    assert result.steps == 2 and result.solved


@pytest.mark.parametrize(
    "knobs", [dict(rho=0.5, lr=0.3), dict(rho=0.6, start_index=3, lr=0.3)], ids=["start0", "start3"]
)
def test_graph_decode_gives_the_eager_results(model, tok, knobs):
    """decode="graph" (static-shape steps; kept prompt caches reused by every step) changes no answer."""
    script = [-1.0, -0.5, -1.0, 0.0]
    eager = LatentSeek(model, tok, Scripted(script), config(decode="eager", **knobs)).solve_batch(QUESTIONS)
    graph = LatentSeek(model, tok, Scripted(script), config(decode="graph", **knobs)).solve_batch(QUESTIONS)
    for g, e in zip(graph, eager, strict=True):
        assert (g.answer_ids, g.rewards, g.steps) == (e.answer_ids, e.rewards, e.steps)
    assert any(len({tuple(a) for a in e.answer_ids}) > 1 for e in eager), "no answer changed: a vacuous comparison"


def test_progress_reports_reach_the_total(model, tok):
    seen = []
    LatentSeek(model, tok, Scripted([-1.0, 0.0]), config()).solve_batch(
        QUESTIONS, progress=lambda done, total: seen.append((done, total))
    )
    assert seen[-1] == (len(QUESTIONS), len(QUESTIONS))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# --- bad input -------------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(model, tok):
    engine = LatentSeek(model, tok, Scripted([-1.0]), config())
    with pytest.raises(ValueError, match="empty"):
        engine.solve("   ")
    with pytest.raises(ValueError, match="no problems"):
        engine.solve_batch([])
    with pytest.raises(TypeError, match="solve_batch"):
        engine.solve(["q1", "q2"])
    with pytest.raises(ValueError, match="2 gold answers for 1 problems"):
        engine.solve_batch(["q"], golds=["1", "2"])


def test_a_nan_reward_is_an_error(model, tok):
    engine = LatentSeek(model, tok, Scripted([-1.0, float("nan")]), config())
    with pytest.raises(ValueError, match="nan"):
        engine.solve(QUESTIONS[1])


def test_a_reward_with_the_wrong_count_is_an_error(model, tok):
    class TooMany:
        def score(self, questions, answers, golds):
            return [0.0] * (len(answers) + 1)

    with pytest.raises(ValueError, match="2 scores for 1 answers"):
        LatentSeek(model, tok, TooMany(), config()).solve(QUESTIONS[0])


def test_a_model_without_lm_head_is_refused(model, tok):
    with pytest.raises(ValueError, match="no LM head"):
        LatentSeek(model.model, tok, Scripted([0.0]), config())


def test_a_model_or_its_adapter_is_taken(model, tok):
    adapter = ModelAdapter.of(model)
    assert isinstance(adapter, ModelAdapter) and adapter.model is model
    assert ModelAdapter.of(adapter) is adapter
    assert LatentSeek(adapter, tok, Scripted([0.0]), config()).adapter is adapter  # not rebuilt
    assert SelfReward(adapter, tok).adapter is adapter
    assert LatentSeek(model, tok, Scripted([0.0]), config()).adapter.model is model


@pytest.mark.parametrize(
    "knobs",
    [dict(rho=1.5), dict(lr=0.0), dict(max_steps=-1), dict(start_index=-1), dict(max_new_tokens=0), dict(grad_clip=0)]
    + [dict(impl="cuda"), dict(decode="cuda-graph")],
)
def test_config_values_are_checked(knobs):
    with pytest.raises(ValueError, match="LatentSeekConfig"):
        LatentSeekConfig(**knobs)


CUDA_DEVICES = [d for d in DEVICES if d != "cpu"]
if CUDA_DEVICES:  # generated only where a GPU is present (no skipped cases elsewhere)

    @pytest.mark.parametrize("decode", ["eager", "graph"])
    @pytest.mark.parametrize("cuda", CUDA_DEVICES)
    def test_float32_on_cuda_equals_cpu(tok, cuda, decode):
        """The loop in float32 on CUDA (the op's reference, so the math is the CPU's) gives the CPU's answers."""
        cfg = config(rho=0.5, lr=0.3, impl="reference")
        script = [-1.0, -0.5, -1.0, 0.0]
        want = LatentSeek(tiny_model("qwen2", vocab_size=len(tok)), tok, Scripted(script), cfg).solve_batch(QUESTIONS)
        gpu = tiny_model("qwen2", vocab_size=len(tok), device=cuda)
        cfg = config(rho=0.5, lr=0.3, impl="reference", decode=decode)
        got = LatentSeek(gpu, tok, Scripted(script), cfg).solve_batch(QUESTIONS)
        for g, w in zip(got, want, strict=True):
            assert (g.answer_ids, g.rewards, g.steps) == (w.answer_ids, w.rewards, w.steps)
