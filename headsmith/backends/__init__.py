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
        from .onnx_quant import DEFAULT_ACCURACY_LEVEL
        attention = options.pop("attention", DEFAULT_VARIANT)
        accuracy_level = int(options.pop("accuracy_level", DEFAULT_ACCURACY_LEVEL))
        _no_more(name, options)
        return lower_onnx(program, directory, progress, variant=attention, accuracy_level=accuracy_level)
    if name in ("tvm", "tensorrt") and program.kv_policy is not None:
        raise BackendError(f"kv-evict({program.kv_policy.method}) is not built for the {name} backend yet: its engine "
                           "returns no attention scores and cannot compact its cache",
                           "convert with --backend onnx or --backend torch")
    if name in ("tvm", "tensorrt") and program.token_merge is not None:
        raise BackendError(f"token-merge is not built for the {name} backend yet (its attention has no key bias)",
                           "convert with --backend onnx or --backend torch")
    if name in ("tvm", "tensorrt") and program.prefill_prune is not None:
        raise BackendError(f"prefill-prune is not built for the {name} backend yet (its engine has no staged "
                           "prefill)", "convert with --backend onnx or --backend torch")
    if name == "tvm":
        from .tvm_backend import DEFAULT_TARGET, lower_tvm
        target = options.pop("target", DEFAULT_TARGET)
        _no_more(name, options)
        return lower_tvm(program, directory, progress, target=target)
    if name == "tensorrt":
        from .tensorrt_backend import DEFAULT_MAX_BATCH, lower_tensorrt
        max_batch = int(options.pop("max_batch", DEFAULT_MAX_BATCH))
        max_tokens = options.pop("max_tokens", None)
        _no_more(name, options)
        return lower_tensorrt(program, directory, progress, max_batch=max_batch, max_tokens=max_tokens)
    raise BackendError(f"backend {name!r} is not available in this version of headsmith",
                       "use --backend torch, onnx, tvm or tensorrt")


def _no_more(name: str, options: dict[str, Any]) -> None:
    if options:
        raise BackendError(f"backend {name!r} has no option(s) {', '.join(sorted(options))}")
