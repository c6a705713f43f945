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

``--budgets 0.5,0.25,0.125``: the rows of ``benchmarks/token_sparsification.py`` instead: ``SnapKVPress``,
``StreamingLLMPress(n_sink=4)`` and ``KnormPress`` keeping each fraction of the context's KV, with passkey per
depth (the same prompts and keys) and the continuation perplexity of the next ``--continuation`` tokens of John and
the GPL-3 teacher-forced on the compressed cache.

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


def continuation_ppl(model, ids: torch.Tensor, n: int, press) -> float:
    """Perplexity of ``ids[n:]`` teacher-forced after the press compressed the cache of ``ids[:n]``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            first = model(input_ids=ids[None, :n], past_key_values=cache).logits[0, -1:]
        rest = model(input_ids=ids[None, n:-1], past_key_values=cache,
                     position_ids=torch.arange(n, ids.numel() - 1)[None]).logits[0]
    logits = torch.cat([first, rest])
    return float(torch.nn.functional.cross_entropy(logits.float(), ids[n:]).exp())


def token_rows(model, tok, question: torch.Tensor, contexts: list[int], budgets: list[float],
               continuation: int) -> list[dict]:
    import kvpress

    from headsmith.corpus import EVAL_TEXT, tokenize

    texts = {"john": EVAL_TEXT.read_text()}
    gpl3 = Path("/usr/share/common-licenses/GPL-3")
    if gpl3.exists():
        texts["gpl3"] = gpl3.read_text()
    presses = {"transformers": [(1.0, None)]}
    for name, make in (("kvpress snapkv", lambda r: kvpress.SnapKVPress(compression_ratio=r)),
                       ("kvpress streaming", lambda r: kvpress.StreamingLLMPress(compression_ratio=r, n_sink=4)),
                       ("kvpress knorm", lambda r: kvpress.KnormPress(compression_ratio=r))):
        presses[name] = [(b, make(1.0 - b)) for b in budgets]
    rows = []
    for n in contexts:
        ids = {k: tokenize(tok, v, n + continuation) for k, v in texts.items()}
        for label, variants in presses.items():
            for budget, press in variants:
                start = time.perf_counter()
                row = {"row": f"{label} {budget:g}" if press is not None else label, "context": n, "budget": budget}
                for k, v in ids.items():
                    if v.numel() == n + continuation:
                        row[f"ppl_{k}"] = continuation_ppl(model, v, n, press)
                result = passkey(kvpress_generate(model, tok, question, press), tok, [n], DEPTHS)
                row["passkey_depths"] = result["contexts"][str(n)]["depths"]
                row["passkey"] = result["contexts"][str(n)]["mean"]
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budgets", default="", help="the token_sparsification rows at these KV fractions")
    ap.add_argument("--continuation", type=int, default=256)
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
    if args.budgets:
        rows = token_rows(model, tok, question, [int(c) for c in args.contexts.split(",")],
                          [float(b) for b in args.budgets.split(",")], args.continuation)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
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
