"""Block-sparse prefill on SmolLM2-135M: full attention against PowerAttention's and the local + strided layout.

    python benchmarks/block_sparse.py [--contexts 2048,4096,8192] [--rows full,power,block] [--onnx] [--json F]
                                      [--plot F.png] [--replot F.json]

Rows (``sparse-attention(pattern=...)``, converted with ``--backend torch`` once into out/ and reused):

- ``full``: no pass;
- ``power``: ``pattern=power, block=64``: the query's own block, the first, and those 1, 2, 4, ... blocks back;
- ``block``: ``pattern=block, block=64, local=4, stride=8``: the 4 latest blocks, the first, every 8th.

Per context N, on the torch engine (its prefill runs the layouts with FlexAttention, which skips the hidden
tiles; full attention runs SDPA):

- density: the fraction of the causal block pairs the layout keeps (the attention work left);
- perplexity over one window of N tokens on the two held-out texts (the Gospel of John, bundled, and the GPL-3),
  and passkey retrieval at depths 0, 0.25, 0.5, 0.75, 1 (``headsmith.eval.passkey``);
- prefill seconds for N tokens, best of 2 after a warm-up, and the ratio to full attention measured in the
  same run.

``--onnx``: also time the prefill of the full and power rows on ONNX Runtime (``--backend onnx``), where the layout
is a dense additive mask: the same work as full attention, which is what the column shows.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _common import add_ppl_ratios, artifact, held_out_texts, machine, ppl_columns, table

from headsmith.backends.artifact import read_artifact
from headsmith.block_sparse import BlockPattern
from headsmith.eval.passkey import DEPTHS, passkey
from headsmith.passes import parse_passes
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, generate

MODEL = "smollm2-135m"
SPECS = {"full": "", "power": "sparse-attention(pattern=power, block=64)",
         "block": "sparse-attention(pattern=block, block=64, local=4, stride=8)"}


def prefill_seconds(engine: Any, ids: torch.Tensor, repeats: int = 2) -> float:
    n = ids.shape[0]
    args = (ids[None], torch.ones(1, n, dtype=torch.int64), torch.arange(n)[None])
    engine.prefill(*args)  # warm-up (FlexAttention compiles once per process)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        engine.prefill(*args)
        best = min(best, time.perf_counter() - start)
    return best


def measure(label: str, contexts: list[int], texts: dict[str, torch.Tensor], onnx: bool) -> list[dict[str, Any]]:
    from headsmith.eval.metrics import perplexity

    spec = SPECS[label]
    art = read_artifact(artifact(MODEL, "torch", spec, name=f"{MODEL}-torch-{label}"))
    engine = engine_for(art, threads=2)
    ort = None
    if onnx and label in ("full", "power"):
        name = f"{MODEL}-onnx" if label == "full" else f"{MODEL}-onnx-{label}"
        ort = engine_for(read_artifact(artifact(MODEL, "onnx", spec, name=name)), threads=2)
    layout = parse_passes(spec)[0].layout() if spec else None  # type: ignore[attr-defined]

    def run(prompt: list[int], n: int) -> list[int]:
        return generate(engine, [prompt], GenerationConfig(max_new_tokens=n, stop_tokens=())).tokens[0]

    rows = []
    for n in contexts:
        row: dict[str, Any] = {"row": label, "context": n,
                               "density": layout.density(n) if isinstance(layout, BlockPattern) else 1.0}
        for name, ids in texts.items():
            if ids.numel() >= n:
                row[f"ppl_{name}"] = perplexity(engine.forward, ids[:n], window=n, stride=n)["perplexity"]
        keys = passkey(run, art.tokenizer, [n], DEPTHS)
        row["passkey"] = keys["contexts"][str(n)]["depths"]
        ids = next(iter(texts.values()))[:n]
        row["prefill_s"] = prefill_seconds(engine, ids)
        if ort is not None:
            row["onnx_prefill_s"] = prefill_seconds(ort, ids)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Prefill speed-up and perplexity ratio against the context, one line per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["row"] for r in rows if r["row"] != "full"):
        mine = [r for r in rows if r["row"] == label and "prefill_x" in r]
        xs = [r["context"] for r in mine]
        left.plot(xs, [r["prefill_x"] for r in mine], "o-", label=f"{label}: torch (FlexAttention)")
        if any("onnx_prefill_x" in r for r in mine):
            left.plot(xs, [r.get("onnx_prefill_x") for r in mine], "x--", label=f"{label}: ONNX Runtime (dense mask)")
        right.plot(xs, [r.get("ppl_john_x") for r in mine], "o-", label=f"{label}: John")
        right.plot(xs, [r.get("ppl_gpl3_x") for r in mine], "s--", label=f"{label}: GPL-3")
    left.axhline(1.0, color="grey", lw=0.8)
    right.axhline(1.0, color="grey", lw=0.8)
    left.set(xlabel="context (tokens)", ylabel="prefill speed-up over full attention", xscale="log")
    right.set(xlabel="context (tokens)", ylabel="perplexity / full attention's", xscale="log")
    for ax in (left, right):
        ax.set_xticks(sorted({r["context"] for r in rows}), [str(c) for c in sorted({r["context"] for r in rows})])
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: block-sparse prefill layouts (2 threads, fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--rows", default=",".join(SPECS))
    ap.add_argument("--onnx", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write the speed-up / perplexity plot here")
    ap.add_argument("--replot", default=None, help="only plot the rows of an earlier --json")
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f)["rows"], args.plot or "block_sparse.png")
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(2)
    labels = args.rows.split(",")
    tokenizer = read_artifact(artifact(MODEL, "torch", name=f"{MODEL}-torch-full")).tokenizer
    texts = held_out_texts(tokenizer, max(contexts))
    rows = [r for label in labels for r in measure(label, contexts, texts, args.onnx)]
    full = {r["context"]: r for r in rows if r["row"] == "full"}
    for r in rows:
        r["passkey_str"] = " ".join(f"{v:.0f}" for v in r["passkey"].values())
        f = full.get(r["context"])
        if f is None:
            continue
        r["prefill_x"] = f["prefill_s"] / r["prefill_s"]
        if "onnx_prefill_s" in r and "onnx_prefill_s" in f:
            r["onnx_prefill_x"] = f["onnx_prefill_s"] / r["onnx_prefill_s"]
        add_ppl_ratios(r, f)
    print(f"\n# {MODEL}, torch engine (FlexAttention for the layouts), {machine()}\n")
    for label in labels:
        print(f"- {label}: {SPECS[label] or '(no pass)'}")
    print()
    columns = [("row", "row", ""), ("context", "context", "d"), ("density", "attention work", ".3f")]
    columns += ppl_columns(rows)
    columns += [("passkey_str", "passkey @ depth " + "/".join(f"{d:g}" for d in DEPTHS), ""),
                ("prefill_s", "prefill s", ".2f"), ("prefill_x", "speedup", ".2f")]
    if args.onnx:
        columns += [("onnx_prefill_s", "ORT prefill s", ".2f"), ("onnx_prefill_x", "ORT speedup", ".2f")]
    print(table(rows, columns))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
