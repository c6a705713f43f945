"""``mla(kv_fraction=F | rank=R, rope_dims=...)``: convert (G)QA layers to multi-head latent attention. Lossy
below full size, exact at ``kv_fraction=1``.

Letters: E model width, d head dim, G KV heads, H query heads, N calibration tokens, P kept rotary
components, r value-latent rank. Each converted layer caches, per token, a shared **rotary key** of ``2P`` dims
and a **value latent** of ``r`` dims (``2P + r`` = the budget, ``kv_fraction`` of ``2 G d``), and attends in the
absorbed form: one KV head whose key is the rotary key and whose value is the latent (DeepSeek's absorbed MLA
decode, with the value up-projection folded into ``o_proj``)::

    q_r  = rope(linear(x, W_qr))  [B,H,S,2P]    k_r = rope(linear(x, W_kr))  [B,1,S,2P]
    c    = linear(x, W_c)         [B,1,S,r]     o   = linear(attention(q_r, k_r, c), W_o·W_uv)  [B,S,E]

- **Keys, RoPE-exact.** RoPE rotates each rotary pair of each head as a complex number; mixing the G heads'
  pair-i components with complex coefficients commutes with RoPE. Per pair, the query-energy-weighted complex
  second moment of the G heads is eigendecomposed; components are kept greedily by captured energy over all
  pairs until ``rope_dims`` is spent (``k_g,i ≈ Σ_j a_gj k'_ij``), and ``conj(a_gj)`` is folded into the query
  projection of the heads that read ``k_g``. Keeping every component is exact.
- **Values.** A PCA of all heads' values in the metric of ``o_proj`` gives the latent; the up-projection is
  folded into ``o_proj`` (absorption). Full rank is exact.
- **The split of the budget** between rotary key and value latent is chosen per layer (``rope_dims=0``, the
  default): both factorisations are nested (the top-``P`` key components, the top-``r`` value directions), so
  every split is cheap to build; each candidate layer is run on calibration rows and the split with the
  smallest relative error of the layer's attention output is kept (a coarse sweep, then its neighbourhood).
  On SmolLM2-135M at 50% this took the untrained perplexity from 3.0x to 1.7x the source's (half/half split
  before), and at 25% from 164x to 4.5x; layers chose 78-178 rotary dims of 192.
- **Output refit.** Below full size, ``o_proj`` (with the value up-projection absorbed) is refit by ridge least
  squares to the source layer's output given the converted layer's latent attention on all calibration rows,
  so it also absorbs part of the key error (kept only if the error drops). SmolLM2-135M at 50%: 25.35 → 24.72
  untrained, 20.54 (1.39x) after a 10-minute ``heal`` at lr 1e-4.
- The softmax scale stays the source's (the wider key does not change it). The decode graph caches ``k_r`` and
  ``c`` (the ``k``/``v`` of the absorbed attention), which is the whole KV saving.

Preconditions: RoPE in rotate-half layout on the full head, no per-head key norm, equal key/value head dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, fx

from ..errors import PassError
from ..fxutil import add_weight, erase_dead, get_tensor, prune_unused_attrs
from ..program import Program
from ..sites import AttentionSite
from .base import Pass, PassContext, PassResult
from .calib import record

aten = torch.ops.aten


class _Probe:
    """One layer's attention on calibration rows (causal, the source's scale): the source output, and the
    pre-``o_proj`` output of a latent candidate, in float64."""

    def __init__(self, site: AttentionSite, x3: Tensor, cos: Tensor, sin: Tensor, wq: Tensor, wk: Tensor,
                 wv: Tensor, wo: Tensor, scale: float, tokens: int) -> None:
        rows = max(1, tokens // x3.shape[1])
        self.h, self.g, self.d, self.scale = site.n_heads, site.n_kv_heads, site.head_dim, scale
        self.x = torch.cat([x3[:rows].double(), torch.ones(*x3[:rows].shape[:2], 1, dtype=torch.float64)], -1)
        self.cos, self.sin = cos[:rows].double(), sin[:rows].double()  # [B,1,S,d]
        with torch.no_grad():
            o = self.attend(self.rotate(self.heads(wq, self.h), self.cos, self.sin),
                            self.rotate(self.heads(wk, self.g), self.cos, self.sin), self.heads(wv, self.g))
            self.ref = torch.einsum("bhsd,hed->bse", o, wo)
        self.norm = float(self.ref.pow(2).sum())

    @staticmethod
    def rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        lo, hi = t.chunk(2, -1)
        return t * cos + torch.cat([-hi, lo], -1) * sin

    def heads(self, w: Tensor, n: int) -> Tensor:
        """``x·wᵀ`` as ``[B, n, S, -1]`` (``w`` carries its bias as the last input column)."""
        return (self.x @ w.reshape(-1, w.shape[-1]).T).unflatten(-1, (n, -1)).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                                enable_gqa=True)

    def latent_out(self, new_q: Tensor, new_k: Tensor, latent: Tensor, kept: list[tuple[int, int]]) -> Tensor:
        """``[B, S, H*r]``: each head's attention over the value latent (what ``o_proj`` reads)."""
        idx = torch.tensor([i for i, _ in kept] + [i + self.d // 2 for i, _ in kept])
        cs, sn = self.cos[..., idx], self.sin[..., idx]
        with torch.no_grad():
            o = self.attend(self.rotate(self.heads(new_q, self.h), cs, sn), self.rotate(self.heads(new_k, 1), cs, sn),
                            self.heads(latent[None], 1))
        return o.transpose(1, 2).flatten(2)

    def error(self, out: Tensor) -> float:
        return float((out - self.ref).pow(2).sum()) / max(self.norm, 1e-30)


@dataclass(frozen=True)
class Mla(Pass):
    """Convert attention to latent attention (shared rotary key + value latent), cache 2P + r per token. Lossy."""

    name: ClassVar[str] = "mla"
    head_layout: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    kv_fraction: float = 0.5
    """Cache budget as a fraction of the current K+V bytes per token (1.0: exact conversion)."""
    rank: int = 0
    """Value-latent rank r (overrides kv_fraction together with rope_dims when > 0)."""
    rope_dims: int = 0
    """Dims of the shared rotary key (even). 0: chosen per layer by the attention-output error on calibration
    rows (all of them at kv_fraction=1; one head's worth when only ``rank`` is given)."""
    calibration_tokens: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_fraction <= 1.0:
            raise ValueError(f"kv_fraction must be in (0, 1], got {self.kv_fraction}")
        if self.rope_dims % 2 or self.rope_dims < 0 or self.rank < 0:
            raise ValueError("rope_dims must be even and >= 0, rank >= 0")

    def budget(self, site: AttentionSite) -> tuple[int, int]:
        """(rope dims, value rank) for one layer; rope dims 0 = chosen by :meth:`_search`."""
        full = site.n_kv_heads * (site.head_dim + site.v_head_dim)
        if self.rank > 0:
            rope = self.rope_dims if self.rope_dims else min(site.head_dim, full // 2)
            return rope, self.rank
        total = int(round(self.kv_fraction * full))
        if self.kv_fraction >= 1.0 and not self.rope_dims:
            return site.n_kv_heads * site.head_dim, site.n_kv_heads * site.v_head_dim
        return self.rope_dims, total - self.rope_dims

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        sites = new.sites()
        for site in sites:
            self._check(site)
        calib = ctx.calibration(program)
        ids = calib[: max(1, self.calibration_tokens // calib.shape[1])]
        nodes: list[fx.Node] = []
        for s in sites:
            assert s.rope is not None
            nodes += [s.q.node.args[0], s.rope.cos, s.rope.sin]  # type: ignore[list-item]
        values = record(new, nodes, ids)
        report: dict[str, object] = {"layers": {}}
        for n, site in enumerate(sites):
            x, cos, sin = values[3 * n: 3 * n + 3]
            with ctx.at(site.node):
                report["layers"][site.layer] = self._convert(new, site, x, cos, sin)  # type: ignore[index]
        new.gm.graph.lint()
        new.gm.recompile()
        new._shapes = None
        return PassResult(new, modified=True, count=len(sites), report=report)

    def _check(self, site: AttentionSite) -> None:
        rope, rank = self.budget(site)
        if site.rope is None or site.rope.dims != site.head_dim:
            raise PassError(f"layer {site.layer}: mla needs RoPE over the whole head (rotate-half layout)",
                            "this model's attention has no (full) rotary embedding")
        if site.qk_norm:
            raise PassError(f"layer {site.layer}: per-head key norms cannot be merged into a latent")
        if site.head_dim != site.v_head_dim or site.o is None:
            raise PassError(f"layer {site.layer}: mla needs equal key/value head dims and an output projection")
        if rope and (rope > site.n_kv_heads * site.head_dim or rope < 2):
            raise PassError(f"layer {site.layer}: rope_dims={rope} must be in [2, {site.n_kv_heads * site.head_dim}]")
        if not rope and rank < 3:
            raise PassError(f"layer {site.layer}: a budget of {rank} dims per token cannot hold a rotary key and a "
                            "value latent", "raise kv_fraction")
        if rope and (rank < 1 or rank > site.n_kv_heads * site.v_head_dim):
            raise PassError(f"layer {site.layer}: the value rank {rank} must be in [1, "
                            f"{site.n_kv_heads * site.v_head_dim}]", "raise kv_fraction or lower rope_dims")

    def _convert(self, prog: Program, site: AttentionSite, x3: Tensor, cos: Tensor, sin: Tensor) -> dict[str, float]:
        gm = prog.gm
        rope_dims, rank = self.budget(site)
        d, g_old, h = site.head_dim, site.n_kv_heads, site.n_heads
        rep, half = h // g_old, d // 2
        aug = lambda w, b: torch.cat([w.double(), (b.double() if b is not None else  # noqa: E731
                                                   torch.zeros(w.shape[0], dtype=torch.float64))[:, None]], 1)
        get_b = lambda p: get_tensor(gm, p.bias) if p.bias is not None else None  # noqa: E731
        wq = aug(get_tensor(gm, site.q.weight), get_b(site.q)).reshape(h, d, -1).detach()
        wk = aug(get_tensor(gm, site.k.weight), get_b(site.k)).reshape(g_old, d, -1).detach()
        wv = aug(get_tensor(gm, site.v.weight), get_b(site.v)).reshape(g_old, d, -1).detach()
        assert site.o is not None
        wo = get_tensor(gm, site.o.weight).detach().double().reshape(-1, h, d).permute(1, 0, 2)  # [h, E, d]
        x = x3.reshape(-1, x3.shape[-1]).double()[:8192]
        x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        cov = x1.T @ x1 / x1.shape[0]
        q_energy = torch.stack([torch.diagonal(wq[i] @ cov @ wq[i].T) for i in range(h)])
        weight = torch.stack([q_energy[g * rep:(g + 1) * rep].sum(0) for g in range(g_old)])  # [G, d]
        # keys: per pair, eigen-components of the weighted complex moment across heads
        comps = []  # (energy, pair, evec index)
        eig: list[tuple[Tensor, Tensor, Tensor]] = []
        for i in range(half):
            w = (weight[:, i] + weight[:, i + half]).clamp(min=1e-12).sqrt()  # [G]
            re, im = wk[:, i], wk[:, i + half]  # [G, E+1]
            rr, ii, ri = re @ cov @ re.T, im @ cov @ im.T, re @ cov @ im.T
            mom = (w[:, None] * w[None, :]) * torch.complex(rr + ii, ri.T - ri)
            evals, evecs = torch.linalg.eigh(mom)
            eig.append((evals.real, evecs, w))
            comps.extend((float(evals.real[j]), i, j) for j in range(g_old))
        comps.sort(key=lambda c: -c[0])
        total_key = sum(max(c[0], 0.0) for c in comps)
        group = torch.arange(h) // rep  # the source KV head each query head reads

        def keys(n: int) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
            """The rotary key and the queries of the ``n`` strongest components (``2n`` dims)."""
            kept = sorted((i, j) for _, i, j in comps[:n])
            new_k = torch.zeros(2 * n, wk.shape[-1], dtype=torch.float64)
            new_q = torch.zeros(h, 2 * n, wq.shape[-1], dtype=torch.float64)
            for c, (i, j) in enumerate(kept):
                _, evecs, w = eig[i]
                u = evecs[:, j]
                coef = u.conj() * w  # k'_c = Σ_g coef_g (k_re + i k_im)_g
                re, im = wk[:, i], wk[:, i + half]
                new_k[c] = (coef.real[:, None] * re - coef.imag[:, None] * im).sum(0)
                new_k[n + c] = (coef.imag[:, None] * re + coef.real[:, None] * im).sum(0)
                a = (u / w)[group]  # k_g,i ≈ Σ_c a k'_c ; fold conj(a) into the queries of group g
                q_re, q_im = wq[:, i], wq[:, i + half]
                new_q[:, c] = a.real[:, None] * q_re + a.imag[:, None] * q_im
                new_q[:, n + c] = -a.imag[:, None] * q_re + a.real[:, None] * q_im
            return new_q, new_k, kept

        # values: one latent for all heads, in the o-projection metric of the heads that read each KV head
        roots = []
        for g in range(g_old):
            metric = sum(wo[i].T @ wo[i] for i in range(g * rep, (g + 1) * rep))
            ev, vec = torch.linalg.eigh(metric)
            ev = ev.clamp(min=float(ev.max()) * 1e-6)
            roots.append(vec @ torch.diag(ev.sqrt()) @ vec.T)
        stacked = torch.cat([roots[g] @ wv[g] for g in range(g_old)], 0)
        v_evals, v_evecs = torch.linalg.eigh(stacked @ cov @ stacked.T)

        def values(r: int) -> tuple[Tensor, Tensor]:
            """The value latent of rank ``r`` and the output projection with its up-projection absorbed."""
            basis = v_evecs[:, -r:]  # [G*d, r]
            up = [torch.linalg.solve(roots[g], basis[g * d:(g + 1) * d]) for g in range(g_old)]  # v_g ≈ up_g c
            return basis.T @ stacked, torch.cat([wo[i] @ up[i // rep] for i in range(h)], 1)  # c = Pᵀ z, [E, h*r]

        scale = site.scale if site.scale > 0 else 1.0 / d ** 0.5
        searched: dict[int, float] = {}
        if not rope_dims:
            probe = _Probe(site, x3, cos, sin, wq, wk, wv, wo, scale, tokens=2048)
            rope_dims, searched = self._search(probe, keys, values, rank)
            rank -= rope_dims
        p = rope_dims // 2
        new_q, new_k, kept = keys(p)
        latent, new_o = values(rank)
        refit: dict[str, float] = {}
        if self.kv_fraction < 1.0 or self.rank:
            new_o, refit = self._refit_output(_Probe(site, x3, cos, sin, wq, wk, wv, wo, scale, tokens=1 << 30),
                                              new_q, new_k, latent, kept, new_o)
        lost = total_key - sum(max(c[0], 0.0) for c in comps[:p])
        v_lost = float(v_evals[:-rank].clamp(min=0).sum() / v_evals.clamp(min=0).sum().clamp(min=1e-30))
        self._rewrite(prog, site, new_q, new_k, latent, new_o, kept, p, rank)
        report = {"rope_dims": 2 * p, "rank": rank, "key_rel_error": lost / max(total_key, 1e-30),
                  "value_rel_error": v_lost}
        if searched:
            report["output_rel_error"] = searched[rope_dims]
        report.update(refit)
        return report

    @staticmethod
    def _refit_output(probe: _Probe, new_q: Tensor, new_k: Tensor, latent: Tensor, kept: list[tuple[int, int]],
                      new_o: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Refit ``o_proj`` (with the value up-projection absorbed) by ridge least squares to the source layer's
        output on all calibration rows: it then also absorbs part of the key error. Kept only if it helps."""
        a = probe.latent_out(new_q, new_k, latent, kept).reshape(-1, new_o.shape[1])
        y = probe.ref.reshape(-1, new_o.shape[0])
        before = probe.error((a @ new_o.T).reshape(probe.ref.shape))
        gram = a.T @ a
        ridge = 1e-3 * float(torch.diagonal(gram).mean())
        fitted = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ y).T
        after = probe.error((a @ fitted.T).reshape(probe.ref.shape))
        if after >= before:
            return new_o, {"refit_rel_error": before}
        return fitted, {"output_rel_error_before_refit": before, "refit_rel_error": after}

    def _search(self, probe: _Probe, keys: Any, values: Any, total: int) -> tuple[int, dict[int, float]]:
        """The rotary dims (of ``total``) whose conversion best reproduces the layer's attention output on the
        calibration rows (relative squared error): a coarse sweep, then its neighbourhood."""
        errors: dict[int, float] = {}

        def error(rope: int) -> float:
            if rope not in errors:
                new_q, new_k, kept = keys(rope // 2)
                latent, new_o = values(total - rope)
                errors[rope] = probe.error(probe.latent_out(new_q, new_k, latent, kept) @ new_o.T)
            return errors[rope]

        top = min(probe.g * probe.d, total - 1) // 2 * 2
        step = max(2, (top // 8) // 2 * 2)
        best = min(range(2, top + 1, step), key=error)
        for rope in range(max(2, best - step + 2), min(top, best + step - 2) + 1, max(2, step // 8 * 2)):
            error(rope)
        return min(errors, key=errors.__getitem__), errors

    def _rewrite(self, prog: Program, site: AttentionSite, new_q: Tensor, new_k: Tensor, latent: Tensor,
                 new_o: Tensor, kept: list[tuple[int, int]], p: int, rank: int) -> None:
        """Replace the layer's q/k/v projections, RoPE tables and o projection with the latent form."""
        gm, graph = prog.gm, prog.gm.graph
        assert site.rope is not None and site.o is not None
        dtype = get_tensor(gm, site.q.weight).dtype
        att = site.node
        h = site.n_heads
        half = site.head_dim // 2
        x = site.q.node.args[0]
        pos_idx = [i for i, _ in kept] + [i + half for i, _ in kept]
        # (rotary components use the source's frequency of their pair; the tables are gathered once per layer)
        with graph.inserting_before(att):
            idx = add_weight(gm, graph, f"{site.q.weight}_mla_rope_index",
                             torch.tensor(pos_idx, dtype=torch.int64), att)
            cos = graph.call_function(aten.index_select.default, (site.rope.cos, -1, idx))
            sin = graph.call_function(aten.index_select.default, (site.rope.sin, -1, idx))

            def proj(name: str, w: Tensor, heads: int, rotate: bool) -> fx.Node:
                w_node = add_weight(gm, graph, name, w[..., :-1].reshape(-1, w.shape[-1] - 1).to(dtype), att)
                bias = w[..., -1].reshape(-1)
                args: tuple[object, ...] = (x, w_node)
                if bool(bias.abs().max() > 0):
                    args = (x, w_node, add_weight(gm, graph, name + "_bias", bias.to(dtype), att))
                lin = graph.call_function(aten.linear.default, args)
                b = graph.call_function(aten.sym_size.int, (x, 0))
                s = graph.call_function(aten.sym_size.int, (x, 1))
                view = graph.call_function(aten.view.default, (lin, [b, s, heads, -1]))
                t = graph.call_function(aten.transpose.int, (view, 1, 2))
                if not rotate:
                    return t
                lo = graph.call_function(aten.slice.Tensor, (t, 3, 0, p))
                hi = graph.call_function(aten.slice.Tensor, (t, 3, p, 2 * p))
                rot = graph.call_function(aten.cat.default, ([graph.call_function(aten.neg.default, (hi,)), lo], -1))
                return graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (t, cos)),
                                                             graph.call_function(aten.mul.Tensor, (rot, sin))))

            q_r = proj(f"{site.q.weight}_mla_q", new_q, h, True)
            k_r = proj(f"{site.k.weight}_mla_k", new_k[None], 1, True)
            c = proj(f"{site.v.weight}_mla_latent", latent[None], 1, False)
        kwargs = dict(att.kwargs)
        if float(kwargs.get("scale", 0.0)) == 0.0:  # type: ignore[arg-type]
            kwargs["scale"] = 1.0 / float(site.head_dim) ** 0.5
        att.args = (q_r, k_r, c, *att.args[3:])
        att.kwargs = kwargs
        att.meta["headsmith_cache_width"] = 2 * p + rank
        # the output path: [B,H,S,r] -> [B,S,H*r] -> o_proj with the value up-projection absorbed
        o_lin = site.o.node
        with graph.inserting_before(o_lin):
            w_o = add_weight(gm, graph, f"{site.o.weight}_mla", new_o.to(dtype), o_lin)
            b = graph.call_function(aten.sym_size.int, (x, 0))
            s = graph.call_function(aten.sym_size.int, (x, 1))
            flat = graph.call_function(aten.reshape.default,
                                       (graph.call_function(aten.transpose.int, (att, 1, 2)), [b, s, -1]))
        o_lin.args = (flat, w_o, *o_lin.args[2:])
        erase_dead(graph)
        prune_unused_attrs(gm)
