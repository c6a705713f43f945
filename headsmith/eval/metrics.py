"""Quality metrics on real text: perplexity, agreement with the source model, embedding similarity.

Perplexity uses a sliding window (HF's recipe): windows of ``window`` tokens advanced by ``stride``, each
token scored once, with up to ``window - stride`` tokens of context before it. KL divergence
``KL(source || model)`` (nats per token) and top-1 agreement compare the next-token distributions of the
model and the source on the same windows. Encoders get the mean cosine similarity of mean-pooled sentence
embeddings against the source.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(input_ids, attention_mask, position_ids) -> logits`` (or hidden states)."""


@dataclass
class Windows:
    ids: Tensor
    window: int
    stride: int

    def __iter__(self):  # noqa: ANN204
        n = self.ids.numel()
        prev_end = 0
        for begin in range(0, max(n - 1, 1), self.stride):
            end = min(begin + self.window, n)
            score_from = max(prev_end, begin + 1)  # first target position scored in this window
            yield begin, end, score_from
            prev_end = end
            if end == n:
                break


def _positions(length: int) -> Tensor:
    return torch.arange(length).unsqueeze(0)


@torch.no_grad()
def perplexity(forward: Forward, ids: Tensor, window: int = 1024, stride: int | None = None,
               reference: Forward | None = None) -> dict[str, float]:
    """Perplexity of ``ids`` (1-D); with ``reference``, also KL(reference || model) and top-1 agreement."""
    stride = stride or max(1, window // 2)
    nll, count = 0.0, 0
    kl_sum, agree, ref_nll = 0.0, 0, 0.0
    for begin, end, score_from in Windows(ids, window, stride):
        chunk = ids[begin:end].unsqueeze(0)
        mask = torch.ones_like(chunk)
        pos = _positions(chunk.shape[1])
        logits = forward(chunk, mask, pos)[0].double()
        first = score_from - begin - 1  # logits at position p predict token p+1
        pred = logits[first:end - begin - 1]
        targets = ids[score_from:end]
        logp = torch.log_softmax(pred, -1)
        nll -= float(logp.gather(-1, targets.unsqueeze(-1)).sum())
        count += targets.numel()
        if reference is not None:
            ref = reference(chunk, mask, pos)[0].double()[first:end - begin - 1]
            ref_logp = torch.log_softmax(ref, -1)
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref.argmax(-1) == pred.argmax(-1)).sum())
            ref_nll -= float(ref_logp.gather(-1, targets.unsqueeze(-1)).sum())
    result = {"perplexity": math.exp(nll / max(count, 1)), "tokens": count}
    if reference is not None:
        result.update(kl=kl_sum / max(count, 1), top1_agreement=agree / max(count, 1),
                      source_perplexity=math.exp(ref_nll / max(count, 1)))
    return result


def sentences(text: str, limit: int) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.;:?!])\s+", text) if len(s.strip()) > 20]
    return parts[:limit]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def embeddings(forward: Forward, tokenizer: Any, texts: list[str], batch: int = 16, max_length: int = 256) -> Tensor:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids).contiguous()
        out.append(mean_pool(forward(ids, mask, pos), mask))
    return torch.cat(out)


def embedding_similarity(forward: Forward, reference: Forward, tokenizer: Any, texts: list[str],
                         max_length: int = 256) -> dict[str, float]:
    a = embeddings(forward, tokenizer, texts, max_length=max_length)
    b = embeddings(reference, tokenizer, texts, max_length=max_length)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "similarity_spearman": similarity_spearman(a, b), "sentences": len(texts)}


def similarity_spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation between the pairwise cosine similarities of embeddings ``a[N,E]`` and ``b[N,E]``
    (every pair once): 1 when ``b`` ranks every pair of texts as ``a`` does, which is what retrieval needs."""
    def pairs(e: Tensor) -> Tensor:
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        return (e @ e.T)[i, j]

    def ranks(x: Tensor) -> Tensor:  # average ranks of ties
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=x.dtype)
        values, inverse = torch.unique(x, return_inverse=True)
        mean = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, r)
        return mean[inverse] / torch.bincount(inverse).to(x.dtype)

    x, y = pairs(a), pairs(b)
    if len(x) < 2:
        return float("nan")
    return float(torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1])


def hf_forward(model: torch.nn.Module, task: str) -> Forward:
    """A ``Forward`` over a Hugging Face model (the source, for comparisons)."""
    def run(ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        return out.last_hidden_state if task == "encoder" else out.logits
    return run
