"""Importance scores for structured pruning, measured on calibration text.

Letters: B batch, S sequence, H query heads, G KV heads, D head dim, E model width, I MLP width, L blocks,
N calibration tokens.

What is scored (blocks, MLPs) is found by :mod:`headsmith.passes.structure`.

**Scores** (higher means more important; every function takes calibration token rows ``ids[N/S, S]``):

- heads, ``gradient`` (Michel et al., *Are Sixteen Heads Really Better than One?*): a gate ``ξ_h = 1`` multiplies
  each head's attention output (inserted while interpreting the graph, the program is not changed);
  ``I_h = E_x |∂L(x)/∂ξ_h|`` over calibration rows ``x``, ``L`` the model's own next-token loss. Encoders have no
  such loss: ``L = <r, f(x)>`` for a Gaussian probe ``r`` per row over the hidden states ``f``, so that
  ``E|∂L/∂ξ_h| ∝ E ‖∂f/∂ξ_h‖`` (the first-order change of the output when the head is scaled);
- heads, ``norm``: ``E_tokens ‖W_o,h · out_h‖``, the norm of the head's contribution to the residual stream;
- layers, ``influence`` (ShortGPT's Block Influence): ``1 − E_tokens cos(x_in, x_out)``;
- layers, ``angular`` (Gromov et al., *The Unreasonable Ineffectiveness of the Deeper Layers*):
  ``d(ℓ, ℓ+n) = E_tokens arccos(cos(x_ℓ, x_ℓ+n)) / π`` between the inputs of blocks ``ℓ`` and ``ℓ+n``; the
  ``n``-block span with the smallest distance is the one to drop (all tokens are averaged, not just the last);
- layers, ``ppl`` (MultiPruner's block step): greedy, each step drops the block whose removal gives the lowest
  calibration perplexity (:func:`greedy_ppl`);
- MLP channels, ``wanda`` (structured Wanda): ``Σ_up Σ_i |W_up[j,i]| ‖x_i‖ + ‖h_j‖ Σ_o |W_down[o,j]|`` with
  ``‖·‖`` the norm over calibration tokens of the MLP input ``x`` and the down projection's input ``h``;
- ``random``: seeded uniform scores (the baseline every score is judged against).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import PassError
from ..fxutil import get_tensor, record_values
from ..program import Program
from ..sites import AttentionSite
from .calib import batches
from .structure import Block, Mlp, find_blocks, find_mlps

aten = torch.ops.aten

HEAD_SCORES = ("gradient", "norm", "random")
LAYER_SCORES = ("angular", "influence", "ppl", "random")
MLP_SCORES = ("wanda", "random")



# ---- heads ------------------------------------------------------------------------------------------
def head_scores(program: Program, ids: Tensor, method: str, seed: int = 0, rows: int = 2) -> dict[int, Tensor]:
    """Per attention site (by ``site.layer``), one score per query head ``[H]``."""
    sites = program.sites()
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return {s.layer: torch.rand(s.n_heads, generator=g, dtype=torch.float64) for s in sites}
    if method == "norm":
        return _head_norms(program, sites, ids, rows)
    if method == "gradient":
        return _head_gradients(program, sites, ids, seed, rows)
    raise PassError(f"unknown head score {method!r}", f"choose one of {', '.join(HEAD_SCORES)}")


@torch.no_grad()
def _head_norms(program: Program, sites: list[AttentionSite], ids: Tensor, rows: int) -> dict[int, Tensor]:
    totals = {s.layer: torch.zeros(s.n_heads, dtype=torch.float64) for s in sites}
    tokens = 0
    wanted = {s.node for s in sites}
    names = program.placeholder_names()
    for inputs in batches(program, ids, rows):
        values = record_values(program.gm, dict(zip(names, inputs)), lambda n: n in wanted)
        for s in sites:
            out_BHSD = values[s.node]
            if s.o is not None:
                w_o = get_tensor(program.gm, s.o.weight)
                w_EHD = w_o.reshape(w_o.shape[0], s.n_heads, out_BHSD.shape[-1]).to(out_BHSD.dtype)
                norms_BHS = torch.einsum("bhsd,ehd->bhse", out_BHSD, w_EHD).norm(dim=-1)
            else:
                norms_BHS = out_BHSD.norm(dim=-1)
            totals[s.layer] += norms_BHS.double().sum((0, 2))
        tokens += inputs[0].numel()
    return {k: v / max(tokens, 1) for k, v in totals.items()}


class _Gated(fx.Interpreter):
    """Interprets a graph with ``out * gate`` after chosen nodes (the program itself is not changed)."""

    def __init__(self, gm: fx.GraphModule, gates: dict[fx.Node, Tensor]) -> None:
        super().__init__(gm)
        self.gates = gates

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        gate = self.gates.get(n)
        return out if gate is None else out * gate


def _head_gradients(program: Program, sites: list[AttentionSite], ids: Tensor, seed: int,
                    rows: int) -> dict[int, Tensor]:
    totals = {s.layer: torch.zeros(s.n_heads, dtype=torch.float64) for s in sites}
    count = 0
    g = torch.Generator().manual_seed(seed)
    for ids_b, pos_b, mask_b in batches(program, ids, rows):
        b = ids_b.shape[0]
        gates = {s.node: torch.ones(b, s.n_heads, 1, 1, requires_grad=True) for s in sites}
        with torch.enable_grad():
            out = _Gated(program.gm, gates).run(ids_b, pos_b, mask_b)
            loss = _row_loss(out, ids_b, mask_b, program.info.task, g).sum()
            grads = torch.autograd.grad(loss, list(gates.values()))
        for s, grad in zip(sites, grads):
            totals[s.layer] += grad.detach().abs().double().reshape(b, -1).sum(0)
        count += b
    return {k: v / max(count, 1) for k, v in totals.items()}


def _row_loss(out: Tensor, ids: Tensor, mask: Tensor, task: str, g: torch.Generator) -> Tensor:
    """Per row: mean next-token cross-entropy (causal LMs), or a random projection of the hidden states."""
    valid = mask.bool()
    if task == "encoder":
        probe = torch.randn(out.shape, generator=g, dtype=out.dtype)
        return (out * probe * valid[..., None]).sum((1, 2)) / valid.sum(1).clamp(min=1)
    logp = torch.log_softmax(out[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    both = valid[:, 1:] & valid[:, :-1]
    return (nll * both).sum(1) / both.sum(1).clamp(min=1)


# ---- layers -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerScores:
    influence: Tensor
    """``[L]`` Block Influence ``1 − E cos(x_in, x_out)``."""
    angular: Tensor
    """``[L+1, L+1]`` angular distance between boundary states (``x_in`` of each block, then the last
    ``x_out``); ``angular[ℓ, ℓ+n]`` is the distance across the span of blocks ``ℓ .. ℓ+n-1``."""

    def span(self, n: int) -> Tensor:
        """``[L-n+1]``: the angular distance across each span of ``n`` blocks, by first block."""
        size = self.angular.shape[0]
        return torch.stack([self.angular[i, i + n] for i in range(size - n)])


def boundaries(blocks: Sequence[Block]) -> list[fx.Node]:
    return [b.x_in for b in blocks] + [blocks[-1].x_out]


@torch.no_grad()
def layer_scores(program: Program, ids: Tensor, blocks: Sequence[Block] | None = None, rows: int = 2) -> LayerScores:
    """Block influence and the angular-distance matrix of ``program``'s blocks on ``ids``."""
    blocks = list(blocks) if blocks is not None else find_blocks(program)
    if not blocks:
        raise PassError("no transformer blocks found (no node has a numbered module path)",
                        "layer scores need the nn_module_stack metadata torch.export records")
    states = boundaries(blocks)
    wanted = set(states) | {b.x_out for b in blocks}
    n = len(states)
    cos_sum = torch.zeros(len(blocks), dtype=torch.float64)
    ang_sum = torch.zeros(n, n, dtype=torch.float64)
    tokens = 0
    names = program.placeholder_names()
    for inputs in batches(program, ids, rows):
        values = record_values(program.gm, dict(zip(names, inputs)), lambda v: v in wanted)
        valid = inputs[2].bool().reshape(-1)
        unit = {node: torch.nn.functional.normalize(values[node].reshape(-1, values[node].shape[-1])[valid].double(),
                                                    dim=-1) for node in wanted}
        for b in blocks:
            cos_sum[b.index] += (unit[b.x_in] * unit[b.x_out]).sum(-1).sum()
        for i in range(n):
            for j in range(i + 1, n):
                cos = (unit[states[i]] * unit[states[j]]).sum(-1).clamp(-1.0, 1.0)
                ang_sum[i, j] += torch.arccos(cos).sum() / math.pi
        tokens += int(valid.sum())
    angular = ang_sum / max(tokens, 1)
    return LayerScores(influence=1.0 - cos_sum / max(tokens, 1), angular=angular + angular.T)


class BlockRunner:
    """Runs a program with some blocks bypassed (their output is their input), optionally from the input of a
    given block on (the values before it are given), freeing each value after its last use."""

    def __init__(self, program: Program, blocks: Sequence[Block]) -> None:
        self.gm = program.gm
        self.blocks = list(blocks)
        self.nodes = list(program.gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.block_of = {n: b.index for b in self.blocks for n in b.nodes}
        dynamic: set[fx.Node] = set()
        for n in self.nodes:
            if n in self.block_of or any(a in dynamic for a in n.all_input_nodes):
                dynamic.add(n)
        self.dynamic = dynamic
        self.output = program.gm.graph.output_node()
        self.first = {b.index: min(self.position[n] for n in b.nodes) for b in self.blocks}
        self.startable = {b.index: self._startable(b) for b in self.blocks}

    def _startable(self, block: Block) -> bool:
        """Whether the only value computed before ``block`` that later nodes read is its input."""
        begin = self.first[block.index]
        for n in self.nodes[begin:]:
            for a in n.all_input_nodes:
                if a in self.dynamic and self.position[a] < begin and a is not block.x_in:
                    return False
        return True

    def static(self, inputs: Sequence[Tensor]) -> dict[fx.Node, Any]:
        """The values that do not depend on any block (tables, masks, the embedding), for one batch."""
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n in self.dynamic or n.op == "output":
                continue
            else:
                env[n] = self._exec(n, env, lambda a: a)
        return env

    def _exec(self, n: fx.Node, env: dict[fx.Node, Any], resolve: Callable[[fx.Node], fx.Node]) -> Any:
        if n.op == "get_attr":
            return get_tensor(self.gm, str(n.target))
        args = fx.node.map_arg(n.args, lambda a: env[resolve(a)])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[resolve(a)])
        if n.op == "call_function":
            return n.target(*args, **kwargs)  # type: ignore[operator]
        return self.gm.get_submodule(str(n.target))(*args, **kwargs)

    def run(self, static: dict[fx.Node, Any], removed: frozenset[int] | set[int], start: int = 0,
            state: Tensor | None = None, keep: Sequence[fx.Node] = ()) -> tuple[Any, dict[fx.Node, Any]]:
        """The graph output with ``removed`` blocks bypassed, and the values of ``keep`` (resolved through the
        bypasses). With ``start > 0``, ``state`` is the input of block ``start`` and earlier blocks are not run."""
        alias = {b.x_out: b.x_in for b in self.blocks if b.index in removed}

        def resolve(a: fx.Node) -> fx.Node:
            while a in alias:
                a = alias[a]
            return a

        env = dict(static)
        begin = 0
        if start > 0:
            if not self.startable[start] or state is None:
                raise ValueError(f"cannot start at block {start}")
            env[resolve(self.blocks[start].x_in)] = state
            begin = self.first[start]
        todo = [n for n in self.nodes[begin:] if n in self.dynamic and n.op != "output"
                and self.block_of.get(n, -1) not in removed]
        wanted = {resolve(k) for k in keep}
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate([*todo, self.output]):
            for a in n.all_input_nodes:
                last_use[resolve(a)] = i
        kept: dict[fx.Node, Any] = {}
        for i, n in enumerate(todo):
            env[n] = self._exec(n, env, resolve)
            if n in wanted:
                kept[n] = env[n]
            for a in n.all_input_nodes:
                r = resolve(a)
                if last_use.get(r) == i and r in env:
                    del env[r]
        out = fx.node.map_arg(self.output.args[0], lambda a: env[resolve(a)])
        return out, {k: kept[resolve(k)] for k in keep if resolve(k) in kept}


def token_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of scored tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(nll.double().sum()), nll.numel()


def greedy_ppl(program: Program, ids: Tensor, n: int, blocks: Sequence[Block] | None = None, rows: int = 2,
               progress: Callable[[str], None] | None = None) -> list[tuple[int, float]]:
    """MultiPruner's block step: ``n`` times, drop the block whose removal gives the lowest calibration
    perplexity. Returns ``(block index, perplexity after dropping it)`` in removal order."""
    if program.info.task != "causal-lm":
        raise PassError(f"score=ppl needs a causal LM; {program.info.architecture} is an encoder",
                        "use score=angular or score=influence")
    blocks = list(blocks) if blocks is not None else find_blocks(program)
    runner = BlockRunner(program, blocks)
    inputs = list(batches(program, ids, rows))
    statics = [runner.static(x) for x in inputs]
    removed: set[int] = set()
    order: list[tuple[int, float]] = []
    for _ in range(n):
        candidates = [b.index for b in blocks if b.index not in removed]
        nll = dict.fromkeys(candidates, 0.0)
        count = 0
        for x, static in zip(inputs, statics):
            with torch.no_grad():
                _, states = runner.run(static, removed, keep=[blocks[j].x_in for j in candidates])
                for j in candidates:
                    state = states.get(blocks[j].x_in)
                    start = j if runner.startable[j] and j > 0 and state is not None else 0
                    logits, _ = runner.run(static, removed | {j}, start, state if start else None)
                    nll[j] += token_nll(logits, x[0])[0]
            count += x[0][:, 1:].numel()
        best = min(candidates, key=lambda j: nll[j])
        removed.add(best)
        order.append((best, math.exp(nll[best] / max(count, 1))))
        if progress is not None:
            progress(f"ppl: dropping block {best} -> calibration perplexity {order[-1][1]:.2f}")
    return order


# ---- MLP channels -----------------------------------------------------------------------------------
@torch.no_grad()
def mlp_scores(program: Program, ids: Tensor, method: str, mlps: Sequence[Mlp] | None = None, seed: int = 0,
               rows: int = 2) -> list[Tensor]:
    """One score per intermediate channel ``[I]`` for each MLP (in ``find_mlps`` order)."""
    mlps = list(mlps) if mlps is not None else find_mlps(program)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(m.width, generator=g, dtype=torch.float64) for m in mlps]
    if method != "wanda":
        raise PassError(f"unknown MLP score {method!r}", f"choose one of {', '.join(MLP_SCORES)}")
    wanted = {n for m in mlps for n in (m.x, m.h)}
    sq = {n: torch.zeros(0, dtype=torch.float64) for n in wanted}
    names = program.placeholder_names()
    for inputs in batches(program, ids, rows):
        values = record_values(program.gm, dict(zip(names, inputs)), lambda v: v in wanted)
        valid = inputs[2].bool().reshape(-1)
        for node in wanted:
            v = values[node].reshape(-1, values[node].shape[-1])[valid].double()
            s = v.pow(2).sum(0)
            sq[node] = s if sq[node].numel() == 0 else sq[node] + s
    out = []
    for m in mlps:
        x_norm, h_norm = sq[m.x].sqrt(), sq[m.h].sqrt()
        score = h_norm * get_tensor(program.gm, m.down.weight).double().abs().sum(0)
        for up, k in zip(m.ups, m.parts):
            per_row = get_tensor(program.gm, up.weight).double().abs() @ x_norm
            score = score + per_row.reshape(k, m.width).sum(0)
        out.append(score)
    return out


# ---- inspect ----------------------------------------------------------------------------------------
def calibration_rows(program: Program, ctx: Any, tokens: int) -> Tensor:
    """The first ``tokens`` tokens of ``ctx``'s calibration rows (at least one row)."""
    calib = ctx.calibration(program)
    return calib[: max(1, tokens // calib.shape[1])]
