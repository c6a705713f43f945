"""ONNX translations of the quantised-weight ops (:mod:`headsmith.qweights`) as onnxruntime contrib ops.

Letters: N output features, K input features, G block size, nb = K / G, V vocabulary.

- ``linear_q`` -> ``com.microsoft.MatMulNBits(x, packed[N,nb,G*bits/8], scales[N,nb], zeros, , bias)``: the IR's
  packed format *is* MatMulNBits' (codes, scales and packed zero points pass through unchanged), so the
  initializers are the artifact's tensors byte for byte. ``accuracy_level`` picks the kernel: 0 dequantises
  to fp32 and is exact to float rounding; 4 quantises the activations to int8 per block and runs integer dot
  products (VNNI / AMX), several times faster at 8 bits on CPU (measured: docs/precision.md).
- ``embedding_q`` -> ``com.microsoft.GatherBlockQuantized`` on the packed codes seen as ``[V, nb, G*bits/8]``
  with one block per row of the last axis (scales ``[V, nb, 1]``), so a table tied to a ``MatMulNBits`` LM head
  reads the same initializer instead of a reshaped copy; the gathered ``[..., nb, G]`` rows are reshaped to
  ``[..., K]``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BackendError
from .onnx_contrib import contrib_opset

#: the accuracy level chosen by measurement (docs/precision.md): int8 compute is the fast CPU kernel at 4 and
#: 8 bits, and its effect on perplexity is within the noise of the weights' own rounding
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _static(value: Any, what: str) -> int:
    if not isinstance(value, int):
        raise BackendError(f"quantised weights need a static {what}")
    return value


def translations(accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[Any, Any]:
    """``custom_translation_table`` entries for ``linear_q`` and ``embedding_q``."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise BackendError(f"unknown MatMulNBits accuracy level {accuracy_level}",
                           f"choose one of {', '.join(map(str, ACCURACY_LEVELS))}")

    def linear_q(x: Any, packed: Any, scales: Any, zeros: Any = None, bias: Any = None, bits: int = 4,
                 group: int = 32) -> Any:
        n = _static(scales.shape[0], "output width")
        k = _static(x.shape[-1], "input width")  # may be less than the blocks cover (zero-padded last block)
        return contrib_opset().MatMulNBits(x, packed, scales, zeros, None, bias, K=k, N=n, bits=bits, block_size=group,
                                         accuracy_level=accuracy_level)

    def embedding_q(packed: Any, scales: Any, zeros: Any = None, ids: Any = None, bits: int = 4,
                    group: int = 32) -> Any:
        from onnxscript import opset20 as op
        nb = _static(scales.shape[1], "block count")
        scales3 = op.Unsqueeze(scales, op.Constant(value_ints=[-1]))
        zeros3 = None
        if zeros is not None:
            if bits == 4:  # [V, ceil(nb/2)] two per byte -> [V, nb]
                low = op.BitwiseAnd(zeros, op.Constant(value=_u8(0x0F)))
                high = op.BitShift(zeros, op.Constant(value=_u8(4)), direction="RIGHT")
                both = op.Reshape(op.Concat(op.Unsqueeze(low, op.Constant(value_ints=[-1])),
                                            op.Unsqueeze(high, op.Constant(value_ints=[-1])), axis=-1),
                                  op.Constant(value_ints=[0, -1]))
                zeros = op.Slice(both, op.Constant(value_ints=[0]), op.Constant(value_ints=[nb]),
                                 op.Constant(value_ints=[1]))
            zeros3 = op.Unsqueeze(zeros, op.Constant(value_ints=[-1]))
        rows = contrib_opset().GatherBlockQuantized(packed, ids, scales3, zeros3, gather_axis=0, quantize_axis=2,
                                                  block_size=group, bits=bits)
        out_shape = op.Concat(op.Shape(ids), op.Constant(value_ints=[nb * group]), axis=0)
        return op.Reshape(rows, out_shape)

    return {torch.ops.headsmith.linear_q.default: linear_q, torch.ops.headsmith.embedding_q.default: embedding_q}


def _u8(value: int) -> Any:
    import numpy as np
    import onnx
    return onnx.numpy_helper.from_array(np.array(value, dtype=np.uint8))
