r"""The one correctness checker of the fused LM-head op, used by the CPU, CUDA and C++ tests.

A candidate's outputs ``(tokens, logp, grad)`` are compared element-wise with a float64 truth (the formula of
:mod:`latentseek_ext.reference` run on float64 copies of the same, already rounded, inputs). The allowed error of
every element is a bound derived from the kernels' precision argument (README "Precision", the CUDA kernel's header
comment), so it scales with the dtype and with the element, instead of "2 x the error of a reference" (whose fp32
upcast made the bf16/fp16 bound collapse to an atol).

The rules
---------
* Shapes and dtypes: tokens int64 ``[*]``; logp ``[*]`` and grad ``[*, H]`` in the accumulation dtype (float32,
  float64 for float64 inputs). Given tokens come back unchanged.
* NaN pattern: an output element is NaN exactly where the truth is; an infinite truth (logp of a masked token) must be
  matched exactly.
* Tokens, judged by value. A row with a NaN logit must return the first NaN (``torch.argmax``). Otherwise the chosen
  token's logit may lie below the row's maximum only by the two logits' error bounds ``d_t + d_max`` (below): a
  different token is fine only where the logits tie within the kernel's rounding. An exact tie must go to the
  lowest index where every summation order computes both logits exactly (z, the two rows of W and b on a binary grid
  fine enough for the accumulation type, checked from the inputs). Elsewhere a kernel's rounding may separate two
  equal logits (a BLAS rounds a column differently by its position in the tile), so the tie rule is not testable.
* logp and grad are then compared with the truth *at the chosen tokens*: ``|got - truth| <= bound`` element-wise.

The bound
---------
Notation for one row: logits ``l`` (float64), ``m = max l``, ``p = softmax(l)``, ``mu = sum_v p_v W_v``, reward ``r``,
chosen token ``x``, argmax ``x*``, ``H`` and ``V`` the sizes. Inputs are rounded to the dtype before the truth sees
them, so only the arithmetic is judged. The kernels' arithmetic (csrc/cpu, csrc/cuda):

1. logits ``S = Z W^T + b`` accumulated in the accumulation type (fp32: products of bf16/fp16 values are exact there);
2. ``P = exp(S - m_run)`` in that type against the running max, with the running max entering as exp(0) = 1;
3. ``s = sum P`` in that type; ``O = sum P W`` in that type, where a kernel on 16-bit matrix units (the CUDA
   tensor-core path, bf16/fp16) rounds P to bf16/fp16 *only as the operand* of ``P W`` (fp16 P stored times 2^14,
   so that no probability is subnormal);
4. ``logp = l_x - (m + log s)``, ``grad = -r (W_x - O / s)``.

With ``eps`` the machine epsilon of the accumulation type (twice its unit roundoff u, which covers adders that
truncate, such as tensor cores') plus float64's (the truth's own rounding), and for a sum of n terms the relative
bound ``gamma(n) = LAMBDA sqrt(n) eps``, ``LAMBDA = 2``: the probabilistic bound of Higham & Mary ("A new approach to
probabilistic rounding error analysis", SISC 2019) with lambda = 4 in units of u, which is also the worst case
``n u`` up to n = 16:

* logit error of entry v: ``d_v = gamma(H + 1) (sum_h |z_h W_vh| + |b_v|) + eps (|l_v - m| + 2)``
  (the dot product and bias, the shift by the max and exp's few-ulp error);
* ``logp``: ``d_x + dbar + gamma(2V) + eps (|lse| + |lse - m| + |logp| + 1)`` with ``dbar = sum_v p_v d_v``: the
  logit errors (logsumexp is 1-Lipschitz: its error is the p-weighted mean ``dbar``), the sum s of V terms and its
  rescales, the log and the two subtractions;
* ``grad[h] = |r| (A_h + B_h + C_h + D_h)`` (+ half an ulp of |truth| when grad comes back in a narrower dtype):

  - ``A_h = sum_v p_v (d_v + dbar) |W_vh - mu_h|``: logit errors ``e_v`` (``|e_v| <= d_v``) move ``p_v`` by
    ``p_v (e_v - ebar)``, ``ebar = sum_u p_u e_u``, and since those changes sum to 0 they move ``mu`` by
    ``sum_v p_v (e_v - ebar) (W_v - mu)``: this vanishes as p becomes one-hot, like the gradient does. Computed with
    ``|W_vh - mu_h| <= |W_vh| + |mu_h|`` for every v but x*.
  - ``B_h = u_P sum_{v != x*} p_v |W_vh| + eta sum_v |W_vh|``: P rounded to 16 bits (unit roundoff u_P = 2^-8 bf16,
    2^-11 fp16, 0 where no kernel rounds P) except the argmax, which enters as exactly 1; where the top two logits
    are within their error bounds either may be the exact one and no entry is excluded. eta: the absolute error of
    tiny P (fp16: half the subnormal spacing 2^-24 over the 2^14 scale = 2^-39; else underflow of exp).
  - ``C_h = 2 gamma(2V) sum_v p_v |W_vh|``: accumulating O and s over the vocabulary (V terms, and at most one
    rescale per term), each a relative error of O / s.
  - ``D_h = 2 eps (|W_xh| + |mu_h|)``: ``O / s``, the subtraction and the product with r.

There is no atol: a row with reward 0 must return a gradient of exactly 0.

What this catches (tests/test_checker.py, on :func:`revealing_inputs`): an implementation 1 % off (the bound is about
0.4 % of sum p|W| in bf16, far less elsewhere); an accumulator rounded to 16 bits and a P whose argmax entry is
rounded (both cost ~u_16 |W_x|, which the bound leaves out: rows with p(x*) -> 1 expose them); ties broken to the
highest index; a missing bias or reward. It accepts the CPU kernel and a model of the CUDA kernel's arithmetic, each
well inside the bound.

The C++ test (csrc/test/test_lm_head.cpp) writes its inputs and outputs to a file that ``python tests/checking.py
FILE`` judges with these same rules (ctest runs both).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from latentseek_ext import reference

#: The dtypes every accuracy test covers; float64 (the gradcheck dtype) is added where a test says so.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = [*DTYPES, torch.float64]

#: Probabilistic rounding-error constant of gamma(n) = LAMBDA sqrt(n) eps (see the module docstring).
LAMBDA = 2.0
#: The 16-bit format in which a kernel may round P as the operand of P W, per input dtype (absent: not at all).
P_OPERAND = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
#: The power of two by which a kernel scales P before rounding it to the operand format (keeps fp16 P normal).
P_SCALE = {torch.bfloat16: 1.0, torch.float16: 2.0**14}
#: Rows per chunk of the float64 truth: chunk * V stays below this many elements per [rows, V] buffer.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Precision:
    """The rounding facts of one input dtype that the bound is made of."""

    eps: float  # machine epsilon of the accumulation type + float64's (the truth's own rounding)
    u_p: float  # unit roundoff of P as the operand of P W (0: no kernel rounds P)
    eta: float  # absolute error of a tiny P (subnormal or underflowed)
    bits: int  # significand bits of the accumulation type

    @classmethod
    def of(cls, dtype: torch.dtype) -> Precision:
        acc = reference.acc_dtype(dtype)
        eps = torch.finfo(acc).eps + torch.finfo(torch.float64).eps
        # exp underflows (the CPU kernel flushes below e^-87 ~ 2^-125.5) at the bottom of the accumulation type.
        eta = torch.finfo(acc).smallest_normal * 16
        u_p = 0.0
        if dtype in P_OPERAND:
            fmt = torch.finfo(P_OPERAND[dtype])
            u_p = fmt.eps / 2  # round to nearest
            # Below the format's normal range (after the scale) P has half the subnormal spacing as absolute error.
            eta = max(eta, fmt.smallest_normal * fmt.eps / 2 / P_SCALE[dtype])
        return cls(eps=eps, u_p=u_p, eta=eta, bits=1 - round(math.log2(torch.finfo(acc).eps)))

    def gamma(self, n: int) -> float:
        """Relative error bound of a sum of n terms accumulated in the accumulation type."""
        return LAMBDA * math.sqrt(max(n, 1)) * self.eps


@dataclass
class Verdict:
    """What the checker found: ``problems`` is empty when the outputs are correct. ``ratios`` holds the worst
    error / bound per output ("tokens": logit gap / tie tolerance), for the margins the tests assert."""

    problems: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=lambda: {"tokens": 0.0, "logp": 0.0, "grad": 0.0})

    @property
    def ok(self) -> bool:
        return not self.problems

    def worst(self) -> float:
        return max(self.ratios.values())

    def __str__(self) -> str:
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in self.ratios.items())
        return ("; ".join(self.problems) if self.problems else "ok") + f" (worst error / bound: {ratios})"


def _reward_rows(reward: reference.Reward, n: int, device: torch.device) -> torch.Tensor:
    """The reward as a float64 ``[n]`` tensor (None = 1, a float or 0-d tensor for every row)."""
    if reward is None:
        return torch.ones(n, dtype=torch.float64, device=device)
    if not isinstance(reward, torch.Tensor):
        return torch.full((n,), float(reward), dtype=torch.float64, device=device)
    r = reward.to(device=device, dtype=torch.float64)
    return r.expand(n) if r.dim() == 0 else r.reshape(-1)


def _lsb_exponent(x: torch.Tensor) -> torch.Tensor:
    """The exponent of the lowest set bit of each float64 element: x is a multiple of 2**result (+inf for 0, -inf
    for NaN and infinities)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    digits = (mantissa.abs() * 2.0**53).to(torch.int64)  # exact: float64 has 53 significand bits
    lowest = (digits & -digits).to(torch.float64)  # a power of two
    lsb = exponent.to(torch.float64) - 53 + torch.log2(lowest)
    lsb = torch.where(x == 0, math.inf, lsb)
    return torch.where(torch.isfinite(x), lsb, -math.inf)


def _exact_logits(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Whether ``z . w_k + b_k`` comes out exact from every summation order in a type of ``bits`` significand bits:
    every product and partial sum is a multiple of the terms' common grid 2**g and at most sum |terms| in size, so
    all are representable when sum |terms| < 2**(bits + g)."""
    grid = _lsb_exponent(z).min() + _lsb_exponent(w).min(-1).values
    size = (z.abs() * w.abs()).sum(-1)
    if b is not None:
        grid = torch.minimum(grid, _lsb_exponent(b))
        size = size + b.abs()
    return torch.log2(size) < bits + grid


def _chunks(n: int, v: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(v, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _compare(name: str, got: torch.Tensor, truth: torch.Tensor, bound: torch.Tensor, verdict: Verdict) -> None:
    """Element-wise ``|got - truth| <= bound`` with the NaN pattern and infinities matched exactly."""
    got = got.to(torch.float64)
    nan_got, nan_truth = torch.isnan(got), torch.isnan(truth)
    if not torch.equal(nan_got, nan_truth):
        verdict.problems.append(
            f"{name}: NaN pattern differs ({int((nan_got & ~nan_truth).sum())} NaN where the truth is a number, "
            f"{int((nan_truth & ~nan_got).sum())} numbers where the truth is NaN)"
        )
    same = (got == truth) | (nan_got & nan_truth)
    err = torch.where(same, torch.zeros_like(got), (got - truth).abs()).nan_to_num(nan=math.inf)
    ratio = torch.where(same, torch.zeros_like(err), err / bound.nan_to_num(nan=0.0))
    ratio = ratio.nan_to_num(nan=math.inf, posinf=math.inf)  # 0 / 0 is impossible (same), inf / inf fails
    if ratio.numel() == 0:
        return
    worst = int(ratio.reshape(-1).argmax())
    verdict.ratios[name] = max(verdict.ratios[name], float(ratio.reshape(-1)[worst]))
    bad = ratio > 1
    if bool(bad.any()):
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
        verdict.problems.append(
            f"{name}: {int(bad.sum())} of {ratio.numel()} elements exceed the bound; worst at {list(at)}: "
            f"|{float(got.reshape(-1)[worst]):.6g} - {float(truth.reshape(-1)[worst]):.6g}| = "
            f"{float(err.reshape(-1)[worst]):.3g} > bound {float(bound.reshape(-1)[worst]):.3g}"
        )


@dataclass
class _Options:
    """The options of one call as the checker needs them (see :func:`judge`)."""

    temperature: float = 1.0
    noise: Callable[[int, int], torch.Tensor] | None = None  # rows [i, j) -> float64 Gumbel noise [j - i, V]
    entropy: torch.Tensor | None = None  # the candidate's entropy, flat [N]
    topk_logp: torch.Tensor | None = None  # the candidate's [N, k]
    topk_tokens: torch.Tensor | None = None


def _judge_rows(
    z: torch.Tensor,
    w: torch.Tensor,
    wabs: torch.Tensor,
    b: torch.Tensor | None,
    r: torch.Tensor,
    chosen: torch.Tensor,
    prec: Precision,
    given: bool,
    row0: int,
    verdict: Verdict,
    opt: _Options | None = None,
) -> tuple[torch.Tensor, ...]:
    """Token rules for a chunk of rows (unless the tokens were given); returns the float64 truth and the bound of
    logp and grad at the chosen tokens, then (truth, bound) of the entropy and of topk_logp when they are judged."""
    opt = opt or _Options()
    n, H = z.shape
    V = w.shape[0]
    T = opt.temperature
    logits = reference._logits(z, w, b)  # [n, V] float64
    if T != 1:
        logits = logits / T  # l' = l / T: the softmax, logp, entropy and top-k are of l'; the greedy token is the same
    m = logits.max(-1).values
    top = logits.argmax(-1)  # first maximum (first NaN where there is one), torch.argmax's rule
    finite_m = torch.isfinite(m)
    finite_l = torch.isfinite(logits) & finite_m[:, None]

    # Logit error bounds d_v (0 where the logit is -inf or the row is not finite: those must match exactly). With a
    # temperature the dot product's error shrinks by T, and the scaling by 1 / T adds two roundings of l'.
    magnitude = z.abs() @ wabs.T
    if b is not None:
        magnitude = magnitude + b.abs()
    d = prec.gamma(H + 1) * magnitude / T + prec.eps * ((logits - m[:, None]).abs() + 2)
    if T != 1:
        d = d + 2 * prec.eps * logits.abs()
    d = torch.where(finite_l, d, torch.zeros_like(d))

    rows = torch.arange(n, device=z.device)
    if opt.noise is not None and not given:
        _judge_sampled_rows(logits, d, top, chosen, opt.noise(row0, row0 + n), row0, verdict)
        given = True  # the plain token rules below do not apply to a sample

    # Tokens, by value.
    picked = logits[rows, chosen]
    has_nan = torch.isnan(logits).any(-1)
    wrong_nan = has_nan & (chosen != top)
    earlier = (logits == picked[:, None]) & (torch.arange(V, device=z.device) < chosen[:, None])
    earlier_tie = earlier.any(-1)
    for i in earlier_tie.nonzero()[:, 0].tolist():  # few rows: is the tie one that every kernel sees?
        pair = torch.stack([earlier[i].nonzero()[0, 0], chosen[i]])
        earlier_tie[i] = bool(_exact_logits(z[i], w[pair], None if b is None else b[pair], prec.bits).all())
    exact = picked == m
    tol = torch.where(finite_m, d[rows, chosen] + d[rows, top], torch.zeros_like(m))
    gap = torch.where(exact, torch.zeros_like(m), m - picked).nan_to_num(nan=0.0)
    below = ~has_nan & (gap > tol)
    tie_ratio = torch.where(gap > 0, gap / tol, torch.zeros_like(gap)).nan_to_num(nan=math.inf, posinf=math.inf)
    tie_ratio = torch.where(has_nan, torch.zeros_like(gap), tie_ratio)
    if n and not given:
        verdict.ratios["tokens"] = max(verdict.ratios["tokens"], float(tie_ratio.max()))
    for mask, what in (
        ()
        if given
        else (
            (wrong_nan, "is not the first NaN logit of its row (torch.argmax's rule)"),
            (below & ~wrong_nan, "has a logit below the row's maximum by more than the two logits' error bounds"),
            (earlier_tie & ~has_nan & ~below, "ties exactly with a lower index (ties go to the lowest index)"),
        )
    ):
        if bool(mask.any()):
            i = int(mask.nonzero()[0, 0])
            verdict.problems.append(
                f"tokens: {int(mask.sum())} rows' token {what}; first: row {row0 + i}, token {int(chosen[i])} "
                f"(logit {float(picked[i]):.9g}), argmax {int(top[i])} (logit {float(m[i]):.9g}), "
                f"tolerance {float(tol[i]):.3g}"
            )

    # The truth at the chosen tokens: latentseek_ext.reference's formula in float64.
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    mu = p @ w
    logp_t = picked - lse
    grad_t = -r[:, None] * (w[chosen] - mu) / T
    p = torch.where(finite_m[:, None], p, torch.zeros_like(p))  # rows without a finite max: NaN truth, no bound
    mu = torch.where(finite_m[:, None], mu, torch.zeros_like(mu))
    dbar = (p * d).sum(-1)

    logp_b = d[rows, chosen] + dbar + prec.gamma(2 * V) + prec.eps * (lse.abs() + (lse - m).abs() + logp_t.abs() + 1)

    # The argmax enters P as exactly 1 unless the top two logits are within their error bounds.
    if V > 1:
        top2 = logits.topk(2, -1)
        second = top2.indices[:, 1]
        clear = (top2.values[:, 0] - top2.values[:, 1]) > d[rows, top] + d[rows, second]
    else:
        clear = torch.ones(n, dtype=torch.bool, device=z.device)
    q = p * (d + dbar[:, None])
    q_top = q[rows, top]
    q_rest = q.clone()
    q_rest[rows, top] = 0.0
    p_rounded = p.clone()
    p_rounded[rows[clear], top[clear]] = 0.0
    sums = torch.cat([q_rest, p_rounded, p]) @ wabs  # [3n, H]
    s_q, s_rounded, s_p = sums[:n], sums[n : 2 * n], sums[2 * n :]
    a_term = q_top[:, None] * (w[top] - mu).abs() + s_q + mu.abs() * q_rest.sum(-1, keepdim=True)
    b_term = prec.u_p * s_rounded + prec.eta * wabs.sum(0)
    c_term = 2 * prec.gamma(2 * V) * s_p
    d_term = 2 * prec.eps * (w[chosen].abs() + mu.abs())
    grad_b = r.abs()[:, None] * (a_term + b_term + c_term + d_term) / T
    if T != 1:
        grad_b = grad_b + 2 * prec.eps * grad_t.abs()  # the factor 1 / T
    out = [logp_t, logp_b, grad_t, grad_b]
    log_s = lse - m
    if opt.entropy is not None:
        # H = -sum p log p; a logit error e_v moves it by -sum_v p_v (l_v - E l) (e_v - ebar) (first order), and the
        # kernels' s2 = sum P (l - m) and s carry gamma(2V) each: log s - s2 / s.
        logp_all = logits - lse[:, None]
        ent_t = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
        ent_t = torch.where(finite_m & ~_non_finite(logits), ent_t, torch.full_like(ent_t, math.nan))
        mean_l = (p * torch.where(finite_l, logits, torch.zeros_like(logits))).sum(-1, keepdim=True)
        spread = torch.where(finite_l, (logits - mean_l).abs(), torch.zeros_like(logits))
        from_max = (p * torch.where(finite_l, (logits - m[:, None]).abs(), torch.zeros_like(logits))).sum(-1)
        ent_b = (
            (p * spread * (d + dbar[:, None])).sum(-1)
            + prec.gamma(2 * V) * (1 + 3 * from_max)
            + prec.eps * (log_s.abs() + from_max + ent_t.abs() + 1)
        )
        out += [ent_t, ent_b]
    if opt.topk_tokens is not None:
        out += _judge_topk_rows(logits, d, dbar, lse, m, z, w, b, prec, opt, row0, verdict)
    return tuple(out)


def _non_finite(logits: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN or +inf logit."""
    return torch.isnan(logits).any(-1) | (logits == math.inf).any(-1)


#: Error of the kernels' float32 Gumbel noise g = -log(-log(u)) per unit of (1 + |g|): two logarithms of a few ulp.
NOISE_EPS = 4 * torch.finfo(torch.float32).eps


def _judge_sampled_rows(
    logits: torch.Tensor, d: torch.Tensor, top: torch.Tensor, chosen: torch.Tensor, g: torch.Tensor, row0: int,
    verdict: Verdict,
) -> None:  # fmt: skip
    """A sampled token, by value: its perturbed score l'_x + g_x may lie below the row's best perturbed score only by
    the two scores' error bounds (logit bound + the float32 noise's + the sum's rounding). A row with a NaN or +inf
    logit follows the plain rule (first NaN, else first maximum)."""
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    score = logits + g
    bad = _non_finite(logits)
    wrong_plain = bad & (chosen != top)
    best = score.argmax(-1)
    s_max = score[rows, best]
    s_x = score[rows, chosen]
    e = d + NOISE_EPS * (1 + g.abs()) + torch.finfo(torch.float32).eps * score.abs()
    tol = e[rows, chosen] + e[rows, best]
    gap = torch.where(s_x == s_max, torch.zeros_like(s_max), s_max - s_x).nan_to_num(nan=0.0)
    gap = torch.where(bad, torch.zeros_like(gap), gap)
    ratio = torch.where(gap > 0, gap / tol, torch.zeros_like(gap)).nan_to_num(nan=math.inf, posinf=math.inf)
    if n:
        verdict.ratios["sample"] = max(verdict.ratios.get("sample", 0.0), float(ratio.max()))
    for mask, what in (
        (wrong_plain, "has a NaN or +inf logit and is not the plain token (first NaN, else first maximum)"),
        (~bad & (gap > tol), "has a perturbed score l'/T + g below the row's best by more than the error bounds"),
    ):
        if bool(mask.any()):
            i = int(mask.nonzero()[0, 0])
            verdict.problems.append(
                f"sampled tokens: {int(mask.sum())} rows' token {what}; first: row {row0 + i}, token "
                f"{int(chosen[i])} (score {float(s_x[i]):.9g}), best {int(best[i])} (score {float(s_max[i]):.9g}), "
                f"tolerance {float(tol[i]):.3g}"
            )


def _judge_topk_rows(
    logits: torch.Tensor, d: torch.Tensor, dbar: torch.Tensor, lse: torch.Tensor, m: torch.Tensor, z: torch.Tensor,
    w: torch.Tensor, b: torch.Tensor | None, prec: Precision, opt: _Options, row0: int, verdict: Verdict,
) -> list[torch.Tensor]:  # fmt: skip
    """The top-k tokens by value (the j-th returned token's l' within the error bounds of the true j-th largest;
    distinct; exact ties, where every summation order sees them, lower index first) and topk_logp's truth and bound
    at the returned tokens. Rows with a NaN or +inf logit only need tokens in range (their values must be NaN)."""
    n, V = logits.shape
    k = opt.topk_tokens.shape[1]
    tok = opt.topk_tokens[row0 : row0 + n].to(logits.device)
    bad = _non_finite(logits) | ~torch.isfinite(m)
    if bool(((tok < 0) | (tok >= V)).any()):
        verdict.problems.append(
            f"topk_tokens: must lie in [0, {V}), got values in [{int(tok.min())}, {int(tok.max())}]"
        )
        tok = tok.clamp(0, V - 1)
    vals = logits.gather(1, tok)
    want = logits.topk(k, -1).values
    dmax = d.max(-1, keepdim=True).values
    tol = d.gather(1, tok) + dmax
    exact = vals == want
    gap = torch.where(exact, torch.zeros_like(vals), (vals - want).abs()).nan_to_num(nan=math.inf)
    gap = torch.where(bad[:, None], torch.zeros_like(gap), gap)
    ratio = torch.where(gap > 0, gap / tol, torch.zeros_like(gap)).nan_to_num(nan=math.inf, posinf=math.inf)
    if n:
        verdict.ratios["topk_tokens"] = max(verdict.ratios.get("topk_tokens", 0.0), float(ratio.max()))
    sorted_tok = tok.sort(-1).values
    repeated = ~bad & (sorted_tok[:, 1:] == sorted_tok[:, :-1]).any(-1) if k > 1 else torch.zeros_like(bad)
    problems = [
        (repeated, "repeat a token"),
        ((gap > tol).any(-1), "hold a token whose l' is off the true rank's value by more than the error bounds"),
    ]
    # Exact ties: a returned token after an equal one of higher index, or a lower-index equal one left out.
    tie_rows = torch.zeros_like(bad)
    for i in (~bad).nonzero()[:, 0].tolist():
        row_vals = vals[i]
        for j in range(k):
            equal = (logits[i] == row_vals[j]).nonzero()[:, 0]
            if equal.numel() < 2 or not torch.isfinite(row_vals[j]):
                continue
            lower = equal[equal < tok[i, j]]
            ahead = set(tok[i, :j].tolist())
            for u in lower.tolist():
                if u in ahead:
                    continue
                pair = torch.tensor([u, int(tok[i, j])], device=logits.device)
                if bool(_exact_logits(z[i], w[pair], None if b is None else b[pair], prec.bits).all()):
                    tie_rows[i] = True
    problems.append((tie_rows, "break an exact tie to the higher index (ties go to the lowest index)"))
    for mask, what in problems:
        if bool(mask.any()):
            i = int(mask.nonzero()[0, 0])
            verdict.problems.append(
                f"topk_tokens: {int(mask.sum())} rows {what}; first: row {row0 + i}, tokens {tok[i].tolist()[:8]}, "
                f"values {[round(float(x), 6) for x in vals[i][:8]]}, true values {[round(float(x), 6) for x in want[i][:8]]}"
            )
    topk_t = vals - lse[:, None]
    topk_t = torch.where(bad[:, None], torch.full_like(topk_t, math.nan), topk_t)
    topk_b = (
        d.gather(1, tok)
        + dbar[:, None]
        + prec.gamma(2 * V)
        + prec.eps * (lse.abs() + (lse - m).abs()).nan_to_num(nan=0.0)[:, None]
        + prec.eps * (topk_t.abs() + 1)
    )
    return [topk_t, topk_b]


def judge(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: reference.Reward,
    tokens: torch.Tensor | None,
    bias: torch.Tensor | None,
    outputs: Sequence[torch.Tensor | None],
    *,
    grad_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    seed: int | None = None,
    offsets: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Verdict:
    """Judges ``outputs = (tokens, logp, grad)`` of the op on these inputs; ``grad`` may be None (lm_head_logprob's
    forward). ``grad_dtype``: the dtype grad must have, if not the accumulation dtype (autograd returns hidden's);
    a narrower one adds half its ulp of |truth| to the bound.

    The options: ``temperature`` T of the call; ``seed`` (and ``offsets``) when the tokens were sampled (judged by
    their perturbed scores with the noise of :func:`latentseek_ext.reference.gumbel_noise`); ``entropy`` and
    ``topk = (topk_logp, topk_tokens)``: the candidate's extra outputs, judged when given."""
    out_tokens, logp, grad = outputs
    verdict = Verdict()
    if entropy is not None:
        verdict.ratios["entropy"] = 0.0
    if topk is not None:
        verdict.ratios["topk_logp"] = 0.0
    dtype = hidden.dtype
    acc = reference.acc_dtype(dtype)
    lead = tuple(hidden.shape[:-1])
    want_grad_dtype = grad_dtype or acc
    for name, t, want_dtype, want_shape in (
        ("tokens", out_tokens, torch.int64, lead),
        ("logp", logp, acc, lead),
        ("grad", grad, want_grad_dtype, tuple(hidden.shape)),
    ):
        if t is not None and (t.dtype != want_dtype or tuple(t.shape) != want_shape or t.device != hidden.device):
            verdict.problems.append(
                f"{name} must be {want_dtype} of shape {list(want_shape)} on {hidden.device}, "
                f"got {t.dtype} of shape {list(t.shape)} on {t.device}"
            )
    k = 0 if topk is None else topk[1].shape[-1]
    for name, t, want_dtype, want_shape in (
        ("entropy", entropy, acc, lead),
        ("topk_logp", None if topk is None else topk[0], acc, (*lead, k)),
        ("topk_tokens", None if topk is None else topk[1], torch.int64, (*lead, k)),
    ):
        if t is not None and (t.dtype != want_dtype or tuple(t.shape) != want_shape or t.device != hidden.device):
            verdict.problems.append(
                f"{name} must be {want_dtype} of shape {list(want_shape)} on {hidden.device}, "
                f"got {t.dtype} of shape {list(t.shape)} on {t.device}"
            )
    if verdict.problems:
        return verdict
    device = hidden.device
    H = hidden.shape[-1]
    z = hidden.reshape(-1, H).to(torch.float64)
    w = weight.to(device=device, dtype=torch.float64)
    b = None if bias is None else bias.to(device=device, dtype=torch.float64)
    chosen = out_tokens.reshape(-1).to(device)
    V = weight.shape[0]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= V):
        verdict.problems.append(
            f"tokens must lie in [0, {V}), got values in [{int(chosen.min())}, {int(chosen.max())}]"
        )
        return verdict
    if tokens is not None and not torch.equal(chosen, tokens.reshape(-1).to(device)):
        verdict.problems.append("tokens: the given tokens must come back unchanged")
        return verdict
    r = _reward_rows(reward, z.shape[0], device)
    prec = Precision.of(dtype)
    wabs = w.abs()
    noise = None
    if seed is not None:
        off = reference.default_offsets(hidden) if offsets is None else offsets
        off = off.reshape(-1).to(device)
        noise = lambda i, j: reference.gumbel_noise(seed, off[i:j], V)  # noqa: E731
    opt = _Options(
        temperature=float(temperature),
        noise=noise,
        entropy=None if entropy is None else entropy.reshape(-1),
        topk_logp=None if topk is None else topk[0].reshape(-1, k),
        topk_tokens=None if topk is None else topk[1].reshape(-1, k),
    )
    parts: list[list[torch.Tensor]] = []
    for rows in _chunks(z.shape[0], w.shape[0]):
        out = _judge_rows(
            z[rows], w, wabs, b, r[rows], chosen[rows], prec, tokens is not None, rows.start, verdict, opt
        )
        parts.append(list(out))
    if z.shape[0] == 0:
        return verdict
    logp_t, logp_b, grad_t, grad_b, *extra = (torch.cat(list(col)) for col in zip(*parts, strict=True))
    if entropy is not None:
        ent_t, ent_b, *extra = extra
        _compare("entropy", opt.entropy.to(device), ent_t, ent_b, verdict)
    if topk is not None:
        topk_t, topk_b = extra
        _compare("topk_logp", opt.topk_logp.to(device), topk_t, topk_b, verdict)
    _compare("logp", logp.reshape(-1).to(device), logp_t, logp_b, verdict)
    if grad is not None:
        if torch.finfo(want_grad_dtype).eps > torch.finfo(acc).eps:
            grad_b = grad_b + torch.finfo(want_grad_dtype).eps / 2 * grad_t.abs()
        _compare("grad", grad.reshape(-1, H).to(device), grad_t, grad_b, verdict)
    return verdict


def check_outputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: reference.Reward,
    tokens: torch.Tensor | None,
    bias: torch.Tensor | None,
    outputs: Sequence[torch.Tensor | None],
    *,
    grad_dtype: torch.dtype | None = None,
    **options,
) -> Verdict:
    """:func:`judge` (options as its keywords), raising AssertionError with what was wrong."""
    verdict = judge(hidden, weight, reward, tokens, bias, outputs, grad_dtype=grad_dtype, **options)
    if not verdict.ok:
        raise AssertionError(
            f"{hidden.dtype} N={hidden.shape[:-1].numel()} H={hidden.shape[-1]} V={weight.shape[0]}: {verdict}"
        )
    return verdict


def check_policy_grad(
    impl: Callable,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: reference.Reward = None,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``impl(hidden, weight, reward, tokens, bias) -> (tokens, logp, grad)``, asserts the outputs are correct
    by the rules of this module and returns them."""
    outputs = impl(hidden, weight, reward, tokens, bias)
    check_outputs(hidden, weight, reward, tokens, bias, outputs)
    return outputs


def check_options_call(
    impl: Callable,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: reference.Reward = None,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    **options,
) -> tuple[Verdict, tuple[torch.Tensor, ...]]:
    """Runs ``impl(hidden, weight, reward, tokens, bias, **options)`` (the public signature with the keyword options
    temperature, sample, seed, offsets, entropy, topk), judges every output and returns the verdict and outputs."""
    outputs = impl(hidden, weight, reward, tokens, bias, **options)
    x, logp, grad, *extra = outputs
    ent = extra.pop(0) if options.get("entropy") else None
    top = tuple(extra) if options.get("topk") else None
    verdict = judge(
        hidden, weight, reward, tokens, bias, (x, logp, grad), temperature=options.get("temperature", 1.0),
        seed=options.get("seed") if options.get("sample") else None, offsets=options.get("offsets"), entropy=ent,
        topk=top,
    )  # fmt: skip
    return verdict, outputs


def revealing_inputs(
    dtype: torch.dtype, device: torch.device | str = "cpu", *, n: int = 12, h: int = 896, v: int = 4099
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, weight, reward, bias)`` of a realistic size on which every fault of tests/test_checker.py shows.

    Logits spread over a few units (z ~ N(0, 1), W ~ N(0, 4 / H), b ~ N(0, 1/4)), so the gradient's elements are
    small (~1e-2) and a 1 % error is not hidden by an atol. Rows 0-5 are peaked (one row of W is z scaled to a logit
    of 13..18: p(x) ~ 0.9-0.999, where a rounded argmax entry or a 16-bit accumulator shows); rows 6-7 have an
    exact tie that every summation order sees (z on a grid of 1/8, the tied rows of W = z / 64 at two indices in
    different vocabulary tiles, their bias 0: a logit ~14 computed exactly in any dtype); the rest are plain.
    Per-row rewards of both signs, one zero, none equal to 1 (n > 12 repeats them).
    """
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (2 / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    sharp = (13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 14.0, 14.0)
    picks = torch.randperm(v - 1100, generator=g)[: len(sharp)].tolist()
    for row, (k, logit) in enumerate(zip(picks, sharp, strict=True)):
        b[k] = 0.0
        if row < 6:
            w[k] = z[row] * (logit / z[row].square().sum())
        else:  # the exact tie, 1031 + row rows later (another tile of the CPU and CUDA kernels)
            z[row] = torch.round(z[row] * 8) / 8
            w[k] = w[k + 1031 + row] = z[row] / 64
            b[k + 1031 + row] = 0.0
    reward = torch.tensor([1.5, -0.5, 2.0, -1.25, 0.75, -2.0, 1.75, -0.8, 0.3, 0.0, -1.6, 2.5]).repeat(n // 12 + 1)
    acc = reference.acc_dtype(dtype)
    return z.to(dtype).to(device), w.to(dtype).to(device), reward[:n].to(acc).to(device), b.to(dtype).to(device)


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/checking.py CASES_FILE``: judges the cases that csrc/test/test_lm_head.cpp wrote (a list of
    dicts: name, hidden, weight, bias, reward, tokens, out_tokens, logp, grad). Exit status 1 if any case fails."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python tests/checking.py CASES_FILE (written by csrc/test/test_lm_head.cpp)", file=sys.stderr)
        return 2
    # torch::pickle_save tags the types of generic containers; that restorer is the one global the file needs.
    from torch.jit._pickle import restore_type_tag

    with torch.serialization.safe_globals([restore_type_tag]):
        records = torch.load(args[0], weights_only=True)
    if not records:
        print(f"{args[0]}: no cases", file=sys.stderr)
        return 1
    failed = 0
    for rec in records:
        outputs = (rec["out_tokens"], rec["logp"], rec["grad"])
        verdict = judge(rec["hidden"], rec["weight"], rec["reward"], rec["tokens"], rec["bias"], outputs)
        print(f"{'ok  ' if verdict.ok else 'FAIL'} {rec['name']}: {verdict}")
        failed += not verdict.ok
    print(f"{len(records) - failed} of {len(records)} cases within the bound")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
