"""Shared fixtures: tiny seeded random-weight models of every supported architecture, and real ones.

Every pass run in the tests is verified numerically (the pass manager's ``Verify`` instrument); the
autouse fixture below makes that unconditional, and a test opts out only with ``@pytest.mark.no_verify``.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import headsmith
from headsmith.passes import manager

torch.set_num_threads(2)

# a larger init scale than HF's default, so greedy decoding of the random models is not one token repeated
COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 256, "initializer_range": 0.3}

TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**COMMON, "num_key_value_heads": 2, "architectures": ["LlamaForCausalLM"],
                              "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {**COMMON, "num_key_value_heads": 2, "architectures": ["Qwen2ForCausalLM"]}),
    "mistral": ("MistralConfig", {**COMMON, "num_key_value_heads": 2, "sliding_window": 8,
                                  "architectures": ["MistralForCausalLM"]}),
    "gemma3": ("Gemma3TextConfig", {**COMMON, "initializer_range": 0.05, "num_key_value_heads": 1, "head_dim": 16,
                                    "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"],
                                    "architectures": ["Gemma3ForCausalLM"]}),
    "gpt2": ("GPT2Config", {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256,
                            "initializer_range": 0.3, "architectures": ["GPT2LMHeadModel"]}),
    "phi3": ("Phi3Config", {**COMMON, "num_key_value_heads": 2, "pad_token_id": 0,
                            "architectures": ["Phi3ForCausalLM"]}),
    "bert": ("BertConfig", {**COMMON, "architectures": ["BertModel"]}),
}
DECODERS = [a for a in TINY if a != "bert"]
EXPECTED_HEADS = {"llama": (4, 2), "qwen2": (4, 2), "mistral": (4, 2), "gemma3": (4, 1), "gpt2": (4, 4),
                  "phi3": (4, 2), "bert": (4, 4)}

_ROOT = Path(tempfile.mkdtemp(prefix="headsmith-tests-"))


def hf_model(arch: str) -> torch.nn.Module:
    cls_name, kwargs = TINY[arch]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    if arch == "gemma3":  # random init leaves the norms at 0 (= scale 1); perturb so q/k norms matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.2)
    return model.eval()


@functools.cache
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 128-token BPE trained on the bundled calibration text, so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from headsmith.corpus import CALIBRATION_TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], limit_alphabet=60)
    tok.train_from_iterator([CALIBRATION_TEXT.read_text()[:200_000]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


@functools.cache
def tiny_dir(arch: str) -> Path:
    """A saved HF directory (weights, config, tokenizer) of the tiny ``arch`` model, created once per session."""
    d = _ROOT / arch
    hf_model(arch).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@functools.cache
def tiny_program(arch: str) -> headsmith.Program:
    return headsmith.load(tiny_dir(arch))


def reference_output(arch: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(tiny_dir(arch)).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
    return out.last_hidden_state if arch == "bert" else out.logits


def cuda_prefill_on_cpu(program: headsmith.Program, ids: torch.Tensor, pos: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """The last position's logits from the TVM ``cuda:sm_90`` lowering's prefill, compiled for the CPU instead
    (its decode function is dropped: the cache write is a GPU-scheduled kernel)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from headsmith.backends.artifact import graph_weights
    from headsmith.backends.tvm_backend import TvmTarget, build_module

    mod, fields = build_module(program, TvmTarget.parse("cuda:sm_90"))
    for gv in list(mod.functions):
        if gv.name_hint.startswith("decode"):
            del mod[gv]
    vm = VirtualMachine(tvm.compile(mod, target=tvm.target.Target("llvm")), tvm.cpu())
    weights = graph_weights(program.gm)
    params = vm["transform_params"]([tvm.runtime.tensor(weights[n].detach().contiguous().numpy())
                                     for n in fields["params"]])
    out = vm["prefill"](*[tvm.runtime.tensor(t.numpy()) for t in (ids, pos, mask)], *params)
    return torch.from_numpy(out[0].numpy())


@pytest.fixture(autouse=True)
def _always_verify(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numerical verification after every pass is on in tests unless the test is marked no_verify."""
    if request.node.get_closest_marker("no_verify") is None:
        monkeypatch.setattr(manager, "FORCE_VERIFY", True)


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def sampled_joint_chi_square(program: headsmith.Program, engine: object, draft: object, n: int = 1000
                             ) -> tuple[float, int, dict[str, int]]:
    """Three tokens sampled (temperature 1, top-k 2) after a fixed prompt with speculative decoding (k = 2: the
    second and third come from a verified draft step), ``n`` seeded runs: the chi-square statistic of their joint
    frequencies against the target's exact joint distribution, the number of outcomes (8), and the drafted /
    accepted counts. ``draft`` may be a callable ``probs -> Draft`` (a draft built on the exact distribution)."""
    import functools

    from headsmith.runtime.generate import GenerationConfig, distribution
    from headsmith.runtime.speculative import speculative_generate

    config = GenerationConfig(max_new_tokens=3, temperature=1.0, top_k=2, stop_tokens=())
    base = (5, 6, 7, 8, 5, 6, 7)

    @functools.cache
    def probs(ids: tuple[int, ...]) -> torch.Tensor:
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = program(t, torch.ones_like(t), torch.arange(len(ids))[None])[:, -1]
        return distribution(logits, config)[0]

    def support(ids: tuple[int, ...]) -> list[int]:
        return [int(x) for x in probs(ids).nonzero()[:, 0]]

    exact = {(a, b, c): float(probs(base)[a] * probs(base + (a,))[b] * probs(base + (a, b))[c])
             for a in support(base) for b in support(base + (a,)) for c in support(base + (a, b))}
    drafter = draft(probs) if callable(draft) else draft
    counts: dict[tuple[int, ...], int] = {}
    stats = {"drafted": 0, "accepted": 0}
    for seed in range(n):
        result = speculative_generate(engine, [list(base)], GenerationConfig(**{**config.__dict__, "seed": seed}),
                                      drafter, k=2, adaptive=False)  # type: ignore[arg-type]
        counts[tuple(result.tokens[0])] = counts.get(tuple(result.tokens[0]), 0) + 1
        stats = {key: stats[key] + result.stats[key] for key in stats}
    assert set(counts) <= set(exact)
    chi2 = sum((counts.get(x, 0) - n * p) ** 2 / (n * p) for x, p in exact.items())
    return chi2, len(exact), stats

