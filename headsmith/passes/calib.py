"""Calibration helpers shared by the lossy passes: recorded activations and attention sublayers.

- :func:`record` runs a program on calibration token batches and returns the values of chosen nodes,
  concatenated over batches (flattened to ``[tokens, features]`` where asked);
- :func:`sublayer` cuts the attention sublayer of a site out of the graph as its own GraphModule,
  ``(x_BSE, position_ids, attention_mask) -> o_BSE`` (from the input of the q/k/v projections to the output of
  the o projection, RoPE and norms included), so a pass can fit one layer's new weights to the original
  layer's output without running the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, fx

from ..fxutil import ancestors, get_tensor, record_values
from ..program import Program
from ..sites import AttentionSite


def batches(program: Program, ids: Tensor, rows: int = 2) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    for i in range(0, ids.shape[0], rows):
        chunk = ids[i:i + rows]
        yield program.make_inputs(chunk)


def record(program: Program, nodes: Sequence[fx.Node], ids: Tensor, rows: int = 2) -> list[Tensor]:
    """The values of ``nodes`` over all calibration rows, concatenated along the batch dim."""
    wanted = set(nodes)
    out: dict[fx.Node, list[Tensor]] = {n: [] for n in nodes}
    names = program.placeholder_names()
    for inputs in batches(program, ids, rows):
        with torch.no_grad():
            values = record_values(program.gm, dict(zip(names, inputs)), lambda n: n in wanted)
        for n in nodes:
            out[n].append(values[n])
    return [torch.cat(out[n], 0) for n in nodes]


def sublayer(program: Program, site: AttentionSite) -> tuple[fx.GraphModule, list[str]]:
    """The attention sublayer of ``site`` as ``gm(x, position_ids, attention_mask) -> o``.

    Returns the module and the weight targets it reads (the module holds the same tensors, so a pass
    can swap in trainable copies with :func:`fxutil.set_tensor`).
    """
    if site.o is None:
        raise ValueError(f"layer {site.layer}: no output projection found")
    x = site.q.node.args[0]
    assert isinstance(x, fx.Node)
    out = site.o.node
    inputs = {n.name: n for n in program.gm.graph.nodes if n.op == "placeholder"}
    needed = ancestors([out], stop=lambda n: n is x)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    env[x] = graph.placeholder("x")
    for name in ("input_ids", "position_ids", "attention_mask"):
        env[inputs[name]] = graph.placeholder(name)
    targets: list[str] = []
    root = torch.nn.Module()
    from ..fxutil import set_tensor
    holder = fx.GraphModule(root, fx.Graph())
    for node in program.gm.graph.nodes:
        if node not in needed or node in env:
            continue
        if node.op == "get_attr":
            set_tensor(holder, str(node.target), get_tensor(program.gm, str(node.target)))
            targets.append(str(node.target))
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    gm = fx.GraphModule(holder, graph)
    return gm, targets


def run_sublayer(gm: fx.GraphModule, x: Tensor, ids_like: Tensor, mask: Tensor | None = None) -> Tensor:
    b, s = ids_like.shape[:2]
    pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    if mask is None:
        mask = torch.ones(b, s, dtype=torch.int64)
    ids = torch.zeros(b, s, dtype=torch.int64)
    return gm(x, ids, pos, mask)


def trainable(gm: fx.GraphModule, targets: Sequence[str]) -> list[torch.nn.Parameter]:
    """Replace ``targets`` on ``gm`` by trainable copies and return them."""
    params: list[torch.nn.Parameter] = []
    for t in targets:
        value = get_tensor(gm, t).detach().clone()
        *path, leaf = t.split(".")
        mod: Any = gm
        for part in path:
            mod = getattr(mod, part)
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        p = torch.nn.Parameter(value, requires_grad=True)
        mod.register_parameter(leaf, p)
        params.append(p)
    return params
