"""Head groups: split one attention layer into groups of KV heads that follow different patterns.

Letters: B batch, S sequence, H query heads, G KV heads, r = H / G query heads per KV head, a retrieval KV heads,
D head dim, Dv value head dim.

Per-head policies (DuoAttention, RazorAttention; ``sparse-attention(pattern=duo|razor)``) keep the full cache
for a few *retrieval* KV heads and only sinks + a window for the others (*streaming* heads). A cache tensor
``[B, G, S, D]`` has one length for all its heads, so a layer whose heads differ becomes one canonical
attention op per group, each over its own slice of the heads, with its own cache entries (the manifest's cache
layout then lists ``layer{L}.g0.key`` … with their own capacities, and the runtime keeps a ring for the
streaming group only).

The split first permutes the layer's heads so that the retrieval KV heads come first (the rows of ``W_q``, ``W_k``,
``W_v`` and their biases, the columns of ``W_o``: a relabelling of heads, exact), so each group is a contiguous
slice of the post-RoPE q/k/v; query head ``h`` keeps reading KV head ``h // r``. Before / after, a = retrieval KV
heads::

    attention(q[B,H,S,D], k[B,G,S,D], v, mask)          attention(q[:, :a*r], k[:, :a], v[:, :a], mask) ─────────┐
        ─ transpose ─ reshape ─ linear(W_o)     ->      attention(q[:, a*r:], k[:, a:], v[:, a:], mask, window=W, sinks=S) ┴ cat(1)
                                                            ─ transpose ─ reshape ─ linear(W_o[:, perm])

A layer whose heads all keep the full cache is left as it is; one whose heads all stream just gets the window.

Preconditions (checked, with the fix in the error): float weights (quantise afterwards), an output projection,
one attention op per layer with its KV heads read as they are (no ``prune-heads`` expansion: prune with
``unit=group``; no MLA latent, which all heads share: use ``pattern=streaming``). Passes that edit the head layout
(``gqa``, ``mla``, ``prune-heads``) refuse a split layer: run them first.
"""

from __future__ import annotations

import torch

from ..errors import PassError
from ..fxutil import is_call
from ..program import Program
from ..sites import ATTENTION, AttentionSite, head_groups
from .kv_cache import CACHE_POINT
from .prune_heads import take_heads

aten = torch.ops.aten


def check_splittable(program: Program, site: AttentionSite, pattern: str) -> None:
    """Refuse a layer whose heads cannot be split into groups (see the module docstring)."""
    where = f"layer {site.layer}"
    if site.layer in head_groups(program.gm.graph):
        raise PassError(f"{where} is already split into head groups", "apply one per-head pattern only")
    if site.o is None:
        raise PassError(f"{where}: no output projection was found after attention",
                        f"sparse-attention(pattern={pattern}) permutes the output projection's columns")
    if any(p.quantized for p in (site.q, site.k, site.v, site.o)):
        raise PassError(f"{where}: its projections are quantised", "put quantize(...) after sparse-attention")
    layer = site.node.kwargs.get("layer", site.layer)
    marked = [n for n in program.gm.graph.nodes if is_call(n, CACHE_POINT) and n.args[1] == layer]
    if marked:
        raise PassError(f"{where} caches values another pass marked ({marked[0].name}: an MLA latent, or a "
                        "prune-heads expansion), shared by heads that would fall into different groups",
                        "use pattern=streaming after mla; with prune-heads, prune with unit=group")


def split_layer(program: Program, site: AttentionSite, retrieval: list[int], window: int, sinks: int) -> str:
    """Split ``site`` (in place, on ``program``'s graph and weights) into the KV heads ``retrieval`` with their
    current pattern and the rest with ``window`` / ``sinks`` (a block layout there gives way to the window: the
    two are exclusive); returns ``full``, ``streaming`` or ``split``."""
    gm, graph, att = program.gm, program.gm.graph, site.node
    g, r = site.n_kv_heads, site.n_heads // site.n_kv_heads
    keep = sorted(set(retrieval))
    old = site.window
    stream_window = min(old, window) if old > 0 else window
    if len(keep) == g:
        return "full"
    if not keep:
        att.kwargs = {**att.kwargs, "window": stream_window, "sinks": sinks, "blocks": ""}
        return "streaming"
    order = keep + [h for h in range(g) if h not in keep]
    q_order = [h * r + j for h in order for j in range(r)]
    take_heads(gm, site.q, q_order, site.head_dim, rows=True)
    take_heads(gm, site.k, order, site.head_dim, rows=True)
    take_heads(gm, site.v, order, site.v_head_dim, rows=True)
    take_heads(gm, site.o, q_order, site.v_head_dim, rows=False)  # type: ignore[arg-type]
    a = len(keep)
    q, k, v = att.args[0], att.args[1], att.args[2]
    rest = tuple(att.args[3:])
    meta = {key: att.meta[key] for key in ("nn_module_stack", "stack_trace") if key in att.meta}
    with graph.inserting_before(att):
        groups = []
        for lo_q, hi_q, lo_kv, hi_kv, kw in ((0, a * r, 0, a, dict(att.kwargs)),
                                             (a * r, g * r, a, g, {**att.kwargs, "window": stream_window,
                                                                   "sinks": sinks, "blocks": ""})):
            parts = [graph.call_function(aten.slice.Tensor, (x, 1, lo, hi))
                     for x, lo, hi in ((q, lo_q, hi_q), (k, lo_kv, hi_kv), (v, lo_kv, hi_kv))]
            groups.append(graph.call_function(ATTENTION, (*parts, *rest), kw))
            for n in (*parts, groups[-1]):
                n.meta.update(meta)
        cat = graph.call_function(aten.cat.default, (groups, 1))
        cat.meta.update(meta)
    att.replace_all_uses_with(cat)
    graph.erase_node(att)
    return "split"
