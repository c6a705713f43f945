"""The pass API: ``Pass``, ``PassResult``, ``PassContext`` and ``MatchResult``.

A pass is a frozen dataclass whose typed fields are its options::

    @dataclass(frozen=True)
    class Dce(Pass):
        '''Remove nodes whose values are never used. Exact.'''
        name: ClassVar[str] = "dce"
        exact: ClassVar[bool] = True

        def run(self, program, ctx):
            ...
            return PassResult(new_program, modified=count > 0, count=count)

``str(pass_)`` gives back its spec (``gqa(kv_heads=1, method=fit)``); options at their default value
are left out. ``run`` must not modify its input program: it works on ``program.clone()``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, fx

from ..program import Program


@dataclass(frozen=True)
class MatchResult:
    """The outcome of checking one candidate site: success, or a reason and the node that failed."""

    ok: bool
    reason: str = ""
    node: fx.Node | None = None

    @staticmethod
    def success() -> MatchResult:
        return MatchResult(True)

    @staticmethod
    def fail(reason: str, node: fx.Node | None = None) -> MatchResult:
        return MatchResult(False, reason, node)

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class PassResult:
    """What ``Pass.run`` returns."""

    program: Program
    modified: bool
    count: int
    """How many sites the pass rewrote (0 means it matched nothing)."""
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Settings and shared state for one pipeline run (instead of global switches)."""

    seed: int = 0
    verify: bool = True
    """Check every pass numerically (exact: allclose; lossy: KL / top-1 / cosine are reported)."""
    atol: float = 1e-4
    """Tolerance of the exact-pass check (absolute, and relative to the output's magnitude)."""
    kl_budget: float | None = None
    """Fail a lossy pass whose KL divergence to its input exceeds this (None: report only)."""
    calibration_tokens: int = 4096
    """Tokens of calibration text that lossy passes score with."""
    calibration_text: Path | None = None
    """Calibration text file (default: the bundled calibration text)."""
    dump_dir: Path | None = None
    """Write the graph before/after every pass here."""
    timing: bool = True
    source: Program | None = None
    """The program before the first pass (lossy passes and ``heal`` compare against it)."""
    progress: Any = None
    """Optional callable(str) for status lines."""
    warnings: list[str] = field(default_factory=list)
    node: fx.Node | None = None
    """The node a pass is working on (named in errors)."""
    _calibration: Tensor | None = None

    @contextlib.contextmanager
    def at(self, node: fx.Node) -> Iterator[None]:
        """Mark ``node`` as the one being rewritten, for error messages."""
        previous, self.node = self.node, node
        yield
        self.node = previous

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.say(f"warning: {message}")

    def calibration(self, program: Program, tokens: int | None = None) -> Tensor:
        """Calibration token ids ``[N, L]`` from the calibration text (random ids without a tokenizer): the first
        ``calibration_tokens`` tokens, or ``tokens`` when a pass asks for a different amount."""
        want = tokens if tokens is not None else self.calibration_tokens
        if self._calibration is None or self._calibration.numel() < want:
            from ..corpus import calibration_batches
            self._calibration = calibration_batches(program, max(want, self.calibration_tokens),
                                                    self.calibration_text, seed=self.seed)
        rows = max(1, -(-want // self._calibration.shape[1]))
        return self._calibration[:rows]


class Pass:
    """Base class of all passes (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs_raised: ClassVar[bool] = True
    """Whether the pass works on ``headsmith.attention`` sites (and so needs a raised program)."""
    float_weights: ClassVar[bool] = True
    """Whether the pass reads or edits float linear weights (slices, fits, trains them), so it cannot run on a
    program whose linears are already quantised."""
    head_layout: ClassVar[bool] = False
    """Whether the pass rewrites each layer's heads as one attention op (merges, factors or removes heads), so it
    cannot run on a layer a per-head pattern split into head groups (``passes/head_groups.py``)."""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={format_value(value)}")
        return f"{self.name}({', '.join(parts)})" if parts else self.name

    @classmethod
    def options(cls) -> list[Option]:
        """The options of this pass with their types, defaults and docs."""
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else None
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            out.append(Option(f.name, hints.get(f.name, Any), default, required, docs.get(f.name, "")))
        return out

    @classmethod
    def doc(cls) -> str:
        text = inspect.getdoc(cls) or ""
        return text.strip().splitlines()[0] if text.strip() else ""


@dataclass(frozen=True)
class Option:
    name: str
    type: Any
    default: Any
    required: bool
    doc: str

    def type_name(self) -> str:
        return type_name(self.type)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " | none"
    if origin is tuple:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        if value.replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum():
            return value
        return repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right below a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def assert_close_outputs(a: Tensor, b: Tensor, valid: Tensor | None, atol: float) -> float:
    """The max abs difference over valid positions (``valid[B,S]`` bool), for exact checks."""
    if valid is not None:
        a, b = a[valid], b[valid]
    return float((a - b).abs().max()) if a.numel() else 0.0


def kl_top1_cos(ref_logits: Tensor, logits: Tensor, valid: Tensor | None) -> dict[str, float]:
    """KL(ref || new) in nats per token, top-1 agreement, and mean cosine of the logit vectors."""
    if valid is not None:
        ref_logits, logits = ref_logits[valid], logits[valid]
    ref_logits = ref_logits.reshape(-1, ref_logits.shape[-1]).double()
    logits = logits.reshape(-1, logits.shape[-1]).double()
    p_log = torch.log_softmax(ref_logits, -1)
    q_log = torch.log_softmax(logits, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean()
    cos = torch.nn.functional.cosine_similarity(ref_logits, logits, dim=-1).mean()
    return {"kl": float(kl), "top1_agreement": float(top1), "cosine": float(cos)}
