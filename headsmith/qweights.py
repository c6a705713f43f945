"""Quantised weights: the packed block format, and the two ops that read it.

Letters: N output features (rows of a linear weight, or vocabulary entries of an embedding), K input
features (columns), G the block (group) size, nb = K / G blocks per row.

The format is the one onnxruntime's ``MatMulNBits`` / ``GatherBlockQuantized`` read, so the ONNX lowering
passes the tensors through unchanged, and it is stored as is in ``weights.safetensors`` (uint8 and float32
tensors; nothing is dequantised on disk or in memory):

- ``packed_NBP`` uint8 ``[N, nb, G*bits/8]``: for ``bits == 8`` one byte per weight; for ``bits == 4`` byte
  ``j`` of a block holds weight ``2j`` in its low nibble and ``2j+1`` in its high nibble;
- ``scales_NB`` float32 ``[N, nb]``: one scale per block;
- ``zeros_NZ`` uint8 ``[N, ceil(nb*bits/8)]`` or absent: the blocks' zero points, packed like the codes (for 4 bits
  two per byte, low nibble first, the last high nibble unused when ``nb`` is odd); absent means the symmetric
  ``2**(bits-1)``;
- the weight is ``w[n, b*G + i] = (q[n, b, i] - z[n, b]) * s[n, b]``.

When ``G`` does not divide ``K`` the last block is padded with zero weights (``nb = ceil(K / G)``; MatMulNBits
pads the same way and takes ``K`` as an attribute), so any width quantises (MLA's latent projections have
widths like 24 or 200); the op reads ``K`` from its input.

A block of 32 4-bit weights with one fp32 scale is 4 + 4/32 = 5 bits per weight (llama.cpp's Q4_0, with an
fp16 scale, is 4.5); with zero points 5.25. Rows are independent, so concatenating two packed weights along N
is concatenating the linears' outputs (the ONNX backend's q/k/v and gate/up fusion relies on it).

Ops (``torch.ops.headsmith``; reference kernels dequantise and call the float op, so every program stays
runnable and checkable in torch):

- ``linear_q(x[..., K], packed, scales, zeros, bias, bits, group) -> y[..., N]`` = ``linear(x, W, bias)``;
- ``embedding_q(packed, scales, zeros, ids[...], bits, group) -> [..., K]`` = ``embedding(W, ids)``
  (a tied LM head and embedding read the same packed tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

BITS = (4, 8)


@dataclass(frozen=True)
class Packed:
    """A quantised ``[N, K]`` weight in the packed block format (see the module docstring)."""

    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group: int
    width: int
    """``K``, the input features (the blocks may cover a few more, zero-padded)."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.packed, self.scales, self.zeros, self.bits, self.group, dtype)[:, :self.width]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)


def check_format(bits: int, group: int) -> str | None:
    """Why ``bits``/``group`` do not make a valid block format (None: they do)."""
    if bits not in BITS:
        return f"{bits}-bit weights are not supported (choose {' or '.join(map(str, BITS))})"
    if group < 16 or group & (group - 1):
        return f"group {group} is not a power of two >= 16 (the block sizes onnxruntime's kernels take)"
    return None


def padded(w_NK: Tensor, group: int) -> Tensor:
    """``w`` as float32 with zero columns appended up to a multiple of ``group``."""
    w = w_NK.detach().float()
    extra = -w.shape[1] % group
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def pack(q_NK: Tensor, bits: int, group: int) -> Tensor:
    """Integer codes ``[N, K]`` in ``[0, 2**bits)`` -> ``packed_NBP`` uint8 ``[N, K/G, G*bits/8]``."""
    n, k = q_NK.shape
    q = q_NK.to(torch.uint8).reshape(n, k // group, group)
    if bits == 8:
        return q.contiguous()
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack(packed_NBP: Tensor, bits: int) -> Tensor:
    """``packed_NBP`` -> integer codes ``[N, nb, G]`` (uint8)."""
    if bits == 8:
        return packed_NBP
    low, high = packed_NBP & 0x0F, packed_NBP >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_zeros(z_NB: Tensor, bits: int) -> Tensor:
    """Zero points ``[N, nb]`` -> ``zeros_NZ`` (see the module docstring)."""
    z = z_NB.to(torch.uint8)
    if bits == 8:
        return z.contiguous()
    if z.shape[1] % 2:
        z = torch.cat([z, torch.zeros_like(z[:, :1])], 1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous()


def unpack_zeros(zeros_NZ: Tensor, bits: int, n_blocks: int) -> Tensor:
    """``zeros_NZ`` -> zero points ``[N, nb]`` (uint8)."""
    if bits == 8:
        return zeros_NZ
    return torch.stack([zeros_NZ & 0x0F, zeros_NZ >> 4], dim=-1).flatten(-2)[:, :n_blocks]


def dequantize(packed: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``[N, K]`` weight the packed tensors stand for."""
    q = unpack(packed, bits).to(dtype)
    nb = scales.shape[-1]
    z = unpack_zeros(zeros, bits, nb).to(dtype)[..., None] if zeros is not None else float(1 << (bits - 1))
    w = (q - z) * scales.to(dtype)[..., None]
    return w.reshape(w.shape[0], -1)


def quantize_rtn(w_NK: Tensor, bits: int, group: int, sym: bool = True, search: bool = False,
                 importance_K: Tensor | None = None) -> Packed:
    """Round-to-nearest per block. Symmetric: ``s = m / -2**(bits-1)`` with ``m`` the block's value of largest
    magnitude, so it lands exactly on the lowest code and the whole range ``[-2**(bits-1), 2**(bits-1))`` is
    used (llama.cpp's Q4_0 rule; for 8 bits ``s = max|w| / 127``, as Q8_0). Asymmetric: ``s = (max - min) /
    (2**bits - 1)`` and an integer zero point. ``search`` clips each block's range where that rounds better
    (:func:`searched_params`, weighted by ``importance_K``)."""
    w = padded(w_NK, group)
    if search:
        imp = padded(importance_K[None], group)[0] if importance_K is not None else None
        scales, zeros = searched_params(w, bits, group, sym, imp)
    else:
        scales, zeros = block_params(w, bits, group, sym)
    return make_packed(codes(w, scales, zeros, bits, group), scales, zeros, bits, group, int(w_NK.shape[1]))


def make_packed(q_NK: Tensor, scales: Tensor, zeros_NB: Tensor | None, bits: int, group: int, width: int) -> Packed:
    """A :class:`Packed` from integer codes ``[N, nb*G]`` (padded), scales ``[N, nb]`` and unpacked zero points
    ``[N, nb]``, for a weight with ``width`` input features."""
    zeros = pack_zeros(zeros_NB, bits) if zeros_NB is not None else None
    return Packed(pack(q_NK, bits, group), scales.float().contiguous(), zeros, bits, group, width)


def block_params(w_NK: Tensor, bits: int, group: int, sym: bool) -> tuple[Tensor, Tensor | None]:
    """RTN scales ``[N, nb]`` (float32) and zero points (``[N, nb]`` uint8, unpacked; None when symmetric) of a
    weight whose width is a multiple of ``group`` (see :func:`padded`)."""
    n, k = w_NK.shape
    w = w_NK.detach().float().reshape(n, k // group, group)
    top = (1 << bits) - 1
    if sym:
        if bits == 8:
            scales = w.abs().amax(-1) / 127.0
        else:
            idx = w.abs().argmax(-1, keepdim=True)
            scales = torch.gather(w, -1, idx).squeeze(-1) / -float(1 << (bits - 1))
        return torch.where(scales == 0, torch.ones_like(scales), scales), None
    lo, hi = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
    scales = (hi - lo) / top
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    zeros = torch.round(-lo / scales).clamp(0, top).to(torch.uint8)
    return scales, zeros


def searched_params(w_NK: Tensor, bits: int, group: int, sym: bool, importance_K: Tensor | None = None,
                    shrink: int = 20, lowest: float = 0.6) -> tuple[Tensor, Tensor | None]:
    """Block parameters with the range clipped per block where that lowers the block's rounding error
    ``sum_k imp_k (w_k - dq_k)^2``: the RTN range is shrunk by factors from 1 down to ``lowest`` (``shrink``
    steps) and each block keeps its best (GPTQ's ``mse`` grid, AWQ's clipping, weighted here by ``importance``,
    e.g. the inputs' mean square, so channels with large activations count more). ``w`` is padded (see
    :func:`padded`)."""
    n, k = w_NK.shape
    w = w_NK.detach().float()
    imp = importance_K.float().reshape(1, k // group, group) if importance_K is not None else None
    best_err: Tensor | None = None
    best_s, best_z = block_params(w, bits, group, sym)
    for i in range(shrink + 1):
        c = 1.0 - (1.0 - lowest) * i / shrink
        s_c, z_c = block_params(w * c, bits, group, sym)
        q = codes(w, s_c, z_c, bits, group).reshape(n, k // group, group).float()
        z = z_c.float()[..., None] if z_c is not None else float(1 << (bits - 1))
        err = ((q - z) * s_c[..., None] - w.reshape(n, k // group, group)).pow(2)
        err = (err * imp if imp is not None else err).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s_c, best_s)
        if best_z is not None and z_c is not None:
            best_z = torch.where(better, z_c, best_z)
    return best_s, best_z


def codes(w_NK: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group: int) -> Tensor:
    """Integer codes ``[N, K]`` (int64, clamped to ``[0, 2**bits)``) of ``w`` for the given block parameters
    (zero points unpacked, ``[N, nb]``)."""
    n, k = w_NK.shape
    w = w_NK.detach().float().reshape(n, k // group, group)
    z = zeros.float()[..., None] if zeros is not None else float(1 << (bits - 1))
    q = torch.round(w / scales[..., None]) + z
    return q.clamp(0, (1 << bits) - 1).to(torch.int64).reshape(n, k)


# ---- ops ----------------------------------------------------------------------------------------------

@torch.library.custom_op("headsmith::linear_q", mutates_args=())
def linear_q(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None, bits: int,
             group: int) -> Tensor:
    """``linear(x, dequantize(packed, scales, zeros), bias)`` (reference kernel; see the module docstring)."""
    w = dequantize(packed, scales, zeros, bits, group, x.dtype)[:, :x.shape[-1]]
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)


@linear_q.register_fake
def _linear_q_fake(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                   bits: int, group: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@torch.library.custom_op("headsmith::embedding_q", mutates_args=())
def embedding_q(packed: Tensor, scales: Tensor, zeros: Tensor | None, ids: Tensor, bits: int,
                group: int) -> Tensor:
    """``embedding(dequantize(packed, scales, zeros), ids)``, dequantising only the rows looked up (tables are
    not padded: ``quantize`` keeps a table whose width ``group`` does not divide in float)."""
    flat = ids.reshape(-1)
    rows = dequantize(packed[flat], scales[flat], zeros[flat] if zeros is not None else None, bits, group)
    return rows.reshape(*ids.shape, rows.shape[-1])


@embedding_q.register_fake
def _embedding_q_fake(packed: Tensor, scales: Tensor, zeros: Tensor | None, ids: Tensor, bits: int,
                      group: int) -> Tensor:
    return scales.new_empty((*ids.shape, scales.shape[1] * group))


LINEAR_Q = torch.ops.headsmith.linear_q.default
EMBEDDING_Q = torch.ops.headsmith.embedding_q.default
HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PackedArgs:
    """The packed-weight arguments of a ``linear_q`` or ``embedding_q`` node (``zeros`` may be None)."""

    packed: fx.Node
    scales: fx.Node
    zeros: fx.Node | None
    bits: int
    group: int


def packed_args(node: fx.Node) -> PackedArgs | None:
    """The packed-weight arguments of ``node`` if it is a ``linear_q`` / ``embedding_q`` call, else None."""
    if node.op != "call_function" or node.target not in (LINEAR_Q, EMBEDDING_Q):
        return None
    if node.target is LINEAR_Q:
        _, packed, scales, zeros, _, bits, group = node.args
    else:
        packed, scales, zeros, _, bits, group = node.args
    assert isinstance(packed, fx.Node) and isinstance(scales, fx.Node)
    return PackedArgs(packed, scales, zeros if isinstance(zeros, fx.Node) else None, int(bits), int(group))  # type: ignore[arg-type]


def is_quantized_weight_use(node: fx.Node) -> bool:
    """A ``linear_q`` / ``embedding_q`` call, or the cast of a stored 16-bit weight (``quantize(weights=bf16)``)."""
    if packed_args(node) is not None:
        return True
    if node.op != "call_function" or node.target is not torch.ops.aten._to_copy.default:
        return False
    src = node.args[0]
    val = src.meta.get("val") if isinstance(src, fx.Node) and src.op == "get_attr" else None
    return isinstance(val, Tensor) and val.dtype in HALF_DTYPES
