"""TVM and TensorRT backends on the tiny models: numerics, greedy parity, cross-compiles, clear machine errors.

Nothing here needs a GPU: TVM runs on the CPU (``llvm``) and cross-compiles for CUDA; TensorRT-RTX builds
engines on the CPU, and running one here must fail with a BackendError that says why.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.cli import main
from headsmith.errors import BackendError
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, generate

from .conftest import _ROOT, tiny_dir, tiny_program
from .test_decode_runtime import PROMPTS, hf_greedy

pytest.importorskip("tvm")


@functools.cache
def tvm_artifact(arch: str, target: str = "llvm") -> Path:
    out = _ROOT / f"artifact-{arch}-tvm-{target.replace(':', '-')}"
    headsmith.convert(tiny_program(arch), out, backend="tvm", options={"target": target})
    return out


@functools.cache
def cli_tvm_artifact() -> Path:
    """The tiny llama converted through the CLI (``headsmith convert DIR --backend tvm -o OUT``)."""
    out = _ROOT / "artifact-llama-tvm-cli"
    assert main(["convert", str(tiny_dir("llama")), "--backend", "tvm", "-o", str(out)]) == 0
    return out


@functools.cache
def trt_artifact(arch: str) -> Path:
    out = _ROOT / f"artifact-{arch}-tensorrt"
    headsmith.convert(tiny_program(arch), out, backend="tensorrt")
    return out


def _steps_match(engine: object, arch: str) -> None:
    """Prefill 10 tokens, then decode chunks of 1 and several tokens (left padding in the last row)."""
    program = tiny_program(arch)
    ids, pos, mask = program.example_inputs(2, 24, seed=3, pad=4)
    full = program(ids, mask, pos)
    logits, cache = engine.prefill(ids[:, :10], mask[:, :10], pos[:, :10])  # type: ignore[attr-defined]
    assert float((logits[:, 0] - full[:, 9]).abs().max()) <= 1e-3
    t = 10
    for n in (1, 1, 3, 1, 8):
        logits, cache = engine.decode(ids[:, t:t + n], mask[:, :t + n], pos[:, t:t + n], cache)  # type: ignore[attr-defined]
        keep = mask[:, t:t + n].bool()
        assert float((logits - full[:, t:t + n])[keep].abs().max()) <= 1e-3
        t += n
    assert cache.length == 24
    whole = engine.forward(ids, mask, pos)  # type: ignore[attr-defined]
    assert float((whole - full)[mask.bool()].abs().max()) <= 1e-3


# ---- TVM -------------------------------------------------------------------------------------------------
def test_tvm_cli_convert_greedy_equals_hf_and_run(capsys: pytest.CaptureFixture[str]) -> None:
    path = cli_tvm_artifact()
    backend = json.loads((path / "manifest.json").read_text())["backend"]
    assert backend["name"] == "tvm" and (path / backend["library"]).exists()
    assert backend["target"]["kind"] == "llvm" and backend["target"]["mcpu"]
    engine = engine_for(read_artifact(path))
    assert engine.name == "tvm"
    result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=64, stop_tokens=()))
    assert result.tokens == hf_greedy("llama")
    capsys.readouterr()
    code = main(["run", str(path), "--prompt", "In the beginning", "--max-new-tokens", "5", "--no-chat"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 tokens" in captured.err and "(tvm)" in captured.err


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tvm_logits_match_the_program(arch: str) -> None:
    """Prefill + decode steps (one and several tokens, left padding) within 1e-3; gemma3 has a sliding window
    of 8 keys in layer 0, so the later steps exercise it."""
    path = cli_tvm_artifact() if arch == "llama" else tvm_artifact(arch)
    _steps_match(engine_for(read_artifact(path)), arch)


def test_tvm_cache_grows_past_its_capacity() -> None:
    engine = engine_for(read_artifact(cli_tvm_artifact()))
    program = tiny_program("llama")
    ids, pos, mask = program.example_inputs(1, 40, seed=1)
    _, cache = engine.prefill(ids[:, :4], mask[:, :4], pos[:, :4])
    cache.tensors = [t.narrow(2, 0, 5).clone() for t in cache.tensors]  # capacity 5: the next step grows it
    logits, cache = engine.decode(ids[:, 4:40], mask, pos[:, 4:40], cache)
    assert cache.capacity >= 40 and cache.length == 40
    assert float((logits - program(ids, mask, pos)[:, 4:]).abs().max()) <= 1e-3


def test_tvm_cuda_cross_compile_builds_and_refuses_to_run_without_a_gpu() -> None:
    path = tvm_artifact("llama", "cuda:sm_90")
    target = json.loads((path / "manifest.json").read_text())["backend"]["target"]
    assert target == {"kind": "cuda", "arch": "sm_90", "spec": "cuda:sm_90"}
    assert (path / "model.so").stat().st_size > 0
    if engine_cuda_available():
        pytest.skip("a CUDA GPU is present: the no-GPU error cannot be checked")
    with pytest.raises(BackendError, match="compiled for cuda:sm_90, but no CUDA GPU"):
        engine_for(read_artifact(path))


def test_tvm_cuda_library_has_no_powf() -> None:
    """CUDA's fast math computes ``powf(x, 2)`` as ``exp2(2 log2 x)``: NaN for negative x. RMSNorm's square
    must be a product (seen on an H200: every logit NaN before the ``pow`` converter)."""
    source = (tvm_artifact("llama", "cuda:sm_90") / "model.so").read_bytes()
    assert b"__global__" in source  # the library carries its CUDA C++, compiled when it loads
    assert b"powf" not in source


def test_tvm_cuda_graph_matches_the_program_on_the_cpu() -> None:
    """The CUDA lowering's prefill (Relax matmuls, composed attention, no packed CPU kernels), compiled for
    the CPU instead, computes the program's logits: the GPU run differs only in its schedules."""
    from .conftest import cuda_prefill_on_cpu

    program = tiny_program("llama")
    ids, pos, mask = program.example_inputs(1, 12, seed=3)
    ref = program(ids, mask, pos)[:, -1:]
    assert float((cuda_prefill_on_cpu(program, ids, pos, mask).reshape(ref.shape) - ref).abs().max()) <= 1e-4


def engine_cuda_available() -> bool:
    import tvm
    return bool(tvm.cuda(0).exist)


def test_tvm_library_for_a_cpu_this_machine_lacks_is_refused(tmp_path: Path) -> None:
    """A library compiled for Sapphire Rapids (AVX-512, AMX) must not be loaded on a CPU without them."""
    from headsmith.backends.tvm_backend import host_features

    if {"avx512f", "amx-tile"} <= host_features():
        pytest.skip("this CPU has AVX-512 and AMX: a Sapphire Rapids library runs here")
    out = tmp_path / "spr"
    headsmith.convert(tiny_program("bert"), out, backend="tvm", options={"target": "llvm:sapphirerapids"})
    record = json.loads((out / "manifest.json").read_text())["backend"]["target"]
    assert record["mcpu"] == "sapphirerapids" and "avx512f" in record["features"]
    with pytest.raises(BackendError, match="compiled for CPU 'sapphirerapids'.*lacks them"):
        engine_for(read_artifact(out))


def test_tvm_bad_target_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_out: Path) -> None:
    code = main(["convert", str(tiny_dir("llama")), "--backend", "tvm", "--tvm-target", "cuda:sm80",
                 "-o", str(tmp_out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown CUDA arch 'sm80'" in err and "Traceback" not in err
    code = main(["convert", str(tiny_dir("llama")), "--backend", "onnx", "--tvm-target", "llvm", "-o", str(tmp_out)])
    assert code == 2 and "--tvm-target applies to --backend tvm only" in capsys.readouterr().err
    with pytest.raises(BackendError, match="LLVM does not know the CPU 'no-such-cpu'"):
        headsmith.convert(tiny_program("llama"), tmp_out, backend="tvm", options={"target": "llvm:no-such-cpu"})
    assert not tmp_out.exists()


def test_tvm_artifact_with_a_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(cli_tvm_artifact(), copy)
    (copy / "model.so").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"].pop("model.so")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="TVM library .* is missing"):
        engine_for(read_artifact(copy))


# ---- TensorRT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "engines"), [("llama", ["decode.engine", "prefill.engine"]),
                                               ("bert", ["model.engine"])])
def test_tensorrt_engines_build(arch: str, engines: list[str]) -> None:
    pytest.importorskip("tensorrt_rtx" if _flavour() == "tensorrt-rtx" else "tensorrt")
    path = trt_artifact(arch)
    backend = json.loads((path / "manifest.json").read_text())["backend"]
    assert backend["flavour"] == _flavour() and backend["version"]
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".engine") == engines
    assert all((path / e).stat().st_size > 100_000 for e in engines)
    assert backend["profiles"]["batch"] == [1, 1, 8] and backend["profiles"]["past"][0] == 0
    assert not list(path.glob("*.onnx*"))  # the ONNX files are a build step, not part of the artifact


def test_tensorrt_engine_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorrt_rtx" if _flavour() == "tensorrt-rtx" else "tensorrt")
    from headsmith.runtime.tensorrt_engine import CudaDriver

    try:
        CudaDriver()
    except BackendError:
        pass
    else:
        pytest.skip("a CUDA GPU is present")
    path = trt_artifact("llama")
    with pytest.raises(BackendError, match="need an NVIDIA GPU"):
        engine_for(read_artifact(path))
    code = main(["run", str(path), "--prompt", "hello", "--max-new-tokens", "2", "--no-chat"])
    err = capsys.readouterr().err
    assert code == 2 and "need an NVIDIA GPU" in err and "Traceback" not in err


def _flavour() -> str:
    try:
        from headsmith.backends.tensorrt_backend import import_tensorrt
        return import_tensorrt()[1]
    except BackendError:
        return "tensorrt-rtx"


def test_tensorrt_wrong_version_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx" if _flavour() == "tensorrt-rtx" else "tensorrt")
    copy = tmp_path / "copy"
    shutil.copytree(trt_artifact("bert"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"]["version"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="built with .* 0.0.1, but .* is installed"):
        engine_for(read_artifact(copy))


@pytest.mark.parametrize("spec", ["prune-layers(n=1), prune-heads(n=1, score=random), prune-mlp(ratio=0.25)",
                                  "mla(kv_fraction=0.5)"])
def test_tvm_runs_pruned_and_latent_programs(tmp_path: Path, spec: str) -> None:
    """Non-uniform layers (uneven GQA groups expanded in the graph) and MLA's latent cache lower to TVM too."""
    from headsmith.passes import PassContext
    from headsmith.runtime.engine import TorchEngine
    program = tiny_program("mistral")
    out = program.apply(spec, PassContext(seed=2, source=program))
    headsmith.convert(out, tmp_path / "a", backend="tvm")
    engine = engine_for(read_artifact(tmp_path / "a"))
    ids, pos, mask = out.example_inputs(2, 16, seed=4, pad=3)
    logits, cache = engine.prefill(ids[:, :9], mask[:, :9], pos[:, :9])
    step, cache = engine.decode(ids[:, 9:], mask, pos[:, 9:], cache)
    full = out(ids, mask, pos)
    assert float((logits[:, 0] - full[:, 8]).abs().max()) <= 1e-3
    assert float((step - full[:, 9:])[mask[:, 9:].bool()].abs().max()) <= 1e-3
    cfg = GenerationConfig(max_new_tokens=12, stop_tokens=())
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [9, 10]]
    assert generate(engine, prompts, cfg).tokens == generate(TorchEngine.from_program(out), prompts, cfg).tokens
