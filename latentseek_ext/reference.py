"""Pure-torch reference of the fused LM-head ops: the definition of correct.

Same signatures and outputs as :mod:`latentseek_ext.ops` (the math is in that module's docstring). These functions
materialise the full ``[N, V]`` logits (and softmax) in the accumulation dtype, float32 (float64 for float64
inputs), so they are exact up to that dtype's rounding and cost O(N*V) memory. They are the ground truth of the
tests (run in float64), the fallback where the compiled extension is missing, and the baseline of the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Reward = float | torch.Tensor | None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and output dtype for an input dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(op: str, msg: str) -> None:
    raise RuntimeError(f"latentseek_ext: {op}: {msg}")


def check_inputs(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: torch.Tensor | None,
    tokens: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """The input rules of the ops (the same ones the C++ kernels enforce), raising RuntimeError on violation."""
    if hidden.dim() < 1:
        _fail(op, "hidden must have shape [*, H] (at least 1 dimension), got a 0-d tensor")
    if weight.dim() != 2:
        _fail(op, f"weight must have shape [V, H] (2 dimensions), got shape {list(weight.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        _fail(op, f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        _fail(op, f"weight must have hidden's dtype ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        _fail(op, f"weight must be on hidden's device ({hidden.device}), got {weight.device}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        _fail(op, f"weight must have shape [V, H] with H = hidden.shape[-1] = {H}, got shape {list(weight.shape)}")
    if V == 0:
        _fail(op, f"weight must have at least one row (V > 0), got shape {list(weight.shape)}")
    lead = list(hidden.shape[:-1])
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != V:
            _fail(op, f"bias must have shape [V] = [{V}], got shape {list(bias.shape)}")
        if bias.dtype != hidden.dtype:
            _fail(op, f"bias must have hidden's dtype ({hidden.dtype}), got {bias.dtype}")
        if bias.device != hidden.device:
            _fail(op, f"bias must be on hidden's device ({hidden.device}), got {bias.device}")
    if reward is not None:
        if not reward.is_floating_point():
            _fail(op, f"reward must be a floating-point tensor, got {reward.dtype}")
        if reward.device != hidden.device:
            _fail(op, f"reward must be on hidden's device ({hidden.device}), got {reward.device}")
        if reward.dim() != 0 and list(reward.shape) != lead:
            _fail(
                op, f"reward must be a scalar or have shape hidden.shape[:-1] = {lead}, got shape {list(reward.shape)}"
            )
    if tokens is not None:
        if tokens.dtype != torch.int64:
            _fail(op, f"tokens must be int64, got {tokens.dtype}")
        if tokens.device != hidden.device:
            _fail(op, f"tokens must be on hidden's device ({hidden.device}), got {tokens.device}")
        if list(tokens.shape) != lead:
            _fail(op, f"tokens must have shape hidden.shape[:-1] = {lead}, got shape {list(tokens.shape)}")
        if tokens.numel() > 0:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= V:
                _fail(op, f"tokens must lie in [0, V) = [0, {V}), got values in [{lo}, {hi}]")


def as_reward_tensor(reward: Reward, hidden: torch.Tensor) -> torch.Tensor | None:
    """A float reward becomes a 0-d tensor on hidden's device; tensors and None pass through."""
    if reward is None or isinstance(reward, torch.Tensor):
        return reward
    return torch.tensor(float(reward), dtype=acc_dtype(hidden.dtype), device=hidden.device)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    acc = acc_dtype(hidden.dtype)
    return F.linear(
        hidden.reshape(-1, hidden.shape[-1]).to(acc), weight.to(acc), None if bias is None else bias.to(acc)
    )


def lm_head_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(tokens, logp)``; differentiable w.r.t. ``hidden`` through ordinary autograd."""
    check_inputs("lm_head_logprob", hidden, weight, None, tokens, bias)
    lead = hidden.shape[:-1]
    logits = _logits(hidden, weight, bias)
    x = logits.detach().argmax(-1) if tokens is None else tokens.reshape(-1)
    logp = logits.gather(1, x[:, None])[:, 0] - torch.logsumexp(logits, -1)
    return x.reshape(lead), logp.reshape(lead)


def lm_head_policy_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: Reward = None,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference ``(tokens, logp, grad)`` with ``grad = -reward * (W[x] - softmax(l) @ W)``."""
    reward_t = as_reward_tensor(reward, hidden)
    check_inputs("lm_head_policy_grad", hidden, weight, reward_t, tokens, bias)
    acc = acc_dtype(hidden.dtype)
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    with torch.no_grad():
        logits = _logits(hidden, weight, bias)
        x = logits.argmax(-1) if tokens is None else tokens.reshape(-1)
        logp = logits.gather(1, x[:, None])[:, 0] - torch.logsumexp(logits, -1)
        w = weight.to(acc)
        expected_w = torch.softmax(logits, -1) @ w
        r = torch.ones((), dtype=acc, device=hidden.device) if reward_t is None else reward_t.to(acc)
        r = r.expand(lead).reshape(-1, 1)
        grad = -r * (w[x] - expected_w)
    return x.reshape(lead), logp.reshape(lead), grad.reshape(*lead, H)
