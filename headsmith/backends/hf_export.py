"""``--export hf``: write a rewritten program as a Hugging Face checkpoint that ``from_pretrained`` loads.

Possible when the result is still the source architecture with different sizes: fewer KV heads after ``gqa``
(``num_key_value_heads``), and uniform layers. The expected keys and shapes come from the architecture itself
(the model class is instantiated on the ``meta`` device from the updated config); every graph weight is mapped
back to its HF key, undoing headsmith's canonicalisation (GPT-2's transposed Conv1D weights ``*_t`` and split
fused projections ``*_s{a}_{b}``, which are concatenated again). A shape mismatch or a weight with no home is
an error that names the key, so an export never silently drops or invents weights. The directory is written
atomically (config, ``model.safetensors``, tokenizer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import BackendError, HeadsmithError
from ..program import Program
from .artifact import graph_weights

SPLIT = re.compile(r"^(?P<base>.+)_s(?P<a>\d+)_(?P<b>\d+)$")


def hf_state(program: Program) -> dict[str, Tensor]:
    """Graph weights under their HF names (prefix stripped, splits concatenated, transposes undone)."""
    prefix = program.info.weight_prefix
    parts: dict[str, list[tuple[int, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for target, tensor in graph_weights(program.gm).items():
        name = target[len(prefix):] if target.startswith(prefix) else target
        m = SPLIT.match(name)
        if m is not None:
            parts.setdefault(m.group("base"), []).append((int(m.group("a")), tensor))
            continue
        out[name] = tensor
    for base, pieces in parts.items():
        out[base] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], 0)
    for name in list(out):
        if name.endswith("_t"):
            out[name[:-2]] = out.pop(name).t().contiguous()
    return out


def export_config(program: Program) -> dict[str, Any]:
    """The source config with the sizes the passes changed; refuses what the architecture cannot express."""
    spec = program.spec()
    config = json.loads(json.dumps(program.info.config))
    if any(layer.latent for layer in spec.layers):
        raise BackendError("the program has latent (MLA) attention, which its source architecture "
                           f"({program.info.architecture}) cannot express", "export with --backend instead")
    shapes = {(la.n_heads, la.n_kv_heads, la.head_dim) for la in spec.layers}
    if len(shapes) != 1:
        raise BackendError(f"layers differ in heads / KV heads / head dim ({sorted(shapes)}): a standard HF config "
                           "describes uniform layers only", "export with --backend instead")
    heads, kv_heads, _ = shapes.pop()
    text = config.get("text_config", config)
    if "num_key_value_heads" in text or "num_attention_heads" in text:
        if text.get("num_attention_heads", heads) != heads:
            text["num_attention_heads"] = heads
        text["num_key_value_heads"] = kv_heads
    elif kv_heads != heads:
        raise BackendError(f"{program.info.architecture} has no grouped-query attention (no num_key_value_heads): "
                           f"{kv_heads} KV heads for {heads} query heads cannot be expressed",
                           "export with --backend instead")
    text["num_hidden_layers"] = spec.n_layers
    return config


def export_hf(program: Program, out: Path) -> Path:
    """Write ``program`` as an HF checkpoint directory ``out`` (atomically); returns ``out``."""
    import transformers

    config_dict = export_config(program)
    config = transformers.AutoConfig.for_model(**config_dict)
    auto = transformers.AutoModelForCausalLM if program.info.task == "causal-lm" else transformers.AutoModel
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    state = hf_state(program)
    source = _SourceWeights(program)
    tied = _tied_pairs(skeleton)
    result: dict[str, Tensor] = {}
    for key, shape in expected.items():
        value = state.get(key)
        if value is None and key in tied:
            value = state.get(tied[key])
        if value is None:
            value = source.get(key)  # weights the graph never reads (e.g. BERT's pooler) come from the source
        if value is None:
            if key.endswith("rotary_emb.inv_freq") or "position_ids" in key:
                continue
            raise BackendError(f"cannot export: the program has no weight for HF key {key!r}")
        if tuple(value.shape) != shape:
            raise BackendError(f"cannot export: {key!r} has shape {tuple(value.shape)}, the architecture expects {shape}")
        result[key] = value
    out_key = next(iter(tied), None)  # the output embedding (lm_head): saved once, re-tied by from_pretrained
    if out_key is not None and out_key in result and tied[out_key] in result:
        if result[out_key].data_ptr() == result[tied[out_key]].data_ptr():
            del result[out_key]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.detach().contiguous() for k, v in result.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        if program.tokenizer is not None:
            program.tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class _SourceWeights:
    """Lazy access to the source checkpoint's tensors by HF key (empty when the source is not available)."""

    def __init__(self, program: Program) -> None:
        self.files: list[Path] = []
        try:
            from ..frontend.load import resolve
            name = program.source.name if program.source.kind == "builtin" else program.source.path
            directory, _ = resolve(name, install=False)
            self.files = sorted(directory.glob("*.safetensors"))
        except (HeadsmithError, OSError):  # no source here: only the graph's own weights can be exported
            self.files = []

    def get(self, key: str) -> Tensor | None:
        from safetensors import safe_open
        for f in self.files:
            with safe_open(str(f), "pt") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
        return None


def _tied_pairs(model: torch.nn.Module) -> dict[str, str]:
    """``{key: source key}`` for weights the architecture ties (e.g. lm_head to the input embedding)."""
    pairs: dict[str, str] = {}
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if text is not None and getattr(text, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if out_emb is not None and in_emb is not None:
            names = {id(m): n for n, m in model.named_modules()}
            out_name, in_name = names.get(id(out_emb)), names.get(id(in_emb))
            if out_name is not None and in_name is not None:
                pairs[f"{out_name}.weight"] = f"{in_name}.weight"
                pairs[f"{in_name}.weight"] = f"{out_name}.weight"
    return pairs
