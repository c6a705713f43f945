"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han, 2023): activation-aware weight quantisation. Used by
``quantize(method=awq)`` before round-to-nearest.

Letters: N output features, K input features, T calibration tokens.

A few input channels carry much larger activations than the rest, and the rounding error of the weights that
read them dominates the output error. Scaling such a channel's weights up by ``s > 1`` before quantisation (and
its input down by ``s``) leaves the float function unchanged, ``x W^T = (x / s)(W s)^T``, but shrinks that
channel's error relative to its signal. AWQ picks, for the linears that read the same input ``x`` (q/k/v; gate/up;
o; down), one vector ``s = mean_t |x_t|^a`` (normalised to geometric mean 1), with ``a`` in ``[0, 1]`` searched on
a grid to minimise the group's output error on calibration activations::

    a* = argmin_a || x_s (Q(W s) / s)^T - x_s W^T ||^2        (a = 0 is plain round-to-nearest)

The division by ``s`` is folded into whatever produced ``x`` when nothing else reads it: the weight of an RMSNorm
(``mul(w, x_hat)``) or LayerNorm (weight and bias), or the rows of the up-projection in ``down(act(gate) * up)``;
otherwise (e.g. the attention output before ``o``) it becomes one ``mul(x, 1/s)`` in front of the group. A weight
also read by something other than the group (a tied embedding) is left unscaled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx

from ..fxutil import add_weight, get_tensor, is_call, record_values, set_tensor, weight_of
from ..program import Program
from ..qweights import quantize_rtn
from .calib import batches

aten = torch.ops.aten
GRID = 20
SAMPLE_TOKENS = 512


def apply_awq(program: Program, linears: list[fx.Node], formats: dict[fx.Node, tuple[int, int]], sym: bool,
              ids: Tensor, importance: dict[fx.Node, Tensor] | None = None) -> dict[str, Any]:
    """Scale every group of ``linears`` (those sharing an input) in place on ``program`` (a clone the caller
    owns); returns a report with the chosen exponents and how each scaling was folded. ``importance`` receives,
    per linear, the mean square of its (scaled) input per channel, for the clipping search of the rounding."""
    gm = program.gm
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in linears:
        if isinstance(node.args[0], fx.Node) and _private_weight(gm, node):
            groups.setdefault(node.args[0], []).append(node)
    stats = _activation_stats(program, list(groups), ids)
    report: dict[str, Any] = {"groups": 0, "folded": {}, "alpha": []}
    for x, members in groups.items():
        mean_abs, sample = stats[x]
        weights = [get_tensor(gm, str(n.args[1].target)) for n in members]  # type: ignore[union-attr]
        alpha, s = _search(weights, [formats[n] for n in members], sym, mean_abs, sample)
        report["alpha"].append(round(alpha, 2))
        if importance is not None:
            for node in members:
                importance[node] = (sample / s[None, :]).pow(2).mean(0)
        if alpha == 0.0:
            continue
        for node, w in zip(members, weights):
            set_tensor(gm, str(node.args[1].target), (w * s[None, :]).to(w.dtype))  # type: ignore[union-attr]
        how = _fold(gm, x, members, s)
        report["folded"][how] = report["folded"].get(how, 0) + 1
        report["groups"] += 1
    return report


def _private_weight(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s weight tensor is read only by linears (not also by an embedding lookup)."""
    w = weight_of(gm, node.args[1])
    for other in gm.graph.nodes:
        if other.op != "get_attr" or weight_of(gm, other) is not w:
            continue
        if any(not is_call(u, aten.linear.default) for u in other.users):
            return False
    return True


def _activation_stats(program: Program, inputs: list[fx.Node], ids: Tensor,
                      rows: int = 2) -> dict[fx.Node, tuple[Tensor, Tensor]]:
    """Per input node: ``mean |x|`` per channel ``[K]`` over all calibration tokens, and up to
    ``SAMPLE_TOKENS`` rows of ``x`` (evenly spaced) for the search."""
    wanted = set(inputs)
    sums: dict[fx.Node, Tensor] = {}
    samples: dict[fx.Node, list[Tensor]] = {n: [] for n in inputs}
    count = 0
    names = program.placeholder_names()
    n_batches = max(1, -(-ids.shape[0] // rows))
    for batch in batches(program, ids, rows):
        with torch.no_grad():
            values = record_values(program.gm, dict(zip(names, batch)), lambda n: n in wanted)
        for node, x in values.items():
            x2 = x.reshape(-1, x.shape[-1]).float()
            sums[node] = sums[node] + x2.abs().sum(0) if node in sums else x2.abs().sum(0)
            step = max(1, x2.shape[0] * n_batches // SAMPLE_TOKENS)
            samples[node].append(x2[::step])
        count += batch[0].numel()
    return {n: (sums[n] / count, torch.cat(samples[n], 0)[:SAMPLE_TOKENS]) for n in inputs}


@torch.no_grad()
def _search(weights: list[Tensor], formats: list[tuple[int, int]], sym: bool, mean_abs: Tensor,
            x_TK: Tensor) -> tuple[float, Tensor]:
    """The grid exponent ``a`` (and its scale vector ``s[K]``) with the least output error of the group."""
    ref = [x_TK @ w.float().T for w in weights]
    base = mean_abs.clamp(min=1e-8)
    best: tuple[float, float, Tensor] = (float("inf"), 0.0, torch.ones_like(base))
    for i in range(GRID + 1):
        alpha = i / GRID
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, (bits, group), y in zip(weights, formats, ref):
            w_q = quantize_rtn(w.float() * s[None, :], bits, group, sym).dequantize() / s[None, :]
            err += float((x_TK @ w_q.T - y).pow(2).sum())
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def _fold(gm: fx.GraphModule, x: fx.Node, members: list[fx.Node], s: Tensor) -> str:
    """Divide the input ``x`` of the group by ``s``: folded into its producer when only the group reads it,
    else an explicit ``mul(x, 1/s)``. Returns how (``rmsnorm``, ``layernorm``, ``up``, ``mul``)."""
    graph = gm.graph
    only_group = set(x.users) <= set(members)
    if only_group and is_call(x, aten.mul.Tensor):
        for w_node in x.args:
            w = weight_of(gm, w_node)
            if w is not None and w.dim() == 1 and w.shape[0] == s.shape[0] and len(w_node.users) == 1:  # type: ignore[union-attr]
                set_tensor(gm, str(w_node.target), (w / s).to(w.dtype))  # type: ignore[union-attr]
                return "rmsnorm"
        for up in x.args:
            if is_call(up, aten.linear.default) and len(up.users) == 1:  # type: ignore[union-attr]
                w_up = weight_of(gm, up.args[1])  # type: ignore[union-attr]
                if w_up is not None and w_up.shape[0] == s.shape[0]:
                    set_tensor(gm, str(up.args[1].target), (w_up / s[:, None]).to(w_up.dtype))  # type: ignore[union-attr]
                    bias = up.args[2] if len(up.args) > 2 else None  # type: ignore[union-attr]
                    if bias is not None:
                        set_tensor(gm, str(bias.target), get_tensor(gm, str(bias.target)) / s)  # type: ignore[union-attr]
                    return "up"
    if only_group and is_call(x, aten.layer_norm.default) and len(x.args) > 3:
        w_node, b_node = x.args[2], x.args[3]
        w, b = weight_of(gm, w_node), weight_of(gm, b_node)
        if w is not None and b is not None and len(w_node.users) == 1 and len(b_node.users) == 1:  # type: ignore[union-attr]
            set_tensor(gm, str(w_node.target), w / s)  # type: ignore[union-attr]
            set_tensor(gm, str(b_node.target), b / s)  # type: ignore[union-attr]
            return "layernorm"
    first = min(members, key=lambda n: list(graph.nodes).index(n))
    inv = add_weight(gm, graph, f"{members[0].args[1].target}_awq_inv_scale", (1.0 / s).float(), first)  # type: ignore[union-attr]
    with graph.inserting_before(first):
        scaled = graph.call_function(aten.mul.Tensor, (x, inv))
    scaled.meta = dict(x.meta)
    for node in members:
        node.replace_input_with(x, scaled)
    return "mul"
