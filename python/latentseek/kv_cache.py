"""The KV cache the engine generates with: a preallocated buffer filled in place, and one sequence's kept prefix.

:class:`PrefixCache` holds the keys and values of one sequence's first tokens; :func:`batch_cache` lays several
prefixes right-aligned into one batch buffer (the layout :mod:`latentseek.generation` describes), and
:func:`take_prefix` copies one row's prefix back out, which is how LatentSeek reuses a prompt's cache for every
optimisation step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .model import ModelAdapter


@dataclass
class PrefixCache:
    """The keys and values of one sequence's first ``length`` tokens: one ``(key, value)`` pair per layer.

    Each tensor is ``[1, kv_heads, length, head_dim]``; the tokens were computed at positions ``0 .. length-1``.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


class _BufferLayer(DynamicLayer):
    """A cache layer that writes new keys and values in place into a preallocated buffer.

    transformers' DynamicLayer concatenates the whole cache for every new token, which copies O(length) memory per
    token (a fifth of a batch-8 decode step on CPU at 300 tokens); here a token costs O(1). ``keys`` / ``values``
    are views of the filled part, as the models expect. :func:`extend` knows the capacity a call needs.

    The buffer (``storage_keys`` / ``storage_values``, ``[rows, kv_heads, capacity, head_dim]``) may have more rows
    than the batch (``rows``): the static decode step of :mod:`latentseek.static_decode` runs a batch-size bucket
    over the first rows, and the extra rows are its padding.
    """

    def __init__(self, capacity: int, rows: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.rows = rows
        self.length = 0

    def allocate(self, batch: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Zeroed buffers for ``max(batch, rows)`` rows, the first ``batch`` in use, with the heads, head size, dtype
        and device of the given tensors."""
        self.dtype, self.device = key_like.dtype, key_like.device
        rows = max(batch, self.rows)
        self.storage_keys = key_like.new_zeros(rows, key_like.shape[1], self.capacity, key_like.shape[3])
        self.storage_values = value_like.new_zeros(rows, value_like.shape[1], self.capacity, value_like.shape[3])
        self._keys, self._values = self.storage_keys[:batch], self.storage_values[:batch]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[0], key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens for a capacity of {self.capacity}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


def new_cache(adapter: ModelAdapter, capacity: int, rows: int = 0) -> Cache:
    """An empty cache of ``capacity`` columns; its buffers get ``max(batch, rows)`` rows on the first forward."""
    return Cache(layers=[_BufferLayer(capacity, rows) for _ in range(adapter.num_layers)])


def batch_cache(
    adapter: ModelAdapter, prefixes: Sequence[PrefixCache | None], columns: int, capacity: int, rows: int = 0
) -> Cache:
    """A cache whose first ``columns`` columns hold each row's prefix right-aligned (zeros, masked out, elsewhere)."""
    cache = new_cache(adapter, capacity, rows)
    like = next(p for p in prefixes if p is not None and p.length > 0)
    for i, layer in enumerate(cache.layers):
        layer.allocate(len(prefixes), *like.layers[i])
        for row, prefix in enumerate(prefixes):
            if prefix is not None and prefix.length > 0:
                key, value = prefix.layers[i]
                layer._keys[row, :, columns - prefix.length : columns] = key[0]
                layer._values[row, :, columns - prefix.length : columns] = value[0]
        layer.length = columns
        layer._expose()
    return cache


def take_prefix(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, row: int, length: int
) -> PrefixCache:
    """Copy the keys and values of the first ``length`` real tokens of batch row ``row``.

    ``layers`` holds each layer's ``(keys, values)`` ``[batch, kv_heads, columns, head_dim]`` and ``mask`` the
    matching ``[batch, columns]`` attention mask (nonzero where a column holds one of the row's tokens).
    """
    columns = mask[row].nonzero()[:length, 0]
    kept = [
        (keys[row : row + 1, :, columns].clone(), values[row : row + 1, :, columns].clone()) for keys, values in layers
    ]
    return PrefixCache(kept, int(columns.numel()))
