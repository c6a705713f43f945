"""sparse-attention: the streaming pattern (sinks + window), its ring caches on every engine, and its errors."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.errors import BackendError, HeadsmithError
from headsmith.passes.kv_cache import cache_layout
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.generate import GenerationConfig, generate
from headsmith.runtime.ring import Ring

from .conftest import _ROOT, tiny_program

STREAMING = "sparse-attention(window=5, sinks=2)"  # capacity 7: 40 new tokens wrap the ring five times
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 3, 4], [12, 13, 14, 15, 16, 17, 18, 19, 20]]  # equal lengths: no padding
NEW = 40


@functools.cache
def streaming(arch: str, spec: str = STREAMING) -> Program:
    return tiny_program(arch).apply(spec)


def dense_greedy(program: Program, prompt: list[int], n: int = NEW) -> list[int]:
    """Greedy tokens from the whole-sequence forward: the pattern as a dense mask, no cache."""
    ids = list(prompt)
    for _ in range(n):
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = program(t, torch.ones_like(t), torch.arange(len(ids))[None])
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def check_generation(engine: object, program: Program) -> None:
    want = [dense_greedy(program, p) for p in PROMPTS]
    config = GenerationConfig(max_new_tokens=NEW, stop_tokens=())
    assert generate(engine, [PROMPTS[0]], config).tokens == want[:1]  # type: ignore[arg-type]
    assert generate(engine, PROMPTS, config).tokens == want  # type: ignore[arg-type]


@functools.cache
def artifact(arch: str, backend: str, spec: str = STREAMING) -> Path:
    out = _ROOT / f"streaming-{arch}-{backend}-{abs(hash(spec))}"
    headsmith.convert(streaming(arch, spec), out, backend=backend)
    return out


def test_ring_slot_plan_follows_a_simulated_ring() -> None:
    ring = Ring(2, 5, "r")
    slots: list[int] = []
    for token in range(40):  # simulate: append while there is room, else overwrite the oldest non-sink
        if len(slots) < ring.capacity - 1:
            slots.append(token)
        else:
            oldest = min(range(ring.sinks, len(slots)), key=lambda s: slots[s])
            slots[oldest] = token
        assert ring.tokens(token + 1).tolist() == slots
        assert sorted(slots) == [*range(min(2, token + 1)), *range(max(2, token + 1 - 4), token + 1)][:len(slots)] \
            or token < ring.capacity - 1
    assert ring.fits(3, 10) == 4 and ring.fits(30, 10) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_streaming_decode_equals_the_dense_mask_far_past_the_window(arch: str) -> None:
    program = streaming(arch)
    entries = cache_layout(program, ring=True)
    assert all(e.capacity == 7 and e.window == 5 and e.sinks == 2 for e in entries)
    check_generation(TorchEngine.from_program(program), program)


@pytest.mark.parametrize(("arch", "backend"), [("llama", "torch"), ("llama", "onnx"), ("gemma3", "onnx")])
def test_streaming_artifacts_keep_constant_kv_memory(arch: str, backend: str) -> None:
    art = read_artifact(artifact(arch, backend))
    assert all(e["capacity"] == 7 for e in art.manifest["backend"]["cache"])
    engine = engine_for(art)
    check_generation(engine, streaming(arch))
    ids = torch.tensor([PROMPTS[0]])
    _, cache = engine.prefill(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    sizes = []
    for step in range(20):
        pos = ids.shape[1] + step
        mask = torch.ones(1, pos + 1, dtype=torch.int64)
        _, cache = engine.decode(torch.tensor([[7]]), mask, torch.tensor([[pos]]), cache)
        sizes.append(cache.nbytes() if hasattr(cache, "nbytes") else sum(t.numel() for t in cache.tensors))
    assert len(set(sizes)) == 1  # the ring never grows
    with pytest.raises(BackendError, match="evicted"):
        cache.truncate(5)


@pytest.mark.slow
def test_streaming_on_tvm_equals_the_dense_mask() -> None:
    pytest.importorskip("tvm")
    art = read_artifact(artifact("llama", "tvm"))
    check_generation(engine_for(art), streaming("llama"))


@pytest.mark.parametrize("spec", ["gqa(kv_heads=1), " + STREAMING, "mla(kv_fraction=0.5), " + STREAMING,
                                  "prune-heads(ratio=0.5), " + STREAMING])
def test_streaming_composes_with_other_passes(spec: str) -> None:
    program = streaming("llama", spec)
    assert all(e.capacity == 7 for e in cache_layout(program, ring=True))
    check_generation(TorchEngine.from_program(program), program)


def test_onnx_multi_token_steps_on_a_full_ring_run_token_by_token() -> None:
    engine = engine_for(read_artifact(artifact("llama", "onnx")))
    program = streaming("llama")
    ids = torch.tensor([PROMPTS[0] + list(range(20, 40))])
    full = program(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    _, cache = engine.prefill(ids[:, :9], torch.ones(1, 9, dtype=torch.int64), torch.arange(9)[None])
    mask = torch.ones(1, ids.shape[1], dtype=torch.int64)
    logits, _ = engine.decode(ids[:, 9:], mask, torch.arange(9, ids.shape[1])[None], cache)  # 20 tokens at once
    assert float((logits - full[:, 9:]).abs().max()) < 1e-3
    forward = engine.forward(ids, mask, torch.arange(ids.shape[1])[None])  # cache-less: the dense mask
    assert float((forward - full).abs().max()) < 1e-3


@pytest.mark.parametrize(("spec", "message"), [
    ("sparse-attention(window=0)", "window must be >= 1"),
    ("sparse-attention(sinks=-1)", "sinks must be >= 0"),
    ("sparse-attention(pattern=duo, kv_budget=0)", "kv_budget is a fraction"),
    ("sparse-attention(pattern=razor, kv_budget=1.5)", "kv_budget is a fraction"),
    ("sparse-attention(pattern=razor, window=200, kv_budget=0.5)", "below what the streaming heads alone keep"),
    ("sparse-attention(pattern=banded)", "unknown pattern"),
])
def test_sparse_attention_rejects_bad_options(spec: str, message: str) -> None:
    with pytest.raises(HeadsmithError, match=message):
        tiny_program("llama").apply(spec)


def test_sparse_attention_refuses_encoders() -> None:
    with pytest.raises(HeadsmithError, match="encoder"):
        tiny_program("bert").apply(STREAMING)


def test_ring_kv_cache_ping_pong_and_in_place_agree() -> None:
    from headsmith.runtime.kv_cache import CacheSpec, KVCache
    spec = [CacheSpec("k", (-1, 1, -1, 1), 2, sinks=1, window=3, capacity=4)]
    values = np.arange(30, dtype=np.float32)
    caches = [KVCache(spec, 1, 8, in_place=mode) for mode in (False, True)]
    for cache in caches:
        cache.store([values[:6].reshape(1, 1, 6, 1)])  # a prompt of 6: sink 0, ring holds 4, 5
        for t in range(6, 30):
            n = cache.tokens(0)
            past = cache.valid()[0].copy()
            views = cache.present_views(1)
            views[0][:, :, :n] = past  # what a decode graph does: the past, then the new token
            views[0][0, 0, n, 0] = values[t]
            cache.commit(1)
    kept = [sorted(c.valid()[0].ravel().tolist()) for c in caches]
    assert kept[0] == kept[1] == [0.0, 28.0, 29.0]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_engines_name_a_mask_of_the_wrong_length(backend: str) -> None:
    engine = engine_for(read_artifact(artifact("llama", backend)))
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(BackendError, match=r"attention_mask is \(1, 4\), but 9 tokens need \[1, 9\]"):
        engine.prefill(ids, torch.ones(1, 4, dtype=torch.int64), torch.arange(9)[None])
    _, cache = engine.prefill(ids, torch.ones_like(ids), torch.arange(9)[None])
    with pytest.raises(BackendError, match="9 cached \\+ 1 new tokens need"):
        engine.decode(torch.tensor([[5]]), torch.ones(1, 9, dtype=torch.int64), torch.tensor([[9]]), cache)
