"""Prefill/decode graphs, the KV-cache manager, engines, generate(), eval and bench on tiny models."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.cli import main
from headsmith.eval.metrics import perplexity
from headsmith.passes.kv_cache import cache_layout, decode_graph, prefill_graph
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.ort_engine import OrtEngine
from headsmith.runtime.generate import GenerationConfig, generate, pad_left
from headsmith.runtime.kv_cache import CacheSpec, KVCache

from .conftest import DECODERS, _ROOT, hf_model, tiny_dir, tiny_program

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


@functools.cache
def artifact(arch: str, backend: str, attention: str | None = None) -> Path:
    out = _ROOT / f"artifact-{arch}-{backend}-{attention}"
    options = {"attention": attention} if attention else None
    headsmith.convert(tiny_program(arch), out, backend=backend, options=options)
    return out


@functools.cache
def hf_greedy(arch: str, n: int = 64) -> list[list[int]]:
    model = hf_model(arch)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # never stop (and never suppress EOS): exactly n tokens
    out = []
    for p in PROMPTS:
        ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


# ---- kv-cache lowering --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_prefill_then_decode_equals_full_forward(arch: str) -> None:
    program = tiny_program(arch)
    pre, entries = prefill_graph(program, last_only=False)
    dec, _ = decode_graph(program)
    ids, pos, mask = program.example_inputs(2, 24, seed=3, pad=4)
    full = program(ids, mask, pos)
    with torch.no_grad():
        out = pre(ids[:, :10], pos[:, :10], mask[:, :10])
        pieces, cache, t = [out[0]], list(out[1:]), 10
        for n in (1, 1, 3, 1, 8):  # single tokens and multi-token (speculative-style) chunks
            out = dec(ids[:, t:t + n], pos[:, t:t + n], mask[:, :t + n], *cache)
            pieces.append(out[0])
            cache, t = list(out[1:]), t + n
    got = torch.cat(pieces, 1)
    assert float((got - full)[mask.bool()].abs().max()) <= 1e-4
    assert len(entries) == 4
    assert all(c.shape[2] == 24 for c in cache)


def test_cache_layout_records_shapes_and_windows() -> None:
    entries = cache_layout(tiny_program("gemma3"))
    assert [(e.name, e.shape, e.seq_dim, e.window) for e in entries] == [
        ("layer0.key", (-1, 1, -1, 16), 2, 8), ("layer0.value", (-1, 1, -1, 16), 2, 8),
        ("layer1.key", (-1, 1, -1, 16), 2, 0), ("layer1.value", (-1, 1, -1, 16), 2, 0)]
    assert entries[0].bytes_per_token(2) == 32


def test_prefill_keeps_only_last_logits() -> None:
    program = tiny_program("llama")
    pre, _ = prefill_graph(program)
    ids, pos, mask = program.example_inputs(2, 9)
    with torch.no_grad():
        logits = pre(ids, pos, mask)[0]
    assert logits.shape == (2, 1, 128)
    assert torch.allclose(logits[:, 0], program(ids, mask, pos)[:, -1], atol=1e-5)


def test_encoder_has_no_decode_graph() -> None:
    with pytest.raises(headsmith.HeadsmithError, match="is an encoder"):
        decode_graph(tiny_program("bert"))


# ---- KV cache manager -------------------------------------------------------------------------------
def test_kv_cache_grows_truncates_and_keeps_values() -> None:
    cache = KVCache([CacheSpec("k", (-1, 2, -1, 3), 2)], batch=2, capacity=4)
    first = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)
    cache.store([first])
    assert cache.length == 3
    more = np.concatenate([first, np.full((2, 2, 4, 3), 7, np.float32)], axis=2)
    cache.store([more])  # 7 tokens > capacity 4: grows
    assert cache.length == 7 and cache.capacity >= 7
    np.testing.assert_array_equal(cache.past()[0], more)
    cache.truncate(2)
    np.testing.assert_array_equal(cache.past()[0], first[:, :, :2])
    assert cache.past()[0].flags["C_CONTIGUOUS"]


# ---- generate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_equals_hf_in_memory(arch: str) -> None:
    engine = TorchEngine.from_program(tiny_program(arch))
    result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=64, stop_tokens=()))
    assert result.tokens == hf_greedy(arch)


@pytest.mark.parametrize(("arch", "backend"), [("llama", "onnx"), ("gemma3", "onnx"), ("gpt2", "onnx"),
                                               ("llama", "torch")])
def test_greedy_equals_hf_from_artifact(arch: str, backend: str) -> None:
    art = read_artifact(artifact(arch, backend))
    engine = engine_for(art)
    assert engine.name == backend
    result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=64, stop_tokens=()))
    reference = hf_greedy(arch)
    assert result.tokens == reference
    if arch != "gemma3":
        assert len(set(reference[0])) > 5  # the tiny model's output is not degenerate


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_onnx_gqa_lowering_matches(arch: str) -> None:
    """onnxruntime's GroupQueryAttention (sliding window and left padding included) gives the same greedy tokens;
    batch > 1 with several new tokens (which the kernel refuses) runs token by token."""
    path = artifact(arch, "onnx", "gqa")
    decode = onnx.load(str(path / "decode.onnx"), load_external_data=False)
    assert sum(n.op_type == "GroupQueryAttention" for n in decode.graph.node) == 2
    engine = engine_for(read_artifact(path))
    result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=64, stop_tokens=()))
    assert result.tokens == hf_greedy(arch)
    program = tiny_program(arch)
    ids, pos, mask = program.example_inputs(2, 20, seed=5, pad=3)
    _, cache = engine.prefill(ids[:, :12], mask[:, :12], pos[:, :12])
    logits, cache = engine.decode(ids[:, 12:], mask, pos[:, 12:], cache)
    full = program(ids, mask, pos)[:, 12:]
    assert float((logits - full)[mask[:, 12:].bool()].abs().max()) <= 1e-4
    assert cache.length == 20


def test_onnx_artifact_files_checker_and_shared_weights() -> None:
    path = artifact("llama", "onnx")
    manifest = json.loads((path / "manifest.json").read_text())
    backend = manifest["backend"]
    assert backend["name"] == "onnx" and backend["prefill"] == "prefill.onnx"
    assert [e["name"] for e in backend["cache"]] == ["layer0.key", "layer0.value", "layer1.key", "layer1.value"]
    for name in ("prefill.onnx", "decode.onnx"):
        onnx.checker.check_model(str(path / name))
    assert not (path / "decode.onnx.data").exists()  # decode reads the prefill model's weight file
    dec = onnx.load(str(path / "decode.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    assert inputs["input_ids"] == ["batch", "new"]
    assert inputs["attention_mask"] == ["batch", "total"]
    assert inputs["past_layer0_key"] == ["batch", 2, "past", 16]


def test_onnx_engine_runs_without_torch_export(monkeypatch: pytest.MonkeyPatch) -> None:
    art = read_artifact(artifact("llama", "onnx"))

    def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the ONNX runtime path must not use torch.export")

    monkeypatch.setattr(torch.export, "load", forbidden)
    monkeypatch.setattr(torch.export, "export", forbidden)
    engine = engine_for(art)
    assert isinstance(engine, OrtEngine) and "CPUExecutionProvider" in engine.providers
    result = generate(engine, PROMPTS[:1], GenerationConfig(max_new_tokens=8, stop_tokens=()))
    assert result.tokens[0] == hf_greedy("llama")[0][:8]


def test_onnx_encoder_forward() -> None:
    art = read_artifact(artifact("bert", "onnx"))
    engine = engine_for(art)
    program = tiny_program("bert")
    ids, pos, mask = program.example_inputs(2, 11, pad=3)
    got = engine.forward(ids, mask, pos)
    assert float((got - program(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-4


def test_sampling_is_seeded_and_filters() -> None:
    engine = TorchEngine.from_program(tiny_program("llama"))
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, stop_tokens=())
    a = generate(engine, PROMPTS, cfg).tokens
    b = generate(engine, PROMPTS, cfg).tokens
    c = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=8, stop_tokens=())).tokens
    assert a == b and a != c
    top1 = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=1,
                                                      stop_tokens=())).tokens
    assert top1 == [t[:20] for t in hf_greedy("llama")]


def test_stop_tokens_streaming_and_limits() -> None:
    engine = TorchEngine.from_program(tiny_program("llama"))
    reference = hf_greedy("llama")
    stop = reference[0][5]
    seen: list[tuple[int, int]] = []
    result = generate(engine, PROMPTS, GenerationConfig(max_new_tokens=30, stop_tokens=(stop,)),
                      stream=lambda row, tok: seen.append((row, tok)))
    assert result.tokens[0] == reference[0][:reference[0].index(stop) + 1]
    assert [t for r, t in seen if r == 0] == result.tokens[0]
    assert all(len(t) <= 30 for t in result.tokens)
    with pytest.raises(headsmith.HeadsmithError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(headsmith.HeadsmithError, match="at least one token"):
        pad_left([[1], []], 0)


# ---- eval and bench ----------------------------------------------------------------------------------------
def test_perplexity_sliding_window_matches_direct_computation() -> None:
    program = tiny_program("llama")
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(0))
    fwd = TorchEngine.from_program(program).forward
    whole = perplexity(fwd, ids, window=64)
    logits = program(ids[None])[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).mean()
    assert whole["tokens"] == 49
    assert abs(whole["perplexity"] - float(nll.exp())) < 1e-6
    windowed = perplexity(fwd, ids, window=16, stride=8, reference=fwd)
    assert windowed["tokens"] == 49
    assert windowed["kl"] == pytest.approx(0.0, abs=1e-9) and windowed["top1_agreement"] == 1.0


def test_cli_run_eval_bench(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = artifact("llama", "onnx")
    code = main(["eval", str(path), "--json", "--max-tokens", "300", "--window", "64"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["tokens"] == 299 and out["perplexity"] > 1
    assert out["kl"] == pytest.approx(0.0, abs=1e-6) and out["top1_agreement"] == 1.0  # the source, unchanged
    assert out["source_perplexity"] == pytest.approx(out["perplexity"], rel=1e-5)
    code = main(["run", str(path), "--prompt", "In the beginning", "--max-new-tokens", "5", "--no-chat"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 tokens" in captured.err
    plot = tmp_path / "bench.png"
    code = main(["bench", str(path), "--contexts", "8,32", "--new-tokens", "4", "--json", "--plot", str(plot),
                 "--no-compare"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert [r["context"] for r in result["contexts"]] == [8, 32]
    assert all(r["decode_tok_s"] > 0 and r["bound_tok_s"] > 0 for r in result["contexts"])
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert plot.stat().st_size > 1000


def test_encoder_eval_reports_embedding_cosine(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(artifact("bert", "onnx")), "--json", "--max-tokens", "512"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["embedding_cosine"] == pytest.approx(1.0, abs=1e-5) and out["sentences"] >= 8


def test_bench_rejects_bad_contexts(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(artifact("llama", "onnx")), "--contexts", "8,x"])
    assert code == 2
    assert "comma-separated integers" in capsys.readouterr().err
    code = main(["bench", str(artifact("llama", "onnx")), "--contexts", "4096"])
    assert code == 2
    assert "exceeds the model's 256 positions" in capsys.readouterr().err
