"""KV-cached, batched generation that keeps the hidden state behind every token.

:func:`generate` is the public entry point (greedy, or temperature / top-p sampling with a seed, from the logits or
through the fused LM-head op without them);
:func:`extend` is the engine's core: it continues rows that may already own a KV cache
(:class:`PrefixCache`), which is how LatentSeek reuses a prompt's cache for every optimisation step.

Batch layout. Row i has ``c_i`` cached tokens and ``t_i`` new tokens. The cached parts are right-aligned in the
first ``C = max c_i`` columns and the new tokens right-aligned in the next ``T = max t_i`` columns; everything else
is padding with attention mask 0, so a row may have padding in the middle (between its cache and its new tokens).
Position ids count only the row's own tokens (``cumsum(mask) - 1``), so every token sits at its true position
whatever the padding, and a row's keys and values do not depend on the other rows. Rows leave the batch (their
cache rows are dropped) as soon as they stop. With ``decode="graph"`` the decode steps keep static shapes instead
(:mod:`latentseek.static_decode`: stopped rows stay in a batch-size bucket until the running rows fit a smaller one),
and ``decode="compiled"`` runs that step through ``torch.compile`` (CPU).

Sliding-window attention is applied over cache columns, so with padding in the middle the window of a row that
is longer than the window covers a few pad columns; rows shorter than the window are unaffected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

import latentseek_ext

from .chat import stop_token_ids
from .context import ContextNeed, model_context_length
from .kv_cache import PrefixCache, batch_cache, new_cache, take_prefix
from .model import ModelAdapter
from .progress import decode_reporter
from .static_decode import (
    Decode,
    StaticDecoder,
    bucket,
    check_decode,
    check_graph_support,
    default_decode,
    static_capacity,
)


class DecodeStep:
    """What a picker sees at one decode step: ``h`` ``[b, H]``, the hidden states of the running rows that the LM
    head reads (model dtype), and ``logits`` ``[b, V]``, :meth:`~latentseek.model.ModelAdapter.logits` of them,
    computed on first use (a picker that never asks, e.g. the fused sampler, never materialises them)."""

    __slots__ = ("adapter", "h", "_logits")

    def __init__(self, adapter: ModelAdapter, h: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        self.adapter, self.h, self._logits = adapter, h, logits

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.adapter.logits(self.h)
        return self._logits


# A picker turns a decode step of the rows still running (their indices in the call) into tokens [b].
Picker = Callable[[DecodeStep, list[int]], torch.Tensor]

#: How sampled tokens are drawn: from the model's logits, or through the fused LM-head op (:func:`sampling_picker`).
Sampler = Literal["logits", "fused"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)

#: The fused sampler's nucleus is read from the op's top-k log-probs with this k (the op's largest); a row whose
#: nucleus is not closed within them (the top-k mass is below top_p) takes its logits instead.
FUSED_TOPK = 32


@dataclass
class Generation:
    """What :func:`generate` / :func:`extend` produced, one entry per input row.

    Attributes:
        tokens: the generated token ids of each row; the stop token is included when the row produced one.
        stopped: whether each row ended on a stop token (False: it reached ``max_new_tokens``).
        hidden: with ``return_hidden``, a ``[len(tokens[i]), H]`` tensor per row (model dtype): row t is the
            post-final-norm hidden state that produced token t, i.e. ``logits_t = lm_head(hidden[t])``.
        prefixes: the :class:`PrefixCache` kept for each row when ``keep_prefix`` asked for one, else None.
        prefill_tokens: tokens fed to the model that were not generated (prompts / new tokens of :func:`extend`).
    """

    tokens: list[list[int]]
    stopped: list[bool]
    hidden: list[torch.Tensor] | None
    prefixes: list[PrefixCache | None]
    prefill_tokens: int


def counter_key(data: bytes) -> int:
    """The fused sampler's stream key of ``data``: 31 bits of its SHA-256. A stream's draws use the op's counters
    ``key << 32 | index`` (index < 2**32), which stay non-negative int64 offsets."""
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "little") >> 1


def greedy_picker() -> Picker:
    """Greedy decoding: the first maximal logit of each row (``torch.argmax``)."""
    return lambda step, rows: step.logits.argmax(-1)


def check_sampling(temperature: float, top_p: float, sampler: str = "logits") -> None:
    """ValueError unless ``temperature > 0``, ``0 < top_p <= 1`` and ``sampler`` is one of :data:`SAMPLERS`."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 for sampling (use do_sample=False for greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def sampling_picker(
    temperature: float,
    top_p: float,
    seed: int,
    num_rows: int,
    *,
    row_seeds: Sequence[int] | None = None,
    sampler: Sampler = "logits",
    impl: latentseek_ext.Impl = "auto",
) -> Picker:
    """Temperature / nucleus sampling, reproducible per row.

    Row r's randomness comes from its own seed, ``(seed, r)`` or ``row_seeds[r]`` when given (e.g. to make a problem's
    samples independent of its place in the batch), so a row's sample does not depend on which other rows are in
    the batch or when they stop. The distribution is ``softmax(logits / temperature)`` cut to its nucleus: the
    tokens in decreasing order of probability while the mass before them is below ``top_p``, renormalised.

    ``sampler="logits"`` computes each step's ``[b, V]`` logits and draws by inverse CDF over the sorted
    probabilities, one uniform number per row from a generator seeded with the row's seed.

    ``sampler="fused"`` never forms the logits in the common case; the LM head runs in the fused op
    (:func:`latentseek_ext.lm_head_logprob`, ``impl``, on the dense head weight even where decoding's own head is
    quantised):

    - ``top_p == 1``: the op's Gumbel-max sampling mode, in the same pass over W as the softmax. Row r's t-th draw
      uses the op's counter ``offset = key_r << 32 | t`` under ``seed``, where ``key_r`` is 31 bits of a SHA-256
      of the row's seed.
    - ``top_p < 1``: the op's top-``FUSED_TOPK`` log-probs, and inverse CDF over them with the same uniform number
      as the logits sampler; so both samplers draw the same token whenever their probabilities agree to rounding. A
      row whose nucleus is not closed within those tokens (their mass is below ``top_p``) takes the logits path.
    """
    check_sampling(temperature, top_p, sampler)
    if row_seeds is None:
        row_seeds = [seed * 1_000_003 + r for r in range(num_rows)]
    elif len(row_seeds) != num_rows:
        raise ValueError(f"got {len(row_seeds)} row seeds for {num_rows} rows")
    if sampler == "fused" and top_p == 1.0:
        return _gumbel_picker(temperature, seed, row_seeds, impl)
    generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in row_seeds]

    def logits_pick(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        return _nucleus_pick(sorted_probs, order, u, top_p)

    def pick(step: DecodeStep, rows: list[int]) -> torch.Tensor:
        u = torch.cat([torch.rand(1, generator=generators[r]) for r in rows]).to(step.h.device)
        if sampler == "logits":
            return logits_pick(step.logits, u)
        adapter = step.adapter
        k = min(FUSED_TOPK, adapter.vocab_size)
        _, _, top_logp, top_tokens = latentseek_ext.lm_head_logprob(
            step.h, adapter.weight, bias=adapter.bias, temperature=temperature, topk=k, impl=impl
        )
        top_probs = top_logp.float().exp()
        tokens = _nucleus_pick(top_probs, top_tokens, u, top_p)
        if k < adapter.vocab_size:
            open_rows = (top_probs.sum(-1) < top_p).nonzero()[:, 0]
            if len(open_rows):
                tokens[open_rows] = logits_pick(adapter.logits(step.h[open_rows]), u[open_rows])
        return tokens

    return pick


def _nucleus_pick(sorted_probs: torch.Tensor, order: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """Inverse CDF at ``u`` [b] over each row's probabilities in decreasing order (``order``: their token ids), kept
    while the mass before them is below ``top_p`` (the first is always kept)."""
    cdf = sorted_probs.cumsum(-1)
    kept = sorted_probs.masked_fill(cdf - sorted_probs >= top_p, 0.0)
    cdf = kept.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=sorted_probs.shape[-1] - 1)
    return order.gather(1, index)[:, 0]


def _gumbel_picker(temperature: float, seed: int, row_seeds: Sequence[int], impl: latentseek_ext.Impl) -> Picker:
    """The fused op's Gumbel-max sampling mode with per-row counters (see :func:`sampling_picker`)."""
    keys = [counter_key(str(int(s)).encode()) for s in row_seeds]
    drawn = [0] * len(row_seeds)

    def pick(step: DecodeStep, rows: list[int]) -> torch.Tensor:
        offsets = torch.tensor([keys[r] << 32 | drawn[r] for r in rows], dtype=torch.long, device=step.h.device)
        for r in rows:
            drawn[r] += 1
        adapter = step.adapter
        tokens, _ = latentseek_ext.lm_head_logprob(
            step.h,
            adapter.weight,
            bias=adapter.bias,
            temperature=temperature,
            sample=True,
            seed=seed,
            offsets=offsets,
            impl=impl,
        )
        return tokens

    return pick


@torch.inference_mode()
def extend(
    adapter: ModelAdapter,
    rows: Sequence[tuple[PrefixCache | None, Sequence[int]]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    *,
    picker: Picker | None = None,
    return_hidden: bool = False,
    keep_prefix: Sequence[int] | None = None,
    decode: Decode | None = None,
    offset: torch.Tensor | None = None,
) -> Generation:
    """Feed each row's new tokens after its cached prefix (if any), then decode until a stop token or the cap.

    Args:
        adapter: the model.
        rows: ``(prefix, new_tokens)`` per row; ``prefix`` is None for a row without cache; ``new_tokens`` must not
            be empty (its last token's hidden state produces the first generated token).
        max_new_tokens: most tokens generated per row (>= 1).
        stop_ids: a row stops after producing one of these (it is included in its tokens).
        picker: how tokens are chosen at each step from its :class:`DecodeStep` (default greedy).
        return_hidden: also return the hidden state behind every generated token.
        keep_prefix: per row, how many leading tokens of its sequence (prefix + new tokens + generated) to keep as
            a :class:`PrefixCache` (at most the tokens the model has seen: all but the last generated one).
        decode: how the decode steps run: ``"eager"`` (the reference), ``"graph"`` (the static-shape step of
            :mod:`latentseek.static_decode`, captured in CUDA graphs on CUDA) or ``"compiled"`` (that step through
            ``torch.compile``, CPU only; each new bucket and buffer size compiles first); None:
            :func:`~latentseek.static_decode.default_decode` of the adapter's device. The prefill is eager either way,
            and only the last position of each row gets logits.
        offset: None, or ``[len(rows), H]``: row i's vector is added to every hidden state whose logits row i
            reads (its prefill's last position and each decode step), so ``logits = lm_head(h + offset_i)`` and
            ``hidden`` holds ``h + offset_i``; cast to the model's dtype. SLOT's per-problem delta
            (:mod:`latentseek.slot`). None adds nothing (the paths above, unchanged).

    Returns:
        a :class:`Generation`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(tokens) == 0 for _, tokens in rows):
        raise ValueError("every row needs at least one new token")
    device, n = adapter.device, len(rows)
    decode = default_decode(device) if decode is None else check_decode(decode)
    if decode != "eager":
        check_graph_support(adapter, decode)
    if offset is not None:
        if tuple(offset.shape) != (n, adapter.hidden_size):
            raise ValueError(
                f"offset must have shape [{n}, {adapter.hidden_size}] (one vector per row), got {list(offset.shape)}"
            )
        offset = offset.to(device=device, dtype=adapter.dtype)
    picker = picker or greedy_picker()
    stop = set(int(s) for s in stop_ids)
    cached = [0 if prefix is None else prefix.length for prefix, _ in rows]
    C, T = max(cached, default=0), max((len(tokens) for _, tokens in rows), default=0)
    mask = torch.zeros(n, C + T, dtype=torch.long)
    input_ids = torch.zeros(n, T, dtype=torch.long)
    for i, (_, tokens) in enumerate(rows):
        mask[i, C - cached[i] : C] = 1
        mask[i, C + T - len(tokens) :] = 1
        input_ids[i, T - len(tokens) :] = torch.as_tensor(list(tokens), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)[:, C:]
    capacity = C + T + max_new_tokens
    buffer_rows = 0
    if decode != "eager":
        capacity, buffer_rows = static_capacity(capacity, decode), bucket(n)
    if C > 0:
        cache = batch_cache(adapter, [prefix for prefix, _ in rows], C, capacity, buffer_rows)
    else:
        cache = new_cache(adapter, capacity, buffer_rows)
    mask, input_ids, positions = mask.to(device), input_ids.to(device), positions.to(device)

    tokens: list[list[int]] = [[] for _ in range(n)]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(n)]
    stopped = [False] * n
    prefixes: list[PrefixCache | None] = [None] * n
    active = list(range(n))  # call row index of each running row
    h = adapter.hidden(input_ids, mask, positions, cache)[:, -1]  # the prefill; logits of the last position only
    if offset is not None:
        h = h + offset
    step = DecodeStep(adapter, h)
    next_position = positions[:, -1] + 1
    static = StaticDecoder(adapter, cache, mask, offset, decode) if decode != "eager" else None
    slots = list(range(n))  # graph path: the static buffers' row of each running row
    slot_index = torch.arange(n, device=device)
    report = decode_reporter()  # None unless a progress.reporting block listens
    generated = 0
    while True:
        chosen = picker(step, active)
        finished = []
        for j, (row, token) in enumerate(zip(active, chosen.tolist(), strict=True)):
            tokens[row].append(token)
            if return_hidden:
                hidden[row].append(h[j])
            if token in stop:
                stopped[row] = True
            if token in stop or len(tokens[row]) >= max_new_tokens:
                finished.append(j)
        generated += len(active)
        if report is not None:
            report(generated, len(active) - len(finished))
        if finished:
            if keep_prefix is not None:
                if static is None:
                    kv, kv_mask, where = (
                        [(layer.keys, layer.values) for layer in cache.layers],
                        mask,
                        range(len(active)),
                    )
                else:
                    kv, kv_mask, where = static.filled_kv(), static.filled_mask, slots
                for j in finished:
                    prefixes[active[j]] = take_prefix(kv, kv_mask, where[j], keep_prefix[active[j]])
            done = set(finished)
            keep = [j for j in range(len(active)) if j not in done]
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            chosen, next_position = chosen[index], next_position[index]
            active = [active[j] for j in keep]
            if static is None:
                cache.batch_select_indices(index)
                mask = mask[index]
                if offset is not None:
                    offset = offset[index]
            else:
                slots = [slots[j] for j in keep]
                if bucket(len(slots)) < static.b:
                    static.compact(slots)
                    slots = list(range(len(slots)))
                slot_index = torch.tensor(slots, device=device)
        if static is None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            h = adapter.hidden(chosen[:, None], mask, next_position[:, None], cache)[:, -1]
            if offset is not None:
                h = h + offset
            step = DecodeStep(adapter, h)
        else:
            static.feed(slot_index, chosen, next_position)
            h_all, logits_all = static.step()
            h, logits = _rows(h_all, slots, slot_index), _rows(logits_all, slots, slot_index)
            if return_hidden and h.data_ptr() == h_all.data_ptr():
                h = h.clone()  # the static buffer is overwritten by the next step
            step = DecodeStep(adapter, h, logits)
        next_position = next_position + 1

    return Generation(
        tokens=tokens,
        stopped=stopped,
        hidden=[torch.stack(h) for h in hidden] if return_hidden else None,
        prefixes=prefixes,
        prefill_tokens=sum(len(t) for _, t in rows),
    )


def _rows(t: torch.Tensor, slots: list[int], index: torch.Tensor) -> torch.Tensor:
    """Rows ``slots`` of ``t``: a view when they are the first rows in order, else a gathered copy."""
    if slots == list(range(len(slots))):
        return t[: len(slots)]
    return t.index_select(0, index)


def generate(
    model: torch.nn.Module | ModelAdapter,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    sampler: Sampler = "logits",
    return_hidden: bool = False,
    decode: Decode | None = None,
) -> Generation:
    """Generate a continuation for each prompt, all prompts in one left-padded, KV-cached batch.

    Args:
        model: a transformers causal LM, or a :class:`~latentseek.model.ModelAdapter` (pass one when calling many
            times: building it checks the model with a short forward).
        tokenizer: its tokenizer (used for the default stop tokens).
        prompts: token ids per prompt, e.g. from :func:`build_prompt_ids`; each non-empty.
        max_new_tokens: most tokens generated per prompt.
        stop_ids: tokens that end a row (default :func:`stop_token_ids`).
        do_sample: sample with ``temperature`` and ``top_p`` instead of greedy decoding.
        temperature, top_p: the sampling distribution is ``softmax(logits / temperature)`` cut to its smallest
            top-p nucleus.
        seed: sampling seed; row r's draws depend only on ``(seed, r)``, so the same call gives the same samples.
        sampler: ``"logits"`` (from each step's logits) or ``"fused"`` (through the fused LM-head op, without the
            ``[b, V]`` logits); see :func:`sampling_picker`.
        return_hidden: also return the post-norm hidden state behind every generated token.
        decode: ``"eager"``, ``"graph"`` or ``"compiled"`` decode steps (see :func:`extend`); None: the device's
            default.

    Returns:
        a :class:`Generation` (tokens per row, stop token included when produced; ``hidden`` on request).

    Raises:
        ContextLengthError: a prompt plus max_new_tokens exceeds the model's context (:func:`model_context_length`,
            the tokenizer's model_max_length included), checked before any model work; ``problem`` is its index.

    Example::

        ids = build_prompt_ids(tokenizer, "What is 2 + 3?")
        out = generate(model, tokenizer, [ids] * 4, 256, do_sample=True, temperature=0.7, top_p=0.95, seed=1)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    """
    adapter = ModelAdapter.of(model)
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model_context_length(adapter, tokenizer)
    for i, p in enumerate(prompts):
        ContextNeed("prompt", len(p), max_new_tokens, context).check(i, "shorten the prompt or lower max_new_tokens")
    stop = stop_token_ids(tokenizer, adapter) if stop_ids is None else list(stop_ids)
    if do_sample:
        picker = sampling_picker(temperature, top_p, seed, len(prompts), sampler=sampler)
    else:
        check_sampling(1.0, 1.0, sampler)
        picker = greedy_picker()
    return extend(
        adapter,
        [(None, p) for p in prompts],
        max_new_tokens,
        stop,
        picker=picker,
        return_hidden=return_hidden,
        decode=decode,
    )
