"""Decode and prefill tokens/s of SmolLM2-135M: headsmith engines vs HF transformers, and the bandwidth bound.

    python benchmarks/decode_speed.py [--backends onnx,torch] [--contexts 128,512,2048] [--new-tokens 32]

Converts smollm2-135m once per backend into out/, then runs the same measurement as `headsmith bench` for each
backend, HF transformers `generate()` in the same process, and prints one markdown table. Targets (issue 3):
ONNX decode >= 1.3x HF at 512 context and >= 70% of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import json

from _common import artifact, machine, table

from headsmith.backends.artifact import read_artifact
from headsmith.frontend.load import load_hf
from headsmith.runtime.bench import run_bench
from headsmith.runtime.engine import engine_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    hf = load_hf(args.model).model
    rows, raw = [], {}
    for i, backend in enumerate(args.backends.split(",")):
        art = read_artifact(artifact(args.model, backend))
        engine = engine_for(art)
        result = run_bench(engine, art.tokenizer, contexts, args.new_tokens, int(art.manifest["decode_weight_bytes"]),
                           art.spec.kv_bytes_per_token(4), hf if i == 0 else None, progress=print)
        raw[backend] = result
        for r in result["contexts"]:
            rows.append({"backend": backend, **r})
            if i == 0:
                rows.append({"backend": "HF transformers", "context": r["context"], "prefill_tok_s": r["hf_prefill_tok_s"],
                             "decode_tok_s": r["hf_decode_tok_s"], "bound_tok_s": r["bound_tok_s"],
                             "fraction_of_bound": r["hf_fraction_of_bound"]})
    first = raw[args.backends.split(",")[0]]
    hf_by_ctx = {r["context"]: r["hf_decode_tok_s"] for r in first["contexts"]}
    for r in rows:
        r["ratio_vs_hf"] = r["decode_tok_s"] / hf_by_ctx[r["context"]]
    rows.sort(key=lambda r: (r["context"], r["backend"]))
    print(f"\n{args.model} decode, {args.new_tokens} new tokens per context; {machine()}; measured read bandwidth "
          f"{first['bandwidth_gb_s']:.1f} GB/s; weights read per token {first['weight_bytes'] / 1e6:.0f} MB; "
          f"KV {first['kv_bytes_per_token']} B/token (fp32)\n")
    print(table(rows, [("context", "context", ""), ("backend", "engine", ""), ("prefill_tok_s", "prefill tok/s", ".0f"),
                       ("decode_tok_s", "decode tok/s", ".1f"), ("ratio_vs_hf", "vs HF", ".2f"),
                       ("bound_tok_s", "bound tok/s", ".1f"), ("fraction_of_bound", "of bound", ".0%")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
