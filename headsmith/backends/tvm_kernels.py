"""Hand-scheduled TIR kernels for the TVM backend (TVMScript, float32).

Letters: B batch, M rows (``B*T``), N output features, K input features, Hq query heads, Hkv key/value
heads, TQ query (new) tokens, TK key tokens (``P+TQ``), C cache capacity (``>= TK``), D head dim of q/k,
Dv head dim of v, NT output features per packed tile.

The kernels are written loop by loop rather than left to TVM's default CPU lowering (which emits
unscheduled scalar loops, 25-100x slower than torch on this model class):

- :func:`matmul_packed` ``y[M,N] = x[M,K] @ w[N,K]^T`` with ``w`` pre-packed as ``w_p[N/NT, K, NT]``
  (each tile contiguous, so a decode step streams the weights once). Rows are register-blocked by
  ``MB`` (``MB x NT`` accumulators, vectorised over NT); the rows left over (all of them when M < MB,
  i.e. decoding) take a one-row loop. Parallel over tiles. fp32, fp16 or bf16 weights.
- :func:`matmul_q` the same over block-quantised weights (4 or 8 bits, one scale and zero point per block),
  the codes of a tile interleaved byte by byte so they widen into NT lanes at once.
- :func:`attention_cpu` the semantics of ``headsmith.attention`` (see ``headsmith/ops.py``): GQA by head
  sharing, queries aligned to the end of the keys, causal, sliding window with sinks, block-sparse layouts,
  key padding mask, softcap, scale, all-masked rows giving the mean of v. Scores are computed for the visible key range only,
  8 keys at a time (8 independent vector accumulators), then a vectorised exp pass and a weighted sum of
  v rows. With ``inplace`` the new keys/values are first written into the caller's cache buffers
  ``kc/vc[B,Hkv,C,D]`` at rows ``P..P+TQ`` and attention reads the cache (no concatenation copy).
- :func:`kv_write_gpu` the in-place cache write for CUDA targets (thread-bound loops).

Every buffer the kernels allocate has scope ``global``: TVM 0.27 lowers ``local`` allocations on CPU to
heap workspace calls, which keeps LLVM from holding accumulators in registers (2-3x slower); small
``global`` allocations become stack allocas.
"""

from __future__ import annotations

from typing import Any

from tvm.script import tirx as T

from ..block_sparse import BlockPattern

NEG = -3.4028234663852886e38  # most negative float32, the masked score of headsmith.attention
KEY_BLOCK = 8  # keys whose dot products run together in the attention kernel
MB = 6  # rows per register block of the packed matmul
NT = 16  # output features per packed weight tile (two AVX2 vectors)


def _fast_exp(x: Any) -> Any:
    """``exp`` for float32 as vectorisable arithmetic (Cephes' polynomial, about 1 ulp)."""
    x = T.max(T.min(x, T.float32(88.3762626647949)), T.float32(-88.3762626647949))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) - n * T.float32(-2.12194440e-4)
    p = T.float32(1.9875691500e-4)
    p = p * r + T.float32(1.3981999507e-3)
    p = p * r + T.float32(8.3334519073e-3)
    p = p * r + T.float32(4.1665795894e-2)
    p = p * r + T.float32(1.6666665459e-1)
    p = p * r + T.float32(5.0000001201e-1)
    p = p * r * r + r + T.float32(1.0)
    return p * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


def _widen(value: Any, dtype: str) -> Any:
    """A weight element as float32 (16-bit floats are widened in registers)."""
    return value if dtype == "float32" else T.Cast("float32", value)


def matmul_packed(n: int, k: int, nt: int = NT, mb: int = MB, wdtype: str = "float32") -> Any:
    """``(x[M,K], w_p[N/NT,K,NT]) -> y[M,N]`` (``n`` a multiple of ``nt``); see the module docstring.
    ``wdtype`` ``float16`` or ``bfloat16`` reads 16-bit weights and widens them in registers, so a step streams
    half the bytes."""
    tiles = n // nt

    @T.prim_func(private=True)
    def matmul(x_h: T.handle, w: T.Buffer((tiles, k, nt), wdtype), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(x_h, (M, k), "float32")
        y = T.match_buffer(y_h, (M, n), "float32")
        for tile in T.parallel(tiles):
            for mo in range(M // mb):
                acc = T.alloc_buffer((mb, nt), "float32", scope="global")
                for i in T.unroll(mb):
                    for j in T.vectorized(nt):
                        acc[i, j] = T.float32(0)
                for kk in range(k):
                    for i in T.unroll(mb):
                        for j in T.vectorized(nt):
                            acc[i, j] = acc[i, j] + x[mo * mb + i, kk] * _widen(w[tile, kk, j], wdtype)
                for i in T.unroll(mb):
                    for j in T.vectorized(nt):
                        y[mo * mb + i, tile * nt + j] = acc[i, j]
            for m in range(M - (M // mb) * mb):
                row = T.alloc_buffer((nt,), "float32", scope="global")
                for j in T.vectorized(nt):
                    row[j] = T.float32(0)
                for kk in range(k):
                    for j in T.vectorized(nt):
                        row[j] = row[j] + x[(M // mb) * mb + m, kk] * _widen(w[tile, kk, j], wdtype)
                for j in T.vectorized(nt):
                    y[(M // mb) * mb + m, tile * nt + j] = row[j]

    return matmul


def matmul_q(n: int, k: int, bits: int, group: int, nt: int = NT, mb: int = MB) -> Any:
    """``(x[M,K], xsum[M,nb], codes[N/NT,L,NT], scales[N/NT,nb,NT], zero_scales[N/NT,nb,NT]) -> y[M,N]``: a
    linear over block-quantised weights (headsmith.qweights), dequantised in registers. ``codes`` holds byte
    ``l`` of every row of a tile side by side (``L = nb*G*bits/8``; for 4 bits the low nibble is input ``2l``,
    the high one ``2l+1``); ``zero_scales = zero * scale``; ``xsum`` the block sums of ``x``. Per block
    ``y += s * sum(q * x) - z*s * xsum``: the inner loop is one widening and one multiply-add per code. Inputs
    past ``K`` (a zero-padded last block) read as 0."""
    tiles = n // nt
    nb = -(-k // group)
    per = 8 // bits  # codes per byte
    gb = group // per  # bytes per block
    nbytes = nb * gb
    padded = k % group != 0

    def code(byte: Any, part: int) -> Any:
        if bits == 8:
            return T.Cast("float32", byte)
        return T.Cast("float32", T.bitwise_and(T.shift_right(byte, T.uint8(4 * part)), T.uint8(15)))

    def x_at(x: Any, row: Any, kk: Any) -> Any:
        if not padded:
            return x[row, kk]
        return T.if_then_else(kk < k, x[row, T.min(kk, k - 1)], T.float32(0))

    @T.macro
    def rows_block(x: T.Buffer, xsum: T.Buffer, wq: T.Buffer, sc: T.Buffer, zs: T.Buffer, y: T.Buffer,
                   tile: T.int64, row0: T.int64, r: T.int32):
        acc = T.alloc_buffer((r, nt), "float32", scope="global")
        blk = T.alloc_buffer((r, nt), "float32", scope="global")
        for i in T.unroll(r):
            for j in T.vectorized(nt):
                acc[i, j] = T.float32(0)
        for b in range(nb):
            for i in T.unroll(r):
                for j in T.vectorized(nt):
                    blk[i, j] = T.float32(0)
            for byte in range(gb):
                for p in T.unroll(per):
                    for i in T.unroll(r):
                        for j in T.vectorized(nt):
                            blk[i, j] = blk[i, j] + code(wq[tile, b * gb + byte, j], p) * x_at(
                                x, row0 + i, (b * gb + byte) * per + p)
            for i in T.unroll(r):
                for j in T.vectorized(nt):
                    acc[i, j] = acc[i, j] + sc[tile, b, j] * blk[i, j] - zs[tile, b, j] * xsum[row0 + i, b]
        for i in T.unroll(r):
            for j in T.vectorized(nt):
                y[row0 + i, tile * nt + j] = acc[i, j]

    @T.prim_func(private=True)
    def matmul(x_h: T.handle, xs_h: T.handle, wq: T.Buffer((tiles, nbytes, nt), "uint8"),
               sc: T.Buffer((tiles, nb, nt), "float32"), zs: T.Buffer((tiles, nb, nt), "float32"), y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        M = T.int64()
        x = T.match_buffer(x_h, (M, k), "float32")
        xsum = T.match_buffer(xs_h, (M, nb), "float32")
        y = T.match_buffer(y_h, (M, n), "float32")
        for tile in T.parallel(tiles):
            for mo in range(M // mb):
                rows_block(x, xsum, wq, sc, zs, y, tile, mo * mb, mb)
            for m in range(M - (M // mb) * mb):
                rows_block(x, xsum, wq, sc, zs, y, tile, (M // mb) * mb + m, 1)

    return matmul


def block_visible(pattern: BlockPattern | None, qpos: Any, j: Any) -> Any:
    """The rules of a block-sparse layout (:mod:`headsmith.block_sparse`) as a TIR condition (True: no layout)."""
    if pattern is None:
        return True
    qb, kb = T.floordiv(qpos, pattern.size), T.floordiv(j, pattern.size)
    ok = T.Or(qb - kb < pattern.local, kb < pattern.sink)
    if pattern.kind == "block" and pattern.stride > 0:
        ok = T.Or(ok, T.floormod(kb + 1, pattern.stride) == 0)
    if pattern.kind == "power":
        ok = T.Or(ok, T.And(qb - kb > 0, T.bitwise_and(qb - kb, qb - kb - 1) == 0))
    return ok


def attention_cpu(hq: int, hkv: int, d: int, dv: int, causal: bool, window: int, sinks: int, softcap: float,
                  scale: float, has_mask: bool, inplace: bool, blocks: str = "") -> Any:
    """``(q, k, v, kc, vc, mask) -> (out[B,Hq,TQ,Dv], scratch[B*Hq, TK+8])`` for ``call_tir(_inplace)``.

    ``q[B,Hq,TQ,D]``, ``k[B,Hkv,TQ,D]``, ``v[B,Hkv,TQ,Dv]``, ``mask[B,TK]`` (bool; read only when
    ``has_mask``). With ``inplace``, ``kc/vc[B,Hkv,C,D]`` are the caches (``C >= TK``; the first
    ``P = TK - TQ`` rows hold the past) and receive k/v at rows ``P..TK``; otherwise pass k/v again as
    kc/vc (then ``TK == TQ``). ``scale`` is the final softmax scale (never 0 here). A block layout
    (``blocks``) masks the keys it hides; their scores are still computed (a dense kernel).
    """
    rep = hq // hkv
    lanes = 8 if d % 8 == 0 else 4 if d % 4 == 0 else 1
    use_cap = softcap > 0.0
    cap = softcap if use_cap else 1.0
    win = window
    snk = sinks if window > 0 else 0
    kb = KEY_BLOCK
    pattern = BlockPattern.decode(blocks)
    has_blocks = pattern is not None

    @T.prim_func(private=True)
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, kc_h: T.handle, vc_h: T.handle, m_h: T.handle,
                  o_h: T.handle, sc_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        TQ = T.int64()
        TK = T.int64()
        C = T.int64()
        q = T.match_buffer(q_h, (B, hq, TQ, d), "float32")
        k = T.match_buffer(k_h, (B, hkv, TQ, d), "float32")
        v = T.match_buffer(v_h, (B, hkv, TQ, dv), "float32")
        kc = T.match_buffer(kc_h, (B, hkv, C, d), "float32")
        vc = T.match_buffer(vc_h, (B, hkv, C, dv), "float32")
        mask = T.match_buffer(m_h, (B, TK), "bool")
        out = T.match_buffer(o_h, (B, hq, TQ, dv), "float32")
        sc = T.match_buffer(sc_h, (B * hq, TK + kb), "float32")
        P = T.meta_var(TK - TQ)
        assert C >= TK, "headsmith attention: the KV cache is shorter than the attention mask"
        assert TK >= TQ, "headsmith attention: the attention mask is shorter than the new tokens"
        if inplace:
            for bg in T.parallel(B * hkv):
                for t in range(TQ):
                    for x in T.vectorized(d):
                        kc[bg // hkv, bg % hkv, P + t, x] = k[bg // hkv, bg % hkv, t, x]
                    for x in T.vectorized(dv):
                        vc[bg // hkv, bg % hkv, P + t, x] = v[bg // hkv, bg % hkv, t, x]
        for bh in T.parallel(B * hq):
            qv = T.alloc_buffer((d,), "float32", scope="global")
            part = T.alloc_buffer((kb, lanes), "float32", scope="global")
            acc = T.alloc_buffer((dv,), "float32", scope="global")
            red = T.alloc_buffer((3,), "float32", scope="global")  # score, running max, sum
            b = T.meta_var(bh // hq)
            g = T.meta_var((bh % hq) // rep)
            for i in range(TQ):
                qpos = T.meta_var(i + P)
                hi = T.meta_var(T.min(qpos + 1, TK) if causal else TK)
                lo = T.meta_var(T.max(qpos - (win - 1), T.int64(0)) if win > 0 else T.int64(0))
                nsink = T.meta_var(T.min(T.int64(snk), lo))
                n = T.meta_var(nsink + (hi - lo))
                for x in T.vectorized(d):
                    qv[x] = q[b, bh % hq, i, x] * T.float32(scale)
                red[1] = T.float32(NEG)
                # scores of the visible range (sinks first, then lo..hi), KEY_BLOCK keys at a time
                for jb in range((n + kb - 1) // kb):
                    for kk in T.unroll(kb):
                        for l in T.vectorized(lanes):
                            part[kk, l] = T.float32(0)
                    for x0 in range(d // lanes):
                        for kk in T.unroll(kb):
                            for l in T.vectorized(lanes):
                                part[kk, l] = part[kk, l] + qv[x0 * lanes + l] * kc[
                                    b, g, T.if_then_else(T.min(jb * kb + kk, n - 1) < nsink,
                                                         T.min(jb * kb + kk, n - 1),
                                                         lo + T.min(jb * kb + kk, n - 1) - nsink), x0 * lanes + l]
                    for kk in T.unroll(kb):
                        key = T.meta_var(T.if_then_else(T.min(jb * kb + kk, n - 1) < nsink, T.min(jb * kb + kk, n - 1),
                                                        lo + T.min(jb * kb + kk, n - 1) - nsink))
                        red[0] = T.float32(0)
                        for l in T.unroll(lanes):
                            red[0] = red[0] + part[kk, l]
                        if use_cap:
                            red[0] = T.tanh(red[0] / T.float32(cap)) * T.float32(cap)
                        if has_mask and has_blocks:
                            red[0] = T.if_then_else(jb * kb + kk < n and mask[b, key] and block_visible(
                                pattern, qpos, key), red[0], T.float32(NEG))
                        elif has_mask:
                            red[0] = T.if_then_else(jb * kb + kk < n and mask[b, key], red[0], T.float32(NEG))
                        elif has_blocks:
                            red[0] = T.if_then_else(jb * kb + kk < n and block_visible(pattern, qpos, key),
                                                    red[0], T.float32(NEG))
                        else:
                            red[0] = T.if_then_else(jb * kb + kk < n, red[0], T.float32(NEG))
                        sc[bh, jb * kb + kk] = red[0]
                        red[1] = T.max(red[1], red[0])
                for x in T.vectorized(dv):
                    acc[x] = T.float32(0)
                if red[1] == T.float32(NEG):
                    # every key is masked: the reference softmax is uniform over all TK keys
                    for j in range(TK):
                        for x in T.vectorized(dv):
                            acc[x] = acc[x] + vc[b, g, j, x]
                    for x in T.vectorized(dv):
                        out[b, bh % hq, i, x] = acc[x] / T.Cast("float32", TK)
                else:
                    for jb in range((n + kb - 1) // kb):
                        for kk in T.vectorized(kb):
                            sc[bh, jb * kb + kk] = T.if_then_else(
                                sc[bh, jb * kb + kk] > T.float32(NEG), _fast_exp(sc[bh, jb * kb + kk] - red[1]),
                                T.float32(0))
                    red[2] = T.float32(0)
                    for jj in range(n):
                        red[2] = red[2] + sc[bh, jj]
                        for x in T.vectorized(dv):
                            acc[x] = acc[x] + sc[bh, jj] * vc[b, g, T.if_then_else(jj < nsink, jj, lo + jj - nsink), x]
                    for x in T.vectorized(dv):
                        out[b, bh % hq, i, x] = acc[x] / red[2]

    return attention


def kv_write_gpu(hkv: int, d: int, dv: int) -> Any:
    """``(k, v, kc, vc, mask)``: write ``k/v[B,Hkv,TQ,D]`` into ``kc/vc[B,Hkv,C,D]`` at rows ``TK-TQ..TK``
    (``TK`` from ``mask[B,TK]``), for ``call_tir_inplace`` on CUDA targets."""

    @T.prim_func(private=True)
    def kv_write(k_h: T.handle, v_h: T.handle, kc_h: T.handle, vc_h: T.handle, m_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        TQ = T.int64()
        TK = T.int64()
        C = T.int64()
        k = T.match_buffer(k_h, (B, hkv, TQ, d), "float32")
        v = T.match_buffer(v_h, (B, hkv, TQ, dv), "float32")
        kc = T.match_buffer(kc_h, (B, hkv, C, d), "float32")
        vc = T.match_buffer(vc_h, (B, hkv, C, dv), "float32")
        mask = T.match_buffer(m_h, (B, TK), "bool")
        for bgt in T.thread_binding(B * hkv * TQ, thread="blockIdx.x"):
            for x in T.thread_binding(T.max(d, dv), thread="threadIdx.x"):
                if x < d:
                    kc[bgt // (hkv * TQ), (bgt // TQ) % hkv, TK - TQ + bgt % TQ, x] = k[
                        bgt // (hkv * TQ), (bgt // TQ) % hkv, bgt % TQ, x]
                if x < dv:
                    vc[bgt // (hkv * TQ), (bgt // TQ) % hkv, TK - TQ + bgt % TQ, x] = v[
                        bgt // (hkv * TQ), (bgt // TQ) % hkv, bgt % TQ, x]

    return kv_write
