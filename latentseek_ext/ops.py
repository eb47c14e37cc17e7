r"""The fused LM-head policy-gradient ops.

Notation. ``hidden`` holds N rows z_n (any leading dims ``[*, H]``, flattened), ``weight`` is the LM head
W (``[V, H]``), ``bias`` an optional b (``[V]``), ``reward`` a per-row r_n (a float, a 0-d tensor, or shape ``[*]``;
None means 1). The logits are accumulated in float32 (float64 for float64 inputs):

.. math::

    l_{n,v} = \langle W_v, z_n \rangle + b_v,\qquad
    x_n = \text{tokens}_n \text{ if given, else } \arg\max_v l_{n,v}\ (\text{lowest index on ties}),

    \log p_n = l_{n,x_n} - \log \sum_v e^{l_{n,v}},\qquad
    \frac{\partial \log p_n}{\partial z_n} = W_{x_n} - \sum_v \mathrm{softmax}(l_n)_v\, W_v,

    \text{grad}_n = -r_n \frac{\partial \log p_n}{\partial z_n}
    = \frac{\partial}{\partial z_n}\Big(-\sum_m r_m \log p_m\Big).

``grad`` is the gradient of the REINFORCE loss ``-sum r * logp`` with respect to ``hidden``: put it in ``z.grad``
and call a torch optimizer's ``step()``. (With tokens = argmax, x does not move under an infinitesimal change of z,
so this is the exact gradient of the loss as LatentSeek defines it.)

The compiled kernels make one pass over W in vocabulary tiles with a running max, argmax, sum of exponentials and
an H-vector accumulator of ``exp(l_v - max) * W_v`` per row (flash-attention's online softmax with keys = values =
W): memory O(N*H), never an ``[N, V]`` buffer. Outputs: ``tokens`` int64 ``[*]``; ``logp`` ``[*]`` and ``grad``
``[*, H]`` in float32 (float64 for float64 inputs), whatever the input dtype (float32, bfloat16, float16, float64).

Non-finite inputs do not crash. A row whose logits contain a NaN or a +inf gets NaN ``logp`` and ``grad``; its
token follows ``torch.argmax`` (the first NaN if any, else the first maximum). Logits of -inf (e.g. a bias that
masks tokens) are fine as long as one logit of the row is finite. N = 0 returns empty outputs.

``impl`` selects the implementation: ``"ext"`` (the compiled kernel; an error if it is not built for the device),
``"reference"`` (:mod:`latentseek_ext.reference`, which materialises the logits), or ``"auto"`` (the kernel where
it exists, else the reference).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from . import reference
from .reference import Reward, acc_dtype

#: Which implementation of the ops runs (see the module docstring); the one definition of these names.
Impl = Literal["auto", "ext", "reference"]
IMPLS: tuple[Impl, ...] = get_args(Impl)

try:
    from . import _C  # noqa: F401  (registers the torch.ops.latentseek_ext kernels)

    EXTENSION_ERROR: ImportError | None = None
except ImportError as e:  # the pure-torch reference still works
    EXTENSION_ERROR = e


def _has_kernel(op: str, key: torch.DispatchKey) -> bool:
    """Whether the compiled library registered a kernel of `op` for `key` (the public query of the op object)."""
    return EXTENSION_ERROR is None and getattr(torch.ops.latentseek_ext, op).default.has_kernel_for_dispatch_key(key)


#: Device types ("cpu", "cuda") for which the compiled kernel is available.
EXTENSION_DEVICES: frozenset[str] = frozenset(
    d
    for d, key in (("cpu", torch.DispatchKey.CPU), ("cuda", torch.DispatchKey.CUDA))
    if _has_kernel("lm_head_policy_grad", key)
)


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel serves tensors on ``device``."""
    return torch.device(device).type in EXTENSION_DEVICES


def _use_extension(impl: Impl, hidden: torch.Tensor) -> bool:
    if impl == "reference":
        return False
    if impl not in IMPLS:
        raise ValueError(f"latentseek_ext: impl must be one of {IMPLS}, got {impl!r}")
    if hidden.device.type in EXTENSION_DEVICES:
        return True
    if impl == "ext":
        why = f" ({EXTENSION_ERROR})" if EXTENSION_ERROR is not None else ""
        raise RuntimeError(
            f"latentseek_ext: impl='ext' but the compiled kernel is not available for device "
            f"'{hidden.device.type}'{why}; build it with `pip install --no-build-isolation -e .` or use impl='auto'"
        )
    return False


def lm_head_policy_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: Reward = None,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, logp, grad)`` of the LM head for each row of ``hidden`` (see the module docstring for the math).

    Args:
        hidden: ``[*, H]`` float32 / bfloat16 / float16 / float64, the last-layer hidden states z.
        weight: ``[V, H]``, hidden's dtype and device: the LM-head weight W.
        reward: None (= 1), a float, a 0-d tensor, or a float tensor of shape ``[*]`` (one per row).
        tokens: None (= argmax of the logits) or int64 ``[*]`` with values in ``[0, V)``.
        bias: None or ``[V]`` in hidden's dtype.
        impl: ``"auto"``, ``"ext"`` or ``"reference"``.

    Returns:
        tokens int64 ``[*]``; logp ``[*]`` and grad ``[*, H]`` in float32 (float64 for float64 inputs), with
        ``grad = -reward * (W[tokens] - softmax(l) @ W)``.
    """
    if not _use_extension(impl, hidden):
        return reference.lm_head_policy_grad(hidden, weight, reward, tokens, bias)
    if reward is None or isinstance(reward, torch.Tensor):
        return torch.ops.latentseek_ext.lm_head_policy_grad.default(hidden, weight, reward, tokens, bias)
    # A number travels as the schema's float (no tensor, no host-to-device copy per call).
    return torch.ops.latentseek_ext.lm_head_policy_grad.float_reward(hidden, weight, float(reward), tokens, bias)


def lm_head_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, logp)``, differentiable with respect to ``hidden``.

    Same arguments and forward as :func:`lm_head_policy_grad`. When ``hidden`` requires grad, the kernel also
    keeps ``d logp / d hidden`` (an ``[N, H]`` buffer) so that the backward is a multiply, with no second pass over
    the vocabulary. ``weight`` and ``bias`` get no gradient: backpropagating into them raises an error.
    """
    if not _use_extension(impl, hidden):
        return reference.lm_head_logprob(hidden, weight, tokens, bias)
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    logp, x, _ = torch.ops.latentseek_ext.lm_head_logprob.default(hidden, weight, tokens, bias, with_grad)
    return x, logp


def _fake_outputs(hidden: torch.Tensor, weight: torch.Tensor, with_grad: bool, **optional: torch.Tensor | None):
    """Output metadata of both ops, with the shape and device rules the kernels enforce."""
    torch._check(hidden.dim() >= 1, lambda: "latentseek_ext: hidden must have shape [*, H]")
    torch._check(weight.dim() == 2, lambda: "latentseek_ext: weight must have shape [V, H]")
    torch._check(weight.shape[1] == hidden.shape[-1], lambda: "latentseek_ext: weight.shape[1] must equal H")
    for name, t in [("weight", weight), *optional.items()]:
        if t is not None and t.device != hidden.device:
            raise RuntimeError(f"latentseek_ext: {name} must be on hidden's device ({hidden.device}), got {t.device}")
    lead = hidden.shape[:-1]
    acc = acc_dtype(hidden.dtype)
    tokens = hidden.new_empty(lead, dtype=torch.int64)
    logp = hidden.new_empty(lead, dtype=acc)
    grad = hidden.new_empty(hidden.shape if with_grad else (0,), dtype=acc)
    return tokens, logp, grad


if EXTENSION_ERROR is None:

    @torch.library.register_fake("latentseek_ext::lm_head_policy_grad")
    def _policy_grad_fake(hidden, weight, reward=None, tokens=None, bias=None):
        return _fake_outputs(hidden, weight, True, reward=reward, tokens=tokens, bias=bias)

    @torch.library.register_fake("latentseek_ext::lm_head_policy_grad.float_reward")
    def _policy_grad_float_reward_fake(hidden, weight, reward, tokens=None, bias=None):
        return _fake_outputs(hidden, weight, True, tokens=tokens, bias=bias)

    @torch.library.register_fake("latentseek_ext::lm_head_logprob")
    def _logprob_fake(hidden, weight, tokens=None, bias=None, with_grad=True):
        x, logp, dlogp = _fake_outputs(hidden, weight, with_grad, tokens=tokens, bias=bias)
        return logp, x, dlogp

    def _logprob_setup_context(ctx, inputs, output):
        hidden, weight, _tokens, bias, with_grad = inputs
        _logp, x, dlogp = output
        ctx.with_grad = with_grad
        ctx.hidden_dtype = hidden.dtype
        ctx.constants_need_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        ctx.mark_non_differentiable(x, dlogp)  # dlogp_dhidden is a saved derivative, not a differentiable output
        ctx.save_for_backward(dlogp)

    def _logprob_backward(ctx, grad_logp, grad_tokens, grad_dlogp):
        if ctx.constants_need_grad:
            raise RuntimeError(
                "latentseek_ext: lm_head_logprob gives no gradient for weight or bias; pass weight.detach()"
            )
        if not ctx.with_grad:
            raise RuntimeError(
                "latentseek_ext: lm_head_logprob was called with with_grad=False, so d logp / d hidden was not "
                "kept; call latentseek_ext.lm_head_logprob (it sets with_grad when hidden requires grad)"
            )
        (dlogp_dhidden,) = ctx.saved_tensors
        grad_hidden = grad_logp.unsqueeze(-1).to(dlogp_dhidden.dtype) * dlogp_dhidden
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None

    torch.library.register_autograd(
        "latentseek_ext::lm_head_logprob", _logprob_backward, setup_context=_logprob_setup_context
    )
