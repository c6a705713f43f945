"""MLA → DeepSeek-V3 export on real weights: convert SmolLM2-135M with ``mla``, write ``--export hf``, load it with
transformers and compare its logits with headsmith's program on the bundled held-out text.

    python benchmarks/mla_export_check.py ["mla(kv_fraction=0.5)" ...] [--tokens 512]

Prints, per spec, the exported DeepSeek-V3 sizes (rotary dims, latent rank, value head dim, RoPE type), the
largest absolute logit difference, the fraction of positions whose argmax agrees, and the export time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

import headsmith
from headsmith.backends.hf_export import export_hf
from headsmith.corpus import EVAL_TEXT, tokenize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=["mla(kv_fraction=0.5)"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    source = headsmith.load(args.model)
    ids = tokenize(source.tokenizer, EVAL_TEXT.read_text())[: args.tokens][None]
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    for spec in args.specs:
        program = source.apply(spec)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = export_hf(program, Path(tmp) / "hf")
            seconds = time.perf_counter() - start
            config = json.loads((out / "config.json").read_text())
            model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                ref = program(ids, mask, pos)
                got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        print(f"{spec}: {type(model).__name__}, qk_rope_head_dim {config['qk_rope_head_dim']}, kv_lora_rank "
              f"{config['kv_lora_rank']}, v_head_dim {config['v_head_dim']}, rope "
              f"{config['rope_parameters']['rope_type']}; max |dlogit| {float((ref - got).abs().max()):.2e} "
              f"(logits up to {float(ref.abs().max()):.1f}), argmax agreement "
              f"{float((ref.argmax(-1) == got.argmax(-1)).float().mean()):.4f}, export {seconds:.1f}s", flush=True)


if __name__ == "__main__":
    main()
