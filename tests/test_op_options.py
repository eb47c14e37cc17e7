"""Tests of the op's options (issue 14 §1): temperature, sample (Gumbel-max with Philox noise), entropy, top-k.

Every output is judged by tests/checking.py against a float64 truth (sampled tokens by their perturbed score), for the
CPU kernel and the reference; the sampler's noise is checked bit for bit and its draws statistically."""

from __future__ import annotations

import math

import pytest
import torch

import latentseek_ext
from checking import ALL_DTYPES, DTYPES, check_options_call, judge, revealing_inputs
from latentseek_ext import lm_head_logprob, lm_head_policy_grad, reference

pytestmark = pytest.mark.skipif(not latentseek_ext.extension_available("cpu"), reason="extension not built")

IMPLS = ["ext", "reference"]
#: Option sets, each judged on every output it asks for.
OPTION_SETS = {
    "temperature": {"temperature": 0.6},
    "entropy": {"entropy": True},
    "topk": {"topk": 7},
    "sample": {"sample": True, "seed": 31337},
    "all": {"temperature": 1.7, "sample": True, "seed": 5, "entropy": True, "topk": 32},
}


def call(impl):
    return lambda *a, **k: lm_head_policy_grad(*a, impl=impl, **k)


def make(N, H, V, dtype, *, scale=1.0, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(H))).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return hidden, weight, b


def assert_ok(verdict, limit=1.0):
    """Within the bound (limit 1); the revealing inputs also ask for a margin (0.5), as tests/test_op.py does."""
    assert verdict.ok, str(verdict)
    assert verdict.worst() <= limit, str(verdict)


# --- accuracy --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_match_float64_truth(impl, dtype, name):
    options = OPTION_SETS[name]
    for N, H, V in ((1, 8, 5), (7, 33, 1000), (13, 64, 4099)):
        hidden, weight, bias = make(N, H, V, dtype, bias=V % 2 == 1, seed=N)
        reward = torch.randn(N)
        opts = {**options, "topk": min(options.get("topk", 0), V)}
        verdict, outputs = check_options_call(call(impl), hidden, weight, reward, None, bias, **opts)
        assert_ok(verdict)
        assert len(outputs) == 3 + bool(options.get("entropy")) + 2 * bool(options.get("topk"))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_kernel_options_well_inside_the_bound_on_the_revealing_inputs(dtype):
    # The inputs on which tests/test_checker.py shows every option fault failing.
    hidden, weight, reward, bias = revealing_inputs(dtype)
    verdict, _ = check_options_call(call("ext"), hidden, weight, reward, None, bias, **OPTION_SETS["all"])
    print(f"{dtype}: {verdict}")
    assert_ok(verdict, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_options_at_the_real_size(dtype):
    # H and V of Qwen2.5-0.5B; a row block and a vocabulary split of the CPU kernel each.
    hidden, weight, _ = make(3, 896, 151936, dtype)
    verdict, _ = check_options_call(call("ext"), hidden, weight, -0.5, None, None, **OPTION_SETS["all"])
    assert_ok(verdict)


def test_given_tokens_with_temperature_entropy_and_topk():
    hidden, weight, bias = make(9, 40, 3001, torch.float32, bias=True)
    tokens = torch.randint(0, 3001, (9,))
    tokens[0], tokens[1] = 0, 3000
    for impl in IMPLS:
        verdict, out = check_options_call(
            call(impl), hidden, weight, 0.7, tokens, bias, temperature=0.5, entropy=True, topk=4
        )
        assert_ok(verdict)
        assert torch.equal(out[0], tokens)


def test_many_row_blocks_vocab_splits_and_leading_dims():
    for N, V in ((1100, 1500), (3, 20000)):  # both ways the CPU kernel splits the work
        hidden, weight, _ = make(N, 16, V, torch.float32)
        assert_ok(check_options_call(call("ext"), hidden, weight, None, None, None, **OPTION_SETS["all"])[0])
    hidden, weight, bias = make(6, 16, 700, torch.float32, bias=True)
    out3 = lm_head_policy_grad(hidden.reshape(2, 3, 16), weight, None, None, bias, **OPTION_SETS["all"])
    out2 = lm_head_policy_grad(hidden, weight, None, None, bias, **OPTION_SETS["all"])
    assert [tuple(t.shape) for t in out3] == [(2, 3), (2, 3), (2, 3, 16), (2, 3), (2, 3, 32), (2, 3, 32)]
    for a, b in zip(out3, out2, strict=True):
        assert torch.equal(a.reshape(b.shape), b)


def test_no_options_is_the_plain_op():
    hidden, weight, bias = make(5, 24, 900, torch.float32, bias=True)
    reward = torch.randn(5)
    plain = torch.ops.latentseek_ext.lm_head_policy_grad.default(hidden, weight, reward, None, bias)
    for a, b in zip(lm_head_policy_grad(hidden, weight, reward, None, bias, temperature=1.0), plain, strict=True):
        assert torch.equal(a, b)
    # The options overload without options runs the options path of the kernel: the same numbers.
    full = torch.ops.latentseek_ext.lm_head_policy_grad.options(hidden, weight, reward, 1.0, None, bias)
    for a, b in zip(full[:3], plain, strict=True):
        assert torch.equal(a, b)
    assert full[3].shape == (0,) and full[4].shape == (5, 0) and full[5].shape == (5, 0)


def test_float_reward_and_tensor_reward_agree_with_options():
    hidden, weight, _ = make(4, 16, 300, torch.float32)
    a = lm_head_policy_grad(hidden, weight, 0.25, temperature=0.8, entropy=True)
    b = lm_head_policy_grad(hidden, weight, torch.tensor(0.25), temperature=0.8, entropy=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# --- top-k details ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_ties_go_to_the_lower_index_and_masked_tokens_come_last(impl):
    hidden, weight, _ = make(2, 8, 50, torch.float32)
    hidden = torch.round(hidden * 4) / 4
    weight = torch.round(weight * 8) / 8
    weight[30] = weight[10] = weight[40]  # identical rows: exact ties in any summation order
    hidden[0] = weight[40] * 64
    bias = torch.zeros(50)
    bias[45:] = -math.inf  # 45 allowed tokens
    _, _, _, logp, tokens = lm_head_policy_grad(hidden, weight, None, None, bias, topk=3, impl=impl)
    assert tokens[0].tolist() == [10, 30, 40]
    assert torch.equal(logp[0, 0], logp[0, 2])
    bias[3:] = -math.inf  # three allowed tokens, k = 5: the masked ones with the lowest indices follow
    _, _, _, logp, tokens = lm_head_policy_grad(hidden, weight, None, None, bias, topk=5, impl=impl)
    assert tokens[:, 3:].tolist() == [[3, 4], [3, 4]]
    assert torch.isneginf(logp[:, 3:]).all() and torch.isfinite(logp[:, :3]).all()


def test_topk_equals_k_largest_of_the_reference():
    hidden, weight, bias = make(11, 32, 2000, torch.float32, bias=True)
    for k in (1, 2, 32):
        got = lm_head_policy_grad(hidden, weight, None, None, bias, temperature=0.9, topk=k)
        want = reference.lm_head_policy_grad(hidden, weight, None, None, bias, temperature=0.9, topk=k)
        assert torch.equal(got[4], want[4])
        torch.testing.assert_close(got[3], want[3], rtol=0, atol=1e-5)


# --- non-finite rows ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_rows_give_nan_entropy_and_topk(impl):
    hidden, weight, _ = make(4, 16, 300, torch.float32)
    hidden[1, 3] = math.nan
    weight[77, 0] = math.inf  # +inf in row 2's logits (hidden[2, 0] > 0), -inf or NaN in the others
    hidden[2, 0] = abs(float(hidden[2, 0])) + 1
    hidden[0, 0] = hidden[3, 0] = 0.0  # rows 0 and 3: 0 * inf = NaN
    tokens, logp, grad, ent, top_logp, top_tokens = lm_head_policy_grad(
        hidden, weight, None, None, None, temperature=0.5, sample=True, seed=3, entropy=True, topk=4, impl=impl
    )
    plain = lm_head_policy_grad(hidden, weight, impl=impl)[0]
    assert torch.equal(tokens, plain)  # the plain rule: first NaN, else first +inf
    assert torch.isnan(logp).all() and torch.isnan(ent).all() and torch.isnan(top_logp).all()
    assert torch.equal(top_tokens, torch.arange(4).expand(4, 4))


# --- sampling: the noise, reproducibility, the distribution -------------------------------------------------------


def test_torch_philox_gives_the_kernels_uniforms_bitwise():
    offsets = torch.tensor([0, 1, 5, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1])
    for seed in (0, 1, 2**32 + 5, 2**63 - 1):
        for V in (1, 7, 1027):
            got = torch.ops.latentseek_ext.gumbel_uniform(seed, offsets, V)
            want = reference.gumbel_uniform(seed, offsets, V)
            assert got.dtype == torch.float32 and torch.equal(got, want)
    u = reference.gumbel_uniform(9, torch.arange(64), 4096)
    assert (u > 0).all() and (u < 1).all()
    assert float(reference.gumbel_noise(9, torch.arange(64), 4096).max()) < reference.GUMBEL_MAX + 1e-9


def test_philox_known_answers():
    # Random123's known-answer vectors of Philox4x32-10 (kat_vectors).
    m = 0xFFFFFFFF
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((m, m, m, m), (m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        got = reference.philox4x32(tuple(torch.tensor(c) for c in counter), key)
        assert [int(x) for x in got] == list(want)


def test_sampler_is_reproducible_and_independent_of_the_batch():
    hidden, weight, bias = make(40, 24, 5003, torch.float32, bias=True, scale=0.3)
    offsets = torch.randint(0, 2**40, (40,))
    kw = {"temperature": 1.3, "sample": True, "seed": 77, "offsets": offsets}
    full = lm_head_policy_grad(hidden, weight, None, None, bias, **kw)
    again = lm_head_policy_grad(hidden, weight, None, None, bias, **kw)
    for a, b in zip(full, again, strict=True):
        assert torch.equal(a, b)
    perm = torch.randperm(40)
    permuted = lm_head_policy_grad(hidden[perm], weight, None, None, bias, **{**kw, "offsets": offsets[perm]})
    assert torch.equal(permuted[0], full[0][perm])
    for rows in (slice(0, 1), slice(7, 19), slice(39, 40)):
        part = lm_head_policy_grad(hidden[rows], weight, None, None, bias, **{**kw, "offsets": offsets[rows]})
        assert torch.equal(part[0], full[0][rows])
    # The default offsets are the row index: row n of a batch samples like a single row with offset n.
    default = lm_head_policy_grad(hidden, weight, None, None, bias, temperature=1.3, sample=True, seed=77)
    single = lm_head_policy_grad(hidden[5:6], weight, None, None, bias, **{**kw, "offsets": torch.tensor([5])})
    assert int(default[0][5]) == int(single[0][0])
    # The thread count changes how the vocabulary is split, not the sample.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lm_head_policy_grad(hidden[:3], weight, None, None, bias, **{**kw, "offsets": offsets[:3]})
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], full[0][:3])
    assert torch.equal(default[0], reference.lm_head_policy_grad(hidden, weight, None, None, bias, temperature=1.3,
                                                                 sample=True, seed=77)[0])  # fmt: skip


#: The chi-square test of the sampler: draws, the p-value below which it fails, the fixed seed.
DRAWS, P_FAIL, CHI2_SEED = 20000, 1e-3, 12345


def _chi2_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square statistic of the token counts against probs (V - 1 degrees of freedom)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = probs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _chi2_case():
    """One row of logits with V = 6 repeated DRAWS times; each copy gets its own offset."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=g) * 0.5
    hidden = torch.randn(1, 4, generator=g).expand(DRAWS, 4).contiguous()
    return hidden, weight, 1.4


def test_sampler_frequencies_follow_softmax_of_logits_over_t():
    hidden, weight, T = _chi2_case()
    probs = torch.softmax(reference._logits(hidden[:1].double(), weight.double(), None)[0] / T, -1)
    assert float(probs.min()) > 0.02  # every cell expects > 400 draws
    for impl in IMPLS:
        tokens = lm_head_policy_grad(hidden, weight, None, None, None, temperature=T, sample=True, seed=CHI2_SEED,
                                     impl=impl)[0]  # fmt: skip
        p = _chi2_p_value(tokens, probs)
        assert p > P_FAIL, f"{impl}: chi-square p-value {p:.3g}"


@pytest.mark.parametrize("wrong", ["temperature_ignored", "exponential_noise"])
def test_the_chi_square_test_rejects_a_wrong_sampler(wrong):
    hidden, weight, T = _chi2_case()
    logits = reference._logits(hidden.double(), weight.double(), None)
    probs = torch.softmax(logits[0] / T, -1)
    u = reference.gumbel_uniform(CHI2_SEED, torch.arange(DRAWS), 6).double()
    if wrong == "temperature_ignored":
        tokens = (logits + -torch.log(-torch.log(u))).argmax(-1)
    else:  # -log(u) is exponential noise: argmax(l/T - log u) does not draw from softmax(l/T)
        tokens = (logits / T - torch.log(u)).argmax(-1)
    assert _chi2_p_value(tokens, probs) < P_FAIL


def test_sampled_logp_and_grad_are_those_of_the_sampled_token():
    hidden, weight, bias = make(8, 20, 600, torch.float32, bias=True)
    x, logp, grad = lm_head_policy_grad(hidden, weight, 0.5, None, bias, temperature=0.8, sample=True, seed=4)
    _, logp_t, grad_t = lm_head_policy_grad(hidden, weight, 0.5, x, bias, temperature=0.8)
    torch.testing.assert_close(logp, logp_t)
    torch.testing.assert_close(grad, grad_t)


# --- lm_head_logprob with options, autograd, opcheck, compile ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprob_options_forward_and_backward_within_the_bound(dtype):
    hidden, weight, bias = make(6, 20, 333, dtype, bias=True)
    upstream = torch.randn(6)
    h = hidden.clone().requires_grad_()
    tokens, logp, ent, top_logp, top_tokens = lm_head_logprob(
        h, weight, None, bias, temperature=0.7, sample=True, seed=8, entropy=True, topk=3
    )
    (logp * upstream).sum().backward()
    verdict = judge(
        hidden, weight, -upstream, None, bias, (tokens, logp.detach(), h.grad), grad_dtype=dtype, temperature=0.7,
        seed=8, entropy=ent, topk=(top_logp, top_tokens),
    )  # fmt: skip
    assert_ok(verdict)
    assert not ent.requires_grad and not top_logp.requires_grad


def test_gradcheck_float64_with_temperature():
    hidden, weight, bias = make(3, 5, 17, torch.float64, bias=True)
    for kw in ({"temperature": 0.6}, {"temperature": 2.5, "sample": True, "seed": 1, "entropy": True, "topk": 2}):
        h = hidden.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, kw=kw: lm_head_logprob(x, weight, None, bias, **kw)[1], (h,))


def test_opcheck_options_overloads():
    hidden, weight, bias = make(5, 16, 70, torch.float32, bias=True)
    offsets = torch.tensor([3, 1, 4, 1, 5])
    ops = torch.ops.latentseek_ext
    for args in (
        (hidden, weight, None, 1.0, None, bias, 0.7, None, None, True, 3),
        (hidden, weight, torch.randn(5), -0.5, None, None, 1.3, 11, offsets, False, 0),
        (hidden.reshape(5, 1, 16), weight, None, 2.0, None, bias, 1.0, 2, None, True, 32),
    ):
        torch.library.opcheck(ops.lm_head_policy_grad.options, args)
    h = hidden.clone().requires_grad_()
    for args in (
        (h, weight, None, bias, True, 0.5, 9, offsets, True, 4),
        (hidden, weight, torch.randint(0, 70, (5,)), None, False, 2.0, None, None, False, 1),
    ):
        torch.library.opcheck(ops.lm_head_logprob.options, args)
    torch.library.opcheck(ops.gumbel_uniform.default, (3, offsets, 9))


def test_torch_compile_fullgraph_with_options():
    hidden, weight, bias = make(8, 16, 300, torch.float32, bias=True)
    offsets = torch.arange(100, 108)

    def step(h, w, b, off):
        x, logp, grad, ent, top_logp, top_tokens = lm_head_policy_grad(
            h, w, 0.5, None, b, temperature=0.9, sample=True, seed=21, offsets=off, entropy=True, topk=5
        )
        _, logp2, ent2 = lm_head_logprob(h, w, x, b, temperature=0.9, entropy=True)
        return x, logp + logp2, grad * 2, ent - ent2, top_logp, top_tokens

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got, want = compiled(hidden, weight, bias, offsets), step(hidden, weight, bias, offsets)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_cuda_without_options_kernel_falls_back_or_says_so(monkeypatch):
    # A device whose kernel does not register the options (the CUDA kernel before it implements them): "auto" runs
    # the reference, "ext" names the missing options.
    from latentseek_ext import ops

    hidden, weight, _ = make(3, 8, 50, torch.float32)
    monkeypatch.setattr(ops, "EXTENSION_OPTIONS_DEVICES", frozenset())
    got = lm_head_policy_grad(hidden, weight, topk=2)
    want = reference.lm_head_policy_grad(hidden, weight, topk=2)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="does not implement the options"):
        lm_head_policy_grad(hidden, weight, topk=2, impl="ext")
    assert torch.equal(lm_head_policy_grad(hidden, weight, impl="ext")[0], want[0])  # no options: the kernel


# --- bad input: every contract error, through the wrapper (ValueError) and the schema (RuntimeError) ----------------

BAD_OPTIONS = [
    ({"temperature": 0.0}, r"temperature must be finite and > 0, got 0.0"),
    ({"temperature": -1.0}, r"temperature must be finite and > 0, got -1.0"),
    ({"temperature": math.inf}, r"temperature must be finite and > 0, got inf"),
    ({"temperature": math.nan}, r"temperature must be finite and > 0, got nan"),
    ({"topk": -1}, r"topk must lie in \[0, min\(32, V\)\] = \[0, 20\], got -1"),
    ({"topk": 21}, r"topk must lie in \[0, min\(32, V\)\] = \[0, 20\], got 21"),
    ({"entropy": 1}, r"entropy must be a bool, got int"),
    ({"sample": True}, r"sample=True needs a seed"),
    ({"seed": 3}, r"seed is only used with sample=True, got seed=3"),
    ({"sample": True, "seed": -1}, r"seed must be a Python int in \[0, 2\*\*63\), got -1"),
    ({"sample": True, "seed": 2**63}, r"seed must be a Python int in \[0, 2\*\*63\), got 9223372036854775808"),
    ({"sample": True, "seed": 1.5}, r"seed must be a Python int in \[0, 2\*\*63\), got 1.5"),
    ({"offsets": torch.arange(4)}, r"offsets are only used with sample=True"),
    ({"sample": True, "seed": 1, "offsets": torch.arange(4).int()}, r"offsets must be an int64 tensor, got torch.int32"),
    ({"sample": True, "seed": 1, "offsets": torch.arange(5)}, r"offsets must have shape hidden.shape\[:-1\] = \[4\], got shape \[5\]"),
    ({"sample": True, "seed": 1, "offsets": torch.tensor([0, 1, -2, 3])}, r"offsets must be >= 0, got a minimum of -2"),
    ({"sample": True, "seed": 1, "offsets": torch.arange(4, device="meta")}, r"offsets must be on hidden's device \(cpu\), got meta"),
]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS, ids=[m[:30] for _, m in BAD_OPTIONS])
def test_bad_options_are_clear_errors(impl, options, match):
    hidden, weight, _ = make(4, 8, 20, torch.float32)
    # The wrapper raises ValueError; the offsets' values are read by the kernel (RuntimeError) or the reference.
    error = RuntimeError if impl == "ext" and "minimum" in match else ValueError
    with pytest.raises(error, match=f"latentseek_ext: lm_head_policy_grad: {match}"):
        lm_head_policy_grad(hidden, weight, **options, impl=impl)
    with pytest.raises(error, match=f"latentseek_ext: lm_head_logprob: {match}"):
        lm_head_logprob(hidden, weight, **options, impl=impl)


def test_sample_with_tokens_is_an_error():
    hidden, weight, _ = make(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="sample=True draws the tokens, so tokens must be None"):
        lm_head_policy_grad(hidden, weight, None, torch.zeros(4, dtype=torch.long), sample=True, seed=1)


def test_the_schema_checks_the_options_too():
    # Direct calls of the op (no Python wrapper) get the same rules as RuntimeErrors from the C++ checks.
    hidden, weight, _ = make(4, 8, 20, torch.float32)
    op = torch.ops.latentseek_ext.lm_head_policy_grad.options
    cases = [
        ({"temperature": 0.0}, r"temperature must be finite and > 0, got 0"),
        ({"topk": 21}, r"topk must lie in \[0, min\(32, V\)\] = \[0, 20\], got 21"),
        ({"seed": -1}, r"seed must lie in \[0, 2\*\*63\), got -1"),
        ({"seed": 1, "tokens": torch.zeros(4, dtype=torch.long)}, r"sampling \(a seed\) draws the tokens, so tokens must be None"),
        ({"offsets": torch.arange(4)}, r"offsets are only used when sampling"),
        ({"seed": 1, "offsets": torch.arange(4).int()}, r"offsets must be int64, got Int"),
        ({"seed": 1, "offsets": torch.arange(3)}, r"offsets must have shape hidden.shape\[:-1\] = \[4\], got shape \[3\]"),
        ({"seed": 1, "offsets": torch.tensor([0, -1, 0, 0])}, r"offsets must be >= 0, got a minimum of -1"),
    ]  # fmt: skip
    for kwargs, match in cases:
        with pytest.raises(RuntimeError, match=f"latentseek_ext: lm_head_policy_grad: {match}"):
            op(hidden, weight, **kwargs)
    with pytest.raises(RuntimeError, match="gumbel_uniform: offsets must be >= 0"):
        torch.ops.latentseek_ext.gumbel_uniform(1, torch.tensor([-1]), 4)


def test_the_reference_checks_the_options_itself():
    hidden, weight, _ = make(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="latentseek_ext: lm_head_logprob: entropy must be a bool, got int"):
        reference.lm_head_logprob(hidden, weight, entropy=1)
