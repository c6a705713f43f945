"""KV-cache eviction policies (``kv-evict``): which cached tokens each KV head keeps, decided from the data.

Letters: B batch, G score heads (a layer's KV heads; 1 for a latent cache), S prompt tokens, K kept tokens,
w the observation window, R the recent tokens H2O protects.

The prefill graph of an artifact with a policy also returns, per layer, ``scores_layer{L}[B, G, S]``: the
attention of the last ``w`` prompt queries to every prompt key, softmax over the keys, summed over those queries
and averaged over the query heads of each KV head (GQA-aware; ``passes/kv_scores.py`` builds it). With ``h2o``
the decode graph also returns the step's attention ``[B, G, P + T]`` the same way. From these, per KV head:

- ``snapkv`` (Li et al., 2024): the prompt keys outside the window are ranked by their scores smoothed over
  positions (``pool`` over ``kernel`` neighbours, so a selected token brings its neighbours, as in the paper's
  clustering); the top ``K - w`` and the whole window are kept. Decode then appends as to any cache.
- ``h2o`` (Zhang et al., 2023): heavy hitters. Each cached token carries its accumulated attention (seeded by the
  window's scores, then every decode step adds its own); the cache holds ``K`` tokens for the whole generation:
  the ``R`` most recent always, the others by accumulated attention, and once it is full every step evicts the
  token with the least (one token's copy per head and step), so memory stays flat however long the text runs.
- ``random``: the window and ``K - w`` prompt tokens drawn uniformly (seeded): the baseline every method must beat.

Kept tokens stay in text order per head (ascending indices), so in a left-padded batch a row with fewer real
tokens than ``K`` keeps the same number of padding slots first in every head and layer: one key mask per row
(``[B, K]``) still describes every head. Keys are cached after RoPE at their text positions, and queries keep
theirs, so a compacted cache is attended exactly as the masked full cache with the evicted keys hidden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

METHODS = ("snapkv", "h2o", "random")
POOLS = ("avg", "max")


@dataclass(frozen=True)
class KvPolicy:
    """One eviction policy (the ``kv-evict`` pass's options; recorded in the manifest as ``kv_policy``)."""

    method: str = "snapkv"
    budget: float = 0.25
    """The fraction of the prompt's KV kept (ignored when ``tokens`` is set)."""
    tokens: int = 0
    """A fixed number of cached tokens instead of a fraction (h2o: the cache size for the whole generation)."""
    window: int = 32
    """The observation window: the last prompt queries whose attention scores the keys (snapkv, random: always
    kept)."""
    kernel: int = 7
    """snapkv: positions pooled around each score (1: none)."""
    pool: str = "max"
    recent: int = 32
    """h2o: the most recent tokens, always kept."""
    seed: int = 0
    """random: the draw."""
    keep: int = 0
    """snapkv, random: the last prompt tokens always kept (0: the whole observation window); fewer than the window
    lets a long window score the keys without taking that much of the budget."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown kv-evict method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget is the fraction of the prompt's KV kept, in (0, 1]; got {self.budget}")
        if self.tokens < 0 or self.window < 1 or self.recent < 0:
            raise ValueError("tokens must be >= 0 (0: use budget), window >= 1, recent >= 0")
        if not 0 <= self.keep <= self.window:
            raise ValueError(f"keep is how many of the window's {self.window} tokens are always kept, in "
                             f"[0, window] (0: all); got {self.keep}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel is an odd number of positions >= 1, got {self.kernel}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {', '.join(POOLS)}")
        if self.tokens and self.tokens <= self.protected:
            raise ValueError(f"tokens={self.tokens} must exceed the {self.protected} tokens the policy always "
                             f"keeps ({'recent' if self.method == 'h2o' else 'window'})")

    @property
    def protected(self) -> int:
        """Tokens kept whatever their scores: h2o's recent tokens, the others' observation window (or its last
        ``keep``)."""
        return self.recent if self.method == "h2o" else (self.keep or self.window)

    @property
    def decode_scores(self) -> bool:
        """Whether the decode graph returns the step's attention (h2o accumulates it)."""
        return self.method == "h2o"

    def kept(self, prompt: int) -> int:
        """Cached tokens kept after a prompt of ``prompt`` tokens (all of them when it fits the budget)."""
        n = self.tokens if self.tokens else math.ceil(self.budget * prompt)
        return min(prompt, max(n, self.protected + 1))

    def capacity(self, prompt: int) -> int:
        """h2o: the tokens the cache holds for the whole generation (0: it grows, the other methods)."""
        if self.method != "h2o":
            return 0
        return self.tokens if self.tokens else max(math.ceil(self.budget * prompt), self.recent + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> KvPolicy:
        return KvPolicy(**{k: d[k] for k in KvPolicy.__dataclass_fields__ if k in d})


def pool_positions(scores: np.ndarray, kernel: int, how: str) -> np.ndarray:
    """``scores[..., S]`` smoothed over ``kernel`` neighbouring positions (edges padded as ``avg_pool1d`` with
    ``count_include_pad`` / ``max_pool1d`` do: zeros for avg, -inf for max)."""
    if kernel <= 1:
        return scores
    half = kernel // 2
    pad = [(0, 0)] * (scores.ndim - 1) + [(half, half)]
    padded = np.pad(scores, pad, constant_values=0.0 if how == "avg" else -np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
    return windows.mean(-1) if how == "avg" else windows.max(-1)


def rank_prompt(policy: KvPolicy, scores: np.ndarray, valid: np.ndarray, layer: int = 0) -> np.ndarray:
    """The keep priority ``[B, G, S]`` of every prompt token (higher first; +inf: always kept, -inf: padding)."""
    b, g, s = scores.shape
    w = min(policy.protected, s)
    if policy.method == "snapkv":
        rank = np.concatenate([pool_positions(scores[..., : s - w], policy.kernel, policy.pool),
                               np.full((b, g, w), np.inf, dtype=scores.dtype)], -1)
    elif policy.method == "h2o":
        rank = scores.astype(np.float64, copy=True)
        rank[..., s - w:] = np.inf
    else:
        rng = np.random.default_rng([policy.seed, layer])
        rank = rng.random((b, g, s))
        rank[..., s - w:] = np.inf
    rank = np.where(valid[:, None, :], rank, -np.inf)
    return rank


def select_prompt(policy: KvPolicy, scores: np.ndarray, valid: np.ndarray, keep: int, layer: int = 0
                  ) -> np.ndarray:
    """The indices ``[B, G, keep]`` (ascending) of the prompt tokens each head keeps (see the module docstring)."""
    rank = rank_prompt(policy, scores, valid, layer)
    s = rank.shape[-1]
    if keep >= s:
        return np.broadcast_to(np.arange(s), rank.shape).copy()
    # stable: among equal ranks (padding) the earlier token wins, so padding comes first in every head
    order = np.argsort(-rank, axis=-1, kind="stable")[..., :keep]
    return np.sort(order, axis=-1)


def kept_mask(valid: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The key mask ``[B, K]`` of a compacted cache (``index[B, G, K]`` from :func:`select_prompt`); every head
    of a row keeps the same padding slots, checked here."""
    kept = np.take_along_axis(np.broadcast_to(valid[:, None, :], (*index.shape[:2], valid.shape[1])), index, -1)
    if not (kept == kept[:, :1]).all():
        raise AssertionError("heads of one row kept different padding slots")
    return kept[:, 0]


@dataclass
class HeavyHitters:
    """H2O's state for one layer: per slot and head the accumulated attention and the token's text index."""

    scores: np.ndarray
    """``[B, G, slots]`` accumulated attention."""
    tokens: np.ndarray
    """``[B, G, slots]`` the text index each slot holds (int64)."""

    def add(self, step: np.ndarray, new_tokens: np.ndarray) -> None:
        """A decode step's attention ``[B, G, slots + T]`` over the cached slots and its ``T`` new tokens
        (``new_tokens[T]``: their text indices, appended after the slots)."""
        b, g, _ = self.scores.shape
        t = len(new_tokens)
        self.scores = np.concatenate([self.scores, np.zeros((b, g, t), self.scores.dtype)], -1) + step
        self.tokens = np.concatenate([self.tokens, np.broadcast_to(new_tokens, (b, g, t))], -1)

    def victims(self, valid: np.ndarray, recent: int, seen: int) -> np.ndarray:
        """The slot ``[B, G]`` each head evicts: the least accumulated attention among the valid slots older than
        the ``recent`` last tokens of the ``seen`` so far (padding slots are never chosen: they stay masked)."""
        protect = (self.tokens >= seen - recent) | ~valid[:, None, :]
        return np.where(protect, np.inf, self.scores).argmin(-1)

    def move(self, victims: np.ndarray) -> None:
        """The last slot (the step's token) replaces each head's victim; the cache is one slot shorter."""
        last = self.scores.shape[-1] - 1
        for arr in (self.scores, self.tokens):
            np.put_along_axis(arr, victims[..., None], arr[..., last:], -1)
        self.scores, self.tokens = self.scores[..., :last], self.tokens[..., :last]
