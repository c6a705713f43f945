"""Sparse attention on SmolLM2-135M: full attention against the streaming pattern, on the ONNX Runtime engine.

    python benchmarks/sparse_attention.py [--contexts 2048,4096] [--window 1020] [--sinks 4] [--new-tokens 32]
                                          [--json out.json]

Rows: ``full`` (no pass) and ``streaming`` (``sparse-attention(window=W, sinks=S)``), both converted with
``--backend onnx`` (artifacts built once into out/ and reused). Per context N:

- perplexity over one window of N tokens (every token scored, the pattern active as the engine runs it:
  ``engine.forward``) on two held-out texts, the Gospel of John (bundled; calibration is Genesis/Exodus) and the
  GPL-3 (Debian's base-files) where they are long enough;
- KV bytes: what the engine's cache really holds after a prefill of N tokens (``KVCache.nbytes``: ring entries
  keep S + W slots, full entries grow by doubling, so the full row also shows its allocation slack);
- decode tok/s: after a prefill of N tokens, ``--new-tokens`` greedy steps, best of 3, 2 threads;
- the speed bound of the pattern against full attention: (weights + K/V of N tokens) / (weights + K/V of the
  kept tokens) bytes per step, printed beside the measured ratio.

Not measured yet (issue 11): passkey retrieval, the per-head policies (duo, razor), kvpress rows.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _common import artifact, held_out_texts, machine, table

from headsmith.backends.artifact import read_artifact
from headsmith.runtime.engine import engine_for

MODEL = "smollm2-135m"


def kv_bytes_per_token(manifest: dict[str, Any]) -> int:
    total = 0
    for e in manifest["backend"]["cache"]:
        n = 1
        for i, d in enumerate(e["shape"]):
            if i not in (0, int(e["seq_dim"])):
                n *= int(d)
        total += 4 * n
    return total


def measure(path: Any, contexts: list[int], new_tokens: int, texts: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    from headsmith.eval.metrics import perplexity

    art = read_artifact(path)
    engine = engine_for(art, threads=2)
    weights = sum(t.numel() * t.element_size() for t in art.weights.values())
    per_token = kv_bytes_per_token(art.manifest)
    capacity = max([int(e.get("capacity", 0)) for e in art.manifest["backend"]["cache"]] + [0])
    rows = []
    for n in contexts:
        row: dict[str, Any] = {"context": n, "weights": weights, "kept": min(n, capacity) if capacity else n,
                               "kv_per_token": per_token}
        for name, ids in texts.items():
            if ids.numel() >= n:
                row[f"ppl_{name}"] = perplexity(engine.forward, ids[:n], window=n, stride=n)["perplexity"]
        ids = next(iter(texts.values()))[:n][None]
        best = 0.0
        for _ in range(3):
            logits, cache = engine.prefill(ids, torch.ones_like(ids), torch.arange(n)[None])
            row["kv_bytes"] = cache.nbytes()
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for step in range(new_tokens):
                mask = torch.ones(1, n + step + 1, dtype=torch.int64)
                logits, cache = engine.decode(token, mask, torch.tensor([[n + step]]), cache)
                token = logits[:, -1].argmax(-1, keepdim=True)
            best = max(best, new_tokens / (time.perf_counter() - start))
        row["tok_s"] = best
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(2)
    spec = f"sparse-attention(window={args.window}, sinks={args.sinks})"
    paths = {"full": artifact(MODEL, "onnx"),
             "streaming": artifact(MODEL, "onnx", spec, name=f"{MODEL}-onnx-streaming-w{args.window}-s{args.sinks}")}
    texts = held_out_texts(read_artifact(paths["full"]).tokenizer, max(contexts))
    rows = []
    for label, path in paths.items():
        for r in measure(path, contexts, args.new_tokens, texts):
            rows.append({"row": label, **r})
    full = {r["context"]: r for r in rows if r["row"] == "full"}
    for r in rows:
        f = full[r["context"]]
        r["speedup"] = r["tok_s"] / f["tok_s"]
        r["bound"] = (f["weights"] + f["kv_per_token"] * f["kept"]) / (r["weights"] + r["kv_per_token"] * r["kept"])
        r["kv_mb"] = r["kv_bytes"] / 1e6
        for key in [k for k in r if k.startswith("ppl_")]:
            r[key + "_x"] = r[key] / f[key]
    print(f"# {MODEL}, ONNX Runtime engine, {machine()}; streaming = {spec}\n")
    columns = [("row", "row", ""), ("context", "context", "d"), ("kept", "KV tokens kept", "d"),
               ("kv_mb", "KV MB held", ".1f")]
    for key in sorted({k for r in rows for k in r if k.startswith("ppl_") and not k.endswith("_x")}):
        columns += [(key, f"ppl {key[4:]}", ".3f"), (key + "_x", "x full", ".3f")]
    columns += [("tok_s", "decode tok/s", ".1f"), ("speedup", "x full", ".2f"), ("bound", "bound", ".2f")]
    print(table(rows, columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
