"""Attention sites: the per-layer view of a raised program that passes read and edit.

A raised program holds one ``headsmith.attention`` node per attention layer, in the canonical form
(letters: B batch, S sequence, H heads, D head dim, E model width)::

    x_BSE ─ linear(W_q, b_q) ─ view[B,S,-1,D] ─ (q_norm) ─ transpose(1,2) ─ (rope) ─┐
    x_BSE ─ linear(W_k, b_k) ─ view[B,S,-1,D] ─ (k_norm) ─ transpose(1,2) ─ (rope) ─┤ attention ─ transpose ─ reshape ─ linear(W_o, b_o)
    x_BSE ─ linear(W_v, b_v) ─ view[B,S,-1,D] ──────────── transpose(1,2) ─────────┘

:func:`find_sites` recovers, for each attention node, its projections (the nearest ``linear`` ancestor
of q, k and v and the nearest ``linear`` descendant of the output), the RoPE nodes, and the head counts.
Sites are always derived from the graph, never stored, so they cannot go stale after a rewrite.

A layer whose heads follow different attention patterns (``sparse-attention(pattern=duo|razor)``, see
``passes/head_groups.py``) holds one attention node per *head group*, each reading a contiguous slice of the
layer's q/k/v heads, their outputs concatenated over heads before the output projection::

    q ─ slice(1, 0, a) ─ attention(.., window=0) ───────┐
    q ─ slice(1, a, H) ─ attention(.., window=W, sinks=S) ┴ cat(dim=1) ─ transpose ─ reshape ─ linear(W_o)

Each group is a site of its own (same ``layer``, its own head counts; both report the layer's ``o``);
:func:`head_groups` lists the layers that are split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from . import ops as _ops  # noqa: F401  (registers torch.ops.headsmith)
from .fxutil import VIEW_OPS, ancestors, is_call
from .qweights import LINEAR_Q, packed_args

aten = torch.ops.aten
ATTENTION = torch.ops.headsmith.attention.default
LINEAR = aten.linear.default
LINEARS = (LINEAR, LINEAR_Q)
"""A projection is a float ``linear`` or a quantised ``linear_q`` (see :mod:`headsmith.qweights`)."""


@dataclass(frozen=True)
class Projection:
    """One ``aten.linear`` node with its weight and optional bias ``get_attr`` targets. For a quantised
    projection (``linear_q``, or a linear reading a cast 16-bit weight) ``weight`` names the stored tensor
    (the packed codes, or the 16-bit copy) and ``quantized`` is set: passes that slice weights refuse it."""

    node: fx.Node
    weight: str
    bias: str | None
    quantized: bool = False

    @staticmethod
    def of(node: fx.Node) -> Projection | None:
        q = packed_args(node)
        w = q.packed if q is not None else node.args[1]
        b = node.args[4] if q is not None else (node.args[2] if len(node.args) > 2 else None)
        cast = is_call(w, aten._to_copy.default)
        if cast:
            w = w.args[0]  # type: ignore[union-attr]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            return None
        if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
            return None
        return Projection(node, str(w.target), str(b.target) if b is not None else None, q is not None or cast)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding applied as ``x*cos + rotate_half(x)*sin`` on the first ``dims`` dims."""

    dims: int
    cos: fx.Node
    """The ``[B,1,S,dims]`` cosine table node (shared by q and k)."""
    sin: fx.Node
    """The ``[B,1,S,dims]`` sine table node."""


@dataclass(frozen=True)
class AttentionSite:
    """Everything a pass needs to know about one attention layer of a raised program."""

    node: fx.Node
    layer: int
    q: Projection
    k: Projection
    v: Projection
    o: Projection | None
    rope: Rope | None
    qk_norm: bool
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int

    @property
    def causal(self) -> bool:
        return bool(self.node.kwargs.get("causal", True))

    @property
    def window(self) -> int:
        return int(self.node.kwargs.get("window", 0))  # type: ignore[arg-type]

    @property
    def sinks(self) -> int:
        return int(self.node.kwargs.get("sinks", 0))  # type: ignore[arg-type]

    @property
    def blocks(self) -> str:
        """The block-sparse layout (:mod:`headsmith.block_sparse`; "" for none)."""
        return str(self.node.kwargs.get("blocks", ""))

    @property
    def scale(self) -> float:
        return float(self.node.kwargs.get("scale", 0.0))  # type: ignore[arg-type]

    @property
    def softcap(self) -> float:
        return float(self.node.kwargs.get("softcap", 0.0))  # type: ignore[arg-type]

    @property
    def kind(self) -> str:
        if not self.causal:
            return "bidirectional"
        if self.blocks:
            return "block-sparse"
        return "sliding" if self.window > 0 else "causal"


def attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if is_call(n, ATTENTION)]


def nearest_linears(start: fx.Node) -> list[fx.Node]:
    """The ``aten.linear`` nodes reached walking back from ``start`` without crossing another linear."""
    found: list[fx.Node] = []

    def stop(n: fx.Node) -> bool:
        if is_call(n, *LINEARS) and n is not start:
            found.append(n)
            return True
        # shape reads (sym_size) are not data flow: do not follow them
        return n.op in ("get_attr", "placeholder") or is_call(n, aten.sym_size.int)

    ancestors([start], stop)
    return found


def is_head_group_cat(node: fx.Node) -> bool:
    """``cat([attention, attention, ..], 1)``: the outputs of a split layer's head groups."""
    parts = node.args[0] if is_call(node, aten.cat.default) else None
    dim = node.args[1] if len(node.args) > 1 else 0
    return (isinstance(parts, (list, tuple)) and len(parts) > 1 and dim == 1
            and all(is_call(p, ATTENTION) for p in parts))


def attention_by_layer(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """``layer -> its attention nodes`` in graph order (one per head group; one for an unsplit layer)."""
    by_layer: dict[int, list[fx.Node]] = {}
    for i, att in enumerate(attention_nodes(graph)):
        by_layer.setdefault(int(att.kwargs.get("layer", i)), []).append(att)  # type: ignore[arg-type]
    return by_layer


def head_groups(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """The split layers: ``layer -> [attention node of each head group]`` for layers with more than one."""
    return {layer: nodes for layer, nodes in attention_by_layer(graph).items() if len(nodes) > 1}


def output_projection(node: fx.Node) -> fx.Node | None:
    """Follow the attention output through view-like ops (and a split layer's head-group cat) to the linear
    that consumes it."""
    cur = node
    for _ in range(16):
        users = list(cur.users)
        if len(users) != 1:
            return None
        user = users[0]
        if is_call(user, *LINEARS) and user.args[0] is cur:
            return user
        if not (is_call(user, *VIEW_OPS) or is_head_group_cat(user)):
            return None
        cur = user
    return None


def find_rope(q_in: fx.Node, projection: fx.Node) -> tuple[Rope | None, bool]:
    """Find ``x*cos + rotate_half(x)*sin`` and per-head norms between a projection and ``q_in``."""
    region = ancestors([q_in], lambda n: n is projection or n.op in ("get_attr", "placeholder")
                       or is_call(n, aten.sym_size.int))
    has_norm = any(is_call(n, aten.rsqrt.default, aten.layer_norm.default, aten.rms_norm.default)
                   for n in region)
    for n in region:
        if not is_call(n, aten.cat.default):
            continue
        parts = n.args[0]
        if not isinstance(parts, (list, tuple)) or len(parts) != 2:
            continue
        neg, low = parts
        if not is_call(neg, aten.neg.default) or not is_call(low, aten.slice.Tensor):
            continue
        high = neg.args[0]  # type: ignore[union-attr]
        if not is_call(high, aten.slice.Tensor):
            continue
        half = high.args[2]  # type: ignore[union-attr]
        if not isinstance(half, int) or high.args[0] is not low.args[0]:  # type: ignore[union-attr]
            continue
        sin = _other_factor(n)
        cos = _cos_factor(high.args[0], n)  # type: ignore[union-attr, arg-type]
        if sin is None or cos is None:
            continue
        return Rope(dims=2 * half, cos=cos, sin=sin), has_norm
    return None, has_norm


def _other_factor(rot: fx.Node) -> fx.Node | None:
    for user in rot.users:
        if is_call(user, aten.mul.Tensor):
            other = user.args[1] if user.args[0] is rot else user.args[0]
            if isinstance(other, fx.Node):
                return other
    return None


def _cos_factor(x: fx.Node, rot: fx.Node) -> fx.Node | None:
    sin = _other_factor(rot)
    for user in x.users:
        if is_call(user, aten.mul.Tensor):
            other = user.args[1] if user.args[0] is x else user.args[0]
            if isinstance(other, fx.Node) and other is not sin and other is not rot:
                return other
    return None


def kv_source(node: fx.Node) -> fx.Node:
    """The cached key/value behind ``index_select(x, 1, kv_index)`` (KV heads expanded in the graph, as
    ``prune-heads`` does for unequal GQA groups), else ``node``: its dim 1 is the true number of KV heads."""
    if is_call(node, aten.index_select.default) and node.args[1] == 1 and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return node


class SiteError(Exception):
    """Raised by :func:`find_sites` with the node that does not fit the canonical form."""

    def __init__(self, reason: str, node: fx.Node) -> None:
        super().__init__(reason)
        self.reason = reason
        self.node = node


def find_sites(gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> list[AttentionSite]:
    """The attention sites of a raised graph, in graph order; ``shapes`` maps nodes to concrete shapes."""
    sites: list[AttentionSite] = []
    for i, node in enumerate(attention_nodes(gm.graph)):
        q_in, k_in, v_in = node.args[0], node.args[1], node.args[2]
        projections: list[Projection] = []
        for name, inp in (("q", q_in), ("k", k_in), ("v", v_in)):
            assert isinstance(inp, fx.Node)
            lins = nearest_linears(inp)
            if len(lins) != 1:
                raise SiteError(f"the {name} input of attention is reached from {len(lins)} linear "
                                "projections, expected exactly one", node)
            proj = Projection.of(lins[0])
            if proj is None:
                raise SiteError(f"the {name} projection's weight is not a stored tensor", lins[0])
            projections.append(proj)
        o_node = output_projection(node)
        o_proj = Projection.of(o_node) if o_node is not None else None
        assert isinstance(q_in, fx.Node) and isinstance(k_in, fx.Node) and isinstance(v_in, fx.Node)
        rope_q, q_norm = find_rope(q_in, projections[0].node)
        rope_k, k_norm = find_rope(k_in, projections[1].node)
        if (rope_q is None) != (rope_k is None):
            raise SiteError("RoPE is applied to only one of q and k", node)
        q_shape, k_shape, v_shape = shapes[q_in], shapes[kv_source(k_in)], shapes[v_in]
        layer = node.kwargs.get("layer", -1)
        sites.append(AttentionSite(
            node=node, layer=int(layer) if isinstance(layer, int) and layer >= 0 else i,
            q=projections[0], k=projections[1], v=projections[2], o=o_proj,
            rope=rope_k, qk_norm=q_norm or k_norm,
            n_heads=q_shape[1], n_kv_heads=k_shape[1], head_dim=q_shape[3], v_head_dim=v_shape[3]))
    return sites
