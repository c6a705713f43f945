"""KV eviction on SmolLM2-135M, on the ONNX Runtime engine: full cache, SnapKV, H2O and random eviction.

    python benchmarks/token_sparsification.py [--contexts 2048,4096] [--budgets 0.5,0.25,0.125]
                                              [--methods full,snapkv,h2o,random] [--continuation 256]
                                              [--new-tokens 32] [--depths 0,0.25,0.5,0.75,1] [--json out.json]
    python benchmarks/token_sparsification.py --generate 4096 --rows full|h2o     # resident memory while generating
    python benchmarks/token_sparsification.py --encoder [--lengths 128,512] [--merges 128:4,8,12,16;512:16,32,48,64]
                                              [--metrics hidden,keys]              # token merging on MiniLM-L6

Two artifacts (converted once into out/, fused ONNX lowering, fp32): ``kv-evict(method=snapkv)`` (its prefill returns
the observation window's scores; the full-cache and random rows run on it too, the full cache with the policy off)
and ``kv-evict(method=h2o)`` (its decode graph also returns each step's attention). The budget is chosen at run time
(``generate(kv_policy=...)``, ``--kv-budget``), so one prefill per prompt and artifact serves every row: each row
compacts a copy of the prefilled cache (``KVCache.copy``).

Per context N and budget:

- continuation perplexity: the N tokens of a held-out text are the prompt, the next ``--continuation`` tokens are
  teacher-forced after the cache was compacted (``runtime/eviction.continuation_perplexity``), on the Gospel of John
  (bundled; calibration is Genesis/Exodus) and the GPL-3 (Debian's base-files);
- passkey retrieval (a 5-digit key in N tokens of filler, greedy answer) per depth: the prompts and keys of
  ``headsmith eval --passkey --contexts N`` (and of ``benchmarks/kvpress_rows.py``);
- KV bytes the cache holds after the prompt (tokens held x bytes per token, fp32);
- time to first token: the prefill plus the compaction (selection and copy);
- decode tok/s: ``--new-tokens`` greedy steps after the compacted N-token prompt (best of 2, 2 threads), with the
  bound the bytes allow: (weights + full K/V) / (weights + held K/V) bytes read per step, beside the measured ratio.

``--encoder``: ``token-merge(r=R, length=N, metric=M)`` on MiniLM-L6 (ONNX Runtime, fp32, 2 threads), one artifact
per row, against the unmerged model's ONNX artifact on the same passages: N-token passages ([CLS] + N-2 tokens +
[SEP]) cut from the Gospel of John and the GPL-3 (up to 16 of each); the mean and least cosine of each passage's
mean-pooled embedding to the unmerged one's, Spearman's correlation of all pairwise passage similarities with the
unmerged ones, and passages per second (batches of 8, best of 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import time
from typing import Any

import torch
from _common import OUT, artifact, held_out_texts, machine, passkey_table, table

from headsmith.backends.artifact import read_artifact
from headsmith.corpus import passkey_prompt
from headsmith.eval.metrics import mean_pool, similarity_spearman
from headsmith.kv_policy import KvPolicy
from headsmith.runtime.engine import engine_for
from headsmith.runtime.eviction import continuation_perplexity, evictor_for, with_budget
from headsmith.runtime.generate import GenerationConfig, generate

MODEL = "smollm2-135m"
COLUMNS = [("context", "context", ""), ("row", "row", ""), ("ppl_john", "ppl John", ".3f"),
           ("ppl_john_x", "x full", ".3f"), ("ppl_gpl3", "ppl GPL-3", ".3f"), ("ppl_gpl3_x", "x full", ".3f"),
           ("passkey", "passkey", ".2f"), ("held", "held", ""), ("kv_mb", "KV MB", ".1f"), ("ttft_s", "TTFT s", ".2f"),
           ("decode_tok_s", "tok/s", ".1f"), ("speedup", "x full", ".3f"), ("bound", "bound", ".3f"),
           ("of_bound", "of bound", ".0%")]
SPECS = {"snapkv": "kv-evict(method=snapkv)", "h2o": "kv-evict(method=h2o)"}


def engines(snapkv: str = SPECS["snapkv"]) -> dict[str, Any]:
    """The two artifacts; ``snapkv``: the spec of the snapkv one (another window or pooling: its own directory)."""
    out = {}
    for name, spec in {**SPECS, "snapkv": snapkv}.items():
        suffix = "" if spec == SPECS[name] else "-" + re.sub(r"[^a-z0-9]+", "-", spec.split("(", 1)[-1]).strip("-")
        art = read_artifact(artifact(MODEL, "onnx", spec, name=f"{MODEL}-onnx-{name}{suffix}"))
        out[name] = (art, engine_for(art, threads=2))
    return out


def policies(methods: list[str], budgets: list[float], eng: dict[str, Any]
             ) -> list[tuple[str, str, KvPolicy | bool, float]]:
    """``(row name, artifact, kv_policy, budget)`` for every row: each artifact's own options, at each budget."""
    rows: list[tuple[str, str, KvPolicy | bool, float]] = []
    if "full" in methods:
        rows.append(("full", "snapkv", False, 1.0))
    for method in methods:
        if method == "full":
            continue
        art = "h2o" if method == "h2o" else "snapkv"
        own = with_budget(eng[art][0].manifest["backend"]["kv_policy"], method=method)
        for b in budgets:
            rows.append((f"{method} {b:g}", art, dataclasses.replace(own, budget=b), b))
    return rows


def greedy(engine: Any, logits: torch.Tensor, cache: Any, mask: torch.Tensor, start: int, n: int,
           evictor: Any) -> tuple[list[int], float]:
    """``n`` greedy tokens after a prefilled (and compacted) prompt; returns them and the decode seconds."""
    tokens = [int(logits[0, -1].argmax())]
    t0 = time.perf_counter()
    for i in range(n - 1):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], 1)
        logits, cache = engine.decode(torch.tensor([[tokens[-1]]]), mask, torch.tensor([[start + i]]), cache)
        if evictor is not None:
            mask = evictor.after_step(cache, mask, 1)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, time.perf_counter() - t0


def compacted(engine: Any, prefilled: tuple[torch.Tensor, Any], policy: Any, prompt: int
              ) -> tuple[torch.Tensor, Any, torch.Tensor, Any, float]:
    """A copy of the prefilled cache, compacted by ``policy``: ``(logits, cache, mask, evictor, seconds)``."""
    logits, cache = prefilled[0], prefilled[1].copy()
    mask = torch.ones(1, prompt, dtype=torch.int64)
    evictor = evictor_for(engine, policy)
    t0 = time.perf_counter()
    if evictor is not None:
        mask = evictor.after_prefill(cache, mask)
    return logits, cache, mask, evictor, time.perf_counter() - t0


def prefill(engine: Any, ids: torch.Tensor) -> tuple[tuple[torch.Tensor, Any], float]:
    t0 = time.perf_counter()
    out = engine.prefill(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    return out, time.perf_counter() - t0


def measure(contexts: list[int], methods: list[str], budgets: list[float], continuation: int, new_tokens: int,
            depths: list[float], snapkv: str = SPECS["snapkv"]) -> list[dict[str, Any]]:
    eng = engines(snapkv)
    tok = eng["snapkv"][0].tokenizer
    weights = int(eng["snapkv"][0].manifest["decode_weight_bytes"])
    kv_token = eng["snapkv"][0].spec.kv_bytes_per_token(4)
    rows_spec = policies(methods, budgets, eng)
    rows: list[dict[str, Any]] = []
    for n in contexts:
        texts = {k: v.reshape(1, -1) for k, v in held_out_texts(tok, n + continuation).items()}
        result = {name: {"context": n, "row": name, "budget": b} for name, _, _, b in rows_spec}
        for text, ids in texts.items():  # continuation perplexity, one prefill per artifact
            if ids.shape[1] < n + continuation:
                continue
            ids = ids[:, : n + continuation]
            for a in {a for _, a, _, _ in rows_spec}:
                engine = eng[a][1]
                pre, _ = prefill(engine, ids[:, :n])
                for name, art_name, policy, _ in rows_spec:
                    if art_name != a:
                        continue
                    cache = pre[1].copy()
                    r = continuation_perplexity(engine, ids, n, policy, prefilled=(pre[0], cache))
                    result[name][f"ppl_{text}"] = r["perplexity"]
        keys = torch.Generator().manual_seed(0)  # the keys `headsmith eval --passkey` and kvpress_rows.py draw
        for depth in depths:  # passkey: one prefill per depth and artifact
            key = str(int(torch.randint(10000, 100000, (1,), generator=keys)))
            prompt, answer = passkey_prompt(tok, n, depth, key, reserve=2)
            ids = prompt[None]
            for a in {a for _, a, _, _ in rows_spec}:
                engine = eng[a][1]
                pre, _ = prefill(engine, ids)
                for name, art_name, policy, _ in rows_spec:
                    if art_name != a:
                        continue
                    logits, cache, mask, evictor, _ = compacted(engine, pre, policy, ids.shape[1])
                    out, _ = greedy(engine, logits, cache, mask, ids.shape[1], answer.numel() + 2, evictor)
                    found = re.search(r"\d+", tok.decode(out, skip_special_tokens=True))
                    ok = found is not None and found.group(0) == key
                    result[name][f"passkey_{depth:g}"] = float(ok)
        speed_ids = texts["john"][:, :n]
        for a in {a for _, a, _, _ in rows_spec}:  # time to first token and decode speed
            engine = eng[a][1]
            pre, pre_s = prefill(engine, speed_ids)
            for name, art_name, policy, _ in rows_spec:
                if art_name != a:
                    continue
                best = float("inf")
                for _ in range(2):
                    logits, cache, mask, evictor, compact_s = compacted(engine, pre, policy, n)
                    held = int(mask.shape[1])
                    _, seconds = greedy(engine, logits, cache, mask, n, new_tokens + 1, evictor)
                    best = min(best, seconds)
                result[name].update(ttft_s=pre_s + compact_s, held=held, kv_mb=held * kv_token / 1e6,
                                    decode_tok_s=new_tokens / best,
                                    bound=(weights + n * kv_token) / (weights + held * kv_token))
        full = result.get("full")
        for name, r in result.items():
            depth_keys = [k for k in r if k.startswith("passkey_")]
            r["passkey"] = sum(r[k] for k in depth_keys) / max(1, len(depth_keys))
            if full is not None:
                r["speedup"] = r["decode_tok_s"] / full["decode_tok_s"]
                r["of_bound"] = (r["speedup"] - 1) / (r["bound"] - 1) if r["bound"] > 1.0001 else None
                for k in [k for k in r if k.startswith("ppl_") and not k.endswith("_x")]:
                    r[k + "_x"] = r[k] / full[k]
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def generate_memory(row: str, n: int) -> dict[str, Any]:
    """Resident memory while generating ``n`` tokens after a 64-token prompt (full cache or h2o at 1024 tokens)."""
    eng = engines()
    art, engine = eng["h2o"]
    tok = art.tokenizer
    prompt = held_out_texts(tok, 64)["john"].reshape(-1).tolist()
    policy: KvPolicy | bool = KvPolicy("h2o", tokens=1024) if row == "h2o" else False
    samples: list[tuple[int, float]] = []

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stream(_row: int, _token: int) -> None:
        count[0] += 1
        if count[0] % 512 == 0:
            samples.append((count[0], rss_mb()))

    count = [0]
    t0 = time.perf_counter()
    result = generate(engine, [prompt], GenerationConfig(max_new_tokens=n, stop_tokens=()), stream=stream,
                      kv_policy=policy)
    return {"row": row, "tokens": n, "seconds": time.perf_counter() - t0, "rss_mb": samples,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kv": result.stats.get("kv")}


ENCODER = "minilm-l6"
ENCODER_COLUMNS = [("length", "tokens", ""), ("row", "row", ""), ("cosine", "cosine", ".4f"),
                   ("cosine_min", "least", ".4f"), ("spearman", "Spearman", ".4f"), ("sentences_s", "passages/s", ".1f"),
                   ("speedup", "x unmerged", ".2f")]


def passages(tokenizer: Any, n: int, per_text: int = 16) -> torch.Tensor:
    """``[P, n]`` ids: [CLS] + n-2 tokens + [SEP], consecutive pieces of each held-out text."""
    rows = []
    for ids in held_out_texts(tokenizer, 10 ** 6).values():
        for i in range(min(per_text, len(ids) // (n - 2))):
            rows.append(torch.cat([torch.tensor([tokenizer.cls_token_id]), ids[i * (n - 2):(i + 1) * (n - 2)],
                                   torch.tensor([tokenizer.sep_token_id])]))
    return torch.stack(rows)


def embed(engine: Any, ids: torch.Tensor, batch: int = 8, repeats: int = 3) -> tuple[torch.Tensor, float]:
    """Mean-pooled embeddings of every passage and the best passages/s over ``repeats`` passes."""
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1).contiguous()
    best, out = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [mean_pool(engine.forward(ids[i:i + batch], mask[i:i + batch], pos[i:i + batch]), mask[i:i + batch])
               for i in range(0, len(ids), batch)]
        best = min(best, time.perf_counter() - t0)
    return torch.cat(out), len(ids) / best


def encoder_rows(lengths: list[int], merges: dict[int, list[int]], metrics: list[str]) -> list[dict[str, Any]]:
    base_art = read_artifact(artifact(ENCODER, "onnx"))
    base = engine_for(base_art, threads=2)
    rows: list[dict[str, Any]] = []
    for n in lengths:
        ids = passages(base_art.tokenizer, n)
        ref, ref_speed = embed(base, ids)
        rows.append({"length": n, "row": "unmerged", "passages": len(ids), "cosine": 1.0, "cosine_min": 1.0,
                     "spearman": 1.0, "sentences_s": ref_speed, "speedup": 1.0})
        print(rows[-1], flush=True)
        for metric in metrics:
            for r in merges.get(n, []):
                spec = f"token-merge(r={r}, length={n}, metric={metric})"
                engine = engine_for(read_artifact(artifact(ENCODER, "onnx", spec,
                                                           name=f"{ENCODER}-onnx-tome{n}-{metric}-r{r}")), threads=2)
                emb, speed = embed(engine, ids)
                cos = torch.nn.functional.cosine_similarity(emb, ref)
                rows.append({"length": n, "row": f"r={r} ({metric})", "r": r, "metric": metric, "passages": len(ids),
                             "cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                             "spearman": similarity_spearman(ref, emb), "sentences_s": speed,
                             "speedup": speed / ref_speed})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--budgets", default="0.5,0.25,0.125")
    ap.add_argument("--methods", default="full,snapkv,h2o,random")
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--json", default=str(OUT / "token_sparsification.json"))
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--rows", default="h2o")
    ap.add_argument("--snapkv", default=SPECS["snapkv"], help="the snapkv artifact's pass (another window/pooling)")
    ap.add_argument("--encoder", action="store_true")
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--merges", default="128:4,8,12,16;512:16,32,48,64")
    ap.add_argument("--metrics", default="hidden,keys")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.encoder:
        merges = {int(k): [int(r) for r in v.split(",")] for k, v in (m.split(":") for m in args.merges.split(";"))}
        rows = encoder_rows([int(n) for n in args.lengths.split(",")], merges, args.metrics.split(","))
        (OUT / "token_merge.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
        print(f"\n{machine()}\n")
        print(table(rows, ENCODER_COLUMNS))
        return
    if args.generate:
        result = generate_memory(args.rows, args.generate)
        print(json.dumps(result))
        path = OUT / f"token_sparsification_generate_{args.rows}.json"
        path.write_text(json.dumps(result, indent=1))
        return
    rows = measure([int(c) for c in args.contexts.split(",")], args.methods.split(","),
                   [float(b) for b in args.budgets.split(",")], args.continuation, args.new_tokens,
                   [float(d) for d in args.depths.split(",")], args.snapkv)
    with open(args.json, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    print(f"\n{machine()}\n")
    print(passkey_table(rows, COLUMNS))

if __name__ == "__main__":
    main()
