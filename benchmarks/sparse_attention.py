"""Sparse attention on SmolLM2-135M: full attention, streaming and two per-head policies, on the ONNX Runtime engine.

    python benchmarks/sparse_attention.py [--contexts 2048,4096,8192] [--rows full,streaming,duo,razor]
                                          [--head-window 508] [--new-tokens 32] [--json out.json] [--generate N]

Rows (each converted with ``--backend onnx`` once into out/ and reused):

- ``full``: no pass;
- ``streaming``: ``sparse-attention(window=1020, sinks=4)``: every head keeps 1/4 of a 4k context;
- ``duo`` / ``razor``: ``sparse-attention(pattern=duo|razor, window=W, sinks=4, kv_budget=0.5, context=2048)``
  (``--head-window W``, default 508): the KV heads chosen by DuoAttention's gates / RazorAttention's scores keep the
  full cache, the others W + 4 slots, at most half the full model's KV bytes from 2048 tokens on (the fraction
  falls as the context grows).

Per context N:

- perplexity over one window of N tokens (every token scored, the pattern active as the engine runs it:
  ``engine.forward``) on two held-out texts, the Gospel of John (bundled; calibration is Genesis/Exodus) and the
  GPL-3 (Debian's base-files) where they are long enough;
- passkey retrieval (``headsmith.eval.passkey``: a 5-digit key in N tokens of filler, greedy answer) at depths
  0, 0.25, 0.5, 0.75, 1 (one key each), the way ``headsmith eval --passkey`` runs it;
- KV bytes: what the engine's cache really holds after a prefill of N tokens (``KVCache.nbytes``: ring entries
  keep S + W slots; full entries grow by doubling and have two ping-pong buffers, so that column shows the
  allocation) and the fraction of the full model's K/V the pattern keeps at N (the budget's measure);
- decode tok/s: after a prefill of N tokens, ``--new-tokens`` greedy steps, best of 3 runs, 2 threads;
- the speed bound against full attention: (weights + K/V of N tokens) / (weights + K/V the pattern keeps) bytes
  per step, printed beside the measured ratio.

``--generate N``: also generate N tokens after a 64-token prompt with the full and streaming rows, sampling the
process's resident memory (and its peak) every 1024 tokens (``--contexts ""`` skips the table; run one row per
process, ``--rows full`` then ``--rows streaming``, so one row's freed memory does not hide in the other's).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch
from _common import add_ppl_ratios, artifact, held_out_texts, machine, ppl_columns, table

from headsmith.backends.artifact import read_artifact
from headsmith.eval.passkey import DEPTHS, passkey
from headsmith.passes.kv_cache import CacheEntry
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, generate

MODEL = "smollm2-135m"
ROWS = ("full", "streaming", "duo", "razor")


def specs(head_window: int) -> dict[str, str]:
    per_head = f"window={head_window}, sinks=4, kv_budget=0.5, context=2048"
    return {"full": "", "streaming": "sparse-attention(window=1020, sinks=4)",
            "duo": f"sparse-attention(pattern=duo, {per_head})", "razor": f"sparse-attention(pattern=razor, {per_head})"}


def kv_bytes_at(manifest: dict[str, Any], n: int) -> int:
    """Bytes of K/V the pattern keeps after ``n`` tokens (fp32): a ring entry ``min(n, capacity)`` tokens."""
    entries = [CacheEntry(**{**e, "shape": tuple(e["shape"])}) for e in manifest["backend"]["cache"]]
    return sum(e.bytes_per_token(4) * (min(n, e.capacity) if e.capacity else n) for e in entries)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def measure(path: Any, contexts: list[int], new_tokens: int, texts: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    from headsmith.eval.metrics import perplexity

    art = read_artifact(path)
    engine = engine_for(art, threads=2)
    weights = sum(t.numel() * t.element_size() for t in art.weights.values())

    def run(prompt: list[int], n: int) -> list[int]:
        return generate(engine, [prompt], GenerationConfig(max_new_tokens=n, stop_tokens=())).tokens[0]

    rows = []
    for n in contexts:
        row: dict[str, Any] = {"context": n, "weights": weights, "kv_kept": kv_bytes_at(art.manifest, n)}
        for name, ids in texts.items():
            if ids.numel() >= n:
                row[f"ppl_{name}"] = perplexity(engine.forward, ids[:n], window=n, stride=n)["perplexity"]
        keys = passkey(run, art.tokenizer, [n], DEPTHS)
        row["passkey"] = keys["contexts"][str(n)]["depths"]
        row["passkey_answers"] = [a["answer"] for a in keys["answers"]]
        ids = next(iter(texts.values()))[:n][None]
        logits, cache = engine.prefill(ids, torch.ones_like(ids), torch.arange(n)[None])
        row["kv_bytes"] = cache.nbytes()
        token = logits[:, -1].argmax(-1, keepdim=True)
        best, seen = 0.0, n
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(new_tokens):
                mask = torch.ones(1, seen + 1, dtype=torch.int64)
                logits, cache = engine.decode(token, mask, torch.tensor([[seen]]), cache)
                token = logits[:, -1].argmax(-1, keepdim=True)
                seen += 1
            best = max(best, new_tokens / (time.perf_counter() - start))
        row["tok_s"] = best
        rows.append(row)
    return rows


def long_generation(path: Any, n: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Generate ``n`` tokens one step at a time, sampling RSS every 1024 tokens."""
    art = read_artifact(path)
    engine = engine_for(art, threads=2)
    ids = held_out_texts(tokenizer, 64)["john"][None]
    logits, cache = engine.prefill(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    token, seen, samples = logits[:, -1].argmax(-1, keepdim=True), ids.shape[1], []
    start = time.perf_counter()
    for step in range(1, n + 1):
        logits, cache = engine.decode(token, torch.ones(1, seen + 1, dtype=torch.int64), torch.tensor([[seen]]), cache)
        token, seen = logits[:, -1].argmax(-1, keepdim=True), seen + 1
        if step % 1024 == 0 or step == n:
            samples.append({"tokens": seen, "rss_mb": rss_mb(), "kv_mb": cache.nbytes() / 1e6,
                            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,  # KiB
                            "tok_s": step / (time.perf_counter() - start)})
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--head-window", type=int, default=508, help="the streaming heads' window of duo / razor")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]  # --contexts "": only --generate
    torch.set_num_threads(2)
    labels = args.rows.split(",")
    spec = specs(args.head_window)
    names = {"full": None, "streaming": f"{MODEL}-onnx-streaming"}
    paths = {label: artifact(MODEL, "onnx", spec[label], name=names.get(label, f"{MODEL}-onnx-{label}-w{args.head_window}"))
             for label in labels}
    tokenizer = read_artifact(paths[labels[0]]).tokenizer
    texts = held_out_texts(tokenizer, max(contexts, default=64))
    rows = []
    for label, path in paths.items() if contexts else ():
        for r in measure(path, contexts, args.new_tokens, texts):
            rows.append({"row": label, **r})
    full = {r["context"]: r for r in rows if r["row"] == "full"}
    for r in rows:
        r["kv_mb"] = r["kv_bytes"] / 1e6
        r["kv_x"] = r["kv_kept"] / (r["kv_kept"] if r["row"] == "full" else full[r["context"]]["kv_kept"]) \
            if r["context"] in full else None
        r["passkey_str"] = " ".join(f"{v:.0f}" for v in r["passkey"].values())
        if r["context"] not in full:
            continue
        f = full[r["context"]]
        r["speedup"] = r["tok_s"] / f["tok_s"]
        r["bound"] = (f["weights"] + f["kv_kept"]) / (r["weights"] + r["kv_kept"])
        add_ppl_ratios(r, f)
    print(f"# {MODEL}, ONNX Runtime engine, {machine()}\n")
    for label in labels:
        print(f"- {label}: {spec[label] or '(no pass)'}")
    print()
    columns = [("row", "row", ""), ("context", "context", "d"), ("kv_x", "KV kept", ".3f"),
               ("kv_mb", "KV MB held", ".1f")]
    columns += ppl_columns(rows)
    columns += [("passkey_str", "passkey @ depth " + "/".join(f"{d:g}" for d in DEPTHS), ""),
                ("tok_s", "decode tok/s", ".1f"), ("speedup", "x full", ".2f"), ("bound", "bound", ".2f")]
    if rows:
        print(table(rows, columns))
    generation: dict[str, Any] = {}
    if args.generate:
        for label in [x for x in ("full", "streaming") if x in paths]:
            generation[label] = long_generation(paths[label], args.generate, tokenizer)
        print(f"\n## {args.generate} generated tokens: resident memory\n")
        gen_rows = [{"row": label, **s} for label, samples in generation.items() for s in samples]
        print(table(gen_rows, [("row", "row", ""), ("tokens", "tokens", "d"), ("kv_mb", "KV MB held", ".1f"),
                               ("rss_mb", "RSS MB", ".0f"), ("peak_mb", "peak RSS MB", ".0f"),
                               ("tok_s", "tok/s so far", ".1f")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "generation": generation}, f, indent=1)


if __name__ == "__main__":
    main()
