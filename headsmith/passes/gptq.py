"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022): quantise a linear layer column by column, feeding each
column's rounding error forward into the columns not yet quantised, so the layer's output error on the
calibration inputs is (approximately) minimised instead of the weights' own error. Used by
``quantize(method=gptq)``.

Letters: N output features, K input features, T calibration tokens, G group size, B lazy-update block.

For a layer ``y = x W^T`` with calibration inputs ``X[T,K]``, the output error of a perturbed weight is
``||X (W - Q)^T||^2``, a quadratic form in each row of ``W`` with Hessian ``H = 2 X^T X`` (the same for every
row, so all N rows are processed at once). Quantising column ``j`` to ``q_j`` and re-solving the remaining
columns optimally updates them by the Optimal Brain Surgeon step

    W[:, j+1:] -= (w_j - q_j) / [H^-1]_jj  *  [H^-1]_j,j+1:

taken with the Cholesky factor of ``H^-1`` (numerically stable, and the rows of the factor are exactly the
``[H^-1]_j,j:`` of the successively reduced inverses). Updates are applied lazily per block of ``B`` columns
(the errors of a block are pushed to the rest of the matrix in one matmul). ``H`` is damped by ``1%`` of its
mean diagonal; channels that never fire (zero diagonal) get weight 0. Each group's scale (and zero point) is
chosen by round-to-nearest on the *updated* weights of the group when its first column is reached, so the
result is in the same block format as RTN and every engine runs it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from ..fxutil import record_values
from ..program import Program
from ..qweights import Packed, block_params, codes, make_packed, padded, searched_params
from .calib import batches

DAMP = 0.01
BLOCK = 128


def hessians(program: Program, linears: list[fx.Node], ids: Tensor, rows: int = 2) -> dict[fx.Node, Tensor]:
    """``X^T X`` (float64 ``[K,K]``, summed over calibration tokens) for the input node of each linear; linears
    that share an input (q/k/v, gate/up) share one."""
    inputs = {n.args[0] for n in linears if isinstance(n.args[0], fx.Node)}
    out: dict[fx.Node, Tensor] = {}
    names = program.placeholder_names()
    for batch in batches(program, ids, rows):
        with torch.no_grad():
            values = record_values(program.gm, dict(zip(names, batch)), lambda n: n in inputs)
        for node, x in values.items():
            x2 = x.reshape(-1, x.shape[-1]).double()
            h = x2.T @ x2
            out[node] = out[node] + h if node in out else h
    return out


def gptq(w_NK: Tensor, xtx_KK: Tensor, bits: int, group: int, sym: bool, damp: float = DAMP,
         block: int = BLOCK, clip: bool = False, act_order: bool = False) -> Packed:
    """The GPTQ-quantised ``w_NK`` given ``X^T X`` of its inputs (see the module docstring). ``clip`` chooses each
    group's range by the weighted clipping search of :func:`qweights.searched_params` (weights: ``diag(H)``).
    ``act_order`` quantises the columns in order of decreasing ``diag(H)`` (the inputs with most energy first,
    while the most columns are left to absorb their error); the groups stay the contiguous blocks of the format,
    so their ranges are fixed up front from the original weights ("static groups")."""
    width = int(w_NK.shape[1])
    w = padded(w_NK, group).double()  # zero-padded columns are dead channels below: they stay 0
    n, k = w.shape
    h = torch.zeros(k, k, dtype=torch.float64)
    h[:width, :width] = xtx_KK.double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = torch.diagonal(h).float().clone()

    def group_params(cols: Tensor, imp: Tensor) -> tuple[Tensor, Tensor | None]:
        return searched_params(cols, bits, group, sym, imp) if clip else block_params(cols, bits, group, sym)

    scales = torch.zeros(n, k // group)
    zeros = torch.zeros(n, k // group, dtype=torch.uint8) if not sym else None
    order = torch.arange(k)
    if act_order:
        s_all, z_all = group_params(w.float(), importance)
        scales.copy_(s_all)
        if zeros is not None and z_all is not None:
            zeros.copy_(z_all)
        order = torch.argsort(importance, descending=True)
        w, h = w[:, order], h[order][:, order]
    h += torch.eye(k, dtype=h.dtype) * damp * torch.diagonal(h).mean()
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_NK = torch.zeros(n, k, dtype=torch.int64)
    block = max(group, block - block % group)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(order[i1 + i])  # the column of the weight being quantised
            b = col // group
            if not act_order and col % group == 0:  # the group starts here: its range from the updated weights
                s, z = group_params(w1[:, i:i + group].float(), importance[col:col + group])
                scales[:, b] = s[:, 0]
                if zeros is not None and z is not None:
                    zeros[:, b] = z[:, 0]
            s_b = scales[:, b:b + 1]
            z_b = zeros[:, b:b + 1] if zeros is not None else None
            q = codes(w1[:, i:i + 1].float(), s_b, z_b, bits, 1)
            zero = z_b.double() if z_b is not None else float(1 << (bits - 1))
            dq = (q.double() - zero) * s_b.double()
            q_NK[:, col] = q[:, 0]
            e = (w1[:, i] - dq[:, 0]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return make_packed(q_NK, scales, zeros, bits, group, width)
