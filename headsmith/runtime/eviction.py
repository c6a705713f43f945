"""KV eviction in the runtime: applies an artifact's ``kv_policy`` (``passes/kv_evict.py``) to an engine's cache.

Letters: B batch, G score heads, S prompt tokens, K kept tokens, C h2o's cache size.

The engines return each step's eviction scores on the cache (``cache.scores``, per layer ``[B, G, keys]``); an
:class:`Evictor` turns them into the tokens kept (selection in :mod:`headsmith.kv_policy`) and asks the cache to
``compact`` (after the prompt) or ``evict_last`` (after an h2o decode step). From then on the cache holds fewer
tokens than the text: the generation loop keeps feeding the positions of the text, and the key mask it passes
has one column per *held* token, which :meth:`Evictor.after_prefill` / :meth:`Evictor.after_step` return.

A layer's K and V entries share one choice per KV head; a latent cache (``mla``: no head dimension) keeps one
choice per layer, by the scores averaged over its heads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import HeadsmithError
from ..kv_policy import HeavyHitters, KvPolicy, kept_mask, select_prompt


@dataclass
class Evictor:
    """One generation's eviction state (see the module docstring)."""

    policy: KvPolicy
    score_layers: list[int]
    """The layer of each score output."""
    entry_scores: list[int]
    """Per cache entry, the score output that ranks its tokens."""
    entry_per_head: list[bool]
    """Per cache entry, whether it has the score's heads (``[B, G, S, D]``) or one sequence per row (a latent)."""
    entry_seq_dims: list[int]
    seen: int = 0
    """Tokens of the text so far (padded width)."""
    capacity: int = 0
    """h2o: the tokens the cache holds (0: it grows)."""
    heavy: list[HeavyHitters] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def of(record: dict[str, Any], layout: list[dict[str, Any]], override: KvPolicy | None = None) -> Evictor:
        """The evictor of a manifest's ``kv_policy`` ``record`` and cache ``layout``; ``override``: other options
        (another budget or method) on the same artifact."""
        policy = override if override is not None else KvPolicy.from_dict(record)
        if policy.decode_scores and record.get("method") != "h2o":
            raise HeadsmithError("h2o needs the decode step's attention scores, which this artifact's decode graph does "
                                 f"not return (it was converted with kv-evict(method={record.get('method')}))",
                                 "convert with kv-evict(method=h2o), or choose snapkv or random")
        if policy.window != int(record.get("window", policy.window)):
            raise HeadsmithError(f"the artifact's scores come from its last {record['window']} prompt queries (the "
                                 f"observation window is fixed at convert), not {policy.window}",
                                 f"keep window={record['window']}, or convert again with kv-evict(window=...)")
        scores = record["scores"]
        by_layer = {int(s["layer"]): i for i, s in enumerate(scores)}
        entry_scores, per_head = [], []
        for e in layout:
            if int(e["layer"]) not in by_layer:
                raise HeadsmithError(f"cache entry {e['name']} has no eviction scores",
                                     "convert the artifact again with kv-evict")
            j = by_layer[int(e["layer"])]
            entry_scores.append(j)
            per_head.append(int(e["seq_dim"]) == 2 and int(e["shape"][1]) == int(scores[j]["heads"]))
        return Evictor(policy, [int(s["layer"]) for s in scores], entry_scores, per_head,
                       [int(e["seq_dim"]) for e in layout])

    def _layer_scores(self, scores: list[np.ndarray]) -> list[np.ndarray]:
        """Per score output ``[B, G', keys]``: per head when its entries have heads, else averaged to ``G' = 1``."""
        out = []
        for j, s in enumerate(scores):
            heads = all(h for i, h in zip(self.entry_scores, self.entry_per_head) if i == j)
            out.append(s if heads else s.mean(1, keepdims=True))
        return out

    def _entry_index(self, index: list[np.ndarray]) -> list[np.ndarray]:
        """Per cache entry, its layer's ``index[B, G', K]`` shaped for ``take_along_axis`` on the entry."""
        out = []
        for j, heads, d in zip(self.entry_scores, self.entry_per_head, self.entry_seq_dims):
            ix = index[j]
            out.append(ix[..., None] if heads else ix[:, 0, :, None] if d == 1 else ix[:, :, :, None])
        return out

    def after_prefill(self, cache: Any, mask: Tensor) -> Tensor:
        """Compact the cache after the prompt (``mask[B, S]``); returns the key mask of the held tokens."""
        if cache.scores is None:
            raise HeadsmithError("the engine returned no eviction scores for the prompt",
                                 "convert the artifact again with kv-evict")
        valid = mask.numpy().astype(bool)
        s = valid.shape[1]
        self.seen = s
        self.capacity = self.policy.capacity(s)
        keep = min(s, self.capacity) if self.capacity else self.policy.kept(s)
        scores = self._layer_scores(cache.scores)
        if keep >= s:
            index = [np.broadcast_to(np.arange(s), x.shape).copy() for x in scores]
            new_mask = mask
        else:
            index = [select_prompt(self.policy, x, valid, keep, self.score_layers[j]) for j, x in enumerate(scores)]
            cache.compact(self._entry_index(index))
            new_mask = torch.from_numpy(kept_mask(valid, index[0]).astype(np.int64))
        if self.policy.method == "h2o":
            self.heavy = [HeavyHitters(np.take_along_axis(x.astype(np.float64), ix, -1), ix.astype(np.int64))
                          for x, ix in zip(scores, index)]
        self.stats = {"prompt": s, "kept": keep, "evicted": 0}
        return new_mask

    def after_step(self, cache: Any, mask: Tensor, new_tokens: int) -> Tensor:
        """After a decode step of ``new_tokens`` (``mask`` covers the held tokens and the new ones): h2o adds the
        step's attention and evicts down to its capacity; returns the key mask of the held tokens."""
        start = self.seen
        self.seen += new_tokens
        if self.policy.method != "h2o":
            return mask
        if cache.scores is None:
            raise HeadsmithError("the engine returned no eviction scores for the decode step",
                                 "convert the artifact again with kv-evict(method=h2o)")
        new = np.arange(start, self.seen, dtype=np.int64)
        for h, x in zip(self.heavy, self._layer_scores(cache.scores)):
            h.add(x.astype(np.float64), new)
        valid = mask.numpy().astype(bool)
        while valid.shape[1] > self.capacity:
            victims = [h.victims(valid, self.policy.recent, self.seen) for h in self.heavy]
            for h, v in zip(self.heavy, victims):
                h.move(v)
            cache.evict_last([victims[j] if heads else victims[j][:, 0]
                              for j, heads in zip(self.entry_scores, self.entry_per_head)])
            valid, mask = valid[:, :-1], mask[:, :-1]
            self.stats["evicted"] = self.stats.get("evicted", 0) + 1
        return mask


def evictor_for(engine: Any, kv_policy: KvPolicy | bool | None = None) -> Evictor | None:
    """The evictor of ``engine``'s artifact (``kv_policy``: None for the artifact's own, False for none, a
    :class:`KvPolicy` for other options on the same scores); None when there is nothing to evict."""
    record = getattr(engine, "kv_policy", None) or {}
    if kv_policy is False:
        return None
    if not record:
        if isinstance(kv_policy, KvPolicy):
            raise HeadsmithError(f"this {engine.name} engine's artifact has no KV policy, so it cannot evict "
                                 f"({kv_policy.method})", "convert with kv-evict(...) first")
        return None
    override = kv_policy if isinstance(kv_policy, KvPolicy) else None
    return Evictor.of(record, engine.cache_layout, override)


def with_budget(record: dict[str, Any], **changes: Any) -> KvPolicy:
    """The policy of a manifest ``record`` with some options changed (``budget=0.125``, ``method="random"``)."""
    return dataclasses.replace(KvPolicy.from_dict(record), **changes)


def continuation_perplexity(engine: Any, ids: Tensor, prompt: int, kv_policy: KvPolicy | bool | None = None,
                            chunk: int = 128, prefilled: tuple[Tensor, Any] | None = None) -> dict[str, Any]:
    """Perplexity of ``ids[0, prompt:]`` teacher-forced after the first ``prompt`` tokens were prefilled and their
    cache compacted by the policy (None: the artifact's, False: the full cache): what a long prompt's eviction
    costs the text that follows it. Steps of ``chunk`` tokens (one at a time with h2o, which evicts every step).
    ``prefilled``: the prompt's ``(logits, cache)`` from ``engine.prefill`` (a copy: it is compacted), to score
    several policies after one prefill."""
    if ids.dim() != 2 or ids.shape[0] != 1 or not 0 < prompt < ids.shape[1]:
        raise HeadsmithError(f"continuation perplexity needs one row longer than the prompt of {prompt} tokens, "
                             f"got ids {tuple(ids.shape)}")
    evictor = evictor_for(engine, kv_policy)
    mask = torch.ones(1, prompt, dtype=torch.int64)
    logits, cache = prefilled if prefilled is not None else engine.prefill(ids[:, :prompt], mask,
                                                                            torch.arange(prompt)[None])
    if evictor is not None:
        mask = evictor.after_prefill(cache, mask)
    step = 1 if evictor is not None and evictor.policy.method == "h2o" else chunk
    ce = torch.nn.functional.cross_entropy
    nll, count, done = float(ce(logits[0, -1:].float(), ids[0, prompt:prompt + 1], reduction="sum")), 1, prompt
    total = ids.shape[1]
    while done < total - 1:  # feed tokens done..done+n-1; their logits predict done+1..done+n
        n = min(step, total - 1 - done)
        mask = torch.cat([mask, torch.ones(1, n, dtype=torch.int64)], 1)
        logits, cache = engine.decode(ids[:, done:done + n], mask, torch.arange(done, done + n)[None], cache)
        if evictor is not None:
            mask = evictor.after_step(cache, mask, n)
        nll += float(ce(logits[0].float(), ids[0, done + 1:done + n + 1], reduction="sum"))
        count += n
        done += n
    return {"perplexity": math.exp(nll / count), "tokens": count, "held": int(mask.shape[1]),
            **({"kept": evictor.stats["kept"], "evicted": evictor.stats["evicted"]} if evictor else {})}


def policy_option(engine: Any, budget: float | None = None, method: str | None = None, tokens: int | None = None,
                  off: bool = False) -> KvPolicy | bool | None:
    """The ``kv_policy`` argument of ``generate`` from command-line options: the artifact's own (None), none
    (``off``), or its policy with another budget / method / token count."""
    if off:
        return False
    if budget is None and method is None and tokens is None:
        return None
    record = getattr(engine, "kv_policy", None) or {}
    if not record:
        raise HeadsmithError("--kv-budget / --kv-method / --kv-tokens need an artifact converted with kv-evict(...)",
                             "convert with --passes \"kv-evict(method=snapkv, budget=0.25)\"")
    changes: dict[str, Any] = {k: v for k, v in (("budget", budget), ("method", method), ("tokens", tokens))
                               if v is not None}
    try:
        return with_budget(record, **changes)
    except ValueError as e:
        raise HeadsmithError(str(e)) from None
