"""TVM backend: lower the prefill / decode graphs (or an encoder's forward) to Relax and compile them.

Letters: B batch, T new tokens, P cached tokens, C cache capacity, H KV heads, D head dim, V vocab.

Each FX graph is exported with ``torch.export`` (weights lifted to trailing inputs, the dynamic dims of
the ONNX backend) and imported with ``from_exported_program`` and converters for ``headsmith.attention``,
``headsmith.attention_kv`` (the decode graph's ``attention(q, cat([past, k]), ...)``, fused as for ONNX)
and, on CPU targets, ``aten.linear``. One IRModule holds ``prefill`` / ``decode`` (or ``forward``) and
``transform_params`` (``LiftTransformParams``: weight packing runs once, when the engine loads).
The module is compiled with ``tvm.compile`` and written with ``export_library`` as ``model.so``.

Functions in the library (inputs are int64 / float32 tensors):

- ``transform_params(*weights) -> params``: ``weights`` in the manifest's ``params`` order;
- ``prefill(ids[B,T], pos[B,T], mask[B,T], *params) -> (logits[B,1,V], *cache[B,H,T,D])``;
- ``decode(ids[B,T], pos[B,T], mask[B,P+T], *cache[B,H,C,D], *params) -> (logits[B,T,V], *cache)``:
  the caches are buffers of capacity ``C >= P+T`` whose first P rows hold the past; the new keys and
  values are written **in place** at rows ``P..P+T`` (no concatenation copy), so the engine keeps the
  buffers between steps and only grows them;
- ``forward(ids, pos, mask, *params) -> hidden`` for encoders.

Targets (``--tvm-target``): ``llvm`` (this machine's CPU, found by LLVM), ``llvm:<cpu>`` (an LLVM CPU
name, e.g. ``x86-64-v3``), ``cuda:<sm_XY>`` (cross-compiled; ``cuda`` alone means ``sm_80``). On
``llvm`` the matmuls and attention run hand-scheduled kernels (``tvm_kernels``): TVM's default CPU
lowering leaves loops unscheduled and MetaSchedule needs static shapes, which prefill/decode lack. On
``cuda`` the graph keeps Relax's matmul and the attention is composed of Relax ops, scheduled by dlight.
The manifest records the target (kind, CPU and its ISA features, or the CUDA arch), which the engine
checks against the machine before loading the library.
"""

from __future__ import annotations

import os
import platform
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import BackendError
from ..program import Program

LIBRARY = "model.so"
DEFAULT_TARGET = "llvm"
DEFAULT_CUDA_ARCH = "sm_80"
NEG = -3.4028234663852886e38
# ISA extensions that change the generated code; the engine refuses a library needing one the host lacks
ISA_FEATURES = ("sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                "avx512cd", "avx512vnni", "avx512bf16", "avx512fp16", "avxvnni", "amx-tile", "amx-bf16",
                "amx-int8")
_CPUINFO_NAMES = {"sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx512vnni": "avx512_vnni",
                  "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
                  "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8"}


# ---- targets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TvmTarget:
    """A compilation target: ``llvm`` with an LLVM CPU name, or ``cuda`` with an ``sm_XY`` arch."""

    kind: str
    mcpu: str = ""
    arch: str = ""

    @staticmethod
    def parse(text: str) -> TvmTarget:
        """``llvm`` | ``llvm:<cpu>`` | ``cuda`` | ``cuda:<sm_XY>`` (see the module docstring)."""
        kind, _, detail = text.strip().partition(":")
        if kind == "llvm":
            from tvm.target import codegen
            if detail and not codegen.llvm_is_valid_cpu(detail, codegen.llvm_get_system_triple()):
                raise BackendError(f"LLVM does not know the CPU {detail!r}",
                                   "give an LLVM CPU name such as x86-64-v3, skylake-avx512 or znver3")
            return TvmTarget("llvm", mcpu=detail or host_cpu())
        if kind == "cuda":
            arch = detail or DEFAULT_CUDA_ARCH
            if re.fullmatch(r"sm_\d{2,3}a?", arch) is None:
                raise BackendError(f"unknown CUDA arch {arch!r} in --tvm-target {text!r}",
                                   "give it as cuda:sm_80 or cuda:sm_90")
            return TvmTarget("cuda", arch=arch)
        raise BackendError(f"unknown TVM target {text!r}", "use llvm, llvm:<cpu>, cuda:sm_80 or cuda:sm_90")

    def tvm(self) -> Any:
        from tvm.target import Target
        if self.kind == "cuda":
            return Target({"kind": "cuda", "arch": self.arch}, host=Target({"kind": "llvm"}))
        return Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": os.cpu_count() or 1})

    def record(self) -> dict[str, Any]:
        """What the manifest stores (and the engine checks)."""
        if self.kind == "cuda":
            return {"kind": "cuda", "arch": self.arch, "spec": f"cuda:{self.arch}"}
        from tvm.target import codegen
        return {"kind": "llvm", "mcpu": self.mcpu, "mtriple": codegen.llvm_get_system_triple(),
                "features": cpu_features(self.mcpu), "num_cores": os.cpu_count() or 1,
                "spec": f"llvm:{self.mcpu}"}


def host_cpu() -> str:
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


def cpu_features(mcpu: str) -> list[str]:
    """The ISA extensions (of :data:`ISA_FEATURES`) that LLVM enables for ``mcpu``."""
    from tvm.target import Target, codegen
    enabled = codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mcpu": mcpu}))
    return [f for f in ISA_FEATURES if f in enabled]


def host_features() -> set[str]:
    """ISA extensions this machine has (``/proc/cpuinfo`` flags; LLVM's view of the host CPU elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(cpu_features(host_cpu()))
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f for f in ISA_FEATURES if _CPUINFO_NAMES.get(f, f) in flags}


# ---- weights and export --------------------------------------------------------------------------
def weight_names(graphs: list[fx.GraphModule]) -> tuple[list[str], dict[str, str]]:
    """``(names, alias -> name)``: every weight the graphs read, each storage once, in first-use order."""
    from ..fxutil import get_tensor

    names: list[str] = []
    alias: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "get_attr" or str(node.target) in alias:
                continue
            t = get_tensor(gm, str(node.target))
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in by_storage or t.numel() == 0:
                by_storage[key] = str(node.target)
                names.append(str(node.target))
            alias[str(node.target)] = by_storage[key]
    return names, alias


def lift(gm: fx.GraphModule, names: list[str], alias: dict[str, str]) -> fx.GraphModule:
    """A copy of ``gm`` taking ``(*inputs, *weights)``: every weight of ``names`` becomes a trailing input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    weights = {name: graph.placeholder(f"w{i}") for i, name in enumerate(names)}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            env[node] = weights[alias[str(node.target)]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(torch.nn.Module(), graph)


def _decompositions() -> Any:
    """The default core-ATen decompositions, keeping ``aten.linear`` (a converter packs its weight)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default)
    return table


def export(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...], n_weights: int,
           known: set[str]) -> Any:
    """``torch.export`` a lifted graph (weights static). The graph is decomposed to core ATen only when it
    has an op outside ``known`` (the importer's converters): decomposition takes as long as the export."""
    try:
        ep = torch.export.export(gm, example, dynamic_shapes=tuple(dynamic) + (None,) * n_weights, strict=False)
        unknown = {_op_name(n) for n in ep.graph.nodes if n.op == "call_function"} - known
        return ep.run_decompositions(_decompositions()) if unknown else ep
    except Exception as e:  # report torch.export's first line; the cause stays chained
        raise BackendError(f"torch.export before TVM failed: {str(e).strip().splitlines()[0][:300]}") from e


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


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
    def _options(self, node: fx.Node, first_option: int) -> dict[str, Any]:
        names = ("causal", "scale", "window", "sinks", "softcap", "layer")
        defaults = {"causal": True, "scale": 0.0, "window": 0, "sinks": 0, "softcap": 0.0, "layer": -1}
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
        opts = self._options(node, 6)
        b, hq, tq, d = q.ty.shape
        if self.mask_node is None:
            raise BackendError("the decode graph has no attention_mask input")
        total = importer.env[self.mask_node].ty.shape[1]
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
                  float(opts["softcap"]), scale, has_mask, inplace)
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
    causal, window, sinks, softcap = bool(opts["causal"]), int(opts["window"]), int(opts["sinks"]), float(
        opts["softcap"])
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
            return tirx.if_then_else(ok, x, tirx.const(NEG, "float32"))
        return te.compute(s.shape, value, name="masked_scores")

    scores = bb.emit_te(masked, scores, mask, primfunc_name_hint=f"{prefix}_masked_scores")
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    out = bb.emit(relax.op.matmul(probs, v))
    return bb.emit(relax.op.reshape(out, [b, hq, tq, dv]))


# ---- module assembly ----------------------------------------------------------------------------------
def import_graph(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...], names: list[str],
                 alias: dict[str, str], weights: dict[str, Tensor], target: TvmTarget, prefix: str) -> Any:
    """The Relax function of one graph (its kernels in the returned IRModule, named ``prefix_*``)."""
    from tvm.relax.frontend.torch import from_exported_program

    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    lifted = lift(gm, names, alias)
    converters = Converters(target, prefix)
    known = set(ExportedProgramImporter().convert_map) | set(converters.table())
    ep = export(lifted, (*example, *(weights[n] for n in names)), dynamic, len(names), known)
    converters.mask_node = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "attention_mask"),
                                None)
    try:
        mod = from_exported_program(ep, run_ep_decomposition=False, custom_convert_map=converters.table())
    except BackendError:
        raise
    except Exception as e:  # TVM's importer raises assertion/value errors for unsupported ops
        raise BackendError(f"TVM could not import the {prefix} graph: {str(e).strip().splitlines()[0][:300]}",
                           "convert with --backend onnx, or report the op named above") from e
    func = mod["main"].with_attr("num_input", len(example))
    attrs = dict(func.attrs) if func.attrs is not None else {}
    for key in ("tir_var_upper_bound", "tir_var_lower_bound"):  # bounds of 1M tokens would size static buffers
        if key in attrs:
            func = func.without_attr(key)
    return mod, func


def cache_expanded_kv(program: Program) -> Program:
    """``program`` without the cache points ``prune-heads`` puts in front of ``index_select(k, 1, kv_index)``.

    The TVM decode kernels write the attention's own keys and values into the cache in place, so layers whose
    unequal GQA groups are expanded in the graph cache the expanded K/V here (more bytes per token than the
    ONNX and torch backends, which cache the surviving KV heads only; the manifest's cache layout says which).
    """
    from ..fxutil import erase_dead, is_call
    from ..passes.kv_cache import CACHE_POINT

    marks = [n for n in program.gm.graph.nodes if is_call(n, CACHE_POINT) and n.users
             and all(is_call(u, torch.ops.aten.index_select.default) for u in n.users)]
    if not marks:
        return program
    out = program.clone()
    for node in [n for n in out.gm.graph.nodes if n.name in {m.name for m in marks}]:
        node.replace_all_uses_with(node.args[0])
    erase_dead(out.gm.graph)
    out.gm.recompile()
    out._shapes = None
    return out


def build_module(program: Program, target: TvmTarget, progress: Any = None) -> tuple[Any, dict[str, Any]]:
    """The IRModule (``transform_params`` + the graph functions) and the manifest fields it implies."""
    import tvm
    from tvm import relax

    from ..passes.kv_cache import decode_graph, layout_dict, prefill_graph
    from .artifact import graph_weights
    from .lowering import fuse_kv_attention
    from .onnx_backend import decode_dynamic

    ids, pos, mask = program.example_inputs(batch=2, seq=8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=65536)
    graphs: dict[str, tuple[fx.GraphModule, tuple[Tensor, ...], tuple[Any, ...]]] = {}
    fields: dict[str, Any] = {}
    if program.info.task == "encoder":
        graphs["forward"] = (program.gm, (ids, pos, mask), ({0: batch, 1: seq},) * 3)
        fields["cache"] = []
    else:
        program = cache_expanded_kv(program)
        pre, entries = prefill_graph(program)
        dec, _ = decode_graph(program)
        if any(e.slot not in ("key", "value") for e in entries):
            raise BackendError("the TVM backend caches attention keys and values only; this program caches "
                               f"{sorted({e.slot for e in entries})}", "use --backend onnx or --backend torch")
        fuse_kv_attention(dec)
        with torch.no_grad():
            cache = [c.contiguous() for c in pre(ids, pos, mask)[1:]]
        graphs["prefill"] = (pre, (ids, pos, mask), ({0: batch, 1: seq},) * 3)
        graphs["decode"] = (dec, (ids[:, :3].contiguous(), pos[:, :3] + 8,
                                  torch.ones(ids.shape[0], 11, dtype=torch.int64), *cache), decode_dynamic(len(cache)))
        fields["cache"] = layout_dict(entries)
    names, alias = weight_names([g for g, _, _ in graphs.values()])
    weights = graph_weights(program.gm)
    for gm, _, _ in graphs.values():
        weights.update(graph_weights(gm))
    merged = tvm.IRModule()
    for name, (gm, example, dynamic) in graphs.items():
        _say(progress, f"importing the {name} graph into TVM Relax")
        mod, func = import_graph(gm, example, dynamic, names, alias, weights, target, name)
        for gv, f in mod.functions.items():
            if gv.name_hint != "main":
                merged[gv] = f
        merged[name] = func.with_attr("global_symbol", name)
    merged = relax.transform.LiftTransformParams(shared_transform=True)(merged)
    fields["params"] = names
    fields["functions"] = list(graphs)
    return merged, fields


def compile_module(mod: Any, target: TvmTarget) -> Any:
    import tvm

    tvm_target = target.tvm()
    try:
        with tvm_target, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tvm.compile(mod, target=tvm_target)
    except BackendError:
        raise
    except Exception as e:  # TVM raises TVMError subclasses for every lowering failure
        raise BackendError(f"TVM compilation for {target.kind} failed: {str(e).strip().splitlines()[0][:300]}") from e


def lower_tvm(program: Program, directory: Path, progress: Any = None, target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """Write ``model.so`` into ``directory``; returns the manifest's backend record."""
    import tvm

    spec = TvmTarget.parse(target)
    start = time.perf_counter()
    mod, fields = build_module(program, spec, progress)
    _say(progress, f"compiling for {spec.record()['spec']}")
    executable = compile_module(mod, spec)
    try:
        executable.export_library(str(directory / LIBRARY))
    except Exception as e:  # export_library shells out to a C compiler
        raise BackendError(f"writing {LIBRARY} failed: {str(e).strip().splitlines()[0][:300]}",
                           "export_library needs a C compiler (gcc or clang) on PATH") from e
    return {"name": "tvm", "library": LIBRARY, "target": spec.record(), "tvm_version": tvm.__version__,
            "cache_mode": "inplace", "compile_seconds": round(time.perf_counter() - start, 1),
            "host": platform.machine(), **fields}


def _say(progress: Any, text: str) -> None:
    if progress is not None:
        progress(text)


__all__ = ["DEFAULT_TARGET", "LIBRARY", "TvmTarget", "lower_tvm"]
