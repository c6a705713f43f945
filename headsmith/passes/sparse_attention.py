"""``sparse-attention(pattern=streaming|duo|razor|block|power, ...)``: attention sinks + a sliding window, for
every head or per head, or a static block-sparse layout. Lossy.

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

**Per-head policies** (``pattern=duo`` / ``pattern=razor``): a few KV heads retrieve from anywhere in the text and
need the full cache; most attend locally and lose little when they stream. A calibration scores every KV head,
``duo`` by training DuoAttention's gates (:mod:`headsmith.passes.duo`), ``razor`` by RazorAttention's echo and
induction attention on repeated random tokens (:mod:`headsmith.passes.razor`); the top heads over all layers keep
their full cache (retrieval heads), the others stream with ``window`` / ``sinks``, as many retrieval heads as fit
``kv_budget``: the fraction of the full model's KV bytes at ``context`` tokens (a streaming head holds
``min(context, S + W)`` tokens, a retrieval head all of them, so at longer contexts the fraction only falls). Each
layer then splits into two head groups (:mod:`headsmith.passes.head_groups`), each with its own cache entries.

**Block-sparse layouts** (``pattern=block`` / ``pattern=power``, :mod:`headsmith.block_sparse`): the text is cut
into blocks of ``block`` tokens and a query block sees only some key blocks: its own and the ``local - 1``
before it, the first ``sink_blocks``, and either every ``stride``-th block (``block``: local + global + strided,
Phi-3-small's layout) or the blocks at power-of-two distances (``power``: PowerAttention, whose receptive field
doubles with every layer, so a deep model still reaches every token)::

    attention(q, k, v, mask, causal=True)      ->      attention(q, k, v, mask, causal=True, blocks="power:64:1:1:0")

Layers with a window of their own (Gemma3's local layers) keep it. The layout is a prefill saving: its work
falls with the fraction of block pairs visible (:meth:`BlockPattern.density`) on an engine whose kernel skips
the hidden blocks (the torch engine's FlexAttention); decode steps still keep and read the whole cache, since
a later query may see any block again (``power``) or the strided ones (``block``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..block_sparse import BlockPattern
from ..corpus import retrieval_samples
from ..errors import PassError
from ..program import Program
from ..sites import AttentionSite, attention_nodes
from .base import Pass, PassContext, PassResult
from .duo import duo_gates
from .head_groups import check_splittable, split_layer
from .razor import razor_scores
from .structure import refresh_values

PATTERNS = ("streaming", "duo", "razor", "block", "power")
PLANNED = ("moa",)


@dataclass(frozen=True)
class SparseAttention(Pass):
    """Sparse attention patterns: attention sinks + a sliding window (StreamingLLM). Lossy."""

    name: ClassVar[str] = "sparse-attention"
    exact: ClassVar[bool] = False
    float_weights: ClassVar[bool] = False

    pattern: str = "streaming"
    """``streaming``: every layer attends to the first ``sinks`` tokens and the last ``window``; ``duo`` / ``razor``:
    only the KV heads outside the budget do (chosen by DuoAttention's gates / RazorAttention's scores)."""
    window: int = 1024
    """Keys in the sliding window (the query's own included)."""
    sinks: int = 4
    """First tokens every query keeps attending to."""
    kv_budget: float = 0.5
    """duo / razor: the fraction of the full model's KV bytes at ``context`` tokens the heads may keep."""
    context: int = 0
    """duo / razor: the context length the budget is measured at (0: the model's maximum positions)."""
    calibration_length: int = 1024
    """duo / razor: tokens per calibration row (duo: passkey rows; razor: two copies of half as many)."""
    steps: int = 32
    """duo: gate-training steps (one row each)."""
    block: int = 64
    """block / power: tokens per block."""
    local: int = 0
    """block / power: blocks of local attention, the query's own included (0: 4 for block, 1 for power)."""
    sink_blocks: int = 1
    """block / power: first blocks every query sees."""
    stride: int = -1
    """block: every ``stride``-th block is visible from everywhere (-1: 8; 0: none)."""

    def __post_init__(self) -> None:
        if self.pattern in PLANNED:
            raise ValueError(f"pattern={self.pattern} is not built yet (MoA's per-head windows are planned); "
                             "use pattern=duo or razor for per-head policies")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (keys a query sees, its own included), got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if not 0.0 < self.kv_budget <= 1.0:
            raise ValueError(f"kv_budget is a fraction of the full KV bytes in (0, 1], got {self.kv_budget}")
        if self.context < 0 or self.calibration_length < 16 or self.steps < 1:
            raise ValueError("context must be >= 0 (0: the model's positions), calibration_length >= 16, steps >= 1")
        if self.pattern in ("block", "power"):
            self.layout()  # checks block / local / sink_blocks / stride
        elif self.stride != -1:
            raise ValueError("stride is an option of pattern=block")

    def layout(self) -> BlockPattern:
        """The block layout of ``pattern=block|power``."""
        local = self.local or (4 if self.pattern == "block" else 1)
        stride = (8 if self.pattern == "block" else 0) if self.stride == -1 else self.stride
        return BlockPattern(self.pattern, self.block, local, self.sink_blocks, stride)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.info.task != "causal-lm":
            raise PassError(f"sparse-attention(pattern={self.pattern}) is a decoder pattern; "
                            f"{program.info.architecture} is a bidirectional encoder",
                            "apply it to a causal LM")
        if self.pattern in ("block", "power"):
            return self._blocks(program, ctx)
        if self.pattern != "streaming":
            return self._per_head(program, ctx)
        new = program.clone()
        count, layers = 0, []
        for node in attention_nodes(new.gm.graph):
            if not bool(node.kwargs.get("causal", True)):
                continue
            old = int(node.kwargs.get("window", 0))  # type: ignore[arg-type]
            window = min(old, self.window) if old > 0 else self.window
            node.kwargs = {**node.kwargs, "window": window, "sinks": self.sinks, "blocks": ""}
            layers.append({"layer": int(node.kwargs.get("layer", count)), "window": window,  # type: ignore[arg-type]
                           "sinks": self.sinks, "was_window": old})
            count += 1
        if count == 0:
            raise PassError("the program has no causal attention for sparse-attention to rewrite")
        new.gm.recompile()
        new._shapes = None
        return PassResult(new, modified=True, count=count, report={"pattern": self.pattern, "layers": layers})

    def _blocks(self, program: Program, ctx: PassContext) -> PassResult:
        layout = self.layout()
        new = program.clone()
        layers, kept = [], []
        for node in attention_nodes(new.gm.graph):
            layer = int(node.kwargs.get("layer", -1))  # type: ignore[arg-type]
            if not bool(node.kwargs.get("causal", True)):
                continue
            if int(node.kwargs.get("window", 0)) > 0:  # type: ignore[arg-type]
                kept.append(layer)
                continue
            node.kwargs = {**node.kwargs, "blocks": layout.encode()}
            layers.append(layer)
        if not layers:
            raise PassError(f"sparse-attention(pattern={self.pattern}) found no causal full-attention layer (layers "
                            f"with their own window keep it: {sorted(set(kept))})", "apply it to a causal LM")
        new.gm.recompile()
        new._shapes = None
        tokens = program.info.max_positions or 8192
        ctx.say(f"sparse-attention({layout.describe()}): {len(layers)} layers; {layout.density(tokens):.1%} of the "
                f"causal block pairs visible at {tokens} tokens")
        return PassResult(new, modified=True, count=len(layers), report={
            "pattern": self.pattern, "blocks": layout.encode(), "layers": layers, "windowed_layers": kept,
            "density": {str(t): round(layout.density(t), 4) for t in (2048, 4096, 8192)}})

    # ---- per-head policies ---------------------------------------------------------------------
    def _per_head(self, program: Program, ctx: PassContext) -> PassResult:
        sites = [s for s in program.sites() if s.causal]
        if not sites:
            raise PassError("the program has no causal attention for sparse-attention to rewrite")
        for site in sites:
            check_splittable(program, site, self.pattern)
        context = self.context or program.info.max_positions or 0
        if context <= 0:
            raise PassError("the model does not say how many positions it supports",
                            "give the budget's context length: sparse-attention(..., context=N)")
        scores, extra = self._scores(program, ctx, sites)
        keep, kept, full = self._choose(sites, scores, context)
        new = program.clone()
        layers = []
        for site in new.sites():
            if not site.causal:
                continue
            kind = split_layer(new, site, keep[site.layer], self.window, self.sinks)
            layers.append({"layer": site.layer, "retrieval": keep[site.layer], "kind": kind,
                           "scores": [round(float(x), 5) for x in scores[site.layer]]})
        new.gm.graph.lint()
        new.gm.recompile()
        refresh_values(new.gm)  # the head groups' nodes get their shapes (the ONNX lowering reads them)
        new._shapes = None
        n_kv = sum(s.n_kv_heads for s in sites)
        n_keep = sum(len(v) for v in keep.values())
        ctx.say(f"sparse-attention({self.pattern}): {n_keep} of {n_kv} KV heads keep the full cache, "
                f"{kept / full:.1%} of the KV bytes at {context} tokens")
        return PassResult(new, modified=True, count=len(layers), report={
            "pattern": self.pattern, "window": self.window, "sinks": self.sinks, "context": context,
            "kv_budget": self.kv_budget, "kv_fraction": kept / full, "retrieval_heads": n_keep, "kv_heads": n_kv,
            "layers": layers, **extra})

    def _scores(self, program: Program, ctx: PassContext, sites: list[AttentionSite]
                ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
        """Per layer, one score per KV head (higher: keep the full cache)."""
        length = min(self.calibration_length, program.info.max_positions or self.calibration_length)
        if self.pattern == "razor":
            ctx.say(f"razor: echo / induction attention on 2 x {length // 2} repeated random tokens")
            razor = razor_scores(program, length // 2, seed=ctx.seed)
            kv = razor.kv_scores([s.n_kv_heads for s in sites])
            return dict(zip(razor.layers, kv)), {}
        ids, answer = retrieval_samples(program, min(8, self.steps), length, seed=ctx.seed)
        ctx.say(f"duo: training {sum(s.n_kv_heads for s in sites)} gates, {self.steps} steps on passkey rows of "
                f"{ids.shape[1]} tokens")
        duo = duo_gates(program, ids, answer, self.window, self.sinks, steps=self.steps)
        return dict(zip(duo.layers, duo.kv_scores())), {
            "gates": [[round(float(x), 4) for x in g] for g in duo.gates],
            "distill_kl": [round(x, 5) for x in duo.losses]}

    def _choose(self, sites: list[AttentionSite], scores: dict[int, torch.Tensor], context: int
                ) -> tuple[dict[int, list[int]], int, int]:
        """The retrieval KV heads of each layer within the budget; also the kept and the full KV tokens summed
        over the heads (both at ``context`` tokens)."""
        def held(window: int) -> int:
            return min(context, window) if window > 0 else context

        cost = {}
        for s in sites:
            stream = min(s.window, self.window) if s.window > 0 else self.window
            cost[s.layer] = (held(s.window), held(stream + self.sinks))
        full = sum(cost[s.layer][0] * s.n_kv_heads for s in sites)
        total = sum(cost[s.layer][1] * s.n_kv_heads for s in sites)
        if total > self.kv_budget * full:
            raise PassError(f"kv_budget={self.kv_budget} is below what the streaming heads alone keep at {context} "
                            f"tokens ({total / full:.1%} with window={self.window}, sinks={self.sinks})",
                            "raise kv_budget, shorten the window, or measure at a longer context=")
        ranked = sorted(((float(scores[s.layer][h]), s.layer, h) for s in sites for h in range(s.n_kv_heads)),
                        reverse=True)
        keep: dict[int, list[int]] = {s.layer: [] for s in sites}
        for _, layer, h in ranked:
            extra = cost[layer][0] - cost[layer][1]
            if total + extra <= self.kv_budget * full:
                keep[layer].append(h)
                total += extra
        return {k: sorted(v) for k, v in keep.items()}, total, full
