"""Pure-torch reference of the fused LM-head ops: the definition of correct.

Same signatures and outputs as :mod:`latentseek_ext.ops` (the math is in that module's docstring). These functions
materialise the full ``[N, V]`` logits (and softmax) in the accumulation dtype, float32 (float64 for float64
inputs), so they are exact up to that dtype's rounding and cost O(N*V) memory. They are the ground truth of the
tests (run in float64), the fallback where the compiled extension is missing, and the baseline of the benchmarks.

The Gumbel noise of ``sample=True`` comes from :func:`philox4x32` and :func:`gumbel_uniform`, a Philox4x32-10 in
int64 torch arithmetic (every 32 x 32-bit product split into 16-bit limbs, so nothing overflows): bitwise the same
uniforms as the kernels' C++ definition (csrc/include/latentseek/sampling.h) and the ``gumbel_uniform`` op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Reward = float | torch.Tensor | None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: The largest k of the top-k outputs.
MAX_TOPK = 32
#: Philox4x32-10's constants (Salmon et al. 2011; Random123, curand and torch use the same).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
#: Random bits per uniform: u = (k + 1/2) 2^-23 with k the top 23 of the 32 bits, exact in float32 (24 significant
#: bits) and in (0, 1). (24 bits, (k + 1/2) 2^-24, would need 25 significant bits: float32 would round the largest
#: u to 1.0 and its Gumbel noise to +inf.)
UNIFORM_BITS = 23
#: The largest Gumbel noise -log(-log(u)) of any u: at u = 1 - 2^-24, about 16.64. A kernel may skip the noise of an
#: entry whose scaled logit plus this bound (plus its own rounding) is below the best perturbed score so far.
GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-24)))
#: Rows of the reference's noise per chunk: chunk * V stays below this many elements per int64 buffer.
_NOISE_CHUNK_ELEMENTS = 1 << 21


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


def check_options(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor | None,
    *,
    temperature: float,
    sample: bool,
    seed: int | None,
    offsets: torch.Tensor | None,
    entropy: bool,
    topk: int,
    read_values: bool = True,
) -> None:
    """The rules of the keyword options (shared by the wrapper and the reference), raising ValueError. With
    ``read_values`` the values of CPU ``offsets`` are read on the host (the wrapper leaves that to the kernel or the
    reference it calls, so that it stays traceable by torch.compile)."""

    def bad(msg: str) -> None:
        raise ValueError(f"latentseek_ext: {op}: {msg}")

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        bad(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        bad(f"temperature must be finite and > 0, got {temperature}")
    if not isinstance(entropy, bool):
        bad(f"entropy must be a bool, got {type(entropy).__name__}")
    V = weight.shape[0] if weight.dim() == 2 else 0
    if isinstance(topk, bool) or not isinstance(topk, int):
        bad(f"topk must be a Python int, got {type(topk).__name__}")
    if not 0 <= topk <= min(MAX_TOPK, V):
        bad(f"topk must lie in [0, min({MAX_TOPK}, V)] = [0, {min(MAX_TOPK, V)}], got {topk}")
    if not isinstance(sample, bool):
        bad(f"sample must be a bool, got {type(sample).__name__}")
    if sample:
        if seed is None:
            bad("sample=True needs a seed (a Python int in [0, 2**63)), got seed=None")
        if tokens is not None:
            bad("sample=True draws the tokens, so tokens must be None, got a tensor")
    else:
        if seed is not None:
            bad(f"seed is only used with sample=True, got seed={seed} with sample=False")
        if offsets is not None:
            bad("offsets are only used with sample=True, got a tensor with sample=False")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        bad(f"seed must be a Python int in [0, 2**63), got {seed!r}")
    if offsets is not None:
        lead = list(hidden.shape[:-1])
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
            got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
            bad(f"offsets must be an int64 tensor, got {got}")
        if list(offsets.shape) != lead:
            bad(f"offsets must have shape hidden.shape[:-1] = {lead}, got shape {list(offsets.shape)}")
        if offsets.device != hidden.device:
            bad(f"offsets must be on hidden's device ({hidden.device}), got {offsets.device}")
        if read_values and offsets.device.type == "cpu" and offsets.numel() and int(offsets.min()) < 0:
            bad(f"offsets must be >= 0, got a minimum of {int(offsets.min())}")


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


# --- Gumbel noise: Philox4x32-10 in int64 arithmetic ------------------------------------------------------------


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32) and a 32-bit constant m: 16-bit limbs, so
    every partial product and sum stays below 2^34."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    cross = a_hi * m_lo + a_lo * m_hi  # < 2^33
    mid = a_lo * m_lo + ((cross & 0xFFFF) << 16)  # < 2^33
    hi = (a_hi * m_hi + (cross >> 16) + (mid >> 32)) & _MASK32
    return hi, mid & _MASK32


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of int64 tensors holding uint32 values (broadcast together) under a 64-bit key (k0, k1)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_bits(seed: int, offsets: torch.Tensor, V: int) -> torch.Tensor:
    """``[N, V]`` int64 holding uint32 ``bits(seed, offsets[n], v)``: lane v % 4 of Philox4x32-10 with key
    (seed mod 2^32, seed >> 32) and counter (v >> 2, offset mod 2^32, offset >> 32, 0)."""
    off = offsets.reshape(-1, 1).to(torch.int64)
    groups = torch.arange((V + 3) // 4, dtype=torch.int64, device=off.device)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=off.device)
    lanes = philox4x32((groups, off & _MASK32, off >> 32, zero), (seed & _MASK32, seed >> 32))
    lanes = [lane.expand(off.shape[0], groups.shape[1]) for lane in lanes]
    return torch.stack(lanes, -1).reshape(off.shape[0], -1)[:, :V]


def gumbel_uniform(seed: int, offsets: torch.Tensor, V: int) -> torch.Tensor:
    """``[N, V]`` float32 uniforms ``u = (bits >> 9 + 1/2) 2^-23``, exact and in (0, 1): the same values as the
    ``latentseek_ext::gumbel_uniform`` op and the kernels."""
    k = philox_bits(seed, offsets, V) >> (32 - UNIFORM_BITS)
    return ((2 * k + 1).to(torch.float64) * 2.0 ** -(UNIFORM_BITS + 1)).to(torch.float32)


def gumbel_noise(seed: int, offsets: torch.Tensor, V: int) -> torch.Tensor:
    """``[N, V]`` float64 Gumbel noise ``g = -log(-log(u))`` of :func:`gumbel_uniform`."""
    return -torch.log(-torch.log(gumbel_uniform(seed, offsets, V).to(torch.float64)))


def default_offsets(hidden: torch.Tensor) -> torch.Tensor:
    """The offsets of ``offsets=None``: the row index 0..N-1 in hidden.shape[:-1]."""
    lead = hidden.shape[:-1]
    return torch.arange(lead.numel(), dtype=torch.int64, device=hidden.device).reshape(lead)


def _sampled_tokens(scaled: torch.Tensor, seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """argmax_v (l'_v + g_v) per row (the first maximum; a NaN row gives its first NaN, a +inf row its first +inf,
    as the plain argmax), the noise made in row chunks to bound the memory."""
    n, V = scaled.shape
    off = offsets.reshape(-1)
    out = torch.empty(n, dtype=torch.int64, device=scaled.device)
    step = max(1, _NOISE_CHUNK_ELEMENTS // V)
    for i in range(0, n, step):
        g = gumbel_noise(seed, off[i : i + step], V).to(scaled.dtype)
        out[i : i + step] = (scaled[i : i + step] + g).argmax(-1)
    return out


def _non_finite_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.isnan(logits).any(-1) | (logits == math.inf).any(-1)


def _entropy(scaled: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v of p = softmax(l') per row (p_v = 0 terms are 0; NaN for a row without a finite max or with
    a NaN or +inf logit)."""
    logp = torch.log_softmax(scaled, -1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return torch.where(_non_finite_rows(scaled), torch.full_like(ent, math.nan), ent)


def _topk(scaled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log p = l' - logsumexp(l') in descending order and their tokens, ties to the lower index; a row
    with a NaN or +inf logit gets NaN values and the tokens 0..k-1."""
    vals, idx = scaled.topk(k, -1)
    # torch.topk orders ties arbitrarily: rows where a tie touches the top k are redone with a stable sort.
    tied = (scaled >= vals[:, -1:]).sum(-1) > k
    if k > 1:
        tied |= (vals[:, 1:] == vals[:, :-1]).any(-1)
    if bool(tied.any()):
        s_vals, s_idx = torch.sort(scaled[tied], stable=True, dim=-1, descending=True)
        vals[tied], idx[tied] = s_vals[:, :k], s_idx[:, :k]
    logp = vals - torch.logsumexp(scaled, -1, keepdim=True)
    bad = _non_finite_rows(scaled)
    logp = torch.where(bad[:, None], torch.full_like(logp, math.nan), logp)
    lowest = torch.arange(k, device=scaled.device).expand_as(idx)
    return logp, torch.where(bad[:, None], lowest, idx)


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor | None,
    bias: torch.Tensor | None,
    temperature: float,
    seed: int | None,
    offsets: torch.Tensor | None,
    entropy: bool,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(scaled logits l' [N, V], the chosen tokens [N], logp [N], the extra outputs, flat)."""
    logits = _logits(hidden, weight, bias)
    scaled = logits if temperature == 1.0 else logits / temperature
    with torch.no_grad():
        if tokens is not None:
            x = tokens.reshape(-1)
        elif seed is not None:
            off = default_offsets(hidden) if offsets is None else offsets
            bad = _non_finite_rows(logits.detach())
            x = torch.where(bad, logits.detach().argmax(-1), _sampled_tokens(scaled.detach(), seed, off))
        else:
            x = logits.detach().argmax(-1)
    logp = scaled.gather(1, x[:, None])[:, 0] - torch.logsumexp(scaled, -1)
    extra: list[torch.Tensor] = []
    with torch.no_grad():
        if entropy:
            extra.append(_entropy(scaled.detach()))
        if topk:
            extra.extend(_topk(scaled.detach(), topk))
    return scaled, x, logp, tuple(extra)


def _shape_extra(extra: tuple[torch.Tensor, ...], lead: torch.Size) -> tuple[torch.Tensor, ...]:
    return tuple(t.reshape(*lead, *t.shape[1:]) for t in extra)


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
) -> tuple[torch.Tensor, ...]:
    """Reference ``(tokens, logp)`` [+ ``(entropy,)``] [+ ``(topk_logp, topk_tokens)``]; logp is differentiable
    w.r.t. ``hidden`` through ordinary autograd."""
    check_inputs("lm_head_logprob", hidden, weight, None, tokens, bias)
    check_options(
        "lm_head_logprob", hidden, weight, tokens, temperature=temperature, sample=sample, seed=seed,
        offsets=offsets, entropy=entropy, topk=topk, read_values=not torch.compiler.is_compiling(),
    )  # fmt: skip
    lead = hidden.shape[:-1]
    _, x, logp, extra = _forward(hidden, weight, tokens, bias, float(temperature), seed, offsets, entropy, topk)
    return x.reshape(lead), logp.reshape(lead), *_shape_extra(extra, lead)


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
) -> tuple[torch.Tensor, ...]:
    """Reference ``(tokens, logp, grad)`` [+ ``(entropy,)``] [+ ``(topk_logp, topk_tokens)``] with
    ``grad = -reward * (W[x] - softmax(l / T) @ W) / T``."""
    reward_t = as_reward_tensor(reward, hidden)
    check_inputs("lm_head_policy_grad", hidden, weight, reward_t, tokens, bias)
    check_options(
        "lm_head_policy_grad", hidden, weight, tokens, temperature=temperature, sample=sample, seed=seed,
        offsets=offsets, entropy=entropy, topk=topk, read_values=not torch.compiler.is_compiling(),
    )  # fmt: skip
    acc = acc_dtype(hidden.dtype)
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    T = float(temperature)
    with torch.no_grad():
        scaled, x, logp, extra = _forward(hidden, weight, tokens, bias, T, seed, offsets, entropy, topk)
        w = weight.to(acc)
        expected_w = torch.softmax(scaled, -1) @ w
        r = torch.ones((), dtype=acc, device=hidden.device) if reward_t is None else reward_t.to(acc)
        r = r.expand(lead).reshape(-1, 1)
        grad = -r * (w[x] - expected_w)
        if T != 1.0:
            grad = grad / T
    return x.reshape(lead), logp.reshape(lead), grad.reshape(*lead, H), *_shape_extra(extra, lead)
