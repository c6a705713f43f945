"""``token-merge(r=16, layers=[...], metric=hidden, length=512)``: an encoder merges similar tokens as it goes (ToMe).
Lossy.

Token Merging (Bolya et al., ICLR 2023) makes a transformer shorter layer by layer without training: between a
layer's attention and its MLP, ``r`` tokens are averaged into the tokens they resemble most, found by bipartite
soft matching (:mod:`headsmith.merging`). ToMe measures resemblance by the cosine of the attention's keys (averaged
over heads; ``metric=keys``); the default here is the hidden states being merged (``metric=hidden``): on
MiniLM-L6 at 512 tokens it keeps the sentence embedding far closer at the same ``r`` (mean cosine 0.992 against
0.965 at r=32, docs/token_sparsification.md), since averaging two near-equal states is what loses least. A merged
token carries its size, the number of input tokens it stands for: the merge is a size-weighted average, and the
attention after it is *proportional* (``log size`` added to its keys' logits), so a token of size 3 draws the
attention three tokens would. Every later layer runs on ``r`` fewer tokens per merge; attention's cost falls
quadratically. A post-norm (BERT) layer with a merge::

    h = layer_norm(x + attn(x, mask))                     h = layer_norm(x + attn(x, mask, key_bias=log s))
    y = layer_norm(h + mlp(h))                    ->      h, s, origin = bipartite_merge(h, h, s, origin, r)
                                                          y = layer_norm(h + mlp(h))
    output: y[B,N,E]                                      output: unmerge(y, origin)[B,N,E]

The output keeps its shape: :func:`~headsmith.merging.unmerge` gives every input token the value of the token
holding it, so a mean pool over the output is the size-weighted mean of the merged tokens (sentence embeddings
need no other change) and the graph's interface is the one every engine and ``eval`` already use.

Shapes depend on the length only, so the program runs at one input length (``length``, even; ``r`` is even so
every step's length is), the ONNX lowering has one static shape per merge step, and the program and the engines
pad inputs to that length (padding is size 0: merged first, for free, and never attended; see
:mod:`headsmith.merging`). ``r=0`` inserts the whole machinery and is exact. Engines: torch and ONNX Runtime
(TVM and TensorRT have no attention key bias yet).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from .. import merging
from ..errors import PassError
from ..fxutil import descendants
from ..merging import MergeSchedule
from ..program import Program
from ..sites import attention_by_layer
from .base import Pass, PassContext, PassResult
from .structure import find_mlps

aten = torch.ops.aten


@dataclass(frozen=True)
class TokenMerge(Pass):
    """ToMe for encoders: bipartite soft matching, size-weighted merges, proportional attention."""

    name: ClassVar[str] = "token-merge"
    exact: ClassVar[bool] = False
    float_weights: ClassVar[bool] = False

    r: int = 16
    """Tokens merged away after each merging layer's attention (even; 0 keeps every token)."""
    layers: tuple[int, ...] = ()
    """The layers that merge (default: all)."""
    protect: int = 1
    """Leading tokens never merged away (the [CLS] token; 0: none)."""
    metric: str = "hidden"
    """Similarity on ``hidden`` (the states being merged) or ``keys`` (ToMe's: the attention's, averaged over heads)."""
    length: int = 0
    """The input length the program runs at, even (0: the model's maximum positions); inputs are padded to it."""

    def __post_init__(self) -> None:
        if self.r < 0 or self.r % 2:
            raise ValueError(f"r must be an even number >= 0 (got {self.r}): each step keeps the length even, "
                             "which the exported graphs' shapes rely on")
        if self.protect < 0:
            raise ValueError(f"protect must be >= 0 (got {self.protect})")
        if self.metric not in ("hidden", "keys"):
            raise ValueError(f"metric must be hidden or keys (got {self.metric!r})")
        if self.length < 0 or self.length % 2:
            raise ValueError(f"length must be an even number of tokens (got {self.length})")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if program.info.task != "encoder":
            raise PassError(f"token-merge shortens an encoder's sequence; {program.info.architecture} is a "
                            "causal LM, whose every position needs its own logits and cache entry",
                            "for causal LMs use kv-evict (the cache) or sparse-attention")
        if program.token_merge is not None:
            raise PassError("the program already merges tokens", "give token-merge once, with all its layers")
        by_layer = attention_by_layer(program.gm.graph)
        layers = tuple(sorted(set(self.layers))) if self.layers else tuple(sorted(by_layer))
        unknown = [x for x in layers if x not in by_layer]
        if unknown:
            raise PassError(f"token-merge: no layer {unknown[0]} (the encoder has layers 0..{max(by_layer)})",
                            "give layers=[...] from that range")
        mlps = {m.layer: m for m in find_mlps(program)}
        new = program.clone()
        graph = new.gm.graph
        length = self.length or program.info.max_positions or 0
        length -= length % 2
        schedule = MergeSchedule(self.r, layers, self.protect, self.metric, length)
        if length < schedule.min_tokens:
            raise PassError(f"token-merge(r={self.r}) over {len(layers)} layers needs inputs of at least "
                            f"{schedule.min_tokens} tokens; the program runs at {length}",
                            "give a smaller r, fewer layers, or a larger length=")
        node_of = {n.name: n for n in graph.nodes}
        att = {layer: [node_of[a.name] for a in nodes] for layer, nodes in attention_by_layer(graph).items()}
        for layer in layers:
            if len(att[layer]) > 1 or bool(att[layer][0].kwargs.get("causal", True)):
                raise PassError(f"layer {layer}'s attention is causal or split into head groups; token-merge needs "
                                "one bidirectional attention per layer")
            mlp = mlps.get(layer)
            if mlp is None or not any(u.target is aten.add.Tensor for u in node_of[mlp.x.name].users):
                raise PassError(f"layer {layer} has no post-norm MLP input to merge at (a residual add beside it); "
                                "token-merge is built for BERT-style encoders",
                                "apply token-merge to a BERT-style encoder (MiniLM, BERT)")
        count = _rewrite(new.gm, schedule, att, {x: node_of[mlps[x].x.name] for x in layers})
        new = dataclasses.replace(new.with_graph(new.gm), token_merge=schedule)
        try:
            new.shapes()
        except Exception as e:  # a node past a merge still expects the input length
            raise PassError(f"token-merge could not shorten every layer after a merge: {str(e).splitlines()[0]}",
                            "report the architecture; token-merge is built for BERT-style encoders") from e
        ctx.say(f"token-merge: {len(layers)} layers merge {self.r} tokens each; inputs are padded to {length} tokens")
        return PassResult(new, modified=True, count=count, report={"schedule": schedule.to_dict()})


def _rewrite(gm: fx.GraphModule, schedule: MergeSchedule, att: dict[int, list[fx.Node]],
             merge_at: dict[int, fx.Node]) -> int:
    """Insert padding, the merges, the key masks and biases, and the unmerge (see the module docstring)."""
    graph = gm.graph
    ids, pos, mask = [n for n in graph.nodes if n.op == "placeholder"][-3:]
    first = next(n for n in graph.nodes if n.op != "placeholder" and n.op != "get_attr")
    with graph.inserting_before(first):
        length = graph.call_function(aten.sym_size.int, (ids, 1))
        padded = graph.call_function(merging.pad_inputs, (ids, pos, mask, schedule.length))
        inputs = [graph.call_function(operator.getitem, (padded, i)) for i in range(3)]
    for old, value in zip((ids, pos, mask), inputs):
        old.replace_all_uses_with(value, delete_user_cb=lambda u: u not in (padded, length))
    _, sizes, origin = _call_after(graph, inputs[2], merging.initial_state, (inputs[2],), items=2)
    seq_lengths = _length_nodes(graph, inputs)
    count = 0
    for layer in sorted(merge_at):
        h = merge_at[layer]
        metric = h
        if schedule.metric == "keys":
            with graph.inserting_after(h):
                metric = graph.call_function(merging.key_metric, (att[layer][0].args[1],))
        merged, x, sizes, origin = _call_after(graph, metric, merging.bipartite_merge,
                                               (h, metric, sizes, origin, schedule.r, schedule.protect), items=3)
        (n_tokens,) = _call_after(graph, origin, aten.sym_size.int, (x, 1))
        _, key_mask, key_bias = _call_after(graph, n_tokens, merging.size_bias, (sizes,), items=2)
        h.replace_all_uses_with(x, delete_user_cb=lambda u, own=(merged, metric): u not in own)
        later = descendants(x)
        for node in later:  # shapes built from the old length now use the merged one
            for old in seq_lengths.intersection(node.all_input_nodes):
                node.replace_input_with(old, n_tokens)
        seq_lengths = {n_tokens}
        for later_layer, nodes in att.items():
            if later_layer > layer:
                for a in nodes:
                    a.args = (*a.args[:3], key_mask, *a.args[4:])
                    a.kwargs = {**a.kwargs, "key_bias": key_bias}
        count += 1
    out = next(n for n in graph.nodes if n.op == "output")
    hidden = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with graph.inserting_before(out):
        full = graph.call_function(merging.unmerge, (hidden, origin, length))
    out.args = ((full,),) if isinstance(out.args[0], (tuple, list)) else (full,)
    graph.lint()
    gm.recompile()
    return count


def _call_after(graph: fx.Graph, anchor: fx.Node, target: object, args: tuple[object, ...], items: int = 0
                ) -> list[fx.Node]:
    """``target(*args)`` inserted after ``anchor``, followed by its first ``items`` tuple items:
    ``[call, item0, item1, ...]`` in graph order."""
    with graph.inserting_after(anchor):
        nodes = [graph.call_function(target, args)]  # type: ignore[arg-type]
    for i in range(items):
        with graph.inserting_after(nodes[-1]):
            nodes.append(graph.call_function(operator.getitem, (nodes[0], i)))
    return nodes


def _length_nodes(graph: fx.Graph, inputs: list[fx.Node]) -> set[fx.Node]:
    """The nodes holding the sequence length: ``sym_size(input, 1)`` of the (padded) inputs, and nodes whose
    traced value is that length's symbol."""
    nodes = {n for n in graph.nodes if n.target is aten.sym_size.int and n.args[0] in inputs and n.args[1] == 1}
    symbols = {str(n.meta["val"]) for n in nodes if isinstance(n.meta.get("val"), torch.SymInt)}
    return nodes | {n for n in graph.nodes if isinstance(n.meta.get("val"), torch.SymInt)
                    and str(n.meta["val"]) in symbols}
