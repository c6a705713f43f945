"""The staged prefill of an artifact with ``prefill-prune`` (``passes/prefill_prune.py``), for any engine.

Letters: B batch, S prompt tokens (padded width), K_s tokens flowing through stage ``s``, E width.

:func:`run_stages` runs the stage graphs (``passes/prefill_stages.py``) one after the other; between two it ranks
the flowing tokens by the scores the first returns and gathers the kept ones' residual stream, positions and
mask (:func:`headsmith.token_pruning.select_tokens`). What it leaves, :class:`PrunedPrompt`, is every cache
entry's present (a stage-``s`` entry holds ``K_s`` prompt tokens) and, per pruned stage, the mask of the tokens it
kept: a decode step's key mask for that stage's layers is that mask followed by the step's columns of the full
``attention_mask`` (:func:`stage_masks`), so the generation loop keeps passing one mask over the whole text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..passes.kv_cache import stage_mask_name
from ..token_pruning import PrunePlan, select_tokens


@dataclass
class PrunedPrompt:
    """What a staged prefill kept (see the module docstring)."""

    width: int
    """The prompt's padded width ``S``."""
    held: dict[str, np.ndarray] = field(default_factory=dict)
    """Per pruned stage's mask input (``prune_mask_stage{s}``), the mask ``[B, K_s]`` of its kept tokens."""
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    """Per pruned stage, the prompt indices ``[B, K_s]`` (ascending) of its kept tokens."""

    def copy(self) -> PrunedPrompt:
        return PrunedPrompt(self.width, dict(self.held), dict(self.kept))


def stage_masks(names: list[str], pruned: PrunedPrompt | None, attention_mask: Any) -> dict[str, np.ndarray]:
    """The decode graph's ``prune_mask_stage*`` inputs for a step whose full mask is ``attention_mask``
    (``[B, seen + T]``): each stage's kept tokens' mask, then the columns after the prompt (before any prompt
    was pruned, the full mask)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    if pruned is None:
        return {n: mask for n in names}
    return {n: np.ascontiguousarray(np.concatenate([pruned.held[n], mask[:, pruned.width:]], 1)) for n in names}


def mask_names(stages: Iterable[int]) -> list[str]:
    """The decode graph's stage-mask inputs, in input order, from the cache entries' stages."""
    return list(dict.fromkeys(stage_mask_name(s) for s in stages if s > 0))


def run_stages(plan: PrunePlan, run: Callable[[int, dict[str, np.ndarray]], list[np.ndarray]],
               stage_entries: list[list[int]], n_entries: int, input_ids: np.ndarray, attention_mask: np.ndarray,
               position_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], PrunedPrompt]:
    """Run the stages (``run(s, feeds)`` returns stage ``s``'s outputs in order; ``stage_entries[s]``: the cache
    entries its presents fill): the last position's logits, every entry's present, and what was kept."""
    b, width = input_ids.shape
    feeds = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    index = np.broadcast_to(np.arange(width), (b, width))
    presents: list[np.ndarray | None] = [None] * n_entries
    pruned = PrunedPrompt(width)
    logits = np.empty(0)
    for s in range(plan.stages):
        out = run(s, feeds)
        last = s == plan.stages - 1
        mine = out[1:] if last else out[1:-1]
        for i, p in zip(stage_entries[s], mine):
            presents[i] = p
        if last:
            logits = out[0]
            break
        hidden, scores = out[0], out[-1]
        mask = feeds["attention_mask"]
        keep = select_tokens(plan, scores, mask.astype(bool), plan.kept(s + 1, width))
        feeds = {"hidden": np.take_along_axis(hidden, keep[..., None], 1),
                 "position_ids": np.take_along_axis(feeds["position_ids"], keep, 1),
                 "attention_mask": np.take_along_axis(mask, keep, 1)}
        index = np.take_along_axis(index, keep, 1)
        pruned.held[stage_mask_name(s + 1)] = feeds["attention_mask"]
        pruned.kept[stage_mask_name(s + 1)] = index
    assert all(p is not None for p in presents), "a cache entry belongs to no stage"
    return logits, presents, pruned  # type: ignore[return-value]


def mean_held(cache: Any) -> int:
    """Prompt and generated tokens a cache holds per entry, on average (a pruned prefill's later stages hold
    fewer): a ``KVCache`` or a ``TorchCache``."""
    if hasattr(cache, "specs"):
        held = [cache.tokens(i) for i in range(len(cache.specs))]
    else:
        held = [int(t.shape[d]) for t, d in zip(cache.tensors, cache.seq_dims)]
    return round(sum(held) / max(1, len(held)))


def prunes(engine: Any) -> bool:
    """Whether ``engine`` runs a staged prefill (its artifact has ``prefill-prune`` and ``prune`` is on)."""
    staged = getattr(engine, "prune_plan", None) is not None or "prefill_prune" in getattr(engine, "backend", {})
    return staged and bool(getattr(engine, "prune", False))


@contextmanager
def full_prefill(engine: Any) -> Iterator[Any]:
    """``engine`` with its staged prefill off for the block (the same artifact's full prefill, to compare)."""
    before = getattr(engine, "prune", None)
    if before is not None:
        engine.prune = False
    try:
        yield engine
    finally:
        if before is not None:
            engine.prune = before
