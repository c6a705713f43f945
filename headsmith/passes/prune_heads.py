"""``prune-heads(ratio=F | n=K, score=..., unit=head|group)``: remove attention heads. Lossy.

Letters: B batch, S sequence, H query heads, G KV heads, D head dim, Dv value head dim, E model width, r query
heads per KV head the attention op sees.

A query head is its D rows of ``W_q`` (and ``b_q``) and its Dv columns of ``W_o``; a KV head is its rows of ``W_k``
and ``W_v`` (and biases). Query heads go singly; a KV head goes with the last query head that reads it (GQA
groups). With ``unit=group`` only whole KV groups go (the layout stays regular and the KV cache shrinks with the
heads). Heads of all layers are ranked together, each score divided by the l2 norm of its layer's scores
(Michel et al.'s normalisation); every layer keeps ``min_heads``; per-layer head counts may then differ. With
``steps > 1`` the scores are measured again after each step (Michel's iterative pruning).

The attention op reads KV head ``h // (H / G)``. When the kept query heads of the KV groups are unequal (sizes
``s_g``), the layer expands its KV heads in the graph: with ``r = gcd(s_g)``, KV head ``g`` is repeated ``s_g / r``
times by ``index_select(k, 1, kv_index)`` in front of the op (which then sees ``H / r`` KV heads), and for causal
LMs ``cache_point(k, layer, 0, 2)`` / ``cache_point(v, layer, 1, 2)`` mark the un-expanded k and v, so the decode
graph caches only the surviving KV heads (``AttentionSite.n_kv_heads`` and ``ModelSpec`` report those). Where
the groups are equal nothing is inserted, and an earlier expansion is removed. Before / after, 4 query heads on
2 KV heads, query head 0 pruned::

    k = rope(view(linear(x, W_k[32, E])))            k = rope(view(linear(x, W_k[32, E])))
    attention(q[B,4,S,16], k[B,2,S,16], v, ..)  ->   k_c = cache_point(k, 0, 0, 2)
                                                     k_s = index_select(k_c, 1, kv_index=[0, 1, 1])
                                                     attention(q[B,3,S,16], k_s[B,3,S,16], v_s, ..)

Scores (``score``, see :mod:`headsmith.passes.scores`): ``gradient`` (Michel et al.'s ``E|∂L/∂ξ_h|`` for a
gate on the head's output), ``norm`` (the norm of the head's contribution through ``o_proj``), ``random``
(seeded), ``auto`` (default): ``norm`` for causal LMs, ``gradient`` for encoders, which is what measured best
on SmolLM2-135M and MiniLM-L6 at 10/25/40% (docs/pruning.md). Removing a head whose ``o_proj`` columns are zero is exact (its scores are 0).

Preconditions: an output projection after attention; no weight on the q/k/v path spans all heads (a norm over
all heads together); the layer's KV cache points, if any, are the ones this pass inserts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from ..errors import PassError
from ..fxutil import VIEW_OPS, add_weight, ancestors, erase_dead, get_tensor, is_call, prune_unused_attrs, set_tensor
from ..program import Program
from ..sites import LINEAR, AttentionSite, Projection
from .base import Pass, PassContext, PassResult
from .kv_cache import CACHE_POINT
from .scores import calibration_rows, head_scores
from .structure import refresh_values

aten = torch.ops.aten
INDEX_SELECT = aten.index_select.default
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class PruneHeads(Pass):
    """Remove attention heads (query heads singly, KV heads with their last query head), ranked globally. Lossy."""

    name: ClassVar[str] = "prune-heads"
    head_layout: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    ratio: float = 0.0
    """Fraction of all query heads to remove (rounded)."""
    n: int = 0
    """Query heads to remove (instead of ratio)."""
    score: Literal["auto", "norm", "gradient", "random"] = "auto"
    """How heads are ranked (see the module docstring)."""
    unit: Literal["head", "group"] = "head"
    """Remove single query heads, or only whole KV groups (a KV head and all its query heads)."""
    min_heads: int = 1
    """Query heads every layer keeps."""
    steps: int = 1
    """Prune in this many rounds, measuring the scores again before each."""
    calibration_tokens: int = 2048
    """Calibration tokens the scores are measured on."""

    def __post_init__(self) -> None:
        if self.n < 0 or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"n must be >= 0 and ratio in [0, 1), got n={self.n}, ratio={self.ratio}")
        if self.n > 0 and self.ratio > 0.0:
            raise ValueError("give n or ratio, not both")
        if self.min_heads < 1 or self.steps < 1 or self.calibration_tokens < 1:
            raise ValueError("min_heads, steps and calibration_tokens must be >= 1")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        sites = new.sites()
        total = sum(s.n_heads for s in sites)
        target = self.n if self.n > 0 else int(round(self.ratio * total))
        if target == 0 or not sites:
            return PassResult(new, modified=False, count=0)
        for site in sites:
            _check(new, site)
        removable = total - sum(min(self.min_heads, s.n_heads) for s in sites)
        if target > removable:
            raise PassError(f"cannot remove {target} of {total} query heads while every layer keeps {self.min_heads}",
                            f"remove at most {removable} heads (or lower min_heads)")
        score = self.score
        if score == "auto":  # what measured best (docs/pruning.md): norm on SmolLM2, gradient on MiniLM
            score = "norm" if new.info.task == "causal-lm" else "gradient"
        ids = calibration_rows(new, ctx, self.calibration_tokens)
        origin = {s.layer: list(range(s.n_heads)) for s in sites}
        before = {s.layer: (s.n_heads, s.n_kv_heads) for s in sites}
        params_before = new.n_params()
        done = 0
        for step in range(self.steps):
            want = target * (step + 1) // self.steps - done
            if want <= 0:
                continue
            sites = new.sites()
            scores = head_scores(new, ids, score, seed=ctx.seed + step)
            plan = self._plan(new, sites, scores, want)
            for site in sites:
                heads = plan.get(site.layer, set())
                if not heads:
                    continue
                with ctx.at(site.node):
                    _prune(new, site, heads)
                origin[site.layer] = [h for i, h in enumerate(origin[site.layer]) if i not in heads]
                done += len(heads)
            erase_dead(new.gm.graph)
            prune_unused_attrs(new.gm)
            new.gm.graph.lint()
            new.gm.recompile()
            refresh_values(new.gm)
            new._shapes = None
        layers: dict[int, Any] = {}
        for site in new.sites():
            layers[site.layer] = {"heads": [before[site.layer][0], site.n_heads],
                                  "kv_heads": [before[site.layer][1], site.n_kv_heads],
                                  "kept": origin[site.layer], "kv_index": _expansion(new.gm, site)}
        report = {"score": score, "unit": self.unit, "removed": done, "layers": layers,
                  "params_before": params_before, "params_after": new.n_params()}
        return PassResult(new, modified=True, count=done, report=report)

    def _plan(self, program: Program, sites: list[AttentionSite], scores: dict[int, torch.Tensor],
              want: int) -> dict[int, set[int]]:
        """Which query heads (current indices) to remove per layer: the lowest normalised scores first."""
        norm = {k: v.double() / v.double().norm().clamp(min=1e-30) for k, v in scores.items()}
        left = {s.layer: s.n_heads for s in sites}
        candidates: list[tuple[float, int, tuple[int, ...]]] = []
        for site in sites:
            if self.unit == "head":
                candidates.extend((float(norm[site.layer][h]), site.layer, (h,)) for h in range(site.n_heads))
                continue
            groups = kv_groups(program.gm, site)
            for g in sorted(set(groups)):
                members = tuple(h for h in range(site.n_heads) if groups[h] == g)
                candidates.append((float(norm[site.layer][list(members)].sum()), site.layer, members))
        plan: dict[int, set[int]] = {}
        chosen = 0
        for _, layer, members in sorted(candidates):
            if chosen >= want:
                break
            if left[layer] - len(members) < self.min_heads:
                continue
            plan.setdefault(layer, set()).update(members)
            left[layer] -= len(members)
            chosen += len(members)
        return plan


def kv_groups(gm: fx.GraphModule, site: AttentionSite) -> list[int]:
    """The (un-expanded) KV head each query head of ``site`` reads."""
    idx = _expansion(gm, site)
    if idx is not None:
        r = site.n_heads // len(idx)
        return [idx[h // r] for h in range(site.n_heads)]
    rep = site.n_heads // site.n_kv_heads
    return [h // rep for h in range(site.n_heads)]


def _expansion(gm: fx.GraphModule, site: AttentionSite) -> list[int] | None:
    """The ``kv_index`` of the layer's ``index_select`` in front of attention, if it has one."""
    k_in = site.node.args[1]
    if not is_call(k_in, INDEX_SELECT):
        return None
    index = k_in.args[2]  # type: ignore[union-attr]
    assert isinstance(index, fx.Node) and index.op == "get_attr"
    return [int(i) for i in get_tensor(gm, str(index.target)).tolist()]


def _check(program: Program, site: AttentionSite) -> None:
    gm, att = program.gm, site.node
    if site.o is None:
        raise PassError(f"layer {site.layer}: no output projection was found after attention",
                        "prune-heads slices the output projection's columns")
    ours = {a.args[0] for a in (att.args[1], att.args[2]) if is_call(a, INDEX_SELECT)}  # type: ignore[union-attr]
    layer = att.kwargs.get("layer", site.layer)
    foreign = [n for n in gm.graph.nodes if is_call(n, CACHE_POINT) and n.args[1] == layer and n not in ours]
    if foreign:
        raise PassError(f"layer {site.layer} caches values another pass marked ({foreign[0].name}): their head "
                        "layout is not the attention's", "run prune-heads before that pass")
    for proj, value, heads, d in ((site.q, att.args[0], site.n_heads, site.head_dim),
                                  (site.k, att.args[1], site.n_kv_heads, site.head_dim),
                                  (site.v, att.args[2], site.n_kv_heads, site.v_head_dim)):
        if heads < 2:
            continue
        assert isinstance(value, fx.Node)
        for n in _path(value, proj):
            if n.op != "get_attr" or str(n.target) in (proj.weight, proj.bias):
                continue
            t = get_tensor(gm, str(n.target))
            if t.is_floating_point() and heads * d in t.shape:
                raise PassError(f"layer {site.layer}: {n.target} {tuple(t.shape)} spans all {heads} heads on the way "
                                "to attention (a norm over all heads together?): removing a head would change it",
                                "prune-heads supports per-head (or no) norms on q and k")


def _path(value: fx.Node, proj: Projection) -> set[fx.Node]:
    """The nodes between a projection and the attention input it feeds (the projection excluded)."""
    region = ancestors([value], lambda n: n is proj.node or n.op in ("get_attr", "placeholder")
                       or is_call(n, aten.sym_size.int))
    return region - {proj.node}


def _prune(program: Program, site: AttentionSite, remove: set[int]) -> None:
    """Remove query heads ``remove`` (and the KV heads no kept query head reads) from one layer."""
    gm = program.gm
    h, g = site.n_heads, site.n_kv_heads
    kv_of = kv_groups(gm, site)
    keep_q = [i for i in range(h) if i not in remove]
    keep_kv = sorted({kv_of[i] for i in keep_q})
    sizes = [sum(1 for i in keep_q if kv_of[i] == kv) for kv in keep_kv]
    r = math.gcd(*sizes)
    expand = [j for j, s in enumerate(sizes) for _ in range(s // r)]
    take_heads(gm, site.q, keep_q, site.head_dim, rows=True)
    take_heads(gm, site.o, keep_q, site.v_head_dim, rows=False)  # type: ignore[arg-type]
    if len(keep_kv) < g:
        take_heads(gm, site.k, keep_kv, site.head_dim, rows=True)
        take_heads(gm, site.v, keep_kv, site.v_head_dim, rows=True)
    _fix_views(site, len(keep_q), len(keep_kv))
    _set_expansion(program, site, expand if len(expand) != len(keep_kv) else None)


def take_heads(gm: fx.GraphModule, proj: Projection, heads: list[int], d: int, rows: bool) -> None:
    """Keep ``heads`` (blocks of ``d``) of a projection's rows (q/k/v, and their biases) or columns (o)."""
    idx = torch.cat([torch.arange(i * d, (i + 1) * d) for i in heads])
    w = get_tensor(gm, proj.weight)
    set_tensor(gm, proj.weight, (w[idx] if rows else w[:, idx]).contiguous())
    if rows and proj.bias is not None:
        set_tensor(gm, proj.bias, get_tensor(gm, proj.bias)[idx].contiguous())


# view(x, [B, S, H, D]) -> view(x, [B, S, H', D]) on q/k/v; reshape(o, [B, H, S, Dv] | [B, S, H*Dv]) on the output
def _fix_views(site: AttentionSite, heads: int, kv_heads: int) -> None:
    """Rewrite head counts written as constants into the view shapes between projections and attention."""
    att = site.node
    for proj, value, old, new in ((site.q, att.args[0], site.n_heads, heads),
                                  (site.k, att.args[1], site.n_kv_heads, kv_heads),
                                  (site.v, att.args[2], site.n_kv_heads, kv_heads)):
        if old == new:
            continue
        assert isinstance(value, fx.Node)
        for n in _path(value, proj):
            shape = n.args[1] if is_call(n, *RESHAPES) else None
            if isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[2] == old:
                n.args = (n.args[0], [*shape[:2], new, shape[3]])
    cur = att
    for _ in range(16):
        users = list(cur.users)
        if len(users) != 1 or is_call(users[0], LINEAR) or not is_call(users[0], *VIEW_OPS):
            return
        cur = users[0]
        shape = cur.args[1] if is_call(cur, *RESHAPES) else None
        if isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[1] == site.n_heads:
            cur.args = (cur.args[0], [shape[0], heads, *shape[2:]])
        if isinstance(shape, (list, tuple)) and len(shape) == 3 and shape[2] == site.n_heads * site.v_head_dim:
            cur.args = (cur.args[0], [*shape[:2], heads * site.v_head_dim])


def _set_expansion(program: Program, site: AttentionSite, expand: list[int] | None) -> None:
    """Insert, update or remove ``index_select(cache_point(k), 1, kv_index)`` (and v) in front of attention."""
    gm, graph, att = program.gm, program.gm.graph, site.node
    k_in, v_in = att.args[1], att.args[2]
    assert isinstance(k_in, fx.Node) and isinstance(v_in, fx.Node)
    if is_call(k_in, INDEX_SELECT):  # an expansion this pass inserted before
        if expand is not None:
            set_tensor(gm, str(k_in.args[2].target), torch.tensor(expand, dtype=torch.int64))  # type: ignore[union-attr]
            return
        unmark = lambda n: n.args[0] if is_call(n, CACHE_POINT) else n  # noqa: E731
        att.args = (att.args[0], unmark(k_in.args[0]), unmark(v_in.args[0]), *att.args[3:])
        return
    if expand is None:
        return
    layer = int(att.kwargs.get("layer", site.layer))  # type: ignore[arg-type]
    base = site.k.weight.rsplit(".", 2)[0] + ".kv_index"
    index = add_weight(gm, graph, base, torch.tensor(expand, dtype=torch.int64), att)
    causal = program.info.task == "causal-lm"
    inserted: list[fx.Node] = []
    with graph.inserting_before(att):
        for slot, value in enumerate((k_in, v_in)):
            if causal:
                value = graph.call_function(CACHE_POINT, (value, layer, slot, 2))
                inserted.append(value)
            inserted.append(graph.call_function(INDEX_SELECT, (value, 1, index)))
    for n in inserted:
        n.meta["nn_module_stack"] = dict(att.meta.get("nn_module_stack", {}))
    selects = [n for n in inserted if is_call(n, INDEX_SELECT)]
    att.args = (att.args[0], selects[0], selects[1], *att.args[3:])
