"""``headsmith bench``: prefill / decode speed per context (encoders: sentences per second) against HF
transformers and the bandwidth bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .cli_common import (
    KvBudget,
    KvMethod,
    KvOff,
    KvTokens,
    PruneOff,
    _artifact,
    _progress,
    _source_model,
    app,
    out,
    prefill_option,
    status,
)
from .errors import HeadsmithError


@app.command()
def bench(
    artifact_dir: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="Output directory of `convert`.")],
    contexts: Annotated[str, typer.Option("--contexts", help="Comma-separated context lengths.")] = "128,512,2048",
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Decode steps timed per context.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")] = None,
    compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Also time HF transformers.")] = True,
    draft: Annotated[str | None, typer.Option("--draft", help="Also time speculative decoding with this draft (stored "
                                                             "in the artifact, ngram or auto) against plain "
                                                             "decoding.")] = None,
    k: Annotated[int, typer.Option("--k", help="Drafted tokens per step (adaptive).")] = 4,
    kv_budget: KvBudget = None, kv_method: KvMethod = None, kv_tokens: KvTokens = None, no_kv_evict: KvOff = False,
    no_prefill_prune: PruneOff = False,
) -> None:
    """Prefill/decode tokens/s per context, KV bytes/token, peak RSS, vs HF transformers and the bandwidth bound."""
    from .runtime.bench import plot, run_bench
    from .runtime.engine import engine_for
    from .runtime.eviction import policy_option

    try:
        ctx_list = [int(c) for c in contexts.split(",") if c.strip()]
    except ValueError:
        raise HeadsmithError(f"--contexts must be comma-separated integers, got {contexts!r}") from None
    if not ctx_list or min(ctx_list) < 1:
        raise HeadsmithError(f"--contexts needs positive lengths, got {contexts!r}")
    if draft is not None and k < 1:
        raise HeadsmithError(f"--k must be >= 1, got {k}")
    art = _artifact(artifact_dir)
    if art.info.task != "causal-lm":
        _bench_encoder(art, ctx_list, as_json, compare)
        return
    engine = engine_for(art)
    policy = policy_option(engine, kv_budget, kv_method, kv_tokens, no_kv_evict)
    prefill_option(engine, no_prefill_prune)
    if draft is not None:  # a bad draft fails now, not after minutes of timing
        from .runtime.speculative import draft_for
        draft_for(draft, engine)
    limit = art.info.max_positions
    if limit is not None and max(ctx_list) + new_tokens + 2 > limit:
        raise HeadsmithError(f"context {max(ctx_list)} + {new_tokens} new tokens exceeds the model's {limit} positions")
    source = _source_model(art, as_json) if compare else None
    kv = art.spec.kv_bytes_per_token(4)
    with status("benchmarking", quiet=as_json):
        result = run_bench(engine, art.tokenizer, ctx_list, new_tokens, int(art.manifest["decode_weight_bytes"]), kv,
                           source, progress=None if as_json else _progress(False), draft=draft, k=k,
                           kv_policy=policy)
    if plot_path is not None:
        plot(result, str(plot_path))
    if as_json:
        out.print_json(json.dumps(result))
        return
    print_bench(result)


def _bench_encoder(art: Any, contexts: list[int], as_json: bool, compare: bool) -> None:
    from .runtime.bench import run_encoder_bench
    from .runtime.engine import engine_for

    limit = (art.manifest["backend"].get("token_merge") or {}).get("length") or art.info.max_positions
    if limit is not None and max(contexts) > limit:
        raise HeadsmithError(f"context {max(contexts)} exceeds the {limit} tokens this encoder runs at",
                             "give --contexts up to that length")
    source = _source_model(art, as_json) if compare else None
    with status("benchmarking", quiet=as_json):
        result = run_encoder_bench(engine_for(art), art.tokenizer, contexts, source)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"encoder benchmark ({result['backend']}, {result['threads']} threads, batches of 8)")
    for c in ("tokens", "sentences/s", "HF sentences/s", "ratio vs HF"):
        table.add_column(c, justify="right")
    for r in result["contexts"]:
        table.add_row(str(r["context"]), f"{r['sentences_s']:.1f}", f"{r.get('hf_sentences_s', float('nan')):.1f}",
                      f"{r.get('ratio_vs_hf', float('nan')):.2f}x")
    out.print(table)


def print_bench(result: dict[str, Any]) -> None:
    table = Table(title=f"decode benchmark ({result['backend']}, {result['threads']} threads, "
                        f"{result['bandwidth_gb_s']:.1f} GB/s measured read bandwidth)")
    cols = ["context", "prefill tok/s", "decode tok/s", "bound tok/s", "of bound"]
    has_hf = bool(result["contexts"]) and "hf_decode_tok_s" in result["contexts"][0]
    if has_hf:
        cols += ["HF prefill tok/s", "HF decode tok/s", "HF of bound", "ratio vs HF"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["contexts"]:
        held = r.get("kv_tokens_held", r["context"])
        context = str(r["context"]) if held == r["context"] else f"{r['context']} ({held} held)"
        row = [context, f"{r['prefill_tok_s']:.0f}", f"{r.get('step_decode_tok_s', r['decode_tok_s']):.1f}",
               f"{r['bound_tok_s']:.1f}",
               f"{r['fraction_of_bound']:.0%}"]
        if has_hf:
            row += [f"{r['hf_prefill_tok_s']:.0f}", f"{r['hf_decode_tok_s']:.1f}", f"{r['hf_fraction_of_bound']:.0%}",
                    f"{r['ratio_vs_hf']:.2f}x"]
        table.add_row(*row)
    out.print(table)
    if result.get("draft"):
        spec = Table(title=f"speculative decoding, draft {result['draft']} (greedy generate, {result['new_tokens']} "
                           "tokens)")
        for c in ("context", "plain tok/s", "speculative tok/s", "speed-up", "acceptance", "accepted/step",
                  "= plain"):
            spec.add_column(c, justify="right")
        for r in result["contexts"]:
            spec.add_row(str(r["context"]), f"{r['plain_decode_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}",
                         f"{r['speedup']:.2f}x", f"{r['acceptance']:.0%}", f"{r['mean_accepted']:.2f}",
                         "yes" if r["lossless"] else "NO")
        out.print(spec)
    out.print(f"weights read per token {result['weight_bytes'] / 1e6:.1f} MB, KV cache {result['kv_bytes_per_token']:,} "
              f"bytes/token (fp32), peak RSS {result['peak_rss_mb']:.0f} MB", highlight=False)
