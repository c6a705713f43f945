"""Token merging (ToMe, Bolya et al., 2023): the bipartite soft matching that ``passes/token_merge.py`` inserts.

Letters: B batch, T tokens before the merge, N tokens of the input, E width, C the metric's width (a head dim).

One merge step removes ``r`` tokens from ``x[B,T,E]``:

1. split the tokens alternately into A (even positions) and B (odd), so each token's neighbours are in the
   other set; score every A token against every B token by the cosine similarity of a metric: ToMe's is the
   layer's keys averaged over heads, the default here the hidden states being merged (``passes/token_merge.py``);
2. each A token picks its most similar B token; the ``r`` A tokens with the best matches are *merged* into
   theirs, the other A tokens stay;
3. a merged token is the size-weighted average of what it absorbed (``size``: how many input tokens it stands
   for), so merging is associative and a token of size 3 weighs three times one of size 1.

The attention after a merge is *proportional*: a key that stands for ``s`` tokens gets ``log s`` added to its
logits (``headsmith.attention``'s ``key_bias``), so it receives the attention its ``s`` tokens would have.

Padding is size 0: a padding token in A is merged first (it is free: it adds nothing to its destination), a B
token of size 0 is never a destination, and keys of size 0 stay masked. ``origin[B,N]`` keeps, for every input
token, the slot that now holds it, so :func:`unmerge` can give each input position its merged token's value and
the output keeps its shape ``[B,N,E]`` (a mean pool over it is the size-weighted mean of the merged tokens).

Every shape depends on the length only, never on the data, so the exported graphs have one static shape per step:
they are exported for one input length (:attr:`MergeSchedule.length`), and inputs are right-padded to it
(:func:`pad_inputs`) by the program and by the engines alike. Padding is size 0, so the first merges remove it
for free: an input shorter than the length loses fewer of its own tokens. (A dynamic length would need even
lengths, ``2 * Dim``, which torch.export's decomposition pass specialises to the example's value.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["MergeSchedule", "bipartite_merge", "engine_call", "initial_state", "key_metric", "pad_inputs", "size_bias",
           "unmerge"]

_BIG = 1e4  # beyond any cosine: padding sources first, protected tokens never


@dataclass(frozen=True)
class MergeSchedule:
    """Where and how much a program merges (recorded in ``Program.token_merge`` and the manifest)."""

    r: int
    """Tokens merged away after each merging layer's attention (even)."""
    layers: tuple[int, ...]
    """The merging layers, ascending."""
    protect: int = 1
    """Leading tokens never merged away (a [CLS] token)."""
    metric: str = "hidden"
    """What similarity is measured on: ``hidden`` (the states being merged) or ``keys`` (ToMe's)."""
    length: int = 512
    """The input length the program runs at (inputs are padded to it; longer ones are refused)."""

    @property
    def min_tokens(self) -> int:
        """The shortest length every step can merge ``r`` tokens of: the last step still needs ``r`` unprotected
        tokens in each half."""
        return (len(self.layers) + 1) * self.r + 2 * ((self.protect + 1) // 2)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "layers": list(self.layers)}


def pad_inputs(input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, length: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad the three inputs to ``length`` tokens (mask 0, so size 0)."""
    t = input_ids.shape[1]
    if t > length:
        raise ValueError(f"the input has {t} tokens; this token-merge program runs at {length} at most "
                         "(truncate the input, or apply token-merge with a larger length=)")
    extra = length - t
    if extra == 0:
        return input_ids, position_ids, attention_mask
    pad = torch.nn.functional.pad
    last = position_ids[:, -1:].expand(-1, extra)  # any valid position: padding is never attended
    return pad(input_ids, (0, extra)), torch.cat([position_ids, last], dim=1), pad(attention_mask, (0, extra))


def engine_call(record: dict[str, object] | None, run: Callable[[Tensor, Tensor, Tensor], Tensor],
                input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """``run(ids, mask, pos)`` of an exported graph, with the inputs padded to the length of the manifest's
    ``token_merge`` record (none: called as is) and the padded rows dropped from its ``[B,T,...]`` output."""
    if not record:
        return run(input_ids, attention_mask, position_ids)
    t = input_ids.shape[1]
    ids, pos, mask = pad_inputs(input_ids, position_ids, attention_mask, int(record["length"]))  # type: ignore[call-overload]
    return run(ids, mask, pos)[:, :t]


def initial_state(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``sizes[B,N]`` (1 per token, 0 per padding) and ``origin[B,N]`` (every token in its own slot)."""
    sizes = (attention_mask != 0).to(torch.float32)
    origin = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand(attention_mask.shape[0], -1)
    return sizes, origin


def size_bias(sizes: Tensor) -> tuple[Tensor, Tensor]:
    """The attention's ``key_mask`` (size > 0) and ``key_bias`` (``log size``; 0 on the masked keys)."""
    return sizes > 0, torch.log(sizes.clamp_min(1.0))


def key_metric(keys: Tensor) -> Tensor:
    """ToMe's metric: the attention's keys ``[B,H,T,C]`` averaged over heads -> ``[B,T,C]``."""
    return keys.mean(dim=1)


def bipartite_merge(x: Tensor, metric: Tensor, sizes: Tensor, origin: Tensor, r: int, protect: int = 1
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """One ToMe step (see the module docstring): ``x[B,T,E]``, ``metric[B,T,C]`` (what similarity is measured on),
    ``sizes[B,T]`` (float), ``origin[B,N]`` (int64) -> merged ``x[B,T-r,E]``, ``sizes[B,T-r]``, ``origin[B,N]``.
    The first ``protect`` tokens are never merged away; ``T`` is even and at least ``2 (r + ceil(protect / 2))``."""
    t, n = x.shape[1], r
    if t % 2 or t < 2 * (r + (protect + 1) // 2):
        raise ValueError(f"bipartite_merge: {t} tokens cannot lose {r} (an even length of at least "
                         "2 (r + ceil(protect / 2)) can)")
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m_a, m_b = m[:, ::2], m[:, 1::2]
    s_a, s_b = sizes[:, ::2], sizes[:, 1::2]
    ta, tb = m_a.shape[1], m_b.shape[1]
    scores = torch.matmul(m_a, m_b.transpose(1, 2))  # [B,Ta,Tb]
    scores = torch.where(s_b[:, None, :] > 0, scores, -_BIG)  # a padding token is never a destination
    best, dst_of = scores.max(dim=-1)  # [B,Ta]
    a_pos = torch.arange(ta, device=x.device)
    best = torch.where(s_a > 0, best, _BIG - a_pos.to(best.dtype))  # padding sources first, in a fixed order
    best = torch.where(a_pos[None, :] < (protect + 1) // 2, -2 * _BIG, best)
    order = torch.topk(best, ta, dim=-1).indices  # best matches first (ONNX TopK; a sort has no ONNX form)
    src, kept = order[:, :n], order[:, n:]  # [B,n], [B,Ta-n]
    dst = dst_of.gather(1, src)

    def rows(v: Tensor, index: Tensor) -> Tensor:
        return v.gather(1, index[..., None].expand(-1, -1, v.shape[-1]))

    w_a, w_b = x[:, ::2] * s_a[..., None], x[:, 1::2] * s_b[..., None]  # size-weighted sums
    w_b = w_b.scatter_add(1, dst[..., None].expand(-1, -1, x.shape[-1]), rows(w_a, src))
    s_b = s_b.scatter_add(1, dst, s_a.gather(1, src))
    new_sizes = torch.cat([s_a.gather(1, kept), s_b], dim=1)
    new_x = (torch.cat([rows(w_a, kept), w_b], dim=1) / new_sizes.clamp_min(1.0)[..., None]).to(x.dtype)

    # the new slot of every current token: kept A tokens first, then the B tokens (merged sources join theirs)
    n_kept = ta - n
    batch = x.shape[0]
    slot_a = torch.zeros(batch, ta, dtype=origin.dtype, device=x.device)
    slot_a = slot_a.scatter(1, kept, torch.arange(n_kept, device=x.device).expand(batch, -1))
    slot_a = slot_a.scatter(1, src, n_kept + dst)
    slot_b = (n_kept + torch.arange(tb, device=x.device)).expand(batch, -1)
    slot = torch.zeros(batch, t, dtype=origin.dtype, device=x.device)
    slot = slot.scatter(1, (2 * a_pos).expand(batch, -1), slot_a)
    slot = slot.scatter(1, (2 * torch.arange(tb, device=x.device) + 1).expand(batch, -1), slot_b)
    return new_x, new_sizes, slot.gather(1, origin)


def unmerge(x: Tensor, origin: Tensor, length: int) -> Tensor:
    """``x[B,T,E]`` merged tokens -> ``[B,length,E]``: every input token gets the value of the token that holds it
    (the padding :func:`pad_inputs` added is dropped)."""
    return x.gather(1, origin[..., None].expand(-1, -1, x.shape[-1]))[:, :length]
