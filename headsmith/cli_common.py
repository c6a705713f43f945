"""What the ``headsmith`` commands share: the typer app, the consoles, progress display, artifact and source
loading, the KV-eviction options (``cli.py``, ``cli_eval.py`` and ``cli_bench.py`` add the commands)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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
PruneOff = Annotated[bool, typer.Option("--no-prefill-prune", help="prefill-prune artifacts: run the full prefill.")]


def prefill_option(engine: Any, off: bool) -> None:
    """``--no-prefill-prune``: a prefill-prune artifact's engine runs its full prefill."""
    if off and hasattr(engine, "prune"):
        engine.prune = False
