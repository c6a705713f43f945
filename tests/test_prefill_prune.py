"""Progressive prompt-token pruning in prefill (``prefill-prune``): keeping every token is the full prefill; the
tokens kept are those a numpy reference of the ranking selects, stage by stage; a pruned prefill and the decode
after it equal the full model with the pruned tokens' keys masked in the later layers; the ONNX Runtime engine
agrees with torch; bad plans and models give clear errors."""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import fx

import headsmith
from headsmith.backends.artifact import read_artifact, write_artifact
from headsmith.errors import HeadsmithError
from headsmith.passes.kv_cache import decode_graph, prefill_graph
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.generate import GenerationConfig, generate, pad_left
from headsmith.sites import ATTENTION

from .conftest import _ROOT, TINY, tiny_program, tiny_tokenizer
from .test_kv_evict import reference_scores

PROMPTS = [list(range(5, 29)), list(range(30, 47))]
"""Two rows of different lengths: the shorter one is left-padded."""
CONFIG = GenerationConfig(max_new_tokens=12, stop_tokens=())


@functools.cache
def deep_llama() -> Program:
    """The tiny Llama with 4 layers (two pruned stages need three cuts of the stack)."""
    config = transformers.LlamaConfig(**{**TINY["llama"][1], "num_hidden_layers": 4})
    torch.manual_seed(0)
    d = Path(tempfile.mkdtemp(prefix="deep-llama-", dir=_ROOT))
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return headsmith.load(d)


@functools.cache
def pruned(spec: str, deep: bool = True) -> Program:
    return (deep_llama() if deep else tiny_program("llama")).apply(spec)


def prompt_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_left(PROMPTS, 0)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class Masked(fx.Interpreter):
    """Runs a step graph of the unpruned program with, per layer, only the keys in ``visible[layer]`` (``[B, Tk]``
    bool) attended (a query always sees itself, so a pruned token's own row stays finite); records ``q, k``."""

    def __init__(self, gm: fx.GraphModule, visible: dict[int, torch.Tensor]) -> None:
        super().__init__(gm)
        self.visible = visible
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def call_function(self, target, args, kwargs):
        if target is not ATTENTION:
            return super().call_function(target, args, kwargs)
        q, k, v, key_mask = args[:4]
        layer = int(kwargs["layer"])
        self.seen[layer] = (q, k)
        tq, tk = q.shape[2], k.shape[2]
        rep = q.shape[1] // k.shape[1]
        shift = torch.arange(tq)[:, None] + tk - tq
        causal = torch.arange(tk)[None, :] <= shift
        allowed = causal & key_mask[:, None, :]
        if layer in self.visible:
            allowed = allowed & self.visible[layer][:, None, :]
        allowed = allowed | (torch.arange(tk)[None, :] == shift)
        scale = kwargs.get("scale", 0.0) or 1.0 / math.sqrt(q.shape[-1])
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed[:, None], scale=scale)


def reference_rank(q: np.ndarray, k: np.ndarray, valid: np.ndarray, keep: int, window: int) -> np.ndarray:
    """The kept indices ``[B, keep]`` by the numpy vote over all heads, avg-pooled over 3 positions (zeros past
    the prefix's ends), the window always kept."""
    scores = reference_scores(q, k, valid, window).sum(1)
    b, s = scores.shape
    out = []
    for row in range(b):
        prefix = s - window
        pooled = [sum(scores[row, j] for j in (i - 1, i, i + 1) if 0 <= j < prefix) / 3 for i in range(prefix)]
        ranked = sorted((i for i in range(prefix) if valid[row, i]), key=lambda i: -pooled[i])
        out.append(sorted(set(range(prefix, s)) | set(ranked[: keep - window])))
    return np.array(out)


def test_keeping_every_token_is_the_full_prefill() -> None:
    engine = TorchEngine.from_program(pruned("prefill-prune(layers=[1, 3], keep=[1.0, 1.0], window=4)"))
    ids, mask, pos = prompt_inputs()
    logits, cache = engine.prefill(ids, mask, pos)
    engine.prune = False
    full_logits, full = engine.prefill(ids, mask, pos)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache.tensors, full.tensors):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    engine.prune = True
    assert generate(engine, PROMPTS, CONFIG).tokens == generate(TorchEngine.from_program(deep_llama()), PROMPTS,
                                                                CONFIG).tokens


def test_the_default_plan_prunes_half_the_prompt_a_third_of_the_way_down() -> None:
    plan = deep_llama().apply("prefill-prune").prefill_prune
    assert plan.layers == (1,) and plan.keep == (0.5,) and plan.heads == "sum"
    assert pruned("prefill-prune(heads=max, layers=[2])").prefill_prune.heads == "max"


def test_a_prompt_shorter_than_the_window_is_not_pruned() -> None:
    engine = TorchEngine.from_program(pruned("prefill-prune(layers=[2], keep=[0.25], window=8)"))
    ids, mask = pad_left([list(range(5, 12))], 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    _, cache = engine.prefill(ids, mask, pos)
    assert [int(t.shape[2]) for t in cache.tensors] == [7] * 8


def test_the_kept_tokens_are_those_the_numpy_reference_ranks_highest() -> None:
    program = pruned("prefill-prune(layers=[1, 3], keep=[0.6, 0.3], window=3, kernel=3, pool=avg)")
    engine = TorchEngine.from_program(program)
    ids, mask, pos = prompt_inputs()
    _, cache = engine.prefill(ids, mask, pos)
    kept1, kept2 = cache.pruned.kept["prune_mask_stage1"], cache.pruned.kept["prune_mask_stage2"]
    width = ids.shape[1]
    assert kept1.shape == (2, math.ceil(0.6 * width)) and kept2.shape == (2, math.ceil(0.3 * width))
    assert set(kept2.ravel()) <= set(kept1.ravel()) and (kept2[:, -3:] == np.arange(width - 3, width)).all()
    valid = mask.numpy().astype(bool)
    # stage 1: layer 0's vote over every token, from the unpruned prefill
    pre, _ = prefill_graph(deep_llama())
    run = Masked(pre, {})
    with torch.no_grad():
        run.run(ids, pos, mask)
    q, k = (t.double().numpy() for t in run.seen[0])
    np.testing.assert_array_equal(kept1, reference_rank(q, k, valid, kept1.shape[1], 3))
    # stage 2: layer 2's vote over stage 1's tokens, from the prefill with the pruned keys masked in layers 1, 2
    visible = torch.zeros(2, width, dtype=torch.bool)
    visible[torch.arange(2)[:, None], torch.from_numpy(kept1)] = True
    run = Masked(pre, {1: visible, 2: visible})
    with torch.no_grad():
        run.run(ids, pos, mask)
    q, k = (t.double().numpy() for t in run.seen[2])
    rows = np.arange(2)[:, None]
    sub = reference_rank(q[rows, :, kept1].transpose(0, 2, 1, 3), k[rows, :, kept1].transpose(0, 2, 1, 3),
                         valid[rows, kept1], kept2.shape[1], 3)
    np.testing.assert_array_equal(kept2, np.take_along_axis(kept1, sub, 1))


@pytest.mark.parametrize("spec", ["prefill-prune(layers=[2], keep=[0.4], window=4)",
                                  "prefill-prune(layers=[1, 3], keep=[0.6, 0.3], window=3, kernel=1)"])
def test_a_pruned_prefill_decodes_as_the_full_model_with_the_pruned_keys_masked(spec: str) -> None:
    program = pruned(spec)
    engine = TorchEngine.from_program(program)
    plan = program.prefill_prune
    ids, mask, pos = prompt_inputs()
    logits, cache = engine.prefill(ids, mask, pos)
    width = ids.shape[1]
    visible: dict[int, torch.Tensor] = {}
    for layer in range(4):
        stage = plan.stage_of(layer)
        v = torch.ones(2, width, dtype=torch.bool)
        if stage:
            v[:] = False
            v[torch.arange(2)[:, None], torch.from_numpy(cache.pruned.kept[f"prune_mask_stage{stage}"])] = True
        visible[layer] = v
    pre, entries = prefill_graph(deep_llama())
    with torch.no_grad():
        ref = Masked(pre, visible).run(ids, pos, mask)
    torch.testing.assert_close(logits, ref[0], rtol=1e-4, atol=1e-5)
    for i, e in enumerate(entries):  # a later stage's entries hold exactly its kept tokens' K/V
        index = cache.pruned.kept.get(f"prune_mask_stage{plan.stage_of(e.layer)}")
        index = torch.from_numpy(index) if index is not None else torch.arange(width).expand(2, width)
        real = mask.bool().gather(1, index)  # padding rows of a left-padded prompt hold anything
        want = ref[1 + i][torch.arange(2)[:, None], :, index][real]
        torch.testing.assert_close(cache.tensors[i].transpose(1, 2)[real], want, rtol=1e-4, atol=1e-5)
    feed = torch.tensor([[7, 8, 9], [10, 11, 12]])
    step_pos = pos[:, -1:] + 1 + torch.arange(3)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.int64)], 1)
    step, _ = engine.decode(feed, full_mask, step_pos, cache)
    dec, _ = decode_graph(deep_llama())
    visible = {layer: torch.cat([v, torch.ones(2, 3, dtype=torch.bool)], 1) for layer, v in visible.items()}
    with torch.no_grad():
        want = Masked(dec, visible).run(feed, step_pos, full_mask, *ref[1:1 + len(entries)])[0]
    torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-5)


def test_speculative_decoding_rolls_back_a_pruned_cache() -> None:
    engine = TorchEngine.from_program(pruned("prefill-prune(layers=[2], keep=[0.5], window=4)"))
    prompts = [[5, 6, 7, 8] * 6, list(range(30, 47))]
    plain = generate(engine, prompts, CONFIG)
    assert generate(engine, prompts, CONFIG, draft="ngram").tokens == plain.tokens


@pytest.mark.parametrize("backend, attention", [("onnx", "fused"), ("onnx", "plain"), ("torch", None)])
def test_the_artifact_engines_agree_with_the_eager_one(tmp_path: Path, backend: str, attention: str | None) -> None:
    program = pruned("prefill-prune(layers=[1, 3], keep=[0.6, 0.3], window=3)")
    out = write_artifact(program, tmp_path / "a", backend=backend,
                         options={"attention": attention} if attention else None)
    record = read_artifact(out).manifest["backend"]
    suffix = ".onnx" if attention else ".pt2"
    assert [s["graph"] for s in record["prefill_prune"]["stages"]] == [f"prefill_stage{s}{suffix}" for s in range(3)]
    assert [e["stage"] for e in record["cache"]] == [0, 0, 1, 1, 1, 1, 2, 2]
    engine, eager = engine_for(read_artifact(out)), TorchEngine.from_program(program)
    ids, mask, pos = prompt_inputs()
    a, cache_a = engine.prefill(ids, mask, pos)
    b, cache_b = eager.prefill(ids, mask, pos)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, kept in cache_b.pruned.kept.items():
        np.testing.assert_array_equal(cache_a.pruned.kept[name], kept)
    assert generate(engine, PROMPTS, CONFIG).tokens == generate(eager, PROMPTS, CONFIG).tokens
    engine.prune = False  # the same artifact's full prefill
    assert generate(engine, PROMPTS, CONFIG).tokens == generate(TorchEngine.from_program(deep_llama()), PROMPTS,
                                                                CONFIG).tokens


@pytest.mark.parametrize("spec, message", [
    ("prefill-prune(layers=[2, 1], keep=[0.5, 0.25])", "ascending"),
    ("prefill-prune(layers=[0], keep=[0.5])", ">= 1"),
    ("prefill-prune(layers=[1, 2], keep=[0.25, 0.5])", "non-increasing"),
    ("prefill-prune(layers=[1, 2], keep=[0.5])", "one keep ratio per"),
    ("prefill-prune(layers=[1], keep=[0])", "(0, 1]"),
    ("prefill-prune(layers=[1], keep=[0.5], kernel=2)", "odd"),
    ("prefill-prune(layers=[1], keep=[0.5], heads=mean)", "unknown heads"),
])
def test_bad_plans_are_refused(spec: str, message: str) -> None:
    with pytest.raises(HeadsmithError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        deep_llama().apply(spec)


@pytest.mark.parametrize("arch, spec, message", [
    ("llama", "prefill-prune(layers=[4], keep=[0.5])", "no layer 4"),
    ("bert", "prefill-prune(layers=[1], keep=[0.5])", "encoder"),
    ("mistral", "prefill-prune(layers=[1], keep=[0.5])", "sliding window"),
    ("llama", "kv-evict(budget=0.5), prefill-prune(layers=[1], keep=[0.5])", "kv-evict"),
    ("llama", "prefill-prune(layers=[1], keep=[0.5]), kv-evict(budget=0.5)", "prefill-prune"),
    ("llama", "prefill-prune(layers=[1], keep=[0.5]), draft(method=layer-skip, layers=[1])", "drafts"),
])
def test_models_and_combinations_it_does_not_fit_are_refused(arch: str, spec: str, message: str) -> None:
    program = deep_llama() if arch == "llama" else tiny_program(arch)
    with pytest.raises(HeadsmithError, match=message):
        program.apply(spec)


@pytest.mark.parametrize("backend", ["tvm", "tensorrt"])
def test_backends_without_a_staged_prefill_refuse(tmp_path: Path, backend: str) -> None:
    with pytest.raises(HeadsmithError, match=f"not built for the {backend}"):
        write_artifact(pruned("prefill-prune(layers=[1], keep=[0.5])", deep=False), tmp_path / "a", backend=backend)


def test_cli_eval_and_bench_a_pruned_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from headsmith.cli import main

    path = str(write_artifact(pruned("prefill-prune(layers=[2], keep=[0.5], window=4)"), tmp_path / "a",
                              backend="onnx"))
    code = main(["eval", path, "--json", "--max-tokens", "120", "--continuation", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["policy"]["tokens"] == out["full_prefill"]["tokens"] == 40
    assert out["policy"]["perplexity"] != out["full_prefill"]["perplexity"]
    rows = {}
    for flag in ([], ["--no-prefill-prune"]):
        code = main(["bench", path, "--contexts", "64", "--new-tokens", "4", "--json", "--no-compare", *flag])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        rows[bool(flag)] = json.loads(captured.out)["contexts"][0]
    # layers 0-1 hold the 64 prompt tokens, layers 2-3 half of them
    assert rows[False]["kv_tokens_held"] == (64 + 32) // 2 and rows[True]["kv_tokens_held"] == 64
