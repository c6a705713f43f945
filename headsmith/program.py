"""``Program``: a captured model as an FX graph, plus what is known about it.

A Program wraps

- ``gm``: an ATen-level ``torch.fx.GraphModule`` (from ``torch.export``) whose weights are ``get_attr``
  attributes. It is called as ``gm(input_ids[B,S], position_ids[B,S], attention_mask[B,S])`` and returns
  logits ``[B,S,V]`` (causal LMs) or hidden states ``[B,S,E]`` (encoders);
- ``info``: static facts from the checkpoint (architecture, task, config, tokenizer);
- ``history``: the pass specs applied so far, and their reports;
- ``drafts``: speculative-decoding drafts derived from it (``passes/draft.py``), lowered beside it;
- ``kv_policy``: how its decode cache evicts tokens (``passes/kv_evict.py``), if at all.
- ``token_merge``: where an encoder merges tokens (``passes/token_merge.py``), if at all.
- ``prefill_prune``: where a causal LM's prefill stops computing prompt tokens (``passes/prefill_prune.py``).

Programs are values: a pass returns a new Program and leaves its input as it was (weights are shared
until a pass replaces one). ``spec()`` derives the per-layer :class:`ModelSpec` from the graph itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx

from .errors import HeadsmithError, RaiseError
from .fxutil import clone_module, format_near, record_values
from .kv_policy import KvPolicy
from .merging import MergeSchedule
from .qweights import is_quantized_weight_use, packed_args
from .sites import AttentionSite, SiteError, attention_nodes, find_sites
from .token_pruning import PrunePlan

if TYPE_CHECKING:
    from .passes.base import Pass, PassContext

INPUT_NAMES = ("input_ids", "position_ids", "attention_mask")


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the source checkpoint."""

    architecture: str
    """The HF class name, e.g. ``LlamaForCausalLM`` or ``BertModel``."""
    model_type: str
    task: str
    """``causal-lm`` (outputs logits) or ``encoder`` (outputs hidden states)."""
    hidden_size: int
    vocab_size: int
    max_positions: int | None
    config: dict[str, Any]
    """The HF ``config.json`` contents of the source."""
    weight_prefix: str = "model."
    """Prefix of graph weight names in front of the HF state-dict key."""
    pad_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None


@dataclass(frozen=True)
class SourceInfo:
    """Where a program came from."""

    kind: str
    """``builtin``, ``hf`` (a directory), ``gguf`` (a file)."""
    path: str
    name: str
    sha256: str


@dataclass(frozen=True)
class LayerSpec:
    """The attention of one layer, as the manifest and ``inspect`` report it."""

    index: int
    kind: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int = 0
    sinks: int = 0
    blocks: str = ""
    """A block-sparse layout (``sparse-attention(pattern=block|power)``, :mod:`headsmith.block_sparse`)."""
    scale: float = 0.0
    softcap: float = 0.0
    rope_dims: int = 0
    qk_norm: bool = False
    cache_width: int = 0
    """Numbers cached per token per layer (K and V together; a latent for MLA)."""
    latent: bool = False
    """Multi-head latent attention (``mla``): the cache holds a rotary key and a value latent, not per-head K/V."""
    group: int = 0
    """The head group within the layer: a layer split by a per-head pattern (``sparse-attention(pattern=duo)``)
    has one entry per group, each with its own heads, window and sinks."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a program: per-layer attention plus global sizes."""

    architecture: str
    model_type: str
    task: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    params: int
    layers: tuple[LayerSpec, ...]

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        return sum(layer.cache_width for layer in self.layers) * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(layer) for layer in self.layers]
        d["kv_bytes_per_token_fp16"] = self.kv_bytes_per_token(2)
        d["kv_bytes_per_token_fp32"] = self.kv_bytes_per_token(4)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(ModelSpec)}
        kw = {k: v for k, v in d.items() if k in fields}
        layer_fields = {f.name for f in dataclasses.fields(LayerSpec)}
        kw["layers"] = tuple(LayerSpec(**{k: v for k, v in layer.items() if k in layer_fields})
                             for layer in d["layers"])
        return ModelSpec(**kw)


@dataclass(frozen=True)
class DraftProgram:
    """A draft for speculative decoding, derived from the target program by ``passes/draft.py``. Its decode
    graph reads and writes the target's KV cache for the layers it keeps (entries matched by layer), so it needs
    no prefill and no cache of its own."""

    name: str
    method: str
    program: Program
    layers: tuple[int, ...]
    """The target layers the draft runs (the others are skipped)."""
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Program:
    """A captured (and usually raised) model; see the module docstring."""

    gm: fx.GraphModule
    info: ModelInfo
    source: SourceInfo
    tokenizer: Any = None
    history: tuple[str, ...] = ()
    reports: tuple[dict[str, Any], ...] = ()
    drafts: tuple[DraftProgram, ...] = ()
    kv_policy: KvPolicy | None = None
    """A KV-cache eviction policy (``kv-evict``, :mod:`headsmith.kv_policy`): the step graphs return the attention
    scores it ranks tokens by, and the runtime compacts the cache."""
    token_merge: MergeSchedule | None = None
    """Token merging (``token-merge``, :mod:`headsmith.merging`): exported graphs take an even length of at least
    ``min_tokens``, which engines pad their inputs to."""
    prefill_prune: PrunePlan | None = None
    """Progressive prompt-token pruning (``prefill-prune``, :mod:`headsmith.token_pruning`): the prefill runs as
    stages, each on the prompt tokens the previous one ranked highest; later layers cache only those."""
    _shapes: dict[fx.Node, tuple[int, ...]] | None = field(default=None, repr=False)

    # ---- running -------------------------------------------------------------------------------
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None) -> Tensor:
        """Logits ``[B,S,V]`` (or hidden states ``[B,S,E]`` for encoders)."""
        input_ids, position_ids, attention_mask = self.make_inputs(input_ids, attention_mask, position_ids)
        with torch.no_grad():
            return self.gm(input_ids, position_ids, attention_mask)

    def make_inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Complete the graph inputs the way HF does (positions count only non-padding tokens)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = default_positions(attention_mask, self.info.task)
        max_pos = self.info.max_positions
        if max_pos is not None and input_ids.shape[1] > max_pos:
            raise HeadsmithError(f"input has {input_ids.shape[1]} tokens but the model supports at most "
                                 f"{max_pos} positions", "shorten the input")
        return input_ids, position_ids, attention_mask.to(torch.int64)

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0,
                       pad: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Seeded random token ids (with ``pad`` padding tokens in the last row) for checks."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.info.vocab_size, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        if pad > 0:
            if self.info.task == "encoder":
                mask[-1, seq - pad:] = 0
            else:
                mask[-1, :pad] = 0
        return self.make_inputs(ids, mask)

    # ---- structure -----------------------------------------------------------------------------
    def shapes(self) -> dict[fx.Node, tuple[int, ...]]:
        """Concrete shapes of the tensors in the graph for a small example input (cached)."""
        if self._shapes is None:
            ids, pos, mask = self.example_inputs(batch=1, seq=8)
            inputs = dict(zip(self.placeholder_names(), (ids, pos, mask)))
            with torch.no_grad():
                values = record_values(self.gm, inputs, lambda n: n.op != "output")
            self._shapes = {n: tuple(v.shape) for n, v in values.items() if isinstance(v, Tensor)}
        return self._shapes

    def placeholder_names(self) -> list[str]:
        return [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]

    def sites(self) -> list[AttentionSite]:
        """The attention sites of the raised graph (see :mod:`headsmith.sites`)."""
        try:
            return find_sites(self.gm, self.shapes())
        except SiteError as e:
            raise RaiseError(f"attention at {e.node.name} is not in canonical form: {e.reason}\n"
                             f"{format_near(e.node)}") from None

    @property
    def raised(self) -> bool:
        return bool(attention_nodes(self.gm.graph))

    @property
    def quantized(self) -> bool:
        """Whether any linear reads low-precision weights (``quantize`` ran): packed blocks or 16-bit casts."""
        return any(is_quantized_weight_use(n) for n in self.gm.graph.nodes)

    def n_params(self) -> int:
        """Parameters the graph reads (each tensor once; buffers such as RoPE tables excluded). A quantised
        weight counts its ``N x K`` logical weights; its scales and zero points are not parameters."""
        from .fxutil import get_tensor
        params = {id(p) for p in self.gm.parameters()}
        total, seen = 0, set()
        for node in self.gm.graph.nodes:
            q = packed_args(node)
            if q is None:
                continue
            for aux in (q.scales, q.zeros):
                if aux is not None:
                    params.discard(id(get_tensor(self.gm, str(aux.target))))
            packed = get_tensor(self.gm, str(q.packed.target))
            if id(packed) not in seen:
                seen.add(id(packed))
                total += int(packed.shape[0]) * int(packed.shape[1]) * q.group
        return total + sum(t.numel() for t in self.weights().values() if id(t) in params)

    def weights(self) -> dict[str, Tensor]:
        """Every weight the graph reads, by ``get_attr`` target (each tensor once)."""
        out: dict[str, Tensor] = {}
        seen: set[int] = set()
        from .fxutil import get_tensor
        for node in self.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            t = get_tensor(self.gm, str(node.target))
            key = id(t)
            if key in seen or str(node.target) in out:
                continue
            seen.add(key)
            out[str(node.target)] = t
        return out

    def decode_weight_bytes(self) -> int:
        """Bytes of weights a decode step reads: every weight a matmul-like op consumes (directly, or through the
        cast of a 16-bit weight), once; a quantised linear reads its packed codes, scales and zero points. An
        embedding table used only for lookups reads one row per token and is left out."""
        from .fxutil import get_tensor
        from .qweights import LINEAR_Q
        aten = torch.ops.aten
        readers = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.t.default,
                   aten.permute.default, aten.transpose.int, LINEAR_Q}
        cast = aten._to_copy.default

        def read_by_matmul(node: fx.Node) -> bool:
            return any(u.op == "call_function" and (u.target in readers or (u.target is cast and read_by_matmul(u)))
                       for u in node.users)

        seen: set[int] = set()
        total = 0
        for node in self.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            t = get_tensor(self.gm, str(node.target))
            if id(t) in seen or (t.dim() >= 2 and not read_by_matmul(node)):
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total

    def spec(self) -> ModelSpec:
        layers: list[LayerSpec] = []
        groups: dict[int, int] = {}
        for site in self.sites():
            groups[site.layer] = groups.get(site.layer, -1) + 1
            width = site.node.meta.get("headsmith_cache_width")
            if width is None:
                width = site.n_kv_heads * (site.head_dim + site.v_head_dim)
            layers.append(LayerSpec(
                index=site.layer, kind=site.kind, n_heads=site.n_heads, n_kv_heads=site.n_kv_heads,
                head_dim=site.head_dim, v_head_dim=site.v_head_dim, window=site.window, sinks=site.sinks,
                blocks=site.blocks, scale=site.scale, softcap=site.softcap,
                rope_dims=site.rope.dims if site.rope is not None else 0,
                qk_norm=site.qk_norm, cache_width=int(width),
                latent="headsmith_cache_width" in site.node.meta, group=groups[site.layer]))
        return ModelSpec(
            architecture=self.info.architecture, model_type=self.info.model_type, task=self.info.task,
            n_layers=len(groups), hidden_size=self.info.hidden_size, vocab_size=self.info.vocab_size,
            params=self.n_params(), layers=tuple(layers))

    # ---- rewriting -----------------------------------------------------------------------------
    def clone(self) -> Program:
        """A copy with its own graph; weights are shared until a pass replaces them."""
        return dataclasses.replace(self, gm=clone_module(self.gm), _shapes=None)

    def with_graph(self, gm: fx.GraphModule) -> Program:
        return dataclasses.replace(self, gm=gm, _shapes=None)

    def apply(self, passes: str | Sequence[Pass], ctx: PassContext | None = None) -> Program:
        """Run a pass spec (``"gqa(kv_heads=1), dce"``) or a list of passes; returns a new Program."""
        from .passes.manager import PassManager
        return PassManager.from_spec(passes).run(self, ctx)


def default_positions(attention_mask: Tensor, task: str) -> Tensor:
    """Position ids: ``arange`` for encoders; for decoders, count of real tokens so far (left padding)."""
    if task == "encoder":
        b, s = attention_mask.shape
        return torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    pos = attention_mask.to(torch.int64).cumsum(-1) - 1
    return pos.clamp(min=0)
