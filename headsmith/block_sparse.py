"""Block-sparse attention layouts: which key blocks a query block sees (the canonical op's ``blocks`` option).

Letters: ``b`` tokens per block, ``qb = p // b`` the block of a query at key index ``p``, ``kb = j // b`` the block
of key ``j``, ``d = qb - kb`` their distance in blocks. On top of causality, key ``j`` is visible to the query at
``p`` when any rule of the layout holds:

- ``local`` (both kinds): ``d < local``, the query's own block and the ``local - 1`` before it;
- ``sink`` (both kinds): ``kb < sink``, the first blocks (block-sized attention sinks);
- ``block`` (local + global + strided, the layout of Phi-3-small and onnxruntime's ``SparseAttention``):
  ``(kb + 1) % stride == 0``, every ``stride``-th block ("vertical stride"), whatever the distance;
- ``power`` (PowerAttention, Chen et al. 2025): ``d`` a power of two, so the blocks a query sees thin out
  exponentially with distance and ``L`` layers reach ``2^L`` blocks back.

The layout is encoded in the op as a string (``"power:64:1:1:0"``: kind, block, local, sink, stride), so every
backend reads the same integers: torch (:func:`visible`, and FlexAttention's block masks, which skip the blocks
no query of a tile sees), ONNX and TVM translate the three integer rules themselves.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

KINDS = ("block", "power")


@dataclass(frozen=True)
class BlockPattern:
    kind: str
    size: int
    """Tokens per block."""
    local: int = 1
    """Blocks of local attention, the query's own included (>= 1)."""
    sink: int = 1
    """First blocks every query sees."""
    stride: int = 0
    """``block``: every ``stride``-th block is visible from everywhere (0: none)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown block layout {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.size < 1 or self.local < 1 or self.sink < 0 or self.stride < 0:
            raise ValueError(f"block layout needs block >= 1, local >= 1 (the query's own block), sink_blocks >= 0 and "
                             f"stride >= 0; got block={self.size}, local={self.local}, sink_blocks={self.sink}, "
                             f"stride={self.stride}")
        if self.kind == "power" and self.stride:
            raise ValueError("stride is an option of the block layout, not of power")

    def encode(self) -> str:
        return f"{self.kind}:{self.size}:{self.local}:{self.sink}:{self.stride}"

    @staticmethod
    @functools.lru_cache(maxsize=64)  # every attention call decodes its option: parse each string once
    def decode(text: str) -> BlockPattern | None:
        """The layout of an op's ``blocks`` string ("" -> None)."""
        if not text:
            return None
        kind, *numbers = text.split(":")
        if len(numbers) != 4:
            raise ValueError(f"malformed block layout {text!r}; expected kind:block:local:sink:stride")
        size, local, sink, stride = (int(x) for x in numbers)
        return BlockPattern(kind, size, local, sink, stride)

    def describe(self) -> str:
        extra = f", every {self.stride}th" if self.stride else ""
        return f"{self.kind}/{self.size} (local {self.local}, sink {self.sink}{extra})"

    def density(self, tokens: int) -> float:
        """The fraction of the causal (query, key) block pairs visible at ``tokens`` tokens (the work a kernel
        that skips invisible blocks still does, relative to causal attention)."""
        n = -(-tokens // self.size)
        qb = torch.arange(n)[:, None]
        kb = torch.arange(n)[None]
        causal = kb <= qb
        return float((visible_blocks(self, qb, kb) & causal).sum() / causal.sum())


def visible_blocks(pattern: BlockPattern, qb: Tensor, kb: Tensor) -> Tensor:
    """Bool: key block ``kb`` is visible to query block ``qb`` (both int tensors, broadcast; causality apart)."""
    d = qb - kb
    ok = (d < pattern.local) | (kb < pattern.sink)
    if pattern.kind == "block" and pattern.stride > 0:
        ok = ok | ((kb + 1) % pattern.stride == 0)
    if pattern.kind == "power":
        ok = ok | ((d > 0) & ((d & (d - 1)) == 0))
    return ok


def visible(pattern: BlockPattern, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Bool: the key at index ``k_pos`` passes the layout for the query at ``q_pos`` (token indices)."""
    return visible_blocks(pattern, torch.div(q_pos, pattern.size, rounding_mode="floor"),
                          torch.div(k_pos, pattern.size, rounding_mode="floor"))


# --- FlexAttention: the torch engine's kernel that skips the invisible blocks --------------------------------

FLEX_MIN_TOKENS = 1024
"""Shorter prefills run the dense masked kernel: a handful of blocks leaves little to skip."""
_flex_broken = False


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def _causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return k <= q


def _tile(pattern: BlockPattern) -> int:
    """FlexAttention's tile: the largest of 128, 64, 32, 16 that divides the layout's block (0: none does)."""
    return next((t for t in (128, 64, 32, 16) if pattern.size % t == 0), 0)


@functools.lru_cache(maxsize=16)
def _block_mask(pattern: BlockPattern, tokens: int, tile: int, device: str):
    """The layout as FlexAttention's tile lists: a tile is either wholly visible or wholly hidden (the tile
    divides the layout's block), so only the diagonal tiles need the (causal) mask per element and the
    hidden ones are never computed."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-tokens // tile)
    qt, kt = torch.arange(n)[:, None], torch.arange(n)[None]
    per = pattern.size // tile
    shown = visible_blocks(pattern, qt // per, kt // per) & (kt <= qt)

    def lists(tiles: Tensor) -> tuple[Tensor, Tensor]:
        count = tiles.sum(-1).to(torch.int32)
        order = tiles.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return count[None, None].contiguous().to(device), order[None, None].contiguous().to(device)

    partial, full = lists(shown & (kt == qt)), lists(shown & (kt < qt))
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=tile, mask_mod=_causal, seq_lengths=(tokens, tokens))


def flex_prefill(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, scale: float) -> Tensor | None:
    """Causal block-sparse attention of a prefill (``Tq == Tk``, no padding, no softcap: its score_mod does not
    compile with dynamic shapes) with FlexAttention, whose tiles that no (query, key) pair of the layout touches
    are skipped. None where it does not apply (a short text, a block no tile of 16+ divides, or inductor failed
    once); the caller's dense masked kernel runs then."""
    global _flex_broken
    tokens = q.shape[2]
    tile = _tile(pattern)
    if _flex_broken or tokens < FLEX_MIN_TOKENS or not tile or q.requires_grad:
        return None
    try:
        return _compiled_flex()(q, k, v, block_mask=_block_mask(pattern, tokens, tile, str(q.device)),
                                scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    except Exception as exc:  # noqa: BLE001 - inductor needs a C++ compiler; the dense kernel gives the same result
        _flex_broken = True
        log.warning("FlexAttention failed (%s: %s); block-sparse prefill falls back to the dense masked kernel",
                    type(exc).__name__, str(exc).strip().splitlines()[0][:200])
        return None
