"""A worked third-party pass: fold the softmax scale of every attention layer into its query projection.

``attention(q, k, v, scale=s)`` equals ``attention(s*q, k, v, scale=1)``; ``s*q`` comes from
``linear(x, s*W_q, s*b_q)`` because RoPE is linear and commutes with a scalar. A layer with a per-head
q norm (Gemma3) does not commute with scaling, so the check refuses it and the pass leaves it alone.

Run it::

    python examples/custom_pass.py smollm2-135m

or use it from the CLI after installing a package that declares it in its entry points::

    [project.entry-points."headsmith.passes"]
    fold-attention-scale = "my_package.passes:FoldAttentionScale"
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import headsmith
from headsmith.fxutil import get_tensor, set_tensor
from headsmith.passes import MatchResult, Pass, PassContext, PassResult, register_pass
from headsmith.program import Program
from headsmith.sites import AttentionSite


def check(site: AttentionSite) -> MatchResult:
    if site.qk_norm:
        return MatchResult.fail("a q norm sits between the projection and attention", site.node)
    if site.softcap > 0.0:
        return MatchResult.fail("softcap is applied to the scaled scores", site.node)
    if site.scale == 1.0:
        return MatchResult.fail("the scale is already 1", site.node)
    return MatchResult.success()


@register_pass
@dataclass(frozen=True)
class FoldAttentionScale(Pass):
    """Fold each attention layer's softmax scale into its query projection (scale becomes 1). Exact."""

    name: ClassVar[str] = "fold-attention-scale"
    exact: ClassVar[bool] = True

    factor: float = 1.0
    """Extra factor to multiply into the scale (1.0 keeps the model exact)."""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        new = program.clone()
        count = 0
        for site in new.sites():
            result = check(site)
            if not result:
                ctx.say(f"layer {site.layer}: skipped ({result.reason})")
                continue
            with ctx.at(site.node):
                scale = (site.scale if site.scale > 0 else 1.0 / math.sqrt(site.head_dim)) * self.factor
                set_tensor(new.gm, site.q.weight, get_tensor(new.gm, site.q.weight) * scale)
                if site.q.bias is not None:
                    set_tensor(new.gm, site.q.bias, get_tensor(new.gm, site.q.bias) * scale)
                site.node.update_kwarg("scale", 1.0)
                count += 1
        new.gm.recompile()
        return PassResult(new, modified=count > 0, count=count)


def main(model: str) -> None:
    program = headsmith.load(model)
    folded = program.apply("fold-attention-scale, dce")
    for report in folded.reports:
        print(report)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
