"""Speculative decoding on SmolLM2-135M-Instruct: each draft against plain decoding, same engine, same run.

    python benchmarks/speculative.py [--backend onnx|tvm|torch] [--onnx-attention plain] [--drafts ngram,int8,..]
                                     [--passes "draft(...), ..."] [--ks 2,4,6,adaptive] [--batches 1,4]
                                     [--new-tokens 96] [--json F] [--plot F.png]
    python benchmarks/speculative.py --replot fused.json,plain.json --plot F.png    # the rows of earlier runs

Drafts: ``ngram`` (prompt lookup, no model) and the drafts the artifact stores, built by ``--passes`` (default:
``DRAFTS``: the model with int8 weights, with int4 weights, and with 8 of its 30 blocks skipped; see
passes/draft.py).

Two prompt sets, through the chat template, greedy:

- input-grounded: rewrite, summarise or continue a passage given in the prompt (held-out text: the Gospel of John
  and the GPL-3), where the answer repeats spans of the input;
- open-ended: instructions whose answer is not in the prompt.

For every draft, k (``adaptive``: start at 4; ngram: +2 after a fully accepted draft, -1 after a rejection; model
drafts: the k of the best modelled speed-up for the acceptance seen; at most 8) and batch size: acceptance
(accepted / drafted), mean accepted tokens per verify step, draft and verify time per step, decode tok/s and the
speed-up over plain greedy decoding of the same prompts timed in the same run (each run twice, the faster kept),
and whether every output equals plain greedy's.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from _common import GPL3, artifact, machine, table

from headsmith.backends.artifact import read_artifact
from headsmith.corpus import EVAL_TEXT
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, chat_prompt, generate
from headsmith.runtime.speculative import speculative_generate

MODEL = "smollm2-135m"
DRAFTS = ('draft(method=quantized, passes="quantize(weights=int8)", label=int8), '
          'draft(method=quantized, passes="quantize(weights=int4)", label=int4), '
          'draft(method=layer-skip, layers=[4,7,12,13,14,16,17,18], label=skip)')
# skip: the first 8 blocks the layer-skip search drops on SmolLM2 (it finds no set whose modelled speed-up passes 1,
# see docs/speculative.md); measured here as the layer-skip row


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


def plot(runs: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Speed-up over plain decoding per k, one panel per prompt set, one bar group per (lowering, batch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["prompts"] for rows in runs.values() for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 4.5), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], sets):
        series = [(f"{label}{r0}, batch {b}", [r for r in rows if r["prompts"] == name and r["batch"] == b
                                               and r.get("draft", "ngram") == d])
                  for label, rows in runs.items() for d in dict.fromkeys(r.get("draft", "ngram") for r in rows)
                  for r0 in [f" {d}" if label else d] for b in sorted({r["batch"] for r in rows})]
        ks = list(dict.fromkeys(r["k"] for _, rows in series for r in rows))
        width = 0.8 / max(1, len(series))
        for i, (label, rows) in enumerate(series):
            by_k = {r["k"]: r["speedup"] for r in rows}
            ax.bar([j + i * width for j in range(len(ks))], [by_k.get(k, 0.0) for k in ks], width, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"k={k}" for k in ks])
        ax.set(title=name, ylabel="speed-up over plain greedy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("SmolLM2-135M, speculative decoding: speed-up of each draft (2 threads)")
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)


def measure(engine: Any, groups: list[list[list[int]]], plain: list[list[list[int]]], plain_s: float,
            config: GenerationConfig, draft: str, k_text: str) -> dict[str, Any]:
    """One row: every group speculatively decoded twice (the faster kept), against the plain run's outputs."""
    adaptive = k_text == "adaptive"
    k = 4 if adaptive else int(k_text)
    same, spec_s, drafted, accepted, steps, tokens = True, 0.0, 0, 0, 0, 0
    draft_ms = verify_ms = 0.0
    for g, want in zip(groups, plain):
        r = speculative_generate(engine, g, config, draft, k=k, adaptive=adaptive)
        again = speculative_generate(engine, g, config, draft, k=k, adaptive=adaptive)
        same &= r.tokens == want and again.tokens == want
        spec_s += min(r.decode_seconds, again.decode_seconds)
        drafted, accepted = drafted + r.stats["drafted"], accepted + r.stats["accepted"]
        steps += r.decode_steps
        tokens += sum(len(t) - 1 for t in r.tokens)
        draft_ms += r.stats["draft_ms_per_step"] * r.decode_steps
        verify_ms += r.stats["verify_ms_per_step"] * r.decode_steps
    plain_tokens = sum(len(t) - 1 for rows in plain for t in rows)
    return {"draft": draft, "k": k_text, "acceptance": accepted / max(1, drafted),
            "mean_accepted": accepted / max(1, steps), "draft_ms_per_step": draft_ms / max(1, steps),
            "verify_ms_per_step": verify_ms / max(1, steps), "plain_decode_tok_s": plain_tokens / plain_s,
            "decode_tok_s": tokens / spec_s, "speedup": (tokens / spec_s) / (plain_tokens / plain_s), "lossless": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--onnx-attention", default=None, help="ONNX lowering (plain: one verify call at batch > 1)")
    ap.add_argument("--drafts", default="ngram,int8,int4,skip", help="ngram and drafts stored in the artifact")
    ap.add_argument("--passes", default=DRAFTS, help="the passes that build the artifact's drafts")
    ap.add_argument("--ks", default="2,4,6,adaptive")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write the speed-up plot here")
    ap.add_argument("--replot", default=None, help="comma-separated --json files of earlier runs: only plot them")
    args = ap.parse_args()
    if args.replot:
        runs = {}
        for path in args.replot.split(","):
            with open(path) as f:
                data = json.load(f)
            runs.setdefault(data.get("lowering", path), []).extend(data["rows"])  # runs of one lowering merge
        plot(runs, args.plot or "speculative.png")
        return
    torch.set_num_threads(2)
    options = {"attention": args.onnx_attention} if args.onnx_attention else None
    name = f"{MODEL}-{args.backend}-drafts" + (f"-{args.onnx_attention}" if args.onnx_attention else "")
    art = read_artifact(artifact(MODEL, args.backend, passes=args.passes, name=name, options=options))
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
            for draft in args.drafts.split(","):
                for k_text in args.ks.split(","):
                    row = measure(engine, groups, plain, plain_s, config, draft, k_text)
                    row.update(prompts=set_name, batch=batch)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n# {MODEL} ({args.backend} engine), greedy, {args.new_tokens} new tokens, {machine()}\n")
    print(table(rows, [("prompts", "prompts", ""), ("batch", "batch", "d"), ("draft", "draft", ""), ("k", "k", ""),
                       ("acceptance", "acceptance", ".2f"), ("mean_accepted", "accepted / step", ".2f"),
                       ("draft_ms_per_step", "draft ms / step", ".1f"),
                       ("verify_ms_per_step", "verify ms / step", ".1f"),
                       ("plain_decode_tok_s", "plain tok/s", ".1f"), ("decode_tok_s", "speculative tok/s", ".1f"),
                       ("speedup", "speed-up", ".2f"), ("lossless", "= plain", "")]))
    lowering = f"{args.backend} {art.manifest['backend'].get('attention', '')}".strip()
    if args.plot:
        plot({lowering: rows}, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "lowering": lowering}, f, indent=1)


if __name__ == "__main__":
    main()
