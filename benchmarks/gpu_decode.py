"""Decode speed of SmolLM2-135M on an NVIDIA GPU: headsmith's TVM CUDA engine against HF transformers (torch
CUDA), with the GPU's measured read bandwidth and the bound it sets. Two steps, since the GPU machine has no
network and takes at most 64 MiB of files:

    python benchmarks/gpu_decode.py prepare [--arch sm_90]     # here: build and pack everything into .gpu/
    python benchmarks/gpu_decode.py run [--json F]             # on the GPU machine, from the repository root

``prepare`` compiles the SmolLM2-135M decode/prefill library for the GPU (``--backend tvm --tvm-target
cuda:<arch>``) and packs it without its 540 MB of weights, the tokenizer and the HF config; a tiny Llama
(random weights, larger init) compiled the same way with its weights and its HF directory, for a parity check;
the TVM runtime without its compiler (``TVM_USE_RUNTIME_LIB=1``: 45 MB instead of 305 MB) and the
``apache-tvm-ffi`` wheel for the GPU machine's Python.

``run`` installs the TVM runtime into /tmp, then:

1. parity: the tiny model's prefill logits and 32 greedy tokens, TVM CUDA against HF transformers on the same
   GPU (fp32);
2. SmolLM2-135M shapes with **seeded random weights** (the checkpoint does not fit the transfer; decode time
   does not depend on the weight values): one HF ``LlamaForCausalLM`` built from SmolLM2's config, whose
   weights are also written into the TVM artifact, so both engines compute the same function (prefill
   logits compared);
3. decode tokens/s at each context (one prefill, two untimed steps, best of ``--repeats`` runs of
   ``--new-tokens`` greedy steps) for the TVM engine and for HF ``generate()`` in fp32 and bf16 (decode timed
   as the difference to a one-token generate, CUDA synchronised); the read bandwidth is a ``sum`` over a
   4 GiB buffer, and the bound is bandwidth / (fp32 weight bytes a step reads + K/V of the context).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpu"
TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "initializer_range": 0.2, "tie_word_embeddings": True, "architectures": ["LlamaForCausalLM"]}


# ---- prepare (this machine) ------------------------------------------------------------------------------
def prepare(arch: str) -> None:
    import transformers

    import headsmith
    from headsmith.backends.artifact import read_artifact

    if PACK.exists():
        shutil.rmtree(PACK)
    PACK.mkdir()
    target = f"cuda:{arch}"
    smol = ROOT / "out" / f"smollm2-135m-tvm-{arch.replace('_', '')}"
    manifest = smol / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text())["backend"]["target"].get("spec") != target:
        headsmith.convert("smollm2-135m", smol, backend="tvm", force=True, options={"target": target})
    dst = PACK / "smol"
    shutil.copytree(smol, dst, ignore=shutil.ignore_patterns("weights.safetensors", "program.pt2"))
    from safetensors import safe_open
    with safe_open(str(smol / "weights.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    (dst / "weight_shapes.json").write_text(json.dumps(shapes))
    (PACK / "smol_config.json").write_text(json.dumps(read_artifact(smol, verify=False).info.config))

    torch.manual_seed(0)
    tiny_hf = PACK / "tiny-hf"
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).save_pretrained(tiny_hf)
    headsmith.convert(tiny_hf, PACK / "tiny-tvm", backend="tvm", force=True, options={"target": target})

    import tvm
    src = Path(tvm.__file__).parent
    with tarfile.open(PACK / "tvm_runtime.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="tvm", filter=lambda ti: None if ("__pycache__" in ti.name
                                                               or ti.name.endswith("libtvm_compiler.so")) else ti)
    version = subprocess.run([sys.executable, "-m", "pip", "show", "apache-tvm-ffi"], capture_output=True,
                             text=True, check=True).stdout.split("Version:")[1].split()[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(PACK / "whl"), f"apache-tvm-ffi=={version}"], check=True)
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"packed {PACK} ({size / 2**20:.1f} MiB)")


# ---- run (the GPU machine) -------------------------------------------------------------------------------
def install_tvm_runtime() -> None:
    if not (PACK / "tvm_runtime.tar.gz").exists():
        raise SystemExit(f"{PACK} is missing or incomplete: run `python benchmarks/gpu_decode.py prepare` first "
                         "and carry .gpu to the GPU machine")
    site = Path("/tmp/site")
    if not (site / "tvm").exists():
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, (PACK / "whl").glob("*.whl"))], check=True)
        with tarfile.open(PACK / "tvm_runtime.tar.gz") as tar:
            tar.extractall(site, filter="data")
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.path.insert(0, str(site))


def read_bandwidth() -> float:
    x = torch.ones(1 << 30, device="cuda")  # 4 GiB
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del x
    return (1 << 32) / best / 1e9


def hf_decode(model: Any, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Best HF ``generate()`` decode tokens/s of ``repeats`` runs (after a warm-up)."""
    from headsmith.runtime.bench import time_hf
    time_hf(model, ids, 1)
    return max(time_hf(model, ids, new_tokens).decode_tok_s for _ in range(repeats))


def fill_weights(art: Any, model: Any) -> None:
    """The TVM artifact's weights := the HF model's (same names under the program's weight prefix)."""
    prefix = art.info.weight_prefix
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}  # inv_freq is not in state_dict
    state = {prefix + k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    missing = [k for k in art.weights if k not in state]
    if missing:
        raise SystemExit(f"no HF tensor for artifact weights {missing[:5]}")
    for k in art.weights:
        art.weights[k] = state[k]


def prefill_check(engine: Any, model: Any, ids: torch.Tensor) -> float:
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1])[None]
    logits, _ = engine.prefill(ids, mask, pos)
    with torch.no_grad():
        ref = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits[:, -1:].float().cpu()
    return float((logits.reshape(ref.shape) - ref).abs().max())


def greedy(engine: Any, ids: list[int], n: int) -> list[int]:
    from headsmith.runtime.generate import GenerationConfig, generate
    out = generate(engine, [ids], GenerationConfig(max_new_tokens=n, stop_tokens=()))
    return list(out.tokens[0])


def run(args: argparse.Namespace) -> None:
    install_tvm_runtime()
    import transformers

    from headsmith.backends.artifact import read_artifact
    from headsmith.runtime.bench import prompt_tokens, time_engine
    from headsmith.runtime.engine import engine_for

    from headsmith.runtime.tvm_engine import _load_cuda_runtime
    _load_cuda_runtime()
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        import ctypes
        ctypes.CDLL(str(Path(_LOADED_LIBS["tvm_runtime"]._name).parent / "libtvm_runtime_cuda.so"))  # raises why

    import onnxruntime
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                              "transformers": transformers.__version__,
                              "onnxruntime_providers": onnxruntime.get_available_providers()}
    print(json.dumps(result), flush=True)
    result["read_bandwidth_gb_s"] = bw = read_bandwidth()
    print(f"read bandwidth {bw:.0f} GB/s", flush=True)

    # 1. parity on the tiny model
    tiny = read_artifact(PACK / "tiny-tvm")
    engine = engine_for(tiny)
    hf = transformers.AutoModelForCausalLM.from_pretrained(PACK / "tiny-hf").cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 24), generator=g)
    result["tiny_prefill_max_abs_diff"] = prefill_check(engine, hf, prompt)
    with torch.no_grad():
        ref = hf.generate(prompt.cuda(), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones_like(prompt).cuda(), pad_token_id=0)[0, 24:].tolist()
    ours = greedy(engine, prompt[0].tolist(), 32)
    result["tiny_greedy_equal"] = ours == ref
    result["tiny_greedy_first_diff"] = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    print(f"tiny parity: prefill max |dlogit| {result['tiny_prefill_max_abs_diff']:.2e}, "
          f"greedy 32 equal: {result['tiny_greedy_equal']}", flush=True)
    del engine, hf

    # 2. SmolLM2-135M shapes, seeded random weights shared by both engines
    smol_dir = PACK / "smol"
    shapes = json.loads((smol_dir / "weight_shapes.json").read_text())
    config = transformers.LlamaConfig(**{k: v for k, v in json.loads((PACK / "smol_config.json").read_text()).items()
                                         if k not in ("architectures", "transformers_version", "dtype",
                                                      "torch_dtype")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    from safetensors.torch import save_file
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(smol_dir / "weights.safetensors"))
    art = read_artifact(smol_dir, verify=False)  # the weights are replaced below: no checksum to match
    fill_weights(art, model)
    start = time.perf_counter()
    engine = engine_for(art)
    result["tvm_load_s"] = time.perf_counter() - start
    model = model.cuda()
    probe = prompt_tokens(art.tokenizer, 128, art.info.vocab_size)
    result["smol_prefill_max_abs_diff"] = prefill_check(engine, model, probe)
    print(f"smol prefill max |dlogit| vs HF: {result['smol_prefill_max_abs_diff']:.2e}", flush=True)
    bf16 = transformers.LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    bf16.load_state_dict(model.state_dict())
    weight_bytes = int(art.manifest["decode_weight_bytes"])
    kv = art.spec.kv_bytes_per_token(4)
    rows = []
    for c in [int(x) for x in args.contexts.split(",")]:
        ids = prompt_tokens(art.tokenizer, c, art.info.vocab_size)
        row: dict[str, Any] = {"context": c}
        try:
            timing = time_engine(engine, ids, args.new_tokens, args.repeats)
            row.update(tvm_decode_tok_s=timing.decode_tok_s, tvm_prefill_tok_s=timing.prefill_tok_s)
        except Exception as e:  # a failure at one context is reported, the others still run
            row["tvm_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["hf_fp32_decode_tok_s"] = hf_decode(model, ids, args.new_tokens, args.repeats)
        row["hf_bf16_decode_tok_s"] = hf_decode(bf16, ids, args.new_tokens, args.repeats)
        row["bound_tok_s"] = bw * 1e9 / (weight_bytes + kv * c)
        for key in ("tvm", "hf_fp32"):
            if f"{key}_decode_tok_s" in row:
                row[f"{key}_of_bound"] = row[f"{key}_decode_tok_s"] / row["bound_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result.update(contexts=rows, weight_bytes=weight_bytes, kv_bytes_per_token=kv, new_tokens=args.new_tokens,
                  repeats=args.repeats)
    print("\n| context | TVM CUDA tok/s | HF fp32 tok/s | HF bf16 tok/s | TVM vs HF fp32 | bound tok/s (fp32) "
          "| TVM of bound |\n|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("tvm_decode_tok_s")
        hf32, bound = r["hf_fp32_decode_tok_s"], r["bound_tok_s"]
        cells = ["-", "-", "-"] if t is None else [f"{t:.1f}", f"{t / hf32:.2f}", f"{t / bound:.1%}"]
        print(f"| {r['context']} | {cells[0]} | {hf32:.1f} | {r['hf_bf16_decode_tok_s']:.1f} | {cells[1]} | "
              f"{bound:.0f} | {cells[2]} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--arch", default="sm_90")
    r = sub.add_parser("run")
    r.add_argument("--contexts", default="128,512,2048")
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.arch)
    else:
        sys.path.insert(0, str(ROOT))
        run(args)


if __name__ == "__main__":
    main()
