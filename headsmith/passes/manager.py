"""``PassManager``: run passes in order, wrap failures, and instrument every step.

Instruments see every pass before and after it runs:

- ``Verify``: exact passes must keep the outputs (max abs diff over non-padding positions within
  ``ctx.atol``, relative to the output's magnitude); lossy passes get KL divergence, top-1 agreement and
  logit cosine against their input on seeded calibration inputs, reported (and checked against
  ``ctx.kl_budget`` when set).
- ``Lint``: ``graph.lint()`` after every pass that changed the graph.
- ``Timing``: wall seconds per pass.
- ``Dump``: the printed graph before and after each pass, into ``ctx.dump_dir``.

A failure inside a pass becomes one :class:`~headsmith.errors.PassError` that names the pass spec,
the passes before it and the node being rewritten (the original exception is chained).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import HeadsmithError, PassError, VerificationError
from ..fxutil import format_near
from ..program import Program
from ..sites import head_groups
from .base import Pass, PassContext, PassResult, assert_close_outputs, kl_top1_cos


class Instrument:
    def before(self, p: Pass, program: Program, ctx: PassContext) -> None:
        del p, program, ctx

    def after(self, p: Pass, before: Program, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        del p, before, result, ctx
        return {}


@dataclass
class Timing(Instrument):
    started: float = 0.0

    def before(self, p: Pass, program: Program, ctx: PassContext) -> None:
        self.started = time.perf_counter()

    def after(self, p: Pass, before: Program, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        return {"seconds": round(time.perf_counter() - self.started, 3)}


@dataclass
class Dump(Instrument):
    index: int = 0

    def before(self, p: Pass, program: Program, ctx: PassContext) -> None:
        if ctx.dump_dir is None:
            return
        self.index += 1
        ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.dump_dir / f"{self.index:02d}-{p.name}-before.txt"
        path.write_text(program.gm.print_readable(print_output=False))

    def after(self, p: Pass, before: Program, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        if ctx.dump_dir is None:
            return {}
        path = ctx.dump_dir / f"{self.index:02d}-{p.name}-after.txt"
        path.write_text(result.program.gm.print_readable(print_output=False))
        return {"dump": str(path)}


#: set by the test suite's autouse fixture: verification cannot be switched off by a PassContext
FORCE_VERIFY = False


@dataclass
class Lint(Instrument):
    def after(self, p: Pass, before: Program, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        if result.modified:
            result.program.gm.graph.lint()
        return {}


@dataclass
class Verify(Instrument):
    batch: int = 2
    seq: int = 24

    def after(self, p: Pass, before: Program, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        if not (ctx.verify or FORCE_VERIFY) or not result.modified:
            return {}
        after = result.program
        if p.exact:
            ids, pos, mask = before.example_inputs(self.batch, self.seq, seed=ctx.seed, pad=3)
            with torch.no_grad():
                ref = before.gm(ids, pos, mask)
                out = after.gm(ids, pos, mask)
            diff = assert_close_outputs(ref, out, mask.bool(), ctx.atol)
            scale = max(1.0, float(ref.abs().max()))
            if diff > ctx.atol * scale:
                raise VerificationError(f"exact pass {p} changed the outputs: max abs diff {diff:.3g} "
                                        f"> {ctx.atol:g} x {scale:.3g}")
            return {"max_abs_diff": diff}
        ids = ctx.calibration(before)[:2]
        if after.token_merge is not None:  # a merged program runs at one length at most
            ids = ids[:, :after.token_merge.length]
        _, pos, mask = before.make_inputs(ids)
        with torch.no_grad():
            ref = before.gm(ids, pos, mask)
            out = after.gm(ids, pos, mask)
        if before.info.task == "encoder":
            cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean()
            return {"hidden_cosine": float(cos)}
        metrics = kl_top1_cos(ref, out, None)
        if ctx.kl_budget is not None and metrics["kl"] > ctx.kl_budget:
            raise VerificationError(f"lossy pass {p} exceeds the KL budget: {metrics['kl']:.4g} > "
                                    f"{ctx.kl_budget:g} nats/token")
        return metrics


DEFAULT_INSTRUMENTS: tuple[type[Instrument], ...] = (Timing, Lint, Verify, Dump)


@dataclass
class PassManager:
    passes: Sequence[Pass]
    instruments: list[Instrument] = field(default_factory=lambda: [cls() for cls in DEFAULT_INSTRUMENTS])

    @staticmethod
    def from_spec(spec: str | Sequence[Pass]) -> PassManager:
        from . import parse_passes
        passes = parse_passes(spec) if isinstance(spec, str) else list(spec)
        return PassManager(passes)

    def run(self, program: Program, ctx: PassContext | None = None) -> Program:
        ctx = ctx if ctx is not None else PassContext()
        if ctx.source is None:
            ctx.source = program
        done: list[str] = []
        for p in self.passes:
            if p.needs_raised and not program.raised:
                raise PassError(f"pass {p} needs a raised program (no headsmith.attention ops found)",
                                "load the model with raising enabled (the default)")
            if p.float_weights and program.quantized:
                done_q = next((d for d in reversed(done) if d.startswith("quantize")), "quantize")
                raise PassError(f"pass {p} edits float weights, but the program's linears are already quantised "
                                f"(by {done_q})", f"put quantize(...) last, after {p.name}: e.g. "
                                f"'{p}, {done_q}'")
            split = sorted(head_groups(program.gm.graph)) if p.head_layout else []
            if split:
                by = next((d for d in reversed(done) if d.startswith("sparse-attention")), "sparse-attention")
                raise PassError(f"pass {p} rewrites each layer's heads, but {len(split)} layers (first: {split[0]}) "
                                f"are split into head groups with different patterns (by {by})",
                                f"run {p.name} before the per-head pattern: e.g. '{p}, {by}'")
            ctx.say(f"running {p}")
            for inst in self.instruments:
                inst.before(p, program, ctx)
            result = self._run_one(p, program, ctx, done)
            report: dict[str, Any] = {"pass": str(p), "exact": p.exact, "count": result.count,
                                      "modified": result.modified, **result.report}
            for inst in self.instruments:
                report.update(inst.after(p, program, result, ctx))
            if result.count == 0 and p.needs_raised:
                ctx.warn(f"pass {p} matched 0 sites: the program is unchanged")
            program = dataclasses.replace(result.program, history=(*program.history, str(p)),
                                          reports=(*program.reports, report))
            done.append(str(p))
        return program

    @staticmethod
    def _run_one(p: Pass, program: Program, ctx: PassContext, done: list[str]) -> PassResult:
        after = f" (after {', '.join(done)})" if done else ""
        ctx.node = None
        try:
            result = p.run(program, ctx)
        except HeadsmithError as e:
            if isinstance(e, PassError) and e.message.startswith("pass "):
                raise
            raise PassError(f"pass {p} failed{after}{_node_text(ctx)}: {e.message}", e.hint) from e
        except Exception as e:  # wrap with the pass spec and node; the original stays chained
            raise PassError(f"pass {p} failed{after}{_node_text(ctx)}: {type(e).__name__}: {e}",
                            "this looks like a bug in the pass; rerun with --debug for the traceback") from e
        if not isinstance(result, PassResult):
            raise PassError(f"pass {p} returned {type(result).__name__}, not PassResult")
        if result.program is program and result.modified:
            raise PassError(f"pass {p} modified its input program in place; passes must work on a clone")
        return result


def _node_text(ctx: PassContext) -> str:
    if ctx.node is None:
        return ""
    return f" at node {ctx.node.name}\n{format_near(ctx.node)}\n "
