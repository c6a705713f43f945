"""Structured pruning on real weights: quality against the fraction pruned, each score against random, with and
without heal, with parameter count and decode speed.

    python benchmarks/pruning.py [--heal-minutes 1.5] [--target-heal-minutes 10] [--eval-tokens 2048]
                                 [--families heads,layers,mlp,minilm] [--out docs/pruning.md] [--plot docs/pruning.png]

SmolLM2-135M, perplexity on the bundled held-out text (the Gospel of John; scores are measured and heal trains on
Genesis/Exodus): heads 10/25/40% (`gradient`, `norm`, `random`), layers 10/20/30% = 3/6/9 of 30 blocks
(`angular`, `influence`, `ppl` on 512 calibration tokens, `random`, plus the fixed span 20-25 at 6 blocks),
MLP channels 25/50% (`wanda`, `random`). Every row is measured training-free; the default score and `random` are also healed (`--heal-minutes`
of wall time each), and the issue's target row (6 layers, the default score) gets `--target-heal-minutes`.
Decode tokens/s: headsmith's torch engine (prefill 512 tokens, then single-token steps), measured for the source
and each default-score row in this run, so the ratios are side by side. MiniLM-L6: mean embedding cosine to the
original for heads 10/25/40%. The table is printed and written to --out, the plot to --plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import OUT, machine, table

import headsmith
from headsmith.corpus import EVAL_TEXT, tokenize
from headsmith.eval.metrics import embeddings, perplexity, sentences
from headsmith.passes import PassContext
from headsmith.runtime.bench import prompt_tokens, time_engine
from headsmith.runtime.engine import TorchEngine

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS = 30
# family -> (fractions, spec template, scores; the first score is the pass's default)
FAMILIES: dict[str, tuple[list[float], str, list[str]]] = {
    "heads": ([0.10, 0.25, 0.40], "prune-heads(ratio={f}, score={s})", ["norm", "gradient", "random"]),
    "layers": ([0.10, 0.20, 0.30], "prune-layers(n={n}, score={s})", ["ppl", "angular", "influence", "random"]),
    "mlp": ([0.25, 0.50], "prune-mlp(ratio={f}, score={s})", ["wanda", "random"]),
}


TARGET_HEADING = "## Target row: 6 of 30 layers with the default score"


def COLUMNS(context: int) -> list[tuple[str, str, str]]:  # noqa: N802
    return [("family", "family", ""), ("fraction", "pruned", ".0%"), ("score", "score", ""), ("heal", "heal", ""),
            ("ppl", "perplexity", ".2f"), ("x_source", "x source", ".2f"), ("params", "params", ","),
            ("decode", f"decode tok/s @{context}", ".1f"), ("speedup", "speedup", ".2f"), ("seconds", "wall s", ".0f")]


def spec_for(family: str, fraction: float, score: str) -> str:
    template = FAMILIES[family][1]
    if score.startswith("span"):
        n = round(fraction * N_LAYERS)
        return f"prune-layers(n={n}, start={int(score[4:])})"
    spec = template.format(f=fraction, n=round(fraction * N_LAYERS), s=score)
    if score == "ppl":  # K rounds over the remaining blocks: fewer calibration tokens keep it to minutes
        spec = spec[:-1] + ", calibration_tokens=512)"
    return spec


def ppl(program: headsmith.Program, ids: torch.Tensor) -> float:
    return perplexity(lambda i, m, p: program.gm(i, p, m), ids, window=512)["perplexity"]


def decode_speed(program: headsmith.Program, context: int, new_tokens: int) -> float:
    engine = TorchEngine.from_program(program)
    vocab = program.info.vocab_size
    time_engine(engine, prompt_tokens(program.tokenizer, 16, vocab), 2)  # warm-up
    ids = prompt_tokens(program.tokenizer, context, vocab)
    return time_engine(engine, ids, new_tokens, repeats=2).decode_tok_s  # best of two: the machine is shared


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heal-minutes", type=float, default=1.5)
    ap.add_argument("--target-heal-minutes", type=float, default=10.0)
    ap.add_argument("--heal-lr", type=float, default=3e-4)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--families", default="heads,layers,mlp,minilm")
    ap.add_argument("--out", default=str(ROOT / "docs" / "pruning.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "pruning.png"))
    ap.add_argument("--json", default=str(OUT / "pruning.json"))
    ap.add_argument("--target-only", action="store_true",
                    help="only the issue's target row (6 of 30 layers, the default score, --target-heal-minutes), "
                         "with the source for reference, appended to --out")
    args = ap.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    torch.manual_seed(0)
    source = headsmith.load("smollm2-135m")
    ids = tokenize(source.tokenizer, EVAL_TEXT.read_text(), args.eval_tokens)
    base = ppl(source, ids)
    base_speed = decode_speed(source, args.context, args.new_tokens)
    rows: list[dict[str, Any]] = [{"family": "-", "fraction": 0.0, "score": "source", "heal": "-", "ppl": base,
                                   "x_source": 1.0, "params": source.n_params(), "decode": base_speed,
                                   "speedup": 1.0, "seconds": 0.0}]
    print(f"source perplexity {base:.2f}, decode {base_speed:.1f} tok/s", flush=True)

    def run(family: str, fraction: float, score: str, heals: list[float], speed: bool) -> None:
        spec = spec_for(family, fraction, score)
        start = time.perf_counter()
        pruned = source.apply(spec, PassContext(verify=False))
        seconds = time.perf_counter() - start
        p = ppl(pruned, ids)
        decode = decode_speed(pruned, args.context, args.new_tokens) if speed else None
        common = {"family": family, "fraction": fraction, "score": score, "params": pruned.n_params(),
                  "decode": decode, "speedup": decode / base_speed if decode else None}
        rows.append({**common, "spec": spec, "heal": "no", "ppl": p, "x_source": p / base, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        for minutes in heals:
            start = time.perf_counter()
            healed = pruned.apply(f"heal(steps=100000, minutes={minutes}, lr={args.heal_lr}, eval_tokens=0)",
                                  PassContext(verify=False, source=source))
            report = healed.reports[-1]
            hp = ppl(healed, ids)
            rows.append({**common, "spec": spec + " + heal", "heal": f"{minutes:g} min: {report['steps']} steps",
                         "ppl": hp, "x_source": hp / base, "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)

    if args.target_only:
        score = FAMILIES["layers"][2][0]
        run("layers", 0.2, score, [args.target_heal_minutes], speed=True)
        text = (f"\n{TARGET_HEADING}\n\nThe issue's target row again, with the pass's default score (`{score}`), "
                f"measured in its own run (`python benchmarks/pruning.py --target-only --target-heal-minutes "
                f"{args.target_heal_minutes}`; {machine()}).\n\n" + table(rows, COLUMNS(args.context)))
        out = Path(args.out)
        doc = out.read_text().split(TARGET_HEADING)[0].rstrip() + "\n" if out.exists() else ""
        out.write_text(doc + text + "\n")
        print(text)
        return
    for family in families:
        if family == "minilm":
            continue
        fractions, _, scores = FAMILIES[family]
        for fraction in fractions:
            extra = ["span20"] if family == "layers" and round(fraction * N_LAYERS) == 6 else []
            for score in scores + extra:
                default, baseline = score == scores[0], score in ("random", "span20")
                heals = [args.heal_minutes] if default or baseline else []
                if family == "layers" and default and round(fraction * N_LAYERS) == 6:
                    heals.append(args.target_heal_minutes)  # the target row
                run(family, fraction, score, heals, speed=default)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))

    text = ["# Structured pruning (measured)\n",
            f"Machine: {machine()}. SmolLM2-135M, perplexity on {ids.numel()} tokens of the bundled held-out text "
            f"(window 512). Scores use 2048 calibration tokens of the calibration text (`ppl`: 512); heal "
            f"trains on it (KL to the source, lr {args.heal_lr}, batches of 4x256 tokens) with a wall-time budget of {args.heal_minutes} min "
            f"per row, {args.target_heal_minutes} min for the issue's target row (6 of 30 layers, default score). "
            f"Decode tokens/s: headsmith's torch engine, {args.context} context, {args.new_tokens} new tokens, "
            f"best of 2; speedup against the source in the same run. Reproduce: `python benchmarks/pruning.py "
            f"--heal-minutes {args.heal_minutes} --target-heal-minutes {args.target_heal_minutes}`.\n",
            table(rows, COLUMNS(args.context))]
    if "minilm" in families:
        text.append("\n" + minilm_table(args.heal_minutes, args.heal_lr))
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))
    plot(rows, args.plot, args.heal_minutes)


def minilm_table(heal_minutes: float, lr: float) -> str:
    source = headsmith.load("minilm-l6")
    texts = sentences(EVAL_TEXT.read_text(), 256)

    def embed(program: headsmith.Program) -> torch.Tensor:
        return embeddings(lambda i, m, p: program.gm(i, p, m), source.tokenizer, texts)

    ref = embed(source)
    rows = []
    for fraction in FAMILIES["heads"][0]:
        for score in FAMILIES["heads"][2]:
            spec = f"prune-heads(ratio={fraction}, score={score})"
            out = source.apply(spec, PassContext(verify=False))
            cos = float(torch.nn.functional.cosine_similarity(ref, embed(out)).mean())
            rows.append({"spec": f"`{spec}`", "heal": "no", "cos": cos, "params": out.n_params()})
            if heal_minutes > 0 and score in ("gradient", "random"):
                healed = out.apply(f"heal(steps=100000, minutes={heal_minutes}, lr={lr}, eval_tokens=0)",
                                   PassContext(verify=False, source=source))
                cos = float(torch.nn.functional.cosine_similarity(ref, embed(healed)).mean())
                rows.append({"spec": f"`{spec}` + heal", "heal": f"{healed.reports[-1]['steps']} steps", "cos": cos,
                             "params": out.n_params()})
            print(json.dumps(rows[-1]), flush=True)
    head = (f"MiniLM-L6 (6 layers x 12 heads): mean cosine similarity of mean-pooled sentence embeddings to the "
            f"original, {len(texts)} sentences of the held-out text.\n")
    return head + table(rows, [("spec", "pruning", ""), ("heal", "heal", ""), ("cos", "embedding cosine", ".4f"),
                                ("params", "params", ",")])


def plot(rows: list[dict[str, Any]], path: str, heal_minutes: float) -> None:
    """Perplexity (x source, log scale) against the fraction pruned: one panel per family, one line per score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    if not fams:
        return
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, family in zip(axes[0], fams):
        for healed, style in ((False, "-"), (True, "--")):
            for score in sorted({r["score"] for r in rows if r["family"] == family}):
                pts = sorted((r["fraction"], r["x_source"]) for r in rows if r["family"] == family
                             and r["score"] == score and r["heal"].startswith(
                                 f"{heal_minutes:g} min" if healed else "no"))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{score}{' + heal' if healed else ''}")
        ax.set_yscale("log")
        ax.set_title(f"SmolLM2-135M: {family}")
        ax.set_xlabel("fraction pruned")
        ax.set_ylabel("perplexity / source")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
