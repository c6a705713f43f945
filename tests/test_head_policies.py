"""Per-head sparse attention (DuoAttention, RazorAttention): head groups, their heterogeneous caches on every
engine, the KV budget, composition with the head-editing passes, and the passkey evaluation."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.corpus import PASSKEY_FILLER, PASSKEY_QUESTION, PASSKEY_TASK, passkey_prompt, retrieval_samples
from headsmith.errors import HeadsmithError
from headsmith.eval.passkey import passkey
from headsmith.passes.head_groups import split_layer
from headsmith.passes.kv_cache import cache_layout
from headsmith.passes.razor import razor_scores, repeated_random_tokens
from headsmith.passes.structure import refresh_values
from headsmith.program import Program
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.sites import head_groups

from .conftest import _ROOT, tiny_dir, tiny_program
from .test_sparse_attention import check_generation

RAZOR = "sparse-attention(pattern=razor, window=5, sinks=2, kv_budget=0.75, calibration_length=160)"
DUO = "sparse-attention(pattern=duo, window=5, sinks=2, kv_budget=0.75, calibration_length=160, steps=3)"


def split(arch: str, window: int = 5, sinks: int = 2) -> Program:
    """Every layer split by hand: KV head ``layer % G`` keeps the full cache, the others stream."""
    program = tiny_program(arch).clone()
    for site in program.sites():
        split_layer(program, site, [site.layer % site.n_kv_heads], window, sinks)
    program.gm.recompile()
    refresh_values(program.gm)
    program._shapes = None
    return program


@functools.cache
def policy(arch: str, spec: str) -> Program:
    return tiny_program(arch).apply(spec)


def forward(program: Program, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return program(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_head_groups_are_an_exact_relabelling_of_heads(arch: str) -> None:
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    whole = split(arch, window=1000, sinks=0)  # a window longer than the text masks nothing
    assert forward(whole, ids).sub(forward(tiny_program(arch), ids)).abs().max() < 1e-4
    program = split(arch)
    groups = head_groups(program.gm.graph)
    if tiny_program(arch).sites()[0].n_kv_heads > 1:
        assert sorted(groups) == [0, 1] and all(len(g) == 2 for g in groups.values())
        spec = program.spec()
        assert spec.n_layers == 2 and [la.group for la in spec.layers] == [0, 1, 0, 1]
        entries = cache_layout(program, ring=True)
        assert [e.name for e in entries[:4]] == ["layer0.g0.key", "layer0.g0.value", "layer0.g1.key", "layer0.g1.value"]
        assert [e.capacity for e in entries[:4]] == [0, 0, 7, 7]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_split_decode_equals_the_dense_mask_far_past_the_window(arch: str) -> None:
    program = split(arch)
    check_generation(TorchEngine.from_program(program), program)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_split_artifacts_keep_a_ring_for_the_streaming_group_only(backend: str) -> None:
    program = split("llama")
    out = _ROOT / f"split-llama-{backend}"
    headsmith.convert(program, out, backend=backend)
    art = read_artifact(out)
    cache = art.manifest["backend"]["cache"]
    assert [(e["name"], e["capacity"]) for e in cache if e["layer"] == 0] == [
        ("layer0.g0.key", 0), ("layer0.g0.value", 0), ("layer0.g1.key", 7), ("layer0.g1.value", 7)]
    if backend == "onnx":
        assert art.manifest["backend"]["gqa_layers"] == 4  # every head group runs onnxruntime's fused kernel
    check_generation(engine_for(art), program)


@pytest.mark.slow
def test_split_on_tvm_equals_the_dense_mask() -> None:
    pytest.importorskip("tvm")
    program = split("gpt2")
    out = _ROOT / "split-gpt2-tvm"
    headsmith.convert(program, out, backend="tvm")
    check_generation(engine_for(read_artifact(out)), program)


@pytest.mark.parametrize("spec", [RAZOR, DUO])
def test_per_head_policies_fit_the_budget_and_decode_exactly(spec: str) -> None:
    program = policy("gpt2", spec)
    report = program.reports[-1]
    assert 0 < report["kv_fraction"] <= 0.75 and report["retrieval_heads"] > 0
    entries = cache_layout(program, ring=True)
    held = sum(e.bytes_per_token(4) * (min(256, e.capacity) if e.capacity else 256) for e in entries)
    full = sum(e.bytes_per_token(4) * 256 for e in cache_layout(tiny_program("gpt2")))
    assert held / full == pytest.approx(report["kv_fraction"])
    check_generation(TorchEngine.from_program(program), program)


def test_razor_finds_the_heads_that_copy_a_repeated_text() -> None:
    """A head made to attend to the earlier copy of its token (echo) scores far above the others."""
    program = tiny_program("gpt2")
    ids = repeated_random_tokens(program.info.vocab_size, 32, 1)
    assert torch.equal(ids[:, :32], ids[:, 32:])
    scores = razor_scores(program, 32)
    assert len(scores.echo) == 2 and all(((0 <= e) & (e <= 1)).all() for e in scores.echo + scores.induction)
    causal_uniform = sum(1 / (32 + t + 1) for t in range(32)) / 32  # echo mass of a head attending uniformly
    assert float(torch.cat(scores.echo).mean()) == pytest.approx(causal_uniform, rel=1.0)


def test_duo_rows_end_in_their_answer() -> None:
    program = tiny_program("llama")
    ids, answer = retrieval_samples(program, 3, 160)
    assert ids.shape == (3, 160) and answer > 0
    for row in ids:  # the answer is the needle's key, said earlier in the row
        key, body = row[-answer:].tolist(), row[:-answer].tolist()
        assert any(body[i:i + answer] == key for i in range(len(body) - answer))
        assert program.tokenizer.decode(row[:-answer]).endswith("The pass key is")


@pytest.mark.parametrize(("arch", "spec", "message"), [
    ("gpt2", RAZOR + ", gqa(kv_heads=1)", "run gqa before the per-head pattern"),
    ("gpt2", RAZOR + ", prune-heads(ratio=0.25)", "run prune-heads before"),
    ("llama", "prune-heads(ratio=0.25), " + RAZOR, "prune with unit=group"),
    ("gpt2", "quantize(weights=int8), " + RAZOR, "put quantize"),
])
def test_per_head_policies_refuse_what_they_cannot_split(arch: str, spec: str, message: str) -> None:
    with pytest.raises(HeadsmithError, match=message):
        tiny_program(arch).apply(spec)


@pytest.mark.parametrize(("arch", "spec"), [("gpt2", "gqa(kv_heads=2), " + RAZOR),
                                            ("gpt2", "prune-heads(ratio=0.25, unit=group), " + RAZOR),
                                            ("llama", "mla(kv_fraction=0.5), " + RAZOR)])
def test_per_head_policies_compose_after_head_editing_passes(arch: str, spec: str) -> None:
    """After mla a layer has one latent "KV head": the policy picks whole layers (full or streaming)."""
    program = policy(arch, spec)
    check_generation(TorchEngine.from_program(program), program)


@functools.cache
def digit_tokenizer() -> Any:
    """A small BPE that can spell numbers (the tiny models' tokenizer learnt the Bible's letters only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], initial_alphabet=list("0123456789"))
    tok.train_from_iterator([PASSKEY_TASK, PASSKEY_FILLER * 4, PASSKEY_QUESTION, "The pass key is. Remember it."],
                            trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_passkey_prompt_hides_the_key_at_its_depth() -> None:
    tok = digit_tokenizer()
    ids, answer = passkey_prompt(tok, 400, 0.5, "12345")
    assert ids.numel() == 400 and tok.decode(answer).strip() == "12345"
    text = tok.decode(ids)
    at, total = text.index("The pass key is 12345"), len(text)
    assert 0.3 < at / total < 0.7 and text.endswith("The pass key is")
    with pytest.raises(HeadsmithError, match="depth"):
        passkey_prompt(tok, 400, 1.5, "12345")


def test_passkey_scores_each_depth() -> None:
    tok = digit_tokenizer()

    def oracle(prompt: list[int], n: int) -> list[int]:  # reads the key off the prompt: retrieves at depth <= 0.5
        text = tok.decode(prompt)
        key = text.split("The pass key is ", 1)[1][:5]
        at = text.index("The pass key is") / len(text)
        return tok(f" {key if at < 0.6 else '00000'}", add_special_tokens=False)["input_ids"][:n]

    result = passkey(oracle, tok, [300], depths=(0.0, 0.5, 1.0))
    assert result["contexts"]["300"]["depths"] == {"0": 1.0, "0.5": 1.0, "1": 0.0}
    assert result["mean"] == pytest.approx(2 / 3)


def test_cli_inspects_retrieval_scores_and_runs_passkey(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from headsmith.cli import main

    assert main(["inspect", str(tiny_dir("llama")), "--scores", "heads-retrieval", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["scores"]
    assert table["methods"] == ["induction", "echo"] and len(table["induction"]) == 2
    out = tmp_path / "art"
    headsmith.convert(split("llama"), out, backend="torch")
    assert main(["eval", str(out), "--passkey", "--contexts", "200", "--depths", "0,1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["contexts"]["200"]["depths"]) == ["0", "1"] and len(result["answers"]) == 2
    assert main(["eval", str(out), "--passkey", "--contexts", "9999"]) == 2
    assert "exceeds the model's 256 positions" in capsys.readouterr().err
