"""``heal(steps=..., lr=..., seq_len=..., text=...)``: short distillation of a rewritten program. Lossy.

The program before the first pass of the pipeline (``ctx.source``) is the teacher. The student (this program)
is trained to match the teacher's next-token distribution, loss ``KL(teacher || student)`` per token, with
AdamW on batches of ``batch`` x ``seq_len`` tokens of calibration text. ``autocast=auto`` runs the student's
forward and backward under bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX: a step is several times
faster there) and in fp32 elsewhere, where emulated bf16 would be slower; ``bf16`` and ``off`` force either
branch on any CPU (the tests run both). The weights and the optimizer state stay fp32 either way. Training stops after ``steps`` or ``minutes``,
whichever comes first. The report gives KL, top-1 agreement and perplexity on held-out text (the bundled
evaluation text) before and after, and the wall time. Encoders are healed on their hidden states (MSE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..errors import PassError
from ..fxutil import set_tensor
from ..program import Program
from .base import Pass, PassContext, PassResult
from .calib import trainable


@dataclass(frozen=True)
class Heal(Pass):
    """Distil the rewritten program from the original (KL on calibration text) for a few minutes. Lossy."""

    name: ClassVar[str] = "heal"
    exact: ClassVar[bool] = False
    needs_raised: ClassVar[bool] = False

    steps: int = 100
    """Optimizer steps (upper bound; see ``minutes``)."""
    lr: float = 1e-4
    """AdamW learning rate (cosine decay over the steps or the minutes, after a warm-up of 5% of the steps, at most 10)."""
    seq_len: int = 256
    """Tokens per training row."""
    batch: int = 4
    """Rows per step."""
    minutes: float = 0.0
    """Stop after this much wall time (0: no limit)."""
    text: str = ""
    """Training text file (default: the bundled calibration text)."""
    train: Literal["all", "attention"] = "all"
    """Which weights to train: all, or only the attention projections."""
    autocast: Literal["auto", "bf16", "off"] = "auto"
    """bf16 autocast for the student's forward and backward: auto (where the CPU has native bf16), bf16, off."""
    eval_tokens: int = 1024
    """Held-out tokens for the before/after report (0: skip)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 2 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps, batch >= 1, seq_len >= 2 and lr > 0 are required")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        teacher = ctx.source
        if teacher is None or teacher is program:
            raise PassError("heal needs an earlier pass to undo: it distils the program from the one the pipeline "
                            "started with", "put heal after a lossy pass, e.g. 'gqa(kv_heads=1), heal(steps=100)'")
        from ..corpus import CALIBRATION_TEXT, read_text, tokenize
        student = program.clone()
        names = self._targets(student)
        params = trainable(student.gm, names)
        text = read_text(Path(self.text) if self.text else None, CALIBRATION_TEXT)
        rows = self._rows(student, text)
        report: dict[str, object] = {"trained_tensors": len(params),
                                     "trained_params": int(sum(p.numel() for p in params))}
        if self.eval_tokens > 0 and student.tokenizer is not None:
            from ..corpus import EVAL_TEXT
            held_out = tokenize(student.tokenizer, EVAL_TEXT.read_text(), self.eval_tokens)
            report["before"] = _held_out_metrics(teacher, student, held_out)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        warm = max(1, min(self.steps // 20, 10))  # warm-up steps (at most 10: a time budget may allow few)

        def lr_at(step: int, elapsed: float) -> float:
            """Warm-up, then cosine decay over the steps or the time budget, whichever runs out first."""
            done = step / max(1, self.steps)
            if self.minutes > 0:
                done = max(done, elapsed / (self.minutes * 60))
            return self.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        g = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(rows.shape[0], generator=g)
        start = time.perf_counter()
        losses: list[float] = []
        use_bf16 = self.autocast == "bf16" or (self.autocast == "auto" and native_bf16())
        for step in range(self.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, time.perf_counter() - start)
            pick = order[(torch.arange(self.batch) + step * self.batch) % rows.shape[0]]
            ids = rows[pick]
            ids, pos, mask = student.make_inputs(ids)
            with torch.no_grad():
                target = teacher.gm(ids, pos, mask)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                out = student.gm(ids, pos, mask)
            loss = _loss(target, out.float(), student.info.task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                ctx.say(f"heal step {step}/{self.steps}: loss {losses[-1]:.4f}")
            if self.minutes > 0 and time.perf_counter() - start > self.minutes * 60:
                break
        for name, p in zip(names, params):
            set_tensor(student.gm, name, p.detach())
        student.gm.recompile()
        report.update(steps=len(losses), train_seconds=round(time.perf_counter() - start, 1),
                      loss_first=losses[0], loss_last=sum(losses[-5:]) / len(losses[-5:]), bf16=use_bf16)
        if "before" in report:
            report["after"] = _held_out_metrics(teacher, student, held_out)
        return PassResult(student, modified=True, count=len(losses), report=report)

    def _targets(self, program: Program) -> list[str]:
        params = {id(p) for p in program.gm.parameters()}
        names = [n for n, t in program.weights().items() if id(t) in params and t.is_floating_point()]
        if self.train == "attention":
            keep: set[str] = set()
            for site in program.sites():
                for proj in (site.q, site.k, site.v, site.o):
                    if proj is not None:
                        keep.update(x for x in (proj.weight, proj.bias) if x is not None)
            names = [n for n in names if n in keep]
        return names

    def _rows(self, program: Program, text: str) -> Tensor:
        from ..corpus import tokenize
        if program.tokenizer is None:
            g = torch.Generator().manual_seed(0)
            return torch.randint(0, program.info.vocab_size, (256, self.seq_len), generator=g)
        ids = tokenize(program.tokenizer, text)
        n = ids.numel() // self.seq_len
        if n < self.batch:
            raise PassError(f"the training text has {ids.numel()} tokens, fewer than one batch "
                            f"({self.batch} x {self.seq_len})", "give a longer text= or a smaller batch")
        return ids[: n * self.seq_len].reshape(n, self.seq_len)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _loss(target: Tensor, out: Tensor, task: str) -> Tensor:
    if task == "encoder":
        return (out - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)
    t_log = torch.log_softmax(target.float(), -1)
    s_log = torch.log_softmax(out, -1)
    return (t_log.exp() * (t_log - s_log)).sum(-1).mean()


@torch.no_grad()
def _held_out_metrics(teacher: Program, student: Program, ids: Tensor) -> dict[str, float]:
    from ..eval.metrics import perplexity
    if student.info.task == "encoder":
        x = ids[None, :256]
        _, pos, mask = student.make_inputs(x)
        a, b = teacher.gm(x, pos, mask), student.gm(x, pos, mask)
        return {"hidden_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())}
    window = min(512, student.info.max_positions or 512)
    res = perplexity(lambda i, m, p: student.gm(i, p, m), ids, window=window,
                     reference=lambda i, m, p: teacher.gm(i, p, m))
    return {k: float(v) for k, v in res.items() if k in ("perplexity", "kl", "top1_agreement", "source_perplexity")}

