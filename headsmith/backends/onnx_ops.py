"""ONNX translations of headsmith's attention ops and fused lowering forms (onnxscript functions).

``torch.onnx.export`` calls these through its ``custom_translation_table`` with symbolic tensors and the ops'
python scalars. The attention variants (``VARIANTS``) are described in :mod:`headsmith.backends.onnx_backend`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..block_sparse import BlockPattern
from ..errors import BackendError
from ..sites import ATTENTION
from .onnx_contrib import contrib_opset

NEG = -3.4028234663852886e38  # most negative float32: masked scores (softmax never sees -inf)


def _block_visible(q_pos: Any, k_pos: Any, blocks: str) -> Any:
    """The rules of a block-sparse layout (:mod:`headsmith.block_sparse`) on int64 positions ``[T,1]`` / ``[1,Tk]``
    (block distances up to 2^30)."""
    from onnxscript import opset20 as op

    pattern = BlockPattern.decode(blocks)
    assert pattern is not None

    def const(x: int) -> Any:
        return op.Constant(value_int=x)
    qb, kb = op.Div(q_pos, const(pattern.size)), op.Div(k_pos, const(pattern.size))  # positions >= 0: floor
    d = op.Sub(qb, kb)
    ok = op.Or(op.Less(d, const(pattern.local)), op.Less(kb, const(pattern.sink)))
    if pattern.kind == "block" and pattern.stride > 0:
        ok = op.Or(ok, op.Equal(op.Mod(op.Add(kb, const(1)), const(pattern.stride)), const(0)))
    if pattern.kind == "power":  # d > 0 divides 2^30 (only powers of two do; TensorRT has no integer BitwiseAnd)
        divides = op.Equal(op.Mod(const(1 << 30), op.Max(d, const(1))), const(0))
        ok = op.Or(ok, op.And(op.Greater(d, const(0)), divides))
    return ok


def _plain_attention(q: Any, k: Any, v: Any, key_mask: Any = None, causal: bool = True, scale: float = 0.0,
                     window: int = 0, sinks: int = 0, softcap: float = 0.0, layer: int = -1, blocks: str = "",
                     key_bias: Any = None) -> Any:
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
    if key_bias is not None:  # [B,Tk] -> [B,1,1,1,Tk]
        scores = op.Add(scores, op.CastLike(op.Unsqueeze(key_bias, op.Constant(value_ints=[1, 2, 3])), scores))
    allowed = None
    if causal or window > 0 or blocks:
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
        if blocks:
            shown = _block_visible(q_pos, k_pos, blocks)
            allowed = shown if allowed is None else op.And(allowed, shown)
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


def _key_scores(q: Any, k: Any, past_k: Any = None, key_mask: Any = None, last: int = 0, scale: float = 0.0,
                softcap: float = 0.0) -> Any:
    """``headsmith.key_scores`` (the attention KV eviction ranks by, see ``headsmith/ops.py``) in opset-20 ops:
    ``[B, Hkv, Tk]`` over ``cat([past_k[:, :, :Tk - T], k])``, ``Tk`` the key mask's length."""
    from onnxscript import opset20 as op

    def dims(x: Any, start: int, end: int) -> Any:
        return op.Slice(op.Shape(x), op.Constant(value_ints=[start]), op.Constant(value_ints=[end]))
    zero, one = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    if key_mask is not None:
        tk = dims(key_mask, 1, 2)
    else:
        tk = dims(k, 2, 3) if past_k is None else op.Add(dims(k, 2, 3), dims(past_k, 2, 3))
    if past_k is not None:  # an in-place cache buffer holds more rows than are valid: the first P
        rows = op.Sub(tk, dims(k, 2, 3))
        k = op.Concat(op.Slice(past_k, zero, rows, op.Constant(value_ints=[2])), k, axis=2)
    if last > 0:
        q = op.Slice(q, op.Constant(value_ints=[-last]), op.Constant(value_ints=[1 << 62]),
                     op.Constant(value_ints=[2]))
    q, k = op.Cast(q, to=1), op.Cast(k, to=1)
    b, hq, tq, d, hkv = dims(q, 0, 1), dims(q, 1, 2), dims(q, 2, 3), dims(q, 3, 4), dims(k, 1, 2)
    rep = op.Div(hq, hkv)
    if scale > 0.0:
        q = op.Mul(q, op.Constant(value_float=scale))
    else:
        q = op.Div(q, op.Sqrt(op.Cast(d, to=1)))
    q_g = op.Reshape(q, op.Concat(b, hkv, op.Constant(value_ints=[-1]), d, axis=0))
    scores = op.MatMul(q_g, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B,Hkv,rep*T,Tk]
    scores = op.Reshape(scores, op.Concat(b, hkv, rep, tq, tk, axis=0))
    if softcap > 0.0:
        cap = op.Constant(value_float=softcap)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    tq_s, tk_s = op.Squeeze(tq, zero), op.Squeeze(tk, zero)
    q_pos = op.Unsqueeze(op.Add(op.Range(op.Constant(value_int=0), tq_s, op.Constant(value_int=1)),
                                op.Sub(tk_s, tq_s)), one)
    k_pos = op.Unsqueeze(op.Range(op.Constant(value_int=0), tk_s, op.Constant(value_int=1)), zero)
    allowed = op.Unsqueeze(op.LessOrEqual(k_pos, q_pos), op.Constant(value_ints=[0, 1, 2]))  # [1,1,1,T,Tk]
    if key_mask is not None:
        keys = op.Unsqueeze(op.Cast(key_mask, to=9), op.Constant(value_ints=[1, 2, 3]))  # [B,1,1,1,Tk]
        allowed = op.And(allowed, keys)
    scores = op.Add(scores, op.Where(allowed, op.Constant(value_float=0.0), op.Constant(value_float=NEG)))
    probs = op.Softmax(scores, axis=-1)
    return op.ReduceMean(op.ReduceSum(probs, op.Constant(value_ints=[3]), keepdims=0),
                         op.Constant(value_ints=[2]), keepdims=0)


def _concat_or(past: Any, new: Any) -> Any:
    from onnxscript import opset20 as op
    return new if past is None else op.Concat(past, new, axis=2)


def _plain_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, key_mask: Any = None,
                        causal: bool = True, scale: float = 0.0, window: int = 0, sinks: int = 0,
                        softcap: float = 0.0, layer: int = -1, n_heads: int = 0, n_kv_heads: int = 0,
                        blocks: str = "") -> Any:
    """``headsmith.attention_kv`` as ``Concat`` + the plain attention."""
    k_all, v_all = _concat_or(past_k, k), _concat_or(past_v, v)
    out = _plain_attention(q, k_all, v_all, key_mask, causal, scale, window, sinks, softcap, layer, blocks)
    return out, k_all, v_all


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``headsmith.rms_norm`` as ONNX ``RMSNormalization`` (opset 23)."""
    from onnxscript import opset23 as op
    return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def _skip_rms_norm(x: Any, skip: Any, weight: Any, eps: float) -> Any:
    """``headsmith.skip_rms_norm`` as onnxruntime's ``com.microsoft.SkipSimplifiedLayerNormalization``: outputs
    the normalised sum and the sum itself (its fourth output)."""
    out, _, _, total = contrib_opset().SkipSimplifiedLayerNormalization(x, skip, weight, _outputs=4, epsilon=eps)
    return out, total


def _rotary(x: Any, cos: Any, sin: Any, num_heads: int = 0) -> Any:
    """``headsmith.rotary`` as ONNX ``RotaryEmbedding`` (opset 23): ``x[B,H,T,D]`` or ``x[B,T,H*D]``
    (``num_heads``), caches ``[B,T,D/2]``."""
    from onnxscript import opset23 as op
    if num_heads:
        return op.RotaryEmbedding(x, cos, sin, interleaved=0, num_heads=num_heads)
    return op.RotaryEmbedding(x, cos, sin, interleaved=0)


def _bsd_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, bias: Any = None,
                      scale: float = 1.0, n_heads: int = 0, n_kv_heads: int = 0, window: int = 0,
                      key_mask: Any = None) -> Any:
    """``headsmith.attention_bias_kv_bsd`` (causal) as onnxruntime's ``com.microsoft.GroupQueryAttention``:
    3-D ``q/k/v`` as the projections produce them, the shared mask (causal, window, sinks, padding) as
    ``attention_bias``, ``seqlens_k = P+T-1`` from the mask's length. GQA appends the new K/V itself; when the
    runtime binds one buffer as both past and present, it writes them in place (no copy of the cache).

    Without ``bias`` (``decode_dense.onnx``, run only for steps without padding) GQA gets no ``attention_bias``:
    causality is its own and the window its ``local_window_size``; ``key_mask`` gives only the length P+T.
    onnxruntime's CPU kernel is markedly faster without the bias (docs/precision.md)."""
    from onnxscript import opset20 as op

    msft = contrib_opset()
    if bias is None:
        # from the key mask, so every layer's copy of these nodes is the same and onnxruntime merges them
        seqlens, total32 = _gqa_lengths(op.Shape(key_mask, start=1, end=2), op.Shape(key_mask, start=0, end=1))
        return msft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens, total32, _outputs=3, num_heads=n_heads,
                                        kv_num_heads=n_kv_heads, scale=scale,
                                        local_window_size=window if window > 0 else -1)
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


def _gqa_lengths(total: Any, batch: Any) -> tuple[Any, Any]:
    """GQA's ``seqlens_k`` (``P+T-1`` for every row, int32 ``[B]``) and ``total_sequence_length`` (int32 scalar)
    from the key length ``total`` and ``batch`` (both 1-D int64 shapes)."""
    from onnxscript import opset20 as op
    seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=6)
    return seqlens, op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=6)


def _gqa_attention_kv(q: Any, k: Any, v: Any, past_k: Any = None, past_v: Any = None, key_mask: Any = None,
                      causal: bool = True, scale: float = 0.0, window: int = 0, sinks: int = 0,
                      softcap: float = 0.0, layer: int = -1, n_heads: int = 0, n_kv_heads: int = 0,
                      blocks: str = "") -> Any:
    """``headsmith.attention_kv`` as onnxruntime's fused ``com.microsoft.GroupQueryAttention``.

    GQA is always causal, takes ``[B,T,H*D]`` inputs and appends the new K/V to the past itself. Left padding
    becomes an additive ``attention_bias[B,1,1,P+T]``; ``seqlens_k`` is ``P+T-1`` for every row. Layers GQA
    cannot express (bidirectional, attention sinks, block-sparse layouts, different K/V head dims) use the plain
    translation.
    """
    from onnxscript import opset20 as op

    if not causal or sinks > 0 or blocks or n_heads <= 0 or n_kv_heads <= 0:
        return _plain_attention_kv(q, k, v, past_k, past_v, key_mask, causal, scale, window, sinks, softcap, layer,
                                   n_heads, n_kv_heads, blocks)
    msft = contrib_opset()
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


#: ``fused``: onnx_fusions.py's rewrites, opset 23 and GroupQueryAttention for causal layers (onnxruntime);
#: ``plain``: opset-20 standard ops only (portable; what TensorRT parses); ``gqa``: plain + GroupQueryAttention.
VARIANTS = {"fused": _plain_attention_kv, "plain": _plain_attention_kv, "gqa": _gqa_attention_kv}
DEFAULT_VARIANT = "fused"


def translations(variant: str) -> dict[Any, Any]:
    """``custom_translation_table`` entries for headsmith's attention and fused ops under ``variant``."""
    ops = torch.ops.headsmith
    return {ATTENTION: _plain_attention, ops.attention_kv.default: VARIANTS[variant],
            ops.rms_norm.default: _rms_norm, ops.skip_rms_norm.default: _skip_rms_norm, ops.rotary.default: _rotary,
            ops.attention_bias_kv.default: _bias_attention_kv, ops.attention_bias_kv_bsd.default: _bsd_attention_kv,
            ops.key_scores.default: _key_scores}
