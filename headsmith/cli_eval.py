"""``headsmith eval``: perplexity / embedding similarity, ``--passkey`` retrieval and ``--continuation``
perplexity after a compressed prompt."""

from __future__ import annotations

import dataclasses
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
    _source_model,
    app,
    out,
    prefill_option,
    status,
)
from .errors import HeadsmithError


@app.command("eval")
def eval_cmd(
    artifact_dir: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="Output directory of `convert`.")],
    text: Annotated[Path | None, typer.Option("--text", help="Text file (default: the bundled held-out text).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens of the text to score.")] = 4096,
    window: Annotated[int, typer.Option("--window", help="Sliding-window length.")] = 1024,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Compare with the source model.")] = True,
    passkey: Annotated[bool, typer.Option("--passkey", help="Passkey retrieval per context and depth instead.")] = False,
    contexts: Annotated[str, typer.Option("--contexts", help="--passkey: context lengths, comma-separated.")] = "2048,4096",
    depths: Annotated[str, typer.Option("--depths", help="--passkey: key depths in [0, 1], comma-separated.")] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option("--trials", help="--passkey: keys per context and depth.")] = 1,
    continuation: Annotated[int, typer.Option("--continuation", help="Perplexity of the last N of --max-tokens "
                                                                     "tokens after the rest was prefilled (and its "
                                                                     "cache evicted, kv-evict artifacts).")] = 0,
    kv_budget: KvBudget = None, kv_method: KvMethod = None, kv_tokens: KvTokens = None, no_kv_evict: KvOff = False,
    no_prefill_prune: PruneOff = False,
) -> None:
    """Perplexity on a text (KL / top-1 agreement with the source when it can be loaded); encoders: embedding
    cosine; ``--passkey``: passkey retrieval accuracy at each context and depth; ``--continuation N``: perplexity
    of a text's last N tokens after a (compressed) prompt, beside the full cache's."""
    from .corpus import EVAL_TEXT, read_text, tokenize
    from .eval.metrics import embedding_similarity, hf_forward, perplexity, sentences
    from .runtime.engine import engine_for
    from .runtime.eviction import policy_option

    art = _artifact(artifact_dir)
    if art.tokenizer is None:
        raise HeadsmithError(f"artifact {artifact_dir} has no tokenizer", "convert a model that ships one")
    engine = engine_for(art)
    policy = policy_option(engine, kv_budget, kv_method, kv_tokens, no_kv_evict)
    prefill_option(engine, no_prefill_prune)
    if passkey:
        _passkey(art, engine, contexts, depths, trials, as_json, policy)
        return
    body = read_text(text, EVAL_TEXT)
    if continuation:
        _continuation(art, engine, tokenize(art.tokenizer, body, max_tokens)[None], continuation, policy, as_json)
        return
    source = _source_model(art, as_json) if compare else None
    ref = hf_forward(source, art.info.task) if source is not None else None
    with status("evaluating", quiet=as_json):
        if art.info.task == "encoder":
            texts = sentences(body, max(8, max_tokens // 32))
            result: dict[str, Any] = {"perplexity": None, "tokens": 0}
            if ref is not None:
                merged = art.manifest["backend"].get("token_merge") or {}  # a merged encoder runs at one length
                result.update(embedding_similarity(engine.forward, ref, art.tokenizer, texts,
                                                   max_length=min(256, merged.get("length", 256))))
        else:
            ids = tokenize(art.tokenizer, body, max_tokens)
            win = min(window, art.info.max_positions or window)
            result = perplexity(engine.forward, ids, window=win, reference=ref)
    result["backend"] = engine.name
    result["text"] = str(text or EVAL_TEXT.name)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for key, value in result.items():
        out.print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}", highlight=False)


def _continuation(art: Any, engine: Any, ids: Any, n: int, policy: Any, as_json: bool) -> None:
    from .runtime.eviction import continuation_perplexity
    from .runtime.pruned_prefill import full_prefill, prunes

    if art.info.task != "causal-lm" or not 0 < n < ids.shape[1]:
        raise HeadsmithError(f"--continuation needs a causal LM and 0 < N < the {ids.shape[1]} tokens of the text",
                             "lower --continuation or raise --max-tokens")
    with status("continuation perplexity", quiet=as_json):
        result: dict[str, Any] = {"prompt": int(ids.shape[1] - n), "backend": engine.name,
                                  "policy": continuation_perplexity(engine, ids, ids.shape[1] - n, policy)}
        if getattr(engine, "kv_policy", None) and policy is not False:
            result["full_cache"] = continuation_perplexity(engine, ids, ids.shape[1] - n, False)
        if prunes(engine):
            with full_prefill(engine):
                result["full_prefill"] = continuation_perplexity(engine, ids, ids.shape[1] - n, False)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for key in ("policy", "full_cache", "full_prefill"):
        if key in result:
            r = result[key]
            out.print(f"{key:>10}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens after "
                      f"{result['prompt']}, {r['held']} tokens held", highlight=False)


def _passkey(art: Any, engine: Any, contexts: str, depths: str, trials: int, as_json: bool, policy: Any = None
             ) -> None:
    from .eval.passkey import passkey
    from .runtime.generate import GenerationConfig, generate

    if art.info.task != "causal-lm":
        raise HeadsmithError(f"{art.info.architecture} is an encoder: passkey retrieval needs a causal LM")
    try:
        ns = [int(c) for c in contexts.split(",")]
        ds = [float(d) for d in depths.split(",")]
    except ValueError:
        raise HeadsmithError(f"cannot parse --contexts {contexts!r} / --depths {depths!r}",
                             "give comma-separated numbers: --contexts 2048,4096 --depths 0,0.5,1") from None
    limit = art.info.max_positions
    if limit is not None and max(ns) > limit:
        raise HeadsmithError(f"context {max(ns)} exceeds the model's {limit} positions", f"use contexts <= {limit}")
    config = GenerationConfig(stop_tokens=())

    def run(prompt: list[int], n: int) -> list[int]:
        return generate(engine, [prompt], dataclasses.replace(config, max_new_tokens=n), kv_policy=policy).tokens[0]

    with status("passkey retrieval", quiet=as_json):
        result = passkey(run, art.tokenizer, ns, ds, trials)
    result["backend"] = engine.name
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"passkey retrieval ({engine.name}, {trials} key(s) per cell)")
    table.add_column("context", justify="right")
    for d in ds:
        table.add_column(f"depth {d:g}", justify="right")
    table.add_column("mean", justify="right")
    for n, row in result["contexts"].items():
        table.add_row(n, *[f"{v:.2f}" for v in row["depths"].values()], f"{row['mean']:.2f}")
    out.print(table)
