"""gqa, mla, heal and the HF export on tiny models: structure, must-not-fire, numerics."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import headsmith
from headsmith.errors import BackendError, PassError, PassSpecError
from headsmith.fxutil import get_tensor, set_tensor
from headsmith.passes import PassContext
from headsmith.passes.kv_cache import decode_graph, prefill_graph

from .conftest import tiny_program


def max_diff(a: headsmith.Program, b: headsmith.Program, seq: int = 24) -> float:
    ids, pos, mask = a.example_inputs(2, seq, seed=7, pad=3)
    return float((a(ids, mask, pos) - b(ids, mask, pos))[mask.bool()].abs().max())


def rope_related(program: headsmith.Program) -> headsmith.Program:
    """A copy whose KV heads are exact RoPE-commuting images of KV head 0 (keys: a complex scalar per rotary
    pair; values: any invertible map), so merging them loses nothing if the fit respects RoPE."""
    out = program.clone()
    g = torch.Generator().manual_seed(3)
    for site in out.sites():
        d, half = site.head_dim, site.head_dim // 2
        wk = get_tensor(out.gm, site.k.weight).reshape(site.n_kv_heads, d, -1).clone()
        wv = get_tensor(out.gm, site.v.weight).reshape(site.n_kv_heads, d, -1).clone()
        for head in range(1, site.n_kv_heads):
            if site.rope is not None:
                mag = 0.5 + torch.rand(half, generator=g)
                phase = torch.rand(half, generator=g) * 2 * math.pi
                re, im = (mag * phase.cos())[:, None], (mag * phase.sin())[:, None]
                wk[head, :half] = re * wk[0, :half] - im * wk[0, half:]
                wk[head, half:] = im * wk[0, :half] + re * wk[0, half:]
            else:
                wk[head] = (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)) @ wk[0]
            wv[head] = (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)) @ wv[0]
        set_tensor(out.gm, site.k.weight, wk.reshape(-1, wk.shape[-1]))
        set_tensor(out.gm, site.v.weight, wv.reshape(-1, wv.shape[-1]))
    return out


@functools.cache
def related(arch: str) -> headsmith.Program:
    return rope_related(tiny_program(arch))


# ---- gqa ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "bert"])
def test_gqa_fit_is_exact_when_heads_are_rope_related(arch: str) -> None:
    source = related(arch)
    fitted = source.apply("gqa(kv_heads=1)", PassContext(source=source))
    meaned = source.apply("gqa(kv_heads=1, method=mean)", PassContext(source=source))
    assert [s.n_kv_heads for s in fitted.sites()] == [1, 1]
    assert fitted.reports[-1]["count"] == 2
    assert max_diff(fitted, source) <= 1e-3
    assert max_diff(meaned, source) > 1e-2  # mean pooling is not exact here
    assert fitted.spec().kv_bytes_per_token(2) * tiny_program(arch).sites()[0].n_kv_heads == \
        tiny_program(arch).spec().kv_bytes_per_token(2)


def test_gqa_regroups_mha_heads_by_similarity() -> None:
    program = tiny_program("gpt2").clone()  # MHA: 4 KV heads
    site = program.sites()[0]
    d = site.head_dim
    wk = get_tensor(program.gm, site.k.weight).reshape(4, d, -1).clone()
    wv = get_tensor(program.gm, site.v.weight).reshape(4, d, -1).clone()
    wk[3], wv[3] = 2 * wk[0], -wv[0]  # head 3 is a copy of head 0 (up to maps): they belong together
    wk[2], wv[2] = wk[1] * 0.5, wv[1] * 3
    set_tensor(program.gm, site.k.weight, wk.reshape(-1, wk.shape[-1]))
    set_tensor(program.gm, site.v.weight, wv.reshape(-1, wv.shape[-1]))
    program.gm.recompile()
    out = program.apply("gqa(kv_heads=2)")
    assert out.reports[-1]["layers"][0]["groups"] == [[0, 3], [1, 2]]
    assert out.reports[-1]["layers"][0]["key_rel_error"] < 1e-9
    assert [s.n_kv_heads for s in out.sites()] == [2, 2]


def test_gqa_must_not_fire_and_bad_requests() -> None:
    program = tiny_program("llama")  # 2 KV heads
    ctx = PassContext()
    same = program.apply("gqa(kv_heads=2)", ctx)
    assert same.reports[-1]["count"] == 0 and same.gm.code == program.gm.code
    assert any("matched 0 sites" in w for w in ctx.warnings)
    with pytest.raises(PassError, match="4 KV heads, which does not divide into 3"):
        tiny_program("gpt2").apply("gqa(kv_heads=3)")
    with pytest.raises(PassError, match="per-head key norms|qk-norm"):
        _gemma_two_kv().apply("gqa(kv_heads=1)")
    with pytest.raises(PassSpecError, match="must be one of fit, mean"):
        program.apply("gqa(kv_heads=1, method=median)")


def _gemma_two_kv() -> headsmith.Program:
    from .conftest import TINY, _ROOT
    cls_name, kwargs = TINY["gemma3"]
    config = getattr(transformers, cls_name)(**{**kwargs, "num_key_value_heads": 2})
    torch.manual_seed(0)
    d = _ROOT / "gemma3-kv2"
    if not d.exists():
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return headsmith.load(d)


def test_gqa_decodes_and_exports_to_onnx(tmp_path: Path) -> None:
    source = related("llama")
    merged = source.apply("gqa(kv_heads=1)", PassContext(source=source))
    dec, entries = decode_graph(merged)
    assert entries[0].shape == (-1, 1, -1, 16)
    pre, _ = prefill_graph(merged, last_only=False)
    ids, pos, mask = merged.example_inputs(2, 16, pad=2)
    with torch.no_grad():
        out = pre(ids[:, :10], pos[:, :10], mask[:, :10])
        step = dec(ids[:, 10:], pos[:, 10:], mask, *out[1:])
    full = merged(ids, mask, pos)
    got = torch.cat([out[0], step[0]], 1)
    assert float((got - full)[mask.bool()].abs().max()) <= 1e-4


# ---- mla ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
def test_mla_full_rank_is_exact(arch: str) -> None:
    program = tiny_program(arch)
    out = program.apply("mla(kv_fraction=1.0)")
    assert max_diff(out, program) <= 1e-4
    layer = out.spec().layers[0]
    assert layer.cache_width == program.spec().layers[0].cache_width
    assert (layer.n_kv_heads, layer.head_dim, layer.v_head_dim) == (1, 32, 32)


def test_mla_half_budget_caches_the_latent_and_decodes() -> None:
    program = related("llama")
    out = program.apply("mla(kv_fraction=0.5)", PassContext(source=program))
    spec = out.spec()
    assert spec.kv_bytes_per_token(2) * 2 == program.spec().kv_bytes_per_token(2)
    assert out.reports[-1]["layers"][0]["rope_dims"] + out.reports[-1]["layers"][0]["rank"] == 32
    dec, entries = decode_graph(out)
    assert [(e.slot, e.shape) for e in entries[:2]] == [("key", (-1, 1, -1, 16)), ("value", (-1, 1, -1, 16))]
    pre, _ = prefill_graph(out, last_only=False)
    ids, pos, mask = out.example_inputs(2, 20, pad=3)
    with torch.no_grad():
        first = pre(ids[:, :12], pos[:, :12], mask[:, :12])
        second = dec(ids[:, 12:], pos[:, 12:], mask, *first[1:])
    got = torch.cat([first[0], second[0]], 1)
    assert float((got - out(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-4
    # keys of the RoPE-related heads need one rotary component per pair: the key fit is exact
    assert out.reports[-1]["layers"][0]["key_rel_error"] < 1e-9


def test_mla_refuses_what_it_cannot_convert() -> None:
    with pytest.raises(PassError, match="needs RoPE"):
        tiny_program("gpt2").apply("mla(kv_fraction=0.5)")
    with pytest.raises(PassSpecError, match="kv_fraction must be in"):
        tiny_program("llama").apply("mla(kv_fraction=1.5)")


def test_mla_lowers_to_onnx(tmp_path: Path) -> None:
    from headsmith.backends.artifact import read_artifact
    from headsmith.runtime.engine import TorchEngine, engine_for
    from headsmith.runtime.generate import GenerationConfig, generate
    out = tiny_program("llama").apply("mla(kv_fraction=0.5)")
    headsmith.convert(out, tmp_path / "a", backend="onnx")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["model"]["kv_bytes_per_token_fp16"] == out.spec().kv_bytes_per_token(2)
    cfg = GenerationConfig(max_new_tokens=24, stop_tokens=())
    ref = generate(TorchEngine.from_program(out), [[5, 6, 7, 8], [9, 10]], cfg).tokens
    got = generate(engine_for(read_artifact(tmp_path / "a")), [[5, 6, 7, 8], [9, 10]], cfg).tokens
    assert got == ref


# ---- heal -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", ["bf16", "off"])
def test_heal_recovers_part_of_the_loss(autocast: str) -> None:
    """Both precision branches, forced, whatever this CPU has (auto picks bf16 only with native bf16)."""
    source = tiny_program("llama")
    merged = source.apply("gqa(kv_heads=1, method=mean), "
                          f"heal(steps=40, lr=0.003, seq_len=64, eval_tokens=300, autocast={autocast})")
    report = merged.reports[-1]
    assert report["pass"].startswith("heal") and report["steps"] == 40
    assert report["bf16"] is (autocast == "bf16")
    assert report["after"]["kl"] < 0.8 * report["before"]["kl"]
    assert report["loss_last"] < report["loss_first"]
    assert tiny_program("llama").history == source.history  # the source program is untouched


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "phi3", "bert"])
def test_heal_under_bf16_autocast_trains_every_architecture(arch: str) -> None:
    source = tiny_program(arch)
    healed = source.apply("prune-mlp(ratio=0.25), heal(steps=2, seq_len=16, eval_tokens=0, autocast=bf16)")
    assert healed.reports[-1]["bf16"] is True
    ids, pos, mask = source.example_inputs(2, 12, pad=2)
    out = healed(ids, mask, pos)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_attention_op_computes_mixed_dtypes_in_the_promoted_dtype(softcap: float) -> None:
    """Under bf16 autocast v comes out of its projection in bf16 while RoPE's fp32 tables promote q and k:
    the op computes in the promoted dtype and each gradient comes back in its input's dtype."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g).requires_grad_(True)
    k = torch.randn(2, 2, 6, 8, generator=g).requires_grad_(True)
    v = torch.randn(2, 2, 6, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    out = torch.ops.headsmith.attention(q, k, v, mask, softcap=softcap)
    ref = torch.ops.headsmith.attention(q, k, v.float(), mask, softcap=softcap)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    assert all(bool(torch.isfinite(t.grad.float()).all()) for t in (q, k, v))


def test_heal_needs_an_earlier_pass() -> None:
    with pytest.raises(PassError, match="heal needs an earlier pass"):
        tiny_program("llama").apply("heal(steps=2)", PassContext(source=tiny_program("llama")))


# ---- HF export ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma3"])
def test_hf_export_loads_with_from_pretrained(arch: str, tmp_path: Path) -> None:
    program = tiny_program(arch)
    spec = "gqa(kv_heads=1)" if arch != "gemma3" else "dce"
    out = program.apply(spec)
    headsmith.convert(out, tmp_path / "a", backend="torch", options={"export": "hf"})
    hf_dir = tmp_path / "a" / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["num_key_value_heads"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids, pos, mask = out.example_inputs(2, 19, pad=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert float((ref - out(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-4


def test_hf_export_refuses_what_the_architecture_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="has no grouped-query attention"):
        headsmith.convert(tiny_program("gpt2").apply("gqa(kv_heads=2)"), tmp_path / "a", options={"export": "hf"})
    qwen = tiny_program("qwen2").clone()
    for name, tensor in list(qwen.gm.state_dict().items()):
        if name.endswith("q_proj.bias"):
            set_tensor(qwen.gm, name, torch.full_like(tensor, 0.1))
    with pytest.raises(BackendError, match="DeepSeek-V3's q_proj has no bias"):
        headsmith.convert(qwen.apply("mla(kv_fraction=0.5)"), tmp_path / "b", options={"export": "hf"})
    with pytest.raises(BackendError, match="from Llama-family models"):
        headsmith.convert(tiny_program("phi3").apply("mla(kv_fraction=0.5)"), tmp_path / "c",
                          options={"export": "hf"})
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("spec", ["mla(kv_fraction=0.5)", "mla(kv_fraction=1.0)", "mla(rank=8, rope_dims=12)",
                                  "mla(kv_fraction=0.5), heal(steps=2)"])
def test_mla_exports_as_deepseek_v3(spec: str, tmp_path: Path) -> None:
    """An mla program is written as a DeepSeek-V3 checkpoint whose logits are the program's (batch with padding;
    layers keeping different rotary pairs, a pair kept twice, a healed program)."""
    program = tiny_program("llama").apply(spec, PassContext(source=tiny_program("llama")))
    headsmith.convert(program, tmp_path / "a", backend="torch", options={"export": "hf"})
    hf_dir = tmp_path / "a" / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["qk_nope_head_dim"] == 0
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    ids, pos, mask = program.example_inputs(2, 19, pad=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert float((ref - program(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-4
