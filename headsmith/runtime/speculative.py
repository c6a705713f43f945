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

Model drafts (:class:`ModelDraft`: a draft stored in the artifact, see ``passes/draft.py``) run their own decode
graph on the target's cache, one token at a time for the whole batch, from the row's last token; their entries
are truncated away before the verify step writes the target's. With sampling they draw ``d_i ~ q_i`` (their own
distribution after the same temperature / top-k / top-p) and the target accepts with probability
``min(1, p_i(d_i) / q_i(d_i))``, else draws from ``max(0, p_i - q_i)`` normalised (for a deterministic draft
``q`` is one-hot and this is the rule above). Their ``k`` adapts by the speed-up model of ``passes/draft.py``:
each step takes the k that maximises ``E[tokens] / (k c + 1)`` for the acceptance seen so far (starting from the
calibration agreement in the manifest) and the measured cost ``c`` of a draft step over a verify step; where no k
pays (modelled speed-up <= 1) it decodes plainly for ``PROBE`` steps and then probes with k = 1.
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
from .eviction import evictor_for
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


@dataclass
class SpeculativeStats:
    draft: str = ""
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"draft": self.draft, "steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted": self.accepted / self.steps if self.steps else 0.0,
                "draft_ms_per_step": 1e3 * self.draft_seconds / max(1, self.steps),
                "verify_ms_per_step": 1e3 * self.verify_seconds / max(1, self.steps)}


def _accept(logits: Tensor, drafted: list[int], config: GenerationConfig, generator: torch.Generator | None,
            blocked: Callable[[int], list[int]], q: list[Tensor] | None = None) -> list[int]:
    """The tokens one row keeps from a verified step: accepted draft tokens, then one of the target's own.
    ``logits[1+k, V]``; ``blocked(i)``: tokens forbidden at verify position ``i`` (stops before min_new_tokens);
    ``q``: the draft's distribution of each drafted token (None: a deterministic draft, q one-hot)."""
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
            q_x = 1.0 if q is None else float(q[i][x])
            if float(torch.rand((), generator=generator)) * q_x < float(p[x]):
                kept.append(x)
                continue
            if q is None:
                p = p.clone()
                p[x] = 0.0
            else:
                p = (p - q[i]).clamp_min(0.0)
            if float(p.sum()) <= 0.0:  # p was at most q everywhere: accepted with probability 1 above
                return kept + [x]
        return kept + [int(torch.multinomial(p / p.sum(), 1, generator=generator))]
    raise AssertionError("unreachable")


@dataclass
class ModelDraft:
    """A draft stored in the artifact (``passes/draft.py``): its decode graph, run by the engine on the target's
    cache (see the module docstring). With ``lookup`` (``ngram+NAME``), a row whose latest 2- or 3-gram occurred
    before takes prompt lookup's proposal (free), and the model drafts only for the other rows."""

    stored: str
    record: dict[str, Any]
    lookup: NgramDraft | None = None

    @property
    def name(self) -> str:
        return f"ngram+{self.stored}" if self.lookup is not None else self.stored

    def propose_batch(self, engine: Any, last: list[int], mask: Tensor, next_pos: Tensor, cache: Any,
                      widths: list[int], config: GenerationConfig, generator: torch.Generator | None,
                      blocked: list[Callable[[int], list[int]]], pad: int
                      ) -> tuple[list[list[int]], list[list[Tensor]] | None]:
        """``widths[r]`` tokens for each row (0: none) and, when sampling, the draft's distribution of each; the
        cache is left as it was."""
        b, width = len(last), max(widths)
        drafts: list[list[int]] = [[] for _ in range(b)]
        qs: list[list[Tensor]] = [[] for _ in range(b)]
        if width == 0:
            return drafts, None
        start = cache.length
        live = torch.tensor([1 if w > 0 else 0 for w in widths], dtype=torch.int64)[:, None]
        x = torch.tensor([t if w > 0 else pad for t, w in zip(last, widths)], dtype=torch.int64)[:, None]
        for j in range(width):
            mask = torch.cat([mask, live], 1)
            logits = engine.draft_decode(self.stored, x, mask, next_pos[:, None] + j, cache)[:, -1]
            for r in range(b):
                if j >= widths[r]:
                    continue
                scores, banned = logits[r].clone(), blocked[r](j)
                if banned:
                    scores[banned] = float("-inf")
                if config.temperature == 0.0:
                    token = int(scores.argmax())
                else:
                    qr = distribution(scores[None], config)[0]
                    token = int(torch.multinomial(qr, 1, generator=generator))
                    qs[r].append(qr)
                drafts[r].append(token)
                x[r, 0] = token
        cache.truncate(start)
        return drafts, (qs if config.temperature > 0.0 else None)


PROBE = 8
"""Plain steps a model draft sits out when no k pays, before it probes again with k = 1."""


@dataclass
class DraftCost:
    """The speed-up model of a model draft's k (see the module docstring): acceptance counts with a prior of
    ``prior_weight`` tokens at the calibration agreement, and the measured seconds of draft and verify steps."""

    agreement: float
    cost: float
    prior_weight: float = 8.0
    accepted: float = 0.0
    drafted: float = 0.0
    draft_seconds: float = 0.0
    draft_steps: int = 0
    verify_seconds: float = 0.0
    verify_steps: int = 0
    resting: int = 0

    def next_k(self, max_k: int) -> int:
        from ..passes.draft import expected_speedup

        if self.resting > 0:
            self.resting -= 1
            return 1 if self.resting == 0 else 0
        alpha = (self.accepted + self.agreement * self.prior_weight) / (self.drafted + self.prior_weight)
        cost = self.cost
        if self.draft_steps and self.verify_steps:
            cost = (self.draft_seconds / self.draft_steps) / (self.verify_seconds / self.verify_steps)
        speedup, k = expected_speedup(min(alpha, 0.999), cost, max_k)
        if speedup <= 1.0:
            self.resting = PROBE
            return 0
        return k


def draft_for(name: str | Draft, engine: Any = None) -> Draft | ModelDraft:
    """A draft by name: one stored in the artifact (``engine.drafts``), ``ngram``, ``ngram+NAME`` (prompt lookup
    where it finds a match, else the stored draft), or ``auto`` (``ngram+`` the stored draft with the best modelled
    speed-up from its calibration agreement and weight bytes, else ``ngram``); or the draft itself."""
    if not isinstance(name, str):
        return name
    stored = dict(getattr(engine, "drafts", {}) or {})
    if name == "auto":
        from ..passes.draft import expected_speedup
        modelled = {n: expected_speedup(float(r.get("top1_agreement", 0.0)), float(r.get("weight_bytes_ratio", 1.0)))[0]
                    for n, r in stored.items()}
        best = max(modelled, key=lambda n: modelled[n], default=None)
        name = f"ngram+{best}" if best is not None and modelled[best] > 1.0 else "ngram"
    if name.startswith("ngram+") and name[6:] in stored:
        return ModelDraft(name[6:], stored[name[6:]], NgramDraft(min_ngram=2))
    if name in stored:
        return ModelDraft(name, stored[name])
    if name not in DRAFTS:
        known = [*stored, *DRAFTS, *(f"ngram+{n}" for n in stored), "auto"]
        raise HeadsmithError(f"unknown draft {name!r} (known here: {', '.join(known)})",
                             "use --draft ngram, or convert with draft(method=layer-skip|quantized|pruned) to store "
                             "a draft built from the model")
    return DRAFTS[name]()


def speculative_generate(engine: Engine, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                         draft: str | Draft | ModelDraft = "ngram", k: int = 4, adaptive: bool = True, max_k: int = 8,
                         stream: Callable[[int, int], None] | None = None, pad_id: int | None = None,
                         kv_policy: Any = None) -> GenerationResult:
    """``generate`` with draft-and-verify steps (see the module docstring); ``result.stats`` has the acceptance.
    ``kv_policy`` as in ``generate``: a prompt-time eviction (snapkv, random) compacts the cache before the first
    draft; h2o, which evicts while decoding, is refused (a rejected draft could not be rolled back)."""
    drafter = draft_for(draft, engine)
    evictor = evictor_for(engine, kv_policy)
    if evictor is not None and evictor.policy.method == "h2o":
        raise HeadsmithError("speculative decoding rolls the cache back after a rejected draft, which h2o's "
                             "decode-time eviction cannot undo", "decode without a draft, or use kv-evict(method=snapkv)")
    model = isinstance(drafter, ModelDraft)
    if k < 1 or max_k < k:
        raise HeadsmithError(f"speculative decoding needs 1 <= k <= max_k, got k={k}, max_k={max_k}")
    if model and drafter.stored not in (getattr(engine, "drafts", None) or {}):
        raise HeadsmithError(f"the {engine.name} engine has no draft {drafter.stored!r}",
                             "convert the model with draft(...) in its passes")
    info = engine.info
    stops, pad, ids, mask, positions, generator = prepare(engine, prompts, config, pad_id)
    b = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    history = [list(p) for p in prompts]
    stats = SpeculativeStats(drafter.name)
    costs = DraftCost(float(drafter.record.get("top1_agreement", 0.5)),
                      float(drafter.record.get("weight_bytes_ratio", 0.5))) if model else None
    if config.max_new_tokens == 0:
        return GenerationResult(out, [len(p) for p in prompts], 0.0, 0.0, 0, stats.as_dict())
    start = time.perf_counter()
    logits, cache = engine.prefill(ids, mask, positions)
    if evictor is not None:
        mask = evictor.after_prefill(cache, mask)
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
        widths = [0 if done[r] else min(k, config.max_new_tokens - len(out[r]) - 1) for r in range(b)]
        qs: list[list[Tensor] | None] = [None] * b
        shadow: list[list[int]] = []
        modelled = 0  # tokens the model drafted for its longest row
        if model:
            looked = [drafter.lookup.propose(history[r], widths[r]) if drafter.lookup and widths[r] else []
                      for r in range(b)]
            need = [0 if looked[r] else widths[r] for r in range(b)]
            drafts, dist = drafter.propose_batch(engine, [out[r][-1] if out[r] else pad for r in range(b)], mask,
                                                 next_pos, cache, need, config, generator,
                                                 [blocked_at(r) for r in range(b)], pad)
            modelled = max(need)
            for r in range(b):
                if looked[r]:
                    drafts[r] = looked[r]
                elif dist is not None:
                    qs[r] = dist[r]
        else:
            drafts = [drafter.propose(history[r], widths[r]) if widths[r] else [] for r in range(b)]
            if adaptive and k == 0:
                shadow = [[] if done[r] else drafter.propose(history[r], 1) for r in range(b)]
        draft_s = time.perf_counter() - t0
        stats.draft_seconds += draft_s
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
        verify_s = time.perf_counter() - t0
        stats.verify_seconds += verify_s
        kept = [[] if done[r] else _accept(logits[r], drafts[r], config, generator, blocked_at(r), qs[r])
                for r in range(b)]
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
        if not adaptive:
            continue
        if costs is not None:
            costs.accepted += sum(accepted)
            costs.drafted += sum(len(d) for d in drafts)
            if modelled:
                costs.draft_seconds += draft_s / modelled
                costs.draft_steps += 1
            if width:
                costs.verify_seconds += verify_s
                costs.verify_steps += 1
            k = costs.next_k(max_k)
        elif width:
            k = min(max_k, k + 2) if all(accepted[r] == len(drafts[r]) for r in range(b) if drafts[r]) else k - 1
        elif k == 0 and all(kept[r][:1] == sh for r, sh in enumerate(shadow) if not done[r]) and any(shadow):
            k = 1  # every live row's shadow confirmed: a verify step pays for all rows
    decode_s = time.perf_counter() - decode_start
    return GenerationResult(out, [len(p) for p in prompts], prefill_s, decode_s, stats.steps, stats.as_dict())
