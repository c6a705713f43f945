"""Engines: the same ``prefill`` / ``decode`` / ``forward`` calls on every backend.

Letters: B batch, T new tokens, P cached tokens, V vocab.

- ``prefill(ids[B,T], mask[B,T], pos[B,T]) -> (logits[B,1,V], cache)``: logits of the last position;
- ``decode(ids[B,T], mask[B,P+T], pos[B,T], cache) -> (logits[B,T,V], cache)``: the cache grows by T;
- ``forward(ids, mask, pos) -> logits[B,T,V]`` (or hidden states for encoders), no cache (evaluation).

Inputs are int64 torch tensors, outputs float32 torch tensors. ``TorchEngine`` runs the prefill/decode FX
graphs (from a Program in memory or the ``.pt2`` files of an artifact); ``OrtEngine`` (``ort_engine.py``) runs
the ONNX files with onnxruntime, ``TvmEngine`` (``tvm_engine.py``) the TVM library. Engines of an artifact with
speculative drafts (``passes/draft.py``) also have ``drafts`` and ``draft_decode``: a draft's step on the target's
cache, writing only the entries of the layers the draft runs.

Layers with a sliding window keep ring caches (``ring.py``): every engine feeds their ``ring_mask_*`` inputs and
runs a step that would not fit a full ring as steps of fewer tokens (:func:`decode_in_steps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import BackendError
from ..merging import engine_call
from ..program import ModelInfo, ModelSpec, Program
from ..token_pruning import PrunePlan
from .kv_cache import CacheSpec
from .pruned_prefill import PrunedPrompt, mask_names, run_stages, stage_masks
from .ring import Ring, ring_masks, rings_of, step_size


class Engine(Protocol):
    name: str
    info: ModelInfo
    spec: ModelSpec

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]: ...

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: Any) -> tuple[Tensor, Any]: ...

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor: ...

    # engines that carry speculative drafts (passes/draft.py) also have ``drafts`` (name -> manifest record) and
    # ``draft_decode(name, ids, mask, pos, cache) -> logits[B,T,V]``, a step of the draft on the target's cache


@dataclass
class TorchCache:
    """The torch engine's cache: the present tensors of the last step (ring entries: their kept slots)."""

    tensors: list[Tensor]
    seq_dims: list[int]
    rings: list[Ring | None] = field(default_factory=list)
    seen: int = -1
    """Tokens seen (-1: the length of the tensors, for a cache without rings); with a KV-eviction policy, the
    tokens held."""
    scores: list[np.ndarray] | None = None
    """The last step's eviction scores (``[B, G, keys]`` per layer), from graphs that return them (``kv-evict``)."""
    pruned: PrunedPrompt | None = None
    """What a pruned prefill kept (``prefill-prune``; later stages' entries hold fewer prompt tokens)."""
    dropped: list[int] = field(default_factory=list)
    """Per entry, the prompt tokens a pruned prefill's stage never gave it (empty: none)."""

    def __post_init__(self) -> None:
        if not self.rings:
            self.rings = [None] * len(self.tensors)
        if self.seen < 0:
            self.seen = int(self.tensors[0].shape[self.seq_dims[0]]) if self.tensors else 0

    @property
    def length(self) -> int:
        return self.seen

    @staticmethod
    def from_prompt(presents: list[Tensor], seq_dims: list[int], rings: list[Ring | None]) -> TorchCache:
        """The cache after a prompt whose presents hold every token (ring entries keep their slots)."""
        t = max((int(p.shape[d]) for p, d in zip(presents, seq_dims)), default=0)
        kept = [p if r is None else p.index_select(d, torch.from_numpy(r.tokens(t)))
                for p, d, r in zip(presents, seq_dims, rings)]
        return TorchCache(kept, seq_dims, list(rings), t)

    def step(self, presents: list[Tensor], new: int) -> None:
        """Take a decode step's presents (ring entries file the step's token into its slot; after a prompt
        through the decode graph, an empty cache keeps the slots of it as a prefill does)."""
        if self.seen == 0:
            fresh = TorchCache.from_prompt(presents, self.seq_dims, self.rings)
            self.tensors, self.seen = fresh.tensors, fresh.seen
            return
        for i, (p, d, r) in enumerate(zip(presents, self.seq_dims, self.rings)):
            move = r.after_step(self.seen, new) if r is not None else None
            if move is not None:
                assert r is not None
                p = p.clone()
                if move[1] >= 0:
                    p.narrow(d, move[1], 1).copy_(p.narrow(d, move[0], 1))
                p = p.narrow(d, 0, r.capacity - 1)
            presents[i] = p
        self.tensors = list(presents)
        self.seen += new

    def step_entries(self, presents: list[Tensor], entries: list[int], new: int) -> None:
        """A speculative draft's step: only ``entries`` took presents (the others are truncated to their old
        length before the next step reads them)."""
        for i, p in zip(entries, presents):
            self.tensors[i] = p
        self.seen += new

    def compact(self, index: list[np.ndarray]) -> None:
        """Keep, per entry, the slots ``index[i]`` (see :meth:`KVCache.compact`)."""
        kept = []
        for t, d, ix in zip(self.tensors, self.seq_dims, index):
            ix_t = torch.from_numpy(np.ascontiguousarray(ix)).expand(*[k if j == d else t.shape[j]
                                                                        for j, k in enumerate(ix.shape)])
            kept.append(torch.gather(t, d, ix_t).contiguous())
        self.tensors, self.seen = kept, int(kept[0].shape[self.seq_dims[0]]) if kept else 0

    def evict_last(self, victims: list[np.ndarray]) -> None:
        """Each entry's last slot moves into its victim slot; one token shorter (see :meth:`KVCache.evict_last`)."""
        from .kv_cache import move_slot
        last = self.seen - 1
        for i, (t, d, victim) in enumerate(zip(self.tensors, self.seq_dims, victims)):
            t = t.clone() if not t.is_contiguous() else t
            move_slot(t, d, victim, last)
            self.tensors[i] = t.narrow(d, 0, last)
        self.seen = last

    def truncate(self, length: int) -> None:
        if length >= self.seen:
            return
        for r in self.rings:
            if r is not None:
                r.check_truncate(self.seen, length)
        width = self.pruned.width if self.pruned is not None else 0
        if length < width:
            raise ValueError(f"a pruned prompt of {width} tokens cannot be cut to {length}")
        dropped = self.dropped or [0] * len(self.tensors)
        self.tensors = [t.narrow(d, 0, min(int(t.shape[d]), length - x if r is None else r.slots(length))).contiguous()
                        for t, d, r, x in zip(self.tensors, self.seq_dims, self.rings, dropped)]
        self.seen = length


def check_inputs(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: int = 0) -> None:
    """One clear error for inputs whose shapes disagree (instead of a kernel's reshape error): ``input_ids`` and
    ``position_ids`` ``[B, T]``, ``attention_mask`` ``[B, past + T]``."""
    if input_ids.dim() != 2 or tuple(position_ids.shape) != tuple(input_ids.shape):
        raise BackendError(f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} must "
                           "both be [batch, tokens]", "pass one position per token")
    b, t = input_ids.shape
    if tuple(attention_mask.shape) != (b, past + t):
        what = f"{past} cached + {t} new tokens" if past else f"{t} tokens"
        raise BackendError(f"attention_mask is {tuple(attention_mask.shape)}, but {what} need [{b}, {past + t}]",
                           "the mask has one column per token of the text so far (cached and new)")


def decode_in_steps(engine: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any,
                    rings: list[Ring | None], one: bool = False) -> tuple[Tensor, Any]:
    """``engine.decode`` of T tokens as consecutive steps that fit every ring (``one``: single tokens); the same
    result as one step."""
    t = input_ids.shape[1]
    past = attention_mask.shape[1] - t
    pieces, done = [], 0
    while done < t:
        n = 1 if one else step_size(rings, past + done, t - done)
        logits, cache = engine.decode(input_ids[:, done:done + n], attention_mask[:, :past + done + n],
                                      position_ids[:, done:done + n], cache)
        pieces.append(logits)
        done += n
    return torch.cat(pieces, 1), cache


def ring_tensors(rings: list[Ring | None], attention_mask: Tensor, seen: int) -> list[Tensor]:
    """The decode graph's ring-mask inputs as torch tensors (see ``ring.ring_masks``)."""
    return [torch.from_numpy(m) for m in ring_masks(rings, attention_mask, seen).values()]


def empty_pasts(specs: list[CacheSpec], batch: int) -> dict[str, np.ndarray]:
    """``past_*`` feeds of length 0: the decode graph run on a prompt."""
    return {f"past_{s.name.replace('.', '_')}": np.empty(
        [batch if i == 0 else 0 if i == s.seq_dim else d for i, d in enumerate(s.shape)], dtype=np.float32)
        for s in specs}


@dataclass
class TorchEngine:
    """Runs prefill/decode graphs with torch (eager FX, or the artifact's exported programs)."""

    info: ModelInfo
    spec: ModelSpec
    prefill_fn: Any
    decode_fn: Any
    forward_fn: Any
    seq_dims: list[int]
    rings: list[Ring | None] = field(default_factory=list)
    drafts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Speculative drafts (``passes/draft.py``): name -> manifest record (``cache``: the entries it runs)."""
    draft_fns: dict[str, Any] = field(default_factory=dict, repr=False)
    kv_policy: dict[str, Any] = field(default_factory=dict)
    """The manifest's KV-eviction policy record (``passes/kv_evict.py``; empty: none)."""
    cache_layout: list[dict[str, Any]] = field(default_factory=list)
    """The manifest's cache entries."""
    token_merge: dict[str, Any] = field(default_factory=dict)
    """An exported token-merge graph's record (its input length: ``passes/token_merge.py``; empty: none, or an
    eager program, which pads itself)."""
    prune_plan: PrunePlan | None = None
    """A ``prefill-prune`` plan, run by ``stages`` (eager programs only)."""
    stages: list[Any] = field(default_factory=list, repr=False)
    """The staged prefill's graphs (``passes/prefill_stages.py``)."""
    prune: bool = True
    """Run the staged prefill when there is one (False: the full prefill, for comparison)."""
    name: str = "torch"

    @staticmethod
    def from_program(program: Program) -> TorchEngine:
        spec = program.spec()
        if program.info.task != "causal-lm":
            return TorchEngine(program.info, spec, None, None, program.gm, [])
        from ..backends.lowering import draft_lowerings
        from ..passes.kv_cache import decode_graph, layout_dict, prefill_graph
        from ..passes.kv_scores import policy_record
        pre, entries = prefill_graph(program, ring=True)
        dec, _ = decode_graph(program, ring=True)
        drafts = draft_lowerings(program)
        stages: list[Any] = []
        if program.prefill_prune is not None:
            from ..passes.prefill_stages import prefill_stages
            stages = prefill_stages(program)[0]
        return TorchEngine(program.info, spec, pre, dec, program.gm, [e.seq_dim for e in entries], rings_of(entries),
                           {d.name: d.record for d in drafts},
                           {d.name: decode_graph(d.program, ring=True)[0] for d in drafts},
                           policy_record(program).get("kv_policy", {}), layout_dict(entries),
                           prune_plan=program.prefill_prune, stages=stages)

    @staticmethod
    def from_artifact(artifact: Any) -> TorchEngine:
        from .. import ops as _ops  # noqa: F401
        from ..passes import kv_cache as _kv  # noqa: F401  (registers headsmith.cache_point)
        from ..passes.prefill_stages import StageGraph
        weights = artifact.weights
        backend = artifact.manifest["backend"]

        def load(name: str) -> Any:
            return bind_weights(torch.export.load(str(artifact.path / name)), weights)

        forward = load(backend["program"])
        if artifact.info.task != "causal-lm":
            return TorchEngine(artifact.info, artifact.spec, None, None, forward, [],
                               token_merge=dict(backend.get("token_merge", {})))
        cache = backend.get("cache", [])
        drafts = dict(backend.get("drafts", {}))
        staged = backend.get("prefill_prune")
        stages = [StageGraph(load(st["graph"]), list(st["entries"]), list(st["inputs"]), list(st["outputs"]),
                             int(st["score_layer"])) for st in staged["stages"]] if staged else []
        return TorchEngine(artifact.info, artifact.spec, load(backend["prefill"]), load(backend["decode"]), forward,
                           [int(e["seq_dim"]) for e in cache], rings_of(cache), drafts,
                           {name: load(d["decode"]) for name, d in drafts.items()}, dict(backend.get("kv_policy", {})),
                           list(cache), prune_plan=PrunePlan.from_dict(staged) if staged else None, stages=stages)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        check_inputs(input_ids, attention_mask, position_ids)
        if self.prune and self.prune_plan is not None:
            return self._pruned_prefill(input_ids, attention_mask, position_ids)
        with torch.no_grad():
            out = self.prefill_fn(input_ids, position_ids, attention_mask)
        n = len(self.seq_dims)
        cache = TorchCache.from_prompt(list(out[1:1 + n]), self.seq_dims, self.rings)
        cache.scores = [s.numpy() for s in out[1 + n:]] or None
        return out[0], cache

    def _pruned_prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
                        ) -> tuple[Tensor, TorchCache]:
        """The staged prefill of ``prefill-prune`` (``pruned_prefill.py``)."""
        assert self.prune_plan is not None

        def run(s: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            stage = self.stages[s]
            with torch.no_grad():
                out = stage.gm(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in stage.inputs))
            return [o.numpy() for o in out]

        feeds = _feeds(input_ids, position_ids, attention_mask)
        logits, presents, pruned = run_stages(self.prune_plan, run, [st.entries for st in self.stages],
                                              len(self.seq_dims), feeds["input_ids"], feeds["attention_mask"],
                                              feeds["position_ids"])
        cache = TorchCache([torch.from_numpy(p) for p in presents], self.seq_dims, list(self.rings),
                           input_ids.shape[1], pruned=pruned,
                           dropped=[pruned.width - int(p.shape[d]) for p, d in zip(presents, self.seq_dims)])
        return torch.from_numpy(logits), cache

    def decode(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
               cache: TorchCache) -> tuple[Tensor, Any]:
        check_inputs(input_ids, attention_mask, position_ids, cache.length)
        t = input_ids.shape[1]
        if step_size(self.rings, cache.length, t) < t:
            return decode_in_steps(self, input_ids, attention_mask, position_ids, cache, self.rings)
        rings = ring_tensors(self.rings, attention_mask, cache.length)
        names = mask_names(int(e.get("stage", 0)) for e in self.cache_layout)
        rings += [torch.from_numpy(m) for m in stage_masks(names, cache.pruned, attention_mask).values()]
        with torch.no_grad():
            out = self.decode_fn(input_ids, position_ids, attention_mask, *cache.tensors, *rings)
        n = len(self.seq_dims)
        cache.step(list(out[1:1 + n]), t)
        cache.scores = [s.numpy() for s in out[1 + n:]] or None
        return out[0], cache

    def draft_decode(self, name: str, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                     cache: TorchCache) -> Tensor:
        """A speculative draft's decode step on the entries of the layers it runs (see ``passes/draft.py``)."""
        check_inputs(input_ids, attention_mask, position_ids, cache.length)
        entries = list(self.drafts[name]["cache"])
        with torch.no_grad():
            out = self.draft_fns[name](input_ids, position_ids, attention_mask, *(cache.tensors[i] for i in entries))
        cache.step_entries(list(out[1:]), entries, input_ids.shape[1])
        return out[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        check_inputs(input_ids, attention_mask, position_ids)
        with torch.no_grad():
            return engine_call(self.token_merge, lambda ids, mask, pos: self.forward_fn(ids, pos, mask),
                               input_ids, attention_mask, position_ids)


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
        from .ort_engine import OrtEngine
        engine = OrtEngine(artifact.info, artifact.spec, artifact.path, backend, threads)
        # load now, so timings never include session creation; with a decode_dense graph the padded decode
        # graph loads at the first step that has padding (each session holds its own prepacked weights)
        for key in ("prefill", "decode_dense" if "decode_dense" in backend else "decode", "forward"):
            if key in backend:
                engine.session(key)
        for record in backend.get("drafts", {}).values():  # speculative drafts: the same graph choice
            engine.session(record.get("decode_dense", record["decode"]))
        for stage in backend.get("prefill_prune", {}).get("stages", []):  # a pruned prefill's stage graphs
            engine.session(stage["graph"])
        return engine
    if name == "tvm":
        from .tvm_engine import TvmEngine
        return TvmEngine.from_artifact(artifact, threads)
    if name == "tensorrt":
        from .tensorrt_engine import TensorRTEngine
        return TensorRTEngine.from_artifact(artifact)
    raise BackendError(f"artifact {artifact.path} was built for backend {name!r}, which this version cannot run",
                       "convert it again with --backend torch or --backend onnx")
