"""DuoAttention's gates (Xiao et al., 2024): which KV heads need the full cache, learnt by distillation.

Letters: B rows, S sequence, H query heads, G KV heads, r = H / G, A answer tokens, V vocabulary.

Every KV head ``g`` of every layer gets a gate ``α_g ∈ [0, 1]`` that mixes its query heads' full attention with
the streaming pattern (the first ``S`` keys and the last ``W``)::

    out_h = α_g · attention(q_h, K_g, V_g)  +  (1 − α_g) · attention(q_h, K_g, V_g, window=W, sinks=S)

All weights stay frozen; only the gates train, from ``α = 1`` (the model itself), on synthetic retrieval rows
(passkey prompts whose haystack is the calibration text, ending in their key: ``corpus.retrieval_samples``). The
loss distils the full model on the answer: ``KL(p_full || p_gated)`` of the next-token distributions at the
positions that predict the key, plus ``λ · mean(α)``, which pushes every gate towards streaming, so only the
heads the answer needs keep a large gate (Adam, the gates clipped to [0, 1] after each step). Duo distils the
last hidden states with an L2 loss over 2000 steps; here the KL on the answer's tokens gives the signal in far
fewer steps, which a pass run on two CPU cores needs. The heads are then ranked by their final gate (ties between
gates clipped to the same bound by the distillation's accumulated pull ``Σ |∂KL/∂α|``), and ``sparse-attention``
keeps the top ones, within its KV budget, as retrieval heads.

The mixing runs while interpreting the graph (the program is not changed); each attention op runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ..program import Program
from ..sites import ATTENTION


@dataclass(frozen=True)
class DuoGates:
    """Per layer: the trained gate of each KV head ``[G]`` and the distillation's accumulated pull on it."""

    layers: list[int]
    gates: list[Tensor]
    pull: list[Tensor]
    losses: list[float]
    """The distillation loss (KL, nats per answer token) at each step."""

    def kv_scores(self) -> list[Tensor]:
        """``[G]`` per layer, ordered like the ranking (gate first, pull breaking ties)."""
        top = max(float(torch.cat(self.pull).max()), 1e-30)
        return [g.round(decimals=3) + 1e-4 * p / top for g, p in zip(self.gates, self.pull)]


class _Mixed(fx.Interpreter):
    """Interprets a graph with each gated attention op replaced by its gate's mix of full and streaming."""

    def __init__(self, gm: fx.GraphModule, gates: dict[fx.Node, Tensor], window: int, sinks: int) -> None:
        super().__init__(gm)
        self.gates, self.window, self.sinks = gates, window, sinks

    def run_node(self, n: fx.Node) -> Any:
        gate = self.gates.get(n)
        if gate is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        old = int(kwargs.get("window", 0))
        stream_kw = {**kwargs, "window": min(old, self.window) if old > 0 else self.window, "sinks": self.sinks}
        full, stream = ATTENTION(*args, **kwargs), ATTENTION(*args, **stream_kw)
        alpha = gate.clamp(0, 1).repeat_interleave(full.shape[1] // gate.numel())[None, :, None, None]
        return stream + alpha * (full - stream)


def duo_gates(program: Program, ids: Tensor, answer_len: int, window: int, sinks: int, steps: int = 32,
              lr: float = 0.05, reg: float = 0.05) -> DuoGates:
    """Train the gates on the retrieval rows ``ids[N, S]`` whose last ``answer_len`` tokens are the answer."""
    sites = [s for s in program.sites() if s.causal]
    gates = {s.node: torch.ones(s.n_kv_heads, requires_grad=True) for s in sites}
    pull = {n: torch.zeros(g.numel()) for n, g in gates.items()}
    answer = slice(ids.shape[1] - answer_len - 1, ids.shape[1] - 1)  # the positions that predict the answer
    teacher = []
    with torch.no_grad():
        for row in ids:
            logits = program.gm(*program.make_inputs(row[None]))
            teacher.append(torch.log_softmax(logits[:, answer].float(), -1))
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    count = sum(g.numel() for g in gates.values())
    losses = []
    for step in range(steps):
        i = step % ids.shape[0]
        opt.zero_grad()
        with torch.enable_grad():
            logits = _Mixed(program.gm, gates, window, sinks).run(*program.make_inputs(ids[i][None]))
            logp = torch.log_softmax(logits[:, answer].float(), -1)
            kl = (teacher[i].exp() * (teacher[i] - logp)).sum(-1).mean()
            kl.backward()
        for n, g in gates.items():
            assert g.grad is not None
            pull[n] += g.grad.abs()
            g.grad += reg / count  # the gradient of reg * mean(α)
        opt.step()
        with torch.no_grad():
            for g in gates.values():
                g.clamp_(0, 1)
        losses.append(float(kl.detach()))
    return DuoGates([s.layer for s in sites], [gates[s.node].detach().clone() for s in sites],
                    [pull[s.node] for s in sites], losses)
