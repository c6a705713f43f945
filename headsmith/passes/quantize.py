"""``quantize(weights=int4|int8|bf16|fp16, group=64, method=rtn|gptq|awq, sym=true, head=...)``: weight-only
quantisation of the linear layers (and of the token embedding with the LM head). Lossy.

Letters: N output features, K input features, G the group (block) size, V vocabulary.

Every ``linear`` whose weight is a stored 2-D tensor is rewritten; its weight is replaced by the packed block
format of :mod:`headsmith.qweights` (integer codes, one scale per block of ``group`` input features, zero points
when ``sym=false``), never by a dequantised copy, so the artifact and the engine's memory hold the small
tensors. 16-bit weights keep ``linear`` and read the weight through a cast. Before / after::

    y = linear(x, W[N,K], b)          ->  y = linear_q(x, W_packed[N,K/G,G/2] u8, W_scales[N,K/G], None, b, 4, 64)
    e = embedding(E[V,K], ids)        ->  e = embedding_q(E_packed, E_scales, None, ids, 8, 64)
    y = linear(x, W[N,K])             ->  y = linear(x, _to_copy(W_bf16[N,K], dtype=float32))     # weights=bf16

The LM head (the last linear before the logits) and the token embedding (a table with one row per vocabulary
entry) take the precision ``head``: ``int8`` (default for 4-bit weights: the head is the widest matrix, its
error goes straight into the logits, and at 8 bits its bytes still shrink 4x), ``same``, or ``float``
(unquantised). A tied embedding and LM head read the same packed tensors, stored once.
At 4 bits the value and down projections stay in int8 by default (``high``, by role or weight name): on
SmolLM2 they were among the most sensitive types, and for 15% more bytes they took calibrated int4 from 1.18x to
1.05x fp32's perplexity (docs/precision.md).

Methods, all with the same per-block format (so every engine runs all of them):

- ``rtn``: round to nearest per block (llama.cpp's Q4_0 / Q8_0 rule, see :func:`qweights.quantize_rtn`);
- ``gptq``: GPTQ (Frantar et al., 2022): columns are quantised one at a time and the rounding error of each is
  spread over the not-yet-quantised columns through the inverse Hessian ``H = X^T X`` of the layer's
  calibration inputs, so the layer's *output* error is minimised (:mod:`headsmith.passes.gptq`);
- ``awq``: AWQ (Lin et al., 2023): per input channel, scale the weight up by ``s = mean|x|^a`` and the input
  down by the same factor (an exact rewrite: folded into the preceding norm's weight or up-projection, else
  one multiply), so the channels with large activations lose less to rounding; ``a`` is searched per layer on
  the calibration activations (:mod:`headsmith.passes.awq`).

``gptq`` and ``awq`` use the calibration text like the other lossy passes (``calibration_tokens`` of it).
Structural passes (``gqa``, ``mla``, ``prune-*``) and ``heal`` edit float weights, so ``quantize`` comes after
them in a pipeline; the pass manager refuses the other order with that hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, fx

from ..fxutil import add_weight, erase_dead, is_call, prune_unused_attrs, weight_of
from ..program import Program
from ..qweights import EMBEDDING_Q, LINEAR_Q, Packed, check_format, quantize_rtn
from .base import Pass, PassContext, PassResult
from .structure import refresh_values

aten = torch.ops.aten
FLOAT16 = {"bf16": torch.bfloat16, "fp16": torch.float16}
ROLES = ("q", "k", "v", "o", "up", "down")
INT_BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class Quantize(Pass):
    """Weight-only quantisation of the linears (int4/int8 blocks with scales, or 16-bit). Lossy."""

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False
    needs_raised: ClassVar[bool] = False
    float_weights: ClassVar[bool] = False

    weights: Literal["int4", "int8", "bf16", "fp16"] = "int4"
    """Weight precision: int4 or int8 blocks with one scale each, or bf16 / fp16."""
    group: int = 64
    """Input features per block that share a scale (a power of two >= 16; a width it does not divide is
    zero-padded to whole blocks). 64 with fp32 scales is 4.5 bits per int4 weight and 8.5 per int8 weight, the
    bits of llama.cpp's Q4_0 / Q8_0 (blocks of 32, fp16 scales)."""
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    """rtn (round to nearest), gptq (error feedback through the inverse Hessian), awq (activation-aware scales)."""
    sym: bool = True
    """Symmetric blocks (no zero points); false stores a zero point per block (min/max range)."""
    head: Literal["auto", "same", "int8", "float"] = "auto"
    """Precision of the LM head and the token embedding: auto (int8 when weights=int4, else same), same, int8,
    float (unquantised)."""
    high: tuple[str, ...] = ("v", "down")
    """Linears stored in int8 when weights=int4: by role (q, k, v, o: attention projections; up: the MLP's up
    and gate projections; down: its down projection) or by a string their weight name contains (e.g.
    ``layers.0.``). The default keeps the value and down projections in int8 (measured, docs/precision.md:
    SmolLM2-135M int4 perplexity 1.22x -> 1.06x of fp32 for 15% more bytes); ``high=[]`` is uniform int4."""
    calibration_tokens: int = 16384
    """Calibration tokens for gptq's Hessians and awq's activation statistics (2048 measured too few: gptq then
    fits the calibration text's style and loses on other text)."""
    damp: float = 0.01
    """gptq: damping added to the Hessian's diagonal, as a fraction of its mean."""
    clip: bool | None = None
    """Search a clipped range per block where it rounds better, weighted by the inputs' mean square (none: on for
    gptq and awq; off for rtn, where the unweighted search measured worse: docs/precision.md)."""
    act_order: bool = True
    """gptq: quantise columns in order of decreasing input energy (the groups' ranges are then fixed up front)."""

    def __post_init__(self) -> None:
        if self.calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be >= 1, got {self.calibration_tokens}")
        if self.weights in INT_BITS:
            problem = check_format(INT_BITS[self.weights], self.group)
            if problem is not None:
                raise ValueError(problem)
        elif self.method != "rtn":
            raise ValueError(f"method={self.method} calibrates integer blocks; {self.weights} weights are a "
                             "plain cast (use method=rtn, the default)")

    def clipping(self) -> bool:
        return self.clip if self.clip is not None else self.method != "rtn"

    def head_precision(self) -> str:
        if self.head == "auto":
            return "int8" if self.weights == "int4" else "same"
        return self.head

    def _precision(self, node: fx.Node, roles: dict[fx.Node, str]) -> str:
        weight = str(node.args[1].target)  # type: ignore[union-attr]
        if self.weights == "int4" and any(h == roles.get(node) or (h not in ROLES and h in weight) for h in self.high):
            return "int8"
        return self.weights

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        gm = new.gm
        linears = float_linears(gm)
        head = lm_head(gm) if new.info.task == "causal-lm" else None
        embeddings = [n for n in gm.graph.nodes if is_call(n, aten.embedding.default)
                      and (w := weight_of(gm, n.args[0])) is not None and w.shape[0] == new.info.vocab_size]
        head_prec = self.head_precision()
        if head_prec == "float":
            linears = [n for n in linears if n is not head]
            embeddings = []
        if not linears:
            ctx.warn(f"pass {self} found no float linear with a stored weight: the program is unchanged")
            return PassResult(new, modified=False, count=0)
        emb_prec = self.weights if head_prec == "same" else head_prec
        roles = linear_roles(new) if self.high else {}
        prec = {n: (emb_prec if n is head else self._precision(n, roles)) for n in linears}
        head_group = self.group
        if head is not None and emb_prec in INT_BITS:  # a tied table must be whole blocks (embedding_q pads none)
            head_group = fit_group(int(weight_of(gm, head.args[1]).shape[1]), self.group)  # type: ignore[union-attr]
        if emb_prec in INT_BITS:
            kept = [e for e in embeddings if weight_of(gm, e.args[0]).shape[1] % head_group]  # type: ignore[union-attr]
            if kept:
                ctx.warn(f"{len(kept)} embedding table(s) are not a whole number of blocks: kept in float")
            embeddings = [e for e in embeddings if e not in kept]
        report: dict[str, Any] = {"weights": self.weights, "method": self.method, "group": self.group,
                                  "head": head_prec, "head_group": head_group, "bytes_before": _bytes(new)}
        ints = [n for n in linears if prec[n] in INT_BITS]
        formats = {n: (INT_BITS[prec[n]], head_group if n is head else self.group) for n in ints}
        quantized = self._quantize_all(new, ints, formats, ctx, report) if ints else {}
        made = _rewrite_linears(gm, ints, quantized)
        for dtype_name, dtype in FLOAT16.items():
            _cast_weights(gm, [n for n in linears if prec[n] == dtype_name],
                          [e for e in embeddings if emb_prec == dtype_name], dtype)
        if emb_prec in INT_BITS:
            _rewrite_embeddings(gm, embeddings, quantized, made, INT_BITS[emb_prec], head_group, self.sym)
        erase_dead(gm.graph)
        prune_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        refresh_values(gm)
        new._shapes = None
        report.update(linears=len(linears), embeddings=len(embeddings), bytes_after=_bytes(new))
        return PassResult(new, modified=True, count=len(linears), report=report)

    def _quantize_all(self, program: Program, linears: list[fx.Node], formats: dict[fx.Node, tuple[int, int]],
                      ctx: PassContext, report: dict[str, Any]) -> dict[int, Packed]:
        """One :class:`Packed` per distinct weight tensor (by ``id``: a tied weight is quantised once), each in
        its ``(bits, group)`` format."""
        gm = program.gm
        importance: dict[fx.Node, Tensor] = {}
        if self.method == "awq":
            from .awq import apply_awq
            ids = _calibration(program, ctx, self.calibration_tokens)
            report["awq"] = apply_awq(program, linears, formats, self.sym, ids, importance)
        hessians: dict[fx.Node, Tensor] = {}
        if self.method == "gptq":
            from .gptq import hessians as gptq_hessians
            ids = _calibration(program, ctx, self.calibration_tokens)
            hessians = gptq_hessians(program, linears, ids)
        out: dict[int, Packed] = {}
        errors: list[float] = []
        for node in linears:
            w = weight_of(gm, node.args[1])
            assert w is not None
            if id(w) in out:
                continue
            bits, group = formats[node]
            with ctx.at(node):
                if self.method == "gptq":
                    from .gptq import gptq
                    packed = gptq(w, hessians[node.args[0]], bits, group, self.sym, self.damp,  # type: ignore[index]
                                  clip=self.clipping(), act_order=self.act_order)
                else:
                    packed = quantize_rtn(w, bits, group, self.sym, self.clipping(), importance.get(node))
            w32 = w.detach().float()
            errors.append(float((packed.dequantize() - w32).pow(2).mean() / w32.pow(2).mean()))
            out[id(w)] = packed
        report["weight_rel_mse"] = sum(errors) / len(errors)
        return out


def linear_roles(program: Program) -> dict[fx.Node, str]:
    """The role of each attention and MLP projection (``q``, ``k``, ``v``, ``o``, ``up``, ``down``)."""
    from .structure import find_mlps
    roles: dict[fx.Node, str] = {}
    if program.raised:
        for site in program.sites():
            for role, proj in (("q", site.q), ("k", site.k), ("v", site.v), ("o", site.o)):
                if proj is not None:
                    roles.setdefault(proj.node, role)
    for mlp in find_mlps(program):
        for proj in mlp.ups:
            roles.setdefault(proj.node, "up")
        roles.setdefault(mlp.down.node, "down")
    return roles


def fit_group(width: int, group: int) -> int:
    """The largest power of two ``<= group`` (and ``>= 16``) that divides ``width``; ``group`` if none does."""
    g = group
    while g >= 16 and width % g:
        g //= 2
    return g if g >= 16 else group


def float_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``linear`` nodes whose weight is a stored 2-D floating-point tensor, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if not is_call(node, aten.linear.default):
            continue
        w = weight_of(gm, node.args[1])
        if w is not None and w.dim() == 2 and w.is_floating_point():
            out.append(node)
    return out


def lm_head(gm: fx.GraphModule) -> fx.Node | None:
    """The last linear (float or quantised) that the graph's first output depends on."""
    from ..fxutil import ancestors
    logits = gm.graph.output_node().args[0]
    first = logits[0] if isinstance(logits, (tuple, list)) else logits
    if not isinstance(first, fx.Node):
        return None
    feeding = ancestors([first])
    for node in reversed(list(gm.graph.nodes)):
        if node in feeding and is_call(node, aten.linear.default, LINEAR_Q):
            return node
    return None


def _calibration(program: Program, ctx: PassContext, tokens: int) -> Tensor:
    return ctx.calibration(program, tokens)


def _cast_weights(gm: fx.GraphModule, linears: list[fx.Node], embeddings: list[fx.Node], dtype: torch.dtype) -> None:
    """``linear(x, W)`` -> ``linear(x, _to_copy(W16, dtype=float32))`` and ``embedding(E, ids)`` ->
    ``_to_copy(embedding(E16, ids), dtype=float32)`` (only the rows looked up are cast); one 16-bit copy per
    distinct tensor, so a tied head and embedding share it."""
    graph = gm.graph
    made: dict[int, fx.Node] = {}

    def weight16(w_node: fx.Node) -> tuple[fx.Node, Tensor]:
        w = weight_of(gm, w_node)
        assert w is not None
        if id(w) not in made:
            made[id(w)] = add_weight(gm, graph, f"{w_node.target}_{str(dtype).split('.')[-1]}", w.to(dtype),
                                     next(n for n in graph.nodes if n.op != "placeholder"))
        return made[id(w)], w

    for node in linears:
        w16, w = weight16(node.args[1])  # type: ignore[arg-type]
        with graph.inserting_before(node):
            cast = graph.call_function(aten._to_copy.default, (w16,), {"dtype": w.dtype})
        cast.meta["val"] = w
        node.replace_input_with(node.args[1], cast)  # type: ignore[arg-type]
    for node in embeddings:
        e16, e = weight16(node.args[0])  # type: ignore[arg-type]
        node.replace_input_with(node.args[0], e16)  # type: ignore[arg-type]
        with graph.inserting_after(node):
            cast = graph.call_function(aten._to_copy.default, (node,), {"dtype": e.dtype})
        cast.meta = dict(node.meta)
        node.replace_all_uses_with(cast, delete_user_cb=lambda u, c=cast: u is not c)


def _packed_nodes(gm: fx.GraphModule, base: str, packed: Packed, before: fx.Node) -> tuple[fx.Node, ...]:
    graph = gm.graph
    nodes = [add_weight(gm, graph, f"{base}_packed", packed.packed, before),
             add_weight(gm, graph, f"{base}_scales", packed.scales, before)]
    if packed.zeros is not None:
        nodes.append(add_weight(gm, graph, f"{base}_zeros", packed.zeros, before))
    return tuple(nodes)


def _rewrite_linears(gm: fx.GraphModule, linears: list[fx.Node],
                     quantized: dict[int, Packed]) -> dict[int, tuple[fx.Node, ...]]:
    """``linear(x, W, b)`` -> ``linear_q(x, packed, scales, zeros, b, bits, group)``; returns the get_attr nodes
    of the packed tensors by the ``id`` of the float weight they replace."""
    graph = gm.graph
    made: dict[int, tuple[fx.Node, ...]] = {}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for node in linears:
        w = weight_of(gm, node.args[1])
        assert w is not None
        p = quantized[id(w)]
        if id(w) not in made:
            made[id(w)] = _packed_nodes(gm, str(node.args[1].target), p, first)  # type: ignore[union-attr]
        tensors = made[id(w)]
        zeros = tensors[2] if len(tensors) > 2 else None
        bias = node.args[2] if len(node.args) > 2 else None
        with graph.inserting_before(node):
            q = graph.call_function(LINEAR_Q, (node.args[0], tensors[0], tensors[1], zeros, bias, p.bits, p.group))
        q.meta = dict(node.meta)
        node.replace_all_uses_with(q)
        graph.erase_node(node)
    return made


def _rewrite_embeddings(gm: fx.GraphModule, embeddings: list[fx.Node], quantized: dict[int, Packed],
                        made: dict[int, tuple[fx.Node, ...]], bits: int, group: int, sym: bool) -> None:
    """``embedding(E, ids)`` -> ``embedding_q(packed, scales, zeros, ids, bits, group)``; a table tied to the LM
    head reuses the head's packed tensors (when their precision agrees), so it is stored once."""
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for node in embeddings:
        table = weight_of(gm, node.args[0])
        assert table is not None
        p = quantized.get(id(table))
        if p is not None and p.bits == bits:
            tensors = made[id(table)]
        else:
            p = quantize_rtn(table, bits, group, sym)
            tensors = _packed_nodes(gm, str(node.args[0].target), p, first)  # type: ignore[union-attr]
        zeros = tensors[2] if len(tensors) > 2 else None
        with graph.inserting_before(node):
            q = graph.call_function(EMBEDDING_Q, (tensors[0], tensors[1], zeros, node.args[1], p.bits, p.group))
        q.meta = dict(node.meta)
        node.replace_all_uses_with(q)
        graph.erase_node(node)


def _bytes(program: Program) -> int:
    return sum(t.numel() * t.element_size() for t in program.weights().values())
