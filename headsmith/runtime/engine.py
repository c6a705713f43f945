"""Engines: the same ``prefill`` / ``decode`` / ``forward`` calls on every backend.

Letters: B batch, T new tokens, P cached tokens, V vocab.

- ``prefill(ids[B,T], mask[B,T], pos[B,T]) -> (logits[B,1,V], cache)``: logits of the last position;
- ``decode(ids[B,T], mask[B,P+T], pos[B,T], cache) -> (logits[B,T,V], cache)``: the cache grows by T;
- ``forward(ids, mask, pos) -> logits[B,T,V]`` (or hidden states for encoders), no cache (evaluation).

Inputs are int64 torch tensors, outputs float32 torch tensors. ``TorchEngine`` runs the prefill/decode FX
graphs (from a Program in memory or the ``.pt2`` files of an artifact); ``OrtEngine`` runs the ONNX files
with onnxruntime (CUDA when present, else CPU), binding inputs and outputs to the preallocated
:class:`~headsmith.runtime.kv_cache.KVCache` buffers so a decode step allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import BackendError
from ..program import ModelInfo, ModelSpec, Program
from .kv_cache import CacheSpec, KVCache


class Engine(Protocol):
    name: str
    info: ModelInfo
    spec: ModelSpec

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]: ...

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: Any) -> tuple[Tensor, Any]: ...

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor: ...


@dataclass
class TorchCache:
    """The torch engine's cache: the present tensors of the last step."""

    tensors: list[Tensor]
    seq_dims: list[int]

    @property
    def length(self) -> int:
        return int(self.tensors[0].shape[self.seq_dims[0]]) if self.tensors else 0

    def truncate(self, length: int) -> None:
        self.tensors = [t.narrow(d, 0, length).contiguous() for t, d in zip(self.tensors, self.seq_dims)]


@dataclass
class TorchEngine:
    """Runs prefill/decode graphs with torch (eager FX, or the artifact's exported programs)."""

    info: ModelInfo
    spec: ModelSpec
    prefill_fn: Any
    decode_fn: Any
    forward_fn: Any
    seq_dims: list[int]
    name: str = "torch"

    @staticmethod
    def from_program(program: Program) -> TorchEngine:
        spec = program.spec()
        if program.info.task != "causal-lm":
            return TorchEngine(program.info, spec, None, None, program.gm, [])
        from ..passes.kv_cache import decode_graph, prefill_graph
        pre, entries = prefill_graph(program)
        dec, _ = decode_graph(program)
        return TorchEngine(program.info, spec, pre, dec, program.gm, [e.seq_dim for e in entries])

    @staticmethod
    def from_artifact(artifact: Any) -> TorchEngine:
        from .. import ops as _ops  # noqa: F401
        from ..passes import kv_cache as _kv  # noqa: F401  (registers headsmith.cache_point)
        weights = artifact.weights
        backend = artifact.manifest["backend"]

        def load(name: str) -> Any:
            return bind_weights(torch.export.load(str(artifact.path / name)), weights)

        forward = load(backend["program"])
        if artifact.info.task != "causal-lm":
            return TorchEngine(artifact.info, artifact.spec, None, None, forward, [])
        cache = backend.get("cache", [])
        return TorchEngine(artifact.info, artifact.spec, load(backend["prefill"]), load(backend["decode"]), forward,
                           [int(e["seq_dim"]) for e in cache])

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        with torch.no_grad():
            out = self.prefill_fn(input_ids, position_ids, attention_mask)
        return out[0], TorchCache(list(out[1:]), self.seq_dims)

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: TorchCache) -> tuple[Tensor, Any]:
        with torch.no_grad():
            out = self.decode_fn(input_ids, position_ids, attention_mask, *cache.tensors)
        cache.tensors = list(out[1:])
        return out[0], cache

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self.forward_fn(input_ids, position_ids, attention_mask)


@dataclass
class OrtEngine:
    """Runs ``prefill.onnx`` / ``decode.onnx`` (or ``model.onnx``) with onnxruntime and IO binding."""

    info: ModelInfo
    spec: ModelSpec
    directory: Path
    backend: dict[str, Any]
    threads: int | None = None
    name: str = "onnx"
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def cache_specs(self) -> list[CacheSpec]:
        return CacheSpec.from_manifest(self.backend.get("cache", []))

    def session(self, key: str) -> Any:
        if key not in self._sessions:
            from ..backends.onnx_backend import ort_session
            path = self.directory / self.backend[key]
            if not path.exists():
                raise BackendError(f"ONNX file {path} is missing", "re-run `headsmith convert --backend onnx`")
            self._sessions[key] = ort_session(path, self.threads)
        return self._sessions[key]

    @property
    def providers(self) -> list[str]:
        key = "forward" if "forward" in self.backend else "prefill"
        return list(self.session(key).get_providers())

    @property
    def in_place(self) -> bool:
        """The decode graph appends to one shared buffer per cache entry (see kv_cache.py)."""
        return bool(self.backend.get("kv_in_place"))

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        return KVCache(self.cache_specs, batch, capacity, in_place=self.in_place)

    def _run(self, key: str, feeds: dict[str, np.ndarray], outputs: list[tuple[str, np.ndarray]]) -> None:
        sess = self.session(key)
        io = sess.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, buf in outputs:
            io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        sess.run_with_iobinding(io)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        b, t = input_ids.shape
        cache = self.new_cache(b, capacity=max(256, 2 * t))
        logits = np.empty((b, 1, self.info.vocab_size), dtype=np.float32)
        names = [f"present_{s.name.replace('.', '_')}" for s in cache.specs]
        if cache.in_place:  # the prefill graph returns compact presents: copy them into the buffers once
            presents = [np.empty(cache.shape_for(spec, t), dtype=np.float32) for spec in cache.specs]
        else:
            presents = cache.present_views(t)
        self._run("prefill", _feeds(input_ids, position_ids, attention_mask),
                  [("logits", logits), *zip(names, presents)])
        if cache.in_place:
            cache.store(presents)
        else:
            cache.commit(t)
        return torch.from_numpy(logits), cache

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: KVCache) -> tuple[Tensor, Any]:
        b, t = input_ids.shape
        if (self.backend.get("attention") == "gqa" or self.backend.get("gqa_layers")) and b > 1 and t > 1 \
                and cache.length > 0:
            # onnxruntime's GroupQueryAttention takes several new tokens with a past only for batch 1:
            # run them one at a time (same result)
            p = attention_mask.shape[1] - t
            pieces = []
            for i in range(t):
                logits, cache = self.decode(input_ids[:, i:i + 1], attention_mask[:, :p + i + 1],
                                            position_ids[:, i:i + 1], cache)
                pieces.append(logits)
            return torch.cat(pieces, 1), cache
        presents = cache.present_views(t)  # first: it may grow the buffers the past is read from
        logits = np.empty((b, t, self.info.vocab_size), dtype=np.float32)
        if cache.in_place:
            # no padding: the graph whose attention takes no mask (faster), when the artifact has one
            key = "decode_dense" if "decode_dense" in self.backend and bool(attention_mask.all()) else "decode"
            self._run_in_place(cache, presents, _feeds(input_ids, position_ids, attention_mask), logits, key)
            cache.commit(t)
            return torch.from_numpy(logits), cache
        feeds = _feeds(input_ids, position_ids, attention_mask)
        for spec, past in zip(cache.specs, cache.past()):
            feeds[f"past_{spec.name.replace('.', '_')}"] = past
        names = [f"present_{s.name.replace('.', '_')}" for s in cache.specs]
        self._run("decode", feeds, [("logits", logits), *zip(names, presents)])
        cache.commit(t)
        return torch.from_numpy(logits), cache

    def _run_in_place(self, cache: KVCache, buffers: list[np.ndarray], feeds: dict[str, np.ndarray],
                      logits: np.ndarray, graph: str = "decode") -> None:
        """One decode step on the shared buffers; their bindings are made once and kept on the cache until a
        growth (or a switch between ``decode`` and ``decode_dense``) replaces them (only ids, positions, mask
        and logits are bound per step)."""
        sess = self.session(graph)
        key = (id(sess), tuple(buf.ctypes.data for buf in buffers))
        if cache.binding is None or cache.binding[0] != key:
            io = sess.io_binding()
            for spec, buf in zip(cache.specs, buffers):
                name = spec.name.replace(".", "_")
                io.bind_cpu_input(f"past_{name}", buf)
                io.bind_output(f"present_{name}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            cache.binding = (key, io)
        io = cache.binding[1]
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        sess.run_with_iobinding(io)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        if "forward" in self.backend:
            out = self.session("forward").run(None, {k: v for k, v in _feeds(input_ids, position_ids,
                                                                             attention_mask).items()})
            return torch.from_numpy(out[0])
        # an empty ping-pong cache: the graph sees a past of length 0 (a prompt), whatever its cache mode
        empty = KVCache(self.cache_specs, input_ids.shape[0], 1)
        logits, _ = self.decode(input_ids, attention_mask, position_ids, empty)
        return logits


def bind_weights(ep: Any, weights: dict[str, Tensor]) -> Any:
    """A callable over an exported program whose weights were lifted to inputs: the weight placeholders become
    attributes of a GraphModule (so a call passes only the real inputs, with no per-call pytree flattening or
    input checks over hundreds of weights)."""
    from torch import fx

    keys = ep.call_spec.in_spec.child(0).child(0).context
    gm = ep.graph_module
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) < len(keys):
        raise BackendError("the exported program does not take its weights as inputs")
    for i, (node, key) in enumerate(zip(placeholders, keys)):
        root.register_buffer(f"w{i}", weights[key])
        env[node] = graph.get_attr(f"w{i}")
    for node in gm.graph.nodes:
        if node in env:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    bound = fx.GraphModule(root, graph)
    single = len(ep.call_spec.out_spec.children()) == 0 if hasattr(ep.call_spec.out_spec, "children") else False

    def call(*args: Tensor) -> Any:
        out = bound(*args)
        return out[0] if single and isinstance(out, (tuple, list)) else out

    return call


def _feeds(input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids.to(torch.int64).numpy(), "position_ids": position_ids.to(torch.int64).numpy(),
            "attention_mask": attention_mask.to(torch.int64).numpy()}


def engine_for(artifact: Any, threads: int | None = None) -> Engine:
    """The engine that runs ``artifact`` (by its manifest's backend)."""
    backend = artifact.manifest["backend"]
    name = backend["name"]
    if name == "torch":
        return TorchEngine.from_artifact(artifact)
    if name == "onnx":
        engine = OrtEngine(artifact.info, artifact.spec, artifact.path, backend, threads)
        # load now, so timings never include session creation; with a decode_dense graph the padded decode
        # graph loads at the first step that has padding (each session holds its own prepacked weights)
        for key in ("prefill", "decode_dense" if "decode_dense" in backend else "decode", "forward"):
            if key in backend:
                engine.session(key)
        return engine
    if name == "tvm":
        from .tvm_engine import TvmEngine
        return TvmEngine.from_artifact(artifact, threads)
    if name == "tensorrt":
        from .tensorrt_engine import TensorRTEngine
        return TensorRTEngine.from_artifact(artifact)
    raise BackendError(f"artifact {artifact.path} was built for backend {name!r}, which this version cannot run",
                       "convert it again with --backend torch or --backend onnx")
