"""``--export hf``: write a rewritten program as a Hugging Face checkpoint that ``from_pretrained`` loads.

Possible when the result is still the source architecture with different sizes: fewer KV heads after ``gqa``
(``num_key_value_heads``), and uniform layers. A Llama-family program converted by ``mla`` is written as a
**DeepSeek-V3** checkpoint (``DeepseekV3ForCausalLM``, dense MLPs, no MoE) computing the same function; see
:func:`deepseek_checkpoint` for how headsmith's latent form maps onto DeepSeek's. The expected keys and shapes come from the architecture itself
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
    if program.token_merge is not None:
        raise BackendError("the program merges tokens (token-merge), which no Hugging Face config describes",
                           "export with --backend onnx or torch instead")
    if program.prefill_prune is not None:
        raise BackendError("prefill-prune runs in the engine's staged prefill, which a Hugging Face checkpoint "
                           "cannot carry", "export without --export hf, or drop prefill-prune")
    if any(layer.latent for layer in spec.layers):
        raise BackendError("the program has latent (MLA) attention, which its source architecture "
                           f"({program.info.architecture}) cannot express", "export with --backend instead")
    shapes = {(la.n_heads, la.n_kv_heads, la.head_dim) for la in spec.layers}
    if len(shapes) != 1:
        raise BackendError(f"layers differ in heads / KV heads / head dim ({sorted(shapes)}): a standard HF config "
                           "describes uniform layers only", "export with --backend instead")
    heads, kv_heads, _ = shapes.pop()
    text = config.get("text_config", config)
    if any(la.sinks or la.blocks for la in spec.layers) or any(
            la.window and la.window != text.get("sliding_window") for la in spec.layers):
        raise BackendError("the program's attention pattern (sparse-attention's sinks, windows or block layouts) is "
                           f"not the one {program.info.architecture}'s config describes", "export with --backend instead")
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

    if program.quantized:
        raise BackendError("--export hf cannot write quantised weights yet: the packed blocks of `quantize` have no "
                           "transformers format that loads without extra packages (compressed-tensors, GPTQ)",
                           "export the float program (drop quantize(...) from --passes), or deploy the quantised "
                           "program with --backend onnx / torch")
    if any(layer.latent for layer in program.spec().layers):
        config_dict, state = deepseek_checkpoint(program)
    else:
        config_dict, state = export_config(program), hf_state(program)
    config = transformers.AutoConfig.for_model(**config_dict)
    auto = transformers.AutoModelForCausalLM if program.info.task == "causal-lm" else transformers.AutoModel
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
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


MLA_PARTS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.self_attn\.\w+\.weight_mla"
                       r"(?:_(?P<part>q|k|latent|rope_index))?(?P<bias>_bias)?$")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ROPE_STATIC = ("default", "linear", "llama3")


def deepseek_checkpoint(program: Program) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, weights)`` of a DeepSeek-V3 checkpoint computing what the ``mla`` program computes.

    headsmith's latent layer (see ``passes/mla.py``) caches a rotary key ``k_r`` (``2P`` dims, each rotary pair
    at the frequency of the source pair it came from) and a value latent ``c`` (``r`` dims); each head's output
    is ``o_h · softmax(q_r,h · k_r) c``. DeepSeek-V3 (``q_lora_rank=None``) computes ``q_proj`` → [nope | rope],
    ``kv_a_proj_with_mqa`` → [latent | rotary key], ``kv_a_layernorm`` on the latent, ``kv_b_proj`` → per head
    [k_nope | v], then ``o_proj``. The mapping, exact up to float rounding:

    - ``qk_nope_head_dim = 0``: every key dim is rotary. The rotary key gets one slot per kept component; a
      source pair kept twice in some layer gets two slots (all layers share the slots, unused ones are zero).
      When the slots are exactly the source's pairs the source's RoPE parameters are kept; otherwise the slot
      frequencies are written as LongRoPE factors (``short_factor == long_factor``, ``attention_factor = 1``).
    - DeepSeek RMS-normalises the latent. The latent gets one extra channel, a constant ``alpha`` (through
      ``kv_a_proj_with_mqa``'s bias, hence ``attention_bias=True``) far larger than any latent the layer can
      produce, so the norm divides by a constant (relative deviation below 1e-8) that the norm's weight undoes;
      ``kv_b_proj`` ignores that channel. Load the checkpoint in fp32 or bf16: ``alpha`` overflows fp16.
    - The value up-projection that headsmith absorbed into ``o_proj`` is split again per head by an SVD
      (``v_head_dim`` = the largest numerical rank), and the softmax scale difference is folded into ``q_proj``.
    """
    spec = program.spec()
    config = json.loads(json.dumps(program.info.config))
    text = config.get("text_config", config)
    model_type = str(text.get("model_type", ""))
    if model_type not in LLAMA_FAMILY:
        raise BackendError(f"MLA export writes a DeepSeek-V3 checkpoint from Llama-family models ({', '.join(LLAMA_FAMILY)}),"
                           f" not {program.info.architecture}", "export with --backend instead")
    if not all(layer.latent for layer in spec.layers):
        raise BackendError("MLA export needs every layer converted by mla (some layers are not latent)",
                           "apply mla to the whole model, or export with --backend instead")
    if any(layer.window for layer in spec.layers):
        raise BackendError("DeepSeek-V3 has no sliding-window attention; this program has windowed layers",
                           "export with --backend instead")
    if text.get("mlp_bias"):
        raise BackendError("DeepSeek-V3's MLPs have no biases; this model's do", "export with --backend instead")
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 1e4)})
    if rope.get("rope_type", "default") not in ROPE_STATIC or float(rope.get("attention_factor", 1.0)) != 1.0:
        raise BackendError(f"MLA export supports static RoPE frequencies ({', '.join(ROPE_STATIC)}), not "
                           f"{rope.get('rope_type')!r}", "export with --backend instead")
    state = hf_state(program)
    inv_freq = state.get("model.rotary_emb.inv_freq")
    if inv_freq is None:
        raise BackendError("the program has no rotary frequencies (model.rotary_emb.inv_freq) to export")
    inv_freq = inv_freq.double()
    parts: dict[int, dict[str, Tensor]] = {}
    for key in list(state):
        m = MLA_PARTS.match(key)
        if m is not None:
            parts.setdefault(int(m.group("layer")), {})[(m.group("part") or "o") + (m.group("bias") or "")] = \
                state.pop(key).double()
    n_layers = spec.n_layers
    if sorted(parts) != list(range(n_layers)) or any({"q", "k", "latent", "rope_index", "o"} - set(p)
                                                     for p in parts.values()):
        raise BackendError("the program's latent layers are not in the form mla writes (weights missing)",
                           "export with --backend instead")
    if any("q_bias" in p or "o_bias" in p for p in parts.values()):
        raise BackendError("DeepSeek-V3's q_proj has no bias; this model's query projection has one",
                           "export with --backend instead")
    heads, hidden = spec.layers[0].n_heads, int(text["hidden_size"])
    # rotary slots: pair i gets as many slots as the most any layer keeps of it
    pairs = {layer: p["rope_index"][: p["rope_index"].numel() // 2].long().tolist() for layer, p in parts.items()}
    slots_of: dict[int, int] = {}
    for kept in pairs.values():
        for i in set(kept):
            slots_of[i] = max(slots_of.get(i, 0), kept.count(i))
    slot_pair = [i for i in sorted(slots_of) for _ in range(slots_of[i])]
    n_slots = len(slot_pair)
    rope_dims = 2 * n_slots
    rank = max(int(p["latent"].shape[0]) for p in parts.values())
    lora = rank + 1  # the latent, then the constant channel
    # v_head_dim: the largest numerical rank of a head's (absorbed) output projection
    splits: dict[int, list[tuple[Tensor, Tensor]]] = {}
    v_dim = 1
    for layer, p in parts.items():
        r = int(p["latent"].shape[0])
        o = p["o"].reshape(hidden, heads, r)
        splits[layer] = []
        for h in range(heads):
            u, sv, vt = torch.linalg.svd(o[:, h], full_matrices=False)
            keep = int((sv > sv.max() * 1e-6).sum()) if sv.numel() else 0  # float32 weights: noise below
            splits[layer].append((u[:, :keep] * sv[:keep], vt[:keep]))
            v_dim = max(v_dim, keep)
    eps = float(text.get("rms_norm_eps", 1e-6))
    out: dict[str, Tensor] = {k: v for k, v in state.items() if k != "model.rotary_emb.inv_freq"}
    for layer, p in parts.items():
        pre = f"model.layers.{layer}.self_attn."
        kept = pairs[layer]
        half = len(kept)
        used: dict[int, int] = {}
        slot = []
        for i in kept:  # component c -> the first free slot of its pair
            base = slot_pair.index(i) + used.get(i, 0)
            used[i] = used.get(i, 0) + 1
            slot.append(base)
        rows = torch.tensor(slot + [n_slots + s for s in slot])
        scale = spec.layers[layer].scale * rope_dims ** 0.5  # ours / DeepSeek's (rope_dims ** -0.5)
        q = torch.zeros(heads, rope_dims, hidden, dtype=torch.float64)
        q[:, rows] = p["q"].reshape(heads, 2 * half, hidden) * scale
        r = int(p["latent"].shape[0])
        a = torch.zeros(lora + rope_dims, hidden, dtype=torch.float64)
        bias = torch.zeros(lora + rope_dims, dtype=torch.float64)
        a[:r] = p["latent"]
        a[lora + rows] = p["k"]
        if "latent_bias" in p:
            bias[:r] = p["latent_bias"]
        if "k_bias" in p:
            bias[lora + rows] = p["k_bias"]
        gain = float(state[f"model.layers.{layer}.input_layernorm.weight"].abs().max())
        bound = float(torch.linalg.matrix_norm(p["latent"], 2)) * hidden ** 0.5 * gain + float(bias[:r].norm())
        alpha = 1e4 * max(bound, 1.0)
        bias[rank] = alpha
        kv_b = torch.zeros(heads, v_dim, lora, dtype=torch.float64)
        o_proj = torch.zeros(hidden, heads, v_dim, dtype=torch.float64)
        for h, (left, right) in enumerate(splits[layer]):
            kv_b[h, : right.shape[0], :r] = right
            o_proj[:, h, : left.shape[1]] = left
        out[pre + "q_proj.weight"] = q.reshape(-1, hidden).float()
        out[pre + "kv_a_proj_with_mqa.weight"] = a.float()
        out[pre + "kv_a_proj_with_mqa.bias"] = bias.float()
        out[pre + "kv_a_layernorm.weight"] = torch.full((lora,), (alpha * alpha / lora + eps) ** 0.5)
        out[pre + "kv_b_proj.weight"] = kv_b.reshape(-1, lora).float()
        out[pre + "o_proj.weight"] = o_proj.reshape(hidden, -1).float()
        out[pre + "o_proj.bias"] = torch.zeros(hidden)
    theta = float(rope.get("rope_theta", text.get("rope_theta", 1e4)))
    if slot_pair == list(range(inv_freq.numel())):
        rope_out = rope  # every source pair once, in order: the source's own RoPE
    else:
        shape = torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims
        factors = (1.0 / (inv_freq[torch.tensor(slot_pair)] * theta ** shape)).tolist()
        rope_out = {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors, "long_factor": factors,
                    "factor": 1.0, "attention_factor": 1.0,
                    "original_max_position_embeddings": int(text.get("max_position_embeddings", 2048))}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "hidden_act", "max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
    ds = {k: text[k] for k in keep if k in text}
    ds.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", num_hidden_layers=n_layers,
              num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=None, kv_lora_rank=lora,
              qk_rope_head_dim=rope_dims, qk_nope_head_dim=0, v_head_dim=v_dim, first_k_dense_replace=n_layers,
              moe_intermediate_size=int(text.get("intermediate_size", hidden)), n_routed_experts=1,
              num_experts_per_tok=1, n_shared_experts=0, rope_parameters=rope_out, rope_interleave=False,
              attention_bias=True, attention_dropout=0.0)
    return ds, out


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
