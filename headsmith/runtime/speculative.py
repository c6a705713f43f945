"""Speculative decoding: a draft proposes ``k`` tokens, the target verifies them in one decode call of ``1 + k``
tokens, and the longest prefix the target agrees with is kept, plus one token of the target's own.

Letters: B batch, k drafted tokens, P tokens cached before a step, V vocab.

One step, per row (Leviathan et al. 2023; Chen et al. 2023)::

    feed   = [last, d1 .. dk]                     decode(feed[B, 1+k]) -> logits[B, 1+k, V]
    greedy:   accept d_i while d_i == argmax(logits[i-1]);  then the target's argmax at the first mismatch
    sampling: accept d_i with probability p_i(d_i) (the draft is deterministic: q = one-hot), else draw from
              p_i with d_i removed; after k acceptances draw the bonus token from p_k

so greedy output equals plain greedy decoding token for token, and sampled output has the target's distribution
(``p`` is the target's distribution after temperature, top-k and top-p, as in plain sampling).

The cache took ``1 + k`` entries for every row. A batch of one rolls back to ``P + 1 + accepted``
(``cache.truncate``: every engine has it); rows of a batch accept different numbers of tokens, so the cache rolls
back to the longest row and the rejected slots of the other rows become holes in their attention mask (masked like
left padding; positions count only the kept tokens). Ring caches (sliding-window layers) cannot roll back once
they have evicted a token and are refused.

Drafts (:class:`Draft`): ``ngram`` (prompt lookup, Saxena 2023): the row's latest n-gram, found earlier in its
prompt or output, proposes the tokens that followed it there; no model, so its cost is nil and its worst case is
plain decoding plus the verify's extra positions. ``k`` adapts to the acceptance when ``adaptive``: +2 after a fully
accepted draft, -1 after a rejection, within 0..``max_k``; at 0 the steps are plain decoding, and the draft still
proposes one token in the shadow (free for ``ngram``): the first step where the target confirms every live row's
shadow brings k back to 1, so where the draft never helps the cost is that of plain decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import HeadsmithError
from .engine import Engine
from .generate import GenerationConfig, GenerationResult, distribution, prepare


class Draft(Protocol):
    name: str

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``history`` (the row's prompt and output so far)."""
        ...


@dataclass(frozen=True)
class NgramDraft:
    """Prompt lookup: the longest suffix of ``max_ngram`` .. ``min_ngram`` tokens that occurred before proposes
    what followed its latest earlier occurrence."""

    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "ngram"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise HeadsmithError(f"ngram draft needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                                 f"{self.max_ngram}")

    def propose(self, history: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            suffix = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):  # latest earlier occurrence first
                if history[start:start + n] == suffix:
                    return history[start + n:start + n + k]
        return []


DRAFTS: dict[str, Callable[[], Draft]] = {"ngram": NgramDraft}


def draft_for(name: str | Draft) -> Draft:
    """A draft by name (``ngram``), or the draft itself."""
    if not isinstance(name, str):
        return name
    if name not in DRAFTS:
        raise HeadsmithError(f"unknown draft {name!r} (known: {', '.join(DRAFTS)})",
                             "use --draft ngram; drafts built from the model are not built yet (issue 13)")
    return DRAFTS[name]()


@dataclass
class SpeculativeStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted": self.accepted / self.steps if self.steps else 0.0,
                "draft_ms_per_step": 1e3 * self.draft_seconds / max(1, self.steps),
                "verify_ms_per_step": 1e3 * self.verify_seconds / max(1, self.steps)}


def _accept(logits: Tensor, drafted: list[int], config: GenerationConfig, generator: torch.Generator | None,
            blocked: Callable[[int], list[int]]) -> list[int]:
    """The tokens one row keeps from a verified step: accepted draft tokens, then one of the target's own.
    ``logits[1+k, V]``; ``blocked(i)``: tokens forbidden at verify position ``i`` (stops before min_new_tokens)."""
    kept: list[int] = []
    for i in range(len(drafted) + 1):
        scores, banned = logits[i].clone(), blocked(i)
        if banned:
            scores[banned] = float("-inf")
        if config.temperature == 0.0:
            best = int(scores.argmax())
            if i < len(drafted) and drafted[i] == best:
                kept.append(best)
                continue
            return kept + [best]
        p = distribution(scores[None], config)[0]
        if i < len(drafted):
            x = drafted[i]
            if float(torch.rand((), generator=generator)) < float(p[x]):
                kept.append(x)
                continue
            p = p.clone()
            p[x] = 0.0
            if float(p.sum()) <= 0.0:  # p was one-hot on x: accepted with probability 1 above
                return kept + [x]
        return kept + [int(torch.multinomial(p / p.sum(), 1, generator=generator))]
    raise AssertionError("unreachable")


def speculative_generate(engine: Engine, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                         draft: str | Draft = "ngram", k: int = 4, adaptive: bool = True, max_k: int = 8,
                         stream: Callable[[int, int], None] | None = None, pad_id: int | None = None
                         ) -> GenerationResult:
    """``generate`` with draft-and-verify steps (see the module docstring); ``result.stats`` has the acceptance."""
    drafter = draft_for(draft)
    if k < 1 or max_k < k:
        raise HeadsmithError(f"speculative decoding needs 1 <= k <= max_k, got k={k}, max_k={max_k}")
    info = engine.info
    stops, pad, ids, mask, positions, generator = prepare(engine, prompts, config, pad_id)
    b = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    history = [list(p) for p in prompts]
    stats = SpeculativeStats()
    if config.max_new_tokens == 0:
        return GenerationResult(out, [len(p) for p in prompts], 0.0, 0.0, 0, stats.as_dict())
    start = time.perf_counter()
    logits, cache = engine.prefill(ids, mask, positions)
    prefill_s = time.perf_counter() - start
    if any(r is not None for r in getattr(cache, "rings", [])):
        raise HeadsmithError("speculative decoding rolls the cache back after a rejected draft, which the ring "
                             "caches of this artifact's sliding-window layers cannot do once full",
                             "convert without sparse-attention's window, or decode without a draft")
    next_pos = positions[:, -1] + 1
    done = [False] * b
    decode_start = time.perf_counter()

    def emit(row: int, tokens: list[int]) -> None:
        for t in tokens:
            out[row].append(t)
            history[row].append(t)
            if stream is not None:
                stream(row, t)
            if t in stops or len(out[row]) >= config.max_new_tokens:
                done[row] = True
                return

    def blocked_at(row: int) -> Callable[[int], list[int]]:
        return lambda i: sorted(stops) if stops and len(out[row]) + i < config.min_new_tokens else []

    for row in range(b):  # the prefill's token
        emit(row, _accept(logits[row, -1:], [], config, generator, blocked_at(row)))
    while not all(done):
        t0 = time.perf_counter()
        drafts = [[] if done[r] else drafter.propose(history[r], min(k, config.max_new_tokens - len(out[r]) - 1))
                  for r in range(b)]
        shadow = [[] if done[r] else drafter.propose(history[r], 1) for r in range(b)] if adaptive and k == 0 else []
        stats.draft_seconds += time.perf_counter() - t0
        if any(not 0 <= t < info.vocab_size for d in drafts for t in d):
            raise HeadsmithError(f"draft {drafter.name} proposed token ids outside the target's vocabulary of "
                                 f"{info.vocab_size}", "use a draft with the target's tokenizer")
        width = max(len(d) for d in drafts)
        feed = torch.full((b, 1 + width), pad, dtype=torch.int64)
        for r in range(b):
            row = [out[r][-1]] + drafts[r]
            feed[r, :len(row)] = torch.tensor(row)
        base = mask.shape[1]
        mask = torch.cat([mask, torch.ones(b, 1 + width, dtype=torch.int64)], 1)
        for r in range(b):
            if done[r]:
                mask[r, base:] = 0
        t0 = time.perf_counter()
        logits, cache = engine.decode(feed, mask, next_pos[:, None] + torch.arange(1 + width)[None], cache)
        stats.verify_seconds += time.perf_counter() - t0
        kept = [[] if done[r] else _accept(logits[r], drafts[r], config, generator, blocked_at(r)) for r in range(b)]
        accepted = [max(0, len(x) - 1) for x in kept]  # draft tokens now in the cache (the last one is not yet)
        keep = base + 1 + max(accepted[r] for r in range(b) if not done[r])  # a live row exists inside the loop
        cache.truncate(keep)
        mask = mask[:, :keep].clone()
        for r in range(b):
            if not done[r]:
                mask[r, base + 1 + accepted[r]:] = 0  # the rejected slots of the rows that accepted fewer
                next_pos[r] += 1 + accepted[r]
        stats.steps += 1
        stats.drafted += sum(len(d) for d in drafts)
        stats.accepted += sum(accepted)
        for r in range(b):
            if not done[r]:
                emit(r, kept[r])
        if adaptive and width:
            k = min(max_k, k + 2) if all(accepted[r] == len(drafts[r]) for r in range(b) if drafts[r]) else k - 1
        elif adaptive and k == 0 and all(kept[r][:1] == sh for r, sh in enumerate(shadow) if not done[r]) \
                and any(shadow):
            k = 1  # every live row's shadow confirmed: a verify step pays for all rows
    decode_s = time.perf_counter() - decode_start
    return GenerationResult(out, [len(p) for p in prompts], prefill_s, decode_s, stats.steps, stats.as_dict())
