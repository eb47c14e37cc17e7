"""latentseek.slot (SLOT) and its ``slot`` method on a tiny random model: the gradient, batch independence, the
zero-step answer, the generation hook, the command line and resuming."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import latentseek.eval.cli as cli
from latentseek.chat import build_prompt_ids, stop_token_ids
from latentseek.errors import ConfigError
from latentseek.eval.cli import main
from latentseek.eval.data import Problem
from latentseek.eval.methods import METHODS, CoT, SlotMethod, check_knobs, knob_table, make_method
from latentseek.eval.record import Record, SlotRecord
from latentseek.eval.storage import load_run
from latentseek.generation import extend, generate
from latentseek.model import ModelAdapter
from latentseek.slot import Slot, SlotConfig, prompt_loss_grad
from tiny_lm import QUESTIONS, tiny_model, tiny_tokenizer

MAX_NEW = 10


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def adapter(tok, device):
    return ModelAdapter(tiny_model("qwen2", vocab_size=len(tok), device=device))


@pytest.fixture(scope="module")
def biased(tok, device):
    """An untied LM head with a bias (the op's b), so that the gradient test covers it."""
    model = tiny_model("llama", vocab_size=len(tok), device=device)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True).to(device)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(3)))
    model.requires_grad_(False)
    return ModelAdapter(model)


def slot(adapter, tok, **config):
    return Slot(adapter, tok, SlotConfig(**{"max_new_tokens": MAX_NEW, **config}))


# --- the math ------------------------------------------------------------------------------------------------------


def autograd_loss(adapter, hidden, delta, targets, sizes):
    """The definition, in float64 through autograd: each problem's mean cross-entropy of its prompt positions."""
    delta = delta.double().requires_grad_(True)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(hidden.device)
    bias = None if adapter.bias is None else adapter.bias.double()
    logits = F.linear(hidden.double() + delta[owner], adapter.weight.double(), bias)
    nll = F.cross_entropy(logits, targets, reduction="none")
    loss = torch.stack([x.mean() for x in nll.split(sizes)])
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    return loss.detach(), grad


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["qwen2", "llama-bias"])
def test_the_gradient_wrt_delta_is_autograd_through_the_definition(adapter, biased, tok, impl, with_bias):
    model = biased if with_bias else adapter
    engine = slot(model, tok, impl=impl)
    prompts = engine.prompt_ids(QUESTIONS)
    hidden, _ = engine.read_prompts(prompts)
    sizes = [h.shape[0] for h in hidden]
    h = torch.cat(hidden)
    targets = torch.cat([torch.tensor(p[1:]) for p in prompts]).to(h.device)
    delta = 0.3 * torch.randn(len(prompts), model.hidden_size, generator=torch.Generator().manual_seed(1))
    delta = delta.to(h.device)

    loss, grad = prompt_loss_grad(model, h, delta, targets, sizes, impl=impl)
    want_loss, want_grad = autograd_loss(model, h, delta, targets, sizes)
    assert grad.dtype == torch.float32 and grad.shape == delta.shape
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    # the checker can fail: the gradient of the summed (not mean) loss, or of another problem's delta
    assert not torch.allclose(grad.double() * torch.tensor(sizes, device=h.device)[:, None], want_grad, atol=1e-6)
    assert not torch.allclose(grad.double().flip(0), want_grad, atol=1e-6)


def test_prompt_loss_grad_refuses_mismatched_shapes(adapter):
    h = torch.zeros(5, adapter.hidden_size, device=adapter.device)
    targets = torch.zeros(5, dtype=torch.long, device=adapter.device)
    with pytest.raises(ValueError, match=r"delta must have shape \[2, H\] \(one row per problem\), got \[3, 64\]"):
        prompt_loss_grad(adapter, h, torch.zeros(3, 64, device=adapter.device), targets, [2, 3])
    with pytest.raises(ValueError, match="must have sum\\(sizes\\) = 6 rows, got 5"):
        prompt_loss_grad(adapter, h, torch.zeros(2, 64, device=adapter.device), targets, [2, 4])


def test_the_steps_lower_each_prompts_loss(adapter, tok):
    results = slot(adapter, tok, steps=4, lr=0.02).solve_batch(QUESTIONS)
    for r in results:
        assert len(r.losses) == 4
        assert all(b < a for a, b in zip(r.losses, r.losses[1:], strict=False)), r.losses


# --- batching -------------------------------------------------------------------------------------------------------


def test_batched_equals_one_by_one_and_every_problem_has_its_own_delta(adapter, tok):
    engine = slot(adapter, tok, steps=3)
    batched = engine.solve_batch(QUESTIONS)
    for question, got in zip(QUESTIONS, batched, strict=True):
        alone = engine.solve(question)
        assert got.answer_ids == alone.answer_ids
        torch.testing.assert_close(got.delta, alone.delta, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.losses, alone.losses, rtol=1e-5, atol=1e-5)
    deltas = torch.stack([r.delta for r in batched])
    distances = torch.cdist(deltas, deltas)
    off_diagonal = distances[~torch.eye(len(QUESTIONS), dtype=torch.bool, device=distances.device)]
    assert off_diagonal.min() > 0.1 * deltas.norm(dim=1).min(), distances
    # the order of the batch does not matter either
    reordered = engine.solve_batch(QUESTIONS[::-1])[::-1]
    assert [r.answer_ids for r in reordered] == [r.answer_ids for r in batched]


def test_zero_steps_is_the_greedy_answer(adapter, tok):
    results = slot(adapter, tok, steps=0).solve_batch(QUESTIONS)
    plain = generate(adapter, tok, [build_prompt_ids(tok, q) for q in QUESTIONS], MAX_NEW)
    assert [r.answer_ids for r in results] == plain.tokens
    assert all(r.losses == [] and not r.delta.any() for r in results)


def test_the_delta_changes_the_answers(adapter, tok):
    plain = slot(adapter, tok, steps=0).solve_batch(QUESTIONS)
    fitted = slot(adapter, tok, steps=3, lr=0.5).solve_batch(QUESTIONS)
    assert any(a.answer_ids != b.answer_ids for a, b in zip(plain, fitted, strict=True))


# --- the generation hook ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_extend_adds_each_rows_offset_before_the_lm_head(adapter, tok, decode):
    prompts = [build_prompt_ids(tok, q) for q in QUESTIONS]
    stop = stop_token_ids(tok, adapter)
    rows = [(None, p) for p in prompts]
    offset = 2.0 * torch.randn(len(prompts), adapter.hidden_size, generator=torch.Generator().manual_seed(2))
    offset = offset.to(adapter.device)
    plain = extend(adapter, rows, MAX_NEW, stop, return_hidden=True, decode="eager")
    zero = extend(adapter, rows, MAX_NEW, stop, decode=decode, offset=torch.zeros_like(offset))
    assert zero.tokens == plain.tokens
    got = extend(adapter, rows, MAX_NEW, stop, return_hidden=True, decode=decode, offset=offset)
    want = extend(adapter, rows, MAX_NEW, stop, return_hidden=True, decode="eager", offset=offset)
    assert got.tokens == want.tokens and got.tokens != plain.tokens
    for i in range(len(prompts)):
        # the prefill's last hidden state is the model's; the LM head reads it plus the row's offset
        torch.testing.assert_close(got.hidden[i][0] - offset[i], plain.hidden[i][0], rtol=1e-5, atol=1e-5)
        assert got.tokens[i][0] == int(adapter.logits(got.hidden[i][0]).argmax())
        torch.testing.assert_close(got.hidden[i], want.hidden[i], rtol=1e-5, atol=1e-5)


def test_extend_refuses_an_offset_of_the_wrong_shape(adapter, tok):
    with pytest.raises(ValueError, match=r"offset must have shape \[1, 64\] \(one vector per row\), got \[2, 64\]"):
        extend(adapter, [(None, [1, 2])], 2, [2], offset=torch.zeros(2, 64))


# --- the method and the command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    return [Problem(id=f"p{i}", question=q, gold="5", answer_kind="number") for i, q in enumerate(QUESTIONS[:3])]


def test_the_method_with_zero_steps_answers_as_cot(adapter, tok, problems):
    cot = CoT(adapter, tok, max_new_tokens=MAX_NEW).solve_batch(problems)
    records = make_method("slot", adapter, tok, max_new_tokens=MAX_NEW, steps=0).solve_batch(problems)
    assert [r.response for r in records] == [r.response for r in cot]
    assert [r.tokens for r in records] == [r.tokens for r in cot]
    assert all(r.iterations == 0 and r.prompt_losses == [] and r.delta_norm == 0.0 for r in records)


def test_the_method_writes_slot_records(adapter, tok, problems):
    method = make_method("slot", adapter, tok, max_new_tokens=MAX_NEW, steps=2, lr=0.05)
    assert method.name == "slot"
    assert method.knobs == {
        "prompt": "boxed",
        "steps": 2,
        "lr": 0.05,
        "max_new_tokens": MAX_NEW,
        "impl": "auto",
        "decode": None,
    }
    records = method.solve_batch(problems)
    for record in records:
        assert type(record) is SlotRecord and Record.from_json(record.to_json()) == record
        assert record.iterations == 2 and len(record.prompt_losses) == 2 and record.delta_norm > 0
        assert record.tokens > 0 and 0 < record.optimise_seconds < record.seconds


def test_the_knobs_of_slot():
    knobs = {k.name: k for k in knob_table()}
    assert "slot" in METHODS
    assert knobs["steps"].defaults == {"slot": 5} and knobs["lr"].defaults["slot"] == 0.1
    assert knobs["lr"].defaults["latentseek"] == 0.03
    assert [k.name for k in knob_table(["slot"])] == ["prompt", "steps", "lr", "max_new_tokens", "impl", "decode"]
    with pytest.raises(ConfigError, match="SlotConfig.steps must be >= 0, got -1"):
        check_knobs("slot", {"steps": -1})
    with pytest.raises(ConfigError, match="SlotConfig.lr must be a positive finite number, got 0.0"):
        check_knobs("slot", {"lr": 0.0})
    with pytest.raises(ConfigError, match="does not use rho"):
        check_knobs("slot", {"rho": 0.2})
    with pytest.raises(ConfigError, match="does not use steps"):
        check_knobs("cot", {"steps": 2})


@pytest.fixture
def tiny_cli(monkeypatch, adapter, tok):
    """`latentseek.eval.cli.load_model` returning the tiny model (whatever it is asked for)."""
    monkeypatch.setattr(cli, "load_model", lambda path, **kwargs: (adapter.model, tok))


def test_eval_slot_writes_a_run_and_resumes_it(tmp_path, tiny_cli, tok, monkeypatch, capsys):
    dataset = tmp_path / "problems.jsonl"
    rows = [{"id": f"q{i}", "question": f"what is {i} + 1 ?", "answer": str(i + 1)} for i in range(3)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    solved = []
    original = SlotMethod.solve_batch

    def spy(self, problems):
        solved.append([p.id for p in problems])
        return original(self, problems)

    monkeypatch.setattr(SlotMethod, "solve_batch", spy)
    out = tmp_path / "slot"
    base = [
        "eval",
        "--model",
        "tiny",
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--no-progress",
        "--method",
        "slot",
    ]
    args = [*base, "--steps", "2", "--lr", "0.05", "--max-new-tokens", "6", "--batch-size", "2"]
    assert main([*args, "--limit", "2"]) == 0
    assert solved == [["q0", "q1"]]
    run = load_run(out)
    assert run.config["method"] == "slot"
    assert run.config["knobs"] == {
        "prompt": "boxed",
        "steps": 2,
        "lr": 0.05,
        "max_new_tokens": 6,
        "impl": "auto",
        "decode": None,
    }
    first = [r.record for r in run.records]
    assert all(isinstance(r, SlotRecord) and r.iterations == 2 for r in first)

    assert main(args) == 0  # resumed: only the third problem is left
    assert solved == [["q0", "q1"], ["q2"]]
    assert "3/3 problems done" in capsys.readouterr().out
    run = load_run(out)
    assert [r.id for r in run.records] == ["q0", "q1", "q2"] and [r.record for r in run.records][:2] == first

    assert main([*base, "--steps", "3", "--lr", "0.05", "--max-new-tokens", "6"]) == 2
    assert "knobs.steps: 2 -> 3" in capsys.readouterr().err
