"""What each `quantize` option costs in quality: held-out perplexity of SmolLM2-135M per spec, in torch.

    python benchmarks/quantize_quality.py [--rows default|all|NAME,NAME] [--group N] [--tokens 2048] [--json out.json]

Each row is ``headsmith.load("smollm2-135m").apply(spec)``, evaluated on the program itself (the reference
kernels of ``linear_q`` / ``embedding_q``, so the figures are the format's, not an engine's): perplexity over
``--tokens`` tokens in windows of 512 (stride 256) of two held-out texts, the Gospel of John (bundled; the
calibration text is Genesis/Exodus, so John is in its style) and the GPL-3 licence from Debian's base-files
(modern legal English, nothing like the calibration). ``weights MB`` is what a decode step reads
(``decode_weight_bytes``: packed codes, scales and zero points). The rows are the experiments behind the
defaults documented in docs/precision.md; ``--rows default`` runs the ones that table keeps in bold; ``--group N`` sets
the block size of every row that does not name one (the ablation there was run at 32).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from _common import held_out_texts, machine, table

import headsmith

WINDOW = 512

#: name -> spec; the defaults first
ROWS: dict[str, str] = {
    "fp32": "",
    "bf16": "quantize(weights=bf16)",
    "int8": "quantize(weights=int8)",
    "int8-g32": "quantize(weights=int8, group=32)",
    "int4-rtn": "quantize(weights=int4)",
    "int4-gptq": "quantize(weights=int4, method=gptq)",
    "int4-awq": "quantize(weights=int4, method=awq)",
    "int4-gptq-g32": "quantize(weights=int4, method=gptq, group=32)",
    "int4-rtn-uniform": "quantize(weights=int4, high=[])",
    "int4-rtn-uniform-g32": "quantize(weights=int4, high=[], group=32)",
    "int4-rtn-asym": "quantize(weights=int4, high=[], sym=false)",
    "int4-rtn-head4": "quantize(weights=int4, high=[], head=same)",
    "int4-rtn-clip": "quantize(weights=int4, high=[], clip=true)",
    "int4-gptq-uniform": "quantize(weights=int4, method=gptq, high=[])",
    "int4-gptq-2k": "quantize(weights=int4, method=gptq, calibration_tokens=2048)",
    "int4-gptq-no-act-order": "quantize(weights=int4, method=gptq, act_order=false)",
    "int4-awq-no-clip": "quantize(weights=int4, method=awq, clip=false)",
}
DEFAULT_ROWS = ["fp32", "bf16", "int8", "int4-rtn", "int4-gptq", "int4-awq"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="default", help="default, all, or names from ROWS separated by commas")
    ap.add_argument("--group", type=int, help="block size for every quantize row that does not set one")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json")
    args = ap.parse_args()
    names = DEFAULT_ROWS if args.rows == "default" else list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")

    from headsmith.eval.metrics import perplexity

    source = headsmith.load("smollm2-135m")
    data = held_out_texts(source.tokenizer, args.tokens)
    rows: list[dict[str, Any]] = []
    for name in names:
        start = time.perf_counter()
        spec = ROWS[name]
        if args.group and spec.startswith("quantize(weights=int") and "group=" not in spec:
            spec = f"{spec[:-1]}, group={args.group})"
        program = source.apply(spec) if spec else source
        row: dict[str, Any] = {"name": name, "spec": f"`{spec}`" if spec else "(none)",
                               "mb": program.decode_weight_bytes() / 1e6, "pass_s": time.perf_counter() - start}
        with torch.inference_mode():
            for text, ids in data.items():
                row[text] = perplexity(lambda i, m, p: program(i, m, p), ids, window=WINDOW)["perplexity"]
        rows.append(row)
        print(f"# {name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in data), flush=True)
    ref = next((r for r in rows if r["name"] == "fp32"), None)
    for row in rows:
        for text in data:
            row[f"x_{text}"] = row[text] / ref[text] if ref else None
    print(f"\n{machine()}; {args.tokens} tokens per text, windows of {WINDOW}\n")
    print(table(rows, [("name", "row", ""), ("spec", "spec", ""), ("john", "ppl John", ".3f"),
                       ("x_john", "vs fp32", ".3f"), ("gpl3", "ppl GPL-3", ".3f"), ("x_gpl3", "vs fp32", ".3f"),
                       ("mb", "weights MB", ".1f"), ("pass_s", "pass s", ".0f")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
