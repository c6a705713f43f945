"""KV eviction (``kv-evict(method=snapkv|h2o|random)``): with a budget that holds the prompt every policy equals the
full cache; the tokens kept are those a numpy reference of the scoring selects; a compacted cache decodes the same
logits as the full cache with the evicted keys masked per head; h2o holds a constant cache; the ONNX Runtime engines
(in place and ping-pong) agree with torch; bad options and models give clear errors."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx

from headsmith.backends.artifact import read_artifact, write_artifact
from headsmith.errors import HeadsmithError
from headsmith.kv_policy import KvPolicy
from headsmith.passes.kv_cache import decode_graph
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.eviction import evictor_for
from headsmith.runtime.generate import GenerationConfig, generate, pad_left
from headsmith.sites import ATTENTION

from .conftest import _ROOT, tiny_program

PROMPTS = [list(range(5, 29)), list(range(30, 47))]
"""Two rows of different lengths: the shorter one is left-padded."""
CONFIG = GenerationConfig(max_new_tokens=16, stop_tokens=())


@functools.cache
def evicting(arch: str, spec: str) -> Program:
    return tiny_program(arch).apply(spec)


def prompt_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_left(PROMPTS, 0)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class Recorder(fx.Interpreter):
    """Runs a step graph and records every attention's ``(layer, q, k, v, key_mask)``; with ``visible`` (layer ->
    ``[B, Hkv, Tk]`` bool) it masks keys per head instead of calling the op (the reference for compacted caches)."""

    def __init__(self, gm: fx.GraphModule, visible: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__(gm)
        self.visible = visible
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def call_function(self, target, args, kwargs):
        if target is not ATTENTION:
            return super().call_function(target, args, kwargs)
        q, k, v, key_mask = args[:4]
        layer = int(kwargs["layer"])
        self.seen.append((layer, q, k, v, key_mask))
        if self.visible is None:
            return super().call_function(target, args, kwargs)
        tq, tk = q.shape[2], k.shape[2]
        rep = q.shape[1] // k.shape[1]
        allowed = self.visible[layer].repeat_interleave(rep, 1)[:, :, None, :]  # [B,Hq,1,Tk]
        causal = torch.arange(tk)[None, :] <= (torch.arange(tq)[:, None] + tk - tq)
        allowed = allowed & causal & key_mask[:, None, None, :]
        scale = kwargs.get("scale", 0.0) or 1.0 / math.sqrt(q.shape[-1])
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed, scale=scale)


def reference_scores(q: np.ndarray, k: np.ndarray, valid: np.ndarray, window: int) -> np.ndarray:
    """SnapKV's vote in plain numpy, loop by loop: ``[B, Hkv, S]``."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    out = np.zeros((b, hkv, s))
    for row in range(b):
        for h in range(hq):
            for i in range(s - window, s):
                logits = np.array([q[row, h, i] @ k[row, h // (hq // hkv), j] / math.sqrt(d)
                                   if j <= i and valid[row, j] else -np.inf for j in range(s)])
                p = np.exp(logits - logits.max())
                out[row, h // (hq // hkv)] += p / p.sum() / (hq // hkv)
    return out


def reference_keep(scores: np.ndarray, valid: np.ndarray, keep: int, window: int, kernel: int) -> list[list[set]]:
    """Per row and head the kept token indices: the last ``window`` tokens, then the top pooled prefix scores (avg
    pooling with zero padding, as ``avg_pool1d``)."""
    b, g, s = scores.shape
    out = []
    for row in range(b):
        heads = []
        for h in range(g):
            prefix = s - window
            pooled = [sum(scores[row, h, j] for j in range(i - kernel // 2, i + kernel // 2 + 1) if 0 <= j < prefix)
                      / kernel for i in range(prefix)]
            ranked = sorted((i for i in range(prefix) if valid[row, i]), key=lambda i: -pooled[i])
            heads.append(set(range(prefix, s)) | set(ranked[: keep - window]))
        out.append(heads)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "random"])
def test_a_budget_that_holds_the_prompt_is_the_full_cache(arch: str, method: str) -> None:
    program = evicting(arch, f"kv-evict(method={method}, window=4, recent=4)")
    engine = TorchEngine.from_program(program)
    full = generate(engine, PROMPTS, CONFIG, kv_policy=False)
    roomy = KvPolicy(method, budget=1.0, tokens=64 if method == "h2o" else 0, window=4, recent=4)
    same = generate(engine, PROMPTS, CONFIG, kv_policy=roomy)
    assert same.tokens == full.tokens
    assert same.stats["kv"]["evicted"] == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("forced", [0, 2])
def test_snapkv_keeps_what_the_numpy_reference_selects(arch: str, forced: int) -> None:
    """``forced``: ``keep``, the window's last tokens always kept (0: all 4 of the window's)."""
    program = evicting(arch, f"kv-evict(method=snapkv, budget=0.5, window=4, kernel=3, pool=avg, keep={forced})")
    engine = TorchEngine.from_program(program)
    ids, mask, pos = prompt_inputs()
    recorder = Recorder(engine.prefill_fn)
    with torch.no_grad():
        recorder.run(ids, pos, mask)
    _, cache = engine.prefill(ids, mask, pos)
    full = [t.clone() for t in cache.tensors]
    new_mask = evictor_for(engine).after_prefill(cache, mask)
    valid = mask.numpy().astype(bool)
    keep = math.ceil(0.5 * ids.shape[1])
    assert tuple(new_mask.shape) == (2, keep)
    # the short row has fewer real tokens than kept slots only if 17 < keep: here both rows fill them
    assert bool(new_mask.all()) == (int(mask[1].sum()) >= keep)
    for layer, q, k, _v, _ in recorder.seen:
        scores = reference_scores(q.double().numpy(), k.double().numpy(), valid, 4)
        kept = reference_keep(scores, valid, keep, forced or 4, 3)
        key = next(i for i, e in enumerate(engine.cache_layout) if e["layer"] == layer and e["slot"] == "key")
        for row in range(2):
            for h in range(k.shape[1]):
                rows = torch.tensor(sorted(kept[row][h]))
                got = cache.tensors[key][row, h, -len(rows):]
                torch.testing.assert_close(got, full[key][row, h, rows], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["snapkv", "random"])
def test_a_compacted_cache_decodes_as_the_full_cache_with_the_evicted_keys_masked(method: str) -> None:
    program = evicting("llama", f"kv-evict(method={method}, budget=0.4, window=4)")
    engine = TorchEngine.from_program(program)
    ids, mask, pos = prompt_inputs()
    _, cache = engine.prefill(ids, mask, pos)
    full = [t.clone() for t in cache.tensors]
    evictor = evictor_for(engine)
    held_mask = evictor.after_prefill(cache, mask)
    # which prompt tokens each layer's heads kept: match the compacted keys against the full ones
    visible: dict[int, torch.Tensor] = {}
    for i, e in enumerate(engine.cache_layout):
        if e["slot"] != "key":
            continue
        kept, whole = cache.tensors[i], full[i]
        hit = (kept[:, :, :, None, :] == whole[:, :, None, :, :]).all(-1).any(2)  # [B,H,S]
        visible[int(e["layer"])] = torch.cat([hit, torch.ones(2, hit.shape[1], 3, dtype=torch.bool)], -1)
    feed = torch.tensor([[7, 8, 9], [10, 11, 12]])
    step_pos = pos[:, -1:] + 1 + torch.arange(3)
    logits, _ = engine.decode(feed, torch.cat([held_mask, torch.ones(2, 3, dtype=torch.int64)], 1), step_pos, cache)
    dec, _ = decode_graph(program, ring=True)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.int64)], 1)
    with torch.no_grad():
        ref = Recorder(dec, visible).run(feed, step_pos, full_mask, *full)[0]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)


def test_h2o_holds_a_constant_cache_of_the_tokens_it_tracks() -> None:
    program = evicting("llama", "kv-evict(method=h2o, tokens=12, window=4, recent=3)")
    engine = TorchEngine.from_program(program)
    ids, mask, pos = prompt_inputs()
    _, cache = engine.prefill(ids, mask, pos)
    history = [t.clone() for t in cache.tensors]  # every token's K/V as this run computed it
    evictor = evictor_for(engine)
    mask = evictor.after_prefill(cache, mask)
    assert cache.length == 12
    next_pos = pos[:, -1:] + 1
    for step in range(20):
        feed = torch.tensor([[3 + step], [40 + step]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1)
        _, cache = engine.decode(feed, mask, next_pos, cache)
        history = [torch.cat([h, t[:, :, -1:]], 2) for h, t in zip(history, cache.tensors)]
        mask = evictor.after_step(cache, mask, 1)
        next_pos = next_pos + 1
        assert cache.length == 12 and mask.shape[1] == 12
        for i, e in enumerate(engine.cache_layout):  # every slot holds the token h2o says it holds
            tokens = torch.from_numpy(evictor.heavy[evictor.score_layers.index(e["layer"])].tokens)
            want = torch.gather(history[i], 2, tokens[..., None].expand(-1, -1, -1, history[i].shape[-1]))
            torch.testing.assert_close(cache.tensors[i], want, rtol=0, atol=0)
            assert ((tokens >= evictor.seen - 3).sum(-1) == 3).all()  # the recent tokens are always held
    assert evictor.stats["evicted"] == 20


def test_continuation_perplexity_with_the_full_cache_is_the_forward_pass() -> None:
    from headsmith.runtime.eviction import continuation_perplexity
    program = evicting("llama", "kv-evict(method=snapkv, budget=0.5, window=4)")
    engine = TorchEngine.from_program(program)
    ids = torch.randint(5, 120, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = program(ids)
    want = math.exp(float(torch.nn.functional.cross_entropy(logits[0, 31:-1], ids[0, 32:])))
    for policy in (False, KvPolicy("snapkv", budget=1.0, window=4)):
        got = continuation_perplexity(engine, ids, 32, policy, chunk=5)
        assert got["tokens"] == 16 and math.isclose(got["perplexity"], want, rel_tol=1e-4)
    evicted = continuation_perplexity(engine, ids, 32)
    assert evicted["held"] == 16 + 15 and evicted["kept"] == 16  # the last token is scored, never fed


@functools.cache
def onnx_artifact(spec: str, attention: str) -> Path:
    out = _ROOT / f"kv-{abs(hash(spec))}-{attention}"
    write_artifact(evicting("llama", spec), out, "onnx", force=True, options={"attention": attention})
    return out


@pytest.mark.parametrize("attention", ["fused", "plain"])
@pytest.mark.parametrize("spec", ["kv-evict(method=snapkv, budget=0.4, window=4)",
                                  "kv-evict(method=h2o, tokens=12, window=4, recent=4)"])
def test_onnx_runtime_evicts_as_torch_does(spec: str, attention: str) -> None:
    """In place (GroupQueryAttention appends into the shared buffer, the scores read its valid rows) and ping-pong."""
    art = read_artifact(onnx_artifact(spec, attention))
    assert art.manifest["backend"]["kv_in_place"] == (attention == "fused")
    record = art.manifest["backend"]["kv_policy"]
    assert [s["name"] for s in record["scores"]] == ["scores_layer0", "scores_layer1"]
    engine = engine_for(art)
    reference = TorchEngine.from_program(evicting("llama", spec))
    ids, mask, pos = prompt_inputs()
    _, ort_cache = engine.prefill(ids, mask, pos)
    _, torch_cache = reference.prefill(ids, mask, pos)
    for a, b in zip(ort_cache.scores, torch_cache.scores):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    ours = generate(engine, PROMPTS, CONFIG)
    theirs = generate(reference, PROMPTS, CONFIG)
    assert ours.tokens == theirs.tokens
    assert ours.stats["kv"] == theirs.stats["kv"]


def test_speculative_decoding_on_a_compacted_cache_is_plain_greedy_on_it() -> None:
    program = evicting("llama", "kv-evict(method=snapkv, budget=0.5, window=4)")
    engine = TorchEngine.from_program(program)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 9, 10, 11, 12]]
    plain = generate(engine, prompts, CONFIG)
    fast = generate(engine, prompts, CONFIG, draft="ngram")
    assert fast.tokens == plain.tokens
    h2o = TorchEngine.from_program(evicting("llama", "kv-evict(method=h2o, tokens=12, window=4, recent=4)"))
    with pytest.raises(HeadsmithError, match="h2o"):
        generate(h2o, prompts, CONFIG, draft="ngram")


@pytest.mark.parametrize("spec, match", [
    ("kv-evict(budget=0)", "budget"),
    ("kv-evict(budget=1.5)", "budget"),
    ("kv-evict(method=lru)", "unknown kv-evict method"),
    ("kv-evict(kernel=4)", "odd"),
    ("kv-evict(tokens=8, window=32)", "must exceed"),
    ("kv-evict(window=8, keep=9)", "keep is how many"),
])
def test_bad_options_are_refused(spec: str, match: str) -> None:
    with pytest.raises(HeadsmithError, match=match):
        tiny_program("llama").apply(spec)


def test_models_and_backends_it_does_not_fit_are_refused() -> None:
    with pytest.raises(HeadsmithError, match="sliding window"):
        tiny_program("gemma3").apply("kv-evict")
    with pytest.raises(HeadsmithError, match="encoder"):
        tiny_program("bert").apply("kv-evict")
    with pytest.raises(HeadsmithError, match="already has a KV policy"):
        tiny_program("llama").apply("kv-evict, kv-evict(method=h2o)")
    program = evicting("llama", "kv-evict(method=snapkv, budget=0.5, window=4)")
    with pytest.raises(HeadsmithError, match="sliding window"):
        TorchEngine.from_program(program.apply("sparse-attention(window=8, sinks=2)"))
    with pytest.raises(HeadsmithError, match="tvm backend"):
        write_artifact(program, _ROOT / "kv-tvm", "tvm", force=True)
    assert not (_ROOT / "kv-tvm").exists()
    engine = TorchEngine.from_program(program)
    with pytest.raises(HeadsmithError, match="decode step's attention"):
        generate(engine, PROMPTS, CONFIG, kv_policy=KvPolicy("h2o", tokens=12, window=4, recent=4))
    with pytest.raises(HeadsmithError, match="observation window is fixed"):
        generate(engine, PROMPTS, CONFIG, kv_policy=KvPolicy("snapkv", window=8))
    plain = TorchEngine.from_program(tiny_program("llama"))
    with pytest.raises(HeadsmithError, match="no KV policy"):
        generate(plain, PROMPTS, CONFIG, kv_policy=KvPolicy("snapkv"))


def test_cli_run_eval_bench_with_a_kv_policy(capsys: pytest.CaptureFixture[str]) -> None:
    from headsmith.cli import main

    path = str(onnx_artifact("kv-evict(method=snapkv, budget=0.4, window=4)", "fused"))
    code = main(["eval", path, "--json", "--max-tokens", "120", "--continuation", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["prompt"] == 80 and out["policy"]["kept"] == 32 and out["policy"]["held"] == 32 + 39
    assert out["full_cache"]["held"] == 119 and out["full_cache"]["tokens"] == out["policy"]["tokens"] == 40
    code = main(["run", path, "--prompt", "In the beginning God created the heaven and the earth. " * 4,
                 "--max-new-tokens", "5", "--no-chat", "--kv-budget", "0.25"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kv-evict(snapkv): kept" in captured.err
    code = main(["bench", path, "--contexts", "64", "--new-tokens", "4", "--json", "--no-compare"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    row = json.loads(captured.out)["contexts"][0]
    assert row["kv_tokens_held"] == math.ceil(0.4 * 64) and row["decode_tok_s"] > 0
    code = main(["eval", path, "--max-tokens", "120", "--continuation", "40", "--kv-method", "h2o"])
    captured = capsys.readouterr()
    assert code != 0 and "decode step's attention" in captured.err
