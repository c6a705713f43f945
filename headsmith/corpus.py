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


# ---- passkey retrieval ------------------------------------------------------------------------------
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
"""The haystack of the passkey test (Mohtashami & Jaggi, 2023), repeated to length."""
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important info there.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer: object, n_tokens: int, depth: float, key: str,
                   filler: Tensor | None = None, instruction: bool = True, reserve: int = -1) -> tuple[Tensor, Tensor]:
    """``(prompt[N], answer[A])``: a passkey-retrieval prompt of ``n_tokens`` tokens with the
    needle ``The pass key is KEY. Remember it. KEY is the pass key.`` at ``depth`` (0: right after the task, 1:
    right before the question) of a haystack of ``filler`` ids (default: :data:`PASSKEY_FILLER` repeated), and
    the answer's ids (`` KEY``) the model should continue with. ``instruction``: open with the task's
    instruction (:data:`PASSKEY_TASK`). ``reserve >= 0``: ``n_tokens`` also holds the answer and ``reserve`` more
    tokens (the prompt is ``n_tokens - A - reserve`` long)."""
    if not 0.0 <= depth <= 1.0:
        raise HeadsmithError(f"passkey depth must be in [0, 1], got {depth}", "0 puts the key first, 1 last")
    head = tokenize(tokenizer, PASSKEY_TASK if instruction else "")
    needle = torch.tensor(tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",  # type: ignore[operator]
                                    add_special_tokens=False)["input_ids"], dtype=torch.int64)
    question = torch.tensor(tokenizer(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"],  # type: ignore[operator]
                            dtype=torch.int64)
    answer = torch.tensor(tokenizer(f" {key}", add_special_tokens=False)["input_ids"], dtype=torch.int64)  # type: ignore[operator]
    if reserve >= 0:
        n_tokens -= answer.numel() + reserve
    room = n_tokens - head.numel() - needle.numel() - question.numel()
    if room < 1:
        raise HeadsmithError(f"a passkey prompt needs more than {n_tokens} tokens", "ask for a longer context")
    if filler is None:
        unit = torch.tensor(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"],  # type: ignore[operator]
                            dtype=torch.int64)
        filler = unit.repeat(room // unit.numel() + 1)
    if filler.numel() < room:
        raise HeadsmithError(f"the passkey haystack has {filler.numel()} tokens, {room} are needed",
                             "pass a longer filler text")
    hay = filler[:room]
    at = round(depth * room)
    return torch.cat([head, hay[:at], needle, hay[at:], question]), answer


def retrieval_samples(program: Program, n: int, length: int, seed: int = 0,
                      path: Path | None = None) -> tuple[Tensor, int]:
    """``(ids[n, length], answer_len)``: synthetic retrieval sequences that end in their answer (the rows the
    per-head calibrations distil on). With a tokenizer: passkey prompts (random 5-digit keys at evenly spread
    depths) whose haystack is the calibration text, followed by the key; without one: seeded random ids with a
    random 8-token needle at that depth, repeated at the end."""
    g = torch.Generator().manual_seed(seed)
    rows, answer_len = [], 8
    if program.tokenizer is None:
        for i in range(n):
            row = torch.randint(0, program.info.vocab_size, (length,), generator=g)
            at = int((length - 2 * answer_len) * (i + 0.5) / n)
            row[-answer_len:] = row[at:at + answer_len]
            rows.append(row)
        return torch.stack(rows), answer_len
    text = tokenize(program.tokenizer, read_text(path, CALIBRATION_TEXT))
    for i in range(n):
        key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
        start = int(torch.randint(0, max(1, text.numel() - length), (1,), generator=g))
        prompt, answer = passkey_prompt(program.tokenizer, length, (i + 0.5) / n, key, text[start:],
                                        instruction=False, reserve=0)
        rows.append(torch.cat([prompt, answer]))
        answer_len = min(answer_len, answer.numel())
    return torch.stack(rows), answer_len
