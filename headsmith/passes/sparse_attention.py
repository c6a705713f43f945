"""``sparse-attention(pattern=streaming, window=W, sinks=S)``: attention sinks + a sliding window. Lossy.

StreamingLLM (Xiao et al., 2023) observes that the first few tokens of a text receive a large share of every
head's attention whatever they say ("attention sinks"): a sliding window alone collapses once they leave it,
while the first ``S`` tokens plus the last ``W`` keep perplexity close to full attention. The pass rewrites
every causal ``headsmith.attention`` op of a decoder to that pattern; nothing else in the graph changes::

    attention(q, k, v, mask, causal=True)      ->      attention(q, k, v, mask, causal=True, window=W, sinks=S)

A layer that already has a narrower window (Gemma3's local layers) keeps it and gains the sinks.

The decode cache then holds only what the pattern can still see: per layer ``S`` sink slots and a ring of
``W - 1`` slots for the most recent tokens, plus the step's own token (the manifest's cache layout records
the capacity ``S + W``; ``headsmith/runtime/ring.py`` manages the slots), so KV memory stays constant however
long generation runs.

Positions: keys are cached after RoPE, at their positions in the text, and queries keep theirs, so the kept
keys are seen at exactly the relative distances of the masked dense reference (prefill and decode agree, and
the window's distances are the ones the model was trained on). StreamingLLM instead renumbers positions inside
the cache; that is what lets a model run past its trained length, but it needs the keys cached before RoPE
and re-rotated at every step. Here a text longer than the model's positions sees its sinks from distances the
model never saw in training (the window itself never exceeds ``W``); docs/sparse_attention.md measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import PassError
from ..program import Program
from ..sites import attention_nodes
from .base import Pass, PassContext, PassResult

PATTERNS = ("streaming",)
PLANNED = ("duo", "razor", "moa", "block", "power")


@dataclass(frozen=True)
class SparseAttention(Pass):
    """Sparse attention patterns: attention sinks + a sliding window (StreamingLLM). Lossy."""

    name: ClassVar[str] = "sparse-attention"
    exact: ClassVar[bool] = False
    float_weights: ClassVar[bool] = False

    pattern: str = "streaming"
    """``streaming``: every layer attends to the first ``sinks`` tokens and the last ``window``."""
    window: int = 1024
    """Keys in the sliding window (the query's own included)."""
    sinks: int = 4
    """First tokens every query keeps attending to."""

    def __post_init__(self) -> None:
        if self.pattern in PLANNED:
            raise ValueError(f"pattern={self.pattern} is not built yet (per-head and block-sparse patterns are "
                             "planned); use pattern=streaming")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (keys a query sees, its own included), got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.info.task != "causal-lm":
            raise PassError(f"sparse-attention(pattern={self.pattern}) is a decoder pattern; "
                            f"{program.info.architecture} is a bidirectional encoder",
                            "apply it to a causal LM")
        new = program.clone()
        count, layers = 0, []
        for node in attention_nodes(new.gm.graph):
            if not bool(node.kwargs.get("causal", True)):
                continue
            old = int(node.kwargs.get("window", 0))  # type: ignore[arg-type]
            window = min(old, self.window) if old > 0 else self.window
            node.kwargs = {**node.kwargs, "window": window, "sinks": self.sinks}
            layers.append({"layer": int(node.kwargs.get("layer", count)), "window": window,  # type: ignore[arg-type]
                           "sinks": self.sinks, "was_window": old})
            count += 1
        if count == 0:
            raise PassError("the program has no causal attention for sparse-attention to rewrite")
        new.gm.recompile()
        new._shapes = None
        return PassResult(new, modified=True, count=count, report={"pattern": self.pattern, "layers": layers})

