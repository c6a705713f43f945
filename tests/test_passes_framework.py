"""The pass framework: spec grammar, registry, manager, instruments, canonicalize/dce, a custom pass."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch

import headsmith
from headsmith.errors import PassError, PassSpecError, VerificationError
from headsmith.fxutil import get_tensor, set_tensor
from headsmith.passes import REGISTRY, Pass, PassContext, PassResult, parse_passes, register_pass
from headsmith.passes.canonicalize import LINEAR
from headsmith.passes.spec import parse_spec

from .conftest import tiny_dir, tiny_program

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Toy(Pass):
    """A pass with every option type, for the parser tests."""

    name: ClassVar[str] = "toy-options"
    exact: ClassVar[bool] = True
    needs_raised: ClassVar[bool] = False
    n: int = 1
    """an int"""
    ratio: float = 0.5
    flag: bool = False
    method: Literal["mean", "fit"] = "fit"
    layers: tuple[int, ...] = ()
    limit: int | None = None

    def run(self, program, ctx):  # noqa: ANN001, ANN201
        return PassResult(program, modified=False, count=0)


register_pass(Toy)


# ---- spec grammar ---------------------------------------------------------------------------------
def test_spec_parses_all_value_kinds_and_round_trips() -> None:
    spec = "toy-options(n=3, ratio=0.25, flag=true, method=mean, layers=[0,2,4], limit=none), dce"
    passes = parse_passes(spec)
    toy = passes[0]
    assert isinstance(toy, Toy)
    assert (toy.n, toy.ratio, toy.flag, toy.method, toy.layers, toy.limit) == (3, 0.25, True, "mean", (0, 2, 4), None)
    assert str(toy) == "toy-options(n=3, ratio=0.25, flag=true, method=mean, layers=[0,2,4])"
    assert parse_passes(str(toy)) == [toy]
    assert str(passes[1]) == "dce"
    assert parse_passes("") == []
    assert parse_passes("  toy-options( n = 2 ) ") == [Toy(n=2)]
    assert parse_passes("toy-options(layers=3)") == [Toy(layers=(3,))]


@pytest.mark.parametrize(("spec", "column", "words"), [
    ("dce,", 4, "expected a pass name after ','"),
    ("dce(", 4, "expected an option name"),
    ("toy-options(n=)", 14, "expected a value"),
    ("toy-options(n=1", 15, "expected ')'"),
    ("toy-options(n 1)", 14, "expected '='"),
    ("toy-options(n=1) dce", 17, "expected ','"),
    ("Toy", 0, "invalid pass name"),
    ("toy-options(method='x)", 19, "unterminated string"),
    ("toy-options(n=1, n=2)", 17, "given twice"),
])
def test_malformed_spec_points_at_the_column(spec: str, column: int, words: str) -> None:
    with pytest.raises(PassSpecError) as info:
        parse_passes(spec)
    assert info.value.column == column
    assert words in str(info.value)
    caret_line = str(info.value).splitlines()[2]
    assert caret_line.index("^") - 4 == column


def test_unknown_pass_and_option_and_wrong_type() -> None:
    with pytest.raises(PassSpecError, match="unknown pass 'nope'") as info:
        parse_passes("dce, nope(x=1)")
    assert info.value.column == 5
    with pytest.raises(PassSpecError, match="has no option 'm'.*options: n, ratio") as info:
        parse_passes("toy-options(m=1)")
    assert info.value.column == 12
    with pytest.raises(PassSpecError, match="expects an integer, got 'abc'") as info:
        parse_passes("toy-options(n=abc)")
    assert info.value.column == 14
    with pytest.raises(PassSpecError, match="must be one of mean, fit"):
        parse_passes("toy-options(method=median)")
    with pytest.raises(PassSpecError, match="expects true or false"):
        parse_passes("toy-options(flag=1)")


def test_parse_spec_keeps_columns() -> None:
    items = parse_spec("a(x=1), bb(y=[1, 2])")
    assert [(i.name, i.column) for i in items] == [("a", 0), ("bb", 8)]
    assert items[1].options["y"].value == [1, 2]


def test_registry_lists_builtin_passes_with_docs() -> None:
    for name in ("canonicalize", "dce", "raise-attention"):
        cls = REGISTRY[name]
        assert cls.doc()
    opts = {o.name: o for o in Toy.options()}
    assert opts["n"].doc == "an int"
    assert opts["method"].type_name() == "mean|fit"
    with pytest.raises(ValueError, match="already registered"):
        register_pass(dataclasses.make_dataclass("Other", [], bases=(Pass,), namespace={"name": "dce"}, frozen=True))


# ---- manager and instruments -----------------------------------------------------------------------
@dataclass(frozen=True)
class Breaks(Pass):
    """Claims to be exact but perturbs a weight (the verify instrument must catch it)."""

    name: ClassVar[str] = "test-breaks"
    exact: ClassVar[bool] = True

    def run(self, program, ctx):  # noqa: ANN001, ANN201
        new = program.clone()
        site = new.sites()[0]
        set_tensor(new.gm, site.v.weight, get_tensor(new.gm, site.v.weight) * 2)
        return PassResult(new, modified=True, count=1)


@dataclass(frozen=True)
class Crashes(Pass):
    """Fails with a bug at a node."""

    name: ClassVar[str] = "test-crashes"
    exact: ClassVar[bool] = True

    def run(self, program, ctx):  # noqa: ANN001, ANN201
        site = program.sites()[1]
        with ctx.at(site.node):
            raise IndexError("boom")


def test_verify_catches_a_wrong_exact_pass() -> None:
    with pytest.raises(PassError, match="exact pass test-breaks changed the outputs") as info:
        tiny_program("llama").apply([Breaks()])
    assert isinstance(info.value, VerificationError)


def test_failures_name_the_pass_the_passes_before_and_the_node() -> None:
    with pytest.raises(PassError) as info:
        tiny_program("llama").apply([parse_passes("dce")[0], Crashes()])
    text = str(info.value)
    assert "pass test-crashes failed (after dce) at node attention_default_1" in text
    assert "IndexError: boom" in text
    assert ">>" in text  # the nearby graph is shown
    assert isinstance(info.value.__cause__, IndexError)


def test_manager_records_history_timing_and_dumps(tmp_path: Path) -> None:
    program = tiny_program("gpt2")
    ctx = PassContext(dump_dir=tmp_path)
    out = program.apply("canonicalize, dce", ctx)
    assert out.history[-2:] == ("canonicalize", "dce")
    assert all("seconds" in r for r in out.reports[-2:])
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["01-canonicalize-after.txt", "01-canonicalize-before.txt", "02-dce-after.txt",
                     "02-dce-before.txt"]
    assert "headsmith.attention" in (tmp_path / "02-dce-after.txt").read_text()
    assert program.history == tiny_program("gpt2").history  # the input program is untouched


def test_zero_match_warns() -> None:
    _load_example()
    ctx = PassContext()
    tiny_program("gemma3").apply("fold-attention-scale", ctx)  # gemma3 has q norms in every layer
    assert any("fold-attention-scale matched 0 sites" in w for w in ctx.warnings)


# ---- canonicalize / dce: golden, must-not-fire, numeric -------------------------------------------------
def test_canonicalize_golden_fused_qkv() -> None:
    """Before: one qkv linear and three slices. After: three linears over row slices of the weight."""
    from headsmith.frontend.capture import capture
    from headsmith.frontend.load import load_hf

    before, _ = capture(load_hf(tiny_dir("phi3")))
    fused = [n for n in before.gm.graph.nodes if n.target is LINEAR and "qkv_proj" in str(n.args[1].target)]
    assert len(fused) == 2
    slices = [u.target for u in fused[0].users]
    assert slices == [torch.ops.aten.slice.Tensor] * 3
    after = before.apply("canonicalize")
    linears = [str(n.args[1].target).rsplit(".", 1)[-1] for n in after.gm.graph.nodes
               if n.target is LINEAR and "layers.0.self_attn" in str(n.args[1].target)]
    assert linears == ["weight_s0_64", "weight_s64_96", "weight_s96_128", "weight"]  # q, k, v, o_proj
    assert "qkv_proj.weight" not in dict(after.gm.named_parameters())
    ids, pos, mask = before.example_inputs(2, 9, pad=2)
    assert torch.allclose(after(ids, mask, pos), before(ids, mask, pos), atol=1e-5)


def test_canonicalize_does_not_fire_on_canonical_graph() -> None:
    program = tiny_program("llama")
    out = program.apply("canonicalize")
    assert out.reports[-1]["count"] == 0
    assert out.gm.code == program.gm.code


def test_dce_removes_dead_nodes_and_weights() -> None:
    program = tiny_program("llama").clone()
    graph = program.gm.graph
    anchor = next(n for n in graph.nodes if n.op == "get_attr")
    with graph.inserting_after(anchor):
        graph.call_function(torch.ops.aten.mul.Tensor, (anchor, 2.0))
    set_tensor(program.gm, "unused.weight", torch.ones(3))
    with graph.inserting_after(anchor):
        graph.get_attr("unused.weight")
    program.gm.recompile()
    out = program.apply("dce")
    assert out.reports[-1]["count"] == 2
    assert "unused.weight" not in dict(out.gm.named_parameters())
    ids, pos, mask = program.example_inputs(1, 6)
    assert torch.equal(out(ids, mask, pos), tiny_program("llama")(ids, mask, pos))


# ---- a third-party pass --------------------------------------------------------------------------------
def _load_example() -> object:
    if "fold-attention-scale" in REGISTRY:
        return sys.modules["custom_pass_example"]
    spec = importlib.util.spec_from_file_location("custom_pass_example", ROOT / "examples" / "custom_pass.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_pass_example"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_example_custom_pass_registers_and_is_exact(arch: str) -> None:
    _load_example()
    program = tiny_program(arch)
    out = program.apply("fold-attention-scale, dce")
    assert out.reports[-2]["count"] == 2
    assert all(s.scale == 1.0 for s in out.sites())
    assert out.reports[-2]["max_abs_diff"] <= 1e-4
    assert [s.scale for s in program.sites()] == [0.25, 0.25]  # input untouched
