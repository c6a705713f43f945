"""FX rewrites that turn a decode/prefill graph into few, large ONNX nodes for onnxruntime.

A decode step on a CPU is memory-bound only if the per-node overhead of the executor stays small next to
streaming the weights; the graph torch.export produces has ~90 nodes per layer (the RMSNorm and rotary
arithmetic spelled out, a causal mask rebuilt in every layer). These rewrites are exact and run on a copy
of the graph just before ONNX export:

- ``fuse_rms_norm``: ``w * (x * rsqrt(mean(x**2, -1) + eps))`` -> ``headsmith.rms_norm`` (ONNX
  ``RMSNormalization``, opset 23).
- ``fuse_skip_rms_norm``: ``rms_norm(a + b)`` whose sum is also the residual stream ->
  ``headsmith.skip_rms_norm(a, b)`` returning both (onnxruntime's ``SkipSimplifiedLayerNormalization``): one
  node instead of two per norm.
- ``fuse_rotary``: ``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` built as ``cat([f, f])`` ->
  ``headsmith.rotary`` on the first halves (ONNX ``RotaryEmbedding``, opset 23). A pattern that cannot be
  proven to have equal halves (partial or interleaved rotary, other layouts) is left as it is.
- ``hoist_attention_masks``: every ``attention_kv`` gets its additive mask from one ``bias`` computed once
  per distinct (key mask, causal, window, sinks) instead of rebuilding it per layer
  (``headsmith.attention_bias_kv``).

Each returns how many sites it rewrote; a graph without the pattern is returned unchanged.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from .. import ops
from ..fxutil import erase_dead, is_call, rank_of

aten = torch.ops.aten
RMS_NORM = torch.ops.headsmith.rms_norm.default
SKIP_RMS_NORM = torch.ops.headsmith.skip_rms_norm.default
ROTARY = torch.ops.headsmith.rotary.default
ATTENTION_KV = torch.ops.headsmith.attention_kv.default
ATTENTION_BIAS_KV = torch.ops.headsmith.attention_bias_kv.default
ATTENTION_BIAS_KV_BSD = torch.ops.headsmith.attention_bias_kv_bsd.default


def _dtype(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _val_shape(node: Any) -> tuple[Any, ...] | None:
    """The shape in ``node.meta['val']``, symbolic dims included, else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _through_noop_casts(node: Any) -> Any:
    """Walk back through ``to(dtype)`` / ``_to_copy`` nodes that do not change the dtype."""
    while is_call(node, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout) and \
            _dtype(node) is not None and _dtype(node) == _dtype(node.args[0]):
        node = node.args[0]
    return node


def _finish(gm: fx.GraphModule, count: int) -> int:
    if count:
        erase_dead(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return count


# --- RMSNorm ---------------------------------------------------------------------------------------------

def _rms_core(node: Any) -> tuple[Any, float] | None:
    """``(x, eps)`` if ``node`` is ``x * rsqrt(mean(x**2, -1, keepdim) + eps)`` (either operand order)."""
    if not is_call(node, aten.mul.Tensor):
        return None
    for x, r in (node.args[:2], node.args[1::-1]):
        if not is_call(r, aten.rsqrt.default) or not is_call(r.args[0], aten.add.Tensor):
            continue
        mean, eps = r.args[0].args[:2]
        if isinstance(mean, (int, float)):
            mean, eps = eps, mean
        if not is_call(mean, aten.mean.dim) or not isinstance(eps, (int, float)):
            continue
        rank = rank_of(x)
        dims = list(mean.args[1]) if len(mean.args) > 1 else []
        keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if rank is None or dims not in ([-1], [rank - 1]) or not keep:
            continue
        sq = mean.args[0]
        if not is_call(sq, aten.pow.Tensor_Scalar) or sq.args[1] != 2:
            continue
        if _through_noop_casts(sq.args[0]) is not _through_noop_casts(x):
            continue
        return x, float(eps)
    return None


def fuse_rms_norm(gm: fx.GraphModule) -> int:
    """``weight * rms(x)`` -> ``headsmith.rms_norm(x, weight, eps)`` where every dtype is float32."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, aten.mul.Tensor) or _dtype(node) != torch.float32:
            continue
        for w, y in (node.args[:2], node.args[1::-1]):
            core = _rms_core(_through_noop_casts(y))
            if core is None or not isinstance(w, fx.Node):
                continue
            x, eps = core
            w_shape, x_shape = _val_shape(w), _val_shape(x)
            if (_dtype(x) != torch.float32 or _dtype(w) != torch.float32 or w_shape is None or x_shape is None
                    or len(w_shape) != 1 or w_shape[0] != x_shape[-1]):
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(RMS_NORM, (x, w, eps))
            fused.meta = dict(node.meta)
            node.replace_all_uses_with(fused)
            count += 1
            break
    return _finish(gm, count)


# rms_norm(add(a, b)) -> skip_rms_norm(a, b) (the sum's other users read its second output)
def fuse_skip_rms_norm(gm: fx.GraphModule) -> int:
    """``rms_norm(a + b, w)`` (both ``[B,T,E]`` float32) -> ``skip_rms_norm(a, b, w)``; other readers of the sum
    (the residual stream) take the op's second output."""
    graph = gm.graph
    count = 0
    for node in [n for n in graph.nodes if is_call(n, RMS_NORM)]:
        x = node.args[0]
        total = _through_noop_casts(x)
        if not is_call(total, aten.add.Tensor) or len(total.args) != 2 or total.kwargs:
            continue
        a, b = total.args
        sa, sb, st = _val_shape(a), _val_shape(b), _val_shape(total)
        if sa is None or sa != sb or sa != st or len(sa) != 3 or _dtype(a) != torch.float32 or \
                _dtype(b) != torch.float32:
            continue
        weight = node.args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        total.prepend(weight)  # the fused node replaces the add in place: its weight must come first
        with graph.inserting_after(total):
            fused = graph.call_function(SKIP_RMS_NORM, (a, b, weight, node.args[2]))
        with graph.inserting_after(fused):
            summed = graph.call_function(operator.getitem, (fused, 1))
            out = graph.call_function(operator.getitem, (fused, 0))
        out.meta, summed.meta = dict(node.meta), dict(total.meta)
        node.replace_all_uses_with(out)
        total.replace_all_uses_with(summed)
        count += 1
    return _finish(gm, count)


# --- rotary ----------------------------------------------------------------------------------------------

def _equal_halves_source(node: Any) -> Any:
    """``node`` (``[B,T,D]``) if its two halves along the last dim are provably equal: it is built from
    ``cat([f, f], -1)`` by elementwise ops (cos/sin, scalar multiplication, dtype-preserving casts)."""
    cur = node
    while True:
        cur = _through_noop_casts(cur)
        if is_call(cur, aten.cos.default, aten.sin.default):
            cur = cur.args[0]
        elif is_call(cur, aten.mul.Tensor) and isinstance(cur.args[1], (int, float)):
            cur = cur.args[0]
        elif is_call(cur, aten.mul.Tensor) and isinstance(cur.args[0], (int, float)):
            cur = cur.args[1]
        else:
            break
    if not is_call(cur, aten.cat.default):
        return None
    parts = cur.args[0]
    dim = cur.args[1] if len(cur.args) > 1 else 0
    rank = rank_of(cur)
    if len(parts) == 2 and parts[0] is parts[1] and rank is not None and dim in (-1, rank - 1):
        return node
    return None


def _rotate_half_of(node: Any) -> tuple[Any, int] | None:
    """``(x, half)`` if ``node`` is ``cat([-x[..., half:], x[..., :half]], -1)`` with ``D == 2 * half``."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    neg, lo = node.args[0]
    if not is_call(neg, aten.neg.default) or not is_call(neg.args[0], aten.slice.Tensor) or \
            not is_call(lo, aten.slice.Tensor):
        return None
    hi = neg.args[0]
    x = lo.args[0]
    shape = _val_shape(x)
    if hi.args[0] is not x or shape is None or len(shape) != 4 or not isinstance(shape[-1], int):
        return None
    d = shape[-1]
    half = d // 2
    if d % 2 or list(lo.args[1:4]) not in ([3, 0, half], [-1, 0, half]):
        return None
    if hi.args[1] not in (3, -1) or hi.args[2] != half or hi.args[3] < d:
        return None
    return x, half


def _unsqueezed_head_dim(node: Any) -> Any:
    """``c`` if ``node`` is ``unsqueeze(c, 1)`` with ``c`` of rank 3."""
    if is_call(node, aten.unsqueeze.default) and node.args[1] == 1 and rank_of(node.args[0]) == 3:
        return node.args[0]
    return None


def fuse_rotary(gm: fx.GraphModule) -> int:
    """``x * cos + rotate_half(x) * sin`` -> ``headsmith.rotary(x, cos[..., :D/2], sin[..., :D/2])``."""
    graph = gm.graph
    halves: dict[tuple[fx.Node, int], fx.Node] = {}
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, aten.add.Tensor) or _dtype(node) != torch.float32:
            continue
        a, b = node.args[:2]
        if not (is_call(a, aten.mul.Tensor) and is_call(b, aten.mul.Tensor)):
            continue
        match = None
        for m_cos, m_sin in ((a, b), (b, a)):
            for rot, s in (m_sin.args[:2], m_sin.args[1::-1]):
                rh = _rotate_half_of(rot)
                if rh is None:
                    continue
                x, half = rh
                for xx, c in (m_cos.args[:2], m_cos.args[1::-1]):
                    if xx is x:
                        match = (x, half, c, s)
        if match is None:
            continue
        x, half, c, s = match
        c3, s3 = _unsqueezed_head_dim(c), _unsqueezed_head_dim(s)
        if c3 is None or s3 is None or _equal_halves_source(c3) is None or _equal_halves_source(s3) is None:
            continue
        if _dtype(c3) != torch.float32 or _dtype(s3) != torch.float32 or _dtype(x) != torch.float32:
            continue
        args = []
        for src in (c3, s3):
            key = (src, half)
            if key not in halves:
                with graph.inserting_after(src):
                    halves[key] = graph.call_function(aten.slice.Tensor, (src, 2, 0, half))
            args.append(halves[key])
        with graph.inserting_before(node):
            fused = graph.call_function(ROTARY, (x, *args))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        count += 1
    return _finish(gm, count)


# --- attention masks -------------------------------------------------------------------------------------

def mask_bias(key_mask: torch.Tensor | None, q: torch.Tensor, k_len: Any, causal: bool, window: int,
              sinks: int, blocks: str = "") -> torch.Tensor:
    """The additive mask ``[B, 1, Tq, Tk]`` of ``headsmith.attention`` (traced into the exported graph)."""
    bias = ops.attention_mask_bias(key_mask, q.shape[2], k_len, causal, window, sinks, q.dtype, q.device, blocks)
    if bias is None:  # nothing masked: a zero bias keeps one code path
        bias = q.new_zeros((1, 1, q.shape[2], k_len))
    # always [B, 1, Tq, Tk], so a kernel can read the batch from it (the same node in every layer)
    return bias.expand(q.shape[0], 1, q.shape[2], k_len)


def hoist_attention_masks(gm: fx.GraphModule) -> int:
    """``attention_kv(..., key_mask, causal, window, sinks, blocks)`` -> ``attention_bias_kv(..., bias)`` with one
    ``bias`` per distinct mask (all layers of a plain decoder share one; Gemma3's sliding and global layers
    two). Nodes whose head counts or head dims are not static are left alone."""
    graph = gm.graph
    biases: dict[tuple[Any, ...], fx.Node] = {}
    count = 0
    for node in [n for n in graph.nodes if is_call(n, ATTENTION_KV)]:
        q, k, v, past_k, past_v, key_mask = node.args[:6]
        kw = node.kwargs
        q_val, v_val = q.meta.get("val"), v.meta.get("val")
        if not isinstance(q_val, torch.Tensor) or not isinstance(v_val, torch.Tensor):
            continue
        d, dv = q_val.shape[-1], v_val.shape[-1]
        if not isinstance(d, int) or not isinstance(dv, int) or not kw.get("n_heads") or not kw.get("n_kv_heads"):
            continue
        causal, window, sinks = bool(kw.get("causal", True)), int(kw.get("window", 0)), int(kw.get("sinks", 0))
        blocks = str(kw.get("blocks", ""))
        key = (key_mask if key_mask is not None else node, causal, window, sinks, blocks)
        if key not in biases:  # built right before the first node that needs it (nodes are visited in order)
            with graph.inserting_before(node):
                if key_mask is not None:
                    k_len = graph.call_function(aten.sym_size.int, (key_mask, 1))
                else:
                    k_len = graph.call_function(aten.sym_size.int, (k, 2))
                    if past_k is not None:
                        k_len = graph.call_function(operator.add, (
                            graph.call_function(aten.sym_size.int, (past_k, 2)), k_len))
                biases[key] = graph.call_function(mask_bias, (key_mask, q, k_len, causal, window, sinks, blocks))
        scale = float(kw.get("scale", 0.0)) or 1.0 / math.sqrt(d)
        with graph.inserting_before(node):
            fused = graph.call_function(ATTENTION_BIAS_KV, (q, k, v, past_k, past_v, biases[key], scale,
                                                            float(kw.get("softcap", 0.0))))
        fused.meta = dict(node.meta)
        fused.meta["headsmith_causal"] = causal
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        count += 1
    return _finish(gm, count)


# --- flattened heads -------------------------------------------------------------------------------------

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _split_heads_source(x4: Any, heads: int) -> Any:
    """``x3`` if ``x4`` is ``view(x3[B,T,H*D], [B,T,H,D]).transpose(1, 2)``, else None."""
    if not is_call(x4, aten.transpose.int) or sorted(x4.args[1:3]) != [1, 2]:
        return None
    view = x4.args[0]
    if not is_call(view, *_VIEWS) or len(view.users) != 1:
        return None
    x3, shape4 = view.args[0], _val_shape(view)
    shape3 = _val_shape(x3)
    if shape3 is None or shape4 is None or len(shape3) != 3 or len(shape4) != 4 or shape4[2] != heads:
        return None
    if not isinstance(shape3[2], int) or not isinstance(shape4[3], int) or shape3[2] != heads * shape4[3]:
        return None
    return x3


def _as_bsd(graph: fx.Graph, x4: fx.Node, heads: int, before: fx.Node) -> fx.Node:
    """``x4[B,H,T,D]`` as ``[B,T,H*D]``: the tensor it was split from when possible (a rotary on it becomes
    the flattened-heads rotary), else an explicit transpose + flatten."""
    if is_call(x4, ROTARY) and len(x4.users) == 1 and not (x4.args[3:] and x4.args[3]):
        src = _split_heads_source(x4.args[0], heads)
        if src is not None:
            with graph.inserting_before(before):
                return graph.call_function(ROTARY, (src, x4.args[1], x4.args[2], heads))
    src = _split_heads_source(x4, heads)
    if src is not None:
        return src
    with graph.inserting_before(before):
        return graph.call_function(aten.flatten.using_ints, (graph.call_function(aten.transpose.int, (x4, 1, 2)), 2, 3))


def _merged_heads_user(out4: fx.Node) -> fx.Node | None:
    """The node computing ``out4.transpose(1, 2).reshape(B, T, H*Dv)`` (through same-shape views), if that is
    ``out4``'s only use."""
    cur, shape = out4, _val_shape(out4)
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if is_call(user, *_VIEWS) and _val_shape(user) == shape:
            cur = user
            continue
        if is_call(user, aten.transpose.int) and sorted(user.args[1:3]) == [1, 2] and len(user.users) == 1:
            merge = next(iter(user.users))
            merged = _val_shape(merge)
            if is_call(merge, *_VIEWS) and merged is not None and len(merged) == 3 and shape is not None \
                    and isinstance(shape[1], int) and isinstance(shape[3], int) and merged[2] == shape[1] * shape[3]:
                return merge
        return None
    return None


def flatten_attention_heads(gm: fx.GraphModule, dense: bool = False) -> int:
    """Causal ``attention_bias_kv`` without softcap -> ``attention_bias_kv_bsd`` on ``[B,T,H*D]`` tensors: the
    view/transpose pairs around attention (and rotary) disappear, and onnxruntime's ``GroupQueryAttention``
    takes the tensors as the projections produce them. The caches keep their ``[B,H,T,D]`` layout. ``dense``
    (the decode graph for steps without padding): layers without attention sinks or a block layout drop the bias
    and pass the window and the key mask (for its length) instead."""
    graph = gm.graph
    count = 0
    # a graph with cache inputs (decode) whose attention got no past concatenates its cache elsewhere
    has_cache_inputs = any(n.op == "placeholder" and n.name.startswith("past_") for n in graph.nodes)
    for node in [n for n in graph.nodes if is_call(n, ATTENTION_BIAS_KV)]:
        q, k, v, past_k, past_v, bias, scale, softcap = node.args
        qs, ks, vs = _val_shape(q), _val_shape(k), _val_shape(v)
        if softcap or not node.meta.get("headsmith_causal") or qs is None or ks is None or vs is None or \
                not all(isinstance(n, int) for n in (qs[1], qs[3], ks[1], vs[3])):
            continue
        if past_k is None and has_cache_inputs:  # keys built from a cache outside the op (a KV cache gathered
            continue                             # after concatenation, an MLA latent): GQA cannot take them
        if qs[3] != vs[3]:  # GQA has one head size: its shape inference gives the output q's width (MLA's values
            continue        # are narrower), which breaks the shapes of the consumers (MatMulNBits checks them)
        hq, hkv = int(qs[1]), int(ks[1])
        q3, k3, v3 = (_as_bsd(graph, x, h, node) for x, h in ((q, hq), (k, hkv), (v, hkv)))
        extra: tuple[Any, ...] = ()
        if dense and is_call(bias, mask_bias) and bias.args[0] is not None and bias.args[5] == 0 \
                and not bias.args[6]:  # no sinks, no block layout
            extra, bias = (int(bias.args[4]), bias.args[0]), None  # type: ignore[union-attr]
        with graph.inserting_before(node):
            fused = graph.call_function(ATTENTION_BIAS_KV_BSD, (q3, k3, v3, past_k, past_v, bias, scale, hq, hkv,
                                                                *extra))
        for user in list(node.users):
            index = user.args[1]
            with graph.inserting_before(user):
                item = graph.call_function(operator.getitem, (fused, index))
            item.meta = dict(user.meta)
            if index == 0:
                merge = _merged_heads_user(user)
                if merge is not None:
                    merge.replace_all_uses_with(item)
                    continue
                with graph.inserting_after(item):
                    split = graph.call_function(aten.unflatten.int, (item, 2, [hq, int(vs[3])]))
                with graph.inserting_after(split):
                    back = graph.call_function(aten.transpose.int, (split, 1, 2))
                user.replace_all_uses_with(back)
            else:
                user.replace_all_uses_with(item)
        count += 1
    return _finish(gm, count)


def fuse_for_ort(gm: fx.GraphModule, dense: bool = False) -> dict[str, int]:
    """All rewrites above, in order; the counts per rewrite (``dense``: see :func:`flatten_attention_heads`)."""
    return {"rms_norm": fuse_rms_norm(gm), "skip_rms_norm": fuse_skip_rms_norm(gm), "rotary": fuse_rotary(gm),
            "attention_masks": hoist_attention_masks(gm), "flat_heads": flatten_attention_heads(gm, dense)}
