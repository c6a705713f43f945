"""Capture + raise keep the logits of every supported architecture (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers

import headsmith
from headsmith.errors import PassError, RaiseError
from headsmith.frontend.capture import capture
from headsmith.frontend.load import load_hf
from headsmith.passes.raise_attention import classify_mask
from headsmith.sites import ATTENTION

from .conftest import EXPECTED_HEADS, TINY, reference_output, tiny_dir, tiny_program

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.mark.parametrize("arch", list(TINY))
def test_raised_program_matches_hf(arch: str) -> None:
    program = tiny_program(arch)
    targets = [n.target for n in program.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(ATTENTION) == 2
    assert SDPA not in targets
    for batch, seq, pad in ((1, 5, 0), (2, 19, 3), (3, 40, 7)):
        ids, pos, mask = program.example_inputs(batch, seq, seed=seq, pad=pad)
        ref = reference_output(arch, ids, mask, pos)
        out = program(ids, mask, pos)
        valid = mask.bool()
        assert out.shape == ref.shape
        assert float((out - ref)[valid].abs().max()) <= 1e-4


@pytest.mark.parametrize("arch", list(TINY))
def test_sites_describe_each_layer(arch: str) -> None:
    program = tiny_program(arch)
    sites = program.sites()
    heads, kv_heads = EXPECTED_HEADS[arch]
    assert [s.layer for s in sites] == [0, 1]
    for site in sites:
        assert (site.n_heads, site.n_kv_heads, site.head_dim) == (heads, kv_heads, 16)
        assert site.o is not None
        assert site.q.node is not site.k.node
    kinds = [s.kind for s in sites]
    expected = {"bert": ["bidirectional"] * 2, "mistral": ["sliding"] * 2, "gemma3": ["sliding", "causal"]}
    assert kinds == expected.get(arch, ["causal"] * 2)
    if arch in ("mistral", "gemma3"):
        assert sites[0].window == 8
    has_rope = arch not in ("gpt2", "bert")
    assert all((s.rope is not None) == has_rope for s in sites)
    assert all(s.qk_norm == (arch == "gemma3") for s in sites)
    assert (sites[0].q.bias is not None) == (arch in ("qwen2", "gpt2", "bert"))


def test_spec_counts_kv_bytes() -> None:
    spec = tiny_program("llama").spec()
    assert spec.n_layers == 2
    assert spec.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2  # layers * (K+V) * kv_heads * head_dim * fp16
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    assert spec.params == sum(p.numel() for p in hf.parameters())


def test_eager_attention_is_canonicalized_and_raised() -> None:
    loaded = load_hf(tiny_dir("llama"))
    loaded.model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir("llama"),
                                                                     attn_implementation="eager").eval()
    program, _ = capture(loaded)
    softmaxes = [n for n in program.gm.graph.nodes if "softmax" in str(n.target)]
    assert len(softmaxes) == 2
    raised = program.apply("raise-attention")
    assert [s.n_kv_heads for s in raised.sites()] == [2, 2]
    ids, pos, mask = program.example_inputs(2, 17, pad=4)
    assert float((raised(ids, mask, pos) - program(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-4


def test_unraisable_attention_names_the_layer(tmp_path) -> None:  # noqa: ANN001
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                       alibi=True, architectures=["FalconForCausalLM"])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(PassError) as info:
        headsmith.load(tmp_path)
    assert "layer 0" in str(info.value)
    assert "ALiBi" in str(info.value)
    assert isinstance(info.value.__cause__, RaiseError)


def test_classify_mask_finds_window_sinks_and_padding() -> None:
    s = 12
    keys = torch.ones(2, s, dtype=torch.int64)
    keys[1, :3] = 0
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = (j <= i) & (((i - j) < 4) | (j < 2))
    mask = (allowed[None] & keys.bool()[:, None, :])[:, None]
    sem = classify_mask(mask, False, keys)
    assert not isinstance(sem, headsmith.passes.MatchResult)
    assert (sem.causal, sem.window, sem.sinks, sem.uses_padding) == (True, 4, 2, True)
    bidirectional = keys.bool()[:, None, None, :].expand(2, 1, s, s)
    sem = classify_mask(bidirectional, False, keys)
    assert (sem.causal, sem.window, sem.uses_padding) == (False, 0, True)  # type: ignore[union-attr]
    weird = torch.rand(2, 1, s, s) > 0.5
    assert isinstance(classify_mask(weird, False, keys), headsmith.passes.MatchResult)


def test_raise_is_idempotent() -> None:
    program = tiny_program("llama")
    again = program.apply("raise-attention")
    assert again.reports[-1]["count"] == 0


def test_capture_has_dynamic_batch_and_sequence() -> None:
    program = tiny_program("qwen2")
    for batch, seq in ((1, 2), (4, 100), (2, 256)):
        ids, pos, mask = program.example_inputs(batch, seq)
        assert program(ids, mask, pos).shape == (batch, seq, 128)
