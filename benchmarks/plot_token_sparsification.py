"""The plots of docs/token_sparsification.md, from the measured JSON files beside it (no model runs).

    python benchmarks/plot_token_sparsification.py [--docs docs] [--out docs/token_sparsification.png]

Four panels: continuation perplexity after a compressed 4k prompt against the KV budget (SnapKV, H2O, random, and
kvpress's SnapKV / StreamingLLM / KnormPress on the same texts), decode speed-up at 4k against the bytes' bound,
prefill pruning's time to first token against its perplexity, and token merging's cosine against its speed-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def eviction_panels(ax_ppl: Any, ax_speed: Any, ours: list[dict[str, Any]], kvpress: list[dict[str, Any]]) -> None:
    rows = [r for r in ours if r["context"] == 4096]
    for method, color in (("snapkv", "C0"), ("h2o", "C1"), ("random", "C3")):
        mine = sorted((r for r in rows if r["row"].startswith(method)), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in mine]
        ax_ppl.plot(budgets, [r["ppl_gpl3_x"] for r in mine], "o-", color=color, label=f"{method} (GPL-3)")
        ax_ppl.plot(budgets, [r["ppl_john_x"] for r in mine], "o--", color=color, alpha=0.6, label=f"{method} (John)")
        ax_speed.plot(budgets, [r["speedup"] for r in mine], "o-", color=color, label=method)
    base = next(r for r in kvpress if r["row"] == "transformers")
    for method, color in (("snapkv", "C2"), ("streaming", "C4"), ("knorm", "C5")):
        theirs = sorted((r for r in kvpress if r["row"] == f"kvpress {method} {r['budget']:g}"),
                        key=lambda r: r["budget"])
        ax_ppl.plot([r["budget"] for r in theirs], [r["ppl_gpl3"] / base["ppl_gpl3"] for r in theirs], "s:",
                    color=color, label=f"kvpress {method} (GPL-3)")
    snap = sorted((r for r in rows if r["row"].startswith("snapkv")), key=lambda r: r["budget"])
    ax_speed.plot([r["budget"] for r in snap], [r["bound"] for r in snap], "k:", label="bytes bound")
    for ax in (ax_ppl, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.125, 0.25, 0.5], ["12.5%", "25%", "50%"])
        ax.set_xlabel("KV budget (fraction of a 4k prompt)")
    ax_ppl.axhline(1.05, color="grey", lw=0.8)
    ax_ppl.set_ylabel("continuation perplexity / full cache")
    ax_ppl.set_yscale("log")
    ax_ppl.set_yticks([1.0, 1.05, 1.2, 1.5, 2.0, 3.0, 4.0], ["1", "1.05", "1.2", "1.5", "2", "3", "4"])
    ax_ppl.minorticks_off()
    ax_ppl.set_title("KV eviction, SmolLM2-135M, 4k prompt")
    ax_ppl.legend(fontsize=6, ncol=2)
    ax_speed.set_ylabel("decode tok/s / full cache")
    ax_speed.set_title("decode speed-up (ONNX Runtime, fp32)")
    ax_speed.legend(fontsize=7)


def pruning_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    for context, marker in ((2048, "s"), (4096, "o")):
        mine = [r for r in rows if r["context"] == context and r["row"] != "full"]
        ax.scatter([max(r["ppl_john_x"], r["ppl_gpl3_x"]) for r in mine], [r["ttft_x"] for r in mine], marker=marker,
                   label=f"{context} tokens")
        for r in mine:
            ax.annotate(r["row"].replace("layers=", "").replace(",keep=", " / "),
                        (max(r["ppl_john_x"], r["ppl_gpl3_x"]), r["ttft_x"]), fontsize=5)
    ax.axvline(1.05, color="grey", lw=0.8)
    ax.axhline(1.5, color="grey", lw=0.8)
    ax.set_xlabel("worse of the two continuation perplexities / full prefill")
    ax.set_ylabel("time to first token: full / pruned")
    ax.set_title("prefill-prune (LazyLLM), SmolLM2-135M")
    ax.legend(fontsize=7)


def merging_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    for length, metric, style in ((512, "hidden", "o-"), (512, "keys", "o--"), (128, "hidden", "s-"),
                                  (128, "keys", "s--")):
        mine = [r for r in rows if r["length"] == length and (r["row"] == "unmerged" or f"({metric})" in r["row"])]
        ax.plot([r["speedup"] for r in mine], [r["cosine"] for r in mine], style, label=f"{length} tokens, {metric}")
    ax.axhline(0.98, color="grey", lw=0.8)
    ax.axvline(1.5, color="grey", lw=0.8)
    ax.set_xlabel("passages/s / unmerged")
    ax.set_ylabel("mean cosine to the unmerged embedding")
    ax.set_title("token-merge (ToMe), MiniLM-L6")
    ax.legend(fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parent.parent / "docs"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    docs = Path(args.docs)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    eviction_panels(axes[0][0], axes[0][1], load(docs / "token_sparsification.json"),
                    load(docs / "kvpress_token_rows_4k.json"))
    pruning_panel(axes[1][0], load(docs / "prefill_pruning.json"))
    merging_panel(axes[1][1], load(docs / "token_merge.json"))
    fig.tight_layout()
    out = args.out or str(docs / "token_sparsification.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
