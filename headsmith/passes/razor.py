"""RazorAttention's retrieval-head scores (Tang et al., 2024): echo and induction attention on repeated random tokens.

Letters: B rows, L tokens per half, H query heads, G KV heads, r = H / G.

A head that retrieves from far back shows it on a text that repeats itself: feed ``x_0 .. x_{L-1}`` twice and
watch the queries of the second copy (query ``L + t``). An *echo* head attends to the earlier copy of its own
token (key ``t``); an *induction* head to the token that followed it (key ``t + 1``), which is what lets a model
continue a pattern it saw long ago. Random tokens leave no other reason to look there. A head's score is its mean
attention probability on those two keys, over the second copy's queries::

    echo_h      = mean_t  softmax(q_{L+t} K^T)[t]
    induction_h = mean_t  softmax(q_{L+t} K^T)[t + 1]

The attention is recomputed from the recorded post-RoPE q and k of every ``headsmith.attention`` op, with the op's
own scale, softcap, window and sinks (a head with a window shorter than ``L`` cannot reach the first copy and
scores 0). A KV head scores the most of its query heads (it must keep the full cache if any of them retrieves).
Razor's paper keeps induction and echo heads by separate top fractions; here both masses are added into one score
and the budget picks the top KV heads globally (``sparse-attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import attention_mask_bias
from ..program import Program
from .calib import record


@dataclass(frozen=True)
class RetrievalScores:
    """Per layer: query-head echo and induction masses and the KV-head score (max over its query heads)."""

    layers: list[int]
    echo: list[Tensor]
    induction: list[Tensor]

    def kv_scores(self, group: list[int]) -> list[Tensor]:
        """``[G]`` per layer: the largest ``echo + induction`` of the query heads reading each KV head."""
        return [(e + i).reshape(g, -1).amax(1) for e, i, g in zip(self.echo, self.induction, group)]


def repeated_random_tokens(vocab: int, length: int, rows: int, seed: int = 0) -> Tensor:
    """``[rows, 2 * length]``: ``rows`` seeded random sequences, each repeated once (ids from the upper 90% of the
    vocabulary, away from the special tokens most tokenizers put first)."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(vocab // 10, vocab, (rows, length), generator=g)
    return torch.cat([half, half], 1)


def razor_scores(program: Program, length: int = 256, rows: int = 2, seed: int = 0) -> RetrievalScores:
    """Echo and induction masses of every query head (see the module docstring)."""
    sites = program.sites()
    ids = repeated_random_tokens(program.info.vocab_size, length, rows, seed)
    nodes = [n for s in sites for n in (s.node.args[0], s.node.args[1])]
    values = record(program, nodes, ids, rows=1)  # type: ignore[arg-type]
    echo, induction = [], []
    t = torch.arange(length)
    for i, s in enumerate(sites):
        q_BHTD, k_BGSD = values[2 * i].float(), values[2 * i + 1].float()
        q_BHTD = q_BHTD[:, :, length:]
        k_BHSD = k_BGSD.repeat_interleave(q_BHTD.shape[1] // k_BGSD.shape[1], 1)
        scale = s.scale if s.scale > 0 else 1.0 / math.sqrt(q_BHTD.shape[-1])
        scores = q_BHTD @ k_BHSD.transpose(-1, -2) * scale
        if s.softcap > 0:
            scores = torch.tanh(scores / s.softcap) * s.softcap
        bias = attention_mask_bias(None, length, 2 * length, s.causal, s.window, s.sinks, scores.dtype, scores.device)
        probs_BHTS = torch.softmax(scores + (bias if bias is not None else 0.0), -1)
        echo.append(probs_BHTS[:, :, t, t].mean((0, 2)))
        induction.append(probs_BHTS[:, :, t, t + 1].mean((0, 2)))
    return RetrievalScores([s.layer for s in sites], echo, induction)
