"""Speculative decoding: draft-and-verify equals plain greedy decoding on every engine (cache rollback, ragged
acceptance in a batch, stops inside an accepted run, k past the budget), and rejection sampling keeps the
target's distribution."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.errors import HeadsmithError
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.generate import GenerationConfig, generate
from headsmith.runtime.speculative import NgramDraft, speculative_generate

from .conftest import _ROOT, sampled_joint_chi_square, tiny_program

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 12, 13, 9, 10, 11], [3, 4, 5], [40, 41, 42, 43, 44, 45, 46]]


@dataclass
class OracleDraft:
    """Proposes the target's own greedy continuation (known from a plain run), with every ``wrong``-th drafted
    token replaced by another one: long accepted runs and rejections at varying offsets, so every rollback path
    runs (a draft, not a stand-in for the engine: the engine verifies every token)."""

    answers: dict[tuple[int, ...], list[int]]
    wrong: int = 3
    name: str = "oracle"
    calls: list[int] = field(default_factory=list)

    def propose(self, history: list[int], k: int) -> list[int]:
        for prompt, answer in self.answers.items():
            n = len(prompt)
            if tuple(history[:n]) == prompt and history[n:] == answer[:len(history) - n]:
                done = len(history) - n
                out = answer[done:done + k]
                self.calls.append(len(out))
                return [(t + 1) % 100 if (done + i) % self.wrong == self.wrong - 1 else t for i, t in enumerate(out)]
        return []


@dataclass
class ForeignDraft:
    """A draft with another tokenizer: ids past the target's vocabulary."""

    name: str = "foreign"

    def propose(self, history: list[int], k: int) -> list[int]:
        return [10_000] * k


def oracle(engine: object, prompts: list[list[int]], config: GenerationConfig, wrong: int = 3) -> OracleDraft:
    plain = generate(engine, prompts, config).tokens  # type: ignore[arg-type]
    return OracleDraft({tuple(p): t for p, t in zip(prompts, plain)}, wrong)


@functools.cache
def onnx_engine(arch: str) -> object:
    out = _ROOT / f"speculative-{arch}-onnx"
    headsmith.convert(tiny_program(arch), out, backend="onnx")
    return engine_for(read_artifact(out))


def test_ngram_draft_proposes_what_followed_the_latest_match() -> None:
    draft = NgramDraft(max_ngram=2)
    assert draft.propose([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 3) == [4, 5, 1]  # the latest "1 2" wins
    assert draft.propose([7, 8, 9, 8], 2) == [9, 8]  # no "9 8" before: falls back to the 1-gram "8"
    assert draft.propose([1, 2, 3], 4) == []
    with pytest.raises(HeadsmithError, match="min_ngram"):
        NgramDraft(max_ngram=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("wrong", [2, 3, 100])
def test_greedy_equals_plain_decoding_on_the_torch_engine(arch: str, wrong: int) -> None:
    engine = TorchEngine.from_program(tiny_program(arch))
    config = GenerationConfig(max_new_tokens=25, stop_tokens=())
    plain = generate(engine, PROMPTS, config).tokens
    for draft in (NgramDraft(), oracle(engine, PROMPTS, config, wrong)):
        for k, adaptive in ((1, False), (4, True), (6, False)):
            result = speculative_generate(engine, PROMPTS, config, draft, k=k, adaptive=adaptive)
            assert result.tokens == plain  # ragged acceptance over a batch of four
            for prompt, want in zip(PROMPTS[:2], plain[:2]):
                assert speculative_generate(engine, [prompt], config, draft, k=k).tokens == [want]
    result = speculative_generate(engine, PROMPTS[:1], config, oracle(engine, PROMPTS[:1], config, wrong), k=4)
    assert result.stats["accepted"] > 0 and result.decode_steps < 25


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_cache_rollback_on_onnx_runtime_and_tvm(backend: str) -> None:
    if backend == "tvm":
        pytest.importorskip("tvm")
        out = _ROOT / "speculative-llama-tvm"
        headsmith.convert(tiny_program("llama"), out, backend="tvm")
        engine = engine_for(read_artifact(out))
    else:
        engine = onnx_engine("llama")
    config = GenerationConfig(max_new_tokens=30, stop_tokens=())
    plain = generate(engine, PROMPTS, config).tokens  # type: ignore[arg-type]
    draft = oracle(engine, PROMPTS, config)
    for prompts, want in ((PROMPTS[:1], plain[:1]), (PROMPTS, plain)):
        result = speculative_generate(engine, prompts, config, draft, k=4)  # type: ignore[arg-type]
        assert result.tokens == want
        assert result.stats["accepted"] > 0


def test_stops_inside_an_accepted_run_and_k_past_the_budget() -> None:
    engine = TorchEngine.from_program(tiny_program("llama"))
    free = generate(engine, PROMPTS[:1], GenerationConfig(max_new_tokens=20, stop_tokens=())).tokens[0]
    stop = free[6]  # inside the run the oracle drafts (wrong every 100th: all accepted)
    config = GenerationConfig(max_new_tokens=20, stop_tokens=(stop,))
    want = generate(engine, PROMPTS[:1], config).tokens
    assert want[0][-1] == stop and len(want[0]) <= 7
    draft = OracleDraft({tuple(PROMPTS[0]): free}, wrong=100)
    assert speculative_generate(engine, PROMPTS[:1], config, draft, k=8).tokens == want
    short = GenerationConfig(max_new_tokens=3, stop_tokens=())
    result = speculative_generate(engine, PROMPTS[:1], short, draft, k=8)
    assert result.tokens == [free[:3]] and max(draft.calls[-result.decode_steps:]) <= 2  # k cut to the budget
    minimum = GenerationConfig(max_new_tokens=20, min_new_tokens=10, stop_tokens=(stop,))
    assert speculative_generate(engine, PROMPTS[:1], minimum, NgramDraft(), k=4).tokens == \
        generate(engine, PROMPTS[:1], minimum).tokens


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """Three sampled tokens after a prompt (the second and third come from a verified draft step), 1000 seeded
    runs: their joint frequencies against the target's exact joint distribution (chi-square, 0.1% level)."""
    program = tiny_program("llama")

    @dataclass
    class GreedyDraft:
        """The target's own likeliest next tokens (a deterministic draft, right about half of the time here)."""

        probs: Callable[[tuple[int, ...]], torch.Tensor]
        name: str = "greedy-self"

        def propose(self, history: list[int], k: int) -> list[int]:
            out: list[int] = []
            for _ in range(k):
                out.append(int(self.probs(tuple(history + out)).argmax()))
            return out

    chi2, outcomes, stats = sampled_joint_chi_square(program, TorchEngine.from_program(program), GreedyDraft)
    assert 0 < stats["accepted"] < stats["drafted"]  # drafts were both accepted and rejected
    assert outcomes == 8 and chi2 < 24.32, chi2  # chi-square(7 dof) 0.999 quantile


def test_speculative_refuses_ring_caches_unknown_drafts_and_foreign_tokens() -> None:
    streaming = TorchEngine.from_program(tiny_program("llama").apply("sparse-attention(window=5, sinks=2)"))
    config = GenerationConfig(max_new_tokens=5, stop_tokens=())
    with pytest.raises(HeadsmithError, match="ring"):
        generate(streaming, PROMPTS[:1], config, draft="ngram")
    engine = TorchEngine.from_program(tiny_program("llama"))
    with pytest.raises(HeadsmithError, match="unknown draft"):
        generate(engine, PROMPTS[:1], config, draft="medusa")
    with pytest.raises(HeadsmithError, match="vocabulary"):
        speculative_generate(engine, PROMPTS[:1], config, ForeignDraft())


def test_cli_run_with_a_draft(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    from typer.testing import CliRunner

    from headsmith.cli import app

    program: Program = tiny_program("llama")
    out = _ROOT / "speculative-llama-torch"
    headsmith.convert(program, out, backend="torch")
    if read_artifact(out).tokenizer is None:
        pytest.skip("the tiny model has no tokenizer")
    result = CliRunner().invoke(app, ["run", str(out), "--prompt", "a b a b a b", "--max-new-tokens", "8",
                                      "--draft", "ngram"])
    assert result.exit_code == 0, result.output
    assert "drafted tokens accepted" in result.output


def test_bench_reports_the_draft_side_by_side() -> None:
    from headsmith.runtime.bench import run_bench

    engine = TorchEngine.from_program(tiny_program("llama"))
    result = run_bench(engine, None, [24], 12, 1_000_000, 1024, repeats=1, draft="ngram", k=3)
    row = result["contexts"][0]
    assert {"decode_tok_s", "plain_decode_tok_s", "speedup", "acceptance", "mean_accepted"} <= set(row)
    assert row["lossless"] and row["speedup"] > 0 and result["draft"] == "ngram"


def test_adaptive_k_falls_back_to_plain_decoding_when_the_draft_is_wrong() -> None:
    """A draft that is never right: k falls 4, 3, 2, 1, 0 and the steps are plain decoding from then on (its
    shadow proposals are checked for free); output still equals plain greedy."""

    @dataclass
    class WrongDraft:
        name: str = "wrong"

        def propose(self, history: list[int], k: int) -> list[int]:
            return [(history[-1] + 1 + i) % 128 for i in range(k)]

    engine = TorchEngine.from_program(tiny_program("llama"))
    config = GenerationConfig(max_new_tokens=40, stop_tokens=())
    plain = generate(engine, PROMPTS[:1], config).tokens
    result = speculative_generate(engine, PROMPTS[:1], config, WrongDraft(), k=4)
    assert result.tokens == plain
    assert result.stats["drafted"] <= 4 + 3 + 2 + 1 + 4  # a lucky shadow may bring k back once or twice
