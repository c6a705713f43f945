"""prune-heads, prune-layers, prune-mlp and their scores on tiny models: structure, must-not-fire, numerics,
GQA groups, decoding, ONNX and HF export, composition, reproducibility."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import transformers

import headsmith
from headsmith.errors import PassError, PassSpecError
from headsmith.fxutil import get_tensor, is_call, set_tensor
from headsmith.passes import PassContext
from headsmith.passes.kv_cache import CACHE_POINT, cache_layout, decode_graph, prefill_graph
from headsmith.passes.prune_heads import INDEX_SELECT, kv_groups
from headsmith.passes.scores import head_scores, layer_scores, mlp_scores
from headsmith.passes.structure import find_blocks, find_mlps

from .conftest import TINY, _ROOT, tiny_program, tiny_tokenizer


def max_diff(a: headsmith.Program, b: headsmith.Program, seq: int = 20) -> float:
    ids, pos, mask = a.example_inputs(2, seq, seed=7, pad=3)
    return float((a(ids, mask, pos) - b(ids, mask, pos))[mask.bool()].abs().max())


def decode_error(program: headsmith.Program) -> float:
    """Max difference between prefill + chunked decode steps and the full forward (padded batch)."""
    pre, _ = prefill_graph(program, last_only=False)
    dec, _ = decode_graph(program)
    ids, pos, mask = program.example_inputs(2, 22, seed=3, pad=3)
    with torch.no_grad():
        out = pre(ids[:, :10], pos[:, :10], mask[:, :10])
        pieces, cache, t = [out[0]], list(out[1:]), 10
        for n in (1, 3, 8):
            out = dec(ids[:, t:t + n], pos[:, t:t + n], mask[:, :t + n], *cache)
            pieces.append(out[0])
            cache, t = list(out[1:]), t + n
    return float((torch.cat(pieces, 1) - program(ids, mask, pos))[mask.bool()].abs().max())


def edited(program: headsmith.Program, values: dict[str, torch.Tensor]) -> headsmith.Program:
    out = program.clone()
    for target, value in values.items():
        set_tensor(out.gm, target, value)
    out.gm.recompile()
    return out


def without_heads(program: headsmith.Program, kept: dict[int, list[int]]) -> headsmith.Program:
    """``program`` with the o_proj columns of every head not in ``kept`` zeroed (the exact reference)."""
    values = {}
    for site in program.sites():
        assert site.o is not None
        w = get_tensor(program.gm, site.o.weight).clone().reshape(-1, site.n_heads, site.v_head_dim)
        gone = [h for h in range(site.n_heads) if h not in kept[site.layer]]
        w[:, gone] = 0
        values[site.o.weight] = w.reshape(w.shape[0], -1)
    return edited(program, values)


@functools.cache
def deep_llama() -> headsmith.Program:
    """The tiny Llama with 4 layers (for spans and renumbering)."""
    cls_name, kwargs = TINY["llama"]
    d = _ROOT / "llama-4-layers"
    if not d.exists():
        torch.manual_seed(0)
        config = getattr(transformers, cls_name)(**{**kwargs, "num_hidden_layers": 4})
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
    return headsmith.load(d)


def identity_blocks(program: headsmith.Program, blocks: list[int]) -> headsmith.Program:
    """Zero the attention and MLP output projections of ``blocks`` (pre-norm blocks become the identity)."""
    values = {}
    for site in program.sites():
        if site.layer in blocks and site.o is not None:
            values[site.o.weight] = torch.zeros_like(get_tensor(program.gm, site.o.weight))
    for mlp in find_mlps(program):
        if mlp.layer in blocks:
            values[mlp.down.weight] = torch.zeros_like(get_tensor(program.gm, mlp.down.weight))
    return edited(program, values)


# ---- prune-heads ------------------------------------------------------------------------------------
def test_prune_heads_uneven_group_expands_kv_in_the_graph() -> None:
    source = tiny_program("llama")  # 4 query heads on 2 KV heads
    site = source.sites()[1]
    assert site.o is not None
    w_o = get_tensor(source.gm, site.o.weight).clone()
    w_o[:, :16] = 0  # query head 0 of layer 1 contributes nothing: it goes first, and removing it is exact
    program = edited(source, {site.o.weight: w_o})
    out = program.apply("prune-heads(n=1, score=norm)", PassContext(source=program))
    assert out.reports[-1]["layers"][1] == {"heads": [4, 3], "kv_heads": [2, 2], "kept": [1, 2, 3],
                                            "kv_index": [0, 1, 1]}
    att = out.sites()[1].node
    k_sel = att.args[1]
    assert is_call(k_sel, INDEX_SELECT) and is_call(k_sel.args[0], CACHE_POINT)  # type: ignore[union-attr]
    assert k_sel.args[0].args[1:] == (1, 0, 2)  # type: ignore[union-attr]  (layer 1, slot 0, seq dim 2)
    assert [(s.n_heads, s.n_kv_heads) for s in out.sites()] == [(4, 2), (3, 2)]
    assert out.spec().layers[1].cache_width == 2 * 2 * 16  # the true KV heads, not the expanded ones
    assert [(e.name, e.shape) for e in cache_layout(out)][2:] == [("layer1.slot0", (-1, 2, -1, 16)),
                                                                ("layer1.slot1", (-1, 2, -1, 16))]
    assert tuple(get_tensor(out.gm, out.sites()[1].q.weight).shape) == (48, 64)
    assert max_diff(out, program) <= 1e-5
    assert decode_error(out) <= 1e-4


def test_prune_heads_equal_groups_emit_no_index_select() -> None:
    program = tiny_program("llama")
    site = program.sites()[0]
    w_o = get_tensor(program.gm, site.o.weight).clone()  # type: ignore[union-attr]
    w_o[:, 32:] = 0  # both query heads of KV group 1 in layer 0
    program = edited(program, {site.o.weight: w_o})  # type: ignore[union-attr]
    out = program.apply("prune-heads(n=2, score=gradient)", PassContext(source=program))
    new = out.sites()[0]
    assert (new.n_heads, new.n_kv_heads) == (2, 1)
    assert not any(is_call(n, INDEX_SELECT, CACHE_POINT) for n in out.gm.graph.nodes)
    assert tuple(get_tensor(out.gm, new.k.weight).shape) == (16, 64)
    assert max_diff(out, program) <= 1e-5
    # a second pruning that makes the groups unequal, then one that makes them equal again
    twice = out.apply("prune-heads(n=1, score=random)", PassContext(source=program))
    uneven = [s for s in twice.sites() if is_call(s.node.args[1], INDEX_SELECT)]
    assert len(uneven) == 1 and (uneven[0].n_heads, uneven[0].n_kv_heads) == (3, 2)
    assert decode_error(twice) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen2", "bert"])
def test_prune_heads_respects_kv_groups(arch: str) -> None:
    """Any pruning equals the source with the removed heads' o_proj columns zeroed: each kept query head still
    reads its own KV head (MHA, GQA, MQA with qk-norm, biases, encoders)."""
    program = tiny_program(arch)
    for seed, n in ((0, 3), (1, 2)):
        out = program.apply(f"prune-heads(n={n}, score=random)", PassContext(seed=seed, source=program))
        kept = {layer: r["kept"] for layer, r in out.reports[-1]["layers"].items()}
        assert sum(len(k) for k in kept.values()) == sum(s.n_heads for s in program.sites()) - n
        assert max_diff(out, without_heads(program, kept)) <= 1e-4
        for site in out.sites():
            groups = kv_groups(out.gm, site)
            assert groups == sorted(groups) and len(set(groups)) == site.n_kv_heads
            source_site = {s.layer: s for s in program.sites()}[site.layer]
            rep = source_site.n_heads // source_site.n_kv_heads
            assert len({h // rep for h in kept[site.layer]}) == site.n_kv_heads  # a KV head goes with its group


def test_prune_heads_whole_groups_and_iterative_steps() -> None:
    program = tiny_program("llama")
    out = program.apply("prune-heads(n=2, unit=group, score=norm, steps=2)", PassContext(source=program))
    assert sorted((s.n_heads, s.n_kv_heads) for s in out.sites()) == [(2, 1), (4, 2)]
    assert not any(is_call(n, INDEX_SELECT) for n in out.gm.graph.nodes)
    assert out.spec().kv_bytes_per_token(2) == 3 * 2 * 16 * 2


def test_prune_heads_must_not_fire_and_bad_requests() -> None:
    program = tiny_program("llama")
    ctx = PassContext()
    same = program.apply("prune-heads(n=0)", ctx)
    assert same.reports[-1]["count"] == 0 and same.gm.code == program.gm.code
    assert any("matched 0 sites" in w for w in ctx.warnings)
    with pytest.raises(PassError, match="cannot remove 7 of 8 query heads while every layer keeps 1"):
        program.apply("prune-heads(n=7)")
    with pytest.raises(PassSpecError, match="give n or ratio, not both"):
        program.apply("prune-heads(n=1, ratio=0.5)")
    with pytest.raises(PassSpecError, match="must be one of auto, norm, gradient, random"):
        program.apply("prune-heads(n=1, score=magnitude)")


def test_head_scores_are_zero_for_a_silent_head() -> None:
    program = tiny_program("gpt2")
    site = program.sites()[0]
    w_o = get_tensor(program.gm, site.o.weight).clone()  # type: ignore[union-attr]
    w_o[:, 16:32] = 0
    program = edited(program, {site.o.weight: w_o})  # type: ignore[union-attr]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    for method in ("gradient", "norm"):
        scores = head_scores(program, ids, method)
        assert float(scores[0][1]) == 0.0 and bool((scores[0][[0, 2, 3]] > 0).all())


# ---- prune-layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["angular", "influence", "ppl"])
def test_prune_layers_drops_an_identity_block_exactly(score: str) -> None:
    program = identity_blocks(deep_llama(), [2])
    out = program.apply(f"prune-layers(n=1, score={score}, calibration_tokens=512)", PassContext(source=program))
    report = out.reports[-1]
    assert report["removed"] == [2] and report["removed_paths"] == ["model.model.layers.2"]
    assert max_diff(out, program) <= 1e-5
    # the blocks after it moved down: weights, attention layer indices, cache names and the config
    assert [b.path for b in find_blocks(out)] == [f"model.model.layers.{i}" for i in range(3)]
    assert not any(".layers.3." in t for t in out.weights())
    assert [s.layer for s in out.sites()] == [0, 1, 2] and out.spec().n_layers == 3
    assert [e.name for e in cache_layout(out)][-1] == "layer2.value"
    assert out.info.config["num_hidden_layers"] == 3
    assert out.n_params() < program.n_params()


def test_prune_layers_angular_drops_the_most_similar_span() -> None:
    program = identity_blocks(deep_llama(), [1, 2])
    scores = layer_scores(program, torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1)))
    assert float(scores.angular[1, 3]) < 1e-6 and float(scores.influence[1]) < 1e-6
    out = program.apply("prune-layers(n=2, score=angular)", PassContext(source=program))
    assert out.reports[-1]["removed"] == [1, 2]
    assert max_diff(out, program) <= 1e-5
    assert decode_error(out) <= 1e-4


def test_prune_layers_must_not_fire_and_bad_requests() -> None:
    program = tiny_program("llama")
    ctx = PassContext()
    same = program.apply("prune-layers(n=0)", ctx)
    assert same.reports[-1]["count"] == 0 and same.gm.code == program.gm.code
    with pytest.raises(PassError, match="cannot remove 2 of the program's 2 blocks"):
        program.apply("prune-layers(n=2)")
    with pytest.raises(PassError, match="score=ppl needs a causal LM"):
        tiny_program("bert").apply("prune-layers(n=1, score=ppl)")


def test_prune_layers_keeps_per_layer_attention_kinds() -> None:
    program = tiny_program("gemma3")  # layer 0 sliding window, layer 1 full attention
    out = program.apply("prune-layers(n=1, score=random)", PassContext(seed=3, source=program))
    removed = out.reports[-1]["removed"][0]
    kept_window = program.spec().layers[1 - removed].window
    assert out.spec().layers[0].window == kept_window
    assert out.info.config["layer_types"] == [program.info.config["layer_types"][1 - removed]]
    encoder = tiny_program("bert").apply("prune-layers(n=1, score=influence)")
    assert encoder.spec().n_layers == 1


# ---- prune-mlp --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_prune_mlp_drops_dead_channels_exactly(arch: str) -> None:
    """Channels with zero up rows and zero down columns score 0 and removing them changes nothing (gated,
    GELU with biases, and Phi-3's fused gate_up cut by chunk)."""
    program = tiny_program(arch)
    values = {}
    dead = torch.arange(0, 128, 4)
    for mlp in find_mlps(program):
        for up, parts in zip(mlp.ups, mlp.parts):
            w = get_tensor(program.gm, up.weight).clone()
            w[mlp.rows(parts, dead)] = 0
            values[up.weight] = w
        w = get_tensor(program.gm, mlp.down.weight).clone()
        w[:, dead] = 0
        values[mlp.down.weight] = w
    program = edited(program, values)
    widths = [m.width for m in find_mlps(program)]
    out = program.apply(f"prune-mlp(ratio={len(dead) / widths[0]})", PassContext(source=program))
    assert [m.width for m in find_mlps(out)] == [w - len(dead) for w in widths]
    assert out.reports[-1]["count"] == 2
    assert max_diff(out, program) <= 1e-4
    if arch != "gpt2":
        assert out.info.config["intermediate_size"] == widths[0] - len(dead)


def test_prune_mlp_must_not_fire() -> None:
    program = tiny_program("llama")
    same = program.apply("prune-mlp(ratio=0.0)")
    assert same.reports[-1]["count"] == 0 and same.gm.code == program.gm.code
    assert find_mlps(tiny_program("bert"))[0].width == 128 and len(find_mlps(tiny_program("gemma3"))) == 2
    with pytest.raises(PassSpecError, match="ratio must be in"):
        program.apply("prune-mlp(ratio=1.0)")


def test_mlp_scores_rank_dead_channels_last() -> None:
    program = tiny_program("qwen2")
    mlp = find_mlps(program)[0]
    w = get_tensor(program.gm, mlp.down.weight).clone()
    w[:, 5] = 0
    program = edited(program, {mlp.down.weight: w})
    scores = mlp_scores(program, torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)), "wanda")
    up_only = sum(get_tensor(program.gm, u.weight).abs().sum(1)[5] for u in mlp.ups)
    assert float(scores[0][5]) < float(scores[0].median()) and float(up_only) > 0


# ---- composition, decoding, backends, reproducibility ----------------------------------------------
def test_pruning_composes_with_gqa_mla_and_heal_and_decodes() -> None:
    program = tiny_program("llama")
    ctx = PassContext(source=program)
    out = program.apply("gqa(kv_heads=1, method=mean), prune-heads(n=2), prune-mlp(ratio=0.5), prune-layers(n=1), "
                        "heal(steps=2, seq_len=32, eval_tokens=0)", ctx)
    assert [r["pass"].split("(")[0] for r in out.reports[-4:]] == ["prune-heads", "prune-mlp", "prune-layers", "heal"]
    assert out.spec().n_layers == 1 and decode_error(out) <= 1e-4
    latent = program.apply("mla(kv_fraction=0.5), prune-heads(n=3, score=norm)", PassContext(source=program))
    assert sum(s.n_heads for s in latent.sites()) == 5 and decode_error(latent) <= 1e-4
    grouped = program.apply("prune-heads(n=2, unit=group), mla(kv_fraction=1.0)", PassContext(source=program))
    assert max_diff(grouped, program.apply("prune-heads(n=2, unit=group)")) <= 1e-4


def test_pruned_program_lowers_to_onnx_and_generates(tmp_path: Path) -> None:
    from headsmith.backends.artifact import read_artifact
    from headsmith.runtime.engine import TorchEngine, engine_for
    from headsmith.runtime.generate import GenerationConfig, generate
    program = tiny_program("mistral")  # sliding window + uneven groups after pruning
    out = program.apply("prune-layers(n=1), prune-heads(n=1, score=random), prune-mlp(ratio=0.25)",
                        PassContext(seed=2, source=program))
    assert any(is_call(n, INDEX_SELECT) for n in out.gm.graph.nodes)
    headsmith.convert(out, tmp_path / "a", backend="onnx")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [e["name"] for e in manifest["backend"]["cache"]] == ["layer0.slot0", "layer0.slot1"]
    assert manifest["model"]["kv_bytes_per_token_fp16"] == out.spec().kv_bytes_per_token(2)
    cfg = GenerationConfig(max_new_tokens=20, stop_tokens=())
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [9, 10]]
    ref = generate(TorchEngine.from_program(out), prompts, cfg).tokens
    assert generate(engine_for(read_artifact(tmp_path / "a")), prompts, cfg).tokens == ref


def test_layer_and_mlp_pruning_export_to_hf(tmp_path: Path) -> None:
    program = deep_llama()
    out = program.apply("prune-layers(n=2, score=influence), prune-mlp(ratio=0.25, score=random)")
    headsmith.convert(out, tmp_path / "a", backend="torch", options={"export": "hf"})
    config = json.loads((tmp_path / "a" / "hf" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 96)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "hf").eval()
    ids, pos, mask = out.example_inputs(2, 15, pad=3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert float((ref - out(ids, mask, pos))[mask.bool()].abs().max()) <= 1e-4


@pytest.mark.parametrize("spec", ["prune-heads(ratio=0.4, score=random)", "prune-layers(n=1, score=random)",
                                  "prune-mlp(ratio=0.5, score=random)"])
def test_random_scores_are_reproducible(spec: str) -> None:
    program = deep_llama()
    a = program.apply(spec, PassContext(seed=5))
    b = program.apply(spec, PassContext(seed=5))
    c = program.apply(spec, PassContext(seed=6))
    assert max_diff(a, b) == 0.0
    weights = lambda p: {k: v for k, v in p.weights().items() if "layers" in k}  # noqa: E731
    assert weights(a).keys() == weights(b).keys()
    assert any(not torch.equal(weights(a)[k], weights(c)[k]) for k in weights(a) if k in weights(c)) or \
        weights(a).keys() != weights(c).keys()


def test_inspect_prints_and_plots_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from headsmith.cli import main
    from .conftest import tiny_dir
    png = tmp_path / "layers.png"
    assert main(["inspect", str(tiny_dir("qwen2")), "--scores", "layers", "--plot", str(png),
                 "--calibration-tokens", "256"]) == 0
    text = capsys.readouterr().out
    assert "block influence" in text.lower() and "model.model.layers.1" in text
    assert png.stat().st_size > 1000
    assert main(["inspect", str(tiny_dir("qwen2")), "--scores", "neurons"]) == 2


def test_default_scores_are_the_measured_best_per_task() -> None:
    """``score=auto``: heads by norm on causal LMs and by gradient on encoders; layers by greedy perplexity on
    causal LMs and by angular distance on encoders (docs/pruning.md has the measurements behind this)."""
    llama, bert = tiny_program("llama"), tiny_program("bert")
    assert llama.apply("prune-heads(n=1)").reports[-1]["score"] == "norm"
    assert bert.apply("prune-heads(n=1)").reports[-1]["score"] == "gradient"
    layers = deep_llama().apply("prune-layers(n=1, calibration_tokens=256)").reports[-1]
    assert layers["score"] == "ppl" and len(layers["calibration_perplexity"]) == 1
    assert bert.apply("prune-layers(n=1)").reports[-1]["score"] == "angular"
