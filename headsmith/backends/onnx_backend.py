"""ONNX backend: export the prefill / decode graphs (or an encoder's forward) to ONNX for onnxruntime.

``torch.onnx.export(..., dynamo=True)`` with translations for headsmith's ops. Three lowerings (``VARIANTS``):

- ``fused`` (default, for onnxruntime): onnx_fusions.py rewrites the graph first, so a decode step is a few
  large nodes: ``RMSNormalization`` and ``RotaryEmbedding`` (ONNX opset 23), one additive mask built once per
  graph, and every causal attention as onnxruntime's ``com.microsoft.GroupQueryAttention`` on the 3-D
  projections. When every cache entry is appended by a GQA node the manifest says ``kv_in_place`` and the
  runtime binds one buffer per entry as both past and present: a step writes its new K/V in place instead of
  copying the cache (see runtime/kv_cache.py). Other attention (bidirectional, softcap, a cache gathered
  outside the op) keeps the plain translation below.
- ``plain``: standard opset-20 ops only (what the TensorRT backend parses). GQA without copying K/V:
  ``q[B,Hq,T,D]`` is reshaped to ``[B,Hkv,n*T,D]`` so each KV head is read once; scores get the mask as an
  additive bias built from ``Range``/``Less``/``Where`` (causal, window, sinks, key padding), then
  ``Softmax`` and ``MatMul``. (The standard ``Attention`` op of opset 23 was tried: onnxruntime 1.32's CPU
  kernel was slower than both, see docs/backends.md.)
- ``gqa``: ``plain`` with ``GroupQueryAttention`` for the attention.

Dynamic dims: ``batch``, ``new`` (tokens this step), ``past`` (cached tokens), ``total``. The decode model's
weights point into the prefill model's external data file, so they are stored once.
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import BackendError
from ..program import Program
from ..sites import ATTENTION

OPSET = 20
FUSED_OPSET = 23  # RMSNormalization and RotaryEmbedding (see onnx_fusions.py)
NEG = -3.4028234663852886e38  # most negative float32: masked scores (softmax never sees -inf)


def _plain_attention(q: Any, k: Any, v: Any, key_mask: Any = None, causal: bool = True, scale: float = 0.0,
                     window: int = 0, sinks: int = 0, softcap: float = 0.0, layer: int = -1) -> Any:
    """``headsmith.attention`` in opset-20 ops (see the module docstring)."""
    from onnxscript import opset20 as op

    del layer
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    shape_q = op.Shape(q)
    shape_k = op.Shape(k)
    b = op.Slice(shape_q, zero, one)
    hq = op.Slice(shape_q, one, op.Constant(value_ints=[2]))
    tq = op.Slice(shape_q, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
    d = op.Slice(shape_q, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    hkv = op.Slice(shape_k, one, op.Constant(value_ints=[2]))
    tk = op.Slice(shape_k, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
    rep = op.Div(hq, hkv)
    minus_one = op.Constant(value_ints=[-1])
    # q[B,Hq,T,D] -> [B,Hkv,rep*T,D]: query heads of a group share their KV head without expanding K/V
    if scale > 0.0:
        q = op.Mul(q, op.CastLike(op.Constant(value_float=scale), q))
    else:
        q = op.Div(q, op.Sqrt(op.CastLike(op.Cast(d, to=1), q)))
    q_g = op.Reshape(q, op.Concat(b, hkv, minus_one, d, axis=0))
    scores = op.MatMul(q_g, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B,Hkv,rep*T,Tk]
    scores = op.Reshape(scores, op.Concat(b, hkv, rep, tq, tk, axis=0))  # [B,Hkv,rep,T,Tk]
    if softcap > 0.0:
        cap = op.CastLike(op.Constant(value_float=softcap), scores)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    allowed = None
    if causal or window > 0:
        tq_s = op.Squeeze(tq, zero)
        tk_s = op.Squeeze(tk, zero)
        q_pos = op.Add(op.Range(op.Constant(value_int=0), tq_s, op.Constant(value_int=1)), op.Sub(tk_s, tq_s))
        q_pos = op.Unsqueeze(q_pos, one)  # [T,1]
        k_pos = op.Unsqueeze(op.Range(op.Constant(value_int=0), tk_s, op.Constant(value_int=1)), zero)  # [1,Tk]
        if causal:
            allowed = op.LessOrEqual(k_pos, q_pos)
        if window > 0:
            in_window = op.Less(op.Sub(q_pos, k_pos), op.Constant(value_int=window))
            if sinks > 0:
                in_window = op.Or(in_window, op.Less(k_pos, op.Constant(value_int=sinks)))
            allowed = in_window if allowed is None else op.And(allowed, in_window)
        allowed = op.Unsqueeze(allowed, op.Constant(value_ints=[0, 1, 2]))  # [1,1,1,T,Tk]
    if key_mask is not None:
        keys = op.Unsqueeze(op.Cast(key_mask, to=9), op.Constant(value_ints=[1, 2, 3]))  # [B,1,1,1,Tk]
        allowed = keys if allowed is None else op.And(allowed, keys)
    if allowed is not None:
        bias = op.Where(allowed, op.CastLike(op.Constant(value_float=0.0), scores),
                        op.CastLike(op.Constant(value_float=NEG), scores))
        scores = op.Add(scores, bias)
    probs = op.Softmax(scores, axis=-1)
    probs = op.Reshape(probs, op.Concat(b, hkv, minus_one, tk, axis=0))  # [B,Hkv,rep*T,Tk]
    out = op.MatMul(probs, v)  # [B,Hkv,rep*T,Dv]
    dv = op.Slice(op.Shape(v), op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    return op.Reshape(out, op.Concat(b, hq, tq, dv, axis=0))


def _concat_or(past: Any, new: Any) -> Any:
    from onnxscript import opset20 as op
    return new if past is None else op.Concat(past, new, axis=2)


def _plain_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, key_mask: Any = None,
                        causal: bool = True, scale: float = 0.0, window: int = 0, sinks: int = 0,
                        softcap: float = 0.0, layer: int = -1, n_heads: int = 0, n_kv_heads: int = 0) -> Any:
    """``headsmith.attention_kv`` as ``Concat`` + the plain attention."""
    k_all, v_all = _concat_or(past_k, k), _concat_or(past_v, v)
    out = _plain_attention(q, k_all, v_all, key_mask, causal, scale, window, sinks, softcap, layer)
    return out, k_all, v_all


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``headsmith.rms_norm`` as ONNX ``RMSNormalization`` (opset 23)."""
    from onnxscript import opset23 as op
    return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def _rotary(x: Any, cos: Any, sin: Any, num_heads: int = 0) -> Any:
    """``headsmith.rotary`` as ONNX ``RotaryEmbedding`` (opset 23): ``x[B,H,T,D]`` or ``x[B,T,H*D]``
    (``num_heads``), caches ``[B,T,D/2]``."""
    from onnxscript import opset23 as op
    if num_heads:
        return op.RotaryEmbedding(x, cos, sin, interleaved=0, num_heads=num_heads)
    return op.RotaryEmbedding(x, cos, sin, interleaved=0)


def _bsd_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, bias: Any = None,
                      scale: float = 1.0, n_heads: int = 0, n_kv_heads: int = 0) -> Any:
    """``headsmith.attention_bias_kv_bsd`` (causal) as onnxruntime's ``com.microsoft.GroupQueryAttention``:
    3-D ``q/k/v`` as the projections produce them, the shared mask (causal, window, sinks, padding) as
    ``attention_bias``, ``seqlens_k = P+T-1`` from the mask's length. GQA appends the new K/V itself; when the
    runtime binds one buffer as both past and present, it writes them in place (no copy of the cache)."""
    from onnxscript import opset20 as op

    msft = gqa_opset()
    # from the shared bias, so every layer's copy of these nodes is the same and onnxruntime merges them
    seqlens, total32 = _gqa_lengths(op.Shape(bias, start=3, end=4), op.Shape(bias, start=0, end=1))
    return msft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens, total32, None, None, None, bias, _outputs=3,
                                    num_heads=n_heads, kv_num_heads=n_kv_heads, scale=scale, local_window_size=-1)


def _bias_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, bias: Any = None,
                       scale: float = 1.0, softcap: float = 0.0) -> Any:
    """``headsmith.attention_bias_kv`` with static head counts: ``q[B,Hq,T,D]`` is reshaped (no copy) to
    ``[B,Hkv,rep*T,D]`` so each KV head is read once; the shared ``bias[B|1,1,T,Tk]`` is tiled to ``rep*T``
    rows (the same node in every layer with the same grouping, which onnxruntime's CSE merges)."""
    from onnxscript import opset23 as op

    hq, d = q.shape[1], q.shape[3]
    hkv, dv = k.shape[1], v.shape[3]
    if not all(isinstance(n, int) for n in (hq, d, hkv, dv)):
        raise BackendError("attention_bias_kv needs static head counts and head dims")
    rep = hq // hkv
    k_all, v_all = _concat_or(past_k, k), _concat_or(past_v, v)
    q = op.Mul(q, op.Constant(value_float=scale))
    q_g = op.Reshape(q, op.Constant(value_ints=[0, hkv, -1, d])) if rep > 1 else q
    scores = op.MatMul(q_g, op.Transpose(k_all, perm=[0, 1, 3, 2]))  # [B,Hkv,rep*T,Tk]
    if softcap > 0.0:
        scores = op.Mul(op.Tanh(op.Mul(scores, op.Constant(value_float=1.0 / softcap))),
                        op.Constant(value_float=softcap))
    if bias is not None:
        scores = op.Add(scores, op.Tile(bias, op.Constant(value_ints=[1, 1, rep, 1])) if rep > 1 else bias)
    probs = op.Softmax(scores, axis=-1)
    out = op.MatMul(probs, v_all)  # [B,Hkv,rep*T,Dv]
    if rep > 1:
        out = op.Reshape(out, op.Constant(value_ints=[0, hq, -1, dv]))
    return out, k_all, v_all


_GQA_OPSET: Any = None


def gqa_opset() -> Any:
    """An onnxscript opset for ``com.microsoft`` v1 with ``GroupQueryAttention``'s schema registered.

    onnx itself knows no onnxruntime contrib ops; the schema (inputs as in onnxruntime's ContribOperators.md)
    is registered once per process so the exporter can build the node and the checker can validate it.
    """
    global _GQA_OPSET
    if _GQA_OPSET is not None:
        return _GQA_OPSET
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    try:
        onnx.defs.get_schema("GroupQueryAttention", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        attr = OpSchema.Attribute
        schema = OpSchema(
            "GroupQueryAttention", "com.microsoft", 1,
            "onnxruntime contrib op: grouped-query attention with KV cache (see onnxruntime ContribOperators.md)",
            inputs=[fp("query", "T"), fp("key", "T", param_option=opt), fp("value", "T", param_option=opt),
                    fp("past_key", "T", param_option=opt), fp("past_value", "T", param_option=opt),
                    fp("seqlens_k", "M"), fp("total_sequence_length", "M"),
                    fp("cos_cache", "T", param_option=opt), fp("sin_cache", "T", param_option=opt),
                    fp("position_ids", "P", param_option=opt), fp("attention_bias", "T", param_option=opt)],
            outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
                              ("M", ["tensor(int32)"], "lengths"), ("P", ["tensor(int64)"], "positions")],
            attributes=[attr("num_heads", OpSchema.AttrType.INT, "query heads"),
                        attr("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                        attr("scale", OpSchema.AttrType.FLOAT, "softmax scale", required=False),
                        attr("softcap", OpSchema.AttrType.FLOAT, "score softcap", required=False),
                        attr("local_window_size", OpSchema.AttrType.INT, "sliding window (-1: none)", required=False),
                        attr("do_rotary", OpSchema.AttrType.INT, "apply rotary inside", required=False),
                        attr("rotary_interleaved", OpSchema.AttrType.INT, "interleaved rotary", required=False),
                        attr("smooth_softmax", OpSchema.AttrType.INT, "smooth softmax", required=False)])
        onnx.defs.register_schema(schema)
    _GQA_OPSET = onnxscript.values.Opset("com.microsoft", 1)
    return _GQA_OPSET


def _gqa_lengths(total: Any, batch: Any) -> tuple[Any, Any]:
    """GQA's ``seqlens_k`` (``P+T-1`` for every row, int32 ``[B]``) and ``total_sequence_length`` (int32 scalar)
    from the key length ``total`` and ``batch`` (both 1-D int64 shapes)."""
    from onnxscript import opset20 as op
    seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=6)
    return seqlens, op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=6)


def _gqa_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, key_mask: Any = None,
                      causal: bool = True, scale: float = 0.0, window: int = 0, sinks: int = 0,
                      softcap: float = 0.0, layer: int = -1, n_heads: int = 0, n_kv_heads: int = 0) -> Any:
    """``headsmith.attention_kv`` as onnxruntime's fused ``com.microsoft.GroupQueryAttention``.

    GQA is always causal, takes ``[B,T,H*D]`` inputs and appends the new K/V to the past itself. Left padding
    becomes an additive ``attention_bias[B,1,1,P+T]``; ``seqlens_k`` is ``P+T-1`` for every row. Layers GQA
    cannot express (bidirectional, attention sinks, different K/V head dims) use the plain translation.
    """
    from onnxscript import opset20 as op

    if not causal or sinks > 0 or n_heads <= 0 or n_kv_heads <= 0:
        return _plain_attention_kv(q, k, v, past_k, past_v, key_mask, causal, scale, window, sinks, softcap, layer,
                                   n_heads, n_kv_heads)
    msft = gqa_opset()
    flat = op.Constant(value_ints=[0, 0, -1])
    q3 = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), flat)
    k3 = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), flat)
    v3 = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), flat)
    batch = op.Shape(q, start=0, end=1)
    if key_mask is not None:
        total = op.Shape(key_mask, start=1, end=2)
    else:
        kv_len = op.Shape(k, start=2, end=3)
        total = kv_len if past_k is None else op.Add(op.Shape(past_k, start=2, end=3), kv_len)
    seqlens, total32 = _gqa_lengths(total, batch)
    bias = None
    if key_mask is not None:
        keys = op.Unsqueeze(op.Cast(key_mask, to=9), op.Constant(value_ints=[1, 2]))
        bias = op.Where(keys, op.CastLike(op.Constant(value_float=0.0), q), op.CastLike(op.Constant(value_float=NEG), q))
        new = op.Shape(q, start=2, end=3)  # GQA wants the bias as [B, 1, T, P+T]
        bias = op.Expand(bias, op.Concat(batch, op.Constant(value_ints=[1]), new, total, axis=0))
    attrs: dict[str, Any] = {"num_heads": n_heads, "kv_num_heads": n_kv_heads,
                             "local_window_size": window if window > 0 else -1}
    if scale > 0.0:
        attrs["scale"] = scale
    if softcap > 0.0:
        attrs["softcap"] = softcap
    out, present_k, present_v = msft.GroupQueryAttention(q3, k3, v3, past_k, past_v, seqlens, total32, None, None,
                                                         None, bias, _outputs=3, **attrs)
    out4 = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, n_heads, -1])), perm=[0, 2, 1, 3])
    return out4, present_k, present_v


def fuse_kv_attention(gm: fx.GraphModule) -> int:
    """``attention(q, cat([past_k, k]), cat([past_v, v]))`` -> ``attention_kv(q, k, v, past_k, past_v)``.

    Returns the number of attention nodes rewritten. Present outputs of the graph are taken from the fused
    op, so a kernel that appends to the cache itself (GQA) owns the whole update.
    """
    aten = torch.ops.aten
    attention_kv = torch.ops.headsmith.attention_kv.default
    graph = gm.graph
    count = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is ATTENTION]:
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
                "n_heads": heads, "n_kv_heads": kv_heads})
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
    from ..fxutil import erase_dead
    erase_dead(graph)
    graph.lint()
    gm.recompile()
    del aten
    return count


def fuse_parallel_linears(gm: fx.GraphModule) -> int:
    """``linear(x, W1), linear(x, W2), ...`` -> ``split(linear(x, cat(W1, W2, ...)))``. Exact.

    One wide GEMV per input instead of several narrow ones (q/k/v, gate/up): fewer kernel launches and better
    memory streaming in a decode step. Returns how many groups were fused.
    """
    from ..fxutil import add_weight, weight_of

    aten = torch.ops.aten
    graph = gm.graph
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default and isinstance(node.args[0], fx.Node):
            if weight_of(gm, node.args[1]) is not None:
                groups.setdefault(node.args[0], []).append(node)
    count = 0
    for x, linears in groups.items():
        has_bias = [len(n.args) > 2 and n.args[2] is not None for n in linears]
        if len(linears) < 2 or (any(has_bias) and not all(has_bias)):
            continue
        weights = [weight_of(gm, n.args[1]) for n in linears]
        if any(w is None or w.dim() != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:  # type: ignore[union-attr]
            continue
        biases = [weight_of(gm, n.args[2]) for n in linears] if all(has_bias) else None
        if biases is not None and any(b is None for b in biases):
            continue
        first = min(linears, key=lambda n: list(graph.nodes).index(n))
        sizes = [int(w.shape[0]) for w in weights]  # type: ignore[union-attr]
        with graph.inserting_before(first):
            w_node = add_weight(gm, graph, f"{linears[0].args[1].target}_fused", torch.cat(weights, 0), first)  # type: ignore[arg-type, union-attr]
            args: tuple[Any, ...] = (x, w_node)
            if biases is not None:
                args = (x, w_node, add_weight(gm, graph, f"{linears[0].args[2].target}_fused",  # type: ignore[union-attr]
                                               torch.cat(biases, 0), first))  # type: ignore[arg-type]
            fused = graph.call_function(aten.linear.default, args)
        # one static Slice per part (a split would export as SplitToSequence + SequenceAt)
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
        from ..fxutil import erase_dead, prune_unused_attrs
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


#: ``fused``: onnx_fusions.py's rewrites, opset 23 and GroupQueryAttention for causal layers (onnxruntime);
#: ``plain``: opset-20 standard ops only (portable; what TensorRT parses); ``gqa``: plain + GroupQueryAttention.
VARIANTS = {"fused": _plain_attention_kv, "plain": _plain_attention_kv, "gqa": _gqa_attention_kv}
DEFAULT_VARIANT = "fused"


def export_graph(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...], path: Path,
                 input_names: list[str], output_names: list[str], variant: str = DEFAULT_VARIANT,
                 optimize: bool = False) -> None:
    """Export one graph to ``path`` (with its weights in ``path.name + '.data'``)."""
    from ..fxutil import clone_module

    gm = clone_module(gm)
    fuse_kv_attention(gm)
    fuse_parallel_linears(gm)
    opset = OPSET
    if variant == "fused":
        from .onnx_fusions import fuse_for_ort
        fuse_for_ort(gm)
        opset = FUSED_OPSET
    ep = _export(gm, example, dynamic)
    table = {ATTENTION: _plain_attention, torch.ops.headsmith.attention_kv.default: VARIANTS[variant],
             torch.ops.headsmith.rms_norm.default: _rms_norm, torch.ops.headsmith.rotary.default: _rotary,
             torch.ops.headsmith.attention_bias_kv.default: _bias_attention_kv,
             torch.ops.headsmith.attention_bias_kv_bsd.default: _bsd_attention_kv}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=input_names,
                                             output_names=output_names, optimize=optimize, verbose=False,
                                             custom_translation_table=table)
        except Exception as e:  # torch.onnx raises many error types; report the first line, keep the cause
            raise BackendError(f"ONNX export failed: {str(e).strip().splitlines()[0][:300]}") from e
    assert onnx_program is not None
    onnx_program.save(str(path), external_data=True)
    name_dims(path, dynamic, input_names)


def name_dims(path: Path, dynamic: tuple[Any, ...], input_names: list[str]) -> None:
    """Give the dynamic dims of the saved model the names of their ``Dim`` (``batch``, ``past``, ...)."""
    import re

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    rename: dict[str, str] = {}
    inputs = {i.name: i for i in model.graph.input}
    for name, spec in zip(input_names, dynamic):
        value = inputs.get(name)
        if value is None or not spec:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, dim in spec.items():
            if axis < len(dims) and dims[axis].dim_param:
                rename[dims[axis].dim_param] = getattr(dim, "__name__", str(dim))
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(rename, key=len, reverse=True)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def _export(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...]) -> Any:
    try:
        return torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # report torch.export's first line, keep the cause
        raise BackendError(f"torch.export before ONNX failed: {str(e).strip().splitlines()[0][:300]}") from e


def share_weights(primary: Path, secondary: Path) -> None:
    """Point ``secondary``'s initializers at ``primary``'s external data where they are identical."""
    import onnx
    from onnx import external_data_helper as edh

    a = onnx.load(str(primary), load_external_data=False)
    a_info: dict[str, tuple[dict[str, str], int]] = {}
    for init in a.graph.initializer:
        if edh.uses_external_data(init):
            a_info[init.name] = ({e.key: e.value for e in init.external_data}, init.data_type)
    b = onnx.load(str(secondary), load_external_data=True)
    data_a = primary.parent / next(iter(a_info.values()))[0]["location"] if a_info else None
    blob = data_a.read_bytes() if data_a is not None else b""
    moved = 0
    for init in b.graph.initializer:
        info = a_info.get(init.name)
        if info is None or info[1] != init.data_type:
            continue
        ext, _ = info
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        raw = onnx.numpy_helper.to_array(init).tobytes()
        if raw != blob[offset:offset + length]:
            continue
        init.ClearField("raw_data")
        del init.float_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in ext.items():
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        moved += 1
    old_data = secondary.parent / (secondary.name + ".data")
    if old_data.exists():
        old_data.unlink()
    onnx.save_model(b, str(secondary), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=secondary.name + ".data", size_threshold=1024)
    del moved


def decode_dynamic(n_past: int) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1, max=1024)
    new = torch.export.Dim("new", min=1, max=65536)
    past = torch.export.Dim("past", min=0, max=1 << 20)
    total = torch.export.Dim("total", min=1, max=(1 << 20) + 65536)
    return ({0: batch, 1: new}, {0: batch, 1: new}, {0: batch, 1: total}) + tuple(
        {0: batch, 2: past} for _ in range(n_past))


def lower_onnx(program: Program, directory: Path, progress: Any = None,
               variant: str = DEFAULT_VARIANT) -> dict[str, Any]:
    """Write ``model.onnx`` (encoders) or ``prefill.onnx`` + ``decode.onnx`` into ``directory`` (``variant``:
    see ``VARIANTS``)."""
    import onnx

    from ..passes.kv_cache import decode_graph, layout_dict, prefill_graph

    if variant not in VARIANTS:
        raise BackendError(f"unknown ONNX attention variant {variant!r}", f"choose one of {', '.join(VARIANTS)}")
    ids, pos, mask = program.example_inputs(batch=2, seq=8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=65536)
    inputs = ["input_ids", "position_ids", "attention_mask"]
    if program.info.task == "encoder":
        _say(progress, "exporting model.onnx")
        export_graph(program.gm, (ids, pos, mask), ({0: batch, 1: seq},) * 3, directory / "model.onnx", inputs,
                     ["last_hidden_state"], variant)
        onnx.checker.check_model(str(directory / "model.onnx"), full_check=False)
        return {"name": "onnx", "attention": variant, "opset": FUSED_OPSET if variant == "fused" else OPSET,
                "forward": "model.onnx", "cache": []}
    pre, entries = prefill_graph(program)
    dec, _ = decode_graph(program)
    cache_names = [e.name.replace(".", "_") for e in entries]
    _say(progress, "exporting prefill.onnx")
    export_graph(pre, (ids, pos, mask), ({0: batch, 1: seq},) * 3, directory / "prefill.onnx", inputs,
                 ["logits", *[f"present_{n}" for n in cache_names]], variant)
    with torch.no_grad():
        cache = [c.contiguous() for c in pre(ids, pos, mask)[1:]]
    ids2, pos2 = ids[:, :3].contiguous(), pos[:, :3] + 8
    mask2 = torch.ones(ids.shape[0], 11, dtype=torch.int64)
    _say(progress, "exporting decode.onnx")
    export_graph(dec, (ids2, pos2, mask2, *cache), decode_dynamic(len(cache)), directory / "decode.onnx",
                 inputs + [f"past_{n}" for n in cache_names], ["logits", *[f"present_{n}" for n in cache_names]],
                 variant)
    share_weights(directory / "prefill.onnx", directory / "decode.onnx")
    for name in ("prefill.onnx", "decode.onnx"):
        onnx.checker.check_model(str(directory / name), full_check=False)
    opset = FUSED_OPSET if variant == "fused" else OPSET
    gqa_layers, in_place = _gqa_presents(directory / "decode.onnx")
    return {"name": "onnx", "attention": variant, "opset": opset, "gqa_layers": gqa_layers, "kv_in_place": in_place,
            "prefill": "prefill.onnx", "decode": "decode.onnx", "cache": layout_dict(entries)}


def _gqa_presents(path: Path) -> tuple[int, bool]:
    """How many ``GroupQueryAttention`` nodes the decode graph has, and whether every ``present_*`` output
    comes straight from one (then the runtime may bind one buffer as past and present: in-place KV)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    gqa = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    presents = [o.name for o in model.graph.output if o.name.startswith("present_")]
    in_place = bool(presents) and all(
        o in producer and producer[o].op_type == "GroupQueryAttention" for o in presents)
    return gqa, in_place


def _say(progress: Any, text: str) -> None:
    if progress is not None:
        progress(text)


def ort_providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def ort_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or max(1, (os.cpu_count() or 1))
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers())
