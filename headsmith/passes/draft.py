"""``draft(method=layer-skip|quantized|pruned, ...)``: add a speculative-decoding draft built from the model itself.
Exact (the target is unchanged; the draft's agreement with it is reported).

The draft is a :class:`~headsmith.program.DraftProgram` kept beside the target and lowered with it (its decode
graph only: ``draft_<name>`` in the artifact). It shares the target's weights wherever they are the same tensors
(layer-skip: all of them, so nothing more is stored) and the target's KV cache: for every layer it runs, its decode
graph reads the target's cached keys and values (computed by the full model, so the draft sees the exact context)
and appends its own for the drafted tokens, which the verify step then overwrites (Draft & Verify, Zhang et al.
2023; SWIFT, Xia et al. 2024). So a draft needs no prefill, no cache and no rollback of its own.

Before / after, ``draft(layers=[1])`` on 3 blocks::

    h1 = block0(h0)                 target (unchanged)             draft_layer-skip (blocks 0 and 2, layers 0, 2)
    h2 = block1(h1)        ->       h1 = block0(h0) .. h3 = ..  +   h1 = block0(h0)
    h3 = block2(h2)                                                 h3 = block2(h1)       # same weight tensors
    logits = head(h3)                                               logits = head(h3)

One speculative step::

    target cache [P]  --draft(last) -> d1 --draft(d1) -> d2 ... dk     (draft layers append at P, P+1, ..)
    truncate to P;   verify([last, d1 .. dk]) on the target            (every layer writes P .. P+k)

Methods:

- ``layer-skip``: the target with the blocks ``layers=[...]`` skipped (their output is their input). With
  ``search=true`` the skipped set is chosen on calibration text by expected speed-up, not by a fixed rule:
  greedily, the block whose removal keeps the draft's top-1 agreement with the target highest goes next, and the
  set kept is the one with the best modelled speed-up ``E[tokens per step] / (k c + 1)``, where
  ``E = (1 - a^(k+1)) / (1 - a)`` (a: agreement, taken as the acceptance; c: the draft's weight bytes per step
  over the target's; k: the best draft length for that pair). Agreement is measured teacher-forced with the
  draft's own keys for the context, a lower bound of what it sees in deployment (the target's).
- ``quantized``: the target through ``passes`` (default ``quantize(weights=int4)``): every layer, low-bit weights,
  cheap to read and highly agreeable. Its float weights that stay unquantised (norms) are shared.
- ``pruned``: any headsmith pipeline as the draft (``passes="prune-layers(n=12), heal(minutes=2)"``), provided
  it keeps the shape of the cache of every layer it keeps (``prune-layers``, ``prune-mlp``, ``heal``,
  ``quantize`` do; ``gqa``, ``mla`` and ``prune-heads`` change it and are refused).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..errors import PassError
from ..fxutil import erase_dead, get_tensor, is_call, prune_unused_attrs
from ..program import DraftProgram, Program
from ..sites import ATTENTION
from .base import Pass, PassContext, PassResult
from .calib import batches
from .kv_cache import CACHE_POINT, cache_layout
from .scores import BlockRunner, calibration_rows
from .structure import Block, find_blocks

SOURCE_LAYER = "headsmith_draft_source_layer"
"""Node meta on attention ops and cache points: the target layer a draft layer came from (kept through the
renumbering of ``prune-layers``)."""
DEFAULT_QUANTIZED = "quantize(weights=int4)"
MAX_K = 8


@dataclass(frozen=True)
class Draft(Pass):
    """Add a speculative-decoding draft built from the model (layer-skip, quantized or pruned). Exact."""

    name: ClassVar[str] = "draft"
    exact: ClassVar[bool] = True

    method: Literal["layer-skip", "quantized", "pruned"] = "layer-skip"
    """How the draft is built (see the module docstring)."""
    layers: tuple[int, ...] = ()
    """layer-skip: the blocks to skip."""
    search: bool = False
    """layer-skip: choose the skipped blocks by modelled speed-up on calibration text (instead of layers)."""
    max_skip: float = 0.75
    """layer-skip search: the largest fraction of the blocks it may skip."""
    calibration_tokens: int = 1024
    """layer-skip search: calibration tokens the agreement is measured on."""
    passes: str = ""
    """quantized / pruned: the pipeline that makes the draft from the target."""
    label: str = ""
    """The draft's name in the artifact (``headsmith run --draft NAME``; default: the method)."""

    def __post_init__(self) -> None:
        if self.method == "layer-skip":
            if bool(self.layers) == self.search:
                raise ValueError("draft(method=layer-skip) needs layers=[...] or search=true (one of them)")
            if self.passes:
                raise ValueError("draft(method=layer-skip) takes no passes (use method=pruned)")
        elif self.layers or self.search:
            raise ValueError(f"layers and search are options of method=layer-skip, not method={self.method}")
        if self.method == "pruned" and not self.passes:
            raise ValueError('draft(method=pruned) needs passes="..." (e.g. passes="prune-layers(n=12)")')
        if not 0.0 < self.max_skip < 1.0:
            raise ValueError(f"max_skip must be in (0, 1), got {self.max_skip}")
        if self.label and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.label):
            raise ValueError(f"label must be lower-case letters, digits, '-' or '_', got {self.label!r}")
        if self.calibration_tokens < 16:
            raise ValueError(f"calibration_tokens must be >= 16, got {self.calibration_tokens}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.info.task != "causal-lm":
            raise PassError(f"a draft speculates tokens for a causal LM; {program.info.architecture} is an encoder",
                            "drop draft(...) from the passes")
        if program.prefill_prune is not None:
            raise PassError("prefill-prune is not built with speculative drafts (their layers would need the stage "
                            "key masks)", "drop draft(...), or prefill-prune")
        label = self.label or self.method
        if any(d.name == label for d in program.drafts):
            raise PassError(f"the program already has a draft named {label!r}", "give this one label=NAME")
        n_layers = len(cache_layers(program))
        if self.method == "layer-skip":
            blocks = find_blocks(program)
            if len(blocks) != n_layers:
                raise PassError(f"found {len(blocks)} residual blocks for {n_layers} attention layers",
                                "layer-skip needs a plain stack of transformer blocks; use method=quantized")
            report: dict[str, Any] = {}
            skip = set(self.layers)
            if self.search:
                skip, report = search_skip(program, blocks, calibration_rows(program, ctx, self.calibration_tokens),
                                           int(self.max_skip * len(blocks)), ctx)
            bad = sorted(i for i in skip if not 0 <= i < len(blocks))
            if bad or len(skip) >= len(blocks):
                raise PassError(f"cannot skip blocks {sorted(skip)} of {len(blocks)}",
                                f"give block indices in 0..{len(blocks) - 1}, keeping at least one")
            draft = skip_blocks(program, skip)
            report["skipped"] = sorted(skip)
        else:
            draft, report = self._pipeline(program, ctx)
        layers = check_cache(program, draft)
        report.update(draft=label, method=self.method, layers=list(layers),
                      weight_bytes_ratio=draft.decode_weight_bytes() / max(1, program.decode_weight_bytes()),
                      **agreement(program, draft, ctx))
        ctx.say(f"draft {label}: {len(layers)} of {n_layers} layers, {report['weight_bytes_ratio']:.2f}x the "
                f"weight bytes, top-1 agreement {report['top1_agreement']:.3f} on calibration text")
        new = dataclasses.replace(program, drafts=(*program.drafts, DraftProgram(label, self.method, draft,
                                                                                  tuple(layers), report)))
        return PassResult(new, modified=True, count=1, report=report)

    def _pipeline(self, program: Program, ctx: PassContext) -> tuple[Program, dict[str, Any]]:
        from .manager import PassManager

        spec = self.passes or DEFAULT_QUANTIZED
        manager = PassManager.from_spec(spec)
        if self.method == "quantized" and not any(p.name == "quantize" for p in manager.passes):
            raise PassError(f"draft(method=quantized) got passes={spec!r} without quantize(...)",
                            "use method=pruned for other pipelines")
        if any(p.name == "draft" for p in manager.passes):
            raise PassError("a draft's passes cannot add drafts of their own", "list each draft(...) at the top level")
        source = stamp_layers(program)
        sub = dataclasses.replace(ctx, source=None)  # heal inside the draft compares with the draft's input
        out = manager.run(source, sub)
        return dataclasses.replace(out, drafts=()), {"passes": spec}


def cache_layers(program: Program) -> list[int]:
    """The layers that cache keys and values (or a latent), in order."""
    return sorted({e.layer for e in cache_layout(program)})


def stamp_layers(program: Program) -> Program:
    """A clone whose attention ops and cache points remember their layer under :data:`SOURCE_LAYER`."""
    out = program.clone()
    for node in out.gm.graph.nodes:
        if is_call(node, ATTENTION):
            node.meta.setdefault(SOURCE_LAYER, int(node.kwargs.get("layer", 0)))  # type: ignore[arg-type]
        elif is_call(node, CACHE_POINT):
            node.meta.setdefault(SOURCE_LAYER, int(node.args[1]))  # type: ignore[arg-type]
    return out


def source_layers(draft: Program) -> dict[int, int]:
    """``draft layer -> target layer`` (the identity where no pass renumbered)."""
    out: dict[int, int] = {}
    for node in draft.gm.graph.nodes:
        if is_call(node, ATTENTION):
            layer = int(node.kwargs.get("layer", 0))  # type: ignore[arg-type]
        elif is_call(node, CACHE_POINT):
            layer = int(node.args[1])  # type: ignore[arg-type]
        else:
            continue
        out[layer] = int(node.meta.get(SOURCE_LAYER, layer))
    return out


def shared_entries(target: Program, draft: Program) -> list[tuple[int, int]]:
    """``(target layer, index of the target's cache entry)`` for each draft cache entry, in the draft's order; every
    one must have the shape of the target's entry of that layer and slot (the draft reads and writes the target's
    cache)."""
    origin = source_layers(draft)
    theirs = {(e.layer, e.group, e.slot): (i, e) for i, e in enumerate(cache_layout(target))}
    out = []
    for e in cache_layout(draft):
        source = origin.get(e.layer, e.layer)
        i, t = theirs.get((source, e.group, e.slot), (-1, None))
        if t is None or t.shape != e.shape or t.seq_dim != e.seq_dim or t.window != e.window:
            what = "has no such entry" if t is None else f"caches {list(t.shape)}"
            raise PassError(f"the draft's cache entry {e.name} {list(e.shape)} does not fit the target's cache "
                            f"(its layer {source} {what})",
                            "a draft shares the target's cache: keep its KV heads and head dims (no gqa, mla or "
                            "prune-heads in the draft's passes)")
        out.append((source, i))
    return out


def check_cache(target: Program, draft: Program) -> list[int]:
    """The target layers the draft runs (refused unless its cache fits the target's, see :func:`shared_entries`)."""
    return sorted({layer for layer, _ in shared_entries(target, draft)})


def skip_blocks(program: Program, skip: set[int]) -> Program:
    """The program with ``skip`` blocks bypassed; the others keep their layer numbers and weights (shared)."""
    out = program.clone()
    blocks = find_blocks(out)
    for i in sorted(skip, reverse=True):
        blocks[i].x_out.replace_all_uses_with(blocks[i].x_in)
    erase_dead(out.gm.graph)
    prune_unused_attrs(out.gm)
    out.gm.graph.lint()
    out.gm.recompile()
    out._shapes = None
    return dataclasses.replace(out, drafts=())


@torch.no_grad()
def agreement(target: Program, draft: Program, ctx: PassContext, rows: int = 2) -> dict[str, float]:
    """Top-1 agreement of the draft with the target on calibration text (teacher-forced)."""
    ids = calibration_rows(target, ctx, 512)
    same = total = 0
    for x in batches(target, ids, rows):
        a, b = target.gm(*x).argmax(-1), draft.gm(*x).argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return {"top1_agreement": same / max(1, total)}


def expected_speedup(agree: float, cost: float, max_k: int = MAX_K) -> tuple[float, int]:
    """``(speed-up, k)``: the best modelled speed-up of drafting k tokens with per-token acceptance ``agree`` at
    ``cost`` (one draft step over one target step), and its k (see the module docstring)."""
    best = (1.0, 0)
    for k in range(1, max_k + 1):
        tokens = k + 1 if agree >= 1.0 else (1.0 - agree ** (k + 1)) / (1.0 - agree)
        best = max(best, (tokens / (k * cost + 1.0), k))
    return best


def block_bytes(program: Program, block: Block) -> int:
    """Weight bytes one block reads (each tensor once)."""
    seen: dict[int, int] = {}
    for node in block.nodes:
        for arg in (node, *node.all_input_nodes):
            if arg.op == "get_attr":
                t = get_tensor(program.gm, str(arg.target))
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.no_grad()
def search_skip(program: Program, blocks: list[Block], ids: Tensor, limit: int, ctx: PassContext, rows: int = 2,
                patience: int = 4) -> tuple[set[int], dict[str, Any]]:
    """Greedy backward elimination by agreement; the prefix of removals with the best modelled speed-up."""
    runner = BlockRunner(program, blocks)
    inputs = list(batches(program, ids, rows))
    statics = [runner.static(x) for x in inputs]
    targets = [runner.run(s, set())[0].argmax(-1) for s in statics]
    total = program.decode_weight_bytes()
    sizes = {b.index: block_bytes(program, b) for b in blocks}
    removed: set[int] = set()
    best: tuple[float, int, int] = (1.0, 0, 0)  # speed-up, k, removals
    trail: list[dict[str, Any]] = []
    while len(removed) < limit:
        candidates = [b.index for b in blocks if b.index not in removed]
        same = dict.fromkeys(candidates, 0)
        count = 0
        for static, ref in zip(statics, targets):
            _, states = runner.run(static, removed, keep=[blocks[j].x_in for j in candidates])
            for j in candidates:
                state = states.get(blocks[j].x_in)
                start = j if runner.startable[j] and j > 0 and state is not None else 0
                logits, _ = runner.run(static, removed | {j}, start, state if start else None)
                same[j] += int((logits.argmax(-1) == ref).sum())
            count += ref.numel()
        pick = max(candidates, key=lambda j: (same[j], sizes[j]))
        removed.add(pick)
        agree = same[pick] / max(1, count)
        cost = max(0.0, total - sum(sizes[j] for j in removed)) / max(1, total)
        speedup, k = expected_speedup(agree, cost)
        trail.append({"skip": pick, "agreement": round(agree, 4), "cost": round(cost, 4),
                      "speedup": round(speedup, 3), "k": k})
        ctx.say(f"layer-skip search: skipping {len(removed)} blocks (last {pick}): agreement {agree:.3f}, "
                f"cost {cost:.2f}, modelled speed-up {speedup:.2f}x at k={k}")
        if speedup > best[0]:
            best = (speedup, k, len(removed))
        elif best[2] and len(removed) - best[2] >= patience:  # none found yet: go on to the limit
            break
    order = [t["skip"] for t in trail]
    chosen = set(order[:best[2]])
    if not chosen:
        raise PassError("layer-skip search found no skipped set with a modelled speed-up above 1 on the "
                        "calibration text", "give layers=[...] explicitly, or use method=quantized")
    return chosen, {"search": trail, "modelled_speedup": round(best[0], 3), "modelled_k": best[1],
                    "search_agreement": trail[best[2] - 1]["agreement"]}


def draft_layer_map(program: Program) -> dict[str, list[int]]:
    """``draft name -> indices of the target's cache entries its decode graph reads and writes``, in the
    draft's entry order (for the manifest)."""
    out: dict[str, list[int]] = {}
    for d in program.drafts:
        try:
            out[d.name] = [i for _, i in shared_entries(program, d.program)]
        except PassError as e:
            raise PassError(f"draft {d.name!r} no longer fits the target: {e.message}",
                            "a pass after draft(...) changed the target's cache; put draft(...) after it") from e
    return out


__all__ = ["Draft", "check_cache", "draft_layer_map", "expected_speedup", "search_skip", "skip_blocks"]
