"""headsmith's custom ops: the canonical attention every raised program uses.

``headsmith::attention(q, k, v, key_mask, causal, scale, window, sinks, softcap, layer, blocks, key_bias) -> out``

(and ``headsmith::key_scores``, the attention probabilities KV eviction ranks cached tokens by: see its docstring
and ``passes/kv_evict.py``)

Layout letters used in this file: B batch, Hq query heads, Hkv key/value heads, Tq query length,
Tk key length, D head dim of q/k, Dv head dim of v.

Semantics (those of ONNX ``Attention`` opset 23 and onnxruntime's ``GroupQueryAttention``):

- ``q[B,Hq,Tq,D]``, ``k[B,Hkv,Tk,D]``, ``v[B,Hkv,Tk,Dv]`` -> ``out[B,Hq,Tq,Dv]``; ``Hq % Hkv == 0`` and
  query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (the layout of HF's ``repeat_kv``).
- Queries are the *last* ``Tq`` positions of the ``Tk`` keys (bottom-right alignment): query ``i`` sits
  at key index ``i + Tk - Tq``. A prefill has ``Tq == Tk``; a decode step with a cache has ``Tq < Tk``.
- ``key_mask[B,Tk]`` (bool, optional): False marks padding keys, never attended.
- ``key_bias[B,Tk]`` (float, optional): added to every query's logit for that key, after the scale and softcap
  (token merging's proportional attention: a key standing for ``s`` tokens gets ``log s``, ``headsmith.merging``).
- ``causal``: key ``j`` is visible to query ``i`` only if ``j <= i + Tk - Tq``.
- ``window > 0``: additionally ``(i + Tk - Tq) - j < window`` (a sliding window of ``window`` keys,
  the query's own included), except that the first ``sinks`` keys stay visible (attention sinks).
- ``blocks`` (a block-sparse layout, :mod:`headsmith.block_sparse`; "" for none): additionally the key's block
  must be visible from the query's (key ``j`` and query ``i`` sit in blocks ``j // b`` and ``(i + Tk - Tq) // b``).
  Exclusive with ``window``.

The reference kernel is SDPA with the additive mask, except for an unpadded causal prefill (``Tq == Tk``, no
window): SDPA's own causal kernel, and FlexAttention for a long one with a block layout; both skip the hidden
tiles.
- ``scale``: the softmax scale; ``0.0`` means ``1 / sqrt(D)``. ``softcap > 0`` applies
  ``softcap * tanh(scores / softcap)`` before masking.
- A query row whose keys are all masked gets the mean of ``v`` (masked scores are the most negative
  finite float, not ``-inf``), so no backend produces NaN on padding rows.
- ``layer`` is the index of the transformer layer the op belongs to; it does not change the result.
- Mixed input dtypes are computed in their promoted dtype (``torch.promote_types``), which is also the
  output's. Under bf16 autocast the projections come out in bf16 while RoPE's fp32 tables promote q and k
  back to fp32; SDPA itself insists on one dtype, so the op promotes instead of failing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import block_sparse

__all__ = ["attention", "attention_bias_kv", "attention_bias_kv_bsd", "attention_mask_bias", "key_scores", "rms_norm",
           "skip_rms_norm", "rotary"]


def _promoted(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` cast to their common (promoted) dtype; no copy when they already agree."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention_mask_bias(key_mask: Tensor | None, tq: int, tk: int, causal: bool, window: int,
                        sinks: int, dtype: torch.dtype, device: torch.device, blocks: str = "") -> Tensor | None:
    """The additive mask ``[B|1, 1, Tq, Tk]`` (0 where visible, the most negative float elsewhere)."""
    allowed: Tensor | None = None
    pattern = block_sparse.BlockPattern.decode(blocks)
    if causal or window > 0 or pattern is not None:
        q_pos_T1 = torch.arange(tq, device=device).unsqueeze(1) + (tk - tq)
        k_pos_1S = torch.arange(tk, device=device).unsqueeze(0)
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
        if causal:
            allowed = allowed & (k_pos_1S <= q_pos_T1)
        if window > 0:
            in_window = (q_pos_T1 - k_pos_1S) < window
            if sinks > 0:
                in_window = in_window | (k_pos_1S < sinks)
            allowed = allowed & in_window
        if pattern is not None:
            allowed = allowed & block_sparse.visible(pattern, q_pos_T1, k_pos_1S)
        allowed = allowed[None, None]
    if key_mask is not None:
        keys = key_mask.to(torch.bool)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, neg)


@torch.library.custom_op("headsmith::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = True,
              scale: float = 0.0, window: int = 0, sinks: int = 0, softcap: float = 0.0,
              layer: int = -1, blocks: str = "", key_bias: Tensor | None = None) -> Tensor:
    """Reference kernel (torch SDPA with an additive mask); see the module docstring."""
    q, k, v = _promoted(q, k, v)
    _, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
    if blocks and window > 0:
        raise ValueError("attention: a block-sparse layout and a sliding window are exclusive")
    sm_scale = scale if scale > 0.0 else 1.0 / math.sqrt(d)
    pattern = block_sparse.BlockPattern.decode(blocks)
    if causal and tq == tk and window == 0 and softcap == 0.0 and key_bias is None and (
            key_mask is None or bool(key_mask.all())):
        # an unpadded prefill: kernels that skip work (decode steps never pay for the key_mask check)
        if pattern is None:  # SDPA's causal kernel skips the tiles above the diagonal (an explicit mask does not)
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=sm_scale, enable_gqa=hq != hkv).contiguous()
        out = block_sparse.flex_prefill(q, k, v, pattern, sm_scale)
        if out is not None:
            return out.contiguous()
    bias = _with_key_bias(attention_mask_bias(key_mask, tq, tk, causal, window, sinks, q.dtype, q.device, blocks),
                          key_bias, q.dtype)
    if softcap > 0.0:
        rep = hq // hkv
        k_rep = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        v_rep = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q, k_rep.transpose(-1, -2)) * sm_scale
        scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(probs, v_rep)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=sm_scale, enable_gqa=hq != hkv)
    return out.contiguous()


def _with_key_bias(bias: Tensor | None, key_bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The additive mask plus ``key_bias[B,Tk]`` broadcast over heads and queries."""
    if key_bias is None:
        return bias
    extra = key_bias.to(dtype)[:, None, None, :]
    return extra if bias is None else bias + extra


@attention.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                    causal: bool = True, scale: float = 0.0, window: int = 0, sinks: int = 0,
                    softcap: float = 0.0, layer: int = -1, blocks: str = "", key_bias: Tensor | None = None) -> Tensor:
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=dtype)


def _attention_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[object, ...],
                             output: Tensor) -> None:
    ctx.save_for_backward(*[t for t in inputs[:3]])  # type: ignore[arg-type]
    ctx.extra = inputs[3:]  # type: ignore[attr-defined]


def _attention_backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor):  # noqa: ANN202
    q, k, v = ctx.saved_tensors  # type: ignore[attr-defined]
    key_mask, causal, scale, window, sinks, softcap, _layer, blocks, key_bias = ctx.extra  # type: ignore[attr-defined]
    with torch.enable_grad():
        q_ = q.detach().requires_grad_(True)
        k_ = k.detach().requires_grad_(True)
        v_ = v.detach().requires_grad_(True)
        out = _attention_math(q_, k_, v_, key_mask, causal, scale, window, sinks, softcap, blocks, key_bias)
        gq, gk, gv = torch.autograd.grad(out, (q_, k_, v_), grad_out)
    return gq, gk, gv, None, None, None, None, None, None, None, None, None


def _attention_math(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool,
                    scale: float, window: int, sinks: int, softcap: float, blocks: str = "",
                    key_bias: Tensor | None = None) -> Tensor:
    """Differentiable twin of the reference kernel (used for backward, e.g. by ``heal``); the casts of
    :func:`_promoted` are part of its graph, so each gradient comes back in its input's dtype."""
    q, k, v = _promoted(q, k, v)
    _, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    sm_scale = scale if scale > 0.0 else 1.0 / math.sqrt(d)
    bias = _with_key_bias(attention_mask_bias(key_mask, tq, tk, causal, window, sinks, q.dtype, q.device, blocks),
                          key_bias, q.dtype)
    if softcap > 0.0:
        rep = hq // hkv
        k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * sm_scale / softcap) * softcap
        if bias is not None:
            scores = scores + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=sm_scale, enable_gqa=hq != hkv)


attention.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("headsmith::attention_kv", mutates_args=())
def attention_kv(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                 key_mask: Tensor | None, causal: bool, scale: float, window: int, sinks: int, softcap: float,
                 layer: int, n_heads: int, n_kv_heads: int, blocks: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """``attention`` over ``cat([past, new])`` that also returns the presents (a lowering form for KV-cache
    kernels such as onnxruntime's GroupQueryAttention): ``(out, present_k, present_v)``."""
    k_all = k if past_k is None else torch.cat([past_k, k], dim=2)
    v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
    out = attention(q, k_all, v_all, key_mask, causal, scale, window, sinks, softcap, layer, blocks)
    return out, k_all.clone(), v_all.clone()


@attention_kv.register_fake
def _attention_kv_fake(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                       key_mask: Tensor | None, causal: bool, scale: float, window: int, sinks: int, softcap: float,
                       layer: int, n_heads: int, n_kv_heads: int, blocks: str = "") -> tuple[Tensor, Tensor, Tensor]:
    k_all = k if past_k is None else torch.cat([past_k, k], dim=2)
    v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    return out, torch.empty_like(k_all), torch.empty_like(v_all)


@torch.library.custom_op("headsmith::key_scores", mutates_args=())
def key_scores(q: Tensor, k: Tensor, past_k: Tensor | None, key_mask: Tensor | None, last: int = 0,
               scale: float = 0.0, softcap: float = 0.0) -> Tensor:
    """How much the last ``last`` queries (0: all) attend to every key, for KV eviction (:mod:`headsmith.kv_policy`):
    ``[B, Hkv, Tk]``, the causal softmax over the keys summed over those queries and averaged over the query heads
    of each KV head. The keys are ``cat([past_k[:, :, :P], k])`` with ``P = Tk - k.shape[2]`` and ``Tk`` the key
    mask's length (a cache buffer may hold more rows than are valid); queries align to the end of the keys."""
    tk = int(key_mask.shape[1]) if key_mask is not None else k.shape[2] + (0 if past_k is None else past_k.shape[2])
    if past_k is not None:
        k = torch.cat([past_k[:, :, : tk - k.shape[2]], k], dim=2)
    q = q[:, :, -last:] if last > 0 else q
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    scores = torch.matmul(q.float().reshape(b, hkv, (hq // hkv) * tq, d), k.float().transpose(-1, -2))
    scores = scores.reshape(b, hkv, hq // hkv, tq, tk) * (scale if scale > 0.0 else 1.0 / math.sqrt(d))
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    bias = attention_mask_bias(key_mask, tq, tk, True, 0, 0, torch.float32, q.device)
    if bias is not None:
        scores = scores + bias.unsqueeze(1)
    return torch.softmax(scores, dim=-1).sum(3).mean(2)


@key_scores.register_fake
def _key_scores_fake(q: Tensor, k: Tensor, past_k: Tensor | None, key_mask: Tensor | None, last: int = 0,
                     scale: float = 0.0, softcap: float = 0.0) -> Tensor:
    tk = key_mask.shape[1] if key_mask is not None else k.shape[2] + (0 if past_k is None else past_k.shape[2])
    return q.new_empty((q.shape[0], k.shape[1], tk), dtype=torch.float32)


# --- lowering forms: fused ops that backends emit as single kernels (see headsmith/backends/onnx_fusions.py) ---

@torch.library.custom_op("headsmith::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x**2, -1) + eps)`` (ONNX ``RMSNormalization``, opset 23)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@rms_norm.register_fake
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("headsmith::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + skip, weight, eps), x + skip)``: a residual add and the norm after it (onnxruntime's
    ``SkipSimplifiedLayerNormalization``)."""
    total = x + skip
    return rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _skip_rms_norm_fake(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("headsmith::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int = 0) -> Tensor:
    """Rotary embedding in the "rotate half" layout (ONNX ``RotaryEmbedding``, opset 23, non-interleaved):
    ``x[B,H,T,D]`` (``num_heads == 0``) or ``x[B,T,H*D]`` (``num_heads == H``), ``cos``/``sin`` ``[B,T,D/2]``;
    ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` per head."""
    flat = num_heads > 0
    if flat:
        b, t, hd = x.shape
        x = x.reshape(b, t, num_heads, hd // num_heads).transpose(1, 2)
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], -1).unsqueeze(1)
    s = torch.cat([sin, sin], -1).unsqueeze(1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    out = x * c + rotated * s
    return out.transpose(1, 2).reshape(b, t, hd) if flat else out


@rotary.register_fake
def _rotary_fake(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int = 0) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("headsmith::attention_bias_kv", mutates_args=())
def attention_bias_kv(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                      bias: Tensor | None, scale: float, softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    """``attention_kv`` with the mask given as an additive ``bias[B|1, 1, Tq, Tk]`` (built once per graph and
    shared by every layer with the same mask) instead of ``key_mask``/``causal``/``window``/``sinks``.
    ``scale`` must be explicit (> 0). Returns ``(out, present_k, present_v)``."""
    k_all = k if past_k is None else torch.cat([past_k, k], dim=2)
    v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
    rep = q.shape[1] // k.shape[1]
    k_rep = k_all.repeat_interleave(rep, dim=1) if rep > 1 else k_all
    v_rep = v_all.repeat_interleave(rep, dim=1) if rep > 1 else v_all
    scores = torch.matmul(q, k_rep.transpose(-1, -2)) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v_rep)
    return out, k_all.clone(), v_all.clone()


@attention_bias_kv.register_fake
def _attention_bias_kv_fake(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                            bias: Tensor | None, scale: float, softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    k_all = k if past_k is None else torch.cat([past_k, k], dim=2)
    v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    return out, torch.empty_like(k_all), torch.empty_like(v_all)


@torch.library.custom_op("headsmith::attention_bias_kv_bsd", mutates_args=())
def attention_bias_kv_bsd(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                          bias: Tensor | None, scale: float, n_heads: int, n_kv_heads: int, window: int = 0,
                          key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Causal ``attention_bias_kv`` (no softcap) on flattened heads, the layout of onnxruntime's
    ``GroupQueryAttention`` (the causal mask is in ``bias`` as well):
    ``q[B,T,Hq*D]``, ``k[B,T,Hkv*D]``, ``v[B,T,Hkv*Dv]`` -> ``(out[B,T,Hq*Dv], present_k[B,Hkv,P+T,D],
    present_v[B,Hkv,P+T,Dv])``; the caches keep the ``[B,H,T,D]`` layout. Without ``bias`` the mask is built
    here: causal, a sliding ``window`` and the padding of ``key_mask[B,P+T]`` (the form of the decode graph for
    steps without padding, whose kernel applies causality and the window itself)."""
    b, t = q.shape[0], q.shape[1]
    if bias is None:
        total = (past_k.shape[2] if past_k is not None else 0) + t
        bias = attention_mask_bias(key_mask, t, total, True, window, 0, q.dtype, q.device)

    def heads(x: Tensor, n: int) -> Tensor:
        return x.reshape(b, t, n, x.shape[-1] // n).transpose(1, 2)

    out, pk, pv = attention_bias_kv(heads(q, n_heads), heads(k, n_kv_heads), heads(v, n_kv_heads), past_k, past_v,
                                    bias, scale, 0.0)
    return out.transpose(1, 2).reshape(b, t, -1), pk, pv


@attention_bias_kv_bsd.register_fake
def _attention_bias_kv_bsd_fake(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                                bias: Tensor | None, scale: float, n_heads: int, n_kv_heads: int, window: int = 0,
                                key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    b, t = q.shape[0], q.shape[1]
    d, dv = k.shape[-1] // n_kv_heads, v.shape[-1] // n_kv_heads
    past = 0 if past_k is None else past_k.shape[2]
    pk = k.new_empty((b, n_kv_heads, past + t, d))
    pv = v.new_empty((b, n_kv_heads, past + t, dv))
    return q.new_empty((b, t, n_heads * dv)), pk, pv
