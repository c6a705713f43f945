"""The pass registry and the spec entry point.

``ALL_PASSES`` is the explicit tuple of built-in passes; ``REGISTRY`` maps names to classes. Third-party
passes register with :func:`register_pass` or through the ``headsmith.passes`` entry-point group
(``[project.entry-points."headsmith.passes"] my-pass = "pkg.module:MyPass"``), loaded on first lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points

from ..errors import PassSpecError
from .base import MatchResult, Pass, PassContext, PassResult
from .canonicalize import Canonicalize, Dce
from .draft import Draft
from .gqa import Gqa
from .heal import Heal
from .kv_evict import KvEvict
from .mla import Mla
from .prefill_prune import PrefillPrune
from .prune_heads import PruneHeads
from .prune_layers import PruneLayers
from .prune_mlp import PruneMlp
from .quantize import Quantize
from .raise_attention import RaiseAttention
from .sparse_attention import SparseAttention
from .spec import build, parse_spec
from .token_merge import TokenMerge

ALL_PASSES: tuple[type[Pass], ...] = (Canonicalize, Dce, RaiseAttention, Draft, Gqa, Heal, KvEvict, Mla,
                                      PrefillPrune, PruneHeads, PruneLayers, PruneMlp, Quantize, SparseAttention,
                                      TokenMerge)
REGISTRY: dict[str, type[Pass]] = {p.name: p for p in ALL_PASSES}
ENTRY_POINT_GROUP = "headsmith.passes"
_plugins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a pass class under ``cls.name`` (usable as a decorator). Names must be unique."""
    if not isinstance(cls, type) or not issubclass(cls, Pass):
        raise TypeError(f"{cls!r} is not a subclass of headsmith.Pass")
    if not cls.name:
        raise ValueError(f"pass class {cls.__name__} has no name")
    existing = REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a pass named {cls.name!r} is already registered ({existing.__module__}.{existing.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register_pass(ep.load())


def pass_class(name: str) -> type[Pass]:
    load_plugins()
    return REGISTRY[name]


def parse_passes(spec: str | Sequence[Pass]) -> list[Pass]:
    """Parse ``"name(k=v), name2"`` into pass instances (a list of passes is returned as is)."""
    if not isinstance(spec, str):
        return list(spec)
    load_plugins()
    passes: list[Pass] = []
    for item in parse_spec(spec):
        cls = REGISTRY.get(item.name)
        if cls is None:
            known = ", ".join(sorted(REGISTRY))
            raise PassSpecError(f"unknown pass {item.name!r} (known: {known})", spec, item.column,
                                "run `headsmith passes` to list the passes and their options")
        passes.append(build(item, cls, spec))
    return passes


__all__ = ["ALL_PASSES", "REGISTRY", "MatchResult", "Pass", "PassContext", "PassResult", "load_plugins",
           "parse_passes", "pass_class", "register_pass"]
