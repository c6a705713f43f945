"""Score tables for ``headsmith inspect --scores KIND [--plot F.png]``: every score of one kind as plain lists, and
their heatmaps. The scores themselves are measured in :mod:`headsmith.passes.scores` (pruning) and
:mod:`headsmith.passes.razor` (retrieval heads)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import PassError
from ..program import Program
from .razor import razor_scores
from .scores import head_scores, layer_scores, mlp_scores
from .structure import find_blocks, find_mlps

SCORE_KINDS = ("heads", "heads-retrieval", "layers", "mlp")


def score_table(program: Program, kind: str, ids: Tensor, seed: int = 0) -> dict[str, Any]:
    """Every score of one kind (``heads``, ``heads-retrieval``, ``layers`` or ``mlp``), as plain lists (for
    ``inspect``); head tables list their scores under ``methods``."""
    if kind == "heads":
        out: dict[str, Any] = {"kind": "heads", "layers": [s.layer for s in program.sites()],
                               "methods": ["gradient", "norm"]}
        for method in out["methods"]:
            scores = head_scores(program, ids, method, seed)
            out[method] = [scores[layer].tolist() for layer in out["layers"]]
        return out
    if kind == "heads-retrieval":
        if program.info.task != "causal-lm":
            raise PassError("retrieval-head scores need a causal LM", "score heads of an encoder with --scores heads")
        razor = razor_scores(program, min(256, (program.info.max_positions or 512) // 2), seed=seed)
        return {"kind": "heads", "layers": razor.layers, "methods": ["induction", "echo"],
                "induction": [t.tolist() for t in razor.induction], "echo": [t.tolist() for t in razor.echo],
                "absolute": True}
    if kind == "layers":
        blocks = find_blocks(program)
        ls = layer_scores(program, ids, blocks)
        return {"kind": "layers", "paths": [b.path for b in blocks], "influence": ls.influence.tolist(),
                "angular": ls.angular.tolist()}
    if kind == "mlp":
        mlps = find_mlps(program)
        scores = mlp_scores(program, ids, "wanda", mlps, seed)
        return {"kind": "mlp", "layers": [m.layer for m in mlps], "widths": [m.width for m in mlps],
                "wanda": [s.tolist() for s in scores]}
    raise PassError(f"unknown score kind {kind!r}", f"choose one of {', '.join(SCORE_KINDS)}")


def plot_scores(table: dict[str, Any], path: str, title: str = "") -> None:
    """A heatmap PNG of a :func:`score_table` (heads: layer x head per score; layers: the angular-distance
    matrix and block influence; mlp: each layer's channel scores, sorted and normalised)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kind = table["kind"]
    if kind == "heads":
        methods = table["methods"]
        fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), max(3.0, 0.25 * len(table["layers"]) + 1.5)))
        for ax, method in zip(axes, methods):
            rows = [torch.tensor(r) for r in table[method]]
            width = max(len(r) for r in rows)
            grid = torch.full((len(rows), width), float("nan"))
            for i, r in enumerate(rows):
                grid[i, : len(r)] = r if table.get("absolute") else r / r.max().clamp(min=1e-30)
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            ax.set_yticks(range(len(rows)), [str(x) for x in table["layers"]], fontsize=6)
            ax.set_title(f"{method} (attention mass)" if table.get("absolute") else f"{method} (per layer, / max)")
            fig.colorbar(im, ax=ax)
    elif kind == "layers":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        ang = torch.tensor(table["angular"])
        size = ang.shape[0]
        grid = torch.full((size - 1, size - 1), float("nan"))  # [n-1, ℓ]: distance across n blocks from ℓ
        for n in range(1, size):
            for i in range(size - n):
                grid[n - 1, i] = ang[i, i + n]
        im = axes[0].imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis_r")
        axes[0].set_xlabel("first block ℓ")
        axes[0].set_ylabel("blocks in the span n")
        axes[0].set_yticks(range(size - 1), [str(n) for n in range(1, size)], fontsize=6)
        axes[0].set_title("angular distance d(x_ℓ, x_ℓ+n)")
        fig.colorbar(im, ax=axes[0])
        axes[1].bar(range(len(table["influence"])), table["influence"])
        axes[1].set_xlabel("block")
        axes[1].set_title("block influence 1 - cos(x_in, x_out)")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        rows = [torch.tensor(r).sort(descending=True).values for r in table["wanda"]]
        width = max(len(r) for r in rows)
        grid = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            grid[i, : len(r)] = r / r.max().clamp(min=1e-30)
        fig, ax = plt.subplots(figsize=(10, max(3.0, 0.25 * len(rows) + 1.5)))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("channel (sorted by score)")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(rows)), [str(x) for x in table["layers"]], fontsize=6)
        ax.set_title("MLP channel score (Wanda, per layer / max)")
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
