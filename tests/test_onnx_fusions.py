"""The onnxruntime lowering: FX fusions (RMSNorm, rotary, shared masks, flattened heads), opset-23 /
GroupQueryAttention export, and the in-place KV cache the runtime binds to it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from headsmith.backends.artifact import read_artifact
from headsmith.backends.lowering import fuse_kv_attention, fuse_parallel_linears
from headsmith.backends.onnx_fusions import fuse_for_ort, fuse_rotary
from headsmith.errors import BackendError
from headsmith.fxutil import clone_module
from headsmith.passes.kv_cache import decode_graph, prefill_graph
from headsmith.runtime.engine import engine_for
from headsmith.runtime.generate import GenerationConfig, generate
from headsmith.runtime.kv_cache import CacheSpec, KVCache

from .conftest import tiny_program
from .test_decode_runtime import PROMPTS, artifact, hf_greedy

# per arch: RMSNorms (2 per layer + final; Gemma3 also has pre/post-MLP norms and q/k norms), the norms that
# follow a residual add (all but the first; Gemma3's (1 + w) weights are computed, not stored), rotaries, layers
EXPECTED = {"llama": (5, 4, 4, 2), "qwen2": (5, 4, 4, 2), "phi3": (5, 4, 4, 2), "mistral": (5, 4, 4, 2),
            "gemma3": (13, 0, 4, 2), "gpt2": (0, 0, 0, 2)}


def _decode_inputs(arch: str, batch: int = 2, past: int = 8, new: int = 3) -> tuple[torch.Tensor, ...]:
    program = tiny_program(arch)
    pre, _ = prefill_graph(program)
    ids, pos, mask = program.example_inputs(batch=batch, seq=past + new, seed=3, pad=2)
    with torch.no_grad():
        cache = [c.contiguous() for c in pre(ids[:, :past], pos[:, :past], mask[:, :past])[1:]]
    return (ids[:, past:].contiguous(), pos[:, past:].contiguous(), mask, *cache)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_fusions_rewrite_every_site_and_are_exact(arch: str) -> None:
    dec, _ = decode_graph(tiny_program(arch))
    gm = clone_module(dec)
    fuse_kv_attention(gm)
    fuse_parallel_linears(gm)
    counts = fuse_for_ort(gm)
    norms, skips, rotaries, layers = EXPECTED[arch]
    assert counts == {"rms_norm": norms, "skip_rms_norm": skips, "rotary": rotaries, "attention_masks": layers,
                      "flat_heads": layers}
    inputs = _decode_inputs(arch)
    with torch.no_grad():
        ref, got = dec(*inputs), gm(*inputs)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-5


def test_rotary_fusion_needs_provably_equal_halves() -> None:
    """``x * c + rotate_half(x) * s`` with arbitrary ``c``/``s`` (not built as ``cat([f, f])``) is no rotary."""

    class NotRope(torch.nn.Module):
        def forward(self, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            rotated = torch.cat([-x[..., 4:], x[..., :4]], -1)
            return x * c.unsqueeze(1) + rotated * s.unsqueeze(1)

    x, c, s = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    gm = torch.export.export(NotRope(), (x, c, s)).module()
    assert fuse_rotary(gm) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_onnx_graph_uses_few_large_nodes(arch: str) -> None:
    path = artifact(arch, "onnx")
    backend = read_artifact(path).manifest["backend"]
    assert backend["attention"] == "fused" and backend["opset"] == 23
    assert backend["kv_in_place"] and backend["gqa_layers"] == 2
    decode = onnx.load(str(path / "decode.onnx"), load_external_data=False)
    onnx.checker.check_model(str(path / "decode.onnx"))
    ops = [n.op_type for n in decode.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("RotaryEmbedding") == 4
    assert ops.count("RMSNormalization") == EXPECTED[arch][0] - EXPECTED[arch][1]
    assert ops.count("SkipSimplifiedLayerNormalization") == EXPECTED[arch][1]
    # no cache copies: every present comes straight from the attention kernel
    producer = {o: n.op_type for n in decode.graph.node for o in n.output}
    assert {producer[o.name] for o in decode.graph.output if o.name.startswith("present_")} == {"GroupQueryAttention"}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_in_place_engine_matches_program(arch: str) -> None:
    """Prefill then an 8-token decode (batch 2 with left padding, token by token inside; batch 1 in one call)
    with one shared buffer per cache entry equals the full forward pass; truncate and re-decode reproduces it."""
    program = tiny_program(arch)
    engine = engine_for(read_artifact(artifact(arch, "onnx")))
    ids, pos, mask = program.example_inputs(2, 20, seed=5, pad=3)
    full = program(ids, mask, pos)[:, 12:]
    for rows in (slice(0, 2), slice(1, 2)):
        _, cache = engine.prefill(ids[rows, :12], mask[rows, :12], pos[rows, :12])
        assert cache.in_place
        buffers = [b.ctypes.data for b in cache.past()]
        logits, cache = engine.decode(ids[rows, 12:], mask[rows], pos[rows, 12:], cache)
        assert [b.ctypes.data for b in cache.past()] == buffers  # written in place, nothing reallocated
        assert cache.length == 20
        keep = mask[rows, 12:].bool()
        assert float((logits - full[rows])[keep].abs().max()) <= 1e-4
        if arch == "gemma3":  # its sliding layer's ring (8 slots) has evicted token 14: no rollback
            with pytest.raises(BackendError, match="evicted"):
                cache.truncate(14)
            continue
        cache.truncate(14)
        again, cache = engine.decode(ids[rows, 14:], mask[rows], pos[rows, 14:], cache)
        assert float((again - full[rows, 2:])[mask[rows, 14:].bool()].abs().max()) <= 1e-4


def test_in_place_generation_equals_hf_past_capacity() -> None:
    """64 greedy tokens from a 256-slot prefill cache crosses no capacity; force growth with a tiny one."""
    engine = engine_for(read_artifact(artifact("llama", "onnx")))
    original = engine.new_cache
    engine.new_cache = lambda batch, capacity=256: original(batch, 4)  # type: ignore[method-assign]
    try:
        result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=64, stop_tokens=()))
    finally:
        engine.new_cache = original  # type: ignore[method-assign]
    assert result.tokens == hf_greedy("llama")


def test_kv_cache_in_place_grows_truncates_and_keeps_values() -> None:
    cache = KVCache([CacheSpec("k", (-1, 2, -1, 3), 2)], batch=2, capacity=4, in_place=True)
    first = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)
    cache.store([first])
    assert cache.length == 3 and cache.past()[0].shape == (2, 2, 4, 3)
    assert cache.present_views(1)[0] is cache.past()[0]  # one buffer, bound as past and present
    more = np.concatenate([first, first + 100, first[:, :, :1] + 200], 2)
    cache.store([more])  # 7 tokens > capacity 4: grows, keeps the first 3
    assert cache.length == 7 and cache.capacity >= 7
    np.testing.assert_array_equal(cache.valid()[0], more)
    cache.truncate(2)
    assert cache.length == 2
    np.testing.assert_array_equal(cache.valid()[0], first[:, :, :2])


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral"])
def test_dense_decode_graph_for_steps_without_padding(arch: str) -> None:
    """Without padding the engine runs ``decode_dense.onnx`` (GQA without a mask input: its own causality and
    ``local_window_size``); token by token and 12 tokens at once past the sliding window it equals the program,
    and a padded batch after it switches to ``decode.onnx`` on the same cache buffers."""
    path = artifact(arch, "onnx")
    backend = read_artifact(path).manifest["backend"]
    assert backend["decode_dense"] == "decode_dense.onnx"
    dense = onnx.load(str(path / "decode_dense.onnx"), load_external_data=False)
    gqa = [n for n in dense.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.input) <= 7 for n in gqa)  # no attention_bias
    assert not any(n.op_type == "Where" for n in dense.graph.node)  # and no mask is built
    program = tiny_program(arch)
    engine = engine_for(read_artifact(path))
    assert "decode" not in engine._sessions  # the padded graph loads when first needed
    ids, pos, mask = program.example_inputs(1, 24, seed=7)
    full = program(ids, mask, pos)
    _, cache = engine.prefill(ids[:, :4], mask[:, :4], pos[:, :4])
    for t in range(4, 12):
        logits, cache = engine.decode(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache)
        assert float((logits[:, 0] - full[:, t]).abs().max()) <= 1e-4
    assert list(cache.bindings) == [id(engine.session("decode_dense"))]  # bound once, kept from step to step
    logits, cache = engine.decode(ids[:, 12:], mask, pos[:, 12:], cache)
    assert float((logits - full[:, 12:]).abs().max()) <= 1e-4
    result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=16, stop_tokens=()))  # left padding
    assert result.tokens == [t[:16] for t in hf_greedy(arch)] and "decode" in engine._sessions
