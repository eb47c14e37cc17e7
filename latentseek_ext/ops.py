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

Options (keyword-only, both ops; with none of them given a call is exactly the plain op above). With a temperature
T (a Python float, finite and > 0) the softmax is taken of the scaled logits l' = l / T:

.. math::

    \log p_n = l'_{n,x_n} - \log \sum_v e^{l'_{n,v}},\qquad
    \frac{\partial \log p_n}{\partial z_n} = \frac{1}{T}\Big(W_{x_n} - \sum_v \mathrm{softmax}(l'_n)_v\, W_v\Big),

and the greedy token stays argmax_v l_v. ``sample=True`` (with ``seed``) draws the token instead by Gumbel-max,
x_n = argmax_v (l'_{n,v} + g_{n,v}) (lowest index on ties), i.e. a draw from softmax(l'_n), with noise that depends
only on (seed, offsets[n], v), never on N, the row's position or the device:

    bits(seed, o, v) = lane v % 4 of Philox4x32-10(key = (seed mod 2^32, seed >> 32),
                                                    counter = (v >> 2, o mod 2^32, o >> 32, 0))
    u = ((bits >> 9) + 1/2) * 2^-23        (exact in float32, in (0, 1))
    g = -log(-log(u))                      (the kernels in float32, the reference in float64; g < 16.64)

``seed`` is a Python int in [0, 2**63); ``offsets`` (int64, shape ``[*]``, values >= 0; None = the row index
0..N-1) name each row's stream, so a row keeps its token when the batch around it changes. The sampled token is
not differentiated (as the argmax). ``entropy=True`` appends ``entropy`` ``[*]`` = -sum_v p_v log p_v of
p = softmax(l'), computed online from s1 = sum e^{l'-m} and s2 = sum e^{l'-m} (l'-m) as log s1 - s2 / s1 (both
rescaled when the running max m moves). ``topk=k`` (1 <= k <= min(32, V)) appends ``topk_logp`` ``[*, k]``, the k
largest log p_v = l'_v - logsumexp(l') in descending order, and ``topk_tokens`` ``[*, k]`` int64 (ties: lower
index first). Extra outputs come after the usual ones, entropy first (torch.unique's convention); they are in the
accumulation dtype and not differentiable. A row with a NaN or +inf logit gets NaN entropy and topk_logp and the
tokens 0..k-1 as its topk_tokens; its token (sampled or not) follows torch.argmax as above. Bad options are a
ValueError naming the argument.

``impl`` selects the implementation: ``"ext"`` (the compiled kernel; an error if it is not built for the device,
or, for a call with options, if the device's kernel does not implement them yet), ``"reference"``
(:mod:`latentseek_ext.reference`, which materialises the logits), or ``"auto"`` (the kernel where it exists, else
the reference).
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


def _has_options_kernel(key: torch.DispatchKey) -> bool:
    if EXTENSION_ERROR is not None:
        return False
    ops = torch.ops.latentseek_ext
    return all(
        "options" in getattr(ops, op).overloads() and getattr(ops, op).options.has_kernel_for_dispatch_key(key)
        for op in ("lm_head_policy_grad", "lm_head_logprob")
    )


#: Device types whose compiled kernel also implements the options (temperature, sample, entropy, topk).
EXTENSION_OPTIONS_DEVICES: frozenset[str] = frozenset(
    d for d, key in (("cpu", torch.DispatchKey.CPU), ("cuda", torch.DispatchKey.CUDA)) if _has_options_kernel(key)
)


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel serves tensors on ``device``."""
    return torch.device(device).type in EXTENSION_DEVICES


def _use_extension(impl: Impl, hidden: torch.Tensor, options: bool = False) -> bool:
    if impl == "reference":
        return False
    if impl not in IMPLS:
        raise ValueError(f"latentseek_ext: impl must be one of {IMPLS}, got {impl!r}")
    devices = EXTENSION_OPTIONS_DEVICES if options else EXTENSION_DEVICES
    if hidden.device.type in devices:
        return True
    if impl == "ext":
        if options and hidden.device.type in EXTENSION_DEVICES:
            raise RuntimeError(
                f"latentseek_ext: impl='ext' but the compiled kernel for device '{hidden.device.type}' does not "
                "implement the options (temperature != 1, sample, entropy, topk) yet; use impl='auto' or 'reference'"
            )
        why = f" ({EXTENSION_ERROR})" if EXTENSION_ERROR is not None else ""
        raise RuntimeError(
            f"latentseek_ext: impl='ext' but the compiled kernel is not available for device "
            f"'{hidden.device.type}'{why}; build it with `pip install --no-build-isolation -e .` or use impl='auto'"
        )
    return False


def _check_options(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor | None,
    temperature: float,
    sample: bool,
    seed: int | None,
    offsets: torch.Tensor | None,
    entropy: bool,
    topk: int,
) -> bool:
    """Validates the options (ValueError) and says whether any is in use."""
    reference.check_options(
        op, hidden, weight, tokens, temperature=temperature, sample=sample, seed=seed, offsets=offsets,
        entropy=entropy, topk=topk, read_values=False,
    )  # fmt: skip
    return temperature != 1 or sample or entropy or topk > 0


def _extra_outputs(entropy_out: torch.Tensor, topk_logp: torch.Tensor, topk_tokens: torch.Tensor, entropy: bool,
                   topk: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
    return ((entropy_out,) if entropy else ()) + ((topk_logp, topk_tokens) if topk else ())


def lm_head_policy_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reward: Reward = None,
    tokens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    sample: bool = False,
    seed: int | None = None,
    offsets: torch.Tensor | None = None,
    entropy: bool = False,
    topk: int = 0,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, ...]:
    """``(tokens, logp, grad)`` of the LM head for each row of ``hidden`` (see the module docstring for the math),
    then ``entropy`` if asked, then ``(topk_logp, topk_tokens)`` if ``topk > 0``.

    Args:
        hidden: ``[*, H]`` float32 / bfloat16 / float16 / float64, the last-layer hidden states z.
        weight: ``[V, H]``, hidden's dtype and device: the LM-head weight W.
        reward: None (= 1), a float, a 0-d tensor, or a float tensor of shape ``[*]`` (one per row).
        tokens: None (= argmax of the logits, or a sample) or int64 ``[*]`` with values in ``[0, V)``.
        bias: None or ``[V]`` in hidden's dtype.
        temperature: T > 0, finite: the softmax of logits / T.
        sample: draw the tokens from softmax(logits / T) by Gumbel-max (needs ``seed``; not with ``tokens``).
        seed: int in ``[0, 2**63)``, only with ``sample=True``.
        offsets: None (= row index) or int64 ``[*]`` >= 0: each row's noise stream, only with ``sample=True``.
        entropy: also return the entropy of softmax(logits / T), ``[*]``.
        topk: 0, or k in ``[1, min(32, V)]``: also return the k largest log-probabilities ``[*, k]`` and their
            tokens ``[*, k]`` int64.
        impl: ``"auto"``, ``"ext"`` or ``"reference"``.

    Returns:
        tokens int64 ``[*]``; logp ``[*]`` and grad ``[*, H]`` in float32 (float64 for float64 inputs), with
        ``grad = -reward * (W[tokens] - softmax(l / T) @ W) / T``; then the asked extra outputs.
    """
    options = _check_options(
        "lm_head_policy_grad", hidden, weight, tokens, temperature, sample, seed, offsets, entropy, topk
    )
    if not _use_extension(impl, hidden, options):
        return reference.lm_head_policy_grad(
            hidden, weight, reward, tokens, bias, temperature=temperature, sample=sample, seed=seed,
            offsets=offsets, entropy=entropy, topk=topk,
        )  # fmt: skip
    if options:
        # A number travels as the schema's reward_scale (no tensor, no host-to-device copy per call).
        number = reward is not None and not isinstance(reward, torch.Tensor)
        x, logp, grad, ent, top_logp, top_tokens = torch.ops.latentseek_ext.lm_head_policy_grad.options(
            hidden, weight, None if number else reward, float(reward) if number else 1.0, tokens, bias,
            float(temperature), seed if sample else None, offsets, entropy, topk,
        )  # fmt: skip
        return (x, logp, grad, *_extra_outputs(ent, top_logp, top_tokens, entropy, topk))
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
    temperature: float = 1.0,
    sample: bool = False,
    seed: int | None = None,
    offsets: torch.Tensor | None = None,
    entropy: bool = False,
    topk: int = 0,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, ...]:
    """``(tokens, logp)``, differentiable with respect to ``hidden``, then ``entropy`` and ``(topk_logp,
    topk_tokens)`` if asked (not differentiable).

    Same arguments and forward as :func:`lm_head_policy_grad`. When ``hidden`` requires grad, the kernel also
    keeps ``d logp / d hidden`` (an ``[N, H]`` buffer) so that the backward is a multiply, with no second pass over
    the vocabulary. ``weight`` and ``bias`` get no gradient: backpropagating into them raises an error.
    """
    options = _check_options(
        "lm_head_logprob", hidden, weight, tokens, temperature, sample, seed, offsets, entropy, topk
    )
    if not _use_extension(impl, hidden, options):
        return reference.lm_head_logprob(
            hidden, weight, tokens, bias, temperature=temperature, sample=sample, seed=seed, offsets=offsets,
            entropy=entropy, topk=topk,
        )  # fmt: skip
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    if options:
        logp, x, _, ent, top_logp, top_tokens = torch.ops.latentseek_ext.lm_head_logprob.options(
            hidden, weight, tokens, bias, with_grad, float(temperature), seed if sample else None, offsets,
            entropy, topk,
        )  # fmt: skip
        return (x, logp, *_extra_outputs(ent, top_logp, top_tokens, entropy, topk))
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


def _fake_extra(hidden: torch.Tensor, entropy: bool, topk: int):
    """Output metadata of the options' outputs: entropy [*] (an empty [0] when not asked), top-k [*, topk]."""
    lead = hidden.shape[:-1]
    acc = acc_dtype(hidden.dtype)
    ent = hidden.new_empty(lead if entropy else (0,), dtype=acc)
    return ent, hidden.new_empty((*lead, topk), dtype=acc), hidden.new_empty((*lead, topk), dtype=torch.int64)


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

    if "options" in torch.ops.latentseek_ext.lm_head_policy_grad.overloads():

        @torch.library.register_fake("latentseek_ext::lm_head_policy_grad.options")
        def _policy_grad_options_fake(
            hidden, weight, reward=None, reward_scale=1.0, tokens=None, bias=None, temperature=1.0, seed=None,
            offsets=None, entropy=False, topk=0,
        ):  # fmt: skip
            out = _fake_outputs(hidden, weight, True, reward=reward, tokens=tokens, bias=bias, offsets=offsets)
            return (*out, *_fake_extra(hidden, entropy, topk))

        @torch.library.register_fake("latentseek_ext::lm_head_logprob.options")
        def _logprob_options_fake(
            hidden, weight, tokens=None, bias=None, with_grad=True, temperature=1.0, seed=None, offsets=None,
            entropy=False, topk=0,
        ):  # fmt: skip
            x, logp, dlogp = _fake_outputs(hidden, weight, with_grad, tokens=tokens, bias=bias, offsets=offsets)
            return (logp, x, dlogp, *_fake_extra(hidden, entropy, topk))

    if hasattr(torch.ops.latentseek_ext, "gumbel_uniform"):

        @torch.library.register_fake("latentseek_ext::gumbel_uniform")
        def _gumbel_uniform_fake(seed, offsets, V):
            return offsets.new_empty((offsets.shape[0], V), dtype=torch.float32)

    def _logprob_setup_context(ctx, inputs, output):
        hidden, weight, _tokens, bias, with_grad = inputs[:5]
        _logp, x, dlogp, *extra = output
        ctx.n_inputs = len(inputs)
        ctx.with_grad = with_grad
        ctx.hidden_dtype = hidden.dtype
        ctx.constants_need_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        # dlogp_dhidden is a saved derivative, not a differentiable output; entropy and top-k are not differentiated
        ctx.mark_non_differentiable(x, dlogp, *extra)
        ctx.save_for_backward(dlogp)

    def _logprob_backward(ctx, grad_logp, grad_tokens, grad_dlogp, *grad_extra):
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
        return grad_hidden.to(ctx.hidden_dtype), *([None] * (ctx.n_inputs - 1))

    torch.library.register_autograd(
        "latentseek_ext::lm_head_logprob", _logprob_backward, setup_context=_logprob_setup_context
    )
    if "options" in torch.ops.latentseek_ext.lm_head_logprob.overloads():
        torch.library.register_autograd(
            "latentseek_ext::lm_head_logprob.options", _logprob_backward, setup_context=_logprob_setup_context
        )
