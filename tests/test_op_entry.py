"""The op's entry, on the CPU kernel: the float-reward overload (a Python float reward is a schema float, never a
tensor made per call), its agreement with the tensor forms, its fake kernel, and the reward forms of the shared
entry code (csrc/include/latentseek/entry.h) that every device runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import latentseek_ext

pytestmark = pytest.mark.skipif(not latentseek_ext.extension_available("cpu"), reason="extension not built")

OPS = torch.ops.latentseek_ext


class _RecordOps(TorchDispatchMode):
    """Records the operators dispatched at the top level (the kernel's own ATen calls run below the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs(n: int = 6, h: int = 24, v: int = 500, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(n + h + v)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    return hidden, weight, torch.randint(0, v, (n,), generator=g), (torch.randn(v, generator=g) * 0.1).to(dtype)


def test_float_reward_calls_the_float_overload_and_nothing_else():
    hidden, weight, tokens, bias = _inputs()
    with _RecordOps() as rec:
        latentseek_ext.lm_head_policy_grad(hidden, weight, 0.25, tokens, bias, impl="ext")
    assert rec.ops == ["latentseek_ext.lm_head_policy_grad.float_reward"]
    with _RecordOps() as rec:
        latentseek_ext.lm_head_policy_grad(hidden, weight, None, tokens, bias, impl="ext")
    assert rec.ops == ["latentseek_ext.lm_head_policy_grad.default"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_reward_forms_agree_bitwise(dtype):
    # A float, a 0-d tensor, a full per-row tensor and None * scale give the same bits: the entry code folds them
    # into the same per-row factor.
    hidden, weight, tokens, bias = _inputs(dtype=dtype)
    acc = latentseek_ext.acc_dtype(dtype)
    n = hidden.shape[0]
    by_float = OPS.lm_head_policy_grad.float_reward(hidden, weight, -1.5, tokens, bias)
    by_scalar = OPS.lm_head_policy_grad.default(hidden, weight, torch.tensor(-1.5, dtype=acc), tokens, bias)
    by_rows = OPS.lm_head_policy_grad.default(hidden, weight, torch.full((n,), -1.5, dtype=acc), tokens, bias)
    for a, b, c in zip(by_float, by_scalar, by_rows, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    # reward 1 (None) and the float 1.0 as well.
    for a, b in zip(
        OPS.lm_head_policy_grad.default(hidden, weight, None, None, bias),
        OPS.lm_head_policy_grad.float_reward(hidden, weight, 1.0, None, bias),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_logprob_gradient_is_the_policy_gradient_with_reward_minus_one():
    hidden, weight, tokens, bias = _inputs()
    logp, x, dlogp = OPS.lm_head_logprob.default(hidden, weight, tokens, bias, True)
    x2, logp2, grad = OPS.lm_head_policy_grad.float_reward(hidden, weight, -1.0, tokens, bias)
    assert torch.equal(x, x2) and torch.equal(logp, logp2) and torch.equal(dlogp, grad)


def test_float_overload_errors_and_leading_dims():
    hidden, weight, tokens, _ = _inputs()
    with pytest.raises(RuntimeError, match=r"tokens must lie in \[0, V\) = \[0, 500\), got values in \[0, 500\]"):
        OPS.lm_head_policy_grad.float_reward(hidden, weight, 0.5, torch.tensor([0, 1, 2, 3, 4, 500]), None)
    x, logp, grad = OPS.lm_head_policy_grad.float_reward(hidden.reshape(2, 3, 24), weight, 0.5, None, None)
    assert x.shape == (2, 3) and logp.shape == (2, 3) and grad.shape == (2, 3, 24)
    assert OPS.lm_head_policy_grad.float_reward(hidden[:0], weight, 0.5, None, None)[2].shape == (0, 24)


def test_opcheck_float_overload():
    hidden, weight, tokens, bias = _inputs()
    for args in (
        (hidden, weight, 0.5, None, None),
        (hidden.reshape(3, 2, 24), weight, -2.0, tokens.reshape(3, 2), bias),
    ):
        torch.library.opcheck(OPS.lm_head_policy_grad.float_reward, args)


def test_compile_with_a_float_reward():
    hidden, weight, tokens, bias = _inputs()

    def step(h, w, b):
        return latentseek_ext.lm_head_policy_grad(h, w, 0.75, None, b)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for a, b in zip(compiled(hidden, weight, bias), step(hidden, weight, bias), strict=True):
        assert torch.equal(a, b)
