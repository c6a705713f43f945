"""Where an ONNX decode step's time goes, and what the parts could cost at best.

    python benchmarks/onnx_decode_profile.py [--context 512] [--steps 16]

Three measurements on this machine, printed as tables:

1. onnxruntime's profiler on SmolLM2-135M's decode graph (the default ``fused`` lowering, in-place KV cache):
   kernel time per op type per step, and the number of nodes a step runs.
2. The weights' floor: a graph of only the step's MatMuls (SmolLM2's shapes, random weights, 538 MB) with and
   without weight prepacking, next to the ``torch.sum`` read bandwidth measured in the same run.
3. Attention alone: 30 layers (batch 1, one new token, 9 query / 3 KV heads, d 64) as plain ops with
   ``Concat``, ONNX ``Attention`` (opset 23), a two-part in-place plain form, and ``GroupQueryAttention`` on a
   buffer bound as both past and present.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from _common import artifact, machine, table
from onnx import TensorProto, helper, numpy_helper

from headsmith.backends.artifact import read_artifact
from headsmith.runtime.bench import measure_bandwidth, prompt_tokens, time_engine
from headsmith.runtime.engine import engine_for

HIDDEN, QKV, MLP, VOCAB, LAYERS = 576, 960, 1536, 49152, 30
HQ, HKV, D = 9, 3, 64


def _options(**config: str) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return opts


def profile_step(context: int, steps: int, workdir: Path) -> list[dict[str, Any]]:
    art = read_artifact(artifact("smollm2-135m", "onnx"))
    engine = engine_for(art)
    opts = _options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / "ort")
    sess = ort.InferenceSession(str(art.path / "decode.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    engine._sessions["decode"] = sess
    time_engine(engine, prompt_tokens(art.tokenizer, context, art.info.vocab_size), steps)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]][0] += e["dur"] / 1000 / runs
            per_op[e["args"]["op_name"]][1] += 1 / runs
    rows = [{"op": op, "ms": ms, "nodes": n} for op, (ms, n) in sorted(per_op.items(), key=lambda kv: -kv[1][0])]
    rows.append({"op": "(all)", "ms": sum(r["ms"] for r in rows), "nodes": sum(r["nodes"] for r in rows)})
    return rows


def _weights_graph(path: Path) -> int:
    """The step's MatMuls only (q/k/v, o, gate/up, down per layer; the LM head), chained through the residual."""
    rng = np.random.default_rng(0)
    inits, nodes, x, nbytes = [], [], "x", 0
    for name, value in (("s0", [0]), ("s1", [MLP]), ("ax", [-1])):
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    for layer in range(LAYERS):
        for j, (k, n) in enumerate([(HIDDEN, QKV), (HIDDEN, HIDDEN), (HIDDEN, 2 * MLP), (MLP, HIDDEN)]):
            w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
            inits.append(numpy_helper.from_array(w, f"w{layer}_{j}"))
            nbytes += w.nbytes
            src = x if k == HIDDEN else f"h{layer}"
            nodes.append(helper.make_node("MatMul", [src, f"w{layer}_{j}"], [f"y{layer}_{j}"]))
            if j == 2:
                nodes.append(helper.make_node("Slice", [f"y{layer}_2", "s0", "s1", "ax"], [f"h{layer}"]))
        nodes.append(helper.make_node("Add", [x, f"y{layer}_3"], [f"x{layer}"]))
        x = f"x{layer}"
    head = rng.standard_normal((HIDDEN, VOCAB), dtype=np.float32) * 0.02
    inits.append(numpy_helper.from_array(head, "head"))
    nbytes += head.nbytes
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, VOCAB])]
    outputs += [helper.make_tensor_value_info(f"y{i}_{j}", TensorProto.FLOAT, None)
                for i in range(LAYERS) for j in (0, 1)]
    graph = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, HIDDEN])],
                              outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path),
              save_as_external_data=True, location=path.name + ".data")
    return nbytes


def weights_floor(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "weights.onnx"
    nbytes = _weights_graph(path)
    sessions = {"MatMuls, weights prepacked (onnxruntime default)": ort.InferenceSession(str(path), _options()),
                "MatMuls, prepacking disabled": ort.InferenceSession(
                    str(path), _options(**{"session.disable_prepacking": "1"}))}
    x = np.random.default_rng(1).standard_normal((1, 1, HIDDEN), dtype=np.float32)
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(5):  # interleaved, best of 5 runs of 20 steps
        for name, sess in sessions.items():
            for _ in range(3):
                sess.run(["logits"], {"x": x})
            start = time.perf_counter()
            for _ in range(20):
                sess.run(["logits"], {"x": x})
            best[name] = min(best[name], (time.perf_counter() - start) / 20)
    bandwidth = measure_bandwidth()
    rows = [{"what": name, "ms": s * 1e3, "gb_s": nbytes / s / 1e9, "of_sum": nbytes / s / 1e9 / bandwidth}
            for name, s in best.items()]
    rows.append({"what": "torch.sum over 1 GiB (the bench's bandwidth)", "ms": nbytes / bandwidth / 1e6,
                 "gb_s": bandwidth, "of_sum": 1.0})
    return rows


def _attention_graph(kind: str, layers: int) -> onnx.ModelProto:
    vi, make = helper.make_tensor_value_info, helper.make_node
    rep = HQ // HKV
    consts = {"k_shape": [0, 0, HKV, D], "q_shape": [0, 0, HQ, D], "qg_shape": [0, HKV, -1, D],
              "o5_shape": [0, HKV, rep, -1, D], "o_shape": [0, 0, HQ * D], "tile": [1, 1, rep, 1],
              "zero": [0], "big": [1 << 40], "last": [-1]}
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(np.array(1 / np.sqrt(D), np.float32), "scale"))
    inputs = [vi("q", TensorProto.FLOAT, [1, 1, HQ * D]), vi("k", TensorProto.FLOAT, [1, 1, HKV * D]),
              vi("v", TensorProto.FLOAT, [1, 1, HKV * D])]
    inputs += [vi("seqlens", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])] if kind == "gqa" else \
        [vi("bias", TensorProto.FLOAT, [1, 1, 1, "keys"])]
    nodes = [make("Reshape", ["k", "k_shape"], ["k4a"]), make("Transpose", ["k4a"], ["k4"], perm=[0, 2, 1, 3]),
             make("Reshape", ["v", "k_shape"], ["v4a"]), make("Transpose", ["v4a"], ["v4"], perm=[0, 2, 1, 3]),
             make("Reshape", ["q", "q_shape"], ["q4a"]), make("Transpose", ["q4a"], ["q4"], perm=[0, 2, 1, 3]),
             make("Reshape", ["q4", "qg_shape"], ["qg"]), make("Mul", ["qg", "scale"], ["qs"])]
    outputs = []
    for i in range(layers):
        pk, pv, o = f"pk{i}", f"pv{i}", f"o{i}"
        inputs += [vi(pk, TensorProto.FLOAT, [1, HKV, "slots", D]), vi(pv, TensorProto.FLOAT, [1, HKV, "slots", D])]
        n = nodes.append
        if kind == "attention23":
            n(make("Attention", ["q", "k", "v", "bias", pk, pv], [o, f"K{i}", f"V{i}"], q_num_heads=HQ,
                   kv_num_heads=HKV, scale=float(1 / np.sqrt(D))))
            outputs += [f"K{i}", f"V{i}"]
        elif kind == "gqa":
            n(make("GroupQueryAttention", ["q", "k", "v", pk, pv, "seqlens", "total"], [o, f"K{i}", f"V{i}"],
                   domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV, scale=float(1 / np.sqrt(D))))
            outputs += [f"K{i}", f"V{i}"]
        else:
            if kind == "plain":
                n(make("Concat", [pk, "k4"], [f"K{i}"], axis=2))
                n(make("Concat", [pv, "v4"], [f"V{i}"], axis=2))
                n(make("Transpose", [f"K{i}"], [f"Kt{i}"], perm=[0, 1, 3, 2]))
                n(make("MatMul", ["qs", f"Kt{i}"], [f"s{i}"]))
                outputs += [f"K{i}", f"V{i}"]
            else:  # two-part: scores against the cache buffer and against the new token, no cache copy
                n(make("Transpose", [pk], [f"Kt{i}"], perm=[0, 1, 3, 2]))
                n(make("MatMul", ["qs", f"Kt{i}"], [f"sp{i}"]))
                n(make("Transpose", ["k4"], [f"kt{i}"], perm=[0, 1, 3, 2]))
                n(make("MatMul", ["qs", f"kt{i}"], [f"sn{i}"]))
                n(make("Concat", [f"sp{i}", f"sn{i}"], [f"s{i}"], axis=-1))
            n(make("Tile", ["bias", "tile"], [f"bt{i}"]))
            n(make("Add", [f"s{i}", f"bt{i}"], [f"sb{i}"]))
            n(make("Softmax", [f"sb{i}"], [f"p{i}"], axis=-1))
            if kind == "plain":
                n(make("MatMul", [f"p{i}", f"V{i}"], [f"ov{i}"]))
            else:
                n(make("Shape", [pk], [f"slots{i}"], start=2, end=3))
                n(make("Slice", [f"p{i}", "zero", f"slots{i}", "last"], [f"pp{i}"]))
                n(make("Slice", [f"p{i}", f"slots{i}", "big", "last"], [f"pn{i}"]))
                n(make("MatMul", [f"pp{i}", pv], [f"op{i}"]))
                n(make("MatMul", [f"pn{i}", "v4"], [f"on{i}"]))
                n(make("Add", [f"op{i}", f"on{i}"], [f"ov{i}"]))
            n(make("Reshape", [f"ov{i}", "o5_shape"], [f"o5{i}"]))
            n(make("Transpose", [f"o5{i}"], [f"o5t{i}"], perm=[0, 3, 1, 2, 4]))
            n(make("Reshape", [f"o5t{i}", "o_shape"], [o]))
        outputs.append(o)
    graph = helper.make_graph(nodes, kind, inputs, [vi(x, TensorProto.FLOAT, None) for x in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23),
                                                   helper.make_opsetid("com.microsoft", 1)])


def attention_alone(contexts: list[int], layers: int = LAYERS) -> list[dict[str, Any]]:
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, h * D), dtype=np.float32) for h in (HQ, HKV, HKV))
    rows = []
    for past in contexts:
        slots = past + 128  # the in-place forms read a buffer with spare capacity
        row: dict[str, Any] = {"context": past}
        for kind in ("plain", "attention23", "two_part", "gqa"):
            opts = _options()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(_attention_graph(kind, layers).SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
            width = past if kind in ("plain", "attention23") else slots
            feeds: dict[str, np.ndarray] = {"q": q, "k": k, "v": v}
            if kind == "gqa":
                feeds.update(seqlens=np.array([past], np.int32), total=np.array(past + 1, np.int32))
            else:
                bias = np.zeros((1, 1, 1, width + 1), np.float32)
                bias[..., past:width] = np.finfo(np.float32).min  # unused slots of the buffer
                feeds["bias"] = bias
            for i in range(layers):
                feeds[f"pk{i}"] = rng.standard_normal((1, HKV, width, D), dtype=np.float32)
                feeds[f"pv{i}"] = rng.standard_normal((1, HKV, width, D), dtype=np.float32)
            io = sess.io_binding()
            for name, value in feeds.items():
                io.bind_cpu_input(name, value)
            for out in sess.get_outputs():
                if kind == "gqa" and out.name[0] in "KV":  # present bound to the past buffer: written in place
                    buf = feeds[("pk" if out.name[0] == "K" else "pv") + out.name[1:]]
                    io.bind_output(out.name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                else:
                    io.bind_output(out.name, "cpu")
            for _ in range(5):
                sess.run_with_iobinding(io)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(20):
                    sess.run_with_iobinding(io)
                best = min(best, (time.perf_counter() - start) / 20)
            row[kind] = best * 1e3
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--attention-contexts", default="512,2048")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        profile = profile_step(args.context, args.steps, work)
        floor = weights_floor(work)
    attention = attention_alone([int(c) for c in args.attention_contexts.split(",")])
    print(f"\n{machine()}\n\nSmolLM2-135M decode step at {args.context} context, onnxruntime profiler "
          f"(kernel ms per step; profiling adds a little to each node):\n")
    print(table(profile, [("op", "op type", ""), ("ms", "ms/step", ".3f"), ("nodes", "nodes/step", ".0f")]))
    print(f"\nThe step's weights alone ({LAYERS} layers of SmolLM2 MatMuls + the LM head, fp32), best of 5:\n")
    print(table(floor, [("what", "", ""), ("ms", "ms/step", ".2f"), ("gb_s", "GB/s", ".1f"),
                        ("of_sum", "of torch.sum", ".0%")]))
    print(f"\nAttention alone, {LAYERS} layers, batch 1, 1 new token, {HQ}/{HKV} heads, d {D} (ms per step):\n")
    print(table(attention, [("context", "context", ""), ("plain", "plain + Concat", ".2f"),
                            ("attention23", "Attention (opset 23)", ".2f"), ("two_part", "two-part in place", ".2f"),
                            ("gqa", "GQA, shared buffer", ".2f")]))


if __name__ == "__main__":
    main()
