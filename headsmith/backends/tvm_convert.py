"""TVM converters: headsmith's ops (and ``aten.linear`` on CPU targets) as Relax, for ``from_exported_program``.

Letters: B batch, T new tokens, P cached tokens, C cache capacity, H heads, D head dim, N output features,
K input features.

- ``linear`` (llvm): fp32 or 16-bit weights packed into tiles once (``transform_params``), hand-scheduled
  ``tvm_kernels.matmul_packed``;
- ``linear_q`` / ``embedding_q``: block-quantised weights (headsmith.qweights): on llvm the dequantising
  ``tvm_kernels.matmul_q``; on cuda Relax dequantisation in front of the matmul (fused, scheduled by dlight);
- ``attention`` / ``attention_kv``: ``tvm_kernels.attention_cpu`` (in-place KV write on decode) on llvm, a
  composition of Relax ops on cuda;
- ``to.device`` (a cast) and ``pow`` with small integer exponents (products: CUDA's fast-math ``powf`` is NaN
  for negative bases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..block_sparse import BlockPattern
from ..errors import BackendError

if TYPE_CHECKING:
    from .tvm_backend import TvmTarget

NEG = -3.4028234663852886e38  # most negative float32: masked scores (softmax never sees -inf)


# ---- converters ---------------------------------------------------------------------------------------
@dataclass
class Converters:
    """``custom_convert_map`` for one graph: kernels are added once per (graph, configuration)."""

    target: TvmTarget
    prefix: str
    mask_node: fx.Node | None = None
    _kernels: dict[tuple[Any, ...], Any] | None = None

    def table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"attention.default": self.attention, "attention_kv.default": self.attention_kv,
                                 "cache_point.default": lambda node, imp: imp.env[node.args[0]],
                                 "to.device": self.to_device, "pow.Tensor_Scalar": self.power,
                                 "linear_q.default": self.linear_q, "embedding_q.default": self.embedding_q}
        if self.target.kind == "llvm":
            table["linear.default"] = self.linear
        return table

    def kernel(self, importer: Any, key: tuple[Any, ...], make: Any) -> Any:
        if self._kernels is None:
            self._kernels = {}
        if key not in self._kernels:
            name = f"{self.prefix}_{key[0]}_{len(self._kernels)}"
            self._kernels[key] = importer.block_builder.add_func(make(), name)
        return self._kernels[key]

    def to_device(self, node: fx.Node, importer: Any) -> Any:
        """``aten.to.device(x, device, dtype)``: a cast (one device here)."""
        from tvm import relax
        from tvm.relax.frontend.torch.base_fx_graph_translator import BaseFXGraphImporter

        x = importer.env[node.args[0]]
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if not isinstance(dtype, torch.dtype):
            return x
        return importer.block_builder.emit(
            relax.op.astype(x, BaseFXGraphImporter._convert_data_type(dtype, importer.env)))

    def power(self, node: fx.Node, importer: Any) -> Any:
        """``x ** c``: small integer exponents as products, 0.5 as a square root. Relax's ``power`` becomes
        ``powf``, which CUDA's fast math computes as ``exp2(c * log2(x))``: NaN for every negative ``x``
        (RMSNorm's ``x.pow(2)`` turned every logit into NaN on an H200)."""
        from tvm import relax

        bb = importer.block_builder
        x, c = importer.env[node.args[0]], node.args[1]
        if isinstance(c, (int, float)) and float(c) == int(c) and 1 <= int(c) <= 4:
            out = x
            for _ in range(int(c) - 1):
                out = bb.emit(relax.op.multiply(out, x))
            return out
        if isinstance(c, (int, float)) and float(c) == 0.5:
            return bb.emit(relax.op.sqrt(x))
        exponent = relax.const(float(c), x.struct_info.dtype) if isinstance(c, (int, float)) else importer.env[c]
        return bb.emit(relax.op.power(x, exponent))

    # -- linear (llvm): packed weights -------------------------------------------------------------
    def linear(self, node: fx.Node, importer: Any) -> Any:
        """``linear(x, W[, b])`` with fp32 weights, or with the cast of a 16-bit weight (``quantize(weights=bf16)``:
        the tiles keep 16 bits and the kernel widens them)."""
        from tvm import relax

        from . import tvm_kernels as kernels

        bb = importer.block_builder
        x, w = importer.env[node.args[0]], importer.env[node.args[1]]
        bias = importer.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        src = node.args[1]
        if isinstance(src, fx.Node) and src.op == "call_function" and isinstance(src.args[0], fx.Node):
            narrow = importer.env[src.args[0]]  # a cast weight: read the stored 16-bit tensor itself
            if narrow.ty.dtype in ("float16", "bfloat16") and len(narrow.ty.shape) == 2:
                w = narrow
        if x.ty.dtype != "float32" or w.ty.dtype not in ("float32", "float16", "bfloat16") or len(w.ty.shape) != 2:
            return bb.emit(relax.op.linear(x, w, bias, "float32"))
        n, k = int(w.ty.shape[0]), int(w.ty.shape[1])
        x2, rows, lead = self._rows(bb, x, k)
        tiles = self._tiles(bb, w, n)
        dtype = str(w.ty.dtype)
        gv = self.kernel(importer, ("matmul", self._padded(n), k, dtype),
                         lambda: kernels.matmul_packed(self._padded(n), k, wdtype=dtype))
        y = bb.emit(relax.call_tir(gv, [x2, tiles], relax.TensorType([rows, self._padded(n)], "float32")))
        return self._finish_linear(bb, y, n, lead, bias)

    def linear_q(self, node: fx.Node, importer: Any) -> Any:
        """``linear_q(x, packed, scales, zeros, bias, bits, group)``: on ``llvm`` the dequantising kernel of
        ``tvm_kernels.matmul_q`` over tiles built once by ``transform_params``; on ``cuda`` the blocks are
        dequantised by Relax ops in front of the matmul (fused and scheduled by dlight)."""
        from tvm import relax

        from . import tvm_kernels as kernels

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        packed, scales = importer.env[node.args[1]], importer.env[node.args[2]]
        zeros = importer.env[node.args[3]] if node.args[3] is not None else None
        bias = importer.env[node.args[4]] if node.args[4] is not None else None
        bits, group = int(node.args[5]), int(node.args[6])  # type: ignore[arg-type]
        n, nb = int(scales.ty.shape[0]), int(scales.ty.shape[1])
        k = int(x.ty.shape[-1])
        zero_scales = bb.emit(relax.op.multiply(self._zero_points(bb, zeros, bits, n, nb), scales))
        if self.target.kind != "llvm":
            w = self._dequantize(bb, packed, scales, zero_scales, bits, group, n, nb, k)
            return bb.emit(relax.op.linear(x, w, bias, "float32"))
        x2, rows, lead = self._rows(bb, x, k)
        xpad = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, nb * group - k])) if nb * group != k else x2
        xsum = bb.emit(relax.op.sum(relax.op.reshape(xpad, [rows, nb, group]), axis=[2]))
        codes = self._tiles(bb, bb.emit(relax.op.reshape(packed, [n, -1])), n)
        gv = self.kernel(importer, ("matmul_q", self._padded(n), k, bits, group),
                         lambda: kernels.matmul_q(self._padded(n), k, bits, group))
        args = [x2, xsum, codes, self._tiles(bb, scales, n), self._tiles(bb, zero_scales, n)]
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, self._padded(n)], "float32")))
        return self._finish_linear(bb, y, n, lead, bias)

    def embedding_q(self, node: fx.Node, importer: Any) -> Any:
        """``embedding_q(packed, scales, zeros, ids, bits, group)``: the rows looked up, dequantised."""
        from tvm import relax

        bb = importer.block_builder
        packed, scales = importer.env[node.args[0]], importer.env[node.args[1]]
        zeros = importer.env[node.args[2]] if node.args[2] is not None else None
        ids = importer.env[node.args[3]]
        bits, group = int(node.args[4]), int(node.args[5])  # type: ignore[arg-type]
        n, nb = int(scales.ty.shape[0]), int(scales.ty.shape[1])
        zero_scales = bb.emit(relax.op.multiply(self._zero_points(bb, zeros, bits, n, nb), scales))
        flat = bb.emit(relax.op.reshape(ids, [-1]))
        rows = bb.emit(relax.op.take(packed, flat, axis=0))
        t = rows.ty.shape[0]
        w = self._dequantize(bb, rows, bb.emit(relax.op.take(scales, flat, axis=0)),
                             bb.emit(relax.op.take(zero_scales, flat, axis=0)), bits, group, t, nb, nb * group)
        return bb.emit(relax.op.reshape(w, [*ids.ty.shape, nb * group]))

    @staticmethod
    def _zero_points(bb: Any, zeros: Any, bits: int, n: int, nb: int) -> Any:
        """Per-block zero points ``[N, nb]`` (float32): unpacked from ``zeros`` or the symmetric ``2**(bits-1)``."""
        from tvm import relax
        if zeros is None:
            return relax.const(float(1 << (bits - 1)), "float32")
        z = zeros
        if bits == 4:
            low = bb.emit(relax.op.bitwise_and(z, relax.const(15, "uint8")))
            high = bb.emit(relax.op.right_shift(z, relax.const(4, "uint8")))
            both = bb.emit(relax.op.reshape(bb.emit(relax.op.stack([low, high], axis=2)), [n, -1]))
            z = bb.emit(relax.op.strided_slice(both, axes=[1], begin=[0], end=[nb]))
        return bb.emit(relax.op.astype(z, "float32"))

    @staticmethod
    def _dequantize(bb: Any, packed: Any, scales: Any, zero_scales: Any, bits: int, group: int, n: Any, nb: int,
                    k: int) -> Any:
        """``[N, K]`` float32 weights from codes ``[N, nb, G*bits/8]``: ``q * s - z*s`` per block."""
        from tvm import relax
        q = packed
        if bits == 4:
            low = bb.emit(relax.op.bitwise_and(q, relax.const(15, "uint8")))
            high = bb.emit(relax.op.right_shift(q, relax.const(4, "uint8")))
            q = bb.emit(relax.op.reshape(bb.emit(relax.op.stack([low, high], axis=3)), [n, nb, group]))
        q = bb.emit(relax.op.astype(q, "float32"))
        w = relax.op.subtract(relax.op.multiply(q, relax.op.expand_dims(scales, 2)),
                              relax.op.expand_dims(zero_scales, 2) if zero_scales.ty.ndim == 2 else zero_scales)
        w = bb.emit(relax.op.reshape(w, [n, nb * group]))
        if k != nb * group:
            w = bb.emit(relax.op.strided_slice(w, axes=[1], begin=[0], end=[k], assume_inbound=True))
        return w

    @staticmethod
    def _padded(n: int) -> int:
        from .tvm_kernels import NT
        return -(-n // NT) * NT

    @staticmethod
    def _rows(bb: Any, x: Any, k: int) -> tuple[Any, Any, list[Any]]:
        """``x[..., K]`` as ``[rows, K]``; returns it, ``rows`` and the leading dims."""
        from tvm import relax
        lead = list(x.ty.shape)[:-1]
        rows = lead[0]
        for extent in lead[1:]:
            rows = rows * extent
        return bb.emit(relax.op.reshape(x, [rows, k])), rows, lead

    def _tiles(self, bb: Any, w: Any, n: int) -> Any:
        """``w[N, L]`` as tiles ``[N/NT, L, NT]`` (zero rows make ``N`` a whole number of tiles)."""
        from tvm import relax

        from .tvm_kernels import NT
        padded = self._padded(n)
        if padded != n:
            extra = relax.op.zeros((padded - n, int(w.ty.shape[1])), str(w.ty.dtype))
            w = bb.emit(relax.op.concat([w, extra], axis=0))
        tiled = relax.op.reshape(w, [padded // NT, NT, int(w.ty.shape[1])])
        return bb.emit(relax.op.permute_dims(tiled, [0, 2, 1]))

    def _finish_linear(self, bb: Any, y: Any, n: int, lead: list[Any], bias: Any) -> Any:
        from tvm import relax
        if self._padded(n) != n:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n], assume_inbound=True))
        y = bb.emit(relax.op.reshape(y, [*lead, n]))
        return bb.emit(relax.op.add(y, bias)) if bias is not None else y

    # -- attention -------------------------------------------------------------------------------------
    def _options(self, node: fx.Node, first_option: int, kv: bool = False) -> dict[str, Any]:
        names: tuple[str, ...] = ("causal", "scale", "window", "sinks", "softcap", "layer")
        names += ("n_heads", "n_kv_heads", "blocks") if kv else ("blocks",)  # attention_kv's positional order
        defaults = {"causal": True, "scale": 0.0, "window": 0, "sinks": 0, "softcap": 0.0, "layer": -1, "blocks": ""}
        values = dict(defaults)
        for name, value in zip(names, node.args[first_option:]):
            values[name] = value
        values.update({k: v for k, v in node.kwargs.items() if k in defaults})
        return values

    def _mask(self, importer: Any, key_mask: Any, batch: Any, total: Any) -> Any:
        from tvm import relax
        if key_mask is not None:
            return importer.env[key_mask]
        return importer.block_builder.emit(relax.op.ones((batch, total), "bool"))

    def attention(self, node: fx.Node, importer: Any) -> Any:
        """``attention(q, k, v, key_mask)`` without a cache (prefill, encoders)."""
        from tvm import relax

        q, k, v = (importer.env[a] for a in node.args[:3])
        key_mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("key_mask")
        if node.kwargs.get("key_bias") is not None or len(node.args) > 11:
            raise BackendError("the TVM lowering has no attention key bias (token-merge's proportional attention)",
                               "convert a token-merge program with --backend onnx or torch")
        opts = self._options(node, 4)
        b, hq, tq, d = q.ty.shape
        tk = k.ty.shape[2]
        mask = self._mask(importer, key_mask, b, tk)
        if self.target.kind != "llvm" or q.ty.dtype != "float32":
            return composed_attention(importer.block_builder, q, k, v, mask, opts, self.prefix)
        gv = self._cpu_kernel(importer, q, k, v, opts, key_mask is not None, inplace=False)
        dv = v.ty.shape[3]
        out = importer.block_builder.emit(relax.call_tir(
            gv, [q, k, v, k, v, mask], [relax.TensorType([b, hq, tq, dv], "float32"),
                                        relax.TensorType([b * hq, tk + 8], "float32")]))
        return importer.block_builder.emit(relax.TupleGetItem(out, 0))

    def attention_kv(self, node: fx.Node, importer: Any) -> Any:
        """``attention_kv(q, k, v, past_k, past_v, key_mask)`` with in-place caches: ``(out, kc, vc)``."""
        from tvm import relax

        from . import tvm_kernels as kernels

        bb = importer.block_builder
        q, k, v = (importer.env[a] for a in node.args[:3])
        if node.args[3] is None or node.args[4] is None:
            raise BackendError("TVM decode graphs need both past keys and past values",
                               "this graph caches something other than K and V; use --backend onnx")
        kc, vc = importer.env[node.args[3]], importer.env[node.args[4]]
        key_mask = node.args[5] if len(node.args) > 5 else node.kwargs.get("key_mask")
        opts = self._options(node, 6, kv=True)
        b, hq, tq, d = q.ty.shape
        if self.mask_node is None:
            raise BackendError("the decode graph has no attention_mask input")
        # P+T from the layer's own key mask (a ring layer's holds fewer slots than the text, see kv_cache.py)
        total = importer.env[key_mask if key_mask is not None else self.mask_node].ty.shape[1]
        mask = self._mask(importer, key_mask, b, total)
        hkv, dv = int(k.ty.shape[1]), int(v.ty.shape[3])
        if self.target.kind != "llvm" or q.ty.dtype != "float32":
            gv = self.kernel(importer, ("kv_write", hkv, int(d), dv), lambda: kernels.kv_write_gpu(hkv, int(d), dv))
            written = bb.emit(relax.op.call_tir_inplace(gv, [k, v, kc, vc, mask], [2, 3],
                                                        [kc.ty, vc.ty]))
            kc_new, vc_new = bb.emit(relax.TupleGetItem(written, 0)), bb.emit(relax.TupleGetItem(written, 1))
            k_all = bb.emit(relax.op.strided_slice(kc_new, axes=[2], begin=[0], end=[total], assume_inbound=True))
            v_all = bb.emit(relax.op.strided_slice(vc_new, axes=[2], begin=[0], end=[total], assume_inbound=True))
            return composed_attention(bb, q, k_all, v_all, mask, opts, self.prefix), kc_new, vc_new
        gv = self._cpu_kernel(importer, q, k, v, opts, key_mask is not None, inplace=True)
        out = bb.emit(relax.op.call_tir_inplace(
            gv, [q, k, v, kc, vc, mask], [3, 4, -1, -1],
            [kc.ty, vc.ty, relax.TensorType([b, hq, tq, dv], "float32"),
             relax.TensorType([b * hq, total + 8], "float32")]))
        return (bb.emit(relax.TupleGetItem(out, 2)), bb.emit(relax.TupleGetItem(out, 0)),
                bb.emit(relax.TupleGetItem(out, 1)))

    def _cpu_kernel(self, importer: Any, q: Any, k: Any, v: Any, opts: dict[str, Any], has_mask: bool,
                    inplace: bool) -> Any:
        from . import tvm_kernels as kernels

        hq, d = int(q.ty.shape[1]), int(q.ty.shape[3])
        hkv, dv = int(k.ty.shape[1]), int(v.ty.shape[3])
        if hq % hkv != 0:
            raise BackendError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
        scale = float(opts["scale"]) if float(opts["scale"]) > 0.0 else 1.0 / d ** 0.5
        config = (hq, hkv, d, dv, bool(opts["causal"]), int(opts["window"]), int(opts["sinks"]),
                  float(opts["softcap"]), scale, has_mask, inplace, str(opts["blocks"]))
        return self.kernel(importer, ("attention", *config), lambda: kernels.attention_cpu(*config))


def composed_attention(bb: Any, q: Any, k: Any, v: Any, mask: Any, opts: dict[str, Any], prefix: str) -> Any:
    """``headsmith.attention`` in Relax ops (matmul, a mask built with TE, softmax): the CUDA lowering.

    GQA without copying K/V: ``q[B,Hq,T,D]`` is viewed as ``[B,Hkv,rep*T,D]``. Masked scores are the most
    negative float, so an all-masked row's softmax is uniform (the mean of v), as in the reference.
    """
    from tvm import relax, te, tirx

    b, hq, tq, d = q.ty.shape
    hkv = k.ty.shape[1]
    dv = v.ty.shape[3]
    rep = int(hq) // int(hkv)
    scale = float(opts["scale"]) if float(opts["scale"]) > 0.0 else 1.0 / int(d) ** 0.5
    from . import tvm_kernels as kernels

    causal, window, sinks, softcap = bool(opts["causal"]), int(opts["window"]), int(opts["sinks"]), float(
        opts["softcap"])
    pattern = BlockPattern.decode(str(opts.get("blocks", "")))
    qg = bb.emit(relax.op.reshape(q, [b, hkv, rep * tq, d]))
    scores = bb.emit(relax.op.matmul(qg, relax.op.permute_dims(k, [0, 1, 3, 2])))  # [B,Hkv,rep*T,TK]

    def masked(s: Any, m: Any) -> Any:
        queries, keys = s.shape[2] // rep, s.shape[3]  # TE's own shape vars (the Relax ones are not in scope)

        def value(bi: Any, g: Any, row: Any, j: Any) -> Any:
            x = s[bi, g, row, j] * tirx.const(scale, "float32")
            if softcap > 0.0:
                x = tirx.tanh(x / tirx.const(softcap, "float32")) * tirx.const(softcap, "float32")
            qpos = row % queries + (keys - queries)
            ok = m[bi, j]
            if causal:
                ok = tirx.all(ok, j <= qpos)
            if window > 0:
                inside = qpos - j < window
                if sinks > 0:
                    inside = tirx.any(inside, j < sinks)
                ok = tirx.all(ok, inside)
            if pattern is not None:
                ok = tirx.all(ok, kernels.block_visible(pattern, qpos, j))
            return tirx.if_then_else(ok, x, tirx.const(NEG, "float32"))
        return te.compute(s.shape, value, name="masked_scores")

    scores = bb.emit_te(masked, scores, mask, primfunc_name_hint=f"{prefix}_masked_scores")
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    out = bb.emit(relax.op.matmul(probs, v))
    return bb.emit(relax.op.reshape(out, [b, hq, tq, dv]))
