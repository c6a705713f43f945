"""Lowering rewrites every engine uses before export (ONNX, TensorRT through ONNX, TVM). Exact.

- :func:`fuse_kv_attention`: ``attention(q, cat([past_k, k]), cat([past_v, v]))`` -> ``attention_kv(q, k, v,
  past_k, past_v)``, so a kernel that appends to the cache itself owns the update;
- :func:`fuse_parallel_linears`: linears reading the same input (q/k/v, gate/up) -> one wide linear whose
  output is sliced; quantised linears (``linear_q``) fuse too, by concatenating their packed rows;
- :func:`draft_lowerings`: the program's speculative drafts (``passes/draft.py``) made ready for a backend: weights
  that are not the target's own tensors renamed under ``draft_<name>.`` (so the artifact stores one set of
  weights without clashes), and the target cache entries each draft reads and writes.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ..fxutil import add_weight, erase_dead, get_tensor, is_call, prune_unused_attrs, set_tensor, weight_of
from ..program import Program
from ..qweights import LINEAR_Q, packed_args
from ..sites import ATTENTION

aten = torch.ops.aten


def fuse_kv_attention(gm: fx.GraphModule) -> int:
    """``attention(q, cat([past_k, k]), cat([past_v, v]))`` -> ``attention_kv(q, k, v, past_k, past_v)``.

    Returns the number of attention nodes rewritten. Present outputs of the graph are taken from the fused
    op, so a kernel that appends to the cache itself (GQA) owns the whole update.
    """
    attention_kv = torch.ops.headsmith.attention_kv.default
    graph = gm.graph
    count = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is ATTENTION]:
        if node.kwargs.get("key_bias") is not None:  # token merging's proportional attention: no cache, no kernel
            continue
        q, k, v = node.args[0], node.args[1], node.args[2]
        key_mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("key_mask")
        k_new, past_k = _split_cat(k)
        v_new, past_v = _split_cat(v)
        if (past_k is None) != (past_v is None):
            continue
        q_val, k_val = q.meta.get("val"), k_new.meta.get("val")  # type: ignore[union-attr]
        heads = int(q_val.shape[1]) if isinstance(q_val, Tensor) and isinstance(q_val.shape[1], int) else 0
        kv_heads = int(k_val.shape[1]) if isinstance(k_val, Tensor) and isinstance(k_val.shape[1], int) else 0
        kw = dict(node.kwargs)
        kw.pop("key_mask", None)
        with graph.inserting_before(node):
            fused = graph.call_function(attention_kv, (q, k_new, v_new, past_k, past_v, key_mask), {
                "causal": kw.get("causal", True), "scale": kw.get("scale", 0.0), "window": kw.get("window", 0),
                "sinks": kw.get("sinks", 0), "softcap": kw.get("softcap", 0.0), "layer": kw.get("layer", -1),
                "n_heads": heads, "n_kv_heads": kv_heads, "blocks": kw.get("blocks", "")})
            out = graph.call_function(operator.getitem, (fused, 0))
            present_k = graph.call_function(operator.getitem, (fused, 1))
            present_v = graph.call_function(operator.getitem, (fused, 2))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        for cat, present in ((k, present_k), (v, present_v)):
            if past_k is not None and isinstance(cat, fx.Node) and cat.graph is graph:
                cat.replace_all_uses_with(present)
        count += 1
    erase_dead(graph)
    graph.lint()
    gm.recompile()
    return count


@dataclass(frozen=True)
class _Parts:
    """A fusable linear: what must agree to fuse (``key``), its stored tensors (each concatenated along rows
    when fused) and its bias."""

    key: tuple[Any, ...]
    tensors: tuple[Tensor | None, ...]
    bias: Tensor | None


def _parts(gm: fx.GraphModule, node: fx.Node) -> _Parts | None:
    """``linear(x, W, b)``, ``linear(x, _to_copy(W16), b)`` or ``linear_q(x, packed, scales, zeros, b, bits, G)``
    with stored tensors, else None."""
    q = packed_args(node)
    if q is not None:
        bias = weight_of(gm, node.args[4]) if node.args[4] is not None else None
        if node.args[4] is not None and bias is None:
            return None
        tensors = tuple(weight_of(gm, t) if t is not None else None for t in (q.packed, q.scales, q.zeros))
        return _Parts(("q", q.bits, q.group, q.zeros is not None, bias is not None), tensors, bias)
    if not is_call(node, aten.linear.default):
        return None
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = weight_of(gm, bias_node)
    if bias_node is not None and bias is None:
        return None
    w_node = node.args[1]
    if is_call(w_node, aten._to_copy.default):
        w16 = weight_of(gm, w_node.args[0])  # type: ignore[union-attr]
        if w16 is None or w16.dim() != 2:
            return None
        dtype = w_node.kwargs.get("dtype")  # type: ignore[union-attr]
        return _Parts(("cast", dtype, int(w16.shape[1]), bias is not None), (w16,), bias)
    w = weight_of(gm, w_node)
    if w is None or w.dim() != 2:
        return None
    return _Parts(("float", int(w.shape[1]), bias is not None), (w,), bias)


def fuse_parallel_linears(gm: fx.GraphModule) -> int:
    """``linear(x, W1), linear(x, W2), ...`` -> ``split(linear(x, cat(W1, W2, ...)))``. Exact.

    One wide GEMV per input instead of several narrow ones (q/k/v, gate/up): fewer kernel launches and better
    memory streaming in a decode step. Linears of one kind fuse: float, cast 16-bit weights (the 16-bit
    tensors are concatenated), or quantised with the same bits and group (packed rows are independent, so the
    packed codes, scales and zero points are concatenated). Returns how many groups were fused.
    """
    graph = gm.graph
    groups: dict[tuple[Any, ...], list[tuple[fx.Node, _Parts]]] = {}
    for node in graph.nodes:
        parts = _parts(gm, node) if node.op == "call_function" else None
        if parts is not None and isinstance(node.args[0], fx.Node):
            groups.setdefault((node.args[0], *parts.key), []).append((node, parts))
    count = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for key, members in groups.items():
        if len(members) < 2:
            continue
        x, kind = key[0], key[1]
        linears = [n for n, _ in members]
        first = min(linears, key=order.__getitem__)
        base = str(getattr(first.args[1], "target", first.name))

        def stored(i: int) -> fx.Node | None:
            ts = [m.tensors[i] for _, m in members]
            if ts[0] is None:
                return None
            return add_weight(gm, graph, f"{base}_fused{i}", torch.cat(ts, 0), first)  # type: ignore[arg-type]

        biases = [m.bias for _, m in members]
        with graph.inserting_before(first):
            bias = add_weight(gm, graph, f"{base}_fused_bias", torch.cat(biases, 0), first) \
                if biases[0] is not None else None  # type: ignore[arg-type]
            if kind == "q":
                fused = graph.call_function(LINEAR_Q, (x, stored(0), stored(1), stored(2), bias, key[2], key[3]))
            elif kind == "cast":
                w = graph.call_function(aten._to_copy.default, (stored(0),), {"dtype": key[2]})
                fused = graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
            else:
                w = stored(0)
                fused = graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
        # one static Slice per part (a split would export as SplitToSequence + SequenceAt)
        sizes = [int(m.tensors[0].shape[0]) for _, m in members]  # type: ignore[union-attr]
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        with graph.inserting_after(fused):
            items = [graph.call_function(aten.slice.Tensor, (fused, -1, bounds[i], bounds[i + 1]))
                     for i in range(len(linears))][::-1]
        for item, node in zip(reversed(items), linears):
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item)
            graph.erase_node(node)
        count += 1
    if count:
        erase_dead(graph)
        prune_unused_attrs(gm)
        graph.lint()
        gm.recompile()
    return count


def _split_cat(node: Any) -> tuple[Any, Any]:
    """``(new, past)`` if ``node`` is ``cat([past, new], 2)`` with a placeholder past, else ``(node, None)``."""
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.cat.default
            and node.args[1] == 2 and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) == 2):
        past, new = node.args[0]
        if isinstance(past, fx.Node) and past.op == "placeholder":
            return new, past
    return node, None


@dataclass(frozen=True)
class DraftLowering:
    """One draft ready to lower: its program (weights the target lacks renamed), the indices of the target's cache
    entries its decode graph reads and writes (in the draft's entry order), and its manifest record."""

    name: str
    program: Program
    cache: list[int]
    record: dict[str, Any]

    def file(self, suffix: str) -> str:
        return f"draft_{self.name}{suffix}"


def draft_lowerings(program: Program) -> list[DraftLowering]:
    """The drafts of ``program`` (see the module docstring); a draft that no longer fits the target's cache
    (a pass after ``draft(...)`` changed it) is refused here."""
    if not program.drafts:
        return []
    from ..passes.draft import draft_layer_map

    caches = draft_layer_map(program)
    mine = {str(n.target): get_tensor(program.gm, str(n.target)) for n in program.gm.graph.nodes if n.op == "get_attr"}
    out = []
    for d in program.drafts:
        renamed = dataclasses.replace(d.program.clone(), kv_policy=None)  # drafts return no eviction scores
        gm = renamed.gm
        prefix = "draft_" + d.name.replace("-", "_")
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            t = get_tensor(gm, str(node.target))
            if mine.get(str(node.target)) is t:
                continue  # the target's own tensor under the same name: stored once
            target = f"{prefix}.{node.target}"
            set_tensor(gm, target, t)
            node.target = target
        prune_unused_attrs(gm)
        gm.recompile()
        renamed._shapes = None
        report = {k: d.report[k] for k in ("top1_agreement", "weight_bytes_ratio", "skipped", "passes")
                  if k in d.report}
        out.append(DraftLowering(d.name, renamed, caches[d.name],
                                 {"method": d.method, "layers": list(d.layers), "cache": caches[d.name],
                                  "decode_weight_bytes": renamed.decode_weight_bytes(), **report}))
    return out
