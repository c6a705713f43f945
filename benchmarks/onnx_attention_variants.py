"""Which ONNX lowering decodes fastest: `fused` (the default: opset-23 RMSNorm/rotary, one shared mask,
GroupQueryAttention with an in-place KV cache), `plain` (opset-20 standard ops) or `gqa` (plain with
onnxruntime's `com.microsoft.GroupQueryAttention`, cache copied each step)? SmolLM2-135M, same process,
engines interleaved per context, best of ``--repeats``.

    python benchmarks/onnx_attention_variants.py [--contexts 128,512,2048] [--new-tokens 32] [--repeats 3]
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="fused,plain,gqa")
    args = ap.parse_args()
    engines = {}
    for variant in args.variants.split(","):
        art = read_artifact(artifact(args.model, "onnx", name=f"{args.model}-onnx-{variant}",
                                     options={"attention": variant}))
        engines[variant] = (art, engine_for(art))
    bandwidth = measure_bandwidth()
    rows = []
    for art, engine in engines.values():
        time_engine(engine, prompt_tokens(art.tokenizer, 16, art.info.vocab_size), 2)
    for c in [int(x) for x in args.contexts.split(",")]:
        best: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for variant, (art, engine) in engines.items():
                t = time_engine(engine, prompt_tokens(art.tokenizer, c, art.info.vocab_size), args.new_tokens)
                prev = best.get(variant, [0.0, 0.0])
                best[variant] = [max(prev[0], t.prefill_tok_s), max(prev[1], t.decode_tok_s)]
        for variant, (prefill, decode) in best.items():
            rows.append({"context": c, "attention": variant, "prefill": prefill, "decode": decode,
                         "vs": decode / best[next(iter(best))][1]})
    print(f"\n{args.model}, ONNX Runtime CPU; {machine()}; read bandwidth {bandwidth:.1f} GB/s\n")
    print(table(rows, [("context", "context", ""), ("attention", "attention lowering", ""),
                       ("prefill", "prefill tok/s", ".0f"), ("decode", "decode tok/s", ".1f"),
                       ("vs", "vs first", ".2f")]))


if __name__ == "__main__":
    main()
