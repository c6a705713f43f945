"""``OrtEngine``: runs an ONNX artifact (``prefill.onnx`` / ``decode.onnx``, or ``model.onnx``) with onnxruntime
(CUDA when present, else CPU), binding inputs and outputs to the preallocated
:class:`~headsmith.runtime.kv_cache.KVCache` buffers so a decode step allocates nothing. Same protocol as the
other engines (see ``engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import BackendError
from ..merging import engine_call
from ..program import ModelInfo, ModelSpec
from ..token_pruning import PrunePlan
from .engine import _feeds, check_inputs, decode_in_steps, empty_pasts
from .kv_cache import CacheSpec, KVCache
from .pruned_prefill import run_stages
from .ring import Ring, ring_masks, rings_of, step_size


@dataclass
class OrtEngine:
    """Runs ``prefill.onnx`` / ``decode.onnx`` (or ``model.onnx``) with onnxruntime and IO binding."""

    info: ModelInfo
    spec: ModelSpec
    directory: Path
    backend: dict[str, Any]
    threads: int | None = None
    name: str = "onnx"
    prune: bool = True
    """Run the staged prefill of a ``prefill-prune`` artifact (False: its full prefill, for comparison)."""
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def cache_specs(self) -> list[CacheSpec]:
        return CacheSpec.from_manifest(self.backend.get("cache", []))

    def session(self, key: str) -> Any:
        """The session of the manifest's graph ``key`` (``prefill``, ``decode``, ..) or of an ONNX file name."""
        if key not in self._sessions:
            from ..backends.onnx_backend import ort_session
            path = self.directory / self.backend.get(key, key)
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

    @property
    def rings(self) -> list[Ring | None]:
        return rings_of(self.backend.get("cache", []))

    @property
    def kv_policy(self) -> dict[str, Any]:
        """The manifest's KV-eviction policy record (``passes/kv_evict.py``; empty: none)."""
        return self.backend.get("kv_policy", {})  # type: ignore[no-any-return]

    @property
    def cache_layout(self) -> list[dict[str, Any]]:
        return self.backend.get("cache", [])  # type: ignore[no-any-return]

    def _scores(self, batch: int, keys: int, decode: bool) -> list[tuple[str, np.ndarray]]:
        """The eviction-score outputs a graph returns (``[B, G, keys]`` per layer; decode graphs: h2o only)."""
        policy = self.kv_policy
        if not policy or (decode and policy.get("method") != "h2o"):
            return []
        return [(s["name"], np.empty((batch, int(s["heads"]), keys), dtype=np.float32)) for s in policy["scores"]]

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        check_inputs(input_ids, attention_mask, position_ids)
        if self.prune and "prefill_prune" in self.backend:
            return self._pruned_prefill(input_ids, attention_mask, position_ids)
        b, t = input_ids.shape
        cache = self.new_cache(b, capacity=max(256, 2 * t))
        logits = np.empty((b, 1, self.info.vocab_size), dtype=np.float32)
        names = [f"present_{s.name.replace('.', '_')}" for s in cache.specs]
        # in place, or with rings, the prefill graph returns compact presents of every token: stored once
        compact = cache.in_place or any(r is not None for r in cache.rings)
        presents = [np.empty(cache.shape_for(spec, t), dtype=np.float32) for spec in cache.specs] if compact \
            else cache.present_views(t)
        scores = self._scores(b, t, decode=False)
        self._run("prefill", _feeds(input_ids, position_ids, attention_mask),
                  [("logits", logits), *zip(names, presents), *scores])
        cache.scores = [a for _, a in scores] or None
        if compact:
            cache.store(presents)
        else:
            cache.commit(t)
        return torch.from_numpy(logits), cache

    def _pruned_prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
                        ) -> tuple[Tensor, KVCache]:
        """The stage graphs of ``prefill-prune`` (``pruned_prefill.py``); the later stages' entries hold fewer
        prompt tokens."""
        record = self.backend["prefill_prune"]
        stages = record["stages"]

        def run(s: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return list(self.session(stages[s]["graph"]).run(stages[s]["outputs"], feeds))

        feeds = _feeds(input_ids, position_ids, attention_mask)
        logits, presents, pruned = run_stages(PrunePlan.from_dict(record), run, [st["entries"] for st in stages],
                                              len(self.cache_specs), feeds["input_ids"], feeds["attention_mask"],
                                              feeds["position_ids"])
        b, t = input_ids.shape
        cache = self.new_cache(b, capacity=max(256, 2 * t))
        cache.store_pruned(presents, pruned)
        return torch.from_numpy(logits), cache

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: KVCache) -> tuple[Tensor, Any]:
        check_inputs(input_ids, attention_mask, position_ids, cache.length)
        b, t = input_ids.shape
        # onnxruntime's GroupQueryAttention takes several new tokens with a past only for batch 1; a step must
        # fit every ring: both run as steps of fewer tokens (same result)
        one = (self.backend.get("attention") == "gqa" or self.backend.get("gqa_layers")) and b > 1 and t > 1 \
            and cache.length > 0
        if one or step_size(cache.rings, cache.length, t) < t:
            return decode_in_steps(self, input_ids, attention_mask, position_ids, cache, cache.rings, one)
        feeds = _feeds(input_ids, position_ids, attention_mask)
        feeds.update(ring_masks(cache.rings, attention_mask, cache.length))
        feeds.update(cache.stage_masks(attention_mask))
        logits = np.empty((b, t, self.info.vocab_size), dtype=np.float32)
        names = [f"present_{s.name.replace('.', '_')}" for s in cache.specs]
        scores = self._scores(b, cache.length + t, decode=True)
        cache.scores = [a for _, a in scores] or None
        if cache.length == 0:  # a prompt through the decode graph: compact presents, stored once (rings keep
            feeds.update(empty_pasts(cache.specs, b))  # their slots of it)
            presents = [np.empty(cache.shape_for(spec, t), dtype=np.float32) for spec in cache.specs]
            self._run("decode", feeds, [("logits", logits), *zip(names, presents), *scores])
            cache.store(presents)
            return torch.from_numpy(logits), cache
        presents = cache.present_views(t)  # first: it may grow the buffers the past is read from
        if cache.in_place:
            # no padding: the graph whose attention takes no mask (faster), when the artifact has one
            key = "decode_dense" if "decode_dense" in self.backend and bool(attention_mask.all()) else "decode"
            self._run_in_place(cache, presents, feeds, logits, key, extra=scores)
            cache.commit(t)
            return torch.from_numpy(logits), cache
        for spec, past in zip(cache.specs, cache.past()):
            feeds[f"past_{spec.name.replace('.', '_')}"] = past
        self._run("decode", feeds, [("logits", logits), *zip(names, presents), *scores])
        cache.commit(t)
        return torch.from_numpy(logits), cache

    @property
    def drafts(self) -> dict[str, dict[str, Any]]:
        return self.backend.get("drafts", {})  # type: ignore[no-any-return]

    def draft_decode(self, name: str, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                     cache: KVCache) -> Tensor:
        """A speculative draft's decode step (``passes/draft.py``): its graph reads and appends to the cache
        entries of the layers it runs; the others keep stale slots until the runtime truncates the step away."""
        check_inputs(input_ids, attention_mask, position_ids, cache.length)
        record = self.drafts[name]
        entries, names = list(record["cache"]), list(record["entries"])
        b, t = input_ids.shape
        feeds = _feeds(input_ids, position_ids, attention_mask)
        logits = np.empty((b, t, self.info.vocab_size), dtype=np.float32)
        presents = cache.present_views(t)  # first: it may grow the buffers the past is read from
        if cache.in_place:
            dense = "decode_dense" in record and bool(attention_mask.all())
            self._run_in_place(cache, [presents[i] for i in entries], feeds, logits,
                               record["decode_dense" if dense else "decode"], names)
        else:
            past = cache.past()
            for i, n in zip(entries, names):
                feeds[f"past_{n.replace('.', '_')}"] = past[i]
            self._run(record["decode"], feeds,
                      [("logits", logits), *((f"present_{n.replace('.', '_')}", presents[i])
                                             for i, n in zip(entries, names))])
        cache.commit(t, entries)
        return torch.from_numpy(logits)

    def _run_in_place(self, cache: KVCache, buffers: list[np.ndarray], feeds: dict[str, np.ndarray],
                      logits: np.ndarray, graph: str = "decode", names: list[str] | None = None,
                      extra: list[tuple[str, np.ndarray]] | None = None) -> None:
        """One decode step on the shared buffers (``names``: the graph's cache entries, by default the cache's);
        their bindings are made once per graph and kept on the cache until a growth replaces them (only ids,
        positions, mask and logits are bound per step)."""
        sess = self.session(graph)
        names = names or [spec.name for spec in cache.specs]
        key = tuple((buf.ctypes.data, buf.shape) for buf in buffers)  # shapes too: a later growth may reuse addresses
        bound = cache.bindings.get(id(sess))
        if bound is None or bound[0] != key:
            io = sess.io_binding()
            for name, buf in zip(names, buffers):
                name = name.replace(".", "_")
                io.bind_cpu_input(f"past_{name}", buf)
                io.bind_output(f"present_{name}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            cache.bindings[id(sess)] = bound = (key, io)
        io = bound[1]
        for name, value in feeds.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, buf in [("logits", logits), *(extra or [])]:
            io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        sess.run_with_iobinding(io)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        check_inputs(input_ids, attention_mask, position_ids)
        if "forward" in self.backend:
            def run(ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
                return torch.from_numpy(self.session("forward").run(None, _feeds(ids, pos, mask))[0])
            return engine_call(self.backend.get("token_merge"), run, input_ids, attention_mask, position_ids)
        # the decode graph from an empty cache (a prompt): every token's logits; the presents are dropped
        feeds = _feeds(input_ids, position_ids, attention_mask)
        feeds.update(ring_masks(self.rings, attention_mask, 0))
        feeds.update(empty_pasts(self.cache_specs, input_ids.shape[0]))
        return torch.from_numpy(self.session("decode").run(["logits"], feeds)[0])
