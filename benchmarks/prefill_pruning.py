"""Progressive prompt-token pruning in prefill (``prefill-prune``, LazyLLM) on SmolLM2-135M, ONNX Runtime engine.

    python benchmarks/prefill_pruning.py [--contexts 2048,4096] [--plans "layers=[10],keep=[0.5];..."]
                                         [--continuation 256] [--new-tokens 32] [--depths 0,0.25,0.5,0.75,1]

One artifact per plan (fused ONNX lowering, fp32, converted once into out/); the full row is the first artifact with
its staged prefill off (``OrtEngine.prune = False``: the same weights, the full ``prefill.onnx``). Per context N:

- continuation perplexity: the N tokens of a held-out text are the prompt (prefilled with pruning), the next
  ``--continuation`` are teacher-forced (``runtime/eviction.continuation_perplexity``), on the Gospel of John and
  the GPL-3, as in ``token_sparsification.py``;
- passkey retrieval per depth (the prompts and keys of ``headsmith eval --passkey``);
- held: prompt tokens the last stage's layers cache; KV MB: what every layer's cache holds after the prompt;
- time to first token (best of 2) and its ratio to the full prefill's, with the bound the work allows: the full
  prefill's token-layers over the pruned one's (each layer's linear work is proportional to its tokens);
- decode tok/s: ``--new-tokens`` greedy steps after the prompt (best of 2).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

import torch
from _common import OUT, artifact, held_out_texts, machine, passkey_table

from headsmith.backends.artifact import read_artifact
from headsmith.corpus import passkey_prompt
from headsmith.runtime.engine import engine_for
from headsmith.runtime.eviction import continuation_perplexity
from headsmith.token_pruning import PrunePlan

MODEL = "smollm2-135m"
PLANS = ("layers=[10],keep=[0.5];layers=[12,20],keep=[0.5,0.3];layers=[8,14,20],keep=[0.6,0.4,0.25];"
         "layers=[8,16],keep=[0.5,0.25]")
COLUMNS = [("context", "context", ""), ("row", "row", ""), ("ppl_john", "ppl John", ".3f"),
           ("ppl_john_x", "x full", ".3f"), ("ppl_gpl3", "ppl GPL-3", ".3f"), ("ppl_gpl3_x", "x full", ".3f"),
           ("passkey", "passkey", ".2f"), ("held", "held", ""), ("kv_mb", "KV MB", ".1f"), ("ttft_s", "TTFT s", ".2f"),
           ("ttft_x", "x full", ".2f"), ("bound", "bound", ".2f"), ("decode_tok_s", "tok/s", ".1f")]


def engines(plans: list[str]) -> list[tuple[str, Any, Any]]:
    out = []
    for plan in plans:
        name = re.sub(r"[^a-z0-9]+", "-", plan).strip("-")
        art = read_artifact(artifact(MODEL, "onnx", f"prefill-prune({plan})", name=f"{MODEL}-onnx-prune-{name}"))
        out.append((plan, art, engine_for(art, threads=2)))
    return out


def prefill(engine: Any, ids: torch.Tensor) -> tuple[tuple[torch.Tensor, Any], float]:
    t0 = time.perf_counter()
    out = engine.prefill(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    return out, time.perf_counter() - t0


def greedy(engine: Any, logits: torch.Tensor, cache: Any, start: int, n: int) -> tuple[list[int], float]:
    """``n`` greedy tokens after a prefilled prompt of ``start`` tokens; returns them and the decode seconds."""
    tokens = [int(logits[0, -1].argmax())]
    mask = torch.ones(1, start, dtype=torch.int64)
    t0 = time.perf_counter()
    for i in range(n - 1):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], 1)
        logits, cache = engine.decode(torch.tensor([[tokens[-1]]]), mask, torch.tensor([[start + i]]), cache)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, time.perf_counter() - t0


def work_bound(plan: PrunePlan | None, layers: int, n: int) -> float:
    """Full prefill token-layers over the pruned prefill's."""
    if plan is None:
        return 1.0
    bounds = [0, *plan.layers, layers]
    return layers * n / sum((bounds[s + 1] - bounds[s]) * plan.kept(s, n) for s in range(plan.stages))


def measure(contexts: list[int], plans: list[str], continuation: int, new_tokens: int, depths: list[float]
            ) -> list[dict[str, Any]]:
    eng = engines(plans)
    art0 = eng[0][1]
    tok = art0.tokenizer
    layers = art0.spec.n_layers
    full_engine = engine_for(art0, threads=2)
    full_engine.prune = False
    rows_spec = [("full", None, full_engine)] + [(p, PrunePlan.from_dict(a.manifest["backend"]["prefill_prune"]), e)
                                                 for p, a, e in eng]
    rows = []
    for n in contexts:
        texts = {k: v.reshape(1, -1)[:, : n + continuation] for k, v in held_out_texts(tok, n + continuation).items()}
        keys = torch.Generator().manual_seed(0)  # the keys `headsmith eval --passkey` draws
        prompts = []
        for depth in depths:
            key = str(int(torch.randint(10000, 100000, (1,), generator=keys)))
            prompt, answer = passkey_prompt(tok, n, depth, key, reserve=2)
            prompts.append((depth, key, prompt[None], answer.numel()))
        result = []
        for name, plan, engine in rows_spec:
            r: dict[str, Any] = {"context": n, "row": name, "bound": work_bound(plan, layers, n)}
            for text, ids in texts.items():
                if ids.shape[1] == n + continuation:
                    r[f"ppl_{text}"] = continuation_perplexity(engine, ids, n, False)["perplexity"]
            for depth, key, ids, digits in prompts:
                pre, _ = prefill(engine, ids)
                out, _ = greedy(engine, pre[0], pre[1], ids.shape[1], digits + 2)
                found = re.search(r"\d+", tok.decode(out, skip_special_tokens=True))
                r[f"passkey_{depth:g}"] = float(found is not None and found.group(0) == key)
            speed_ids = texts["john"][:, :n]
            ttft, decode_s = float("inf"), float("inf")
            for _ in range(2):
                (logits, cache), seconds = prefill(engine, speed_ids)
                ttft = min(ttft, seconds)
                decode_s = min(decode_s, greedy(engine, logits, cache, n, new_tokens + 1)[1])
            held = [cache.tokens(i) for i in range(len(cache.specs))]
            r.update(ttft_s=ttft, decode_tok_s=new_tokens / decode_s, held=min(held) - new_tokens,
                     kv_mb=sum((h - new_tokens) * s_bytes(s) for h, s in zip(held, cache.specs)) / 1e6)
            depth_keys = [k for k in r if k.startswith("passkey_")]
            r["passkey"] = sum(r[k] for k in depth_keys) / max(1, len(depth_keys))
            result.append(r)
            print(json.dumps(r), flush=True)
        full = result[0]
        for r in result:
            r["ttft_x"] = full["ttft_s"] / r["ttft_s"]
            for k in [k for k in r if k.startswith("ppl_") and not k.endswith("_x")]:
                r[k + "_x"] = r[k] / full[k]
        rows += result
    return rows


def s_bytes(spec: Any) -> int:
    """fp32 bytes per cached token of one entry."""
    n = 4
    for i, d in enumerate(spec.shape):
        if i not in (0, spec.seq_dim):
            n *= d
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--plans", default=PLANS, help="prefill-prune options per artifact, ';'-separated")
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--json", default=str(OUT / "prefill_pruning.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = measure([int(c) for c in args.contexts.split(",")], args.plans.split(";"), args.continuation,
                   args.new_tokens, [float(d) for d in args.depths.split(",")])
    with open(args.json, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    print(f"\n{machine()}\n")
    print(passkey_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
