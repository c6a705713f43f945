"""The ``headsmith`` command line.

    headsmith inspect MODEL [--json]
    headsmith passes
    headsmith convert MODEL --passes SPEC --backend torch -o OUT [--force]

User errors print ``error: <what is wrong>`` and a ``hint:`` line on stderr and exit with code 2;
``--debug`` (before the command) shows the traceback of wrapped errors too.
"""

from __future__ import annotations

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
) -> None:
    """Layers, attention kind per layer, heads / KV heads / head dim, parameters and KV-cache bytes per token."""
    from .program import ModelSpec

    path = Path(model)
    if (path / "manifest.json").exists():
        from .backends.artifact import read_manifest
        manifest = read_manifest(path)
        spec, extra = ModelSpec.from_dict(manifest["model"]), {"passes": manifest["passes"], "artifact": str(path)}
    else:
        import headsmith
        with status(f"loading and capturing {model}", quiet=as_json):
            program = headsmith.load(model, allow_pickle=allow_pickle)
        spec = program.spec()
        extra = {"source": program.source.name, "capture_seconds": program.reports[0].get("seconds")}
    d = spec.to_dict()
    d.update(extra)
    if as_json:
        out.print_json(json.dumps(d))
        return
    _print_spec(spec, extra)


def _print_spec(spec: Any, extra: dict[str, Any]) -> None:
    title = f"{spec.architecture} ({spec.task}) — {spec.n_layers} layers, {spec.params:,} parameters"
    table = Table(title=title)
    for col in ("layer", "kind", "heads", "kv heads", "head dim", "window", "rope dims", "qk norm", "cache/token"):
        table.add_column(col, justify="right" if col not in ("kind",) else "left")
    for layer in spec.layers:
        table.add_row(str(layer.index), layer.kind, str(layer.n_heads), str(layer.n_kv_heads),
                      str(layer.head_dim) if layer.head_dim == layer.v_head_dim else f"{layer.head_dim}/{layer.v_head_dim}",
                      str(layer.window or "-"), str(layer.rope_dims or "-"), "yes" if layer.qk_norm else "no",
                      str(layer.cache_width))
    out.print(table)
    kv16, kv32 = spec.kv_bytes_per_token(2), spec.kv_bytes_per_token(4)
    out.print(f"KV cache per token: {kv16:,} bytes (fp16), {kv32:,} bytes (fp32)   hidden {spec.hidden_size}, "
              f"vocab {spec.vocab_size:,}")
    if "capture_seconds" in extra:
        out.print(f"captured with torch.export in {extra['capture_seconds']:.1f}s")
    if "passes" in extra:
        out.print(f"passes: {', '.join(extra['passes']) or '(none)'}")


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
) -> None:
    """Load MODEL, apply the passes and write an artifact directory for BACKEND."""
    import headsmith
    from .backends.artifact import BACKENDS, check_output_path, write_artifact
    from .errors import BackendError
    from .passes import PassContext, parse_passes

    pass_list = parse_passes(pass_spec)  # fail fast on a bad spec, before loading anything
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    check_output_path(output, model, force)
    ctx = PassContext(seed=seed, verify=verify, dump_dir=dump, calibration_text=text, progress=_progress(False))
    with status(f"loading, capturing and raising {model}"):
        program = headsmith.load(model, allow_pickle=allow_pickle)
    if pass_list:
        with status(f"applying {pass_spec}"):
            program = program.apply(pass_list, ctx)
    with status(f"writing the {backend} artifact to {output}"):
        write_artifact(program, output, backend=backend, force=force, progress=_progress(False))
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
