"""Greedy output of the ONNX engine vs HF transformers, token for token (SmolLM2-135M, 5 prompts, 64 tokens).

    python benchmarks/greedy_parity.py [--backend onnx] [--tokens 64]
"""

from __future__ import annotations

import argparse

import torch
from _common import artifact

from headsmith.backends.artifact import read_artifact
from headsmith.frontend.load import load_hf
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, chat_prompt, generate

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a transformer model is.",
    "List three colours of the rainbow.",
    "Who wrote the play Romeo and Juliet?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    art = read_artifact(artifact(args.model, args.backend))
    engine = engine_for(art)
    hf = load_hf(args.model).model
    hf.generation_config.eos_token_id = None  # exactly N tokens on both sides
    hf.generation_config.pad_token_id = 0
    prompts = [chat_prompt(art.tokenizer, p) for p in PROMPTS]
    ours = generate(engine, prompts, GenerationConfig(max_new_tokens=args.tokens, stop_tokens=())).tokens
    same = 0
    for text, ids, mine in zip(PROMPTS, prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False)[0, len(ids):].tolist()
        match = ref == mine
        same += match
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), None)
        print(f"{'MATCH' if match else 'DIFF at ' + str(first_diff)}  {text!r} -> "
              f"{art.tokenizer.decode(mine, skip_special_tokens=True)[:80]!r}")
    print(f"\n{same}/{len(PROMPTS)} prompts: {args.backend} greedy == HF greedy for {args.tokens} tokens "
          "(batched, left-padded on our side; one prompt at a time on HF's)")


if __name__ == "__main__":
    main()
