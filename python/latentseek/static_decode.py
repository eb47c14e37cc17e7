"""The decode step with static shapes that :func:`latentseek.generation.extend` runs with ``decode="graph"`` (and,
compiled, with ``decode="compiled"``).

The eager decode step is Python-bound on a GPU: a few hundred small kernels per token, each launched from Python.
With every tensor of the step at a fixed shape and address, the step can be captured once in a
``torch.cuda.CUDAGraph`` and replayed per token, one launch. What is static:

- the call's KV buffers (:class:`~latentseek.kv_cache._BufferLayer` storage ``[R, kv_heads, capacity, head_dim]``,
  R the batch size rounded up to its bucket, a power of two), written in place at the column held in a one-element
  device tensor (:class:`_ColumnLayer`);
- ``input_ids`` and ``positions`` ``[R, 1]`` and the attention mask ``[R, capacity]`` (bool), set in place
  between steps; the step attends over all ``capacity`` columns through the mask;
- the bucket b: the step runs rows ``[:b]`` of all these tensors. A row of the bucket that holds no running sequence
  (padding, or a row that stopped) goes on decoding whatever its row holds and its outputs are ignored; nothing in a
  step mixes rows, so it cannot change the running rows. Padding rows see the first row's mask, so that no row
  attends to nothing (which would make NaNs). When the running rows fit a smaller bucket, they move to the front
  rows (:meth:`StaticDecoder.compact`) and the smaller bucket's step runs.

On CUDA each bucket's step is captured on its first use in a call, after one warm-up run on a side stream (as
``torch.cuda.graphs`` asks), and replayed from then on; the graphs of a call share one memory pool and are replayed
in the order they were captured (buckets only shrink). The step is idempotent (it writes the keys and values of the
current column from the current inputs), so the warm-up, the capture and the replay may all run at one column. On
other devices the same step runs uncaptured, which is how its bookkeeping is tested on CPU.

The step attends over the whole buffer (masked columns included), so in float32 its hidden states equal the eager
step's up to the summation order of the attention.

``decode="compiled"`` (CPU only) runs the same step through ``torch.compile`` with inductor's freezing: the model's
weights become constants of the compiled graph, which lets inductor pre-pack them for oneDNN and fuse the small
operations between the GEMMs. The first step of each (model, bucket, buffer size, thread count) compiles, tens of
seconds on a CPU; the buffers have a multiple of :data:`COMPILED_COLUMN_MULTIPLE` columns so that calls with prompts
of about the same length reuse one compiled step. Weights changed after the first compile are not seen (LatentSeek
never changes them). Opt-in: what it gains on a CPU is in the README ("Decode speed").
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .model import ModelAdapter

#: How :func:`~latentseek.generation.extend` runs its decode steps: ``"eager"`` (a forward per token over the filled
#: part of the cache, rows leaving the batch as they stop), ``"graph"`` (this module's static step, captured in
#: CUDA graphs on CUDA) or ``"compiled"`` (the static step through ``torch.compile``, CPU only).
Decode = Literal["eager", "graph", "compiled"]
DECODES: tuple[Decode, ...] = get_args(Decode)

# The attention implementations whose masks the static step builds (a 4D bool mask for sdpa, additive for eager).
_ATTENTION = ("sdpa", "eager")


#: Device types on which ``decode="graph"`` is the default. Empty until the CUDA capture has run on a GPU
#: (tests/test_generation.py on CUDA, benchmarks/bench_loop.py --device cuda); then "cuda" goes here.
GRAPH_BY_DEFAULT: frozenset[str] = frozenset()


def default_decode(device: torch.device | str) -> Decode:
    """The decode path of a call that names none: "graph" on the device types in :data:`GRAPH_BY_DEFAULT`, else
    "eager" (the reference, and the CPU default: uncaptured, the static step only adds work there)."""
    return "graph" if torch.device(device).type in GRAPH_BY_DEFAULT else "eager"


#: The static step's buffers have a multiple of this many columns, so that each row of the attention mask starts at
#: an aligned address (sdpa's memory-efficient kernel pads a mask whose rows are not).
COLUMN_MULTIPLE = 16
#: The compiled step's buffers have a multiple of this many columns: each buffer size is a compile of its own.
COMPILED_COLUMN_MULTIPLE = 256
#: The most compiles of the step (all models, buckets, buffer sizes and thread counts of a process together).
COMPILED_STEP_LIMIT = 64


def static_capacity(columns: int, decode: Decode = "graph") -> int:
    """The columns of the static step's buffers for a call that needs ``columns``."""
    multiple = COMPILED_COLUMN_MULTIPLE if decode == "compiled" else COLUMN_MULTIPLE
    return -(-columns // multiple) * multiple


def check_decode(decode: str) -> Decode:
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    return decode  # type: ignore[return-value]


def bucket(n: int) -> int:
    """The batch-size bucket of ``n`` rows: the smallest power of two >= n."""
    if n < 1:
        raise ValueError(f"bucket needs at least one row, got {n}")
    return 1 << (n - 1).bit_length()


def check_graph_support(adapter: ModelAdapter, decode: Decode = "graph") -> None:
    """Raise ValueError unless the static step can run ``adapter``'s model: every layer full attention (the step's
    mask has no sliding window), through sdpa or eager attention (the masks it builds); ``decode="compiled"`` on the
    CPU only."""
    if decode == "compiled" and adapter.device.type != "cpu":
        raise ValueError(
            f"decode='compiled' runs on the CPU only (the device it was measured on); the model is on "
            f"{adapter.device.type}: use decode='graph' or 'eager'"
        )
    config = adapter.model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    attention = getattr(text, "_attn_implementation", None) or "eager"
    if attention not in _ATTENTION:
        raise ValueError(
            f"decode='graph' builds masks for attention implementations {_ATTENTION}, but the model uses "
            f"{attention!r}; load it with attn_implementation='sdpa' or use decode='eager'"
        )
    layer_types = getattr(text, "layer_types", None)
    sliding = (
        [t for t in layer_types if t != "full_attention"]
        if layer_types is not None
        else ([] if getattr(text, "sliding_window", None) is None else ["sliding_attention"])
    )
    if sliding:
        raise ValueError(
            f"decode='graph' supports models whose layers all use full attention, but this one has {sorted(set(sliding))} "
            "layers; use decode='eager'"
        )


class _ColumnLayer(CacheLayerMixin):
    """Rows ``[:b]`` of one layer's KV buffers, written at the column in a device tensor (no Python state per step)."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a _ColumnLayer is built over existing buffers")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class StaticDecoder:
    """The static tensors of one call's decode steps, and the step of each batch-size bucket.

    Built after the prefill, from the call's cache (whose buffers have R rows), its ``[n, columns]`` mask, and the
    rows' ``[n, H]`` offsets when the call has them (added to each hidden state before the LM head, see
    :func:`~latentseek.generation.extend`; a static buffer that moves with its rows), and the call's ``decode``
    (``"graph"``, or ``"compiled"`` to run the step through :func:`_compiled_step`).
    Use: :meth:`feed` the running rows' tokens and positions, :meth:`step`, read the returned ``[b, H]`` hidden
    states and ``[b, V]`` logits (static buffers on CUDA: overwritten by the next step), :meth:`compact` when rows
    stop.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: Cache,
        mask: torch.Tensor,
        offset: torch.Tensor | None = None,
        decode: Decode = "graph",
    ) -> None:
        check_graph_support(adapter, decode)
        self.compiled = decode == "compiled"
        self.adapter = adapter
        self.kv = [(layer.storage_keys, layer.storage_values) for layer in cache.layers]
        rows, _, capacity, _ = self.kv[0][0].shape
        n, self.filled = mask.shape
        device = adapter.device
        self.mask = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.mask[:n, : self.filled] = mask.bool()
        self.mask[n:] = self.mask[0]
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.column = torch.full((1,), self.filled, dtype=torch.long, device=device)
        self.offset = None
        if offset is not None:
            self.offset = torch.zeros(rows, offset.shape[1], dtype=offset.dtype, device=device)
            self.offset[:n] = offset
        self.b = bucket(n)
        text = adapter.model.config
        text = text.get_text_config(decoder=True) if hasattr(text, "get_text_config") else text
        self.additive_mask = (getattr(text, "_attn_implementation", None) or "eager") == "eager"
        self.capture = device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def filled_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values over the filled columns, all rows (for take_prefix with :attr:`filled_mask`)."""
        return [(k[:, :, : self.filled], v[:, :, : self.filled]) for k, v in self.kv]

    @property
    def filled_mask(self) -> torch.Tensor:
        return self.mask[:, : self.filled]

    def feed(self, rows: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Set the next input of physical rows ``rows`` (int64 ``[k]`` on the device): token and position ``[k]``."""
        self.input_ids.index_copy_(0, rows, tokens[:, None])
        self.positions.index_copy_(0, rows, positions[:, None])

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run bucket b's step at the next column: ``(hidden [b, H], logits [b, V])`` of its last (only) position."""
        if self.filled >= self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.filled + 1} tokens for a capacity of {self.capacity}")
        self.mask[: self.b, self.filled] = True
        self.column.fill_(self.filled)
        if self.capture:
            out = self._replay(self.b)
        elif self.compiled:
            out = _compiled_step(self, self.b)
        else:
            out = self._forward(self.b)
        self.filled += 1
        return out

    def compact(self, rows: list[int]) -> None:
        """Move physical rows ``rows`` (the running ones, in their order) to rows ``0 .. k-1``; the bucket becomes
        ``bucket(k)``. Rows from k on keep what they held (a valid sequence, decoded on and ignored)."""
        k = len(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for keys, values in self.kv:
            keys[:k, :, : self.filled] = keys[index, :, : self.filled]
            values[:k, :, : self.filled] = values[index, :, : self.filled]
        for t in (self.mask, self.input_ids, self.positions, self.offset):
            if t is not None:
                t[:k] = t[index]
        self.b = bucket(k)

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = Cache(layers=[_ColumnLayer(k[:b], v[:b], self.column) for k, v in self.kv])
        mask = self.mask[:b, None, None, :]
        if self.additive_mask:
            mask = torch.where(mask, 0.0, torch.finfo(self.adapter.dtype).min).to(self.adapter.dtype)
        h = self.adapter.hidden(self.input_ids[:b], mask, self.positions[:b], cache)[:, -1]
        if self.offset is not None:
            h = h + self.offset[:b]
        return h, self.adapter.logits(h)

    def _replay(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if b not in self.graphs:
            side = torch.cuda.Stream(device=self.mask.device)
            side.wait_stream(torch.cuda.current_stream(self.mask.device))
            with torch.cuda.stream(side):
                self._forward(b)  # warm-up: lazy initialisation happens outside the capture
            torch.cuda.current_stream(self.mask.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b)
            self.graphs[b] = (graph, out)
        graph, out = self.graphs[b]
        graph.replay()
        return out


def _compiled_step(decoder: StaticDecoder, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket b's step through the compiled forward. Inductor reads ``freezing`` from the config in force when a step
    compiles: passed as ``torch.compile(options={"freezing": True})`` it was not applied in torch 2.13 (the step ran
    at the unfrozen step's speed).

    Each (model, bucket, buffer size, thread count) is a compile of its own (torch guards on the thread count too),
    so the step allows :data:`COMPILED_STEP_LIMIT` of them instead of torch's default 8, past which torch would run
    the step uncompiled with a warning."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True), dynamo_config.patch(recompile_limit=COMPILED_STEP_LIMIT):
        return _compiled_forward()(decoder, b)


@functools.cache
def _compiled_forward():
    """:meth:`StaticDecoder._forward` through ``torch.compile``, weights frozen (made once, on first use)."""
    return torch.compile(StaticDecoder._forward, dynamic=False)
