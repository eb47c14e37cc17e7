"""latentseek.loop with K sampled prefixes per step (``samples``) and with a hidden-state reward (the confidence reward),
and their command-line flags."""

from __future__ import annotations

import hashlib
import math
import zlib

import pytest
import torch

import latentseek_ext
from latentseek import LatentSeek, LatentSeekConfig
from latentseek.chat import build_prompt_ids, stop_token_ids
from latentseek.config import MAX_UPDATE_LENGTH
from latentseek.eval.cli import main
from latentseek.eval.storage import load_run
from latentseek.generation import generate
from latentseek.loop import reinforce_gradient
from latentseek.model import ModelAdapter
from latentseek.rewards import ConfidenceReward
from naive_loop import Scripted, naive_latentseek
from test_cli import Calls, _eval_args, dataset, tiny  # noqa: F401  (fixtures)
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer

MAX_NEW = 20


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok, device):
    return tiny_model("qwen2", vocab_size=len(tok), device=device)


def config(**kw) -> LatentSeekConfig:
    return LatentSeekConfig(**{"max_new_tokens": MAX_NEW, "max_steps": 3, "rho": 0.5, "lr": 0.3, **kw})


def by_text(question: str, answer: str) -> float:
    """A reward that is a function of the answer's text only (0 for about one answer in nine, else below -0.2)."""
    return -(zlib.crc32(answer.encode()) % 9) / 8


# --- K = 1 is the paper's loop -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 12345])
def test_one_sample_is_the_papers_argmax_loop_whatever_the_seed(model, tok, seed):
    cfg = config(samples=1, seed=seed)
    script = [-1.0, -0.5, -1.0, 0.0]
    engine = LatentSeek(model, tok, Scripted(script), cfg)
    for question in QUESTIONS:
        want_ids, want_rewards = naive_latentseek(model, tok, question, Scripted(script), cfg)
        got = engine.solve(question)
        assert (got.answer_ids, got.rewards, got.sample_rewards) == (want_ids, want_rewards, [])
        assert got.scored_details == got.reward_details and got.scored_by_step == list(range(1, len(want_ids) + 1))


# --- K > 1 ---------------------------------------------------------------------------------------------------------


def outcome(results):
    return [(r.answer_ids, r.rewards, r.sample_rewards, r.steps, r.generated_tokens, r.prefill_tokens) for r in results]


def test_k_draws_batched_equal_one_by_one_and_are_reproducible(model, tok):
    cfg = config(samples=3, seed=7, max_steps=4)
    batch = LatentSeek(model, tok, by_text, cfg).solve_batch(QUESTIONS)
    alone = [LatentSeek(model, tok, by_text, cfg).solve(q) for q in QUESTIONS]
    again = LatentSeek(model, tok, by_text, cfg).solve_batch(QUESTIONS)
    assert outcome(batch) == outcome(alone) == outcome(again)
    other = LatentSeek(model, tok, by_text, config(samples=3, seed=8, max_steps=4)).solve_batch(QUESTIONS)
    assert outcome(other) != outcome(batch)
    for r in batch:
        assert len(r.sample_rewards) == r.steps and all(len(s) == 3 for s in r.sample_rewards)
        assert r.rewards[1:] == [max(s) for s in r.sample_rewards]
        assert r.generated_by_step[-1] == r.generated_tokens and len(r.generated_by_step) == len(r.answers)
    assert any(len(set(s)) > 1 for r in batch for s in r.sample_rewards), "no step with different draw rewards"
    assert len({r.steps for r in batch}) > 1, "the problems should leave the batch at different steps"


def test_the_draws_are_the_fused_samplers_and_the_best_one_is_kept(model, tok):
    """Step 1 scores the answers of the op's K draws from the first answer's latents (offsets from the problem's
    prompt, the step, the draw and the position), distinct ones once, and keeps the best (the earliest among
    equals)."""
    K, seed, question = 4, 3, QUESTIONS[1]
    seen: list[list[str]] = []

    class Spy:  # never above the threshold: -1 for the first answer, by_text - 0.25 for the draws
        def score(self, questions, answers, golds):
            seen.append(list(answers))
            if len(seen) == 1:
                return [-1.0]
            return [by_text(q, a) - 0.25 for q, a in zip(questions, answers, strict=True)]

    cfg = config(samples=K, seed=seed, max_steps=1)
    result = LatentSeek(model, tok, Spy(), cfg).solve(question)
    prompt = build_prompt_ids(tok, question)
    first = generate(model, tok, [prompt], MAX_NEW, return_hidden=True)
    L = result.update_length
    z = first.hidden[0][:L].float()
    key = int.from_bytes(hashlib.sha256(repr(prompt).encode()).digest()[:4], "little") >> 1
    offsets = (key << 32) + torch.arange(K * L) // L * MAX_UPDATE_LENGTH + torch.arange(K * L) % L
    adapter = ModelAdapter.of(model)
    x, _, _ = latentseek_ext.lm_head_policy_grad(
        z.repeat(K, 1), adapter.weight, None, bias=adapter.bias, sample=True, seed=seed, offsets=offsets.to(z.device)
    )
    stop = set(stop_token_ids(tok, adapter))
    draws = []
    for k in range(K):
        prefix = x[k * L : (k + 1) * L].tolist()
        cut = next((i for i, t in enumerate(prefix) if t in stop), None)
        draws.append(prefix if cut is None else prefix[: cut + 1])
    distinct = list(dict.fromkeys(map(tuple, draws)))
    assert len(seen) == 2 and len(seen[1]) == len(distinct)
    for text, prefix in zip(seen[1], distinct, strict=True):
        assert text.startswith(tok.decode(list(prefix), skip_special_tokens=True))
    best = max(range(K), key=lambda k: (result.sample_rewards[0][k], -k))
    assert result.answer_ids[1][: len(draws[best])] == draws[best]
    assert result.rewards[1] == result.sample_rewards[0][best]


def test_reinforce_gradient_is_the_mean_baseline_policy_gradient(tok):
    """(1/K) sum_k (R_k - mean R) * (-d log p(x^k | z) / dz) from the op equals autograd of the REINFORCE loss."""
    model = tiny_model("qwen2", vocab_size=len(tok))
    adapter = ModelAdapter.of(model)
    K, L, H = 3, 5, adapter.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(L, H, generator=gen, dtype=torch.float64)
    W = adapter.weight.double()
    x = torch.randint(0, W.shape[0], (K, L), generator=gen)
    rewards = [-1.0, -0.25, -0.5]
    _, _, directions = latentseek_ext.lm_head_policy_grad(z.repeat(K, 1), W, None, x.reshape(-1), impl="reference")
    got = reinforce_gradient(rewards, directions.reshape(K, L, H))

    zz = z.clone().requires_grad_(True)
    logp = (zz @ W.T).log_softmax(-1)
    mean = sum(rewards) / K
    loss = -sum((r - mean) * logp[torch.arange(L), x[k]].sum() for k, r in enumerate(rewards)) / K
    (want,) = torch.autograd.grad(loss, zz)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert reinforce_gradient([-0.5] * K, directions.reshape(K, L, H)).abs().max() == 0
    with pytest.raises(ValueError, match="K = 2 rewards"):
        reinforce_gradient([-1.0, 0.0], directions.reshape(K, L, H))


@pytest.mark.parametrize("knobs", [dict(samples=0), dict(samples=2.0), dict(seed=-1), dict(seed=2**63)])
def test_samples_and_seed_are_checked(knobs):
    with pytest.raises(ValueError, match="LatentSeekConfig"):
        LatentSeekConfig(**knobs)


# --- the confidence reward in the loop ----------------------------------------------------------------------------


class RecordingConfidence(ConfidenceReward):
    """The confidence reward, keeping the hidden states of every answer it scores."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.seen: list[torch.Tensor] = []

    def score_hidden(self, hidden):
        self.seen += [h.clone() for h in hidden]
        return super().score_hidden(hidden)


@pytest.mark.parametrize("samples", [1, 2])
def test_the_confidence_reward_gets_the_states_behind_each_answer_token(model, tok, samples):
    """Kept and continuation tokens: the model's own states (a teacher-forced forward gives them); the optimised
    prefix: the latents (with K = 1 their argmax is the prefix). The reward is the direct computation on them."""
    question, start = QUESTIONS[3], 2
    reward = RecordingConfidence(model)
    cfg = config(samples=samples, start_index=start, reward_threshold=0.0)  # R < 0: every step runs
    result = LatentSeek(model, tok, reward, cfg).solve(question)
    assert result.steps == cfg.max_steps and result.update_length > 0
    prompt = build_prompt_ids(tok, question)
    adapter = ModelAdapter.of(model)
    L, P = result.update_length, len(prompt)
    assert len(reward.seen) == len(result.scored_details) == result.scored_by_step[-1]
    blocks = [0, *result.scored_by_step]
    for i, answer in enumerate(result.answer_ids):
        # the answer kept at step i is one of the step's scored answers (K = 1: the only one): the one with its
        # length and reward
        (h,) = [
            reward.seen[j]
            for j in range(blocks[i], blocks[i + 1])
            if reward.seen[j].shape[0] == len(answer)
            and -math.log(reward.k) / result.scored_details[j]["confidence"] == result.rewards[i]
        ]
        with torch.no_grad():
            states = model.model(torch.tensor([prompt + answer], device=model.device)).last_hidden_state[0]
        own = list(range(start)) + list(range(start + L if i else 0, len(answer)))
        for t in own:
            torch.testing.assert_close(h[t], states[P + t - 1], rtol=1e-4, atol=1e-4)
        if i and samples == 1:
            prefix = torch.tensor(answer[start : start + L])
            assert torch.equal(adapter.logits(h[start : start + L]).argmax(-1).cpu(), prefix)
        want = -(h.double() @ adapter.weight.double().T).log_softmax(-1).topk(reward.k, -1).values.mean()
        assert result.rewards[i] == pytest.approx(-math.log(reward.k) / float(want), rel=1e-5)


# --- the command line ----------------------------------------------------------------------------------------------


def test_eval_flags_samples_and_confidence_and_resume(tmp_path, dataset, tiny, capsys):  # noqa: F811
    out = tmp_path / "samples"
    args = _eval_args(
        dataset,
        out,
        "--method",
        "latentseek",
        "--reward",
        "oracle",
        "--samples",
        "3",
        "--seed",
        "5",
        "--max-steps",
        "2",
        "--max-new-tokens",
        "6",
        "--rho",
        "0.5",
    )
    assert main([*args, "--limit", "2"]) == 0
    first = load_run(out)
    assert first.config["method"] == "latentseek-oracle"
    assert (first.config["knobs"]["samples"], first.config["knobs"]["seed"]) == (3, 5)
    assert main(args) == 0  # resumes with the third problem only
    run = load_run(out)
    assert [r.id for r in run.records] == ["q0", "q1", "q2"]
    assert [r.record for r in run.records[:2]] == [r.record for r in first.records]
    for stored in run.records:
        r = stored.record
        assert len(r.sample_rewards) == r.iterations and all(len(s) == 3 for s in r.sample_rewards)
        assert len(r.step_tokens) == r.iterations + 1 and r.step_tokens[-1] == r.tokens

    conf = tmp_path / "confidence"
    cargs = _eval_args(dataset, conf, "--method", "latentseek", "--reward", "confidence", "--max-steps", "1")
    assert main([*cargs, "--max-new-tokens", "6", "--keep-best"]) == 0
    run = load_run(conf)
    assert run.config["method"] == "latentseek-confidence"
    assert "seed" not in run.config["knobs"] and run.config["knobs"]["samples"] == 1
    assert all(-1.0 <= v < 0.0 for s in run.records for v in s.record.rewards)
    assert all(s.record.verifier_tokens == 0 for s in run.records)

    assert main(_eval_args(dataset, tmp_path / "bon", "--method", "bon", "--reward", "confidence")) == 2
    assert "latentseek only" in capsys.readouterr().err
