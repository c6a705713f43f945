"""TensorRT backend: the ONNX lowering, constant-folded, built into serialized TensorRT engines.

``lower_onnx`` (the plain, standard-op attention) writes ``prefill.onnx`` / ``decode.onnx`` (or
``model.onnx`` for encoders) into a scratch directory; onnxscript's optimizer folds the shape constants
(TensorRT's parser wants reduce axes and reshape targets as build-time constants); TensorRT's
``OnnxParser`` reads the result and ``build_serialized_network`` writes ``prefill.engine`` /
``decode.engine`` (or ``model.engine``) into the artifact. The ONNX files are not kept.

Flavours: the ``tensorrt`` module where it is installed (it needs a GPU to build), else ``tensorrt_rtx``
(TensorRT for RTX, ``pip install tensorrt-rtx``), which builds engines on a machine without a GPU and
compiles them for the GPU at load time. The manifest records the flavour and version; engines run only
under the same ones.

Each engine has one optimisation profile over the dynamic dims the ONNX backend names: ``batch``
(``1..max_batch``), ``seq`` (prefill / forward tokens), ``new`` (decode tokens), ``past`` (cached tokens,
from 0) and ``total`` (``past + new``), all up to ``max_tokens``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..program import Program

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_TOKENS = 4096
ENGINES = {"prefill": "prefill.engine", "decode": "decode.engine", "forward": "model.engine"}


def import_tensorrt() -> tuple[Any, str]:
    """``(module, flavour)``: ``tensorrt`` if installed, else ``tensorrt_rtx``."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
        return trt, "tensorrt"
    except ImportError:
        pass
    try:
        import tensorrt_rtx as trt  # type: ignore[import-not-found]
        return trt, "tensorrt-rtx"
    except ImportError:
        raise BackendError("neither tensorrt nor tensorrt_rtx is installed",
                           "pip install tensorrt-rtx (builds engines without a GPU), or install TensorRT") from None


def profile_ranges(max_batch: int, max_tokens: int) -> dict[str, tuple[int, int, int]]:
    """``dim name -> (min, opt, max)`` for the dynamic dims of the ONNX graphs."""
    if max_batch < 1 or max_tokens < 2:
        raise BackendError(f"TensorRT profile needs max_batch >= 1 and max_tokens >= 2, got {max_batch} and "
                           f"{max_tokens}")
    return {"batch": (1, 1, max_batch), "seq": (1, min(128, max_tokens), max_tokens),
            "new": (1, 1, max_tokens), "past": (0, min(512, max_tokens - 1), max_tokens - 1),
            "total": (1, min(513, max_tokens), max_tokens)}


def fold_constants(src: Path, dst: Path) -> None:
    """``src`` with its constant subgraphs folded (onnxscript's optimizer), saved as ``dst`` + ``.data``."""
    import onnx_ir as ir
    import onnxscript

    model = ir.load(str(src))
    onnxscript.optimizer.optimize(model)
    ir.save(model, str(dst), external_data=dst.name + ".data")


def build_engine(trt: Any, onnx_path: Path, ranges: dict[str, tuple[int, int, int]]) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with one optimisation profile."""
    import onnx

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path.name}: {errors[:500]}",
                           "use --backend onnx, or report the op named above")
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(onnx_path), load_external_data=False).graph.input}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = dims[tensor.name]
        unknown = [d for d in shape if isinstance(d, str) and d not in ranges]
        if unknown:
            raise BackendError(f"input {tensor.name} of {onnx_path.name} has dims {unknown} with no profile range")
        low, opt, high = ([ranges[d][k] if isinstance(d, str) else int(d) for d in shape] for k in range(3))
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path.name} (see the messages above)")
    return bytes(serialized)


def lower_tensorrt(program: Program, directory: Path, progress: Any = None, max_batch: int = DEFAULT_MAX_BATCH,
                   max_tokens: int | None = None) -> dict[str, Any]:
    """Write ``prefill.engine`` + ``decode.engine`` (or ``model.engine``) into ``directory``."""
    from ..qweights import packed_args
    from .onnx_backend import lower_onnx

    if any(packed_args(n) is not None for n in program.gm.graph.nodes):
        raise BackendError("the TensorRT backend cannot build engines from int4/int8 blocks yet (they lower to "
                           "onnxruntime's MatMulNBits, which TensorRT's ONNX parser does not know)",
                           "use --backend onnx or tvm for quantize(weights=int4|int8), or quantize(weights=fp16) "
                           "for TensorRT")
    if program.drafts:
        raise BackendError(f"the TensorRT backend does not build speculative drafts yet (the program has "
                           f"{', '.join(d.name for d in program.drafts)})",
                           "use --backend onnx, tvm or torch for draft(...), or decode with --draft ngram")
    trt, flavour = import_tensorrt()
    limit = program.info.max_positions or DEFAULT_MAX_TOKENS
    tokens = int(max_tokens) if max_tokens is not None else min(limit, DEFAULT_MAX_TOKENS)
    ranges = profile_ranges(int(max_batch), tokens)
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="headsmith-trt-"))
    try:
        record = lower_onnx(program, scratch, progress, variant="plain", ring=False)
        engines: dict[str, str] = {}
        for key, engine_name in ENGINES.items():
            if key not in record:
                continue
            folded = scratch / f"folded_{record[key]}"
            _say(progress, f"folding constants of {record[key]}")
            fold_constants(scratch / record[key], folded)
            _say(progress, f"building {engine_name} with {flavour} {trt.__version__}")
            (directory / engine_name).write_bytes(build_engine(trt, folded, ranges))
            engines[key] = engine_name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"name": "tensorrt", "flavour": flavour, "version": str(trt.__version__), **engines,
            "profiles": {k: list(v) for k, v in ranges.items()}, "onnx_opset": record["opset"],
            "onnx_attention": "plain", "cache": record["cache"],
            "build_seconds": round(time.perf_counter() - start, 1)}


def _say(progress: Any, text: str) -> None:
    if progress is not None:
        progress(text)
