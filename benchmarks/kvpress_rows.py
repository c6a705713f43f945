"""kvpress rows for the sparse-attention table: NVIDIA's KV-compression presses on the same SmolLM2-135M weights,
the same passkey prompts and the same KV budgets as ``benchmarks/sparse_attention.py``.

kvpress 0.5.5 needs transformers < 5.3, so it runs from its own environment (the same torch pin)::

    python3 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install "torch==2.13.0" "transformers<5.3" kvpress
    /tmp/kvenv/bin/python benchmarks/kvpress_rows.py [--contexts 2048,4096,8192] [--json out.json]

It reads the fp32 safetensors headsmith writes when it first loads ``smollm2-135m``
(``~/.cache/headsmith/models/smollm2-135m``) and imports only ``headsmith.corpus`` / ``headsmith.eval.passkey`` from
this checkout, so the prompts and keys are those of the main table (same seed). Rows:

- ``transformers``: no press (eager PyTorch, full cache): the reference for kvpress's rows;
- ``kvpress streaming``: ``StreamingLLMPress(compression_ratio=0.75, n_sink=4)``: 1/4 of the context's KV;
- ``kvpress snapkv``: ``SnapKVPress(compression_ratio=0.5)``: half of it, chosen from the attention of the
  context's last tokens.

kvpress compresses the context at prefill (the press's hooks), then the question and the answer run on the
compressed cache, its own protocol; the question is not seen by the press. ``DuoAttentionPress`` is not run:
it loads its per-head patterns from the Hugging Face hub (``kvpress`` downloads them), which this machine cannot
reach, and has none for SmolLM2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from headsmith.corpus import PASSKEY_QUESTION
from headsmith.eval.passkey import DEPTHS, passkey

MODEL_DIR = Path.home() / ".cache/headsmith/models/smollm2-135m"


def kvpress_generate(model, tok, question: torch.Tensor, press):
    """A ``headsmith.eval.passkey`` generate function: the prompt minus its question is the context the press
    compresses at prefill; the question and the greedy answer then run on the compressed cache."""
    from transformers import DynamicCache

    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor(prompt)
        context, asked = ids[: ids.numel() - question.numel()], ids[ids.numel() - question.numel():]
        assert torch.equal(asked, question)
        cache = DynamicCache()
        with torch.no_grad():
            with press(model) if press is not None else contextlib.nullcontext():
                model(input_ids=context[None], past_key_values=cache)
            pos, step, out = context.numel(), asked[None], []
            for _ in range(n):
                logits = model(input_ids=step, past_key_values=cache,
                               position_ids=torch.arange(pos, pos + step.shape[1])[None]).logits
                pos += step.shape[1]
                step = logits[:, -1:].argmax(-1)
                out.append(int(step))
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    presses = {"transformers": None,
               "kvpress streaming": kvpress.StreamingLLMPress(compression_ratio=0.75, n_sink=4),
               "kvpress snapkv": kvpress.SnapKVPress(compression_ratio=0.5)}
    question = torch.tensor(tok(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"])
    rows = []
    for label, press in presses.items():
        for n in [int(c) for c in args.contexts.split(",")]:
            start = time.perf_counter()
            result = passkey(kvpress_generate(model, tok, question, press), tok, [n], DEPTHS)  # same keys: seed 0
            hits = result["contexts"][str(n)]["depths"]
            answers = [a["answer"] for a in result["answers"]]
            rows.append({"row": label, "context": n, "passkey": hits, "answers": answers,
                         "seconds": time.perf_counter() - start})
            print(f"| {label} | {n} | {' '.join(f'{v:.0f}' for v in hits.values())} | {answers} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
