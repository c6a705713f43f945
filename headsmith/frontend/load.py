"""Resolve a MODEL argument and load it as a Hugging Face model, checking it first.

MODEL is one of: a built-in name (``smollm2-135m``, ``gemma3-270m``, ``minilm-l6``), a Hugging Face
directory (``config.json`` + safetensors), or a ``.gguf`` file. Pickled ``.bin`` weights are refused unless
``allow_pickle=True``, and then read with ``torch.load(weights_only=True)``. Every problem is reported as
one :class:`~headsmith.errors.LoadError` that names the file and the fix; the input is never written.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError, UnsupportedModelError
from ..program import ModelInfo, SourceInfo
from .builtin import BUILTINS, cache_root, dequantize_gguf, resolve_builtin, sha256_dir, sha256_file

#: encoder model types loaded with ``AutoModel`` (their output is the last hidden state)
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet",
                           "camembert", "deberta", "deberta-v2", "modernbert"})

SUPPORTED_HINT = ("headsmith supports decoder-only causal LMs (Llama, Qwen2, Mistral, Gemma3, GPT-2, Phi-3, ...) "
                  "and BERT-style encoders")


@dataclass
class Loaded:
    """A checked, loaded Hugging Face model and what headsmith knows about it."""

    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo
    source: SourceInfo
    directory: Path


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def resolve(source: str | Path, install: bool = True) -> tuple[Path, SourceInfo]:
    """The HF directory to load for ``source`` and its :class:`SourceInfo`."""
    text = str(source)
    if text in BUILTINS:
        directory, digest, original = resolve_builtin(text, install)
        return directory, SourceInfo("builtin", str(original), text, digest)
    path = Path(text).expanduser()
    if not path.exists():
        raise LoadError(f"no such file or directory: {text}",
                        f"give a Hugging Face model directory, a .gguf file, or a built-in name "
                        f"({', '.join(builtin_names())})")
    if path.is_file():
        if path.suffix == ".gguf":
            digest = sha256_file(path)
            cache = cache_root() / "gguf" / digest[:16]
            if not (cache / "config.json").exists():
                _check_gguf_header(path)
                dequantize_gguf(path.resolve(), cache)
            return cache, SourceInfo("gguf", str(path.resolve()), path.stem, digest)
        if path.suffix == ".onnx":
            raise LoadError(f"{text}: importing ONNX graphs is not supported yet",
                            "convert the Hugging Face checkpoint it came from instead")
        if path.name == "config.json":
            path = path.parent
        else:
            raise LoadError(f"{text} is a file, not a model",
                            "give a Hugging Face model directory (with config.json) or a .gguf file")
    if not (path / "config.json").exists():
        raise LoadError(f"{text} is not a model directory: it has no config.json",
                        "point at the folder that holds config.json and the weights")
    return path, SourceInfo("hf", str(path.resolve()), path.name, sha256_dir(path))


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LoadError(f"{path} is not a GGUF file (magic {magic!r})", "check the file name and contents")


def check_weights(directory: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a model directory, after checking that each is complete."""
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        for f in safetensors:
            check_safetensors(f)
        return safetensors
    pickled = sorted(directory.glob("*.bin"))
    if not pickled:
        raise LoadError(f"{directory} has a config.json but no weights (*.safetensors)",
                        "copy the model's .safetensors files next to config.json")
    if not allow_pickle:
        raise LoadError(f"{directory} holds only pickled weights ({pickled[0].name}); "
                        "pickles can run code when loaded, so they are refused",
                        "pass --allow-pickle (loads with torch.load(weights_only=True)) or convert to safetensors")
    return pickled


def check_safetensors(path: Path) -> None:
    """Fail with a clear message if a safetensors file is truncated or its header is corrupt."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes, file has {size - 8} after the length")
            header = json.loads(f.read(n))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise LoadError(f"weights file {path} is corrupt: {e}", "re-download or re-save the checkpoint") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    have = size - 8 - n
    if end > have:
        raise LoadError(f"weights file {path} is truncated: its header describes {end} bytes of tensor "
                        f"data but the file has {have}", "re-download or re-save the checkpoint")


def load_hf(source: str | Path, allow_pickle: bool = False, install: bool = True) -> Loaded:
    """Resolve, check and load ``source`` in fp32 with SDPA attention."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    directory, src = resolve(source, install)
    check_weights(directory, allow_pickle)
    raw = json.loads((directory / "config.json").read_text())
    model_type = raw.get("model_type")
    if not model_type:
        raise LoadError(f"{directory / 'config.json'} has no model_type", "is this a transformers checkpoint?")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"unsupported architecture {model_type!r}: transformers "
                                    f"{transformers.__version__} has no model for it ({str(e).splitlines()[0][:120]})",
                                    SUPPORTED_HINT) from None
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else ""
    task = _task_of(model_type, arch)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if not list(directory.glob("*.safetensors")):
        kwargs["use_safetensors"] = False
    model = _from_pretrained(auto, directory, kwargs)
    model.eval()
    tokenizer = None
    if any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
    info = _info(model, config, raw, task, tokenizer)
    return Loaded(model, tokenizer, info, src, directory)


def _task_of(model_type: str, arch: str) -> str:
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal-lm"
    if model_type in ENCODER_TYPES:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not arch and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    raise UnsupportedModelError(f"unsupported architecture {arch or model_type!r}: not a decoder-only causal LM "
                                "or an encoder", SUPPORTED_HINT)


def _from_pretrained(auto: Any, directory: Path, kwargs: dict[str, Any]) -> torch.nn.Module:
    last: Exception | None = None
    for impl in ("sdpa", "eager"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return auto.from_pretrained(str(directory), attn_implementation=impl, **kwargs)
        except ValueError as e:
            last = e
            if "attn_implementation" in str(e) or "sdpa" in str(e).lower():
                continue
            break
        except (OSError, RuntimeError) as e:
            raise LoadError(f"cannot load the weights in {directory}: {str(e).splitlines()[0][:300]}",
                            "check that the checkpoint is complete and matches its config.json") from None
    raise UnsupportedModelError(f"cannot build a model from {directory}: {str(last).splitlines()[0][:300]}",
                                SUPPORTED_HINT)


def _info(model: torch.nn.Module, config: Any, raw: dict[str, Any], task: str, tokenizer: Any) -> ModelInfo:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    eos = getattr(text, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids = (*eos_ids, tokenizer.eos_token_id)
    pad = getattr(text, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    return ModelInfo(
        architecture=type(model).__name__, model_type=str(raw.get("model_type")), task=task,
        hidden_size=int(hidden or 0), vocab_size=int(text.vocab_size),
        max_positions=int(max_pos) if max_pos else None, config=raw,
        pad_token_id=pad if isinstance(pad, int) else None, eos_token_ids=tuple(int(e) for e in eos_ids),
        bos_token_id=getattr(text, "bos_token_id", None))
