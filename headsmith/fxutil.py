"""Small helpers over ``torch.fx`` graphs that every pass uses.

Weights live on the GraphModule as attributes reached by ``get_attr`` nodes (dotted targets such as
``model.model.layers.0.self_attn.q_proj.weight``). A pass edits a weight by storing a new tensor under a
target (never in place), so the program it came from keeps its own weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, fx

aten = torch.ops.aten

#: ops that only change the view of a tensor (walked through when following a value)
VIEW_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten._unsafe_view.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
})


def is_call(node: object, *targets: object) -> bool:
    """True if ``node`` is a ``call_function`` node whose target is one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def get_tensor(gm: fx.GraphModule, target: str) -> Tensor:
    """The tensor stored under the dotted ``target``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Tensor):
        raise TypeError(f"{target} is not a tensor but {type(obj).__name__}")
    return obj


def set_tensor(gm: fx.GraphModule, target: str, value: Tensor) -> None:
    """Store ``value`` under the dotted ``target``, creating intermediate modules as needed.

    Floating-point tensors become (frozen) parameters, others buffers. The old tensor is replaced,
    never modified, so clones of the program that shared it keep theirs.
    """
    *path, leaf = target.split(".")
    mod: torch.nn.Module = gm
    for part in path:
        child = getattr(mod, part, None)
        if child is None:
            child = torch.nn.Module()
            mod.add_module(part, child)
        mod = child
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    if value.is_floating_point():
        mod.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
    else:
        mod.register_buffer(leaf, value.detach())


def fresh_target(gm: fx.GraphModule, base: str) -> str:
    """A dotted attribute name derived from ``base`` that is not used on ``gm`` yet."""
    candidate, i = base, 0
    while _has_target(gm, candidate):
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def _has_target(gm: fx.GraphModule, target: str) -> bool:
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def add_weight(gm: fx.GraphModule, graph: fx.Graph, base: str, value: Tensor,
               before: fx.Node) -> fx.Node:
    """Store ``value`` under a fresh name near ``base`` and return a ``get_attr`` node for it."""
    target = fresh_target(gm, base)
    set_tensor(gm, target, value)
    with graph.inserting_before(before):
        node = graph.get_attr(target)
    node.meta["val"] = value
    return node


def weight_of(gm: fx.GraphModule, node: object) -> Tensor | None:
    """The tensor behind a ``get_attr`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    return get_tensor(gm, str(node.target))


def clone_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph and module tree, sharing the weight tensors."""
    memo: dict[int, Any] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(gm, memo)


def descendants(node: fx.Node) -> list[fx.Node]:
    """Every node that depends on ``node`` (itself excluded)."""
    seen: dict[fx.Node, None] = {}
    todo = [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen[user] = None
                todo.append(user)
    return list(seen)


def ancestors(nodes: Iterable[fx.Node], stop: Callable[[fx.Node], bool] | None = None) -> set[fx.Node]:
    """All nodes the given nodes depend on (themselves included); ``stop`` nodes are not expanded."""
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop is not None and stop(n):
            continue
        todo.extend(n.all_input_nodes)
    return seen


def evaluate(gm: fx.GraphModule, outputs: Sequence[fx.Node], inputs: dict[str, Tensor]) -> list[Any]:
    """Run only the part of ``gm``'s graph that ``outputs`` depend on; placeholders come from ``inputs``."""
    needed = ancestors(outputs)
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            env[node] = inputs[node.name]
        elif node.op == "get_attr":
            env[node] = get_tensor(gm, str(node.target))
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
        elif node.op == "call_module":
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = gm.get_submodule(str(node.target))(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate node {node.format_node()}")
    return [env[o] for o in outputs]


def record_values(gm: fx.GraphModule, inputs: dict[str, Tensor],
                  keep: Callable[[fx.Node], bool]) -> dict[fx.Node, Any]:
    """Run the whole graph once and return the values of the nodes for which ``keep`` is true."""
    kept: dict[fx.Node, Any] = {}
    env: dict[fx.Node, Any] = {}
    remaining = {n: len(n.users) for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = inputs[node.name]
        elif node.op == "get_attr":
            env[node] = get_tensor(gm, str(node.target))
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
        elif node.op == "output":
            break
        else:
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = gm.get_submodule(str(node.target))(*args, **kwargs)
        if keep(node):
            kept[node] = env[node]
        for inp in node.all_input_nodes:
            remaining[inp] -= 1
            if remaining[inp] == 0 and inp in env:
                del env[inp]
    return kept


def shape_of(node: object) -> tuple[int, ...] | None:
    """The static shape recorded in ``node.meta['val']`` if every dim is an int, else None."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if not isinstance(val, Tensor):
        return None
    dims: list[int] = []
    for d in val.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def rank_of(node: object) -> int | None:
    """The rank recorded in ``node.meta['val']`` (symbolic dims allowed), else None."""
    if not isinstance(node, fx.Node) or not isinstance(node.meta.get("val"), Tensor):
        return None
    return node.meta["val"].dim()


def last_dim_of(node: object) -> int | None:
    """The size of the last dim recorded in ``node.meta['val']`` if it is static, else None."""
    if not isinstance(node, fx.Node) or not isinstance(node.meta.get("val"), Tensor):
        return None
    d = node.meta["val"].shape[-1]
    return d if isinstance(d, int) else None


def format_near(node: fx.Node, radius: int = 3) -> str:
    """A few lines of the printed graph around ``node`` (for error messages)."""
    nodes = list(node.graph.nodes)
    i = nodes.index(node)
    lines = []
    for j in range(max(0, i - radius), min(len(nodes), i + radius + 1)):
        mark = ">>" if j == i else "  "
        text = nodes[j].format_node() or nodes[j].name
        lines.append(f"    {mark} {text[:160]}")
    return "\n".join(lines)


def module_path(node: fx.Node) -> str:
    """The innermost module path torch.export recorded for ``node`` ('' if none)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def erase_dead(graph: fx.Graph) -> int:
    """Dead-code elimination that also removes the side-effect-free assertion ops export inserts."""
    removable = {aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}
    count = 0
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output"):
            continue
        if node.users:
            continue
        if node.op == "call_function" and node.target in removable:
            graph.erase_node(node)
            count += 1
            continue
        if node.op == "call_function" and getattr(node.target, "_schema", None) is not None:
            if node.target._schema.is_mutable:  # type: ignore[union-attr]
                continue
        if node.op == "call_module":
            continue
        if node.op == "call_function" and node.target in (torch._assert, torch.ops.aten._assert_async.msg):
            continue
        if node.op == "call_function" and str(node.target).startswith("_guards"):
            continue
        graph.erase_node(node)
        count += 1
    return count


def prune_unused_attrs(gm: fx.GraphModule) -> None:
    """Drop weights that no ``get_attr`` node references any more."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        *path, leaf = name.split(".")
        mod: torch.nn.Module = gm
        for part in path:
            mod = getattr(mod, part)
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        elif leaf in mod._buffers:
            del mod._buffers[leaf]
