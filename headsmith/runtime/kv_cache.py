"""The KV-cache manager: preallocated buffers the engines read their past from and write their present to.

Two layouts:

- **ping-pong** (default): each cache entry (per layer: K and V, or an MLA latent) owns two flat buffers with
  room for ``capacity`` tokens. A decode step reads the past as a contiguous ``[B, H, P, D]`` view of one
  buffer and writes the present ``[B, H, P+T, D]`` into the other (onnxruntime binds both with IO binding, so
  nothing is allocated per step); then the roles swap. The graph copies the past into the present.
- **in place** (``in_place=True``): each entry owns one ``[B, H, capacity, D]`` buffer, bound as both the past
  and the present of a kernel that appends the new tokens itself (onnxruntime's ``GroupQueryAttention`` with a
  shared buffer): a step writes only its T new tokens and reads the first ``P+T``; nothing is copied.

Growing past the capacity reallocates at twice the size (a copy, amortised); ``truncate`` drops the last
tokens (speculative decoding's rollback; free in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CacheSpec:
    name: str
    shape: tuple[int, ...]
    """``-1`` for batch (dim 0) and sequence (``seq_dim``)."""
    seq_dim: int

    @staticmethod
    def from_manifest(entries: list[dict[str, Any]]) -> list[CacheSpec]:
        return [CacheSpec(e["name"], tuple(e["shape"]), int(e["seq_dim"])) for e in entries]


@dataclass
class KVCache:
    """Ping-pong preallocated buffers for every cache entry (see the module docstring)."""

    specs: list[CacheSpec]
    batch: int
    capacity: int = 256
    dtype: Any = np.float32
    length: int = 0
    in_place: bool = False
    binding: Any = field(default=None, repr=False)
    """An engine's bindings of the buffers (in place they stay valid from step to step until a growth)."""
    _buffers: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    _current: int = 0

    def __post_init__(self) -> None:
        self._allocate(self.capacity)

    def shape_for(self, spec: CacheSpec, tokens: int) -> tuple[int, ...]:
        return tuple(self.batch if i == 0 else tokens if i == spec.seq_dim else d for i, d in enumerate(spec.shape))

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        if self.in_place:
            self._buffers = [[np.zeros(self.shape_for(s, capacity), dtype=self.dtype)] for s in self.specs]
            return
        self._buffers = [[np.empty(int(np.prod(self.shape_for(s, capacity))), dtype=self.dtype) for _ in range(2)]
                         for s in self.specs]

    def _tokens(self, array: np.ndarray, i: int, tokens: int) -> np.ndarray:
        index = [slice(None)] * array.ndim
        index[self.specs[i].seq_dim] = slice(0, tokens)
        return array[tuple(index)]

    def _view(self, i: int, which: int, tokens: int) -> np.ndarray:
        if self.in_place:  # a strided view of the first ``tokens`` slots of the one buffer (``which`` unused)
            return self._tokens(self._buffers[i][0], i, tokens)
        shape = self.shape_for(self.specs[i], tokens)
        return self._buffers[i][which][: int(np.prod(shape))].reshape(shape)

    def past(self) -> list[np.ndarray]:
        """The current cache: contiguous views ``[B, H, length, D]`` (in place: the whole
        ``[B, H, capacity, D]`` buffers, of which the first ``length`` slots are valid)."""
        if self.in_place:
            return [pair[0] for pair in self._buffers]
        return [self._view(i, self._current, self.length) for i in range(len(self.specs))]

    def present_views(self, new_tokens: int) -> list[np.ndarray]:
        """Where a step writes ``length + new_tokens`` tokens of present cache (grows if needed); in place,
        the same whole buffers as ``past()``."""
        need = self.length + new_tokens
        if need > self.capacity:
            self._grow(max(need, 2 * self.capacity))
        if self.in_place:
            return [pair[0] for pair in self._buffers]
        return [self._view(i, 1 - self._current, need) for i in range(len(self.specs))]

    def valid(self) -> list[np.ndarray]:
        """The first ``length`` tokens of every entry (views)."""
        return [self._view(i, self._current, self.length) for i in range(len(self.specs))]

    def commit(self, new_tokens: int) -> None:
        """The step wrote its present into ``present_views``: make it the past."""
        self.length += new_tokens
        if not self.in_place:
            self._current = 1 - self._current

    def store(self, presents: list[np.ndarray]) -> None:
        """Copy presents ``[B, H, P+T, D]`` produced elsewhere (an engine without IO binding, or a prefill
        graph that returns compact presents) into the buffers."""
        new = presents[0].shape[self.specs[0].seq_dim] - self.length
        self.present_views(new)  # grows if needed
        for i, value in enumerate(presents):
            np.copyto(self._view(i, 1 - self._current, self.length + new), value)
        self.commit(new)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (ping-pong: a copy into the other buffer, then swap; in place:
        the later slots are simply overwritten by the next step)."""
        if length >= self.length:
            return
        if self.in_place:
            self.length = length
            return
        for i in range(len(self.specs)):
            np.copyto(self._view(i, 1 - self._current, length), self._tokens(self._view(i, self._current, self.length),
                                                                              i, length))
        self.length = length
        self._current = 1 - self._current

    def _grow(self, capacity: int) -> None:
        old = self.valid()
        old_current = self._current
        self._allocate(capacity)
        self._current = old_current
        for i, value in enumerate(old):
            np.copyto(self._view(i, self._current, self.length), value)

    def nbytes(self) -> int:
        return sum(b.nbytes for pair in self._buffers for b in pair)
