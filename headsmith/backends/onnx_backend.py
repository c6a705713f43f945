"""ONNX backend: export the prefill / decode graphs (or an encoder's forward) to ONNX for onnxruntime.

``torch.onnx.export(..., dynamo=True)`` with translations for headsmith's ops. Three lowerings (``VARIANTS``):

- ``fused`` (default, for onnxruntime): onnx_fusions.py rewrites the graph first, so a decode step is a few
  large nodes: ``RMSNormalization`` and ``RotaryEmbedding`` (ONNX opset 23), one additive mask built once per
  graph, and every causal attention as onnxruntime's ``com.microsoft.GroupQueryAttention`` on the 3-D
  projections. When every cache entry is appended by a GQA node the manifest says ``kv_in_place`` and the
  runtime binds one buffer per entry as both past and present: a step writes its new K/V in place instead of
  copying the cache (see runtime/kv_cache.py). Other attention (bidirectional, softcap, a cache gathered
  outside the op) keeps the plain translation below.
- ``plain``: standard opset-20 ops only (what the TensorRT backend parses). GQA without copying K/V:
  ``q[B,Hq,T,D]`` is reshaped to ``[B,Hkv,n*T,D]`` so each KV head is read once; scores get the mask as an
  additive bias built from ``Range``/``Less``/``Where`` (causal, window, sinks, key padding), then
  ``Softmax`` and ``MatMul``. (The standard ``Attention`` op of opset 23 was tried: onnxruntime 1.32's CPU
  kernel was slower than both, see docs/backends.md.)
- ``gqa``: ``plain`` with ``GroupQueryAttention`` for the attention.

Dynamic dims: ``batch``, ``new`` (tokens this step), ``past`` (cached tokens), ``total``. The decode model's
weights point into the prefill model's external data file, so they are stored once; so do a speculative
draft's (``draft_<name>.onnx``, and ``draft_<name>_dense.onnx`` beside ``decode_dense.onnx``), whose inputs and
outputs are the target's cache entries of the layers it runs (see ``passes/draft.py``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import BackendError
from ..program import Program
from .lowering import draft_lowerings, fuse_kv_attention, fuse_parallel_linears
from .onnx_ops import DEFAULT_VARIANT, VARIANTS, translations
from .onnx_quant import DEFAULT_ACCURACY_LEVEL
from .onnx_quant import translations as quant_translations

OPSET = 20
FUSED_OPSET = 23  # RMSNormalization and RotaryEmbedding (see onnx_fusions.py)


def export_graph(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...], path: Path,
                 input_names: list[str], output_names: list[str], variant: str = DEFAULT_VARIANT,
                 optimize: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, dense: bool = False) -> None:
    """Export one graph to ``path`` (with its weights in ``path.name + '.data'``); ``dense``: the fused
    lowering's form for inputs without padding (``GroupQueryAttention`` without a mask input)."""
    from ..fxutil import clone_module

    gm = clone_module(gm)
    fuse_kv_attention(gm)
    fuse_parallel_linears(gm)
    opset = OPSET
    if variant == "fused":
        from .onnx_fusions import fuse_for_ort
        fuse_for_ort(gm, dense)
        opset = FUSED_OPSET
    ep = _export(gm, example, dynamic)
    table = {**translations(variant), **quant_translations(accuracy_level)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=input_names,
                                             output_names=output_names, optimize=optimize, verbose=False,
                                             custom_translation_table=table)
        except Exception as e:  # torch.onnx raises many error types; report the first line, keep the cause
            raise BackendError(f"ONNX export failed: {str(e).strip().splitlines()[0][:300]}") from e
    assert onnx_program is not None
    onnx_program.save(str(path), external_data=True)
    name_dims(path, dynamic, input_names)


def name_dims(path: Path, dynamic: tuple[Any, ...], input_names: list[str]) -> None:
    """Give the dynamic dims of the saved model the names of their ``Dim`` (``batch``, ``past``, ...)."""
    import re

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    rename: dict[str, str] = {}
    inputs = {i.name: i for i in model.graph.input}
    for name, spec in zip(input_names, dynamic):
        value = inputs.get(name)
        if value is None or not spec:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, dim in spec.items():
            if axis < len(dims) and dims[axis].dim_param:
                rename[dims[axis].dim_param] = getattr(dim, "__name__", str(dim))
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(rename, key=len, reverse=True)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))


def _export(gm: fx.GraphModule, example: tuple[Tensor, ...], dynamic: tuple[Any, ...]) -> Any:
    try:
        return torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # report torch.export's first line, keep the cause
        raise BackendError(f"torch.export before ONNX failed: {str(e).strip().splitlines()[0][:300]}") from e


def share_weights(primary: Path, secondary: Path) -> None:
    """Point ``secondary``'s initializers at ``primary``'s external data where they are identical."""
    import onnx
    from onnx import external_data_helper as edh

    a = onnx.load(str(primary), load_external_data=False)
    a_info: dict[str, tuple[dict[str, str], int]] = {}
    for init in a.graph.initializer:
        if edh.uses_external_data(init):
            a_info[init.name] = ({e.key: e.value for e in init.external_data}, init.data_type)
    b = onnx.load(str(secondary), load_external_data=True)
    blobs: dict[str, bytes] = {}  # primary's data files (a draft's graph points into two: the target's and its own)
    moved = 0
    for init in b.graph.initializer:
        info = a_info.get(init.name)
        if info is None or info[1] != init.data_type:
            continue
        ext, _ = info
        if ext["location"] not in blobs:
            blobs[ext["location"]] = (primary.parent / ext["location"]).read_bytes()
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        raw = onnx.numpy_helper.to_array(init).tobytes()
        if raw != blobs[ext["location"]][offset:offset + length]:
            continue
        init.ClearField("raw_data")
        del init.float_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in ext.items():
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        moved += 1
    old_data = secondary.parent / (secondary.name + ".data")
    if old_data.exists():
        old_data.unlink()
    onnx.save_model(b, str(secondary), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=secondary.name + ".data", size_threshold=1024)
    del moved


def lower_onnx(program: Program, directory: Path, progress: Any = None, variant: str = DEFAULT_VARIANT,
               accuracy_level: int = DEFAULT_ACCURACY_LEVEL, ring: bool = True) -> dict[str, Any]:
    """Write ``model.onnx`` (encoders) or ``prefill.onnx`` + ``decode.onnx`` into ``directory`` (``variant``:
    see ``VARIANTS``; ``accuracy_level``: the compute precision of quantised linears, see onnx_quant.py;
    ``ring``: windowed layers get ring caches, see passes/kv_cache.py)."""
    import onnx

    from ..passes.kv_cache import decode_example, decode_graph, layout_dict, prefill_graph
    from ..passes.kv_scores import policy_record

    if variant not in VARIANTS:
        raise BackendError(f"unknown ONNX attention variant {variant!r}", f"choose one of {', '.join(VARIANTS)}")
    ids, pos, mask = program.example_inputs(batch=2, seq=8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=65536)
    inputs = ["input_ids", "position_ids", "attention_mask"]
    quantized = {"accuracy_level": accuracy_level} if program.quantized else {}
    if program.info.task == "encoder":
        dims: dict[int, Any] = {0: batch, 1: seq}
        if program.token_merge is not None:  # a merged graph has one length (static shapes per merge step)
            ids, pos, mask = program.example_inputs(batch=2, seq=program.token_merge.length)
            dims = {0: batch}
        _say(progress, "exporting model.onnx")
        export_graph(program.gm, (ids, pos, mask), (dims,) * 3, directory / "model.onnx", inputs,
                     ["last_hidden_state"], variant, accuracy_level=accuracy_level)
        onnx.checker.check_model(str(directory / "model.onnx"), full_check=False)
        return {"name": "onnx", "attention": variant, "opset": FUSED_OPSET if variant == "fused" else OPSET,
                **quantized, "forward": "model.onnx", "cache": []}
    pre, entries = prefill_graph(program, ring=ring)
    dec, _ = decode_graph(program, ring=ring)
    cache_names = [e.name.replace(".", "_") for e in entries]
    policy = policy_record(program)
    scores = [s["name"] for s in policy["kv_policy"]["scores"]] if policy else []
    step_scores = scores if program.kv_policy is not None and program.kv_policy.decode_scores else []
    _say(progress, "exporting prefill.onnx")
    export_graph(pre, (ids, pos, mask), ({0: batch, 1: seq},) * 3, directory / "prefill.onnx", inputs,
                 ["logits", *[f"present_{n}" for n in cache_names], *scores], variant, accuracy_level=accuracy_level)
    with torch.no_grad():
        cache = [c.contiguous() for c in pre(ids, pos, mask)[1:1 + len(entries)]]
    example, dynamic, decode_inputs = decode_example(cache, entries, ids.shape[0], program.info.vocab_size)
    _say(progress, "exporting decode.onnx")
    export_graph(dec, example, dynamic, directory / "decode.onnx", decode_inputs,
                 ["logits", *[f"present_{n}" for n in cache_names], *step_scores], variant,
                 accuracy_level=accuracy_level)
    share_weights(directory / "prefill.onnx", directory / "decode.onnx")
    names = ["prefill.onnx", "decode.onnx"]
    gqa_layers, in_place = _gqa_presents(directory / "decode.onnx")
    extra: dict[str, Any] = {}
    if variant == "fused" and in_place:  # steps without padding run GQA without its (slow) attention_bias
        _say(progress, "exporting decode_dense.onnx (steps without padding)")
        dense, _ = decode_graph(program, ring=ring, dense=True)
        export_graph(dense, example, dynamic, directory / "decode_dense.onnx", decode_inputs,
                     ["logits", *[f"present_{n}" for n in cache_names], *step_scores], variant,
                     accuracy_level=accuracy_level, dense=True)
        share_weights(directory / "prefill.onnx", directory / "decode_dense.onnx")
        names.append("decode_dense.onnx")
        extra["decode_dense"] = "decode_dense.onnx"
    drafts: dict[str, Any] = {}
    for d in draft_lowerings(program):
        graph, mine = decode_graph(d.program, ring=ring)
        d_example, d_dynamic, d_inputs = decode_example([cache[i] for i in d.cache], mine, ids.shape[0],
                                                        program.info.vocab_size)
        outputs = ["logits", *[f"present_{e.name.replace('.', '_')}" for e in mine]]
        record = {**d.record, "decode": d.file(".onnx"), "entries": [e.name for e in mine]}
        files = [(d.file(".onnx"), graph, False)]
        if "decode_dense" in extra:
            files.append((d.file("_dense.onnx"), decode_graph(d.program, ring=ring, dense=True)[0], True))
            record["decode_dense"] = d.file("_dense.onnx")
        for file, gm, dense_graph in files:
            _say(progress, f"exporting {file} (draft {d.name})")
            export_graph(gm, d_example, d_dynamic, directory / file, d_inputs, outputs, variant,
                         accuracy_level=accuracy_level, dense=dense_graph)
            share_weights(directory / "prefill.onnx", directory / file)
            if dense_graph:  # the draft's own weights (low-bit ones) are stored once, by its masked graph
                share_weights(directory / d.file(".onnx"), directory / file)
            names.append(file)
        if _gqa_presents(directory / d.file(".onnx"))[1] != in_place:
            raise BackendError(f"draft {d.name}'s decode graph does not update the cache the way the target's does "
                               "(in place or not)", "convert with --onnx-attention plain")
        drafts[d.name] = record
    if drafts:
        extra["drafts"] = drafts
    if program.prefill_prune is not None:
        extra["prefill_prune"] = _export_stages(program, directory, (ids, pos, mask), batch, seq, variant,
                                                accuracy_level, progress)
        names += [st["graph"] for st in extra["prefill_prune"]["stages"]]
    for name in names:
        onnx.checker.check_model(str(directory / name), full_check=False)
    opset = FUSED_OPSET if variant == "fused" else OPSET
    return {"name": "onnx", "attention": variant, "opset": opset, "gqa_layers": gqa_layers, "kv_in_place": in_place,
            **quantized, "prefill": "prefill.onnx", "decode": "decode.onnx", **extra, "cache": layout_dict(entries),
            **policy}


def _export_stages(program: Program, directory: Path, example: tuple[Tensor, ...], batch: Any, seq: Any,
                   variant: str, accuracy_level: int, progress: Any) -> dict[str, Any]:
    """``prefill_stage{s}.onnx`` for a ``prefill-prune`` plan (``passes/prefill_stages.py``; weights stored once, in
    ``prefill.onnx``'s data) and the manifest's ``prefill_prune`` record."""
    from ..passes.prefill_stages import prefill_stages

    assert program.prefill_prune is not None
    stages, _ = prefill_stages(program)
    ids, pos, mask = example
    inputs: tuple[Tensor, ...] = (ids, pos, mask)
    records = []
    for s, st in enumerate(stages):
        file = f"prefill_stage{s}.onnx"
        _say(progress, f"exporting {file} (pruned prefill)")
        export_graph(st.gm, inputs, ({0: batch, 1: seq},) * 3, directory / file, st.inputs, st.outputs, variant,
                     accuracy_level=accuracy_level)
        share_weights(directory / "prefill.onnx", directory / file)
        records.append({"graph": file, "entries": st.entries, "inputs": st.inputs, "outputs": st.outputs,
                        "score_layer": st.score_layer})
        if s + 1 < len(stages):
            with torch.no_grad():
                inputs = (st.gm(*inputs)[0].contiguous(), pos, mask)  # the next stage traces on this one's stream
    return {**program.prefill_prune.to_dict(), "stages": records}


def _gqa_presents(path: Path) -> tuple[int, bool]:
    """How many ``GroupQueryAttention`` nodes the decode graph has, and whether every ``present_*`` output
    comes straight from one (then the runtime may bind one buffer as past and present: in-place KV)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    gqa = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    presents = [o.name for o in model.graph.output if o.name.startswith("present_")]
    in_place = bool(presents) and all(
        o in producer and producer[o].op_type == "GroupQueryAttention" for o in presents)
    return gqa, in_place


def _say(progress: Any, text: str) -> None:
    if progress is not None:
        progress(text)


def ort_providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def ort_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or max(1, (os.cpu_count() or 1))
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    # spin inside a run, stop at its end: threads still spinning after one session's run compete with the next
    # session's (a speculative draft's step right after the target's took twice as long on 2 cores)
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers())
