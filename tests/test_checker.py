"""The checker must be able to fail: deliberately wrong implementations are rejected by tests/checking.py in every
dtype, while the reference and a model of the CUDA kernel's 16-bit arithmetic pass with margin."""

from __future__ import annotations

import pytest
import torch

import checking
from checking import ALL_DTYPES, P_OPERAND, P_SCALE, judge, revealing_inputs
from latentseek_ext import reference

#: A correct implementation must stay below MARGIN_OK of the bound, a wrong one above MARGIN_WRONG (or break a
#: token rule): the checker separates them with room to spare, not by luck.
MARGIN_OK = 0.5
MARGIN_WRONG = 2.0

#: The CUDA fused kernel's vocabulary tile.
TILE = 64


def _round(x: torch.Tensor, fmt: torch.dtype, scale: float) -> torch.Tensor:
    return (x * scale).to(fmt).to(x.dtype) / scale


def kernel_model(hidden, weight, reward=None, tokens=None, bias=None, *, fault: str | None = None):
    """The CUDA fused kernel's arithmetic in PyTorch (csrc/cuda header, "Precision"), with one optional fault.

    Logits in the accumulation type; a walk over vocabulary tiles with a running max m; P = exp(S - m) in the
    accumulation type, rounded to bf16/fp16 (fp16 times 2^14) as the operand of P W, so the running max enters as
    exactly 1; s from the unrounded P; O and s rescaled when the max moves; grad = -r (W[x] - O / s).
    In fp32/fp64 P is not rounded. The faults, each a mistake a kernel could make:
      grad_1pct / logp_1pct  an output 1 % too large
      accumulator_16bit      O rounded to 16 bits after every tile (bf16 where the input is fp32/fp64)
      no_exact_one           P W with P = the normalised softmax rounded to 16 bits: the argmax's entry is rounded
      ties_highest           the argmax breaks ties to the highest index
      ignores_bias, ignores_reward, wrong_sign
      no_rescale             O and s are not rescaled when the running max moves
    """
    dtype = hidden.dtype
    acc = reference.acc_dtype(dtype)
    fmt = P_OPERAND.get(dtype)
    fault_fmt = fmt or torch.bfloat16
    scale = P_SCALE.get(dtype, 1.0)
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    z = hidden.reshape(-1, H).to(acc)
    w = weight.to(acc)
    logits = z @ w.T
    if bias is not None and fault != "ignores_bias":
        logits = logits + bias.to(acc)
    if tokens is not None:
        x = tokens.reshape(-1)
    elif fault == "ties_highest":
        x = logits.shape[1] - 1 - logits.flip(-1).argmax(-1)
    else:
        x = logits.argmax(-1)

    n, V = logits.shape
    # The running max each tile sees, and the max of the row.
    tile_max = torch.nn.functional.pad(logits, (0, -V % TILE), value=-torch.inf).view(n, -1, TILE).max(-1).values
    m_tile = tile_max.cummax(-1).values.repeat_interleave(TILE, -1)[:, :V]
    m = m_tile[:, -1]
    p = torch.exp(logits - m_tile)  # 1 at each tile's running max
    # What a tile's P is worth at the end: exp(m_tile - m) (the rescales O and s go through), 1 without them.
    to_end = torch.ones_like(p) if fault == "no_rescale" else torch.exp(m_tile - m[:, None])
    s = (p * to_end).sum(-1)
    if fmt is not None:
        p = _round(p, fmt, scale)
    if fault == "accumulator_16bit":  # O = round16(alpha O + P_t W_t), tile by tile
        o = torch.zeros(n, H, dtype=acc)
        for v0 in range(0, V, TILE):
            alpha = torch.exp(m_tile[:, max(v0 - 1, 0)] - m_tile[:, v0]) if v0 else torch.ones(n, dtype=acc)
            o = (o * alpha[:, None] + p[:, v0 : v0 + TILE] @ w[v0 : v0 + TILE]).to(fault_fmt).to(acc)
        o = o * torch.exp(m_tile[:, -1] - m)[:, None]
    else:
        o = (p * to_end) @ w
    rows = torch.arange(n)
    lse = m + torch.log(s)
    logp = logits[rows, x] - lse
    if fault == "no_exact_one":  # a two-pass kernel that rounds the normalised probabilities
        probs = torch.exp(logits - lse[:, None])
        o, s = _round(probs, fault_fmt, P_SCALE.get(fault_fmt, 1.0)) @ w, torch.ones_like(s)
    r = reference.as_reward_tensor(reward, hidden)
    r = torch.ones((), dtype=acc) if r is None or fault == "ignores_reward" else r.to(acc)
    grad = -r.expand(lead).reshape(-1, 1) * (w[x] - o / s[:, None])
    if fault == "grad_1pct":
        grad = grad * 1.01
    if fault == "logp_1pct":
        logp = logp * 1.01
    if fault == "wrong_sign":
        grad = -grad
    return x.reshape(lead), logp.reshape(lead), grad.reshape(*lead, H)


FAULTS = [
    "grad_1pct",
    "logp_1pct",
    "accumulator_16bit",
    "no_exact_one",
    "ties_highest",
    "ignores_bias",
    "ignores_reward",
    "wrong_sign",
    "no_rescale",
]


@pytest.fixture(scope="module", params=ALL_DTYPES, ids=str)
def inputs(request):
    return revealing_inputs(request.param)


def _judge(impl, inputs):
    hidden, weight, reward, bias = inputs
    return judge(hidden, weight, reward, None, bias, impl(hidden, weight, reward, None, bias))


@pytest.mark.parametrize("impl", [reference.lm_head_policy_grad, kernel_model], ids=["reference", "kernel_model"])
def test_correct_implementations_pass_with_margin(impl, inputs):
    verdict = _judge(impl, inputs)
    assert verdict.ok, str(verdict)
    assert verdict.worst() <= MARGIN_OK, str(verdict)


@pytest.mark.parametrize("fault", FAULTS)
def test_wrong_implementations_are_rejected(fault, inputs):
    verdict = _judge(lambda *a: kernel_model(*a, fault=fault), inputs)
    assert not verdict.ok, f"{fault} passed: {verdict}"
    tie_rule = any("lowest index" in p or "first NaN" in p for p in verdict.problems)
    assert tie_rule or verdict.worst() >= MARGIN_WRONG, f"{fault} rejected without margin: {verdict}"


def test_inputs_reveal_what_they_claim():
    hidden, weight, reward, bias = revealing_inputs(torch.float32)
    logits = reference._logits(hidden.double(), weight.double(), bias.double())
    p_top = torch.softmax(logits, -1).max(-1).values
    assert (p_top[:6] > 0.9).all() and (p_top[8:] < 0.5).all()
    top2 = logits.topk(2, -1)
    assert torch.equal(top2.values[6:8, 0], top2.values[6:8, 1])  # exact ties
    assert (top2.indices[6:8].diff(dim=-1).abs() > 1000).all()
    assert (reward != 1).all() and (reward == 0).any() and (reward < 0).any()


# --- the rules, one at a time ---------------------------------------------------------------------------------


def _small(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 32, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(300, 32, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    return hidden, weight


def test_a_near_tie_may_pick_either_token_but_a_clear_loser_may_not():
    hidden, weight = _small()
    weight[7] = weight[200]
    weight[7, 0] = torch.nextafter(weight[200, 0], torch.tensor(torch.inf))  # logits differ by ~1 ulp
    hidden[0] = weight[200] * 20  # both far above the rest
    x, logp, grad = reference.lm_head_policy_grad(hidden, weight)
    other = 200 if int(x[0]) == 7 else 7
    flipped = x.clone()
    flipped[0] = other
    _, logp_f, grad_f = reference.lm_head_policy_grad(hidden, weight, None, flipped)
    assert judge(hidden, weight, None, None, None, (flipped, logp_f, grad_f)).ok
    loser = x.clone()
    loser[1] = (int(x[1]) + 1) % 300
    _, logp_l, grad_l = reference.lm_head_policy_grad(hidden, weight, None, loser)
    verdict = judge(hidden, weight, None, None, None, (loser, logp_l, grad_l))
    assert any("below the row's maximum" in p for p in verdict.problems), str(verdict)


def test_nan_pattern_and_first_nan_token():
    hidden, weight = _small()
    hidden[2, 5] = float("nan")
    x, logp, grad = reference.lm_head_policy_grad(hidden, weight)
    assert judge(hidden, weight, None, None, None, (x, logp, grad)).ok
    no_nan = logp.clone()
    no_nan[2] = 0.0
    assert any("NaN pattern" in p for p in judge(hidden, weight, None, None, None, (x, no_nan, grad)).problems)
    other = x.clone()
    other[2] = 3
    assert any("first NaN" in p for p in judge(hidden, weight, None, None, None, (other, logp, grad)).problems)


def test_given_tokens_must_come_back_and_outputs_have_the_contract_dtypes():
    hidden, weight = _small(torch.bfloat16)
    tokens = torch.tensor([5, 0, 299, 17])
    x, logp, grad = reference.lm_head_policy_grad(hidden, weight, None, tokens)
    assert judge(hidden, weight, None, tokens, None, (x, logp, grad)).ok
    assert not judge(hidden, weight, None, tokens, None, (x.flip(0), logp, grad)).ok
    assert not judge(hidden, weight, None, tokens, None, (x, logp.bfloat16(), grad)).ok
    # autograd hands back grad in hidden's dtype: half an ulp of it is allowed on top
    assert judge(hidden, weight, None, tokens, None, (x, logp, grad.bfloat16()), grad_dtype=torch.bfloat16).ok


def test_the_cases_file_of_the_cpp_test_is_judged_by_the_same_rules(tmp_path):
    # csrc/test/test_lm_head.cpp writes such a file (torch::pickle_save); ctest runs `python tests/checking.py FILE`.
    hidden, weight, reward, bias = revealing_inputs(torch.bfloat16)
    x, logp, grad = kernel_model(hidden, weight, reward, None, bias)
    record = {"name": "bf16", "hidden": hidden, "weight": weight, "bias": bias, "reward": reward, "tokens": None}
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save([{**record, "out_tokens": x, "logp": logp, "grad": grad}], good)
    torch.save([{**record, "out_tokens": x, "logp": logp, "grad": grad * 1.01}], bad)
    assert checking.main([str(good)]) == 0
    assert checking.main([str(bad)]) == 1


def test_exact_ties_go_to_the_lowest_index_where_every_summation_order_sees_them():
    hidden, weight = _small()
    weight[250] = weight[40]  # identical rows; their logits, computed in float32 by a BLAS, may still differ
    hidden[0] = weight[40] * 40
    x, logp, grad = reference.lm_head_policy_grad(hidden, weight)
    assert int(x[0]) == 40
    high = x.clone()
    high[0] = 250
    outputs = (high, *reference.lm_head_policy_grad(hidden, weight, None, high)[1:])
    assert judge(hidden, weight, None, None, None, outputs).ok  # not provably a tie for every kernel
    # On a coarse binary grid every summation order computes both logits exactly: the tie must go to index 40.
    hidden[0] = torch.round(hidden[0] * 4) / 4
    weight[40] = weight[250] = torch.round(weight[40] * 4) / 4
    outputs = (high, *reference.lm_head_policy_grad(hidden, weight, None, high)[1:])
    verdict = judge(hidden, weight, None, None, None, outputs)
    assert any("lowest index" in p for p in verdict.problems), str(verdict)


# --- the options (temperature, sampling, entropy, top-k) -------------------------------------------------------------

#: The options every option fault runs with: each output of each option is judged.
OPTIONS = {"temperature": 0.7, "sample": True, "seed": 2024, "entropy": True, "topk": 8}


def options_model(hidden, weight, reward=None, tokens=None, bias=None, *, fault: str | None = None, **options):
    """The reference with the options, and one optional fault, each a mistake a kernel could make:
    entropy_1pct / topk_logp_1pct  an output 1 % too large
    topk_skips_rank                the k-th returned token is the (k+1)-th largest (one rank skipped)
    topk_ties_highest              top-k ties broken to the higher index (shows on exact ties, see below)
    temperature_ignored            every output computed at T = 1
    entropy_unscaled               the entropy of softmax(l) instead of softmax(l / T)
    noise_exponential              the sample is argmax(l' - log u) (exponential noise instead of Gumbel)
    noise_other_stream             the noise of offset n + 1 for row n
    """
    opts = dict(options)
    if fault == "temperature_ignored":
        opts["temperature"] = 1.0
    if fault in ("noise_exponential", "noise_other_stream"):
        T = opts["temperature"]
        scaled = reference._logits(hidden, weight, bias) / T
        off = reference.default_offsets(hidden).reshape(-1)
        if fault == "noise_exponential":
            noise = -torch.log(reference.gumbel_uniform(opts["seed"], off, weight.shape[0]).double())
        else:
            noise = reference.gumbel_noise(opts["seed"], off + 1, weight.shape[0])
        tokens = (scaled + noise.to(scaled.dtype)).argmax(-1).reshape(hidden.shape[:-1])
        opts.update(sample=False, seed=None)
    x, logp, grad, ent, top_logp, top_tokens = reference.lm_head_policy_grad(
        hidden, weight, reward, tokens, bias, **opts
    )
    if fault == "entropy_1pct":
        ent = ent * 1.01
    if fault == "entropy_unscaled":
        ent = reference.lm_head_policy_grad(hidden, weight, reward, tokens, bias, entropy=True)[3]
    if fault == "topk_logp_1pct":
        top_logp = top_logp * 1.01
    if fault == "topk_skips_rank":
        more = reference.lm_head_policy_grad(hidden, weight, reward, tokens, bias, **{**opts, "topk": opts["topk"] + 1})
        top_logp = torch.cat([top_logp[..., :-1], more[4][..., -1:]], -1)
        top_tokens = torch.cat([top_tokens[..., :-1], more[5][..., -1:]], -1)
    if fault == "topk_ties_highest":
        V = weight.shape[0]
        flipped = reference.lm_head_policy_grad(
            hidden,
            weight.flip(0),
            reward,
            None,
            None if bias is None else bias.flip(0),
            topk=opts["topk"],
            temperature=opts["temperature"],
        )
        top_tokens = V - 1 - flipped[4]
    return x, logp, grad, ent, top_logp, top_tokens


OPTION_FAULTS = [
    "entropy_1pct",
    "topk_logp_1pct",
    "topk_skips_rank",
    "temperature_ignored",
    "entropy_unscaled",
    "noise_exponential",
    "noise_other_stream",
]


def _judge_options(impl, inputs, **options):
    hidden, weight, reward, bias = inputs
    verdict, _ = checking.check_options_call(impl, hidden, weight, reward, None, bias, **{**OPTIONS, **options})
    return verdict


@pytest.mark.parametrize(
    "impl",
    [reference.lm_head_policy_grad, options_model],
    ids=["reference", "options_model"],
)
def test_correct_option_implementations_pass_with_margin(impl, inputs):
    verdict = _judge_options(impl, inputs)
    assert verdict.ok, str(verdict)
    assert verdict.worst() <= MARGIN_OK, str(verdict)


@pytest.mark.parametrize("fault", OPTION_FAULTS)
def test_wrong_option_implementations_are_rejected(fault, inputs):
    verdict = _judge_options(lambda *a, **k: options_model(*a, fault=fault, **k), inputs)
    assert not verdict.ok, f"{fault} passed: {verdict}"
    rule = any("tokens:" in p and "rows" in p for p in verdict.problems)
    assert rule or verdict.worst() >= MARGIN_WRONG, f"{fault} rejected without margin: {verdict}"


def test_topk_exact_ties_go_to_the_lowest_index():
    # Rows 6-7 of the revealing inputs have an exact tie (two identical rows of W on a binary grid) at their top.
    inputs = revealing_inputs(torch.float32)
    good = _judge_options(options_model, inputs, sample=False, seed=None)
    assert good.ok, str(good)
    bad = _judge_options(
        lambda *a, **k: options_model(*a, fault="topk_ties_highest", **k), inputs, sample=False, seed=None
    )
    assert any("exact tie" in p for p in bad.problems), str(bad)
