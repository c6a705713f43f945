"""quantize: the packed format, the pass (golden / must-not-fire / numerics), methods, engines, bad options."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import headsmith
from headsmith.backends.artifact import read_artifact
from headsmith.errors import BackendError, PassError, PassSpecError
from headsmith.passes import PassContext
from headsmith.passes.awq import _search
from headsmith.passes.gptq import gptq
from headsmith.qweights import (EMBEDDING_Q, LINEAR_Q, dequantize, pack, pack_zeros, quantize_rtn, unpack,
                                unpack_zeros)
from headsmith.runtime.engine import TorchEngine, engine_for
from headsmith.runtime.generate import GenerationConfig, generate

from .conftest import _ROOT, tiny_program

aten = torch.ops.aten
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def count(program: headsmith.Program, target: object) -> int:
    return sum(1 for n in program.gm.graph.nodes if n.op == "call_function" and n.target is target)


@functools.cache
def quantized(arch: str, spec: str) -> headsmith.Program:
    return tiny_program(arch).apply(spec)


@functools.cache
def quantized_artifact(arch: str, spec: str, backend: str, accuracy_level: int = 0) -> Path:
    out = _ROOT / f"q-{arch}-{backend}-{accuracy_level}-{abs(hash(spec))}"
    options = {"accuracy_level": accuracy_level} if backend == "onnx" else None
    headsmith.convert(quantized(arch, spec), out, backend=backend, options=options)
    return out


# ---- the packed format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trips_codes_and_zero_points(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 1 << bits, (6, 96), generator=g)
    packed = pack(q, bits, 32)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (6, 3, 32 * bits // 8)
    assert torch.equal(unpack(packed, bits).reshape(6, 96).long(), q)
    z = torch.randint(0, 1 << bits, (6, 3), generator=g).to(torch.uint8)  # odd block count: a padding nibble
    zp = pack_zeros(z, bits)
    assert tuple(zp.shape) == (6, 3 if bits == 8 else 2)
    assert torch.equal(unpack_zeros(zp, bits, 3), z)
    if bits == 4:  # the layout onnxruntime reads: element 2j in the low nibble of byte j
        assert int(packed[0, 0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, True), (8, False)])
def test_rtn_error_is_bounded_by_half_a_step(bits: int, sym: bool) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    p = quantize_rtn(w, bits, 32, sym)
    err = (p.dequantize() - w).abs().reshape(16, 4, 32)
    step = p.scales.abs()[..., None]
    limit = step * (1.0 if sym and bits == 4 else 0.5) + 1e-6  # sym 4-bit clamps the far side at +7
    assert bool((err <= limit).all())
    if sym:  # the value of largest magnitude in each block is exactly representable
        blocks = w.reshape(16, 4, 32)
        idx = blocks.abs().argmax(-1, keepdim=True)
        got = p.dequantize().reshape(16, 4, 32).gather(-1, idx)
        torch.testing.assert_close(got, blocks.gather(-1, idx))
    assert p.nbytes() < w.numel() * w.element_size() * (bits + 2) / 32


def test_linear_q_matches_its_dequantised_reference() -> None:
    w, b = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(2, 5, 64)
    p = quantize_rtn(w, 4, 32, sym=False)
    out = torch.ops.headsmith.linear_q(x, p.packed, p.scales, p.zeros, b, 4, 32)
    assert torch.equal(out, torch.nn.functional.linear(x, dequantize(p.packed, p.scales, p.zeros, 4, 32), b))
    ids = torch.tensor([[0, 47, 3]])
    rows = torch.ops.headsmith.embedding_q(p.packed, p.scales, p.zeros, ids, 4, 32)
    assert torch.equal(rows, p.dequantize()[ids])


# ---- the pass ------------------------------------------------------------------------------------------
def test_quantize_golden_int4_with_an_int8_head() -> None:
    """Before: every projection and the tied LM head are ``linear``; after: ``linear_q`` (4-bit blocks; by
    default the value and down projections in 8 bits), the LM head and the tied embedding share one 8-bit
    packed table; no float linear weight is left."""
    source = tiny_program("llama")
    q = quantized("llama", "quantize(weights=int4)")
    n_linear = count(source, aten.linear.default)
    assert count(q, aten.linear.default) == 0 and count(q, LINEAR_Q) == n_linear
    assert count(q, aten.embedding.default) == 0 and count(q, EMBEDDING_Q) == 1
    bits = {str(n.args[1].target).rsplit("_packed", 1)[0]: int(n.args[5]) for n in q.gm.graph.nodes
            if n.target is LINEAR_Q}
    eight = sorted(name.split("model.", 2)[-1] for name, b in bits.items() if b == 8)
    assert eight == ["layers.0.mlp.down_proj.weight", "layers.0.self_attn.v_proj.weight",
                     "layers.1.mlp.down_proj.weight", "layers.1.self_attn.v_proj.weight", "lm_head.weight"]
    uniform = quantized("llama", "quantize(weights=int4, high=[])")
    assert sorted(int(n.args[5]) for n in uniform.gm.graph.nodes if n.target is LINEAR_Q) == [4] * (n_linear - 1) + [8]
    emb = next(n for n in q.gm.graph.nodes if n.target is EMBEDDING_Q)
    head = next(n for n in q.gm.graph.nodes if n.target is LINEAR_Q and "lm_head" in str(n.args[1].target))
    assert emb.args[0].target == head.args[1].target  # tied: one table, stored once
    assert q.n_params() == source.n_params() and q.quantized and not source.quantized
    assert q.spec().layers == source.spec().layers
    report = q.reports[-1]
    assert report["bytes_after"] < 0.3 * report["bytes_before"] and report["kl"] < 1.5


@pytest.mark.parametrize(("spec", "linear_left"), [("quantize(weights=bf16)", 0), ("quantize(weights=int8, head=float)", 1)])
def test_quantize_16_bit_casts_and_float_head(spec: str, linear_left: int) -> None:
    source = tiny_program("llama")
    q = quantized("llama", spec)
    if "bf16" in spec:  # every linear reads its weight through a cast of a bf16 copy; the embedding casts rows
        casts = [n for n in q.gm.graph.nodes if n.target is aten._to_copy.default and n.args[0].op == "get_attr"]
        assert len(casts) == count(source, aten.linear.default)
        assert all(n.args[0].meta["val"].dtype == torch.bfloat16 for n in casts)
    else:
        assert count(q, aten.linear.default) == linear_left and count(q, aten.embedding.default) == 1
    ids, pos, mask = source.example_inputs(2, 12, pad=2)
    ref = source(ids, mask, pos)
    diff = (q(ids, mask, pos) - ref)[mask.bool()].abs().max()
    assert float(diff) < (0.03 if "bf16" in spec else 0.1) * float(ref.abs().max())


def test_quantize_must_not_fire_twice_and_keeps_the_input() -> None:
    source = tiny_program("gpt2")
    history = source.history
    once = quantized("gpt2", "quantize(weights=int8)")
    ctx = PassContext()
    twice = once.apply("quantize(weights=int8)", ctx)
    assert twice.reports[-1]["count"] == 0 and any("no float linear" in w for w in ctx.warnings)
    assert source.history == history and count(source, LINEAR_Q) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "phi3", "bert"])
def test_calibrated_methods_beat_rtn_on_every_architecture(arch: str) -> None:
    # group=32: the tiny models are 64 wide, so the default 64 would leave one block per row
    rtn = quantized(arch, "quantize(weights=int4, head=same, group=32)").reports[-1]
    gptq_r = quantized(arch, "quantize(weights=int4, head=same, group=32, method=gptq)").reports[-1]
    awq_r = quantized(arch, "quantize(weights=int4, head=same, group=32, method=awq)").reports[-1]
    key = "hidden_cosine" if arch == "bert" else "kl"
    better = (lambda a, b: a >= b) if key == "hidden_cosine" else (lambda a, b: a <= b)
    assert better(gptq_r[key], rtn[key])
    # random weights have no outlier channels for AWQ to protect: it must not lose much (real weights: docs)
    assert better(awq_r[key], rtn[key] * (1.1 if key == "kl" else 0.99))
    assert awq_r["awq"]["groups"] >= 1


def test_gptq_minimises_the_output_error_not_the_weight_error() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    x[:, :4] *= 8
    w = torch.randn(64, 128, generator=g) * 0.05
    xtx = x.double().T @ x.double()
    for bits, sym in ((4, True), (8, False)):
        r, q = quantize_rtn(w, bits, 32, sym).dequantize(), gptq(w, xtx, bits, 32, sym).dequantize()
        out_err = [float((x @ (w - v).T).pow(2).mean()) for v in (r, q)]
        assert out_err[1] < 0.5 * out_err[0]


def test_awq_search_protects_channels_with_large_activations() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, :6] *= 30
    w = torch.randn(64, 128, generator=g) * 0.05
    alpha, s = _search([w], [(4, 32)], True, x.abs().mean(0), x)
    assert alpha > 0 and float(s[:6].min()) > float(s[6:].max())
    err = [float((x @ (w - v).T).pow(2).sum()) for v in (
        quantize_rtn(w, 4, 32, True).dequantize(), quantize_rtn(w * s, 4, 32, True).dequantize() / s)]
    assert err[1] < err[0]


def test_awq_rescaling_is_exact_before_rounding() -> None:
    """AWQ's scaling and its fold (norm weight, up-projection rows, or a mul) leave the float function unchanged:
    with 8-bit blocks the whole pass stays as close to the source as plain RTN."""
    for arch in ("llama", "gpt2"):
        rtn = quantized(arch, "quantize(weights=int8, head=same)").reports[-1]["kl"]
        awq = quantized(arch, "quantize(weights=int8, head=same, method=awq)").reports[-1]["kl"]
        assert awq <= rtn * 1.5 + 1e-4


# ---- bad input and ordering ---------------------------------------------------------------------------
def test_bad_options_are_clear_errors() -> None:
    source = tiny_program("llama")
    with pytest.raises(PassSpecError, match="'weights' of pass 'quantize' must be one of int4, int8, bf16, fp16"):
        source.apply("quantize(weights=int3)")
    with pytest.raises(PassSpecError, match="power of two"):
        source.apply("quantize(group=48)")
    with pytest.raises(PassSpecError, match="plain cast"):
        source.apply("quantize(weights=bf16, method=gptq)")


def test_quantize_comes_after_structural_passes() -> None:
    source = tiny_program("llama")
    with pytest.raises(PassError, match=r"already quantised.*\n.*put quantize\(\.\.\.\) last"):
        source.apply("quantize(weights=int8), prune-mlp(ratio=0.25)")
    with pytest.raises(PassError, match="already quantised"):
        source.apply("quantize(weights=int8), heal(steps=1)")


def test_hf_export_and_tensorrt_of_int_blocks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot write quantised weights"):
        headsmith.convert(quantized("llama", "quantize(weights=int4)"), tmp_path / "o", options={"export": "hf"})
    with pytest.raises(BackendError, match="TensorRT backend cannot build engines from int4/int8 blocks"):
        headsmith.convert(quantized("llama", "quantize(weights=int4)"), tmp_path / "o", backend="tensorrt")
    assert not (tmp_path / "o").exists()


# ---- engines ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "spec", "backends"), [
    ("llama", "quantize(weights=int4)", ("onnx", "torch", "tvm")),
    ("gpt2", "quantize(weights=int8, sym=false, group=32)", ("onnx", "torch", "tvm")),  # biases, zero points, Conv1D
    ("gemma3", "quantize(weights=int4, method=gptq, sym=false, group=16)", ("onnx", "torch", "tvm")),
    ("llama", "gqa(kv_heads=1), prune-mlp(ratio=0.25), quantize(weights=int4, method=awq)", ("onnx", "torch")),
    ("llama", "mla(kv_fraction=0.5), quantize(weights=int8)", ("onnx", "torch", "tvm")),  # padded blocks
    ("llama", "quantize(weights=bf16)", ("onnx", "torch", "tvm")),
    ("qwen2", "quantize(weights=fp16, head=float)", ("onnx", "tvm")),
])
def test_quantised_engines_equal_the_program(arch: str, spec: str, backends: tuple[str, ...]) -> None:
    """At accuracy level 0 (fp32 compute of the dequantised blocks) onnxruntime's MatMulNBits and
    GatherBlockQuantized give the program's logits and its greedy tokens; so do TVM's dequantising kernels
    (tvm_kernels.matmul_q, 16-bit tiles of matmul_packed) and the torch engine, which runs the same ops."""
    program = quantized(arch, spec)
    reference = generate(TorchEngine.from_program(program), PROMPTS,
                         GenerationConfig(max_new_tokens=24, stop_tokens=())).tokens
    for backend in backends:
        art = read_artifact(quantized_artifact(arch, spec, backend))
        engine = engine_for(art)
        ids, pos, mask = program.example_inputs(2, 12, pad=2)
        logits, _ = engine.prefill(ids, mask, pos)
        assert float((logits[:, -1] - program(ids, mask, pos)[:, -1]).abs().max()) < 1e-4
        assert generate(engine, PROMPTS, GenerationConfig(max_new_tokens=24, stop_tokens=())).tokens == reference


def test_onnx_graph_uses_the_contrib_kernels_and_shrinks() -> None:
    import onnx
    spec = "quantize(weights=int4, high=[])"
    art = quantized_artifact("llama", spec, "onnx", 4)
    model = onnx.load(str(art / "decode.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and ops.count("GatherBlockQuantized") == 1
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # per layer q/k/v fused, o, gate/up fused, down; plus the head
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    data = (art / "prefill.onnx.data").stat().st_size
    assert data < 0.3 * tiny_program("llama").n_params() * 4 + 20_000
    engine = engine_for(read_artifact(art))  # int8 activations: close, not exact
    program = quantized("llama", spec)
    ids, pos, mask = program.example_inputs(2, 12, pad=2)
    logits, _ = engine.prefill(ids, mask, pos)
    ref = program(ids, mask, pos)[:, -1]
    assert float((logits[:, -1] - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_tvm_cuda_graph_of_a_quantised_program_matches_on_the_cpu() -> None:
    """The CUDA lowering dequantises the blocks with Relax ops in front of the matmul (for dlight to fuse and
    schedule); compiled for the CPU instead, its prefill computes the program's logits."""
    from .conftest import cuda_prefill_on_cpu

    program = quantized("llama", "quantize(weights=int4, sym=false)")
    ids, pos, mask = program.example_inputs(1, 12, seed=3)
    ref = program(ids, mask, pos)[:, -1:]
    assert float((cuda_prefill_on_cpu(program, ids, pos, mask).reshape(ref.shape) - ref).abs().max()) <= 1e-4


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_cli_converts_a_quantised_artifact_and_runs_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from headsmith.cli import main

    from .conftest import tiny_dir
    out = tmp_path / "q"
    assert main(["convert", str(tiny_dir("llama")), "--passes", "quantize(weights=int4, method=awq)", "--backend",
                 "onnx", "--onnx-accuracy-level", "0", "-o", str(out)]) == 0
    manifest = read_artifact(out).manifest
    assert manifest["backend"]["accuracy_level"] == 0 and manifest["passes"][-1].startswith("quantize")
    assert main(["run", str(out), "--prompt", "In the beginning", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    for args, message in ((["--backend", "torch", "--onnx-accuracy-level", "4"], "applies to --backend onnx only"),
                          (["--backend", "onnx", "--onnx-accuracy-level", "7"], "unknown --onnx-accuracy-level 7")):
        code = main(["convert", str(tiny_dir("llama")), "-o", str(tmp_path / "bad"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "bad").exists()
