"""``generate``: batched generation on any engine, greedy or seeded sampling, with streaming.

Prompts of different lengths are left-padded (padding keys are masked, positions count only real tokens,
as in HF). Sampling applies temperature, then top-k, then top-p (nucleus) filtering, and draws with a
``torch.Generator`` seeded by ``seed``, so a seeded run is reproducible. A row stops at one of its stop
tokens (the model's EOS by default) or after ``max_new_tokens``; ``stream(row, token_id)`` is called for
every token as soon as it is chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import HeadsmithError
from .engine import Engine
from .eviction import evictor_for


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: all)."""
    seed: int | None = None
    stop_tokens: tuple[int, ...] | None = None
    """None: the model's EOS tokens. An empty tuple: never stop early."""
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise HeadsmithError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise HeadsmithError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise HeadsmithError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise HeadsmithError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """The new tokens of each row (stop token included when one was hit)."""
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        n = sum(len(t) for t in self.tokens) - len(self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids[B,S], mask[B,S])`` with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HeadsmithError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.int64)
        mask[i, width - len(p):] = 1
    return ids, mask


def distribution(logits: Tensor, config: GenerationConfig) -> Tensor:
    """The sampling distribution ``[B, V]`` of last-position logits: temperature, then top-k, then top-p."""
    scores = logits.float() / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        cumulative = probs.cumsum(-1)
        drop = cumulative - probs > config.top_p  # keep the token that crosses p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return torch.softmax(scores, dim=-1)


def choose(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Next token per row from last-position logits ``[B, V]``."""
    if config.temperature == 0.0:
        return logits.argmax(-1)
    return torch.multinomial(distribution(logits, config), 1, generator=generator).squeeze(-1)


def prepare(engine: Engine, prompts: Sequence[Sequence[int]], config: GenerationConfig, pad_id: int | None
            ) -> tuple[set[int], int, Tensor, Tensor, Tensor, torch.Generator | None]:
    """What a generation loop starts from: stop tokens, pad id, left-padded ``ids`` / ``mask``, positions (real
    tokens only) and the seeded generator; refuses encoders."""
    info = engine.info
    if info.task != "causal-lm":
        raise HeadsmithError(f"{info.architecture} is an encoder: it cannot generate text",
                             "use `headsmith eval` for encoders")
    stops = set(info.eos_token_ids if config.stop_tokens is None else config.stop_tokens)
    pad = pad_id if pad_id is not None else (info.pad_token_id if info.pad_token_id is not None else 0)
    ids, mask = pad_left(prompts, pad)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    return stops, pad, ids, mask, positions, generator


def generate(engine: Engine, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
             stream: Callable[[int, int], None] | None = None, pad_id: int | None = None,
             draft: Any = None, k: int = 4, kv_policy: Any = None) -> GenerationResult:
    """Generate continuations of token-id ``prompts`` (see the module docstring). ``draft`` (a draft stored in the
    artifact, ``"ngram"``, ``"auto"`` or a :class:`~headsmith.runtime.speculative.Draft`): speculative decoding
    with ``k`` drafted tokens per step (adaptive), the same output as without it (greedy) or the same distribution
    (sampling). ``kv_policy``: the artifact's KV eviction (None), none (False), or other options for it (a
    :class:`~headsmith.kv_policy.KvPolicy`; see ``eviction.py``)."""
    config = config if config is not None else GenerationConfig()
    if draft is not None:
        from .speculative import speculative_generate  # it builds on this module's helpers
        return speculative_generate(engine, prompts, config, draft, k=k, stream=stream, pad_id=pad_id,
                                    kv_policy=kv_policy)
    evictor = evictor_for(engine, kv_policy)
    stops, pad, ids, mask, positions, generator = prepare(engine, prompts, config, pad_id)
    b = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    if config.max_new_tokens == 0:
        return GenerationResult(out, [len(p) for p in prompts], 0.0, 0.0, 0)
    start = time.perf_counter()
    logits, cache = engine.prefill(ids, mask, positions)
    if evictor is not None:
        mask = evictor.after_prefill(cache, mask)
    prefill_s = time.perf_counter() - start
    next_pos = positions[:, -1:] + 1
    steps = 0
    decode_start = time.perf_counter()
    while True:
        step_logits = logits[:, -1, :].clone()
        if len(out[0]) < config.min_new_tokens and stops:
            step_logits[:, sorted(stops)] = float("-inf")
        token = choose(step_logits, config, generator)
        for row in range(b):
            if done[row]:
                continue
            t = int(token[row])
            out[row].append(t)
            if stream is not None:
                stream(row, t)
            if t in stops or len(out[row]) >= config.max_new_tokens:
                done[row] = True
        if all(done):
            break
        feed = torch.tensor([[pad if done[r] else out[r][-1]] for r in range(b)], dtype=torch.int64)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], 1)
        logits, cache = engine.decode(feed, mask, next_pos, cache)
        if evictor is not None:
            mask = evictor.after_step(cache, mask, 1)
        next_pos = next_pos + 1
        steps += 1
    decode_s = time.perf_counter() - decode_start
    stats = {"kv": {**evictor.stats, "method": evictor.policy.method, "held": int(mask.shape[1])}} if evictor else {}
    return GenerationResult(out, [len(p) for p in prompts], prefill_s, decode_s, steps, stats)


def chat_prompt(tokenizer: Any, text: str, chat: bool | None = None) -> list[int]:
    """Token ids for ``text``, through the tokenizer's chat template when it has one (``chat=None``)."""
    template = getattr(tokenizer, "chat_template", None)
    if chat or (chat is None and template):
        if not template:
            raise HeadsmithError("this tokenizer has no chat template", "run without --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)
