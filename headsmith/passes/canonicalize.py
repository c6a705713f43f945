"""``canonicalize``: rewrite the spellings transformers uses into one form. Exact.

Rules (each is a ``check`` and a ``rewrite`` function; rule sets compose with ``+``):

- ``identity``: ``alias(x)``, ``clone(x)``, ``dropout(x, p, train=False)``, ``lift_fresh_copy(x)``,
  ``slice(x, d, 0, INT_MAX)`` -> ``x``
- ``conv1d``: ``view(addmm(b, view(x, [-1, E]), W), [*lead, N])`` -> ``linear(x, W.T, b)`` (GPT-2's Conv1D)
- ``fused-linear``: ``slice(linear(x, W, b), -1, a, c)`` and ``split(linear(x, W, b))[i]``
  -> ``linear(x, W[a:c], b[a:c])`` when every user of the fused linear is such a slice
  (Phi-3's ``qkv_proj`` / ``gate_up_proj``, GPT-2's ``c_attn``)
- ``eager-attention``: ``matmul(softmax(matmul(q, k.T) * s + mask), v)`` -> ``sdpa(q, k, v, mask, scale=s)``

After the rules, dead nodes are removed. Before / after for ``fused-linear``::

    qkv = linear(x, w_qkv)                 q = linear(x, w_qkv_s0_64)
    q = slice(qkv, 2, 0, 64)        ->     k = linear(x, w_qkv_s64_96)
    k = slice(qkv, 2, 64, 96)
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from ..fxutil import add_weight, erase_dead, is_call, last_dim_of, rank_of, weight_of
from ..program import Program
from .base import MatchResult, Pass, PassContext, PassResult

aten = torch.ops.aten
LINEAR = aten.linear.default
SDPA = aten.scaled_dot_product_attention.default
INT_MAX = 9223372036854775807


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[fx.Node, fx.GraphModule], MatchResult]
    rewrite: Callable[[fx.Node, fx.GraphModule], None]


# ---- identity ----------------------------------------------------------------------------------
# alias(x) | clone(x) | dropout(x, p, False) | lift_fresh_copy(x) | slice(x, d, 0, INT_MAX) -> x
def _check_identity(node: fx.Node, gm: fx.GraphModule) -> MatchResult:
    if is_call(node, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default):
        return MatchResult.success()
    if is_call(node, aten.slice.Tensor):
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else INT_MAX
        step = node.args[4] if len(node.args) > 4 else 1
        if start in (0, None) and end in (INT_MAX, None) and step == 1:
            return MatchResult.success()
        return MatchResult.fail("a partial slice", node)
    if is_call(node, aten.dropout.default):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        return MatchResult.success() if train is False else MatchResult.fail("dropout in training mode", node)
    return MatchResult.fail("not an identity op", node)


def _rewrite_identity(node: fx.Node, gm: fx.GraphModule) -> None:
    src = node.args[0]
    assert isinstance(src, fx.Node)
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)


# ---- conv1d ------------------------------------------------------------------------------------
# view(addmm(b, view(x, [-1, E]), W), [*lead, N]) -> linear(x, W.T, b)
def _check_conv1d(node: fx.Node, gm: fx.GraphModule) -> MatchResult:
    if not is_call(node, aten.view.default, aten.reshape.default):
        return MatchResult.fail("not a view", node)
    mm = node.args[0]
    if not is_call(mm, aten.addmm.default) or len(mm.users) != 1:  # type: ignore[union-attr]
        return MatchResult.fail("not a view of a single-use addmm", node)
    assert isinstance(mm, fx.Node)
    bias, flat, w = mm.args[0], mm.args[1], mm.args[2]
    if weight_of(gm, w) is None or weight_of(gm, bias) is None:
        return MatchResult.fail("addmm operands are not stored weights", mm)
    if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
        return MatchResult.fail("addmm with alpha/beta", mm)
    if not is_call(flat, aten.view.default, aten.reshape.default):
        return MatchResult.fail("addmm input is not a flattening view", mm)
    x = flat.args[0]  # type: ignore[union-attr]
    x_rank, out_shape = rank_of(x), node.args[1]
    if x_rank is None or not isinstance(out_shape, (list, tuple)) or len(out_shape) != x_rank:
        return MatchResult.fail("the view does not restore the input's rank", node)
    return MatchResult.success()


def _rewrite_conv1d(node: fx.Node, gm: fx.GraphModule) -> None:
    mm = node.args[0]
    assert isinstance(mm, fx.Node)
    bias, flat, w = mm.args
    assert isinstance(flat, fx.Node) and isinstance(w, fx.Node)
    weight = weight_of(gm, w)
    assert weight is not None
    w_t = add_weight(gm, gm.graph, f"{w.target}_t", weight.t().contiguous(), node)
    with gm.graph.inserting_before(node):
        lin = gm.graph.call_function(LINEAR, (flat.args[0], w_t, bias))
    lin.meta = dict(node.meta)
    node.replace_all_uses_with(lin)
    gm.graph.erase_node(node)


# ---- fused-linear ------------------------------------------------------------------------------
# slice(linear(x, W, b), -1, a, c) -> linear(x, W[a:c], b[a:c])   (for every user of the linear)
def _row_ranges(lin: fx.Node) -> list[tuple[fx.Node, int, int]] | None:
    """For each user of a fused linear, (user, first row, end row); None if a user is not a slice."""
    rank, width = rank_of(lin), last_dim_of(lin)
    if rank is None or width is None:
        return None
    last = rank - 1
    out: list[tuple[fx.Node, int, int]] = []
    for user in lin.users:
        if is_call(user, aten.slice.Tensor):
            dim = user.args[1] if len(user.args) > 1 else 0
            start = user.args[2] if len(user.args) > 2 else 0
            end = user.args[3] if len(user.args) > 3 else INT_MAX
            step = user.args[4] if len(user.args) > 4 else 1
            if dim not in (-1, last) or step != 1 or not isinstance(start, int) or not isinstance(end, int):
                return None
            out.append((user, start, min(end, width)))
            continue
        if is_call(user, aten.split.Tensor, aten.split_with_sizes.default):
            dim = user.args[2] if len(user.args) > 2 else 0
            if dim not in (-1, last):
                return None
            size = user.args[1]
            sizes = list(size) if isinstance(size, (list, tuple)) else [size] * (width // size)  # type: ignore[operator]
            if not all(isinstance(s, int) for s in sizes) or sum(sizes) != width:
                return None
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for getitem in user.users:
                if getitem.target is not operator.getitem:
                    return None
                i = getitem.args[1]
                assert isinstance(i, int)
                out.append((getitem, starts[i], starts[i] + sizes[i]))
            continue
        return None
    return out


def _check_fused(node: fx.Node, gm: fx.GraphModule) -> MatchResult:
    if not is_call(node, LINEAR) or weight_of(gm, node.args[1]) is None:
        return MatchResult.fail("not a linear with a stored weight", node)
    ranges = _row_ranges(node)
    if ranges is None or len(ranges) < 2:
        return MatchResult.fail("users are not last-dim slices", node)
    return MatchResult.success()


def _rewrite_fused(node: fx.Node, gm: fx.GraphModule) -> None:
    ranges = _row_ranges(node)
    assert ranges is not None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    weight, bias = weight_of(gm, w), weight_of(gm, b)
    assert weight is not None and isinstance(w, fx.Node)
    for user, start, end in ranges:
        w_part = add_weight(gm, gm.graph, f"{w.target}_s{start}_{end}", weight[start:end].contiguous(), user)
        b_part = None
        if bias is not None and isinstance(b, fx.Node):
            b_part = add_weight(gm, gm.graph, f"{b.target}_s{start}_{end}", bias[start:end].contiguous(), user)
        with gm.graph.inserting_before(user):
            lin = gm.graph.call_function(LINEAR, (x, w_part, b_part) if b_part is not None else (x, w_part))
        lin.meta = dict(user.meta)
        user.replace_all_uses_with(lin)
    for user in list(node.users):
        for u in list(user.users):
            if not u.users:
                gm.graph.erase_node(u)
        if not user.users:
            gm.graph.erase_node(user)


# ---- eager-attention ---------------------------------------------------------------------------
# matmul(softmax(matmul(q, transpose(k, -2, -1)) * s [+ mask]), v) -> sdpa(q, k, v, mask, scale=s)
def _eager_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None, float] | None:
    if not is_call(node, aten.matmul.default):
        return None
    probs, v = node.args[0], node.args[1]
    while is_call(probs, aten.dropout.default, aten._to_copy.default, aten.to.dtype):
        probs = probs.args[0]  # type: ignore[union-attr]
    if not is_call(probs, aten.softmax.int, aten._softmax.default):
        return None
    scores = probs.args[0]  # type: ignore[union-attr]
    mask = None
    if is_call(scores, aten.add.Tensor):
        scores, mask = scores.args[0], scores.args[1]  # type: ignore[union-attr]
    scale = 1.0
    if is_call(scores, aten.mul.Tensor) and isinstance(scores.args[1], float):  # type: ignore[union-attr]
        scale = float(scores.args[1])  # type: ignore[union-attr, arg-type]
        scores = scores.args[0]  # type: ignore[union-attr]
    elif is_call(scores, aten.div.Tensor) and isinstance(scores.args[1], float):  # type: ignore[union-attr]
        scale = 1.0 / float(scores.args[1])  # type: ignore[union-attr, arg-type]
        scores = scores.args[0]  # type: ignore[union-attr]
    if not is_call(scores, aten.matmul.default):
        return None
    q, kt = scores.args[0], scores.args[1]  # type: ignore[union-attr]
    if not is_call(kt, aten.transpose.int) or sorted(kt.args[1:3]) not in ([2, 3], [-2, -1]):  # type: ignore[union-attr]
        return None
    k = kt.args[0]  # type: ignore[union-attr]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    if mask is not None and not isinstance(mask, fx.Node):
        return None
    return q, k, v, mask, scale  # type: ignore[return-value]


def _check_eager(node: fx.Node, gm: fx.GraphModule) -> MatchResult:
    if _eager_parts(node) is None:
        return MatchResult.fail("not matmul(softmax(q @ k.T * s + mask), v)", node)
    rank = rank_of(node)
    if rank is not None and rank != 4:
        return MatchResult.fail("attention is not 4-D", node)
    return MatchResult.success()


def _rewrite_eager(node: fx.Node, gm: fx.GraphModule) -> None:
    parts = _eager_parts(node)
    assert parts is not None
    q, k, v, mask, scale = parts
    with gm.graph.inserting_before(node):
        sdpa = gm.graph.call_function(SDPA, (q, k, v, mask), {"scale": scale})
    sdpa.meta = dict(node.meta)
    node.replace_all_uses_with(sdpa)
    gm.graph.erase_node(node)


IDENTITY_RULES = (Rule("identity", _check_identity, _rewrite_identity),)
LINEAR_RULES = (Rule("conv1d", _check_conv1d, _rewrite_conv1d), Rule("fused-linear", _check_fused, _rewrite_fused))
ATTENTION_RULES = (Rule("eager-attention", _check_eager, _rewrite_eager),)
CANONICAL_RULES = IDENTITY_RULES + LINEAR_RULES + ATTENTION_RULES


def apply_rules(gm: fx.GraphModule, rules: tuple[Rule, ...], max_rounds: int = 8) -> dict[str, int]:
    """Apply ``rules`` until none matches; returns how often each rule fired."""
    fired = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            for rule in rules:
                if rule.check(node, gm):
                    rule.rewrite(node, gm)
                    fired[rule.name] += 1
                    changed = True
                    break
        if not changed:
            break
    erase_dead(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return fired


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Rewrite fused/Conv1D projections, identities and eager attention into the canonical form. Exact."""

    name: ClassVar[str] = "canonicalize"
    exact: ClassVar[bool] = True
    float_weights: ClassVar[bool] = False
    needs_raised: ClassVar[bool] = False

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        fired = apply_rules(new.gm, CANONICAL_RULES)
        count = sum(fired.values())
        return PassResult(new, modified=count > 0, count=count, report={"rules": fired})


@dataclass(frozen=True)
class Dce(Pass):
    """Remove nodes whose values are never used, and weights no node reads. Exact."""

    name: ClassVar[str] = "dce"
    exact: ClassVar[bool] = True
    float_weights: ClassVar[bool] = False
    needs_raised: ClassVar[bool] = False

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        count = erase_dead(new.gm.graph)
        from ..fxutil import prune_unused_attrs
        prune_unused_attrs(new.gm)
        new.gm.recompile()
        return PassResult(new, modified=count > 0, count=count)
