"""``prune-layers(n=K | ratio=F, score=...)``: remove whole transformer blocks. Lossy.

A block is removed by making its output its input (blocks come from :func:`structure.find_blocks`: nodes grouped
by their ``nn_module_stack`` path, one residual value in and one out); dead code elimination then drops the
block's nodes and weights. Before / after, removing block 1 of 3::

    h1 = block0(h0)                          h1 = block0(h0)
    h2 = block1(h1)            ->            h3 = block2(h1)      # renumbered: block1(h1)
    h3 = block2(h2)                          logits = lm_head(norm(h3))
    logits = lm_head(norm(h3))

The remaining blocks are renumbered so the program reads like a shallower model of the same architecture:
their weights move to the new index (``model.layers.2.*`` -> ``model.layers.1.*``), as do their module paths,
the ``layer`` of their attention ops and cache points, and the config's ``num_hidden_layers`` / ``layer_types``
(so ``--export hf`` writes a checkpoint ``from_pretrained`` loads).

Which blocks (``score``):

- ``auto`` (default): ``ppl`` for causal LMs, ``angular`` for encoders;
- ``ppl`` (MultiPruner's block step): greedily, K times, the block whose removal gives the lowest calibration
  perplexity (causal LMs only; K passes over the remaining blocks: minutes on SmolLM2, where it beat the other
  scores at 3 and 9 of 30 blocks, see docs/pruning.md);
- ``angular`` (Gromov et al.): the contiguous span of K blocks whose input and output states have the
  smallest angular distance on calibration text;
- ``influence`` (ShortGPT): the K blocks with the lowest Block Influence ``1 − cos(x_in, x_out)``;
- ``random``: K blocks drawn with ``ctx.seed``.

``start=S`` removes the fixed span S .. S+K-1 instead (the score is not used).

Preconditions: a plain stack of residual blocks (a block's output has the shape of its input); at least one
block stays.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from ..errors import PassError
from ..fxutil import erase_dead, get_tensor, is_call, prune_unused_attrs, set_tensor
from ..program import Program
from ..sites import ATTENTION
from .base import Pass, PassContext, PassResult
from .kv_cache import CACHE_POINT
from .scores import calibration_rows, greedy_ppl, layer_scores
from .structure import Block, find_blocks


@dataclass(frozen=True)
class PruneLayers(Pass):
    """Remove whole transformer blocks chosen by angular distance, block influence, perplexity or at random. Lossy."""

    name: ClassVar[str] = "prune-layers"
    exact: ClassVar[bool] = False

    n: int = 0
    """Blocks to remove."""
    ratio: float = 0.0
    """Fraction of the blocks to remove (rounded; instead of n)."""
    score: Literal["auto", "ppl", "angular", "influence", "random"] = "auto"
    """How blocks are chosen (see the module docstring)."""
    calibration_tokens: int = 2048
    """Calibration tokens the scores are measured on."""
    start: int = -1
    """Remove the span of n blocks that starts at this block instead of scoring (-1: use score)."""

    def __post_init__(self) -> None:
        if self.n < 0 or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"n must be >= 0 and ratio in [0, 1), got n={self.n}, ratio={self.ratio}")
        if self.n > 0 and self.ratio > 0.0:
            raise ValueError("give n or ratio, not both")
        if self.calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be >= 1, got {self.calibration_tokens}")

    def count(self, n_blocks: int) -> int:
        return self.n if self.n > 0 else int(round(self.ratio * n_blocks))

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        blocks = find_blocks(new)
        k = self.count(len(blocks))
        if k == 0 or not blocks:
            return PassResult(new, modified=False, count=0)
        if k >= len(blocks):
            raise PassError(f"cannot remove {k} of the program's {len(blocks)} blocks", "keep at least one block")
        remove, report = self._choose(new, blocks, k, ctx)
        params_before = new.n_params()
        self._remove(new, blocks, remove)
        report.update(removed=sorted(remove), removed_paths=[blocks[i].path for i in sorted(remove)],
                      blocks_before=len(blocks), blocks_after=len(blocks) - k, params_before=params_before,
                      params_after=new.n_params())
        return PassResult(new, modified=True, count=k, report=report)

    def _choose(self, program: Program, blocks: list[Block], k: int, ctx: PassContext) -> tuple[set[int], dict[str, Any]]:
        if self.start >= 0:
            if self.start + k > len(blocks):
                raise PassError(f"the span of {k} blocks from block {self.start} runs past the last block "
                                f"({len(blocks) - 1})", f"give start <= {len(blocks) - k}")
            return set(range(self.start, self.start + k)), {"score": "fixed span"}
        if self.score == "random":
            g = torch.Generator().manual_seed(ctx.seed)
            return {int(i) for i in torch.randperm(len(blocks), generator=g)[:k]}, {"score": "random"}
        ids = calibration_rows(program, ctx, self.calibration_tokens)
        score = self.score
        if score == "auto":
            score = "ppl" if program.info.task == "causal-lm" else "angular"
        if score == "ppl":
            order = greedy_ppl(program, ids, k, blocks, progress=ctx.say)
            return {i for i, _ in order}, {"score": "ppl", "calibration_perplexity": [p for _, p in order]}
        scores = layer_scores(program, ids, blocks)
        if score == "influence":
            chosen = torch.argsort(scores.influence)[:k]
            return {int(i) for i in chosen}, {"score": "influence", "influence": scores.influence.tolist()}
        span = scores.span(k)
        first = int(torch.argmin(span))
        return set(range(first, first + k)), {"score": "angular", "span_distance": span.tolist()}

    def _remove(self, program: Program, blocks: list[Block], remove: set[int]) -> None:
        gm = program.gm
        for i in sorted(remove, reverse=True):  # from the last: a removed block's input may be removed too
            blocks[i].x_out.replace_all_uses_with(blocks[i].x_in)
        erase_dead(gm.graph)
        prune_unused_attrs(gm)
        kept = [b for b in blocks if b.index not in remove]
        for new_index, block in enumerate(kept):
            _renumber(gm, block, new_index)
        gm.graph.lint()
        gm.recompile()
        program._shapes = None
        program.info = dataclasses.replace(program.info, config=_config(program.info.config, len(blocks), remove))


def _renumber(gm: fx.GraphModule, block: Block, new_index: int) -> None:
    """Move a block to ``container.new_index``: weights, module paths, attention/cache-point layer indices."""
    old, new = block.path, f"{block.container}.{new_index}"
    if old == new:
        return

    def moved(path: str) -> str:
        return new + path[len(old):] if path == old or path.startswith(old + ".") else path

    for node in gm.graph.nodes:
        if node.op != "get_attr" or moved(str(node.target)) == str(node.target):
            continue
        if not any(u in block.nodes for u in node.users):
            continue
        target = moved(str(node.target))
        set_tensor(gm, target, get_tensor(gm, str(node.target)))
        node.target = target
    prune_unused_attrs(gm)
    for node in block.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (moved(str(p)), t) for k, (p, t) in stack.items()}
        if is_call(node, ATTENTION):
            node.kwargs = {**node.kwargs, "layer": new_index}
        if is_call(node, CACHE_POINT):
            node.args = (node.args[0], new_index, *node.args[2:])


def _config(config: dict[str, Any], n_blocks: int, remove: set[int]) -> dict[str, Any]:
    """The HF config with ``num_hidden_layers`` and per-layer ``layer_types`` of the remaining blocks."""
    out = json.loads(json.dumps(config))
    for cfg in (out, out.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in ("num_hidden_layers", "n_layer"):
            if cfg.get(key) == n_blocks:
                cfg[key] = n_blocks - len(remove)
        types = cfg.get("layer_types")
        if isinstance(types, list) and len(types) == n_blocks:
            cfg["layer_types"] = [t for i, t in enumerate(types) if i not in remove]
    return out
