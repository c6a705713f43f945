"""``bench``: prefill and decode speed per context length, against HF transformers in the same process.

For each context length C: a prompt of C real tokens (the bundled evaluation text), one prefill (timed),
two untimed decode steps, then ``new_tokens`` timed greedy decode steps of one token, best of ``repeats``
runs from the same cache. The source model runs
through HF ``generate()``: prefill is timed as ``generate(max_new_tokens=1)`` and decode as the difference
to ``generate(max_new_tokens=1+N)`` (``min_new_tokens`` forces the length). Decoding is memory-bound, so
the report also gives the machine's measured read bandwidth, the bound it sets
(bandwidth / bytes read per decoded token: the weights a step reads plus the K/V of C tokens) and the
fraction of it each engine reaches. Encoders (:func:`run_encoder_bench`): sentences per second per length.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..corpus import EVAL_TEXT, tokenize
from .engine import Engine
from .eviction import evictor_for
from .pruned_prefill import mean_held


def measure_bandwidth(megabytes: int = 1024, repeats: int = 7) -> float:
    """Best-of-N read bandwidth in GB/s (a ``sum`` over a buffer much larger than the caches)."""
    x = torch.ones(megabytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_tokens(tokenizer: Any, length: int, vocab: int) -> torch.Tensor:
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (1, length), generator=g)
    ids = tokenize(tokenizer, EVAL_TEXT.read_text())
    reps = -(-length // ids.numel())
    return ids.repeat(reps)[:length].unsqueeze(0)


@dataclass
class Timing:
    prefill_tok_s: float
    decode_tok_s: float
    held: int = 0
    """KV tokens the cache held after the prompt (fewer than the prompt's with a KV-eviction policy; after a pruned
    prefill, the mean over the layers)."""


def time_engine(engine: Engine, ids: torch.Tensor, new_tokens: int, repeats: int = 1, kv_policy: Any = None
                ) -> Timing:
    """Prefill ``ids`` once (timed, with a KV-eviction policy's compaction), two untimed decode steps, then
    ``new_tokens`` greedy single-token steps timed ``repeats`` times from the same cache (truncated back between
    runs; an h2o cache, which evicts while decoding, runs on); the best run is reported. ``kv_policy`` as in
    ``generate``."""
    b, c = ids.shape
    mask = torch.ones_like(ids)
    pos = torch.arange(c).unsqueeze(0).expand(b, c).contiguous()
    evictor = evictor_for(engine, kv_policy)
    start = time.perf_counter()
    logits, cache = engine.prefill(ids, mask, pos)
    if evictor is not None:
        evictor.after_prefill(cache, mask)
    prefill = time.perf_counter() - start
    held_prompt = cache.length if getattr(cache, "pruned", None) is None else mean_held(cache)
    token = logits[:, -1].argmax(-1, keepdim=True)
    t = c

    def step(token: torch.Tensor, cache: Any, t: int) -> tuple[torch.Tensor, Any]:
        m = torch.ones(b, cache.length + 1, dtype=torch.int64)  # one column per held token (evicted or not)
        out, cache = engine.decode(token, m, torch.full((b, 1), t, dtype=torch.int64), cache)
        if evictor is not None:
            evictor.after_step(cache, m, 1)
        return out[:, -1].argmax(-1, keepdim=True), cache

    for _ in range(2):  # warm-up steps (first-run allocations), not timed
        token, cache = step(token, cache, t)
        t += 1
    decode = float("inf")
    first, t0, held = token, t, cache.length
    rolls_back = evictor is None or evictor.policy.method != "h2o"
    for r in range(repeats):
        if r and rolls_back:
            cache.truncate(held)
        token, t = first, t0
        start = time.perf_counter()
        for _ in range(new_tokens):
            token, cache = step(token, cache, t)
            t += 1
        decode = min(decode, time.perf_counter() - start)
    return Timing(c * b / prefill, new_tokens * b / decode, held_prompt)


def time_hf(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> Timing:
    """HF ``generate()`` on ``model``'s device (CUDA work is synchronised before each clock read); with
    ``repeats`` > 1 the best of that many measurements of each length."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)  # type: ignore[attr-defined]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        one = min(timed(1) for _ in range(repeats))
        many = min(timed(1 + new_tokens) for _ in range(repeats))
    return Timing(ids.numel() / one, new_tokens * ids.shape[0] / max(many - one, 1e-9))


def time_draft(engine: Engine, ids: torch.Tensor, new_tokens: int, draft: str, k: int, repeats: int = 1
               ) -> dict[str, Any]:
    """Greedy ``generate`` of ``new_tokens`` after ``ids`` without and with speculative decoding (``draft``),
    alternated, the best of ``repeats`` each: both through the same generation loop, so the ratio is like for like."""
    from .generate import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=new_tokens + 1, stop_tokens=())
    prompt = [ids[0].tolist()]
    plain_s, spec_s, plain, spec = float("inf"), float("inf"), None, None
    for _ in range(repeats):
        plain = generate(engine, prompt, config)
        spec = generate(engine, prompt, config, draft=draft, k=k)
        plain_s, spec_s = min(plain_s, plain.decode_seconds), min(spec_s, spec.decode_seconds)
    assert plain is not None and spec is not None
    return {"plain_decode_tok_s": new_tokens / plain_s, "decode_tok_s": new_tokens / spec_s,
            "speedup": plain_s / spec_s, "acceptance": spec.stats["acceptance"],
            "mean_accepted": spec.stats["mean_accepted"], "draft_ms_per_step": spec.stats["draft_ms_per_step"],
            "verify_ms_per_step": spec.stats["verify_ms_per_step"], "draft_name": spec.stats["draft"],
            "lossless": spec.tokens == plain.tokens}


def run_bench(engine: Engine, tokenizer: Any, contexts: list[int], new_tokens: int, weight_bytes: int,
              kv_bytes_per_token: int, hf_model: torch.nn.Module | None = None,
              progress: Any = None, repeats: int = 3, draft: str | None = None, k: int = 4,
              kv_policy: Any = None) -> dict[str, Any]:
    """The report (see the module docstring); each speed is the best of ``repeats`` runs, as the bandwidth is
    the best of several, since the machine may be shared. ``draft``: per context also plain and speculative
    greedy generation of ``new_tokens`` (:func:`time_draft`); ``decode_tok_s`` is then the speculative one and
    ``step_decode_tok_s`` the single-token steps'."""
    bandwidth = measure_bandwidth()
    rows = []
    warm = prompt_tokens(tokenizer, 16, engine.info.vocab_size)
    time_engine(engine, warm, 2)
    for c in contexts:
        if progress is not None:
            progress(f"{engine.name}: context {c}")
        ids = prompt_tokens(tokenizer, c, engine.info.vocab_size)
        timing = time_engine(engine, ids, new_tokens, repeats, kv_policy)
        held = timing.held or c
        bytes_per_token = weight_bytes + kv_bytes_per_token * (held + new_tokens // 2)
        bound = bandwidth * 1e9 / bytes_per_token
        rows.append({"context": c, "kv_tokens_held": held, "prefill_tok_s": timing.prefill_tok_s,
                     "decode_tok_s": timing.decode_tok_s,
                     "bytes_per_token": bytes_per_token, "bound_tok_s": bound,
                     "fraction_of_bound": timing.decode_tok_s / bound})
        if draft is not None:
            rows[-1]["step_decode_tok_s"] = timing.decode_tok_s
            rows[-1].update(time_draft(engine, ids, new_tokens, draft, k, repeats))
    engine_rss = peak_rss_mb()
    if hf_model is not None:
        time_hf(hf_model, warm, 2)
        for row in rows:
            if progress is not None:
                progress(f"HF transformers: context {row['context']}")
            ids = prompt_tokens(tokenizer, row["context"], engine.info.vocab_size)
            hf = time_hf(hf_model, ids, new_tokens, repeats)
            row.update(hf_prefill_tok_s=hf.prefill_tok_s, hf_decode_tok_s=hf.decode_tok_s,
                       ratio_vs_hf=row.get("step_decode_tok_s", row["decode_tok_s"]) / hf.decode_tok_s,
                       hf_fraction_of_bound=hf.decode_tok_s / row["bound_tok_s"])
    return {"backend": engine.name, "contexts": rows, "new_tokens": new_tokens, "repeats": repeats, "draft": draft,
            "bandwidth_gb_s": bandwidth,
            "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token,
            "peak_rss_mb": engine_rss, "peak_rss_with_hf_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def run_encoder_bench(engine: Engine, tokenizer: Any, contexts: list[int], hf_model: torch.nn.Module | None = None,
                      batch: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Encoders: sentences per second per length C (a batch of ``batch`` C-token sentences of the evaluation
    text, best of ``repeats``), against HF transformers on the same batch."""
    rows = []
    for c in contexts:
        ids = prompt_tokens(tokenizer, c * batch, engine.info.vocab_size).reshape(batch, c)
        mask = torch.ones_like(ids)
        pos = torch.arange(c).expand(batch, -1).contiguous()
        inputs = (ids, mask, pos)
        row: dict[str, Any] = {"context": c, "batch": batch,
                               "sentences_s": batch / _best(lambda x=inputs: engine.forward(*x), repeats)}
        if hf_model is not None:
            def hf(x: tuple[torch.Tensor, ...] = inputs) -> None:
                with torch.no_grad():
                    hf_model(input_ids=x[0], attention_mask=x[1], position_ids=x[2])
            row["hf_sentences_s"] = batch / _best(hf, repeats)
            row["ratio_vs_hf"] = row["sentences_s"] / row["hf_sentences_s"]
        rows.append(row)
    return {"backend": engine.name, "task": "encoder", "contexts": rows, "repeats": repeats,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def _best(run: Any, repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["contexts"]
    xs = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["decode_tok_s"] for r in rows], "o-", label=f"headsmith ({result['backend']})")
    if rows and "hf_decode_tok_s" in rows[0]:
        ax.plot(xs, [r["hf_decode_tok_s"] for r in rows], "s-", label="HF transformers generate()")
    ax.plot(xs, [r["bound_tok_s"] for r in rows], "k--", label="bandwidth bound")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode speed, {result['bandwidth_gb_s']:.1f} GB/s measured")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
