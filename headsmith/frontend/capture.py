"""Capture a Hugging Face model as an FX GraphModule with ``torch.export``.

The model is wrapped so that the graph has exactly three inputs, ``input_ids[B,S]``,
``position_ids[B,S]`` and ``attention_mask[B,S]`` (int64, 1 = token, 0 = padding), all with dynamic
batch and sequence dims, and one output (logits, or the last hidden state for encoders). Passing the
mask explicitly keeps transformers' packed-sequence detection (``aten.diff`` + bool ``cumsum``, which
ONNX and TVM reject) out of the graph. The graph keeps ``aten.scaled_dot_product_attention`` intact:
it is not decomposed, so the raise pass can find attention as one node.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, fx

from ..errors import LoadError
from ..fxutil import erase_dead
from ..program import INPUT_NAMES, Program, default_positions
from .load import Loaded


class CausalLMGraph(torch.nn.Module):
    """``(input_ids, position_ids, attention_mask) -> logits``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=False)
        return out.logits


class EncoderGraph(torch.nn.Module):
    """``(input_ids, position_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        return out.last_hidden_state


def capture(loaded: Loaded, seq: int = 16) -> tuple[Program, float]:
    """Export ``loaded.model``; returns the (unraised) Program and the export time in seconds."""
    info = loaded.info
    wrapper = CausalLMGraph(loaded.model) if info.task == "causal-lm" else EncoderGraph(loaded.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.int64)
    pos = default_positions(mask, info.task)
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    start = time.perf_counter()
    try:
        ep = torch.export.export(wrapper, (ids, pos, mask), dynamic_shapes=(dyn, dyn, dyn), strict=False)
    except Exception as e:  # torch.export raises many error types; report the first line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LoadError(f"torch.export could not capture {info.architecture}: {first}",
                        "this architecture's forward is not exportable with dynamic shapes") from None
    gm = ep.module()
    elapsed = time.perf_counter() - start
    _strip_guards(gm)
    program = Program(gm=gm, info=info, source=loaded.source, tokenizer=loaded.tokenizer)
    return program, elapsed


def _strip_guards(gm: fx.GraphModule) -> None:
    """Drop export's guard call and rename the placeholders to the canonical input names."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, INPUT_NAMES):
        node.name = name
        node.target = name
    erase_dead(graph)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # ep.module() keeps pytree in/out specs; a plain positional codegen is simpler for every consumer.
    graph._codegen = fx.graph.CodeGen()
    out = graph.output_node()
    result = out.args[0]
    if isinstance(result, (list, tuple)) and len(result) == 1:
        out.args = (result[0],)
    gm.recompile()
