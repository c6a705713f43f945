"""``prune-mlp(ratio=F, score=...)``: remove intermediate channels of every MLP. Lossy.

MLPs come from :func:`structure.find_mlps`: ``down(act(gate(x)) * up(x))`` (gated), ``down(act(up(x)))``, or a
fused ``gate_up`` projection cut by ``chunk(.., 2, -1)`` (Phi-3). A channel is one row of every up projection
(one row per chunk of a fused one) and their biases, and one column of the down projection; the ops between
them are elementwise, so slicing the weights is the whole edit. Before / after (I = 128 -> 96)::

    g = linear(x, W_gate[128, E])            g = linear(x, W_gate[96, E])      # rows keep
    u = linear(x, W_up[128, E])      ->      u = linear(x, W_up[96, E])
    y = linear(silu(g) * u, W_down[E, 128])  y = linear(silu(g) * u, W_down[E, 96])

Every MLP keeps ``round((1 - ratio) * I)`` channels (at least one), so the layers stay uniform and the config's
intermediate size is updated (``--export hf`` then writes a checkpoint ``from_pretrained`` loads).

Scores (``score``): ``wanda`` (default): structured Wanda, ``Σ |W| · ‖x‖`` over the channel's rows of the up
projections and its column of the down projection (see :mod:`headsmith.passes.scores`); ``random``: seeded.
Removing channels whose down-projection columns are zero (and whose up rows are zero, so the score is 0) is
exact.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..fxutil import get_tensor, set_tensor
from ..program import Program
from .base import Pass, PassContext, PassResult
from .scores import calibration_rows, mlp_scores
from .structure import Mlp, find_mlps, refresh_values


@dataclass(frozen=True)
class PruneMlp(Pass):
    """Remove a fraction of every MLP's intermediate channels, ranked by structured Wanda scores or at random. Lossy."""

    name: ClassVar[str] = "prune-mlp"
    exact: ClassVar[bool] = False

    ratio: float = 0.0
    """Fraction of each MLP's intermediate channels to remove."""
    score: Literal["wanda", "random"] = "wanda"
    """How channels are ranked (see the module docstring)."""
    calibration_tokens: int = 2048
    """Calibration tokens the activation norms are measured on."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be >= 1, got {self.calibration_tokens}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        found = find_mlps(new)
        mlps = [m for m in found if self._keep(m.width) < m.width]
        if not mlps:
            return PassResult(new, modified=False, count=0)
        ids = calibration_rows(new, ctx, self.calibration_tokens)
        scores = mlp_scores(new, ids, self.score, mlps, seed=ctx.seed)
        params_before = new.n_params()
        report: dict[str, Any] = {"score": self.score, "layers": {}}
        for mlp, score in zip(mlps, scores):
            with ctx.at(mlp.down.node):
                keep = torch.sort(torch.argsort(score, descending=True)[: self._keep(mlp.width)]).values
                _slice(new, mlp, keep)
            report["layers"][mlp.layer] = {"width_before": mlp.width, "width_after": int(keep.numel())}
        new.gm.recompile()
        refresh_values(new.gm)
        new._shapes = None
        widths = {self._keep(m.width) for m in found}
        if len(widths) == 1:
            new.info = dataclasses.replace(new.info, config=_config(new.info.config, widths.pop()))
        report.update(params_before=params_before, params_after=new.n_params())
        return PassResult(new, modified=True, count=len(mlps), report=report)

    def _keep(self, width: int) -> int:
        return max(1, width - int(round(self.ratio * width)))


def _slice(program: Program, mlp: Mlp, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` (sorted): rows of the up projections and their biases, columns of the down one."""
    gm = program.gm
    for up, parts in zip(mlp.ups, mlp.parts):
        rows = mlp.rows(parts, keep)
        set_tensor(gm, up.weight, get_tensor(gm, up.weight)[rows].contiguous())
        if up.bias is not None:
            set_tensor(gm, up.bias, get_tensor(gm, up.bias)[rows].contiguous())
    set_tensor(gm, mlp.down.weight, get_tensor(gm, mlp.down.weight)[:, keep].contiguous())


def _config(config: dict[str, Any], width: int) -> dict[str, Any]:
    """The HF config with the new intermediate size (``intermediate_size``, GPT-2's ``n_inner``)."""
    out = json.loads(json.dumps(config))
    for cfg in (out, out.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in ("intermediate_size", "n_inner"):
            if key in cfg and (cfg[key] is None or isinstance(cfg[key], int)):
                cfg[key] = width
    return out
