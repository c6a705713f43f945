"""``raise-attention``: turn every attention region into one ``headsmith.attention`` node. Exact.

Runs ``canonicalize`` first, so only one spelling is left: an ``aten.scaled_dot_product_attention``
node. For each one it

1. strips GQA's ``repeat_kv`` from k and v (``reshape(expand(unsqueeze(k, 2), [B,Hkv,n,S,D]),
   [B,Hkv*n,S,D])`` or ``repeat_interleave``), since the raised op shares KV heads itself;
2. works out what the mask means *numerically*: it evaluates the mask subgraph on probe inputs with
   padding and finds the (causal, window, sinks, key-padding) combination that reproduces it exactly
   (a model-specific mask spelling therefore either raises correctly or fails loudly);
3. replaces the node (letters: B batch, H heads, S sequence, D head dim)::

       sdpa(q_BHSD, repeat_kv(k_BHkvSD), repeat_kv(v_BHkvSD), mask_B1SS, scale=s)
    -> headsmith.attention(q_BHSD, k_BHkvSD, v_BHkvSD, ne(attention_mask, 0), causal=True, scale=s,
                           window=w, layer=i)

and finally checks each raised layer against the original layer's output on probe inputs; a layer that
does not match is reported by index with the difference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, fx

from ..errors import RaiseError
from ..fxutil import erase_dead, evaluate, is_call, module_path, record_values
from ..ops import attention_mask_bias
from ..program import Program
from ..sites import ATTENTION
from .base import MatchResult, Pass, PassContext, PassResult
from .canonicalize import CANONICAL_RULES, SDPA, apply_rules

aten = torch.ops.aten


@dataclass(frozen=True)
class MaskSemantics:
    causal: bool
    window: int
    sinks: int
    uses_padding: bool


def strip_repeat_kv(node: fx.Node) -> fx.Node:
    """``x`` if ``node`` is ``repeat_kv(x)`` (HF's expand+reshape or repeat_interleave), else ``node``."""
    # reshape(expand(unsqueeze(x, 2), [B, Hkv, n, S, D]), [B, Hkv*n, S, D]) -> x
    if is_call(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        exp = node.args[0]
        if is_call(exp, aten.expand.default):
            unsq = exp.args[0]  # type: ignore[union-attr]
            if is_call(unsq, aten.unsqueeze.default) and unsq.args[1] == 2:  # type: ignore[union-attr]
                src = unsq.args[0]  # type: ignore[union-attr]
                if isinstance(src, fx.Node):
                    return src
    # repeat_interleave(x, n, dim=1) -> x
    if is_call(node, aten.repeat_interleave.self_int):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        src = node.args[0]
        if dim == 1 and isinstance(src, fx.Node):
            return src
    return node


def layer_index(node: fx.Node, fallback: int) -> int:
    path = module_path(node)
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", path)
    return int(numbers[-1]) if numbers else fallback


def probe_inputs(program: Program, length: int) -> dict[str, Tensor]:
    """Two rows: the first without padding, the second with 3 padding tokens."""
    ids, pos, mask = program.example_inputs(batch=2, seq=length, seed=1234, pad=3)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def probe_length(program: Program) -> int:
    cfg = program.info.config
    text_cfg = cfg.get("text_config", cfg)
    hints = [int(v) for k in ("sliding_window", "attention_window", "local_attention", "window_size")
             if isinstance(v := text_cfg.get(k), int) and v > 0]
    length = max([24, *(h + 9 for h in hints)])
    if program.info.max_positions is not None:
        length = min(length, program.info.max_positions)
    return length


def classify_mask(mask: Tensor | None, is_causal: bool, keys: Tensor) -> MaskSemantics | MatchResult:
    """Find causal / window / sinks / padding semantics reproducing ``mask`` ([B,1|H,S,S]) exactly."""
    if mask is None:
        return MaskSemantics(is_causal, 0, 0, uses_padding=False)
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        neg = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | neg).all()):
            return MatchResult.fail("the attention mask is an additive bias (e.g. ALiBi), not a 0/-inf mask")
        allowed = ~neg
    b, s = keys.shape
    allowed = allowed.expand(b, allowed.shape[1], s, s)
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        return MatchResult.fail("the attention mask differs between heads")
    allowed = allowed[:, 0]
    row0 = allowed[0]  # the unpadded row
    causal = is_causal or not bool(row0[0, 1:].any())
    window, sinks = 0, 0
    last = row0[s - 1]
    if causal and bool(last[s - 1]):
        tail = s - 1
        while tail > 0 and bool(last[tail - 1]):
            tail -= 1
        if tail > 0:
            window = s - tail
            while sinks < tail and bool(last[sinks]):
                sinks += 1
    valid_q = keys.bool()
    for key_mask, uses_padding in ((keys, True), (None, False)):
        bias = attention_mask_bias(key_mask, s, s, causal, window, sinks, torch.float32, keys.device)
        expected = torch.ones(b, s, s, dtype=torch.bool) if bias is None else (bias == 0).expand(b, 1, s, s)[:, 0]
        if bool((expected == allowed)[valid_q].all()):
            return MaskSemantics(causal, window, sinks, uses_padding)
    return MatchResult.fail(f"the attention mask is not causal/bidirectional with a window and padding "
                            f"(tried causal={causal}, window={window}, sinks={sinks})")


@dataclass(frozen=True)
class RaiseAttention(Pass):
    """Raise each SDPA (or eager) attention region to one ``headsmith.attention`` op. Exact."""

    name: ClassVar[str] = "raise-attention"
    exact: ClassVar[bool] = True
    float_weights: ClassVar[bool] = False
    needs_raised: ClassVar[bool] = False

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        gm, graph = new.gm, new.gm.graph
        apply_rules(gm, CANONICAL_RULES)
        sdpas = [n for n in graph.nodes if is_call(n, SDPA)]
        if not sdpas:
            if any(is_call(n, ATTENTION) for n in graph.nodes):
                return PassResult(new, modified=False, count=0)
            raise RaiseError(f"{program.info.architecture}: found no attention to raise (no "
                             "scaled_dot_product_attention or matmul-softmax-matmul region)",
                             "this architecture's attention is not recognised")
        inputs = probe_inputs(new, probe_length(new))
        with torch.no_grad():
            originals = list(record_values(gm, inputs, lambda n: is_call(n, SDPA)).values())
        mask_node = _attention_mask_node(graph)
        with graph.inserting_after(mask_node):
            key_mask = graph.call_function(aten.ne.Scalar, (mask_node, 0))
        semantics_cache: dict[Any, MaskSemantics | MatchResult] = {}
        raised: list[tuple[fx.Node, fx.Node, int]] = []
        for i, node in enumerate(sdpas):
            with ctx.at(node):
                layer = layer_index(node, i)
                new_node = self._raise_one(gm, node, layer, key_mask, inputs, semantics_cache)
                raised.append((node, new_node, layer))
        for old, new_node, _ in raised:
            new_node.meta["headsmith_original"] = old.name
            old.replace_all_uses_with(new_node)
            graph.erase_node(old)
        erase_dead(graph)
        graph.lint()
        gm.recompile()
        self._check_layers(new, inputs, originals, raised)
        return PassResult(new, modified=True, count=len(raised))

    @staticmethod
    def _raise_one(gm: fx.GraphModule, node: fx.Node, layer: int, key_mask: fx.Node,
                   inputs: dict[str, Tensor], cache: dict[Any, MaskSemantics | MatchResult]) -> fx.Node:
        args = list(node.args) + [None] * (8 - len(node.args))
        q, k, v = args[0], args[1], args[2]
        mask = node.kwargs.get("attn_mask", args[3])
        dropout = node.kwargs.get("dropout_p", args[4] or 0.0)
        is_causal = bool(node.kwargs.get("is_causal", args[5] or False))
        scale = node.kwargs.get("scale", args[6])
        if dropout:
            raise RaiseError(f"layer {layer}: attention dropout p={dropout} (capture the model in eval mode)")
        assert isinstance(q, fx.Node) and isinstance(k, fx.Node) and isinstance(v, fx.Node)
        key = mask if isinstance(mask, fx.Node) else ("none", is_causal)
        if key not in cache:
            value = evaluate(gm, [mask], inputs)[0] if isinstance(mask, fx.Node) else None
            cache[key] = classify_mask(value, is_causal, inputs["attention_mask"])
        sem = cache[key]
        if isinstance(sem, MatchResult):
            raise RaiseError(f"cannot raise the attention of layer {layer}: {sem.reason}",
                             "headsmith.attention expresses causal / bidirectional / sliding-window masks "
                             "with padding; this model's attention needs an extension")
        kwargs: dict[str, Any] = {"causal": sem.causal, "scale": float(scale) if scale else 0.0,
                                  "window": sem.window, "sinks": sem.sinks, "softcap": 0.0, "layer": layer}
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                ATTENTION, (q, strip_repeat_kv(k), strip_repeat_kv(v), key_mask if sem.uses_padding else None),
                kwargs)
        new.meta = {k2: v2 for k2, v2 in node.meta.items() if k2 in ("val", "nn_module_stack", "stack_trace")}
        return new

    @staticmethod
    def _check_layers(new: Program, inputs: dict[str, Tensor], originals: list[Tensor],
                      raised: list[tuple[fx.Node, fx.Node, int]]) -> None:
        with torch.no_grad():
            values = record_values(new.gm, inputs, lambda n: is_call(n, ATTENTION))
        outs = list(values.values())
        if len(outs) != len(originals):
            return  # the whole-program check in the pass manager still runs
        valid = inputs["attention_mask"].bool()
        for (_, _, layer), ref, out in zip(raised, originals, outs):
            if ref.shape != out.shape:
                raise RaiseError(f"layer {layer}: raised attention has shape {tuple(out.shape)}, "
                                 f"original {tuple(ref.shape)}")
            sel_ref = ref.transpose(1, 2)[valid]
            sel_out = out.transpose(1, 2)[valid]
            diff = float((sel_ref - sel_out).abs().max())
            if not diff <= 1e-4 * max(1.0, float(sel_ref.abs().max())):
                raise RaiseError(f"layer {layer}: the raised attention does not reproduce the original "
                                 f"(max abs diff {diff:.3g}); its mask or scale was not understood")


def _attention_mask_node(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op == "placeholder" and node.name == "attention_mask":
            return node
    raise RaiseError("the program has no attention_mask input; capture it with headsmith.load()")


def check_raisable(node: fx.Node) -> MatchResult:
    """Whether an SDPA node has 4-D q/k/v (used by ``--explain``)."""
    for t in node.args[:3]:
        val = t.meta.get("val") if isinstance(t, fx.Node) else None
        if not isinstance(val, Tensor) or val.dim() != 4:
            return MatchResult.fail("q, k and v must be 4-D [B, H, S, D]", node)
    return MatchResult.success()
