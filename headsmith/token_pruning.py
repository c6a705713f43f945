"""Progressive prompt-token pruning in prefill (LazyLLM, Fu et al., 2024): which prompt tokens keep flowing.

Letters: B batch, G score heads (a layer's KV heads), S prompt tokens (padded width), T tokens still flowing
into a stage, K tokens kept for the next stage, w the observation window.

A :class:`PrunePlan` cuts the layers into *stages* at ``layers = (L1, L2, ..)``: stage 0 is layers ``0 .. L1-1``
and runs on every prompt token; before stage ``s`` the tokens are ranked by how much the last ``w`` prompt
queries attended to them in the last layer of stage ``s-1`` (``headsmith.key_scores``, summed over its heads:
one ranking per token, since a token either flows or not), smoothed over ``kernel`` neighbouring positions as
SnapKV does, and the top ``keep[s-1]`` fraction of the prompt goes on (the window always does: its last token
predicts the first new one). Kept sets are nested and stay in text order, so a stage's causal mask over its
tokens is the text's; positions stay those of the text.

A pruned token's K/V is never computed for the later stages, so each stage's layers cache only the tokens that
reached them: the cache of a stage-``s`` layer holds ``K_s`` prompt tokens plus the generated ones, and decode
steps give those layers their own key mask (``prune_mask_stage{s}``, built by the runtime from the kept
tokens' mask and the new columns). Within a stage every row keeps the same count, padding ranking last (in a
short row, kept padding comes first and stays masked), so the cache stays rectangular per layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .kv_policy import POOLS, pool_positions

HEADS = ("sum", "max")


@dataclass(frozen=True)
class PrunePlan:
    """Where and how much a causal LM's prefill prunes (``Program.prefill_prune``, the manifest's record)."""

    layers: tuple[int, ...]
    """The first layer of each pruned stage, ascending (>= 1)."""
    keep: tuple[float, ...]
    """Per pruned stage, the fraction of the prompt still flowing, non-increasing, in (0, 1]."""
    window: int = 32
    """The last prompt queries whose attention ranks the tokens; always kept."""
    kernel: int = 7
    """Positions pooled around each score (odd; 1: none)."""
    pool: str = "max"
    heads: str = "sum"
    """How a token's score combines the layer's KV heads: ``sum`` (the attention it receives in all) or ``max``
    (the most any one head pays it: a token one retrieval head needs ranks high)."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("prefill-prune needs at least one layer to prune at: layers=[8]")
        if len(self.keep) != len(self.layers):
            raise ValueError(f"give one keep ratio per pruning layer: {len(self.layers)} layers, "
                             f"{len(self.keep)} ratios")
        if list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
            raise ValueError(f"layers must be ascending, distinct and >= 1 (layer 0 sees every token); "
                             f"got {list(self.layers)}")
        if any(not 0.0 < k <= 1.0 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"keep ratios are fractions of the prompt in (0, 1], non-increasing (a pruned token "
                             f"does not come back); got {list(self.keep)}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel is an odd number of positions >= 1, got {self.kernel}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {', '.join(POOLS)}")
        if self.heads not in HEADS:
            raise ValueError(f"unknown heads {self.heads!r}; choose one of {', '.join(HEADS)}")

    @property
    def stages(self) -> int:
        return len(self.layers) + 1

    def stage_of(self, layer: int) -> int:
        """The stage that runs ``layer`` (0: every prompt token)."""
        return sum(layer >= first for first in self.layers)

    def kept(self, stage: int, prompt: int) -> int:
        """Prompt tokens flowing into ``stage`` (all of them in stage 0, and when the prompt is short)."""
        if stage == 0:
            return prompt
        return min(prompt, max(math.ceil(self.keep[stage - 1] * prompt), self.window + 1))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers), "keep": list(self.keep)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PrunePlan:
        return PrunePlan(tuple(int(x) for x in d["layers"]), tuple(float(x) for x in d["keep"]),
                         int(d.get("window", 32)), int(d.get("kernel", 7)), str(d.get("pool", "max")),
                         str(d.get("heads", "sum")))


def select_tokens(plan: PrunePlan, scores: np.ndarray, valid: np.ndarray, keep: int) -> np.ndarray:
    """The indices ``[B, keep]`` (ascending) of the flowing tokens that go on, from a stage's last layer's
    ``scores[B, G, T]`` and which of its tokens are real (``valid[B, T]``); see the module docstring."""
    b, _, t = scores.shape
    if keep >= t:
        return np.broadcast_to(np.arange(t), (b, t)).copy()
    w = min(plan.window, t)
    total = scores.astype(np.float64).sum(1) if plan.heads == "sum" else scores.astype(np.float64).max(1)
    rank = np.concatenate([pool_positions(total[:, : t - w], plan.kernel, plan.pool), np.full((b, w), np.inf)], -1)
    rank = np.where(valid, rank, -np.inf)
    order = np.argsort(-rank, axis=-1, kind="stable")[:, :keep]  # stable: padding ties keep text order
    return np.sort(order, axis=-1)
