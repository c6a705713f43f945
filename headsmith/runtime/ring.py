"""Ring caches: constant-memory KV for layers with a sliding window (and attention sinks).

Letters: B batch, T new tokens, N tokens seen so far, S sinks, W window, C = S + W capacity, R = W - 1.

A layer that sees the first ``S`` keys and the last ``W`` (its own included) never reads more than ``C`` keys,
so its cache entry (``capacity`` in the manifest's cache layout, see ``passes/kv_cache.py``) holds ``C`` slots:

- slots ``0..S-1``: the sinks (tokens ``0..S-1``);
- slots ``S..C-2``: a ring of the ``R`` most recent tokens, token ``t >= S`` in slot ``S + (t - S) % R``;
- slot ``C-1``: scratch for the step's own token, which the decode kernel appends after the cached slots.

Until ``C - 1`` tokens have been seen the slots follow the text (token ``t`` in slot ``t``) and a step appends
as to any cache. From then on every step has one token: the kernel writes it into the scratch slot, attends to
all ``C`` slots (which are exactly the keys the pattern lets it see; keys carry their RoPE positions, and
attention does not depend on their order), and :meth:`Ring.after_step` names the move that puts the token into
the ring slot of the token it evicts. Which token sits in which slot is a function of ``N`` alone
(:meth:`Ring.tokens`), from which :meth:`Ring.mask` builds the layer's key mask (padding included).

Rolling back (speculative decoding's ``truncate``) works until the first eviction; after it, the evicted
tokens are gone and a rollback is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendError
from ..passes.kv_cache import ring_mask_name


@dataclass(frozen=True)
class Ring:
    """The slot plan of one (sinks, window) pattern."""

    sinks: int
    window: int
    name: str
    """The decode graph's key-mask input for the layers with this pattern."""

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def size(self) -> int:
        """Slots of the ring of recent tokens (``W - 1``)."""
        return self.window - 1

    def slots(self, seen: int) -> int:
        """Cached slots after ``seen`` tokens."""
        return min(seen, self.capacity - 1)

    def tokens(self, seen: int) -> np.ndarray:
        """The token index held by each cached slot after ``seen`` tokens (int64, ``slots(seen)`` long)."""
        if seen <= self.capacity - 1:
            return np.arange(seen, dtype=np.int64)
        r = np.arange(self.size, dtype=np.int64)
        first = seen - self.size  # the oldest token still in the ring
        ring = first + (r - (first - self.sinks)) % self.size
        return np.concatenate([np.arange(self.sinks, dtype=np.int64), ring])

    def fits(self, seen: int, new: int) -> int:
        """How many of ``new`` tokens one step may take after ``seen`` (a step never holds more than C keys)."""
        return max(1, min(new, self.capacity - self.slots(seen)))

    def mask(self, attention_mask: np.ndarray, seen: int) -> np.ndarray:
        """The layer's key mask ``[B, slots(seen) + T]`` from the full ``attention_mask[B, seen + T]``."""
        if seen <= self.capacity - 1:
            return attention_mask
        return np.concatenate([attention_mask[:, self.tokens(seen)], attention_mask[:, seen:]], axis=1)

    def after_step(self, seen: int, new: int) -> tuple[int, int] | None:
        """``(src, dst)``: the slot move that files a step's last token into the ring (None: nothing to move).
        ``dst < 0``: the token is dropped (a window of 1 has no ring)."""
        if self.slots(seen) + new < self.capacity:
            return None
        token = seen + new - 1
        dst = self.sinks + (token - self.sinks) % self.size if self.size > 0 else -1
        return self.capacity - 1, dst

    def check_truncate(self, seen: int, length: int) -> None:
        if length < seen and seen > self.capacity - 1:
            raise BackendError(f"cannot roll the cache back to {length} tokens: its ring of {self.window} recent "
                               f"tokens (+{self.sinks} sinks) has already evicted tokens",
                               "roll back before the ring fills, or convert without the window")


def rings_of(entries: Sequence[Any]) -> list[Ring | None]:
    """Per cache entry (manifest dicts or ``CacheEntry``/``CacheSpec`` objects), its ring or None."""
    out: list[Ring | None] = []
    for e in entries:
        get = e.get if isinstance(e, dict) else lambda k, d=0, e=e: getattr(e, k, d)
        capacity = int(get("capacity", 0) or 0)
        if capacity <= 0:
            out.append(None)
            continue
        sinks, window = int(get("sinks", 0)), int(get("window", 0))
        out.append(Ring(sinks, window, ring_mask_name(sinks, window)))
    return out


def distinct(rings: Sequence[Ring | None]) -> list[Ring]:
    """The distinct rings, in the order the decode graph takes their masks."""
    seen: dict[str, Ring] = {}
    for r in rings:
        if r is not None and r.name not in seen:
            seen[r.name] = r
    return list(seen.values())


def step_size(rings: Sequence[Ring | None], seen: int, new: int) -> int:
    """Tokens the next step may take (all ``new`` without rings, or when the cache is empty)."""
    if seen == 0:
        return new
    return min([new] + [r.fits(seen, new) for r in distinct(rings)])


def ring_masks(rings: Sequence[Ring | None], attention_mask: Any, seen: int) -> dict[str, np.ndarray]:
    """The decode graph's ``ring_mask_*`` inputs (int64) for a step after ``seen`` tokens, from the full
    ``attention_mask`` (a numpy array or an int64 torch tensor)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return {r.name: np.ascontiguousarray(r.mask(mask, seen)) for r in distinct(rings)}
