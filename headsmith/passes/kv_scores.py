"""The attention scores a KV-eviction policy (``passes/kv_evict.py``) or a pruned prefill (``prefill_prune.py``)
ranks tokens by: ``headsmith.key_scores`` nodes beside the attention ops of the step graphs, and their manifest
record.

``key_scores(q, k, past_k, key_mask, last=w)`` is the causal softmax of the last ``w`` queries over every key,
summed over those queries and averaged over the query heads of each KV head (``[B, G, keys]``; reference kernel in
``ops.py``, ONNX translation in ``backends/onnx_ops.py``): what a fused attention kernel never materialises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ..fxutil import is_call
from ..program import Program
from ..sites import attention_by_layer

aten = torch.ops.aten
KEY_SCORES = torch.ops.headsmith.key_scores.default


def key_scores_outputs(gm: fx.GraphModule, program: Program, decode: bool) -> list[fx.Node]:
    """With a KV policy (``passes/kv_evict.py``), per layer the attention scores it ranks tokens by
    (``headsmith.key_scores``, ``[B, G, keys]``): the prefill's observation window, and (h2o) the decode step's
    queries over the past and new keys. Empty without a policy."""
    policy = program.kv_policy
    if policy is None or (decode and not policy.decode_scores):
        return []
    from .kv_evict import check_evictable
    check_evictable(program)  # a later pass may have added a window
    return [key_score_node(gm.graph, nodes[0], 0 if decode else policy.window)
            for _, nodes in sorted(attention_by_layer(gm.graph).items())]


def key_score_node(graph: fx.Graph, att: fx.Node, last: int) -> fx.Node:
    """``headsmith.key_scores`` of attention node ``att`` (inserted after it): its last ``last`` queries' attention
    to every key, or (``last=0``) a decode step's queries over its past and new keys."""
    q, k = att.args[0], att.args[1]
    key_mask = att.args[3] if len(att.args) > 3 else att.kwargs.get("key_mask")
    past = None
    if last == 0 and is_call(k, aten.cat.default) and getattr(k.args[0][0], "op", "") == "placeholder":  # type: ignore[union-attr, index]
        past, k = k.args[0]  # type: ignore[union-attr, misc]
    with graph.inserting_after(att):
        return graph.call_function(KEY_SCORES, (q, k, past, key_mask), {
            "last": last, "scale": att.kwargs.get("scale", 0.0), "softcap": att.kwargs.get("softcap", 0.0)})


def score_layout(program: Program) -> list[dict[str, Any]]:
    """The score outputs of the step graphs (``scores_layer{L}``, with ``G`` heads), for the manifest's
    ``kv_policy``; empty without a policy."""
    if program.kv_policy is None:
        return []
    shapes = program.shapes()
    return [{"name": f"scores_layer{layer}", "layer": layer, "heads": int(shapes[nodes[0].args[1]][1])}  # type: ignore[index]
            for layer, nodes in sorted(attention_by_layer(program.gm.graph).items())]


def policy_record(program: Program) -> dict[str, Any]:
    """The manifest's ``kv_policy`` (policy options and score outputs), or ``{}``."""
    if program.kv_policy is None:
        return {}
    return {"kv_policy": {**program.kv_policy.to_dict(), "scores": score_layout(program)}}
