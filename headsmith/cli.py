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

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .cli_common import (
    STATE,
    KvBudget,
    KvMethod,
    KvOff,
    KvTokens,
    PruneOff,
    _artifact,
    _progress,
    app,
    err,
    out,
    prefill_option,
    status,
)
from .errors import HeadsmithError


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


# ---- run ---------------------------------------------------------------------------------------------
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
    no_prefill_prune: PruneOff = False,
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
    prefill_option(engine, no_prefill_prune)
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


# eval and bench join the app after run (--help lists the commands in this order)
from . import cli_eval  # noqa: F401, I001
from . import cli_bench  # noqa: F401


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
