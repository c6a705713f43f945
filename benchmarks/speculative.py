"""Speculative decoding on SmolLM2-135M-Instruct: the prompt-lookup draft against plain decoding, same engine, same run.

    python benchmarks/speculative.py [--backend onnx] [--onnx-attention plain] [--ks 2,4,6,adaptive]
                                     [--batches 1,4] [--new-tokens 96] [--json F]

Two prompt sets, through the chat template, greedy:

- input-grounded: rewrite, summarise or continue a passage given in the prompt (held-out text: the Gospel of John
  and the GPL-3), where the answer repeats spans of the input;
- open-ended: instructions whose answer is not in the prompt.

For every k (``adaptive``: start at 4, +2 after a fully accepted draft, -1 after a rejection, at most 8) and batch
size: acceptance (accepted / drafted), mean accepted tokens per verify step, decode tok/s and the speed-up over plain
greedy decoding of the same prompts timed in the same run (each run twice, the faster kept), and whether every
output equals plain greedy's.
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import GPL3, artifact, machine, table

from headsmith.backends.artifact import read_artifact
from headsmith.corpus import EVAL_TEXT
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, chat_prompt, generate
from headsmith.runtime.speculative import speculative_generate

MODEL = "smollm2-135m"


def passages(n: int, words: int = 90) -> list[str]:
    texts = [EVAL_TEXT.read_text()] + ([GPL3.read_text()] if GPL3.exists() else [])
    out = []
    for i in range(n):
        text = texts[i % len(texts)].split()
        start = 400 + 700 * i
        out.append(" ".join(text[start:start + words]))
    return out


def prompt_sets() -> dict[str, list[str]]:
    grounded = []
    for i, passage in enumerate(passages(8)):
        task = ["Rewrite the following passage in plain modern English, keeping every sentence:",
                "Repeat the following passage exactly, then summarise it in one sentence:",
                "Continue the following passage in the same style:",
                "Correct the spelling and punctuation of the following passage:"][i % 4]
        grounded.append(f"{task}\n\n{passage}")
    open_ended = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
                  "Explain how a refrigerator works to a ten-year-old.",
                  "Give five tips for learning a new language, with one sentence on each.",
                  "Describe the water cycle.",
                  "Write a letter to a friend about your last holiday.",
                  "What are the main differences between cats and dogs as pets?",
                  "Explain what a compiler does.",
                  "Write a recipe for a simple vegetable soup."]
    return {"input-grounded": grounded, "open-ended": open_ended}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--onnx-attention", default=None, help="ONNX lowering (plain: one verify call at batch > 1)")
    ap.add_argument("--ks", default="2,4,6,adaptive")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    options = {"attention": args.onnx_attention} if args.onnx_attention else None
    name = f"{MODEL}-{args.backend}" + (f"-{args.onnx_attention}" if args.onnx_attention else "")
    art = read_artifact(artifact(MODEL, args.backend, name=name, options=options))
    engine = engine_for(art, threads=2)
    config = GenerationConfig(max_new_tokens=args.new_tokens, stop_tokens=None)
    rows = []
    for set_name, texts in prompt_sets().items():
        prompts = [chat_prompt(art.tokenizer, t) for t in texts]
        for batch in [int(b) for b in args.batches.split(",")]:
            groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
            plain, plain_s = [], 0.0
            for g in groups:  # twice, the best of the two per group (the machine may be shared)
                first, second = generate(engine, g, config), generate(engine, g, config)
                plain.append(first.tokens)
                plain_s += min(first.decode_seconds, second.decode_seconds)
            plain_tokens = sum(len(t) - 1 for r in plain for t in r)
            for k_text in args.ks.split(","):
                adaptive = k_text == "adaptive"
                k = 4 if adaptive else int(k_text)
                same, spec_s, drafted, accepted, steps, tokens = True, 0.0, 0, 0, 0, 0
                for g, want in zip(groups, plain):
                    r = speculative_generate(engine, g, config, "ngram", k=k, adaptive=adaptive)
                    again = speculative_generate(engine, g, config, "ngram", k=k, adaptive=adaptive)
                    same &= r.tokens == want and again.tokens == want
                    spec_s += min(r.decode_seconds, again.decode_seconds)
                    drafted, accepted = drafted + r.stats["drafted"], accepted + r.stats["accepted"]
                    steps += r.decode_steps
                    tokens += sum(len(t) - 1 for t in r.tokens)
                row = {"prompts": set_name, "batch": batch, "k": k_text, "acceptance": accepted / max(1, drafted),
                       "mean_accepted": accepted / max(1, steps), "plain_decode_tok_s": plain_tokens / plain_s,
                       "decode_tok_s": tokens / spec_s, "speedup": (tokens / spec_s) / (plain_tokens / plain_s),
                       "lossless": same}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n# {MODEL} ({args.backend} engine), prompt-lookup draft, greedy, {args.new_tokens} new tokens, "
          f"{machine()}\n")
    print(table(rows, [("prompts", "prompts", ""), ("batch", "batch", "d"), ("k", "k", ""),
                       ("acceptance", "acceptance", ".2f"), ("mean_accepted", "accepted / step", ".2f"),
                       ("plain_decode_tok_s", "plain tok/s", ".1f"), ("decode_tok_s", "speculative tok/s", ".1f"),
                       ("speedup", "speed-up", ".2f"), ("lossless", "= plain", "")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
