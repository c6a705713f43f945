"""sparse-attention(pattern=block|power): the block layouts against a mask built from their definitions, the
FlexAttention prefill forced both ways, and generation on every engine equal to the dense masked reference."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import headsmith
from headsmith import block_sparse, ops
from headsmith.backends.artifact import read_artifact
from headsmith.block_sparse import BlockPattern
from headsmith.errors import HeadsmithError
from headsmith.passes.kv_cache import cache_layout
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for

from .conftest import _ROOT, tiny_program
from .test_sparse_attention import check_generation

POWER = "sparse-attention(pattern=power, block=4)"
BLOCK = "sparse-attention(pattern=block, block=4, local=2, stride=3)"


def reference_mask(pattern: BlockPattern, tokens: int) -> torch.Tensor:
    """``[T, T]`` bool from the layouts' definitions, block pair by block pair (no shared code with the op)."""
    n = -(-tokens // pattern.size)
    powers = {2 ** e for e in range(12)}
    blocks = torch.zeros(n, n, dtype=torch.bool)
    for qb in range(n):
        for kb in range(qb + 1):
            d = qb - kb
            seen = d < pattern.local or kb < pattern.sink
            if pattern.kind == "block":
                seen = seen or (pattern.stride > 0 and kb % pattern.stride == pattern.stride - 1)
            else:
                seen = seen or d in powers
            blocks[qb, kb] = seen
    token = torch.arange(tokens) // pattern.size
    return blocks[token[:, None], token[None, :]] & torch.ones(tokens, tokens, dtype=torch.bool).tril()


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


LAYOUTS = [BlockPattern("power", 16, 1, 1), BlockPattern("power", 32, 2, 0), BlockPattern("block", 16, 3, 1, 4),
           BlockPattern("block", 48, 1, 2, 0)]


@pytest.mark.parametrize("pattern", LAYOUTS, ids=lambda p: p.encode())
def test_layout_masks_follow_their_definitions(pattern: BlockPattern) -> None:
    tokens = 203  # not a multiple of any block
    allowed = ops.attention_mask_bias(None, tokens, tokens, True, 0, 0, torch.float32, torch.device("cpu"),
                                      pattern.encode())
    assert allowed is not None
    assert torch.equal(allowed[0, 0] == 0, reference_mask(pattern, tokens))
    want = reference_mask(pattern, 64 * pattern.size)[::pattern.size, ::pattern.size]
    assert pattern.density(64 * pattern.size) == pytest.approx(float(want.sum()) / (64 * 65 / 2))


@pytest.mark.parametrize("flex", [True, False], ids=["flex", "dense"])
@pytest.mark.parametrize("pattern", LAYOUTS[::2], ids=lambda p: p.encode())
def test_prefill_kernel_equals_the_masked_reference_both_ways(monkeypatch: pytest.MonkeyPatch, flex: bool,
                                                              pattern: BlockPattern) -> None:
    """FlexAttention runs the long prefills (forced here from 64 tokens), the dense masked kernel the rest."""
    monkeypatch.setattr(block_sparse, "FLEX_MIN_TOKENS", 64 if flex else 1 << 30)
    calls = []
    real = block_sparse._compiled_flex
    monkeypatch.setattr(block_sparse, "_compiled_flex", lambda: calls.append(1) or real())
    torch.manual_seed(0)
    tokens = 211
    q, k, v = torch.randn(1, 4, tokens, 16), torch.randn(1, 2, tokens, 16), torch.randn(1, 2, tokens, 16)
    out = ops.attention(q, k, v, None, True, 0.0, 0, 0, 0.0, 0, pattern.encode())
    assert bool(calls) == flex and not block_sparse._flex_broken
    want = masked_sdpa(q, k, v, reference_mask(pattern, tokens))
    assert float((out - want).abs().max()) < 1e-5
    # padding keys (a batch of two, left-padded) and decode-shaped queries take the dense kernel
    mask = torch.ones(1, tokens, dtype=torch.bool)
    mask[0, :3] = False
    out = ops.attention(q, k, v, mask, True, 0.0, 0, 0, 0.0, 0, pattern.encode())
    allowed = reference_mask(pattern, tokens) & mask[0][None]
    rows = slice(3, None)  # rows 0..2 see only padding (the mean of v, checked elsewhere)
    assert float((out[:, :, rows] - masked_sdpa(q, k, v, allowed)[:, :, rows]).abs().max()) < 1e-5
    step = ops.attention(q[:, :, -2:], k, v, None, True, 0.0, 0, 0, 0.0, 0, pattern.encode())
    assert float((step - want[:, :, -2:]).abs().max()) < 1e-5


def test_a_failing_flex_compile_falls_back_to_the_dense_kernel(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Inductor needs a C++ compiler at run time: where it fails, one warning and the dense masked kernel."""
    def no_compiler(*args: object, **kwargs: object) -> None:
        raise RuntimeError("C++ compile error\n(hundreds of lines)")

    monkeypatch.setattr(block_sparse, "FLEX_MIN_TOKENS", 64)
    monkeypatch.setattr(block_sparse, "_flex_broken", False)
    monkeypatch.setattr(block_sparse, "_compiled_flex", lambda: no_compiler)
    pattern = LAYOUTS[0]
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 150, 16), torch.randn(1, 2, 150, 16), torch.randn(1, 2, 150, 16)
    with caplog.at_level("WARNING", logger="headsmith.block_sparse"):
        for _ in range(2):
            out = ops.attention(q, k, v, None, True, 0.0, 0, 0, 0.0, 0, pattern.encode())
            assert float((out - masked_sdpa(q, k, v, reference_mask(pattern, 150))).abs().max()) < 1e-5
    assert block_sparse._flex_broken
    assert [r.getMessage().endswith("C++ compile error); block-sparse prefill falls back to the dense masked kernel")
            for r in caplog.records] == [True]  # once, first line only


@functools.cache
def blocked(arch: str, spec: str) -> Program:
    return tiny_program(arch).apply(spec)


@pytest.mark.parametrize("spec", [POWER, BLOCK], ids=["power", "block"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_block_layouts_decode_equals_the_dense_mask(arch: str, spec: str) -> None:
    program = blocked(arch, spec)
    kinds = {la.index: la.kind for la in program.spec().layers}
    assert "block-sparse" in kinds.values()
    if arch == "gemma3":  # its sliding layer keeps its own window
        assert kinds == {0: "sliding", 1: "block-sparse"}
    full = {i for i, kind in kinds.items() if kind == "block-sparse"}
    assert all(e.capacity == 0 for e in cache_layout(program, ring=True) if e.layer in full)  # the whole cache
    check_generation(TorchEngine.from_program(program), program)


def test_block_layouts_change_the_logits() -> None:
    """The layout hides keys (a pattern the op ignored would pass every equality above)."""
    base, program = tiny_program("llama"), blocked("llama", POWER)
    ids = torch.arange(5, 60)[None]
    args = (ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    with torch.no_grad():
        a, b = base(*args), program(*args)
    assert float((a[:, :8] - b[:, :8]).abs().max()) < 1e-5  # the first two blocks see all they saw before
    assert float((a[:, -8:] - b[:, -8:]).abs().max()) > 1e-2


def check_logits(engine: object, program: Program) -> None:
    """Forward, prefill and a 30-token decode step against the program's whole-sequence logits (the layout
    hides keys from the last blocks here, see the test above)."""
    ids = torch.arange(7, 63)[None]
    full = program(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None]).detach()
    mask = torch.ones_like(ids)
    forward = engine.forward(ids, mask, torch.arange(ids.shape[1])[None])  # type: ignore[attr-defined]
    assert float((forward - full).abs().max()) < 1e-3
    _, cache = engine.prefill(ids[:, :26], mask[:, :26], torch.arange(26)[None])  # type: ignore[attr-defined]
    logits, _ = engine.decode(ids[:, 26:], mask, torch.arange(26, ids.shape[1])[None], cache)  # type: ignore[attr-defined]
    assert float((logits - full[:, 26:]).abs().max()) < 1e-3


@pytest.mark.parametrize("spec", [POWER, BLOCK], ids=["power", "block"])
def test_block_layouts_on_onnx_runtime_equal_the_dense_mask(spec: str) -> None:
    out = _ROOT / f"blocks-llama-onnx-{abs(hash(spec))}"
    headsmith.convert(blocked("llama", spec), out, backend="onnx")
    engine = engine_for(read_artifact(out))
    check_logits(engine, blocked("llama", spec))
    check_generation(engine, blocked("llama", spec))


@pytest.mark.slow
def test_block_layouts_on_tvm_equal_the_dense_mask() -> None:
    pytest.importorskip("tvm")
    out = _ROOT / "blocks-llama-tvm"
    headsmith.convert(blocked("llama", POWER), out, backend="tvm")
    engine = engine_for(read_artifact(out))
    check_logits(engine, blocked("llama", POWER))
    check_generation(engine, blocked("llama", POWER))


@pytest.mark.parametrize("spec", ["gqa(kv_heads=1), " + POWER, "mla(kv_fraction=0.5), " + POWER,
                                  "prune-heads(ratio=0.5), " + BLOCK,
                                  POWER + ", sparse-attention(pattern=razor, window=6, sinks=2, kv_budget=0.8, "
                                          "context=64, calibration_length=32)"])
def test_block_layouts_compose_with_other_passes(spec: str) -> None:
    program = blocked("llama", spec)
    check_generation(TorchEngine.from_program(program), program)


@pytest.mark.parametrize(("spec", "message"), [
    ("sparse-attention(pattern=power, stride=4)", "stride is an option of the block layout"),
    ("sparse-attention(pattern=block, block=0)", "block >= 1"),
    ("sparse-attention(pattern=streaming, stride=2)", "stride is an option of pattern=block"),
    ("sparse-attention(pattern=moa)", "not built yet"),
])
def test_block_layouts_reject_bad_options(spec: str, message: str) -> None:
    with pytest.raises(HeadsmithError, match=message):
        tiny_program("llama").apply(spec)


def test_block_layouts_refuse_encoders_and_hf_export(tmp_path: Path) -> None:
    with pytest.raises(HeadsmithError, match="encoder"):
        tiny_program("bert").apply(POWER)
    with pytest.raises(HeadsmithError, match="block layouts"):
        headsmith.convert(blocked("llama", POWER), tmp_path / "a", options={"export": "hf"})
    assert not (tmp_path / "a").exists()


def test_block_layouts_lower_for_gpu_engines(tmp_path: Path) -> None:
    """TVM's CUDA lowering (composed attention, compiled for the CPU instead) computes the layout; TensorRT's
    parser takes the plain ONNX translation (its integer rules: Div, Mod, BitwiseAnd) and builds engines."""
    pytest.importorskip("tvm")
    from .conftest import cuda_prefill_on_cpu

    program = blocked("llama", POWER)
    ids = torch.arange(7, 63)[None]
    pos, mask = torch.arange(ids.shape[1])[None], torch.ones_like(ids)
    ref = program(ids, mask, pos)[:, -1:]
    assert float((cuda_prefill_on_cpu(program, ids, pos, mask).reshape(ref.shape) - ref).abs().max()) <= 1e-4
    pytest.importorskip("tensorrt_rtx")
    headsmith.convert(program, tmp_path / "trt", backend="tensorrt")
    assert sorted(p.name for p in (tmp_path / "trt").iterdir() if p.suffix == ".engine") == [
        "decode.engine", "prefill.engine"]
