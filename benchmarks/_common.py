"""Shared helpers for the benchmark scripts: build (or reuse) an artifact, print markdown tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import headsmith
from headsmith.passes import parse_passes

OUT = Path(__file__).resolve().parent.parent / "out"
#: modern legal English from Debian's base-files: held-out text unlike the (scriptural) calibration text
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def artifact(model: str, backend: str, passes: str = "", name: str | None = None, rebuild: bool = False,
             options: dict[str, Any] | None = None) -> Path:
    """Convert ``model`` once into ``out/<name>`` and reuse it afterwards (the manifest records what it is)."""
    path = OUT / (name or f"{model}-{backend}")
    if backend == "onnx" and "attention" not in (options or {}):  # rebuild artifacts of an older default lowering
        from headsmith.backends.onnx_backend import DEFAULT_VARIANT
        options = {**(options or {}), "attention": DEFAULT_VARIANT}
    manifest = path / "manifest.json"
    if manifest.exists() and not rebuild:
        recorded = json.loads(manifest.read_text())
        applied = [p for p in recorded["passes"] if p != "raise-attention"]  # load() raises attention itself
        wanted = [str(p) for p in parse_passes(passes)] if passes.strip() else []  # as the manifest spells them
        if (recorded["backend"]["name"] == backend and applied == wanted
                and all(recorded["backend"].get(k) == v for k, v in (options or {}).items())):
            return path
    headsmith.convert(model, path, passes=passes, backend=backend, force=True, options=options)
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: ``columns`` are (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def passkey_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], at: int = 7) -> str:
    """``table`` with a column per passkey depth (``passkey_<d>``) inserted after the first ``at`` columns."""
    depths = sorted({k for r in rows for k in r if k.startswith("passkey_")})
    return table(rows, [*columns[:at], *[(k, k.replace("passkey_", "d="), ".0f") for k in depths], *columns[at:]])


def ppl_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The ``ppl_<text>`` keys the rows have (not their ratios), sorted."""
    return sorted({k for r in rows for k in r if k.startswith("ppl_") and not k.endswith("_x")})


def add_ppl_ratios(row: dict[str, Any], full: dict[str, Any]) -> None:
    """``ppl_<text>_x``: each perplexity of ``row`` over full attention's in the same run."""
    for key in ppl_keys([row]):
        row[key + "_x"] = row[key] / full[key]


def ppl_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Table columns: each text's perplexity and its ratio to full attention."""
    return [col for key in ppl_keys(rows) for col in ((key, f"ppl {key[4:]}", ".3f"), (key + "_x", "x full", ".3f"))]


def machine() -> str:
    import os
    import platform
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def held_out_texts(tokenizer: Any, tokens: int) -> dict[str, torch.Tensor]:
    """``tokens`` token ids of each held-out text: the bundled Gospel of John and, where present, the GPL-3."""
    from headsmith.corpus import EVAL_TEXT, tokenize
    texts = {"john": EVAL_TEXT.read_text()}
    if GPL3.exists():
        texts["gpl3"] = GPL3.read_text()
    return {k: tokenize(tokenizer, v, tokens) for k, v in texts.items()}
