"""The bundled public-domain texts and token batches cut from them (the calibration data every lossy pass,
``heal`` and the evaluation read; a base module, so passes need not reach into ``eval``).

- ``kjv_calibration.txt``: Genesis and Exodus (King James Version, from Debian's ``bible-kjv``), used
  for calibration, scoring and healing;
- ``kjv_eval.txt``: the Gospel of John, held out for evaluation (perplexity, KL, agreement).

``scripts/make_texts.py`` regenerates both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import HeadsmithError

if TYPE_CHECKING:
    from .program import Program

DATA = Path(__file__).resolve().parent / "data"
CALIBRATION_TEXT = DATA / "kjv_calibration.txt"
EVAL_TEXT = DATA / "kjv_eval.txt"


def read_text(path: Path | None, default: Path) -> str:
    p = default if path is None else Path(path)
    if not p.exists():
        raise HeadsmithError(f"text file not found: {p}", "pass an existing UTF-8 text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise HeadsmithError(f"text file {p} is empty", "pass a file with some text in it")
    return text


def tokenize(tokenizer: object, text: str, n_tokens: int | None = None) -> Tensor:
    """Token ids ``[N]`` of ``text`` (no special tokens except a leading BOS where the model uses one)."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [bos, *ids]
    if n_tokens is not None:
        ids = ids[:n_tokens]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_batches(program: Program, n_tokens: int, path: Path | None = None, seq_len: int = 256,
                        seed: int = 0) -> Tensor:
    """``[n_tokens // seq_len, seq_len]`` ids of the calibration text (seeded random ids without a tokenizer)."""
    seq_len = min(seq_len, program.info.max_positions or seq_len)
    rows = max(1, n_tokens // seq_len)
    if program.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, program.info.vocab_size, (rows, seq_len), generator=g)
    ids = tokenize(program.tokenizer, read_text(path, CALIBRATION_TEXT), rows * seq_len)
    rows = max(1, ids.numel() // seq_len)
    return ids[: rows * seq_len].reshape(rows, seq_len)
