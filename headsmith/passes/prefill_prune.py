"""``prefill-prune(layers=[10], keep=[0.5], window=32)``: from a chosen layer on, the prompt tokens the
last ones attend to least stop flowing through the prefill, so time to first token drops.

LazyLLM (Fu et al., 2024) observes that the attention of the prompt's last tokens, the ones that predict the
first generated token, concentrates on a small part of a long prompt, and that which part is already visible in
the middle layers. So the prefill runs in *stages*: before layer ``L`` the tokens are ranked by the attention the
last ``window`` prompt queries paid them in layer ``L - 1`` (all heads together, smoothed over neighbouring
positions), and only the top ``keep`` fraction of the prompt goes through the later layers: their Q, K, V, MLP
and, for the layers after, their cache are never computed. Pruning is progressive: each later stage keeps a
subset of the previous one's tokens. The selection, the stages and the cache they leave are described in
:mod:`headsmith.token_pruning`.

The program's graph is unchanged (a cache-less forward is exact); the lowering cuts the prefill into one graph
per stage at the residual stream entering each pruning layer (``passes/prefill_stages.py``), and the runtime
gathers the kept tokens between them. Before / after, one pruning layer ``L`` of ``N``::

    prefill(ids, pos, mask) -> logits, presents[0..N)        prefill_stage0(ids, pos, mask)
                                                                 -> h_L, presents[0..L), scores_layer{L-1}
                                                 ->          # runtime: i = top(scores); h, pos, mask = h[i], ..
                                                             prefill_stage1(h, pos[i], mask[i])
                                                                 -> logits, presents[L..N)     # K of S tokens

and the decode graph's layers ``L..N`` read their own key mask ``prune_mask_stage1[B, K + T]``: a generated
token attends to every prompt token in the early layers and to the kept ones in the later layers, which is
LazyLLM's decode without its auxiliary cache (pruned tokens are not revived).

Scope: causal LMs whose layers keep a full cache (no sliding window, sinks, blocks or head groups), on the ONNX
Runtime and torch engines. Not with ``kv-evict`` (both decide which prompt tokens the cache keeps) nor with speculative drafts (a
draft's layers would need the stage masks too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..errors import PassError
from ..program import Program
from ..sites import attention_by_layer
from ..token_pruning import PrunePlan
from .base import Pass, PassContext, PassResult
from .kv_evict import check_evictable
from .structure import find_blocks


@dataclass(frozen=True)
class PrefillPrune(Pass):
    """Progressive prompt-token pruning in prefill (LazyLLM): later layers run on the tokens that matter."""

    name: ClassVar[str] = "prefill-prune"
    exact: ClassVar[bool] = True  # the graph is unchanged; the staged prefill is what drops tokens
    float_weights: ClassVar[bool] = False

    layers: tuple[int, ...] = ()
    """The first layer of each pruned stage, ascending (default: the layer a third of the way down the stack)."""
    keep: tuple[float, ...] = (0.5,)
    """Per pruning layer, the fraction of the prompt that keeps flowing (non-increasing)."""
    window: int = 32
    """The last prompt queries whose attention ranks the tokens; always kept."""
    kernel: int = 7
    """Positions pooled around each score (odd; 1: none)."""
    pool: str = "max"
    """``max`` or ``avg`` pooling."""
    heads: str = "sum"
    """How a token's score combines the KV heads: ``sum`` or ``max`` (what one head pays it most)."""

    def __post_init__(self) -> None:
        self.plan(n_layers=3)  # checks the options (the default layer is the model's, found in run)

    def plan(self, n_layers: int) -> PrunePlan:
        layers = tuple(self.layers) or (max(1, n_layers // 3),)
        return PrunePlan(layers, tuple(self.keep), self.window, self.kernel, self.pool, self.heads)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        plan = self.plan(len(attention_by_layer(program.gm.graph)))
        check_prunable(program, plan)
        new = dataclasses.replace(program.clone(), prefill_prune=plan)
        ctx.say("prefill-prune: " + ", ".join(f"layers {a}.. keep {k:.1%}" for a, k in zip(plan.layers, plan.keep)))
        return PassResult(new, modified=True, count=len(plan.layers), report={
            "plan": plan.to_dict(), "note": "the graph is unchanged; measure with eval --continuation / bench"})


def check_prunable(program: Program, plan: PrunePlan) -> None:
    """Refuse programs the staged prefill cannot serve (see the module docstring's scope)."""
    if program.info.task != "causal-lm":
        raise PassError(f"prefill-prune prunes a causal LM's prompt; {program.info.architecture} is an encoder",
                        "for encoders use token-merge")
    if program.prefill_prune is not None and program.prefill_prune != plan:
        raise PassError("the program already prunes its prefill", "give prefill-prune once, with all its layers")
    if program.kv_policy is not None:
        raise PassError(f"prefill-prune and kv-evict({program.kv_policy.method}) both choose the prompt tokens the "
                        "cache keeps", "use one of them")
    if program.drafts:
        raise PassError("prefill-prune is not built with speculative drafts (their layers would need the stage "
                        "key masks)", "drop draft(...), or prefill-prune")
    check_evictable(program)
    n = len(attention_by_layer(program.gm.graph))
    if plan.layers[-1] >= n:
        raise PassError(f"prefill-prune: no layer {plan.layers[-1]} (the model has layers 0..{n - 1})",
                        "give layers=[...] between 1 and the last layer")
    blocks = find_blocks(program)
    if len(blocks) != n:
        raise PassError(f"prefill-prune cuts the prefill between blocks, but {len(blocks)} blocks were found for "
                        f"{n} attention layers", "apply it to a plain stack of transformer blocks")
