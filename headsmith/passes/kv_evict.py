"""``kv-evict(method=snapkv|h2o|random, budget=0.25, window=32, ...)``: the decode cache keeps, per KV head, only
the tokens the attention actually uses. The graph is unchanged (a cache-less forward is exact); the loss is in
decoding after the cache was compacted, measured by ``headsmith eval --continuation`` and ``--passkey``.

SnapKV (Li et al., 2024) observes that what a head will attend to while answering is already visible in the
attention of the last prompt tokens (the *observation window*): the prompt keys those queries attend to, smoothed
over neighbouring positions, are the ones later queries attend to, head by head. H2O (Zhang et al., 2023) keeps the
*heavy hitters*, the tokens with the most accumulated attention, plus the recent ones, and evicts the rest as
decoding goes, in a cache of fixed size. Both need the attention probabilities, which a fused attention kernel never
materialises; so the lowering adds them beside the kernel (``passes/kv_scores.py``), per layer and KV head::

    attention(q, k, v, mask)                     attention(q, k, v, mask)
                                          ->     scores_layer{L} = mean_group(sum_queries(softmax(q[-w:] k^T)))
    outputs: logits, *presents                   outputs: logits, *presents, *scores      # prefill; h2o: decode too

and the runtime (``runtime/eviction.py``, selection in :mod:`headsmith.kv_policy`) ranks and compacts the cache
between steps. The scores are graph outputs rather than an option of the attention op or a second scoring graph:
every engine already runs the graph that has the post-RoPE q and k, the budget stays a runtime choice (one artifact
serves every budget: ``--kv-budget``), and a GQA kernel (onnxruntime's ``GroupQueryAttention``) keeps decoding the
compacted cache unchanged, since to a kernel it is just a shorter cache.

Compacted caches are rectangular: every head of every layer keeps the same number of tokens (different ones per
head), so the manifest's cache layout is unchanged and one key mask per row serves all heads (``kv_policy.py``).
Keys carry their RoPE positions and queries keep the positions of the text, so nothing is re-rotated.

Scope: causal LMs whose layers keep a full cache (no sliding window, sinks or block layout: their masks count key
slots, which compaction renumbers); every other pass composes (``gqa``, ``mla`` (a latent cache keeps one choice
per layer), ``prune-*``, ``quantize``, ``draft`` with ``snapkv`` / ``random``). Engines: torch and ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..errors import PassError
from ..kv_policy import KvPolicy
from ..program import Program
from ..sites import attention_by_layer
from .base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class KvEvict(Pass):
    """KV-cache eviction from the attention scores: SnapKV (prompt), H2O (decode), random (the baseline)."""

    name: ClassVar[str] = "kv-evict"
    exact: ClassVar[bool] = True  # the graph is unchanged; the runtime's compaction is what loses information
    float_weights: ClassVar[bool] = False

    method: str = "snapkv"
    """``snapkv``: rank the prompt's tokens by the observation window's attention; ``h2o``: heavy hitters, a cache
    of fixed size through the whole generation; ``random``: a seeded uniform choice (the baseline)."""
    budget: float = 0.25
    """The fraction of the prompt's KV kept (h2o: the cache size, relative to the prompt)."""
    tokens: int = 0
    """A fixed number of cached tokens instead of ``budget`` (0: use the budget)."""
    window: int = 32
    """The last prompt queries whose attention scores the keys; snapkv and random always keep them."""
    kernel: int = 7
    """snapkv: positions pooled around each score, an odd number (1: none)."""
    pool: str = "max"
    """snapkv: ``avg`` or ``max`` pooling."""
    recent: int = 32
    """h2o: the most recent tokens, always kept."""
    seed: int = 0
    """random: the draw."""
    keep: int = 0
    """snapkv, random: the last prompt tokens always kept (0: the whole window)."""

    def __post_init__(self) -> None:
        self.policy()  # checks the options

    def policy(self) -> KvPolicy:
        return KvPolicy(self.method, self.budget, self.tokens, self.window, self.kernel, self.pool, self.recent,
                        self.seed, self.keep)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.info.task != "causal-lm":
            raise PassError(f"kv-evict compacts a decode cache; {program.info.architecture} is an encoder",
                            "for encoders use token merging, or apply kv-evict to a causal LM")
        if program.kv_policy is not None:
            raise PassError(f"the program already has a KV policy ({program.kv_policy.method})",
                            "give kv-evict once; the budget can still change at run time (--kv-budget)")
        if program.prefill_prune is not None:
            raise PassError("kv-evict and prefill-prune both choose the prompt tokens the cache keeps",
                            "use one of them")
        if self.method == "h2o" and program.drafts:
            raise PassError("kv-evict(method=h2o) evicts while decoding, so a speculative draft's rejected tokens "
                            "could not be rolled back", "use method=snapkv with drafts, or drop draft(...)")
        check_evictable(program)
        policy = self.policy()
        new = dataclasses.replace(program.clone(), kv_policy=policy)
        layers = sorted(attention_by_layer(new.gm.graph))
        ctx.say(f"kv-evict({policy.method}): {len(layers)} layers keep "
                + (f"{policy.tokens} tokens" if policy.tokens else f"{policy.budget:.1%} of the prompt")
                + " per KV head")
        return PassResult(new, modified=True, count=len(layers), report={
            "policy": policy.to_dict(), "layers": layers,
            "note": "the graph is unchanged; measure the loss with eval --continuation / --passkey"})


def check_evictable(program: Program) -> None:
    """Refuse programs whose caches compaction would break (see the module docstring's scope)."""
    for layer, nodes in attention_by_layer(program.gm.graph).items():
        if len(nodes) > 1:
            raise PassError(f"layer {layer} is split into head groups by a per-head pattern; kv-evict keeps every "
                            "head's cache the same length", "use sparse-attention(pattern=duo|razor) or kv-evict")
        kw = nodes[0].kwargs
        if not bool(kw.get("causal", True)):
            raise PassError(f"layer {layer} is bidirectional; kv-evict needs a causal decoder")
        window, sinks, blocks = int(kw.get("window", 0)), int(kw.get("sinks", 0)), str(kw.get("blocks", ""))  # type: ignore[call-overload]
        if window or sinks or blocks:
            what = f"a sliding window of {window}" if window else f"{sinks} sinks" if sinks else f"blocks {blocks}"
            raise PassError(f"layer {layer} has {what}, a mask that counts key slots, which eviction renumbers; "
                            "kv-evict needs every layer to keep a full cache (not built yet for Gemma3's or "
                            "Mistral's sliding-window layers)",
                            "apply kv-evict to a model with full attention, without sparse-attention")
