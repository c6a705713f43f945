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
tokens (speculative decoding's rollback; free in place). A speculative draft's step writes only the entries of
the layers it runs (``commit(t, entries)``); the runtime truncates its tokens away before the verify step.

Entries with a ring (a sliding window, see ``ring.py``) keep a fixed ``S + W`` slots in either layout and never
grow: ``length`` counts the tokens seen, ``tokens(i)`` the slots entry ``i`` holds. After a step that fills the
scratch slot, :meth:`KVCache.commit` files the new token into its ring slot (in place: one token's copy;
ping-pong: the ``C - 1`` kept slots are also compacted into the other buffer, the next step's past).

A KV-eviction policy (``runtime/eviction.py``) keeps only some tokens: :meth:`KVCache.compact` after the prompt,
:meth:`KVCache.evict_last` after a decode step (h2o); ``length`` is then the tokens held, not those seen.

After a pruned prefill (``prefill-prune``, ``pruned_prefill.py``, :meth:`KVCache.store_pruned`) the entries of a
later stage never held the prompt tokens that stage dropped: ``length`` counts the text, ``tokens(i)`` what
entry ``i`` holds, and :meth:`KVCache.stage_masks` gives those layers' key masks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .pruned_prefill import PrunedPrompt, mask_names, stage_masks
from .ring import Ring, rings_of


@dataclass
class CacheSpec:
    name: str
    shape: tuple[int, ...]
    """``-1`` for batch (dim 0) and sequence (``seq_dim``)."""
    seq_dim: int
    sinks: int = 0
    window: int = 0
    capacity: int = 0
    """Slots of a ring cache (0: grows with the text)."""
    stage: int = 0
    """Its layer's pruned prefill stage (``prefill-prune``; 0: it holds every prompt token)."""

    @staticmethod
    def from_manifest(entries: list[dict[str, Any]]) -> list[CacheSpec]:
        return [CacheSpec(e["name"], tuple(e["shape"]), int(e["seq_dim"]), int(e.get("sinks", 0)),
                          int(e.get("window", 0)), int(e.get("capacity", 0)), int(e.get("stage", 0)))
                for e in entries]


@dataclass
class KVCache:
    """Ping-pong or in-place preallocated buffers for every cache entry (see the module docstring)."""

    specs: list[CacheSpec]
    batch: int
    capacity: int = 256
    dtype: Any = np.float32
    length: int = 0
    """Tokens seen."""
    in_place: bool = False
    bindings: dict[Any, Any] = field(default_factory=dict, repr=False)
    """An engine's bindings of the buffers per graph (in place they stay valid from step to step until a
    growth)."""
    rings: list[Ring | None] = field(default_factory=list, repr=False)
    scores: list[np.ndarray] | None = field(default=None, repr=False)
    """The last step's eviction scores (``[B, G, keys]`` per layer), from graphs that return them (``kv-evict``)."""
    pruned: PrunedPrompt | None = field(default=None, repr=False)
    """What a pruned prefill kept (``prefill-prune``); None: every entry holds the whole prompt."""
    _dropped: list[int] = field(default_factory=list, repr=False)
    """Per entry, prompt tokens it never held (a pruned prefill's later stages)."""
    _buffers: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    _current: list[int] = field(default_factory=list, repr=False)
    _behind: list[int] = field(default_factory=list, repr=False)
    """Per entry, tokens it lacks after steps that wrote only other entries (a draft's, see ``commit``)."""

    def __post_init__(self) -> None:
        self.rings = rings_of(self.specs)
        self._current = [0] * len(self.specs)
        self._behind = [0] * len(self.specs)
        self._dropped = [0] * len(self.specs)
        self._allocate(self.capacity)

    def shape_for(self, spec: CacheSpec, tokens: int) -> tuple[int, ...]:
        return tuple(self.batch if i == 0 else tokens if i == spec.seq_dim else d for i, d in enumerate(spec.shape))

    def tokens(self, i: int, seen: int | None = None) -> int:
        """Slots entry ``i`` holds after ``seen`` tokens (default: now)."""
        seen = self.length - self._behind[i] if seen is None else seen
        ring = self.rings[i]
        return ring.slots(seen) if ring is not None else seen - self._dropped[i]

    def _slots(self, i: int, capacity: int) -> int:
        ring = self.rings[i]
        return ring.capacity if ring is not None else capacity

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        if self.in_place:
            self._buffers = [[np.zeros(self.shape_for(s, self._slots(i, capacity)), dtype=self.dtype)]
                             for i, s in enumerate(self.specs)]
            return
        self._buffers = [[np.empty(int(np.prod(self.shape_for(s, self._slots(i, capacity)))), dtype=self.dtype)
                          for _ in range(2)] for i, s in enumerate(self.specs)]

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
        """The current cache: contiguous views ``[B, H, tokens(i), D]`` (in place: the whole
        ``[B, H, capacity, D]`` buffers, of which the first ``tokens(i)`` slots are valid)."""
        if self.in_place:
            return [pair[0] for pair in self._buffers]
        return [self._view(i, self._current[i], self.tokens(i)) for i in range(len(self.specs))]

    def present_views(self, new_tokens: int) -> list[np.ndarray]:
        """Where a step writes ``tokens(i) + new_tokens`` slots of present cache (grows if needed); in place,
        the same whole buffers as ``past()``. A ring entry must have room (see ``ring.step_size``)."""
        need = self.length + new_tokens
        if need > self.capacity and any(r is None for r in self.rings):
            self._grow(max(need, 2 * self.capacity))
        for i, ring in enumerate(self.rings):
            if ring is not None and self.tokens(i) + new_tokens > ring.capacity:
                raise ValueError(f"a step of {new_tokens} tokens does not fit the ring of {self.specs[i].name} "
                                 f"({self.tokens(i)} of {ring.capacity} slots used)")
        if self.in_place:
            return [pair[0] for pair in self._buffers]
        return [self._view(i, 1 - self._current[i], self.tokens(i) + new_tokens) for i in range(len(self.specs))]

    def valid(self) -> list[np.ndarray]:
        """The slots every entry holds (views; ring entries in slot order, see ``ring.py``)."""
        return [self._view(i, self._current[i], self.tokens(i)) for i in range(len(self.specs))]

    def commit(self, new_tokens: int, entries: list[int] | None = None) -> None:
        """The step wrote its present into ``present_views``: make it the past (ring entries file the new token
        into its slot). ``entries``: the step wrote only these (a speculative draft's layers); the others lack
        its tokens (``tokens(i)`` counts what they hold) until ``truncate`` cuts every entry back."""
        for i, ring in enumerate(self.rings):
            if entries is not None and i not in entries:
                self._behind[i] += new_tokens
                continue
            move = ring.after_step(self.length, new_tokens) if ring is not None else None
            if self.in_place:
                if move is not None and move[1] >= 0:
                    buf = self._buffers[i][0]
                    buf[self._slot_index(i, move[1])] = buf[self._slot_index(i, move[0])]
                continue
            if move is None:
                self._current[i] = 1 - self._current[i]
                continue
            assert ring is not None
            present = self._view(i, 1 - self._current[i], ring.capacity)
            if move[1] >= 0:
                present[self._slot_index(i, move[1])] = present[self._slot_index(i, move[0])]
            # the next past is the first C-1 slots, contiguous: compact them into the other buffer
            np.copyto(self._view(i, self._current[i], ring.capacity - 1), self._tokens(present, i, ring.capacity - 1))
        self.length += new_tokens

    def _slot_index(self, i: int, slot: int) -> tuple[Any, ...]:
        index: list[Any] = [slice(None)] * len(self.specs[i].shape)
        index[self.specs[i].seq_dim] = slice(slot, slot + 1)
        return tuple(index)

    def store(self, presents: list[np.ndarray]) -> None:
        """Copy presents ``[B, H, P+T, D]`` produced elsewhere (an engine without IO binding, or a prefill
        graph that returns compact presents) into the buffers. Ring entries take a prompt (``P == 0``) of any
        length and keep the slots their ring holds after it."""
        new = presents[0].shape[self.specs[0].seq_dim] - self.tokens(0)
        if self.length != 0 and any(r is not None for r in self.rings):
            raise ValueError("ring caches store a prompt into an empty cache only")
        if any(r is None for r in self.rings) and self.length + new > self.capacity:
            self._grow(max(self.length + new, 2 * self.capacity))
        for i, value in enumerate(presents):
            ring = self.rings[i]
            if ring is not None:
                value = np.take(value, ring.tokens(new), axis=self.specs[i].seq_dim)
            np.copyto(self._view(i, 1 - self._current[i], value.shape[self.specs[i].seq_dim]), value)
            if not self.in_place:
                self._current[i] = 1 - self._current[i]
        self.length += new

    def store_pruned(self, presents: list[np.ndarray], pruned: PrunedPrompt) -> None:
        """Store a pruned prefill's presents into an empty cache: a later stage's entries hold fewer prompt
        tokens (the first entry, layer 0's, holds them all)."""
        if self.length != 0 or presents[0].shape[self.specs[0].seq_dim] != pruned.width:
            raise ValueError("a pruned prompt goes into an empty cache whose first entry holds the whole prompt")
        self._dropped = [pruned.width - int(v.shape[s.seq_dim]) for v, s in zip(presents, self.specs)]
        self.pruned = pruned
        self.store(presents)

    def stage_masks(self, attention_mask: Any) -> dict[str, np.ndarray]:
        """The decode graph's ``prune_mask_stage*`` inputs for a step with the full ``attention_mask``."""
        names = mask_names(s.stage for s in self.specs)
        return stage_masks(names, self.pruned, attention_mask) if names else {}

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (ping-pong: a copy into the other buffer, then swap; in place:
        the later slots are simply overwritten by the next step). Refused once a ring has evicted tokens."""
        if length >= self.length:
            return
        if self.pruned is not None and length < self.pruned.width:
            raise ValueError(f"a pruned prompt of {self.pruned.width} tokens cannot be cut to {length}")
        for ring in self.rings:
            if ring is not None:
                ring.check_truncate(self.length, length)
        for i, behind in enumerate(self._behind):
            if self.length - behind < length:
                raise ValueError(f"cache entry {self.specs[i].name} holds {self.length - behind} tokens, fewer than "
                                 f"the {length} to keep")
        if not self.in_place:
            for i in range(len(self.specs)):
                np.copyto(self._view(i, 1 - self._current[i], self.tokens(i, length)),
                          self._tokens(self._view(i, self._current[i], self.tokens(i)), i, self.tokens(i, length)))
                self._current[i] = 1 - self._current[i]
        self.length = length
        self._behind = [0] * len(self.specs)

    def copy(self) -> KVCache:
        """An independent copy (its own buffers, no engine bindings): one prefilled prompt, several continuations."""
        twin = dataclasses.replace(self, bindings={}, capacity=0)  # capacity 0: __post_init__ allocates nothing big
        twin._buffers = [[b.copy() for b in pair] for pair in self._buffers]
        twin.capacity, twin.length = self.capacity, self.length
        twin._current, twin._behind, twin._dropped = list(self._current), list(self._behind), list(self._dropped)
        twin.pruned = None if self.pruned is None else self.pruned.copy()
        twin.scores = None if self.scores is None else [s.copy() for s in self.scores]
        return twin

    def compact(self, index: list[np.ndarray]) -> None:
        """Keep, per entry, the slots ``index[i]`` (indices along the sequence, broadcastable against the entry as
        ``np.take_along_axis`` takes them): a KV-eviction policy's choice (``runtime/eviction.py``). The cache then
        holds that many tokens (``length``), in that order."""
        if any(r is not None for r in self.rings) or self.pruned is not None:
            raise ValueError("ring caches and pruned prompts keep their own slots; they are not compacted")
        kept = [np.take_along_axis(v, ix, self.specs[i].seq_dim) for i, (v, ix) in enumerate(zip(self.valid(), index))]
        self.length, self._behind = 0, [0] * len(self.specs)
        self.store(kept)

    def evict_last(self, victims: list[np.ndarray]) -> None:
        """Each entry's last slot (the step's token) moves into the slot ``victims[i]`` names per row (``[B]``)
        or per row and head (``[B, H]``); the cache is one token shorter (in place: one token's copy)."""
        last = self.length - 1
        for i, victim in enumerate(victims):
            arr = self._view(i, self._current[i], self.length)
            move_slot(arr, self.specs[i].seq_dim, victim, last)
            if not self.in_place:  # the next past is the first ``last`` slots, contiguous in the other buffer
                np.copyto(self._view(i, 1 - self._current[i], last), self._tokens(arr, i, last))
                self._current[i] = 1 - self._current[i]
        self.length = last

    def _grow(self, capacity: int) -> None:
        old = self.valid()
        old_current = list(self._current)
        self._allocate(capacity)
        self._current = old_current
        for i, value in enumerate(old):
            np.copyto(self._view(i, self._current[i], self.tokens(i)), value)

    def nbytes(self) -> int:
        return sum(b.nbytes for pair in self._buffers for b in pair)


def move_slot(arr: Any, seq_dim: int, victim: Any, last: int) -> None:
    """``arr[..., victim, ...] = arr[..., last, ...]`` along ``seq_dim`` (1 or 2), per row (``victim[B]``) or per row
    and head (``victim[B, H]``, ``seq_dim == 2``); numpy arrays and torch tensors alike."""
    rows = np.arange(arr.shape[0])
    if seq_dim == 2 and np.ndim(victim) == 2:
        b, h = np.indices(np.shape(victim))
        arr[b, h, np.asarray(victim)] = arr[b, h, last]
    elif seq_dim == 2:
        arr[rows, :, np.asarray(victim)] = arr[rows, :, last]
    elif seq_dim == 1:
        arr[rows, np.asarray(victim)] = arr[rows, last]
    else:
        raise ValueError(f"cannot evict along dim {seq_dim}")
