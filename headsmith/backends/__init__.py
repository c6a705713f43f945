"""Backends: lower a program into an artifact directory and run it.

``lower(name, program, directory, progress)`` writes the backend's files into ``directory`` and returns the
manifest's ``backend`` record. The torch backend's files (``prefill.pt2``/``decode.pt2``) are written by
``artifact.write_artifact`` itself; ``onnx`` writes ``prefill.onnx``/``decode.onnx`` (or ``model.onnx``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..program import Program


def lower(name: str, program: Program, directory: Path, progress: Any = None,
          options: dict[str, Any] | None = None) -> dict[str, Any]:
    options = dict(options or {})
    if name == "onnx":
        from .onnx_backend import DEFAULT_VARIANT, lower_onnx
        attention = options.pop("attention", DEFAULT_VARIANT)
        _no_more(name, options)
        return lower_onnx(program, directory, progress, variant=attention)
    raise BackendError(f"backend {name!r} is not available in this version of headsmith",
                       "use --backend torch or --backend onnx")


def _no_more(name: str, options: dict[str, Any]) -> None:
    if options:
        raise BackendError(f"backend {name!r} has no option(s) {', '.join(sorted(options))}")


def engine_for_backend(artifact: Any, threads: int | None = None) -> Any:
    """The runtime engine for backends other than torch and onnx."""
    name = artifact.manifest["backend"]["name"]
    raise BackendError(f"artifact {artifact.path} was built for backend {name!r}, which this version cannot run",
                       "convert it again with --backend torch or --backend onnx")
