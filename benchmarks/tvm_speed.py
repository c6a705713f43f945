"""Decode tokens/s of SmolLM2-135M on the TVM engine against ONNX (onnxruntime) and torch, in one run.

    python benchmarks/tvm_speed.py [--contexts 128,512,2048] [--new-tokens 32] [--repeats 3]
                                   [--engines hf,torch,onnx,tvm] [--json out.json]

Converts smollm2-135m once per backend into out/ (reused afterwards; the TVM build takes a few minutes),
then for each context C and engine: one prefill of C real tokens (timed once), two untimed decode steps,
and ``--repeats`` timed runs of ``--new-tokens`` greedy single-token steps, each restarting from the same
cache (truncated back); the best run is reported, since the machine is shared. ``hf`` is HF transformers
``generate()`` (decode timed as the difference to a one-token generate, best of the repeats); ``torch`` is
headsmith's torch engine. Engines are measured interleaved per context, so a burst of load from elsewhere
hits all of them; each engine starts after a second of rest (thread pools that spin after work would
otherwise take the next engine's cores). Target (issue 4): TVM decode within 1.5x of ONNX at 512 context
(``vs ONNX`` >= 0.67).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _common import artifact, machine, table

from headsmith.backends.artifact import read_artifact
from headsmith.frontend.load import load_hf
from headsmith.runtime.bench import measure_bandwidth, prompt_tokens, time_engine, time_hf
from headsmith.runtime.engine import engine_for


#: seconds of rest before each engine, so the thread pools of the one measured before (onnxruntime, OpenMP,
#: TVM spin while waiting for work) have gone to sleep and do not take this one's cores
PAUSE_S = 1.0


def decode_rate(engine: Any, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Prefill tokens/s (one run) and the best decode tokens/s of ``repeats`` runs from the same cache."""
    timing = time_engine(engine, ids, new_tokens, repeats)
    return {"prefill_tok_s": timing.prefill_tok_s, "decode_tok_s": timing.decode_tok_s}


def hf_rate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    timing = time_hf(model, ids, new_tokens, repeats)
    return {"prefill_tok_s": timing.prefill_tok_s, "decode_tok_s": timing.decode_tok_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--engines", default="hf,torch,onnx,tvm")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.engines.split(",")
    engines: dict[str, Any] = {}
    tokenizer = None
    for name in names:
        if name == "hf":
            engines[name] = load_hf(args.model).model
            continue
        start = time.perf_counter()
        art = read_artifact(artifact(args.model, name))
        engines[name] = engine_for(art)
        tokenizer = art.tokenizer
        print(f"{name}: loaded in {time.perf_counter() - start:.1f}s", flush=True)
    vocab = 49152
    bandwidth = measure_bandwidth()
    weight_bytes = kv_bytes = 0
    for name in names:
        if name != "hf":
            art = read_artifact(artifact(args.model, name))
            weight_bytes, kv_bytes = int(art.manifest["decode_weight_bytes"]), art.spec.kv_bytes_per_token(4)
            break
    rows = []
    for c in [int(x) for x in args.contexts.split(",")]:
        ids = prompt_tokens(tokenizer, c, vocab)
        for name, engine in engines.items():
            print(f"context {c}: {name}", flush=True)
            time.sleep(PAUSE_S)
            if name == "hf":
                rate = hf_rate(engine, ids, args.new_tokens, args.repeats)
            else:
                rate = decode_rate(engine, ids, args.new_tokens, args.repeats)
            bound = bandwidth * 1e9 / (weight_bytes + kv_bytes * (c + args.new_tokens // 2)) if weight_bytes else None
            rows.append({"context": c, "engine": name, **rate, "ms_per_token": 1000 / rate["decode_tok_s"],
                         "bound_tok_s": bound, "of_bound": rate["decode_tok_s"] / bound if bound else None})
    onnx = {r["context"]: r["decode_tok_s"] for r in rows if r["engine"] == "onnx"}
    hf = {r["context"]: r["decode_tok_s"] for r in rows if r["engine"] == "hf"}
    for r in rows:
        r["vs_onnx"] = r["decode_tok_s"] / onnx[r["context"]] if r["context"] in onnx else None
        r["vs_hf"] = r["decode_tok_s"] / hf[r["context"]] if r["context"] in hf else None
    label = {"hf": "torch (HF generate)", "torch": "torch (headsmith engine)", "onnx": "ONNX (onnxruntime)",
             "tvm": "TVM (llvm)"}
    for r in rows:
        r["engine"] = label.get(r["engine"], r["engine"])
    print(f"\n{args.model} decode, batch 1, {args.new_tokens} new tokens per run, best of {args.repeats}; "
          f"{machine()}; measured read bandwidth {bandwidth:.1f} GB/s; the bound is bandwidth / (fp32 weights "
          f"read per token, {weight_bytes / 1e6:.0f} MB, + the K/V of the context, {kv_bytes} B/token)\n")
    print(table(rows, [("context", "context", ""), ("engine", "engine", ""), ("prefill_tok_s", "prefill tok/s", ".0f"),
                       ("decode_tok_s", "decode tok/s", ".1f"), ("ms_per_token", "ms/token", ".1f"),
                       ("vs_onnx", "vs ONNX", ".2f"), ("vs_hf", "vs HF", ".2f"),
                       ("bound_tok_s", "bound tok/s", ".1f"), ("of_bound", "of bound", ".0%")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
