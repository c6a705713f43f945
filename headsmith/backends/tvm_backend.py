"""TVM backend: lower the prefill / decode graphs (or an encoder's forward) to Relax and compile them.

Letters: B batch, T new tokens, P cached tokens, C cache capacity, H KV heads, D head dim, V vocab.

Each FX graph is exported with ``torch.export`` (weights lifted to trailing inputs, the dynamic dims of
the ONNX backend) and imported with ``from_exported_program`` and converters for ``headsmith.attention``,
``headsmith.attention_kv`` (the decode graph's ``attention(q, cat([past, k]), ...)``, fused as for ONNX)
and, on CPU targets, ``aten.linear``. One IRModule holds ``prefill`` / ``decode`` (or ``forward``) and
``transform_params`` (``LiftTransformParams``: weight packing runs once, when the engine loads).
The module is compiled with ``tvm.compile`` and written with ``export_library`` as ``model.so``.

Functions in the library (inputs are int64 / float32 tensors):

- ``transform_params(*weights) -> params``: ``weights`` in the manifest's ``params`` order;
- ``prefill(ids[B,T], pos[B,T], mask[B,T], *params) -> (logits[B,1,V], *cache[B,H,T,D])``;
- ``decode(ids[B,T], pos[B,T], mask[B,P+T], *cache[B,H,C,D], *params) -> (logits[B,T,V], *cache)``:
  the caches are buffers of capacity ``C >= P+T`` whose first P rows hold the past; the new keys and
  values are written **in place** at rows ``P..P+T`` (no concatenation copy), so the engine keeps the
  buffers between steps and only grows them;
- ``forward(ids, pos, mask, *params) -> hidden`` for encoders.

Targets (``--tvm-target``): ``llvm`` (this machine's CPU, found by LLVM), ``llvm:<cpu>`` (an LLVM CPU
name, e.g. ``x86-64-v3``), ``cuda:<sm_XY>`` (cross-compiled; ``cuda`` alone means ``sm_80``). On
``llvm`` the matmuls and attention run hand-scheduled kernels (``tvm_kernels``): TVM's default CPU
lowering leaves loops unscheduled and MetaSchedule needs static shapes, which prefill/decode lack. On
``cuda`` the graph keeps Relax's matmul and the attention is composed of Relax ops, scheduled by dlight.
The manifest records the target (kind, CPU and its ISA features, or the CUDA arch), which the engine
checks against the machine before loading the library.
"""

from __future__ import annotations

import os
import platform
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import BackendError
from ..program import Program

LIBRARY = "model.so"
DEFAULT_TARGET = "llvm"
DEFAULT_CUDA_ARCH = "sm_80"
# ISA extensions that change the generated code; the engine refuses a library needing one the host lacks
ISA_FEATURES = ("sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                "avx512cd", "avx512vnni", "avx512bf16", "avx512fp16", "avxvnni", "amx-tile", "amx-bf16",
                "amx-int8")
_CPUINFO_NAMES = {"sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx512vnni": "avx512_vnni",
                  "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
                  "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8"}


# ---- targets --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TvmTarget:
    """A compilation target: ``llvm`` with an LLVM CPU name, or ``cuda`` with an ``sm_XY`` arch."""

    kind: str
    mcpu: str = ""
    arch: str = ""

    @staticmethod
    def parse(text: str) -> TvmTarget:
        """``llvm`` | ``llvm:<cpu>`` | ``cuda`` | ``cuda:<sm_XY>`` (see the module docstring)."""
        kind, _, detail = text.strip().partition(":")
        if kind == "llvm":
            from tvm.target import codegen
            if detail and not codegen.llvm_is_valid_cpu(detail, codegen.llvm_get_system_triple()):
                raise BackendError(f"LLVM does not know the CPU {detail!r}",
                                   "give an LLVM CPU name such as x86-64-v3, skylake-avx512 or znver3")
            return TvmTarget("llvm", mcpu=detail or host_cpu())
        if kind == "cuda":
            arch = detail or DEFAULT_CUDA_ARCH
            if re.fullmatch(r"sm_\d{2,3}a?", arch) is None:
                raise BackendError(f"unknown CUDA arch {arch!r} in --tvm-target {text!r}",
                                   "give it as cuda:sm_80 or cuda:sm_90")
            return TvmTarget("cuda", arch=arch)
        raise BackendError(f"unknown TVM target {text!r}", "use llvm, llvm:<cpu>, cuda:sm_80 or cuda:sm_90")

    def tvm(self) -> Any:
        from tvm.target import Target
        if self.kind == "cuda":
            return Target({"kind": "cuda", "arch": self.arch}, host=Target({"kind": "llvm"}))
        return Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": os.cpu_count() or 1})

    def record(self) -> dict[str, Any]:
        """What the manifest stores (and the engine checks)."""
        if self.kind == "cuda":
            return {"kind": "cuda", "arch": self.arch, "spec": f"cuda:{self.arch}"}
        from tvm.target import codegen
        return {"kind": "llvm", "mcpu": self.mcpu, "mtriple": codegen.llvm_get_system_triple(),
                "features": cpu_features(self.mcpu), "num_cores": os.cpu_count() or 1,
                "spec": f"llvm:{self.mcpu}"}


def host_cpu() -> str:
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


def cpu_features(mcpu: str) -> list[str]:
    """The ISA extensions (of :data:`ISA_FEATURES`) that LLVM enables for ``mcpu``."""
    from tvm.target import Target, codegen
    enabled = codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mcpu": mcpu}))
    return [f for f in ISA_FEATURES if f in enabled]


def host_features() -> set[str]:
    """ISA extensions this machine has (``/proc/cpuinfo`` flags; LLVM's view of the host CPU elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(cpu_features(host_cpu()))
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f for f in ISA_FEATURES if _CPUINFO_NAMES.get(f, f) in flags}


# ---- weights and export --------------------------------------------------------------------------
def weight_names(graphs: list[fx.GraphModule]) -> tuple[list[str], dict[str, str]]:
    """``(names, alias -> name)``: every weight the graphs read, each storage once, in first-use order."""
    from ..fxutil import get_tensor

    names: list[str] = []
    alias: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "get_attr" or str(node.target) in alias:
                continue
            t = get_tensor(gm, str(node.target))
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in by_storage or t.numel() == 0:
                by_storage[key] = str(node.target)
                names.append(str(node.target))
            alias[str(node.target)] = by_storage[key]
    return names, alias


def lift(gm: fx.GraphModule, names: list[str], alias: dict[str, str]) -> fx.GraphModule:
    """A copy of ``gm`` taking ``(*inputs, *weights)``: every weight of ``names`` becomes a trailing input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    weights = {name: graph.placeholder(f"w{i}") for i, name in enumerate(names)}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            env[node] = weights[alias[str(node.target)]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(torch.nn.Module(), graph)


def _decompositions() -> Any:
    """The default core-ATen decompositions, keeping ``aten.linear`` (a converter packs its weight)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default)
    return table


def export(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...], n_weights: int,
           known: set[str]) -> Any:
    """``torch.export`` a lifted graph (weights static). The graph is decomposed to core ATen only when it
    has an op outside ``known`` (the importer's converters): decomposition takes as long as the export."""
    try:
        ep = torch.export.export(gm, example, dynamic_shapes=tuple(dynamic) + (None,) * n_weights, strict=False)
        unknown = {_op_name(n) for n in ep.graph.nodes if n.op == "call_function"} - known
        return ep.run_decompositions(_decompositions()) if unknown else ep
    except Exception as e:  # report torch.export's first line; the cause stays chained
        raise BackendError(f"torch.export before TVM failed: {str(e).strip().splitlines()[0][:300]}") from e


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


# ---- module assembly ----------------------------------------------------------------------------------
def import_graph(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...], names: list[str],
                 alias: dict[str, str], weights: dict[str, Tensor], target: TvmTarget, prefix: str) -> Any:
    """The Relax function of one graph (its kernels in the returned IRModule, named ``prefix_*``)."""
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from .tvm_convert import Converters

    lifted = lift(gm, names, alias)
    converters = Converters(target, prefix)
    known = set(ExportedProgramImporter().convert_map) | set(converters.table())
    ep = export(lifted, (*example, *(weights[n] for n in names)), dynamic, len(names), known)
    converters.mask_node = next((n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "attention_mask"),
                                None)
    try:
        mod = from_exported_program(ep, run_ep_decomposition=False, custom_convert_map=converters.table())
    except BackendError:
        raise
    except Exception as e:  # TVM's importer raises assertion/value errors for unsupported ops
        raise BackendError(f"TVM could not import the {prefix} graph: {str(e).strip().splitlines()[0][:300]}",
                           "convert with --backend onnx, or report the op named above") from e
    func = mod["main"].with_attr("num_input", len(example))
    attrs = dict(func.attrs) if func.attrs is not None else {}
    for key in ("tir_var_upper_bound", "tir_var_lower_bound"):  # bounds of 1M tokens would size static buffers
        if key in attrs:
            func = func.without_attr(key)
    return mod, func


def cache_expanded_kv(program: Program) -> Program:
    """``program`` without the cache points ``prune-heads`` puts in front of ``index_select(k, 1, kv_index)``.

    The TVM decode kernels write the attention's own keys and values into the cache in place, so layers whose
    unequal GQA groups are expanded in the graph cache the expanded K/V here (more bytes per token than the
    ONNX and torch backends, which cache the surviving KV heads only; the manifest's cache layout says which).
    """
    from ..fxutil import erase_dead, is_call
    from ..passes.kv_cache import CACHE_POINT

    marks = [n for n in program.gm.graph.nodes if is_call(n, CACHE_POINT) and n.users
             and all(is_call(u, torch.ops.aten.index_select.default) for u in n.users)]
    if not marks:
        return program
    out = program.clone()
    for node in [n for n in out.gm.graph.nodes if n.name in {m.name for m in marks}]:
        node.replace_all_uses_with(node.args[0])
    erase_dead(out.gm.graph)
    out.gm.recompile()
    out._shapes = None
    return out


def build_module(program: Program, target: TvmTarget, progress: Any = None) -> tuple[Any, dict[str, Any]]:
    """The IRModule (``transform_params`` + the graph functions) and the manifest fields it implies."""
    import tvm
    from tvm import relax

    from ..passes.kv_cache import decode_example, decode_graph, layout_dict, prefill_graph
    from .artifact import graph_weights
    from .lowering import draft_lowerings, fuse_kv_attention

    ids, pos, mask = program.example_inputs(batch=2, seq=8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=65536)
    graphs: dict[str, tuple[fx.GraphModule, tuple[Tensor, ...], tuple[Any, ...]]] = {}
    fields: dict[str, Any] = {}
    if program.info.task == "encoder":
        graphs["forward"] = (program.gm, (ids, pos, mask), ({0: batch, 1: seq},) * 3)
        fields["cache"] = []
    else:
        program = cache_expanded_kv(program)
        ring = target.kind == "llvm"  # ring caches on CPU (the engine moves slots with torch); full caches on GPUs
        pre, entries = prefill_graph(program, ring=ring)
        dec, _ = decode_graph(program, ring=ring)
        if any(e.slot not in ("key", "value") for e in entries):
            raise BackendError("the TVM backend caches attention keys and values only; this program caches "
                               f"{sorted({e.slot for e in entries})}", "use --backend onnx or --backend torch")
        fuse_kv_attention(dec)
        with torch.no_grad():
            cache = [c.contiguous() for c in pre(ids, pos, mask)[1:]]
        graphs["prefill"] = (pre, (ids, pos, mask), ({0: batch, 1: seq},) * 3)
        example, dynamic, _ = decode_example(cache, entries, ids.shape[0], program.info.vocab_size)
        graphs["decode"] = (dec, example, dynamic)
        fields["cache"] = layout_dict(entries)
        drafts: dict[str, Any] = {}
        for d in draft_lowerings(program):  # a function per draft; its weights are the target's where shared
            graph, mine = decode_graph(cache_expanded_kv(d.program), ring=ring)
            fuse_kv_attention(graph)
            d_example, d_dynamic, _ = decode_example([cache[i] for i in d.cache], mine, ids.shape[0],
                                                     program.info.vocab_size)
            graphs[d.file("")] = (graph, d_example, d_dynamic)
            drafts[d.name] = {**d.record, "decode": d.file("")}
        if drafts:
            fields["drafts"] = drafts
    names, alias = weight_names([g for g, _, _ in graphs.values()])
    weights = graph_weights(program.gm)
    for gm, _, _ in graphs.values():
        weights.update(graph_weights(gm))
    merged = tvm.IRModule()
    for name, (gm, example, dynamic) in graphs.items():
        _say(progress, f"importing the {name} graph into TVM Relax")
        mod, func = import_graph(gm, example, dynamic, names, alias, weights, target, name)
        for gv, f in mod.functions.items():
            if gv.name_hint != "main":
                merged[gv] = f
        merged[name] = func.with_attr("global_symbol", name)
    merged = relax.transform.LiftTransformParams(shared_transform=True)(merged)
    fields["params"] = names
    fields["functions"] = list(graphs)
    return merged, fields


def compile_module(mod: Any, target: TvmTarget) -> Any:
    import tvm

    tvm_target = target.tvm()
    try:
        with tvm_target, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tvm.compile(mod, target=tvm_target)
    except BackendError:
        raise
    except Exception as e:  # TVM raises TVMError subclasses for every lowering failure
        raise BackendError(f"TVM compilation for {target.kind} failed: {str(e).strip().splitlines()[0][:300]}") from e


def lower_tvm(program: Program, directory: Path, progress: Any = None, target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """Write ``model.so`` into ``directory``; returns the manifest's backend record."""
    import tvm

    spec = TvmTarget.parse(target)
    start = time.perf_counter()
    mod, fields = build_module(program, spec, progress)
    _say(progress, f"compiling for {spec.record()['spec']}")
    executable = compile_module(mod, spec)
    try:
        executable.export_library(str(directory / LIBRARY))
    except Exception as e:  # export_library shells out to a C compiler
        raise BackendError(f"writing {LIBRARY} failed: {str(e).strip().splitlines()[0][:300]}",
                           "export_library needs a C compiler (gcc or clang) on PATH") from e
    return {"name": "tvm", "library": LIBRARY, "target": spec.record(), "tvm_version": tvm.__version__,
            "cache_mode": "inplace", "compile_seconds": round(time.perf_counter() - start, 1),
            "host": platform.machine(), **fields}


def _say(progress: Any, text: str) -> None:
    if progress is not None:
        progress(text)


__all__ = ["DEFAULT_TARGET", "LIBRARY", "TvmTarget", "lower_tvm"]
