"""headsmith: compiler-style graph rewriting for pretrained transformers.

Public API::

    import headsmith
    program = headsmith.load("smollm2-135m")          # capture + raise attention
    smaller = program.apply("gqa(kv_heads=1), dce")   # run passes (a new Program)
    headsmith.convert("smollm2-135m", "out", passes="dce", backend="torch")
    artifact = headsmith.load_artifact("out")         # read back, verify checksums, run

Custom passes subclass :class:`Pass` and register with :func:`register_pass` (see
``examples/custom_pass.py``).
"""

from __future__ import annotations

from pathlib import Path

from . import ops as _ops  # noqa: F401  (registers torch.ops.headsmith)
from ._version import __version__
from .errors import HeadsmithError
from .passes import Pass, PassContext, PassResult, register_pass
from .program import ModelSpec, Program


def load(model: str | Path, *, raise_attention: bool = True, allow_pickle: bool = False,
         install: bool = True, ctx: PassContext | None = None) -> Program:
    """Load ``model`` (built-in name, HF directory or .gguf file), capture it and raise its attention."""
    from .frontend.capture import capture
    from .frontend.load import load_hf

    loaded = load_hf(model, allow_pickle=allow_pickle, install=install)
    program, seconds = capture(loaded)
    program = program.apply("raise-attention" if raise_attention else "canonicalize", ctx)
    reports = ({"pass": "capture", "seconds": round(seconds, 3)}, *program.reports)
    return Program(gm=program.gm, info=program.info, source=program.source, tokenizer=program.tokenizer,
                   history=program.history, reports=reports)


def convert(model: str | Path | Program, output: str | Path, *, passes: str = "", backend: str = "torch",
            force: bool = False, ctx: PassContext | None = None, allow_pickle: bool = False,
            options: dict[str, object] | None = None) -> Path:
    """Load (unless given a Program), apply ``passes`` and write an artifact directory to ``output``."""
    from .backends.artifact import write_artifact, check_output_path

    out = check_output_path(Path(output), model if not isinstance(model, Program) else None, force)
    program = model if isinstance(model, Program) else load(model, allow_pickle=allow_pickle, ctx=ctx)
    if passes.strip():
        program = program.apply(passes, ctx)
    return write_artifact(program, out, backend=backend, force=force, options=options)


def load_artifact(path: str | Path):  # noqa: ANN201  (returns backends.artifact.Artifact)
    """Read an artifact directory written by :func:`convert` (checksums are verified)."""
    from .backends.artifact import read_artifact
    return read_artifact(Path(path))


__all__ = ["HeadsmithError", "ModelSpec", "Pass", "PassContext", "PassResult", "Program", "__version__",
           "convert", "load", "load_artifact", "register_pass"]
