"""The structure that structured pruning (and other passes) edits: transformer blocks and MLPs.

Letters: E model width, I MLP width.

**Structure** is derived from the graph every time, like attention sites, so it cannot go stale:

- :func:`find_blocks`: the transformer blocks. Nodes are grouped by the first numbered module of their
  ``nn_module_stack`` path (``model.model.layers.3``; the container with the most nodes wins); nodes a pass
  inserted without that metadata join the block all of their users belong to. A block has exactly one value
  leaving it, ``x_out`` (the residual stream after it), and reads ``x_in``: the previous block's output, or
  for the first block the one outside value of ``x_out``'s shape. Removing a block is
  ``x_out.replace_all_uses_with(x_in)``::

      x_in ─ norm ─ attention ─ add ─ norm ─ mlp ─ add ─ x_out ─ (next block)
      x_in ─────────────────────────────────────────────────────  (next block)     # block removed

- :func:`find_mlps`: MLPs ``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``: a linear whose input
  is computed from one or two linears of one common input by elementwise ops only. Channel ``j`` is row ``j``
  of every up projection (and its bias) and column ``j`` of the down projection.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import PassError
from ..fxutil import ancestors, format_near, get_tensor, is_call, module_path
from ..program import Program
from ..sites import LINEAR, Projection, nearest_linears

aten = torch.ops.aten

#: ops that act on each channel of the last dim independently (MLP activations and their pieces)
ELEMENTWISE = frozenset({
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.rsub.Scalar,
    aten.div.Tensor, aten.neg.default, aten.pow.Tensor_Scalar, aten.silu.default, aten.gelu.default,
    aten.relu.default, aten.sigmoid.default, aten.tanh.default, aten.erf.default, aten.exp.default,
    aten.to.dtype, aten._to_copy.default, aten.clone.default,
})

_NUMBERED = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)(?=\.|$)")


# ---- structure: blocks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One transformer block: its nodes, the residual value it reads and the one it produces."""

    index: int
    """Position among the program's blocks (0 .. L-1)."""
    path: str
    """The module path of the block (``model.model.layers.3``); its weights live under it."""
    container: str
    """The module path of the block list (``model.model.layers``)."""
    nodes: frozenset[fx.Node]
    x_in: fx.Node
    x_out: fx.Node


def _block_key(node: fx.Node) -> tuple[str, int] | None:
    m = _NUMBERED.match(module_path(node))
    return (m.group("container"), int(m.group("index"))) if m is not None else None


def find_blocks(program: Program) -> list[Block]:
    """The blocks of ``program`` in graph order (see the module docstring); [] if no node has a block path."""
    nodes = list(program.gm.graph.nodes)
    tags = {n: k for n in nodes if n.op == "call_function" and (k := _block_key(n)) is not None}
    if not tags:
        return []
    container = Counter(c for c, _ in tags.values()).most_common(1)[0][0]
    tags = {n: k for n, k in tags.items() if k[0] == container}
    for n in reversed(nodes):  # inserted nodes without metadata join the block of their users
        if n.op != "call_function" or n in tags or not n.users or n.meta.get("nn_module_stack"):
            continue
        user_tags = {tags.get(u) for u in n.users}
        if len(user_tags) == 1 and None not in user_tags:
            tags[n] = user_tags.pop()  # type: ignore[assignment]
    members: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n in tags:
            members.setdefault(tags[n][1], []).append(n)
    shapes = program.shapes()
    blocks: list[Block] = []
    previous: fx.Node | None = None
    for position, number in enumerate(members):  # dicts keep the order of first appearance (graph order)
        inside = frozenset(members[number])
        leaving = [n for n in members[number] if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            names = ", ".join(n.name for n in leaving[:4])
            raise PassError(f"block {container}.{number} has {len(leaving)} values leaving it ({names}), expected "
                            f"exactly one (its output on the residual stream)\n{format_near(leaving[0]) if leaving else ''}",
                            "structured layer pruning needs a plain stack of residual blocks")
        x_out = leaving[0]
        external = list(dict.fromkeys(a for n in members[number] for a in n.all_input_nodes
                                      if a not in inside and a.op != "get_attr"))
        if previous is not None and previous in external:
            x_in = previous
        else:
            same = [a for a in external if shapes.get(a) == shapes.get(x_out)]
            if len(same) != 1:
                raise PassError(f"block {container}.{number}: cannot tell its residual input among "
                                f"{len(same)} outside values of shape {shapes.get(x_out)}\n{format_near(x_out)}")
            x_in = same[0]
        if shapes.get(x_in) != shapes.get(x_out):
            raise PassError(f"block {container}.{number} maps shape {shapes.get(x_in)} to {shapes.get(x_out)}: it is "
                            "not a residual block")
        blocks.append(Block(position, f"{container}.{number}", container, inside, x_in, x_out))
        previous = x_out
    return blocks


# ---- structure: MLPs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mlp:
    """One MLP: up projections (gate and up, or just up) whose rows are channels, a down projection whose
    columns are channels, and the elementwise ops between them."""

    layer: int
    """The block number of its module path (-1 if none)."""
    ups: tuple[Projection, ...]
    parts: tuple[int, ...]
    """Per up projection, how many channel groups its rows hold: 1, or ``k`` for a fused projection cut by
    ``chunk(linear, k, -1)`` (Phi-3's ``gate_up_proj``): channel ``j`` is rows ``j, j + I, ..``."""
    down: Projection
    width: int
    x: fx.Node
    """The input of the up projections."""
    h: fx.Node
    """The input of the down projection ``[B,S,I]``."""

    def rows(self, part_count: int, channels: Tensor) -> Tensor:
        """The weight rows of an up projection with ``part_count`` parts that hold ``channels``."""
        return torch.cat([channels + c * self.width for c in range(part_count)])


def find_mlps(program: Program) -> list[Mlp]:
    """Every MLP of ``program`` in graph order (see the module docstring)."""
    shapes = program.shapes()
    out: list[Mlp] = []
    for node in program.gm.graph.nodes:
        if not is_call(node, LINEAR):
            continue
        mlp = _match_mlp(program.gm, node, shapes)
        if mlp is not None:
            out.append(mlp)
    return out


def _chunks(up: fx.Node, shapes: dict[fx.Node, tuple[int, ...]]) -> int:
    """``k`` if the only user of ``up`` is ``chunk(up, k, last dim)``, else 1."""
    users = list(up.users)
    if len(users) != 1 or not is_call(users[0], aten.chunk.default):
        return 1
    dim = users[0].args[2] if len(users[0].args) > 2 else users[0].kwargs.get("dim", 0)
    rank = len(shapes.get(up, ()))
    return int(users[0].args[1]) if dim in (-1, rank - 1) else 1  # type: ignore[arg-type]


# down(act(gate(x)) * up(x)) | down(act(up(x))) | down(g(chunk(gate_up(x), 2, -1)))  (elementwise between)
def _match_mlp(gm: fx.GraphModule, down: fx.Node, shapes: dict[fx.Node, tuple[int, ...]]) -> Mlp | None:
    h = down.args[0]
    down_proj = Projection.of(down)
    if down_proj is None or not isinstance(h, fx.Node) or h.op != "call_function" or is_call(h, LINEAR):
        return None
    ups = nearest_linears(h)
    if not 1 <= len(ups) <= 2:
        return None
    projections = [Projection.of(u) for u in ups]
    x = ups[0].args[0]
    if any(p is None for p in projections) or any(u.args[0] is not x for u in ups):
        return None
    width = shapes.get(h, ())[-1:]
    if not width:
        return None
    region = ancestors([h], lambda n: n in ups or n.op in ("get_attr", "placeholder")) - set(ups)
    for n in region:
        if n.op == "get_attr":
            if get_tensor(gm, str(n.target)).numel() != 1:
                return None
            continue
        if is_call(n, aten.chunk.default):
            if n.args[0] not in ups or _chunks(n.args[0], shapes) == 1:  # type: ignore[arg-type]
                return None
        elif n.op == "call_function" and n.target is operator.getitem:
            if not is_call(n.args[0], aten.chunk.default) or shapes.get(n, ())[-1:] != width:
                return None
        elif not is_call(n, *ELEMENTWISE) or shapes.get(n, ())[-1:] != width:
            return None
        if any(u not in region and u is not down for u in n.users):
            return None
    if any(u not in region for up in ups for u in up.users):
        return None
    i = width[0]
    parts = tuple(_chunks(u, shapes) for u in ups)
    w_down = get_tensor(gm, down_proj.weight)
    if w_down.dim() != 2 or w_down.shape[1] != i:
        return None
    if any(get_tensor(gm, p.weight).shape[0] != k * i for p, k in zip(projections, parts) if p is not None):
        return None
    key = _block_key(down)
    return Mlp(key[1] if key is not None else -1, tuple(p for p in projections if p is not None), parts,
               down_proj, i, x, h)  # type: ignore[arg-type]


def refresh_values(gm: fx.GraphModule) -> None:
    """Recompute every node's ``meta['val']`` (fake tensors over the placeholders' symbolic sizes) after weights
    changed shape, so code that reads shapes from the metadata (ONNX lowering) sees the pruned sizes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    if not placeholders or not all(isinstance(v, FakeTensor) for v in vals):
        return
    FakeTensorProp(gm, vals[0].fake_mode).propagate_dont_convert_inputs(*vals)  # type: ignore[union-attr]
