"""Passkey retrieval (Mohtashami & Jaggi, 2023): can the model find a 5-digit key hidden in a long haystack?

Each prompt (``corpus.passkey_prompt``) is the task's instruction, filler text (``The grass is green. The sky
is blue. ...`` repeated), the needle ``The pass key is KEY. Remember it. KEY is the pass key.`` at a relative
``depth`` of the filler, and the question ``What is the pass key? The pass key is``. The model answers greedily;
a trial passes when the first number it writes is the key. A context of ``N`` tokens holds the prompt and the
answer (the prompt is ``N`` minus the answer's tokens minus 2 long), so nothing runs past the model's positions.
Every depth is reported, not only the mean: sparse patterns fail at some depths and not others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..corpus import passkey_prompt

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

Generate = Callable[[list[int], int], list[int]]
"""``(prompt ids, new tokens) -> generated ids`` (greedy)."""


def passkey(generate: Generate, tokenizer: Any, contexts: Sequence[int], depths: Sequence[float] = DEPTHS,
            trials: int = 1, seed: int = 0) -> dict[str, Any]:
    """Accuracy per context and depth: ``{"contexts": {N: {"depths": {d: acc}, "mean": acc}}, "mean": acc,
    "answers": [...]}`` (every trial's prompt length, depth, key and decoded answer)."""
    g = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {"contexts": {}, "answers": []}
    hits_all: list[float] = []
    for n in contexts:
        per_depth: dict[str, float] = {}
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
                prompt, answer = passkey_prompt(tokenizer, n, depth, key, reserve=2)
                out = generate(prompt.tolist(), answer.numel() + 2)
                text = tokenizer.decode(out, skip_special_tokens=True)
                found = re.search(r"\d+", text)
                ok = found is not None and found.group(0) == key
                hits += ok
                result["answers"].append({"context": n, "depth": depth, "key": key, "answer": text.strip(),
                                          "prompt_tokens": int(prompt.numel()), "ok": bool(ok)})
            per_depth[f"{depth:g}"] = hits / trials
            hits_all.append(hits / trials)
        result["contexts"][str(n)] = {"depths": per_depth, "mean": sum(per_depth.values()) / len(per_depth)}
    result["mean"] = sum(hits_all) / max(1, len(hits_all))
    return result
