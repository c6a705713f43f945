"""Real-weight checks: SmolLM2-135M (GGUF, Llama GQA) and all-MiniLM-L6-v2 (BERT encoder)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

import headsmith
from headsmith.corpus import EVAL_TEXT, tokenize
from headsmith.frontend.builtin import resolve_builtin

pytestmark = [pytest.mark.real, pytest.mark.slow]


@functools.cache
def smollm2() -> headsmith.Program:
    return headsmith.load("smollm2-135m")


def test_smollm2_spec() -> None:
    spec = smollm2().spec()
    assert spec.n_layers == 30
    assert {(la.n_heads, la.n_kv_heads, la.head_dim, la.kind) for la in spec.layers} == {(9, 3, 64, "causal")}
    assert spec.params == 134_515_008
    assert spec.kv_bytes_per_token(2) == 30 * 2 * 3 * 64 * 2


def test_smollm2_raised_logits_match_hf_on_real_text() -> None:
    program = smollm2()
    directory, _, _ = resolve_builtin("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenize(program.tokenizer, EVAL_TEXT.read_text(), 96).reshape(2, 48)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    _, pos, _ = program.make_inputs(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    out = program(ids, mask, pos)
    assert float((out - ref)[mask.bool()].abs().max()) <= 1e-4
    greedy = program.tokenizer.decode(out[0, -1].argmax())
    assert greedy == program.tokenizer.decode(ref[0, -1].argmax())


def test_minilm_hidden_states_match_hf() -> None:
    program = headsmith.load("minilm-l6")
    spec = program.spec()
    assert spec.n_layers == 6 and spec.task == "encoder"
    assert {(la.n_heads, la.n_kv_heads, la.head_dim, la.kind) for la in spec.layers} == {(12, 12, 32, "bidirectional")}
    directory, _, _ = resolve_builtin("minilm-l6")
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    batch = program.tokenizer(["In the beginning was the Word.", "And the light shineth in darkness; and the "
                               "darkness comprehended it not."], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    out = program(ids, mask)
    assert float((out - ref)[mask.bool()].abs().max()) <= 1e-4


def test_smollm2_int8_keeps_perplexity_and_int4_shrinks_the_weights() -> None:
    """Real weights, held-out text: int8 blocks within 1% of fp32's perplexity; int4 weights under 30% of fp32's
    bytes, int8 under 28% (8.5 bits a weight) (docs/precision.md has the full table)."""
    from headsmith.eval.metrics import perplexity

    program = smollm2()
    ids = tokenize(program.tokenizer, EVAL_TEXT.read_text(), 512)
    int8 = program.apply("quantize(weights=int8)")
    ref = perplexity(lambda i, m, p: program(i, m, p), ids, window=512)["perplexity"]
    got = perplexity(lambda i, m, p: int8(i, m, p), ids, window=512)["perplexity"]
    assert abs(got / ref - 1) < 0.01, (got, ref)
    int4 = program.apply("quantize(weights=int4, high=[])")
    assert int4.decode_weight_bytes() < 0.3 * program.decode_weight_bytes()
    assert int8.decode_weight_bytes() < 0.28 * program.decode_weight_bytes()  # 8.5 of 32 bits a weight
