"""``kv-cache`` lowering: build the prefill and decode graphs of a raised causal LM.

Letters: B batch, T new tokens, P cached tokens, H KV heads, D head dim, V vocab.

- **prefill** ``(input_ids[B,T], position_ids[B,T], attention_mask[B,T]) -> (logits[B,T,V], *cache)``
- **decode** ``(input_ids[B,T], position_ids[B,T], attention_mask[B,P+T], *past) -> (logits[B,T,V], *present)``
  with ``T >= 1`` (``T > 1`` is what speculative verification uses) and ``P >= 0``.

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
from ..sites import ATTENTION, attention_nodes

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
    """The layer's sliding window (0: full). Entries keep all tokens; the window is applied by the mask."""

    def bytes_per_token(self, itemsize: int) -> int:
        n = 1
        for i, d in enumerate(self.shape):
            if i not in (0, self.seq_dim):
                n *= d
        return n * itemsize


@dataclass(frozen=True)
class CachePoint:
    node: fx.Node
    entry: CacheEntry


def _points(gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> list[CachePoint]:
    points: list[CachePoint] = []
    marked = [n for n in gm.graph.nodes if is_call(n, CACHE_POINT)]
    marked_layers = {int(n.args[1]) for n in marked}  # type: ignore[arg-type]
    for n in marked:
        layer, slot, seq_dim = int(n.args[1]), int(n.args[2]), int(n.args[3])  # type: ignore[arg-type]
        shape = list(shapes[n])
        shape[0], shape[seq_dim] = -1, -1
        points.append(CachePoint(n, CacheEntry(f"layer{layer}.slot{slot}", layer, f"slot{slot}", tuple(shape),
                                               seq_dim, "float32")))
    for i, att in enumerate(attention_nodes(gm.graph)):
        layer = int(att.kwargs.get("layer", i))  # type: ignore[arg-type]
        if layer in marked_layers:
            continue
        window = int(att.kwargs.get("window", 0))  # type: ignore[arg-type]
        for slot, arg in (("key", att.args[1]), ("value", att.args[2])):
            assert isinstance(arg, fx.Node)
            shape = list(shapes[arg])
            shape[0], shape[2] = -1, -1
            points.append(CachePoint(arg, CacheEntry(f"layer{layer}.{slot}", layer, slot, tuple(shape), 2,
                                                     "float32", window)))
    points.sort(key=lambda p: (p.entry.layer, p.entry.slot != "key", p.entry.slot))
    return points


def cache_layout(program: Program) -> list[CacheEntry]:
    """The cache entries of ``program``'s decode graph, in input/output order."""
    return [p.entry for p in _points(program.gm, program.shapes())]


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
    graph = gm.graph
    out = graph.output_node()
    logits = out.args[0]
    out.args = (tuple([logits, *outputs]),)
    for n in [n for n in graph.nodes if is_call(n, CACHE_POINT)]:
        n.replace_all_uses_with(n.args[0])  # type: ignore[arg-type]
        graph.erase_node(n)
    erase_dead(graph)
    graph.lint()
    gm.recompile()
    return gm


def prefill_graph(program: Program, last_only: bool = True) -> tuple[fx.GraphModule, list[CacheEntry]]:
    """``(ids, pos, mask) -> (logits, *cache)`` (see the module docstring).

    With ``last_only`` the LM head runs on the last position only (logits ``[B,1,V]``), as generation
    needs; a whole-sequence forward is the decode graph with an empty past.
    """
    gm, _, shapes = _prepare(program)
    points = _points(gm, shapes)
    if last_only:
        _lm_head_last_position(gm, program.info.vocab_size)
    return _finish(gm, [p.node for p in points]), [p.entry for p in points]


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


def decode_graph(program: Program) -> tuple[fx.GraphModule, list[CacheEntry]]:
    """``(ids, pos, mask[B,P+T], *past) -> (logits, *present)`` (see the module docstring)."""
    gm, inputs, shapes = _prepare(program)
    graph = gm.graph
    points = _points(gm, shapes)
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
    return _finish(gm, presents), [p.entry for p in points]


def layout_dict(entries: list[CacheEntry]) -> list[dict[str, Any]]:
    return [asdict(e) for e in entries]
