"""The ``headsmith`` command line.

    headsmith inspect MODEL [--json] [--scores heads|heads-retrieval|layers|mlp [--plot FILE.png]]
    headsmith passes
    headsmith convert MODEL --passes SPEC --backend torch|onnx -o OUT [--force]
    headsmith run ARTIFACT --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]
    headsmith eval ARTIFACT [--text FILE] [--max-tokens N] [--window N] [--json]
    headsmith eval ARTIFACT --passkey [--contexts 2048,4096,8192] [--depths 0,0.5,1] [--trials K] [--json]
    headsmith bench ARTIFACT [--contexts 128,512,2048] [--new-tokens N] [--json] [--plot FILE.png]

User errors print ``error: <what is wrong>`` and a ``hint:`` line on stderr and exit with code 2;
``--debug`` (before the command) shows the traceback of wrapped errors too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import HeadsmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Capture pretrained transformers as FX graphs, rewrite their attention, lower to engines.")
out = Console()
err = Console(stderr=True)
STATE: dict[str, bool] = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of wrapped errors.")] = False) -> None:
    STATE["debug"] = debug


@contextmanager
def status(text: str, quiet: bool = False):  # noqa: ANN201
    """A spinner for steps that may take more than a second (stderr, so --json output stays clean)."""
    if quiet or not err.is_terminal:
        start = time.perf_counter()
        yield
        if not quiet:
            err.print(f"{text} done in {time.perf_counter() - start:.1f}s")
        return
    start = time.perf_counter()
    with err.status(text):
        yield
    err.print(f"[green]✓[/green] {text} ({time.perf_counter() - start:.1f}s)")


def _progress(quiet: bool):  # noqa: ANN202
    if quiet:
        return None
    return lambda message: err.print(f"  {message}", highlight=False)


# ---- inspect -------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Built-in name, HF directory, .gguf file, or artifact directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickled .bin weights.")] = False,
    scores: Annotated[str | None, typer.Option(
        "--scores", help="Also measure scores: heads (pruning: gradient, norm), heads-retrieval (induction and echo "
        "attention on repeated random tokens), layers (block influence, angular distance) or mlp (Wanda channel "
        "scores).")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="With --scores: draw them as a heatmap PNG.")] = None,
    tokens: Annotated[int, typer.Option("--calibration-tokens", help="Calibration tokens for --scores.")] = 2048,
) -> None:
    """Layers, attention kind per layer, heads / KV heads / head dim, parameters and KV-cache bytes per token."""
    from .program import ModelSpec

    kinds = ("heads", "heads-retrieval", "layers", "mlp")
    if scores is not None and scores not in kinds:
        raise HeadsmithError(f"unknown --scores {scores!r}", f"choose one of {', '.join(kinds)}")
    if plot_path is not None and scores is None:
        raise HeadsmithError("--plot draws scores", f"add --scores {'|'.join(kinds)}")
    path = Path(model)
    program = None
    if (path / "manifest.json").exists():
        if scores is not None:
            raise HeadsmithError("--scores needs the model itself, not an artifact", "inspect the source model")
        from .backends.artifact import read_manifest
        manifest = read_manifest(path)
        spec, extra = ModelSpec.from_dict(manifest["model"]), {"passes": manifest["passes"], "artifact": str(path)}
    else:
        import headsmith
        with status(f"loading and capturing {model}", quiet=as_json):
            program = headsmith.load(model, allow_pickle=allow_pickle)
        spec = program.spec()
        extra = {"source": program.source.name, "capture_seconds": program.reports[0].get("seconds")}
    table = None
    if scores is not None and program is not None:
        from .passes import PassContext
        from .passes.score_tables import plot_scores, score_table
        from .passes.scores import calibration_rows
        ids = calibration_rows(program, PassContext(), tokens)
        with status(f"measuring {scores} scores on {ids.numel()} calibration tokens", quiet=as_json):
            table = score_table(program, scores, ids)
        if plot_path is not None:
            plot_scores(table, str(plot_path), title=f"{program.source.name}: {scores}")
    d = spec.to_dict()
    d.update(extra)
    if table is not None:
        d["scores"] = table
    if as_json:
        out.print_json(json.dumps(d))
        return
    _print_spec(spec, extra)
    if table is not None:
        _print_scores(table)
    if plot_path is not None:
        out.print(f"wrote {plot_path}", highlight=False)


def _print_spec(spec: Any, extra: dict[str, Any]) -> None:
    title = f"{spec.architecture} ({spec.task}) — {spec.n_layers} layers, {spec.params:,} parameters"
    table = Table(title=title)
    for col in ("layer", "kind", "heads", "kv heads", "head dim", "window", "rope dims", "qk norm", "cache/token"):
        table.add_column(col, justify="right" if col not in ("kind",) else "left")
    split = {la.index for la in spec.layers if la.group > 0}
    for layer in spec.layers:
        window = f"{layer.window or '-'}" + (f" +{layer.sinks} sinks" if layer.sinks else "")
        if layer.blocks:
            from .block_sparse import BlockPattern
            window = BlockPattern.decode(layer.blocks).describe()  # type: ignore[union-attr]
        table.add_row(f"{layer.index}.g{layer.group}" if layer.index in split else str(layer.index), layer.kind, str(layer.n_heads), str(layer.n_kv_heads),
                      str(layer.head_dim) if layer.head_dim == layer.v_head_dim else f"{layer.head_dim}/{layer.v_head_dim}",
                      window, str(layer.rope_dims or "-"), "yes" if layer.qk_norm else "no",
                      str(layer.cache_width))
    out.print(table)
    kv16, kv32 = spec.kv_bytes_per_token(2), spec.kv_bytes_per_token(4)
    out.print(f"KV cache per token: {kv16:,} bytes (fp16), {kv32:,} bytes (fp32)   hidden {spec.hidden_size}, "
              f"vocab {spec.vocab_size:,}")
    if "capture_seconds" in extra:
        out.print(f"captured with torch.export in {extra['capture_seconds']:.1f}s")
    if "passes" in extra:
        out.print(f"passes: {', '.join(extra['passes']) or '(none)'}")


def _print_scores(table: dict[str, Any]) -> None:
    """Pruning scores: per head (divided by the layer's largest), per block, or per-layer channel statistics."""
    kind = table["kind"]
    if kind == "heads":
        absolute = bool(table.get("absolute"))
        for method in table["methods"]:
            rows = table[method]
            title = (f"retrieval-head scores: {method} attention mass (highest keep the full cache)" if absolute else
                     f"head scores: {method} (each layer divided by its largest; lowest go first)")
            t = Table(title=title)
            t.add_column("layer", justify="right")
            for h in range(max(len(r) for r in rows)):
                t.add_column(str(h), justify="right")
            for layer, r in zip(table["layers"], rows):
                top = 1.0 if absolute else max(max(r), 1e-30)
                t.add_row(str(layer), *[f"{v / top:.2f}" for v in r])
            out.print(t)
        return
    if kind == "layers":
        t = Table(title="block scores (lowest go first)")
        for col in ("block", "path", "block influence", "angular d(l, l+1)"):
            t.add_column(col, justify="right" if col != "path" else "left")
        ang = table["angular"]
        for i, (path, infl) in enumerate(zip(table["paths"], table["influence"])):
            t.add_row(str(i), path, f"{infl:.4f}", f"{ang[i][i + 1]:.4f}")
        out.print(t)
        n_blocks = len(table["paths"])
        spans = Table(title="best span of n blocks to drop (smallest angular distance)")
        for col in ("n", "first block", "distance"):
            spans.add_column(col, justify="right")
        for n in range(1, n_blocks):
            best = min(range(n_blocks - n + 1), key=lambda i: ang[i][i + n])
            spans.add_row(str(n), str(best), f"{ang[best][best + n]:.4f}")
        out.print(spans)
        return
    t = Table(title="MLP channel scores (Wanda), per layer")
    for col in ("layer", "channels", "min", "median", "max", "score share of the lowest 25% / 50%"):
        t.add_column(col, justify="right")
    for layer, width, r in zip(table["layers"], table["widths"], table["wanda"]):
        s = sorted(r)
        total = max(sum(s), 1e-30)
        low25, low50 = sum(s[: width // 4]) / total, sum(s[: width // 2]) / total
        t.add_row(str(layer), str(width), f"{s[0]:.3g}", f"{s[len(s) // 2]:.3g}", f"{s[-1]:.3g}",
                  f"{low25:.1%} / {low50:.1%}")
    out.print(t)


# ---- passes --------------------------------------------------------------------------------------
@app.command()
def passes() -> None:
    """Every pass with its options, defaults and one-line doc."""
    from .passes import REGISTRY, load_plugins
    from .passes.base import format_value

    load_plugins()
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        kind = "exact" if cls.exact else "lossy"
        out.print(f"[bold]{name}[/bold] ({kind}) — {cls.doc()}", highlight=False)
        for opt in cls.options():
            default = "required" if opt.required else f"default {format_value(opt.default)}"
            doc = f" — {opt.doc}" if opt.doc else ""
            out.print(f"    {opt.name}: {opt.type_name()} ({default}){doc}", highlight=False)


# ---- convert -------------------------------------------------------------------------------------
@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="Built-in name, HF directory or .gguf file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output artifact directory.")],
    pass_spec: Annotated[str, typer.Option("--passes", help='Pass spec, e.g. "gqa(kv_heads=1), dce".')] = "",
    backend: Annotated[str, typer.Option("--backend", help="torch | onnx | tvm | tensorrt")] = "torch",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickled .bin weights.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every pass numerically.")] = True,
    dump: Annotated[Path | None, typer.Option("--dump", help="Write graphs before/after each pass here.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for calibration and checks.")] = 0,
    text: Annotated[Path | None, typer.Option("--calibration-text", help="Calibration text file.")] = None,
    export: Annotated[str | None, typer.Option(
        "--export", help="Also write a checkpoint other tools load: 'hf' (transformers from_pretrained), into OUT/hf."
    )] = None,
    onnx_attention: Annotated[str | None, typer.Option(
        "--onnx-attention", help="ONNX lowering: fused (default: RMSNorm/rotary as opset-23 ops, causal attention as "
        "onnxruntime's GroupQueryAttention with an in-place KV cache), plain (opset-20 standard ops only) or gqa "
        "(plain with GroupQueryAttention).")] = None,
    tvm_target: Annotated[str | None, typer.Option(
        "--tvm-target", help="TVM target: llvm (this CPU, default), llvm:<cpu> (e.g. llvm:x86-64-v3), "
        "cuda:sm_80 or cuda:sm_90 (cross-compiled).")] = None,
    onnx_accuracy_level: Annotated[int | None, typer.Option(
        "--onnx-accuracy-level", help="Compute precision of quantised linears on onnxruntime (MatMulNBits): 4 "
        "(default: int8 activations, the fast CPU kernels) or 0 (fp32, exact to the dequantised weights).")] = None,
) -> None:
    """Load MODEL, apply the passes and write an artifact directory for BACKEND."""
    import headsmith

    from .backends.artifact import BACKENDS, check_output_path, write_artifact
    from .errors import BackendError
    from .passes import PassContext, parse_passes

    pass_list = parse_passes(pass_spec)  # fail fast on a bad spec, before loading anything
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    options: dict[str, Any] = {}
    if export is not None:
        if export != "hf":
            raise HeadsmithError(f"unknown --export {export!r}", "the supported format is: hf")
        options["export"] = export
    if onnx_attention is not None:
        if backend != "onnx":
            raise HeadsmithError("--onnx-attention applies to --backend onnx only")
        from .backends.onnx_backend import VARIANTS
        if onnx_attention not in VARIANTS:
            raise HeadsmithError(f"unknown --onnx-attention {onnx_attention!r}", f"choose one of {', '.join(VARIANTS)}")
        options["attention"] = onnx_attention
    if onnx_accuracy_level is not None:
        if backend != "onnx":
            raise HeadsmithError("--onnx-accuracy-level applies to --backend onnx only")
        from .backends.onnx_quant import ACCURACY_LEVELS
        if onnx_accuracy_level not in ACCURACY_LEVELS:
            raise HeadsmithError(f"unknown --onnx-accuracy-level {onnx_accuracy_level}",
                                 f"choose one of {', '.join(map(str, ACCURACY_LEVELS))}")
        options["accuracy_level"] = onnx_accuracy_level
    if tvm_target is not None:
        if backend != "tvm":
            raise HeadsmithError("--tvm-target applies to --backend tvm only")
        from .backends.tvm_backend import TvmTarget
        TvmTarget.parse(tvm_target)  # fail fast on a bad target, before loading anything
        options["target"] = tvm_target
    check_output_path(output, model, force)
    ctx = PassContext(seed=seed, verify=verify, dump_dir=dump, calibration_text=text, progress=_progress(False))
    with status(f"loading, capturing and raising {model}"):
        program = headsmith.load(model, allow_pickle=allow_pickle)
    if pass_list:
        with status(f"applying {pass_spec}"):
            program = program.apply(pass_list, ctx)
    with status(f"writing the {backend} artifact to {output}"):
        write_artifact(program, output, backend=backend, force=force, progress=_progress(False), options=options)
    _print_reports(program.reports)
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    out.print(f"wrote {output} ({size / 1e6:.1f} MB)", highlight=False)


def _print_reports(reports: tuple[dict[str, Any], ...]) -> None:
    table = Table(title="passes")
    for col in ("pass", "sites", "seconds", "check"):
        table.add_column(col)
    for r in reports:
        check = ""
        if "max_abs_diff" in r:
            check = f"max |Δ| {r['max_abs_diff']:.2e}"
        elif "kl" in r:
            check = f"KL {r['kl']:.4f}, top-1 {r['top1_agreement']:.3f}, cos {r['cosine']:.4f}"
        elif "hidden_cosine" in r:
            check = f"hidden cos {r['hidden_cosine']:.4f}"
        table.add_row(str(r.get("pass")), str(r.get("count", "")), f"{r.get('seconds', 0):.2f}", check)
    out.print(table)


# ---- run / eval / bench ------------------------------------------------------------------------------
def _artifact(path: Path) -> Any:
    from .backends.artifact import read_artifact
    return read_artifact(path)


def _source_model(artifact: Any, quiet: bool) -> Any:
    """The artifact's source as an HF model, or None (with a note) when it cannot be loaded here."""
    from .frontend.load import load_hf
    source = artifact.source.name if artifact.source.kind == "builtin" else artifact.source.path
    try:
        with status(f"loading the source model {source} for comparison", quiet=quiet):
            return load_hf(source, install=False).model
    except HeadsmithError as e:
        err.print(f"note: source model not available ({e.message}); skipping comparisons", highlight=False)
        return None


KvBudget = Annotated[float | None, typer.Option("--kv-budget", help="kv-evict artifacts: the fraction of the prompt's "
                                                                     "KV kept, instead of the converted one.")]
KvMethod = Annotated[str | None, typer.Option("--kv-method", help="kv-evict artifacts: snapkv, random (or h2o, if "
                                                                   "converted with it), instead of the converted one.")]
KvTokens = Annotated[int | None, typer.Option("--kv-tokens", help="kv-evict artifacts: a fixed number of cached "
                                                                   "tokens instead of a fraction.")]
KvOff = Annotated[bool, typer.Option("--no-kv-evict", help="kv-evict artifacts: keep the full cache.")]


@app.command()
def run(
    artifact_dir: Annotated[Path, typer.Argument(metavar="ARTIFACT", help="Output directory of `convert`.")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="Prompt text (repeat for a batch).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens.")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="Use the chat template (default: if any).")] = None,
    draft: Annotated[str | None, typer.Option("--draft", help="Speculative decoding with this draft: one stored in the "
                                                             "artifact by draft(...), ngram (prompt lookup) or auto. "
                                                             "Same output as without.")] = None,
    k: Annotated[int, typer.Option("--k", help="Drafted tokens per step (adapts to the acceptance).")] = 4,
    kv_budget: KvBudget = None, kv_method: KvMethod = None, kv_tokens: KvTokens = None, no_kv_evict: KvOff = False,
) -> None:
    """Generate text from an artifact, streaming tokens as they come."""
    from .runtime.engine import engine_for
    from .runtime.eviction import policy_option
    from .runtime.generate import GenerationConfig, chat_prompt, generate

    art = _artifact(artifact_dir)
    if art.tokenizer is None:
        raise HeadsmithError(f"artifact {artifact_dir} has no tokenizer", "convert a model that ships one")
    engine = engine_for(art)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed)
    prompts = [chat_prompt(art.tokenizer, p, chat) for p in prompt]
    texts: list[list[int]] = [[] for _ in prompts]
    shown = [0 for _ in prompts]

    def stream(row: int, token: int) -> None:
        if len(prompts) != 1:
            return
        texts[row].append(token)
        text = art.tokenizer.decode(texts[row], skip_special_tokens=True)
        out.print(text[shown[row]:], end="", highlight=False, markup=False, soft_wrap=True)
        out.file.flush()
        shown[row] = len(text)

    policy = policy_option(engine, kv_budget, kv_method, kv_tokens, no_kv_evict)
    result = generate(engine, prompts, config, stream=stream, draft=draft, k=k, kv_policy=policy)
    if len(prompts) == 1:
        out.print()
    if draft is not None:
        st = result.stats
        err.print(f"draft {st['draft']}: {st['accepted']} of {st['drafted']} drafted tokens accepted "
                  f"({st['acceptance']:.0%}), {st['mean_accepted']:.2f} per step, {result.decode_steps} verify steps, "
                  f"{result.decode_tokens_per_second:.1f} tok/s", highlight=False)
    else:
        for p, toks in zip(prompt, result.tokens):
            out.print(f"[bold]{p}[/bold]", highlight=False)
            out.print(art.tokenizer.decode(toks, skip_special_tokens=True), highlight=False, markup=False)
    err.print(f"{sum(map(len, result.tokens))} tokens, prefill {result.prefill_seconds:.2f}s, decode "
              f"{result.decode_tokens_per_second:.1f} tok/s ({engine.name})", highlight=False)
    if "kv" in result.stats:
        kv = result.stats["kv"]
        err.print(f"kv-evict({kv['method']}): kept {kv['kept']} of {kv['prompt']} prompt tokens, {kv['evicted']} "
                  f"evicted while decoding, {kv['held']} held at the end", highlight=False)


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

    if art.info.task != "causal-lm" or not 0 < n < ids.shape[1]:
        raise HeadsmithError(f"--continuation needs a causal LM and 0 < N < the {ids.shape[1]} tokens of the text",
                             "lower --continuation or raise --max-tokens")
    with status("continuation perplexity", quiet=as_json):
        result: dict[str, Any] = {"prompt": int(ids.shape[1] - n), "backend": engine.name,
                                  "policy": continuation_perplexity(engine, ids, ids.shape[1] - n, policy)}
        if getattr(engine, "kv_policy", None) and policy is not False:
            result["full_cache"] = continuation_perplexity(engine, ids, ids.shape[1] - n, False)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for key in ("policy", "full_cache"):
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


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except HeadsmithError as e:
        err.print("[bold red]error:[/bold red] ", end="")
        err.print(e.message, highlight=False, markup=False, soft_wrap=True)
        if e.hint:
            err.print(f"hint: {e.hint}", highlight=False, markup=False, soft_wrap=True)
        if STATE["debug"] and e.__cause__ is not None:
            traceback.print_exception(e.__cause__)
        return e.exit_code
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except typer.Abort:
        err.print("aborted")
        return 130
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
