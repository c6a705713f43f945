"""The staged prefill of ``prefill-prune`` (``passes/prefill_prune.py``): the prefill graph cut at the residual
stream entering each pruning layer, one graph per stage.

Letters: B batch, S prompt tokens, T tokens flowing into a stage, E width, G a layer's KV heads, V vocab.

- stage 0 ``(input_ids[B,S], position_ids, attention_mask) -> (next_hidden[B,S,E], *presents, scores[B,G,S])``
- stage s ``(hidden[B,T,E], position_ids[B,T], attention_mask[B,T]) -> (next_hidden, *presents, scores[B,G,T])``
- the last ``(hidden[B,T,E], position_ids[B,T], attention_mask[B,T]) -> (logits[B,1,V], *presents)``

``next_hidden`` is the residual stream entering the next stage's first layer, ``scores`` the ``headsmith.key_scores``
of the stage's last layer (its last ``window`` queries' attention to every key), ``presents`` the cache entries of
the stage's layers over its tokens. The runtime gathers the kept tokens of ``hidden`` and of the positions and
mask between stages (:mod:`headsmith.token_pruning`); a stage's causal mask over its gathered tokens is the
text's, since they stay in text order, and RoPE reads the gathered positions, so nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..errors import BackendError
from ..fxutil import clone_module, erase_dead, is_call
from ..program import Program
from ..sites import attention_by_layer
from .kv_cache import CacheEntry, _lm_head_last_position, _points, _prepare, finish_step_graph
from .kv_scores import key_score_node
from .prefill_prune import check_prunable
from .structure import find_blocks

aten = torch.ops.aten


@dataclass
class StageGraph:
    """One stage of the staged prefill (see the module docstring)."""

    gm: fx.GraphModule
    entries: list[int]
    """The cache entries (indices into the layout) its presents fill, in output order."""
    inputs: list[str]
    outputs: list[str]
    score_layer: int
    """The layer whose scores it returns (-1: the last stage, which returns logits)."""


def prefill_stages(program: Program) -> tuple[list[StageGraph], list[CacheEntry]]:
    """The stage graphs of ``program``'s ``prefill_prune`` plan and the cache layout (every entry's ``stage``)."""
    plan = program.prefill_prune
    if plan is None:
        raise BackendError("the program has no prefill-prune plan")
    check_prunable(program, plan)  # a later pass may have added a window or a draft
    entering = {layer: find_blocks(program)[layer].x_in.name for layer in plan.layers}
    base, _, shapes = _prepare(program)
    points = _points(base, shapes, False, plan)
    _lm_head_last_position(base, program.info.vocab_size)
    by_layer = attention_by_layer(base.graph)
    scores = {layer: key_score_node(base.graph, by_layer[layer - 1][0], plan.window).name for layer in plan.layers}
    logits = base.graph.output_node().args[0]
    assert isinstance(logits, fx.Node)
    bounds = [0, *plan.layers, len(by_layer)]
    stages = []
    for s in range(plan.stages):
        lo, hi = bounds[s], bounds[s + 1]
        mine = [i for i, p in enumerate(points) if lo <= p.entry.layer < hi]
        gm = clone_module(base)
        nodes = {n.name: n for n in gm.graph.nodes}
        presents = [nodes[points[i].node.name] for i in mine]
        names = [f"present_{points[i].entry.name.replace('.', '_')}" for i in mine]
        last = s == plan.stages - 1
        if last:
            outs, out_names = [nodes[logits.name], *presents], ["logits", *names]
        else:
            outs = [nodes[entering[hi]], *presents, nodes[scores[hi]]]
            out_names = ["next_hidden", *names, f"scores_layer{hi - 1}"]
        gm.graph.output_node().args = (tuple(outs),)
        inputs = ["input_ids", "position_ids", "attention_mask"]
        if s > 0:
            _cut_at(gm, nodes[entering[lo]])
            inputs[0] = "hidden"
        finish_step_graph(gm)
        stages.append(StageGraph(gm, mine, inputs, out_names, -1 if last else hi - 1))
    return stages, [p.entry for p in points]


def _cut_at(gm: fx.GraphModule, entering: fx.Node) -> None:
    """Make the residual stream ``entering`` a stage an input ``hidden`` (in place of ``input_ids``, whose other
    readers, the sequence length, read it from ``hidden``)."""
    graph = gm.graph
    ids = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    with graph.inserting_before(ids):
        hidden = graph.placeholder("hidden")
    hidden.meta = dict(entering.meta)
    entering.replace_all_uses_with(hidden)
    for user in list(ids.users):
        if is_call(user, aten.sym_size.int):
            user.replace_input_with(ids, hidden)
    erase_dead(graph)
    if ids.users:
        raise BackendError(f"cannot cut the prefill at {entering.name}: input_ids is still read by "
                           f"{next(iter(ids.users)).format_node()}")
    graph.erase_node(ids)
