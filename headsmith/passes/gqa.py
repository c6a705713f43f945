"""``gqa(kv_heads=N, method=...)``: merge key/value heads (MHA -> GQA/MQA, or GQA -> fewer KV heads). Lossy.

Letters: E model width, d head dim, N calibration tokens, G old KV heads, m = G / kv_heads old heads per new
head. Each new KV head replaces a *group* of m old ones; the query heads of the group share it (GQA's layout:
query head h reads KV head h // (H / kv_heads)), so query heads are regrouped and ``q``/``o`` permuted to match.

Methods:

- ``mean``: the GQA paper's baseline. Contiguous groups; the new K/V projections are the mean of the group's.
- ``fit`` (default): calibration-aware and exact where it can be.

  * grouping: old heads are grouped by how well they share a subspace on calibration activations
    (greedy, balanced), not by index;
  * keys: RoPE rotates each rotary pair (dims i, i + r/2) as one complex number, so a map folded into the
    query projection must act on every pair as a complex scalar. Per pair and group, the new key is the top
    complex singular vector of the group's keys weighted by the query energy in that pair
    (``k_g ≈ a_g · k'``); ``conj(a_g)`` is folded into the query projections of the group's query heads,
    which commutes with RoPE. Dims without RoPE get a weighted PCA of the group's keys, folded the same way;
  * values: a PCA of the group's values in the metric of the output projection (``Wo_hᵀ Wo_h`` of the heads
    that read them); the inverse map is folded into ``o_proj``;
  * ``refine`` steps of local fitting: each layer's new attention weights are trained (Adam) to reproduce
    the original layer's attention output on calibration activations, one layer at a time.

Precondition: the number of KV heads divides by ``kv_heads``; per-head key norms (qk-norm) are refused, since a
merged key cannot be normalised per old head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..errors import PassError
from ..fxutil import get_tensor, set_tensor
from ..program import Program
from ..sites import AttentionSite
from .base import Pass, PassContext, PassResult
from .calib import record, run_sublayer, sublayer, trainable


@dataclass(frozen=True)
class Gqa(Pass):
    """Merge KV heads to ``kv_heads`` per layer (mean pooling or a calibrated, RoPE-aware fit). Lossy."""

    name: ClassVar[str] = "gqa"
    head_layout: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    kv_heads: int = 1
    """KV heads per layer after the pass (must divide the current number)."""
    method: Literal["fit", "mean"] = "fit"
    """``fit``: grouping by similarity, RoPE-aware weighted fit, folded maps, local refinement; ``mean``: the
    GQA paper's mean pooling of contiguous groups."""
    refine: int = 0
    """Adam steps of per-layer output fitting after the closed-form fit (0: none; ``fit`` only)."""
    calibration_tokens: int = 4096
    """Calibration tokens used for the statistics and the refinement."""

    def __post_init__(self) -> None:
        if self.kv_heads < 1:
            raise ValueError(f"kv_heads must be >= 1, got {self.kv_heads}")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        sites = [s for s in new.sites() if s.n_kv_heads != self.kv_heads]
        for site in sites:
            self._check(site)
        if not sites:
            return PassResult(new, modified=False, count=0)
        ids = ctx.calibration(program)[: max(1, self.calibration_tokens // ctx.calibration(program).shape[1])]
        xs = record(new, [s.q.node.args[0] for s in sites], ids) if self.method == "fit" else []  # type: ignore[misc]
        report: dict[str, object] = {"method": self.method, "layers": {}}
        originals = {s.layer: s for s in program.sites()} if self.refine > 0 else {}
        for i, site in enumerate(sites):
            with ctx.at(site.node):
                x = xs[i].reshape(-1, xs[i].shape[-1]) if xs else None
                layer_report = self._convert(new, site, x, ctx)
                if self.method == "fit" and self.refine > 0:
                    layer_report["refine_rel_error"] = self._refine(program, originals[site.layer], new, site,
                                                                    xs[i], ids, ctx)
                report["layers"][site.layer] = layer_report  # type: ignore[index]
        new.gm.recompile()
        new._shapes = None  # head counts changed
        return PassResult(new, modified=True, count=len(sites), report=report)

    def _check(self, site: AttentionSite) -> None:
        if site.n_kv_heads % self.kv_heads != 0:
            raise PassError(f"layer {site.layer} has {site.n_kv_heads} KV heads, which does not divide into "
                            f"{self.kv_heads}", f"choose kv_heads among the divisors of {site.n_kv_heads}")
        if site.n_kv_heads < self.kv_heads:
            raise PassError(f"layer {site.layer} has {site.n_kv_heads} KV heads, fewer than {self.kv_heads}",
                            "gqa only merges heads")
        if site.qk_norm:
            raise PassError(f"layer {site.layer} normalises each key head (qk-norm): merged keys cannot keep "
                            "the per-head norm", "gqa supports models without per-head key norms")
        if site.head_dim != site.v_head_dim:
            raise PassError(f"layer {site.layer}: key and value head dims differ ({site.head_dim} vs "
                            f"{site.v_head_dim})")
        if site.o is None:
            raise PassError(f"layer {site.layer}: no output projection was found after attention")

    # ---- the closed-form conversion ----------------------------------------------------------------------
    def _convert(self, prog: Program, site: AttentionSite, x: Tensor | None, ctx: PassContext) -> dict[str, float]:
        gm = prog.gm
        d, g_old, h = site.head_dim, site.n_kv_heads, site.n_heads
        rep = h // g_old
        wq, wk, wv = (get_tensor(gm, p.weight).double() for p in (site.q, site.k, site.v))
        bq, bk, bv = (get_tensor(gm, p.bias).double() if p.bias is not None else None
                      for p in (site.q, site.k, site.v))
        assert site.o is not None
        wo = get_tensor(gm, site.o.weight).double()
        heads = lambda w, n: w.reshape(n, d, *w.shape[1:])  # noqa: E731  [n*d, ...] -> [n, d, ...]
        wq_h, wk_h, wv_h = heads(wq, h), heads(wk, g_old), heads(wv, g_old)
        bq_h = heads(bq, h) if bq is not None else None
        bk_h = heads(bk, g_old) if bk is not None else None
        bv_h = heads(bv, g_old) if bv is not None else None
        wo_h = wo.reshape(wo.shape[0], h, d).permute(1, 0, 2)  # [h, E, d]
        m = g_old // self.kv_heads
        if self.method == "mean":
            groups = [list(range(j * m, (j + 1) * m)) for j in range(self.kv_heads)]
            new_k = torch.stack([wk_h[g].mean(0) for g in groups])
            new_v = torch.stack([wv_h[g].mean(0) for g in groups])
            new_bk = torch.stack([bk_h[g].mean(0) for g in groups]) if bk_h is not None else None
            new_bv = torch.stack([bv_h[g].mean(0) for g in groups]) if bv_h is not None else None
            self._store(prog, site, wq_h, bq_h, new_k, new_bk, new_v, new_bv, wo_h, list(range(h)))
            return {}
        assert x is not None
        x = x.double()
        n = min(x.shape[0], 8192)
        x1 = torch.cat([x[:n], torch.ones(n, 1, dtype=x.dtype)], 1)  # bias as a last input column
        aug = lambda w, b: torch.cat([w, (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype))[:, None]], 1)  # noqa: E731
        q_cols = [aug(wq_h[i], bq_h[i] if bq_h is not None else None) for i in range(h)]
        k_cols = [aug(wk_h[g], bk_h[g] if bk_h is not None else None) for g in range(g_old)]
        v_cols = [aug(wv_h[g], bv_h[g] if bv_h is not None else None) for g in range(g_old)]
        cov = x1.T @ x1 / n  # E[x xᵀ] with the bias column: every second moment below is W cov Wᵀ
        q_energy = torch.stack([torch.diagonal(c @ cov @ c.T) for c in q_cols])  # [h, d]
        k_energy_w = torch.stack([q_energy[g * rep:(g + 1) * rep].sum(0) for g in range(g_old)])  # [G, d]
        if m == 1:
            groups = [[g] for g in range(g_old)]
        elif m == g_old:
            groups = [list(range(g_old))]
        else:
            groups = self._groups(k_cols, v_cols, cov, m)
        rope = site.rope.dims if site.rope is not None else 0
        new_k, new_v, q_maps, o_maps, errors = [], [], {}, {}, []
        for group in groups:
            kq, a_maps, err_k = _fit_keys([k_cols[g] for g in group], [k_energy_w[g] for g in group], cov, rope)
            metric = [sum(wo_h[i].T @ wo_h[i] for i in range(g * rep, (g + 1) * rep)) for g in group]
            vq, b_maps, err_v = _fit_values([v_cols[g] for g in group], metric, cov)
            new_k.append(kq)
            new_v.append(vq)
            errors.append((err_k, err_v))
            for g, a, b in zip(group, a_maps, b_maps):
                for i in range(g * rep, (g + 1) * rep):
                    q_maps[i] = a  # q' = aᵀ q  (k_g ≈ a k')
                    o_maps[i] = b  # Wo_h' = Wo_h b  (v_g ≈ b v')
        order = [i for group in groups for g in group for i in range(g * rep, (g + 1) * rep)]
        new_q = torch.stack([q_maps[i].T @ q_cols[i] for i in range(h)])  # [h, d, E+1]
        new_o = torch.stack([wo_h[i] @ o_maps[i] for i in range(h)])  # [h, E, d]
        k_stack = torch.stack(new_k)
        v_stack = torch.stack(new_v)
        self._store(prog, site, new_q[..., :-1], new_q[..., -1] if bq_h is not None else None, k_stack[..., :-1],
                    k_stack[..., -1] if bk_h is not None else None, v_stack[..., :-1],
                    v_stack[..., -1] if bv_h is not None else None, new_o, order,
                    bias_k_needed=bool((k_stack[..., -1].abs() > 1e-9).any()),
                    bias_v_needed=bool((v_stack[..., -1].abs() > 1e-9).any()))
        return {"groups": [list(gr) for gr in groups], "key_rel_error": float(sum(e[0] for e in errors) / len(errors)),
                "value_rel_error": float(sum(e[1] for e in errors) / len(errors))}

    def _groups(self, k_cols: list[Tensor], v_cols: list[Tensor], cov: Tensor, m: int) -> list[list[int]]:
        """Balanced greedy grouping: heads whose keys and values share a subspace go together."""
        g_old = len(k_cols)
        cost = torch.zeros(g_old, g_old, dtype=torch.float64)
        for a in range(g_old):
            for b in range(a + 1, g_old):
                err = _pair_error(k_cols[a], k_cols[b], cov) + _pair_error(v_cols[a], v_cols[b], cov)
                cost[a, b] = cost[b, a] = err
        left = set(range(g_old))
        groups: list[list[int]] = []
        while left:
            seed = max(left, key=lambda a: float(sum(cost[a, b] for b in left if b != a)))
            group = [seed]
            left.remove(seed)
            while len(group) < m:
                best = min(left, key=lambda b: float(sum(cost[a, b] for a in group)))
                group.append(best)
                left.remove(best)
            groups.append(sorted(group))
        return sorted(groups)

    def _store(self, prog: Program, site: AttentionSite, wq_h: Tensor, bq_h: Tensor | None, wk: Tensor,
               bk: Tensor | None, wv: Tensor, bv: Tensor | None, wo_h: Tensor, order: list[int],
               bias_k_needed: bool = False, bias_v_needed: bool = False) -> None:
        """Write the new projections (q heads and o columns permuted into ``order``)."""
        gm = prog.gm
        dtype = get_tensor(gm, site.q.weight).dtype
        idx = torch.tensor(order)
        e = wq_h.shape[-1]
        set_tensor(gm, site.q.weight, wq_h[idx].reshape(-1, e).to(dtype))
        if site.q.bias is not None and bq_h is not None:
            set_tensor(gm, site.q.bias, bq_h[idx].reshape(-1).to(dtype))
        set_tensor(gm, site.k.weight, wk.reshape(-1, e).to(dtype))
        set_tensor(gm, site.v.weight, wv.reshape(-1, e).to(dtype))
        for proj, bias, needed in ((site.k, bk, bias_k_needed), (site.v, bv, bias_v_needed)):
            if proj.bias is not None and bias is not None:
                set_tensor(gm, proj.bias, bias.reshape(-1).to(dtype))
            elif proj.bias is None and needed:
                raise PassError(f"layer {site.layer}: the fitted {('key', 'value')[proj is site.v]} projection "
                                "needs a bias the model does not have")
        assert site.o is not None
        wo = wo_h[idx].permute(1, 0, 2).reshape(wo_h.shape[1], -1)
        set_tensor(gm, site.o.weight, wo.to(dtype))

    # ---- local refinement --------------------------------------------------------------------------------
    def _refine(self, original: Program, orig_site: AttentionSite, new: Program, new_site: AttentionSite,
                x: Tensor, ids: Tensor, ctx: PassContext) -> float:
        """Adam on the layer's q/k/v/o weights to match the original layer's attention output."""
        site = new_site
        ref_gm, _ = sublayer(original, orig_site)
        gm, targets = sublayer(new, new_site)
        with torch.no_grad():
            target = run_sublayer(ref_gm, x, ids)
        names = [t for t in targets if get_tensor(gm, t).dim() >= 1 and any(
            t == p for proj in (new_site.q, new_site.k, new_site.v, new_site.o) if proj is not None
            for p in (proj.weight, proj.bias))]
        params = trainable(gm, names)
        opt = torch.optim.Adam(params, lr=1e-4 * math.sqrt(64 / max(site.head_dim, 1)))
        scale = float(target.pow(2).mean())
        rows = x.shape[0]
        g = torch.Generator().manual_seed(ctx.seed)
        last = 0.0
        for step in range(self.refine):
            pick = torch.randperm(rows, generator=g)[: min(4, rows)]
            out = run_sublayer(gm, x[pick], ids[pick])
            loss = (out - target[pick]).pow(2).mean() / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = float(loss)
            del step
        for t, p in zip(names, params):
            set_tensor(new.gm, t, p.detach())
        return last


def _second_moment(cols: Tensor, cov: Tensor) -> Tensor:
    return cols @ cov @ cols.T


def _pair_error(a: Tensor, b: Tensor, cov: Tensor) -> float:
    """Relative energy lost when two heads share one head's worth of dims (a PCA of both)."""
    joint = torch.cat([a, b], 0)
    s = torch.linalg.eigvalsh(_second_moment(joint, cov)).flip(0)
    d = a.shape[0]
    return float(s[d:].clamp(min=0).sum() / s.clamp(min=0).sum().clamp(min=1e-30))


def _fit_keys(cols: list[Tensor], energy: list[Tensor], cov: Tensor, rope: int) -> tuple[Tensor, list[Tensor], float]:
    """Shared key projection ``[d, E+1]`` and per-head maps ``a_g`` (``k_g ≈ a_g k'``), RoPE-commuting."""
    d = cols[0].shape[0]
    maps = [torch.zeros(d, d, dtype=cov.dtype) for _ in cols]
    new = torch.zeros(d, cols[0].shape[1], dtype=cov.dtype)
    half = rope // 2
    lost, total = 0.0, 0.0
    for i in range(half):  # each rotary pair (i, i + half) is one complex number
        rows_re = [c[i] for c in cols]
        rows_im = [c[i + half] for c in cols]
        w = torch.stack([(en[i] + en[i + half]).clamp(min=1e-12).sqrt() for en in energy])
        # complex second moment of the weighted group keys: M = E[z zᴴ], z_g = w_g (k_re + i k_im)
        m_count = len(cols)
        mom = torch.zeros(m_count, m_count, dtype=torch.complex128)
        for a in range(m_count):
            for b in range(m_count):
                rr = rows_re[a] @ cov @ rows_re[b]
                ii = rows_im[a] @ cov @ rows_im[b]
                ri = rows_re[a] @ cov @ rows_im[b]
                ir = rows_im[a] @ cov @ rows_re[b]
                mom[a, b] = w[a] * w[b] * complex(rr + ii, ir - ri)
        evals, evecs = torch.linalg.eigh(mom)
        u = evecs[:, -1]  # top eigenvector: k' = Σ_g conj(u_g) z_g
        lost += float(evals[:-1].real.clamp(min=0).sum().detach())
        total += float(evals.real.clamp(min=0).sum())
        coef = u.conj() * w
        new[i] = sum(coef[g].real * rows_re[g] - coef[g].imag * rows_im[g] for g in range(m_count))
        new[i + half] = sum(coef[g].imag * rows_re[g] + coef[g].real * rows_im[g] for g in range(m_count))
        for g in range(m_count):
            a = u[g] / w[g]  # k_g ≈ a k'
            maps[g][i, i], maps[g][i, i + half] = a.real, -a.imag
            maps[g][i + half, i], maps[g][i + half, i + half] = a.imag, a.real
    rest = list(range(rope, d))
    if rest:
        idx = torch.tensor(rest)
        sub = [c[idx] for c in cols]
        wts = [en[idx].clamp(min=1e-12).sqrt() for en in energy]
        proj, sub_maps, l_rest, t_rest = _weighted_pca(sub, [torch.diag(w_) for w_ in wts], cov)
        new[idx] = proj
        for g, mp in enumerate(sub_maps):
            maps[g][idx[:, None], idx[None, :]] = mp
        lost += l_rest
        total += t_rest
    return new, maps, lost / max(total, 1e-30)


def _fit_values(cols: list[Tensor], metric: list[Tensor], cov: Tensor) -> tuple[Tensor, list[Tensor], float]:
    """Shared value projection and per-head maps ``b_g`` (``v_g ≈ b_g v'``) in the o-projection metric."""
    roots = []
    for mt in metric:
        evals, evecs = torch.linalg.eigh(mt)
        evals = evals.clamp(min=float(evals.max()) * 1e-6)
        roots.append(evecs @ torch.diag(evals.sqrt()) @ evecs.T)
    proj, maps, lost, total = _weighted_pca(cols, roots, cov)
    return proj, maps, lost / max(total, 1e-30)


def _weighted_pca(cols: list[Tensor], weights: list[Tensor], cov: Tensor) -> tuple[Tensor, list[Tensor], float, float]:
    """Top-d subspace of the stacked weighted heads ``z_g = L_g k_g``; returns (new rows, maps, lost, total)."""
    d = cols[0].shape[0]
    stacked = torch.cat([lw @ c for lw, c in zip(weights, cols)], 0)  # [m*d, E+1]
    mom = _second_moment(stacked, cov)
    evals, evecs = torch.linalg.eigh(mom)
    p = evecs[:, -d:]  # [m*d, d], orthonormal
    new = p.T @ stacked  # k' = Pᵀ z
    maps = []
    for g, lw in enumerate(weights):
        pg = p[g * d:(g + 1) * d]  # z_g ≈ P_g k'  ->  k_g ≈ L_g⁻¹ P_g k'
        maps.append(torch.linalg.solve(lw, pg))
    return new, maps, float(evals[:-d].clamp(min=0).sum()), float(evals.clamp(min=0).sum())
