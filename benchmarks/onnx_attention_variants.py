"""Which ONNX attention lowering decodes faster: standard ops (`plain`) or onnxruntime's fused
`com.microsoft.GroupQueryAttention` (`gqa`)? SmolLM2-135M, same process, same contexts.

    python benchmarks/onnx_attention_variants.py [--contexts 128,512,2048] [--new-tokens 32]
"""

from __future__ import annotations

import argparse

from _common import artifact, machine, table

from headsmith.backends.artifact import read_artifact
from headsmith.runtime.bench import measure_bandwidth, prompt_tokens, time_engine
from headsmith.runtime.engine import engine_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    engines = {}
    for variant in ("plain", "gqa"):
        art = read_artifact(artifact(args.model, "onnx", name=f"{args.model}-onnx-{variant}",
                                     options={"attention": variant}))
        engines[variant] = (art, engine_for(art))
    bandwidth = measure_bandwidth()
    rows = []
    for c in [int(x) for x in args.contexts.split(",")]:
        for variant, (art, engine) in engines.items():
            time_engine(engine, prompt_tokens(art.tokenizer, 16, art.info.vocab_size), 2)
            t = time_engine(engine, prompt_tokens(art.tokenizer, c, art.info.vocab_size), args.new_tokens)
            rows.append({"context": c, "attention": variant, "prefill": t.prefill_tok_s, "decode": t.decode_tok_s})
    print(f"\n{args.model}, ONNX Runtime CPU; {machine()}; read bandwidth {bandwidth:.1f} GB/s\n")
    print(table(rows, [("context", "context", ""), ("attention", "attention lowering", ""),
                       ("prefill", "prefill tok/s", ".0f"), ("decode", "decode tok/s", ".1f")]))


if __name__ == "__main__":
    main()
