"""Drafts built from the model (``draft(method=layer-skip|quantized|pruned)``): the pass shares the target's weights,
the engines run the draft on the target's cache, and speculative decoding with them equals plain greedy decoding on
torch, ONNX Runtime (in place and ping-pong) and TVM; rejection sampling with the draft's own distribution keeps
the target's."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.errors import HeadsmithError
from headsmith.fxutil import get_tensor, set_tensor
from headsmith.passes.draft import expected_speedup
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.generate import GenerationConfig, generate
from headsmith.runtime.speculative import ModelDraft, draft_for, speculative_generate

from .conftest import _ROOT, sampled_joint_chi_square, tiny_program

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13, 9, 10, 11], [3, 4, 5], [40, 41, 42, 43, 44, 45, 46]]
DRAFTS = ('draft(method=layer-skip, layers=[1], label=skip), draft(method=quantized, label=int4), '
          'draft(method=pruned, passes="dce", label=same)')
"""Three drafts of the tiny model: one with a block skipped (often wrong), one with int4 weights, and one that is
the target itself (always right: long accepted runs)."""


@functools.cache
def with_drafts(arch: str = "llama") -> Program:
    return tiny_program(arch).apply(DRAFTS)


@functools.cache
def artifact(backend: str, attention: str = "") -> Path:
    out = _ROOT / f"drafts-llama-{backend}{'-' + attention if attention else ''}"
    headsmith.convert(with_drafts(), out, backend=backend, force=True,
                      options={"attention": attention} if attention else None)
    return out


def test_the_pass_shares_weights_and_reports_agreement() -> None:
    program = with_drafts()
    skip, int4, same = program.drafts
    assert [d.name for d in program.drafts] == ["skip", "int4", "same"]
    assert skip.layers == (0,) and int4.layers == same.layers == (0, 1)
    mine = program.weights()
    for name, t in skip.program.weights().items():
        assert mine[name] is t  # the same tensors: nothing stored twice
    assert skip.report["weight_bytes_ratio"] < 0.6 and int4.report["weight_bytes_ratio"] < 0.25
    assert same.report["top1_agreement"] == 1.0
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(program(ids), tiny_program("llama")(ids))  # the target is unchanged


def test_bad_draft_options_are_refused() -> None:
    program = tiny_program("llama")
    for spec, match in (("draft(method=layer-skip)", "layers=.* or search=true"),
                        ("draft(layers=[0], search=true)", "one of them"),
                        ("draft(method=quantized, layers=[0])", "options of method=layer-skip"),
                        ("draft(method=pruned)", "needs passes"),
                        ("draft(layers=[0], label='A B')", "label")):
        with pytest.raises(HeadsmithError, match=match):
            program.apply(spec)
    with pytest.raises(HeadsmithError, match="cannot skip blocks"):
        program.apply("draft(layers=[0, 1])")
    with pytest.raises(HeadsmithError, match="already has a draft"):
        program.apply("draft(layers=[1]), draft(layers=[0])")
    with pytest.raises(HeadsmithError, match="without quantize"):
        program.apply('draft(method=quantized, passes="dce")')
    with pytest.raises(HeadsmithError, match="does not fit the target's cache"):
        program.apply('draft(method=pruned, passes="gqa(kv_heads=1)")')
    with pytest.raises(HeadsmithError, match="encoder"):
        tiny_program("bert").apply("draft(layers=[0])")
    changed = program.apply("draft(layers=[1]), gqa(kv_heads=1)")  # the target's cache changed after the draft
    with pytest.raises(HeadsmithError, match="no longer fits the target"):
        TorchEngine.from_program(changed)


def test_search_finds_a_block_that_does_nothing() -> None:
    """Block 1 with zeroed output projections is the identity: skipping it keeps every prediction, so the search
    skips it (and on the random model nothing else pays)."""
    program = tiny_program("llama").clone()
    for node in program.gm.graph.nodes:
        if node.op == "get_attr" and "layers.1." in str(node.target) and ("o_proj" in str(node.target)
                                                                          or "down_proj" in str(node.target)):
            set_tensor(program.gm, str(node.target), torch.zeros_like(get_tensor(program.gm, str(node.target))))
    found = program.apply("draft(method=layer-skip, search=true)")
    report = found.reports[-1]
    assert report["skipped"] == [1] and report["search"][0]["agreement"] == 1.0
    assert report["modelled_speedup"] > 1.0 and found.drafts[0].report["top1_agreement"] == 1.0
    with pytest.raises(HeadsmithError, match="no skipped set"):
        tiny_program("llama").apply("draft(method=layer-skip, search=true)")


def test_expected_speedup_model() -> None:
    assert expected_speedup(1.0, 0.0, 4) == (5.0, 4)  # free and always right: k + 1 tokens a step
    speedup, k = expected_speedup(0.8, 0.2)
    assert 1.5 < speedup < 2.5 and 2 <= k <= 6
    assert expected_speedup(0.3, 0.9) == (1.0, 0)  # no k pays


@pytest.mark.parametrize("engine_kind", ["program", "torch", "onnx", "onnx-plain", "tvm"])
def test_model_drafts_equal_plain_greedy_decoding(engine_kind: str) -> None:
    """Ragged acceptance over a batch of four, batch one, fixed and adaptive k: every output equals plain greedy,
    on every engine (the draft writes the target's cache, the verify overwrites it: in place on ONNX Runtime's
    GroupQueryAttention buffers, ping-pong with the plain lowering, TVM's capacity buffers)."""
    if engine_kind == "tvm":
        pytest.importorskip("tvm")
    if engine_kind == "program":
        engine = TorchEngine.from_program(with_drafts())
    else:
        backend, _, attention = engine_kind.partition("-")
        engine = engine_for(read_artifact(artifact(backend, attention)))
    assert set(engine.drafts) == {"skip", "int4", "same"}  # type: ignore[attr-defined]
    config = GenerationConfig(max_new_tokens=18, stop_tokens=())
    plain = generate(engine, PROMPTS, config).tokens
    for name in ("skip", "int4", "same", "ngram+skip"):  # the last: prompt lookup where it matches, else the draft
        fixed = speculative_generate(engine, PROMPTS, config, name, k=3, adaptive=False)
        assert fixed.tokens == plain, name
        assert speculative_generate(engine, PROMPTS, config, name, k=4).tokens == plain, name  # adaptive
        assert speculative_generate(engine, PROMPTS[:1], config, name, k=3).tokens == plain[:1], name
        if name == "same":  # always right: 4 tokens a step
            assert fixed.stats["acceptance"] == 1.0 and fixed.decode_steps == 5


def test_layer_skip_stores_nothing_more() -> None:
    plain = _ROOT / "drafts-llama-onnx-none"
    headsmith.convert(tiny_program("llama"), plain, backend="onnx", force=True)
    path = artifact("onnx")
    manifest = json.loads((path / "manifest.json").read_text())
    drafts = manifest["backend"]["drafts"]
    assert drafts["skip"]["cache"] == [0, 1] and drafts["int4"]["cache"] == [0, 1, 2, 3]
    assert not (path / "draft_skip.onnx.data").exists()  # every initializer points into prefill.onnx.data
    assert (path / "weights.safetensors").stat().st_size < 1.3 * (plain / "weights.safetensors").stat().st_size


def test_a_stop_token_inside_a_drafted_run_and_k_past_the_budget() -> None:
    engine = TorchEngine.from_program(with_drafts())
    free = generate(engine, PROMPTS[:1], GenerationConfig(max_new_tokens=20, stop_tokens=())).tokens[0]
    config = GenerationConfig(max_new_tokens=20, stop_tokens=(free[6],))
    want = generate(engine, PROMPTS[:1], config).tokens
    assert speculative_generate(engine, PROMPTS[:1], config, "same", k=8, adaptive=False).tokens == want
    short = GenerationConfig(max_new_tokens=3, stop_tokens=())
    result = speculative_generate(engine, PROMPTS[:1], short, "same", k=8, adaptive=False)
    assert result.tokens == [free[:3]] and result.stats["drafted"] <= 2


def test_rejection_sampling_with_the_drafts_distribution() -> None:
    """Three sampled tokens, the last two from a verified step of the skip draft (q is its own distribution, not
    one-hot): 1000 seeded runs against the target's exact joint distribution (chi-square, 0.1% level)."""
    program = with_drafts()
    chi2, outcomes, stats = sampled_joint_chi_square(program, TorchEngine.from_program(program), "skip")
    assert 0 < stats["accepted"] < stats["drafted"]
    assert outcomes == 8 and chi2 < 24.32, chi2  # chi-square(7 dof) 0.999 quantile


def test_auto_unknown_and_cli() -> None:
    from typer.testing import CliRunner

    from headsmith.cli import app

    engine = TorchEngine.from_program(with_drafts())
    chosen = draft_for("auto", engine)  # prompt lookup + the best modelled speed-up: int4 (a copy never pays)
    assert isinstance(chosen, ModelDraft) and chosen.name == "ngram+int4" and chosen.lookup is not None
    assert draft_for("auto", TorchEngine.from_program(tiny_program("llama"))).name == "ngram"
    with pytest.raises(HeadsmithError, match="known here: skip, int4, same, ngram"):
        draft_for("medusa", engine)
    path = artifact("torch")
    if read_artifact(path).tokenizer is None:
        pytest.skip("the tiny model has no tokenizer")
    result = CliRunner().invoke(app, ["run", str(path), "--prompt", "a b a b", "--max-new-tokens", "6",
                                      "--draft", "skip"])
    assert result.exit_code == 0, result.output
    assert "draft skip:" in result.output


def test_tensorrt_refuses_drafts() -> None:
    from headsmith.backends.tensorrt_backend import lower_tensorrt

    with pytest.raises(HeadsmithError, match="TensorRT backend does not build speculative drafts"):
        lower_tensorrt(with_drafts(), _ROOT, None)



def test_bench_times_a_stored_draft() -> None:
    from headsmith.runtime.bench import run_bench

    engine = TorchEngine.from_program(with_drafts())
    row = run_bench(engine, None, [24], 12, 1_000_000, 1024, repeats=1, draft="same", k=3)["contexts"][0]
    assert row["lossless"] and row["draft_name"] == "same" and row["acceptance"] > 0.9
    assert {"draft_ms_per_step", "verify_ms_per_step", "speedup", "mean_accepted"} <= set(row)
