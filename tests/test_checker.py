"""The checker must fail: deliberately wrong implementations of the op are rejected by tests/checking.py."""

from __future__ import annotations

import pytest
import torch

from checking import check_policy_grad
from latentseek_ext import reference


def _inputs(dtype=torch.float32):
    torch.manual_seed(1)
    hidden = torch.randn(6, 16, dtype=torch.float64).to(dtype)
    weight = (torch.randn(700, 16, dtype=torch.float64) * 0.5).to(dtype)
    bias = torch.randn(700, dtype=torch.float64).to(dtype)
    return hidden, weight, torch.randn(6), None, bias


def wrong_sign(h, w, r, t, b):
    tokens, logp, grad = reference.lm_head_policy_grad(h, w, r, t, b)
    return tokens, logp, -grad


def forgets_bias(h, w, r, t, b):
    return reference.lm_head_policy_grad(h, w, r, t, None)


def last_index_on_ties(h, w, r, t, b):
    tokens, logp, grad = reference.lm_head_policy_grad(h, w, r, t, b)
    return (tokens + 1) % w.shape[0], logp, grad


def online_softmax_without_rescale(h, w, r, t, b, tile=128):
    """A tiled one-pass implementation that forgets to rescale the running sum when the max moves."""
    z, wf, bf = h.double(), w.double(), b.double()
    m = torch.full((z.shape[0],), -torch.inf, dtype=torch.float64)
    s = torch.zeros_like(m)
    acc = torch.zeros_like(z)
    for v0 in range(0, wf.shape[0], tile):
        logits = z @ wf[v0 : v0 + tile].T + bf[v0 : v0 + tile]
        m = torch.maximum(m, logits.max(-1).values)  # bug: s and acc are not multiplied by exp(m_old - m_new)
        p = torch.exp(logits - m[:, None])
        s += p.sum(-1)
        acc += p @ wf[v0 : v0 + tile]
    full = z @ wf.T + bf
    x = full.argmax(-1)
    logp = full.gather(1, x[:, None])[:, 0] - (m + s.log())
    grad = -r.double()[:, None] * (wf[x] - acc / s[:, None])
    return x, logp.float(), grad.float()


def low_precision_accumulator(h, w, r, t, b):
    """Rounds the softmax-weighted sum of W to bf16: the precision loss the fp32 accumulator exists to avoid."""
    tokens, logp, grad = reference.lm_head_policy_grad(h, w, r, t, b)
    return tokens, logp, grad.bfloat16().float()


@pytest.mark.parametrize(
    "wrong", [wrong_sign, forgets_bias, last_index_on_ties, online_softmax_without_rescale, low_precision_accumulator]
)
def test_checker_rejects_wrong_implementations(wrong):
    with pytest.raises(AssertionError):
        check_policy_grad(wrong, *_inputs())


def test_checker_accepts_the_reference():
    check_policy_grad(reference.lm_head_policy_grad, *_inputs())
    check_policy_grad(reference.lm_head_policy_grad, *_inputs(torch.bfloat16))
