"""``kv-cache`` lowering: build the prefill and decode graphs of a raised causal LM.

Letters: B batch, T new tokens, P cached tokens, H KV heads, D head dim, V vocab.

- **prefill** ``(input_ids[B,T], position_ids[B,T], attention_mask[B,T]) -> (logits[B,T,V], *cache)``
- **decode** ``(input_ids[B,T], position_ids[B,T], attention_mask[B,P+T], *past) -> (logits[B,T,V], *present)``
  with ``T >= 1`` (``T > 1`` is what speculative verification uses) and ``P >= 0``.
- with a KV eviction policy (``passes/kv_evict.py``) the prefill also returns ``scores_layer{L}[B,G,T]`` per layer
  after the cache (h2o: the decode graph too, ``[B,G,P+T]``): what the runtime ranks the cached tokens by.

What is cached is found per layer: by default the ``k`` and ``v`` inputs of the ``headsmith.attention``
node (post-RoPE, ``[B,H,S,D]``, sequence dim 2); a pass that caches something else (MLA caches its latent)
marks it with ``headsmith.cache_point(x, layer, slot, seq_dim)``. In the decode graph every cached value
``c`` becomes ``cat([past, c], seq_dim)``, and everything downstream of it (up-projections included) runs
over the whole sequence. The raised op aligns queries to the end of the keys, so causal, sliding-window and
padding masks need no other change. Before / after for one layer::

    k = rope(view(linear(x, W_k)))             k = rope(view(linear(x, W_k)))
    attention(q, k, v, key_mask)        ->     k_all = cat([past_key_0, k], 2)
                                               attention(q, k_all, v_all, key_mask)    # outputs k_all, v_all

The layout of each cache entry goes into the artifact manifest (:func:`cache_layout`).

**Ring caches** (``ring=True``): a layer with a sliding window of ``W`` keys and ``S`` sinks can never see more
than ``S + W`` keys, so its entries get ``capacity = S + W`` slots: the sinks, a ring of ``W - 1`` recent tokens
and the step's own token (the runtime's ``ring.py`` assigns the slots). Keys are cached after RoPE and attention
does not depend on the order of its keys, so the slots need not follow the text. The decode graph gives each
such layer its own key mask ``ring_mask_s{S}_w{W}[B, L+T]`` (``L`` cached slots, ``T`` new tokens; the runtime
builds it from the attention mask, padding included) instead of the full ``attention_mask``. The layer keeps its
window and sinks: while the slots still follow the text (no token evicted yet, or a cache-less forward) they are
the exact mask, and once the ring is full a step of one token sees exactly its ``S + W`` cached keys, where the
window masks nothing. Steps of several tokens on a full ring run one token at a time (the engines do it).

**Pruned prefill stages** (``prefill-prune``): a layer of stage ``s > 0`` caches only the prompt tokens that
reached it, so the decode graph gives it the stage's key mask ``prune_mask_stage{S}[B, K+T]`` (built by the
runtime from the kept tokens' mask and the step's columns) and its entries their own past length; the staged
prefill graphs are built in ``prefill_stages.py``.

**Head groups**: a layer split by a per-head pattern (``passes/head_groups.py``) has one attention node per group
of KV heads; each group caches its own ``k``/``v`` (entries ``layer{L}.g{G}.key`` / ``.value``, ``group = G``) with
its own window, sinks and capacity, so a retrieval group keeps every token while a streaming group keeps a ring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import BackendError
from ..fxutil import clone_module, erase_dead, is_call
from ..program import Program
from ..qweights import LINEAR_Q
from ..sites import ATTENTION, attention_by_layer, attention_nodes
from ..token_pruning import PrunePlan
from .kv_scores import key_scores_outputs

aten = torch.ops.aten


@torch.library.custom_op("headsmith::cache_point", mutates_args=())
def cache_point(x: Tensor, layer: int, slot: int, seq_dim: int) -> Tensor:
    """Identity that marks ``x`` as the cached value ``slot`` of ``layer`` (sequence along ``seq_dim``)."""
    return x.clone()


@cache_point.register_fake
def _cache_point_fake(x: Tensor, layer: int, slot: int, seq_dim: int) -> Tensor:
    return torch.empty_like(x)


cache_point.register_autograd(lambda ctx, grad: (grad, None, None, None),
                              setup_context=lambda ctx, inputs, output: None)
CACHE_POINT = torch.ops.headsmith.cache_point.default


@dataclass(frozen=True)
class CacheEntry:
    """One cached tensor: ``shape`` with ``-1`` for batch and sequence."""

    name: str
    layer: int
    slot: str
    shape: tuple[int, ...]
    seq_dim: int
    dtype: str
    window: int = 0
    """The layer's sliding window (0: full)."""
    sinks: int = 0
    """The layer's attention sinks (first tokens that stay visible besides the window)."""
    capacity: int = 0
    """Slots of a ring cache (``sinks + window``; see the module docstring); 0: the entry keeps every token and
    the window is applied by the mask."""
    group: int = 0
    """The head group within the layer (a layer split by a per-head pattern caches each group apart)."""
    stage: int = 0
    """The pruned prefill stage of its layer (``prefill-prune``): 0 caches every prompt token, stage ``s`` only
    those that reached it."""

    @property
    def key_mask(self) -> str:
        """The decode graph's own key-mask input for this entry's layer: a ring's, or a pruned prefill stage's;
        ``""``: the layer reads ``attention_mask``."""
        if self.capacity > 0:
            return ring_mask_name(self.sinks, self.window)
        return stage_mask_name(self.stage) if self.stage > 0 else ""

    def bytes_per_token(self, itemsize: int) -> int:
        n = 1
        for i, d in enumerate(self.shape):
            if i not in (0, self.seq_dim):
                n *= d
        return n * itemsize


def ring_mask_name(sinks: int, window: int) -> str:
    return f"ring_mask_s{sinks}_w{window}"


def stage_mask_name(stage: int) -> str:
    return f"prune_mask_stage{stage}"


@dataclass(frozen=True)
class CachePoint:
    node: fx.Node
    entry: CacheEntry


def _pattern(att: fx.Node, ring: bool) -> tuple[int, int, int]:
    """``(window, sinks, capacity)`` of one attention node's cache entries."""
    window, sinks = int(att.kwargs.get("window", 0)), int(att.kwargs.get("sinks", 0))  # type: ignore[arg-type]
    capacity = window + sinks if ring and window > 0 and bool(att.kwargs.get("causal", True)) else 0
    return window, sinks, capacity


def _points(gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]], ring: bool = False,
            plan: PrunePlan | None = None) -> list[CachePoint]:
    points: list[CachePoint] = []
    marked = [n for n in gm.graph.nodes if is_call(n, CACHE_POINT)]
    marked_layers = {int(n.args[1]) for n in marked}  # type: ignore[arg-type]
    groups = attention_by_layer(gm.graph)  # several nodes: a layer split into head groups
    for n in marked:
        layer, slot, seq_dim = int(n.args[1]), int(n.args[2]), int(n.args[3])  # type: ignore[arg-type]
        shape = list(shapes[n])
        shape[0], shape[seq_dim] = -1, -1
        pattern = _pattern(groups[layer][0], ring) if layer in groups else (0, 0, 0)
        points.append(CachePoint(n, CacheEntry(f"layer{layer}.slot{slot}", layer, f"slot{slot}", tuple(shape),
                                               seq_dim, "float32", *pattern, stage=_stage(plan, layer))))
    for layer, nodes in groups.items():
        if layer in marked_layers:
            continue
        for group, att in enumerate(nodes):
            prefix = f"layer{layer}.g{group}" if len(nodes) > 1 else f"layer{layer}"
            for slot, arg in (("key", att.args[1]), ("value", att.args[2])):
                assert isinstance(arg, fx.Node)
                shape = list(shapes[arg])
                shape[0], shape[2] = -1, -1
                points.append(CachePoint(arg, CacheEntry(f"{prefix}.{slot}", layer, slot, tuple(shape), 2, "float32",
                                                         *_pattern(att, ring), group=group,
                                                         stage=_stage(plan, layer))))
    points.sort(key=lambda p: (p.entry.layer, p.entry.group, p.entry.slot != "key", p.entry.slot))
    return points


def _stage(plan: PrunePlan | None, layer: int) -> int:
    return plan.stage_of(layer) if plan is not None else 0


def cache_layout(program: Program, ring: bool = False) -> list[CacheEntry]:
    """The cache entries of ``program``'s decode graph, in input/output order."""
    return [p.entry for p in _points(program.gm, program.shapes(), ring, program.prefill_prune)]


def _prepare(program: Program) -> tuple[fx.GraphModule, dict[str, fx.Node], dict[fx.Node, tuple[int, ...]]]:
    if program.info.task != "causal-lm":
        raise BackendError(f"{program.info.architecture} is an encoder: it has no decode step",
                           "encoders are exported as a single forward graph")
    if not attention_nodes(program.gm.graph):
        raise BackendError("the program has no headsmith.attention ops; load it with raising enabled")
    gm = clone_module(program.gm)
    shapes = {new: program.shapes()[old] for old, new in zip(program.gm.graph.nodes, gm.graph.nodes)
              if old in program.shapes()}
    graph = gm.graph
    inputs = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    # the mask's length becomes P+T in the decode graph: every use other than the key mask reads T from ids
    for user in list(mask.users):
        if is_call(user, aten.sym_size.int):
            with graph.inserting_after(user):
                size = graph.call_function(aten.sym_size.int, (ids, user.args[1]))
            size.meta = dict(user.meta)
            user.replace_all_uses_with(size)
            graph.erase_node(user)
            continue
        if is_call(user, aten.ne.Scalar) and all(is_call(u, ATTENTION) for u in user.users):
            continue
        raise BackendError(f"cannot build a decode graph: attention_mask is used by {user.format_node()} "
                           "(only attention may read the mask)")
    return gm, inputs, shapes


def _finish(gm: fx.GraphModule, outputs: list[fx.Node]) -> fx.GraphModule:
    out = gm.graph.output_node()
    out.args = ((out.args[0], *outputs),)
    return finish_step_graph(gm)


def finish_step_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the cache points (identities) and the dead code; lint and recompile."""
    graph = gm.graph
    for n in [n for n in graph.nodes if is_call(n, CACHE_POINT)]:
        n.replace_all_uses_with(n.args[0])  # type: ignore[arg-type]
        graph.erase_node(n)
    erase_dead(graph)
    graph.lint()
    gm.recompile()
    return gm


def prefill_graph(program: Program, last_only: bool = True, ring: bool = False
                  ) -> tuple[fx.GraphModule, list[CacheEntry]]:
    """``(ids, pos, mask) -> (logits, *cache)`` (see the module docstring).

    With ``last_only`` the LM head runs on the last position only (logits ``[B,1,V]``), as generation
    needs; a whole-sequence forward is the decode graph with an empty past. The presents hold every prompt
    token, ring entries too (the runtime keeps the slots it needs).
    """
    gm, _, shapes = _prepare(program)
    points = _points(gm, shapes, ring, program.prefill_prune)
    if last_only:
        _lm_head_last_position(gm, program.info.vocab_size)
    scores = key_scores_outputs(gm, program, decode=False)
    return _finish(gm, [p.node for p in points] + scores), [p.entry for p in points]


def _lm_head_last_position(gm: fx.GraphModule, vocab: int) -> None:
    """Insert ``h[:, -1:]`` in front of the last linear that produces the logits."""
    graph = gm.graph
    logits = graph.output_node().args[0]
    lm_head = None
    feeding = _ancestors_of(logits)
    for node in reversed(list(graph.nodes)):
        if is_call(node, aten.linear.default, LINEAR_Q) and node in feeding:
            lm_head = node
            break
    if lm_head is None:
        raise BackendError("cannot find the LM head (the last linear before the logits)")
    hidden = lm_head.args[0]
    with graph.inserting_before(lm_head):
        last = graph.call_function(aten.slice.Tensor, (hidden, 1, -1, 9223372036854775807))
    lm_head.replace_input_with(hidden, last)  # type: ignore[arg-type]
    del vocab


def _ancestors_of(node: object) -> set[fx.Node]:
    from ..fxutil import ancestors
    return ancestors([node]) if isinstance(node, fx.Node) else set()


def decode_graph(program: Program, ring: bool = False, dense: bool = False
                 ) -> tuple[fx.GraphModule, list[CacheEntry]]:
    """``(ids, pos, mask[B,P+T], *past, *ring_masks) -> (logits, *present)`` (see the module docstring).

    ``dense``: a graph only run for steps that fit their ring (``L + T <= capacity``, no cache-less forward):
    ring layers drop their window and sinks, which mask nothing there (a kernel without sinks can take them).
    """
    gm, inputs, shapes = _prepare(program)
    graph = gm.graph
    points = _points(gm, shapes, ring, program.prefill_prune)
    last_input = list(inputs.values())[-1]
    presents: list[fx.Node] = []
    anchor = last_input
    for p in points:
        with graph.inserting_after(anchor):
            past = graph.placeholder(f"past_{p.entry.name.replace('.', '_')}")
        anchor = past
        with graph.inserting_after(p.node):
            cat = graph.call_function(aten.cat.default, ([past, p.node], p.entry.seq_dim))
        p.node.replace_all_uses_with(cat, delete_user_cb=lambda u, c=cat: u is not c)
        presents.append(cat)
    _layer_masks(gm, [p.entry for p in points], anchor, dense)
    scores = key_scores_outputs(gm, program, decode=True)
    return _finish(gm, presents + scores), [p.entry for p in points]


def _layer_masks(gm: fx.GraphModule, entries: list[CacheEntry], anchor: fx.Node, dense: bool) -> None:
    """Give every attention node with a ring, or in a pruned prefill stage, its own key mask input (one per
    distinct sinks/window, one per stage)."""
    graph = gm.graph
    own = {(e.layer, e.group): e for e in entries if e.key_mask}
    masks: dict[str, fx.Node] = {}
    for layer, nodes in attention_by_layer(graph).items():
        for group, att in enumerate(nodes):
            entry = own.get((layer, group))
            if entry is not None:
                anchor = _layer_mask(graph, att, entry, masks, anchor, dense)


def _layer_mask(graph: fx.Graph, att: fx.Node, entry: CacheEntry, masks: dict[str, fx.Node], anchor: fx.Node,
                dense: bool) -> fx.Node:
    """Point ``att``'s key mask at its entry's mask input (created at the first use); returns the new anchor."""
    name = entry.key_mask
    if name not in masks:
        with graph.inserting_after(anchor):
            placeholder = graph.placeholder(name)
        anchor = placeholder
        with graph.inserting_before(att):
            masks[name] = graph.call_function(aten.ne.Scalar, (placeholder, 0))
    args = list(att.args) + [None] * max(0, 4 - len(att.args))
    args[3] = masks[name]
    att.args = tuple(args)
    kwargs = {k: v for k, v in att.kwargs.items() if k != "key_mask"}
    if dense and entry.capacity > 0:
        kwargs.update(window=0, sinks=0)
    att.kwargs = kwargs
    return anchor


def decode_dynamic(entries: list[CacheEntry]) -> tuple[Any, ...]:
    """``dynamic_shapes`` of the decode graph's inputs for ``torch.export`` (ids, positions, mask, the pasts,
    the layers' own masks): ring and pruned-stage entries get their own past / total dims (they hold fewer tokens
    than the text)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    new = torch.export.Dim("new", min=1, max=65536)
    past = torch.export.Dim("past", min=0, max=1 << 20)
    total = torch.export.Dim("total", min=1, max=(1 << 20) + 65536)
    own = {r: (torch.export.Dim(r.replace("ring_mask", "past").replace("_mask", "_past"), min=0, max=1 << 20),
               torch.export.Dim(r.replace("ring_mask", "total").replace("_mask", "_total"), min=1,
                                max=(1 << 20) + 65536))
           for r in _mask_names(entries)}  # ring_mask_s4_w8: past_s4_w8; prune_mask_stage1: prune_past_stage1
    pasts = tuple({0: batch, e.seq_dim: own[e.key_mask][0] if e.key_mask else past} for e in entries)
    return ({0: batch, 1: new}, {0: batch, 1: new}, {0: batch, 1: total}, *pasts,
            *({0: batch, 1: own[r][1]} for r in own))


RING_EXAMPLE = 6
"""Slots of the ring (and pruned-stage) pasts in the traced example (any size traces the same graph; not 0/1,
not the others)."""


def decode_example(cache: list[Tensor], entries: list[CacheEntry], batch: int, vocab: int
                   ) -> tuple[tuple[Tensor, ...], tuple[Any, ...], list[str]]:
    """Example inputs (3 new tokens after the prefill's ``cache`` of 8), ``dynamic_shapes`` and input names of
    the decode graph of ``entries``."""
    past_len = int(cache[0].shape[entries[0].seq_dim]) if cache else 8
    ids = torch.randint(0, max(vocab, 1), (batch, 3), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(past_len, past_len + 3).expand(batch, 3).contiguous()
    mask = torch.ones(batch, past_len + 3, dtype=torch.int64)
    pasts = [c.narrow(e.seq_dim, 0, RING_EXAMPLE).contiguous() if e.key_mask else c
             for c, e in zip(cache, entries)]
    masks = [torch.ones(batch, RING_EXAMPLE + 3, dtype=torch.int64) for _ in _mask_names(entries)]
    names = ["input_ids", "position_ids", "attention_mask", *[f"past_{e.name.replace('.', '_')}" for e in entries],
             *_mask_names(entries)]
    return (ids, pos, mask, *pasts, *masks), decode_dynamic(entries), names


def _mask_names(entries: list[CacheEntry]) -> list[str]:
    """The decode graph's layer-mask inputs, in input order (rings', pruned stages')."""
    return list(dict.fromkeys(e.key_mask for e in entries if e.key_mask))


def layout_dict(entries: list[CacheEntry]) -> list[dict[str, Any]]:
    return [asdict(e) for e in entries]
