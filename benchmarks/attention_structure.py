"""Attention-structure conversions on real weights: quality, KV bytes and decode speed, with and without heal.

    python benchmarks/attention_structure.py [--heal-minutes 10] [--eval-tokens 2048] [--out docs/attention_structure.md]

SmolLM2-135M on the bundled held-out text (the Gospel of John; calibration and healing use Genesis/Exodus):
perplexity of the source, of `gqa(kv_heads=1)` with `mean` and with the default calibrated `fit`, of `mla` at 50%
and 25% of the source's KV bytes, each without and with `heal` (a wall-time budget per run), with KV bytes/token
and ONNX decode tokens/s at 2048 context. MiniLM-L6: mean embedding cosine to the original for `gqa` 12->4 and
12->2 (mean vs fit). Every figure is measured in this run; the table is printed and written to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import OUT, machine, table

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.corpus import EVAL_TEXT, tokenize
from headsmith.eval.metrics import embeddings, perplexity, sentences
from headsmith.passes import PassContext
from headsmith.runtime.bench import prompt_tokens, time_engine
from headsmith.runtime.engine import engine_for

# (spec, label, whether the issue sets a healed target for it: those get --heal-minutes, the others
# --heal-minutes-others)
CONFIGS = [
    ("gqa(kv_heads=1, method=mean)", "GQA 3->1, mean pooling (GQA paper)", False),
    ("gqa(kv_heads=1)", "GQA 3->1, calibrated RoPE-aware fit (default)", True),
    ("mla(kv_fraction=0.5)", "MLA, 50% of the KV bytes", True),
    ("mla(kv_fraction=0.25)", "MLA, 25% of the KV bytes", False),
]


def ppl(program: headsmith.Program, ids: torch.Tensor) -> float:
    return perplexity(lambda i, m, p: program.gm(i, p, m), ids, window=512)["perplexity"]


def decode_speed(program: headsmith.Program, name: str, context: int, new_tokens: int) -> float:
    path = OUT / f"attn-{name}"
    headsmith.convert(program, path, backend="onnx", force=True)
    art = read_artifact(path)
    engine = engine_for(art)
    time_engine(engine, prompt_tokens(art.tokenizer, 16, art.info.vocab_size), 2)
    return time_engine(engine, prompt_tokens(art.tokenizer, context, art.info.vocab_size), new_tokens).decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heal-minutes", type=float, default=10.0)
    ap.add_argument("--heal-minutes-others", type=float, default=4.0)
    ap.add_argument("--heal-lr", type=float, default=3e-4)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--configs", default=None, help="comma-separated indices into CONFIGS to run (default: all)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only re-measure decode speed of the artifacts an earlier run left in out/attn-*, "
                         "interleaved, best of 3, and append the table to --out")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "attention_structure.md"))
    args = ap.parse_args()
    if args.speed_only:
        speed_table(args.context, args.new_tokens, Path(args.out))
        return
    torch.manual_seed(0)
    source = headsmith.load("smollm2-135m")
    ids = tokenize(source.tokenizer, EVAL_TEXT.read_text(), args.eval_tokens)
    base = ppl(source, ids)
    kv = source.spec().kv_bytes_per_token(2)
    rows = [{"config": "source (SmolLM2-135M)", "heal": "-", "ppl": base, "x_source": 1.0, "kv": kv,
             "decode": None if args.skip_speed else decode_speed(source, "source", args.context, args.new_tokens),
             "seconds": 0.0}]
    print(f"source perplexity {base:.2f}")
    chosen = None if args.configs is None else {int(i) for i in args.configs.split(",")}
    for n, (spec, label, targeted) in enumerate(CONFIGS):
        if chosen is not None and n not in chosen:
            continue
        ctx = PassContext(verify=False, progress=print)
        start = time.perf_counter()
        converted = source.apply(spec, ctx)
        convert_s = time.perf_counter() - start
        p = ppl(converted, ids)
        speed = None if args.skip_speed else decode_speed(converted, f"config{n}", args.context, args.new_tokens)
        rows.append({"config": f"`{spec}` — {label}", "heal": "no", "ppl": p, "x_source": p / base,
                     "kv": converted.spec().kv_bytes_per_token(2), "decode": speed, "seconds": convert_s})
        print(rows[-1])
        minutes = args.heal_minutes if targeted else args.heal_minutes_others
        if minutes <= 0:
            continue
        heal = f"heal(steps=100000, minutes={minutes}, lr={args.heal_lr})"
        start = time.perf_counter()
        healed = converted.apply(heal, PassContext(verify=False, source=source, progress=print))
        heal_s = time.perf_counter() - start
        report = healed.reports[-1]
        hp = ppl(healed, ids)
        rows.append({"config": f"`{spec}` + heal", "heal": f"{report['steps']} steps, {report['train_seconds']:.0f}s",
                     "ppl": hp, "x_source": hp / base, "kv": healed.spec().kv_bytes_per_token(2), "decode": speed,
                     "seconds": heal_s})
        print(rows[-1])
    text = [f"# Attention-structure conversions (measured)\n",
            f"Machine: {machine()}. SmolLM2-135M, perplexity on {ids.numel()} tokens of the bundled held-out text "
            f"(window 512); heal trains on the calibration text with a wall-time budget of {args.heal_minutes} min "
            f"for the targeted rows (GQA fit, MLA 50%) and {args.heal_minutes_others} min for the others (lr {args.heal_lr}, batches of 4x256 tokens, KL to the source). Decode tokens/s: ONNX engine, "
            f"{args.context} context, {args.new_tokens} new tokens. Reproduce: `python benchmarks/attention_structure.py "
            f"--heal-minutes {args.heal_minutes} --heal-minutes-others {args.heal_minutes_others}`.\n",
            table(rows, [("config", "conversion", ""), ("heal", "heal", ""), ("ppl", "perplexity", ".2f"),
                         ("x_source", "x source", ".2f"), ("kv", "KV bytes/token (fp16)", ""),
                         ("decode", f"decode tok/s @{args.context}", ".1f"), ("seconds", "wall s (this step)", ".0f")])]
    if not args.skip_minilm:
        text.append("\n" + minilm_table(args.heal_minutes))
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


SPEED_HEADING = "## Decode speed, re-measured on a quiet machine"


def speed_table(context: int, new_tokens: int, out: Path) -> None:
    """Decode tok/s of the ONNX artifacts of an earlier run, interleaved (each round measures every one), best of 3."""
    names = ["source", *[f"config{i}" for i in range(len(CONFIGS))]]
    labels = ["source (SmolLM2-135M)", *[f"`{spec}`" for spec, _, _ in CONFIGS]]
    engines, kv, best = {}, {}, {}
    for name in names:
        art = read_artifact(OUT / f"attn-{name}")
        engines[name] = (engine_for(art), art)
        kv[name] = art.spec.kv_bytes_per_token(2)
        time_engine(engines[name][0], prompt_tokens(art.tokenizer, 16, art.info.vocab_size), 2)
    for _ in range(3):
        for name, (engine, art) in engines.items():
            t = time_engine(engine, prompt_tokens(art.tokenizer, context, art.info.vocab_size), new_tokens)
            best[name] = max(best.get(name, 0.0), t.decode_tok_s)
            print(name, t.decode_tok_s, flush=True)
    rows = [{"config": label, "kv": kv[n], "decode": best[n], "x": best[n] / best["source"]}
            for n, label in zip(names, labels)]
    text = (f"{SPEED_HEADING}\n\nThe decode column above was measured while other jobs shared the 2 cores; "
            f"this table re-measures the same ONNX artifacts with nothing else running, interleaved, best of 3 "
            f"({context} context, {new_tokens} new tokens; `python benchmarks/attention_structure.py --speed-only`)."
            f"\n\n" + table(rows, [("config", "conversion", ""), ("kv", "KV bytes/token (fp16)", ""),
                                   ("decode", f"decode tok/s @{context}", ".1f"), ("x", "vs source", ".2f")]))
    print(text)
    doc = out.read_text() if out.exists() else ""
    doc = doc.split(SPEED_HEADING)[0].rstrip() + "\n\n" + text + "\n"
    out.write_text(doc)


def minilm_table(heal_minutes: float) -> str:
    source = headsmith.load("minilm-l6")
    texts = sentences(EVAL_TEXT.read_text(), 256)
    ref = embeddings(lambda i, m, p: source.gm(i, p, m), source.tokenizer, texts)
    rows = []
    for kv in (4, 2):
        for method in ("mean", "fit"):
            spec = f"gqa(kv_heads={kv}, method={method})"
            out = source.apply(spec, PassContext(verify=False))
            emb = embeddings(lambda i, m, p: out.gm(i, p, m), source.tokenizer, texts)
            cos = float(torch.nn.functional.cosine_similarity(ref, emb).mean())
            rows.append({"config": f"`{spec}`", "heal": "no", "cos": cos, "kv": out.spec().kv_bytes_per_token(2)})
            if heal_minutes > 0 and method == "fit":
                healed = out.apply(f"heal(steps=100000, minutes={min(heal_minutes, 3.0)}, lr=3e-4)",
                                   PassContext(verify=False, source=source))
                emb = embeddings(lambda i, m, p: healed.gm(i, p, m), source.tokenizer, texts)
                rows.append({"config": f"`{spec}` + heal", "heal": f"{healed.reports[-1]['steps']} steps",
                             "cos": float(torch.nn.functional.cosine_similarity(ref, emb).mean()),
                             "kv": out.spec().kv_bytes_per_token(2)})
    head = (f"MiniLM-L6 (12 heads): mean cosine similarity of mean-pooled sentence embeddings to the original, "
            f"{len(texts)} sentences of the held-out text.\n")
    return head + table(rows, [("config", "conversion", ""), ("heal", "heal", ""), ("cos", "embedding cosine", ".4f"),
                                ("kv", "KV bytes/token (fp16)", "")])


if __name__ == "__main__":
    main()
