"""One optimizer step, written once: used by the training loop, the demo's calibration and the
benchmark, so that what is timed is what users run.

AdamW with the paper's settings (PAPER.md: betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices),
a linear warm-up then cosine decay to ``min_lr``, gradient accumulation over micro-batches, clipping
at ``grad_clip``, and bad-step handling: a non-finite loss or gradient on any process skips the
update everywhere, and too many in a row stop the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfusion import distributed as D
from transfusion.config import DiffusionConfig, TrainConfig
from transfusion.diffusion import NoiseSchedule
from transfusion.errors import UserError
from transfusion.losses import training_loss
from transfusion.sequence import MixedBatch


class TrainingStopped(UserError):
    """Too many non-finite losses in a row (printed as one line by the CLI)."""


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up from peak / warmup to ``peak`` over ``warmup`` steps, then cosine decay to
    ``floor`` at ``total``; any step counts (a warm-up as long as the run, a run of one step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, never on norms or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


@dataclass
class StepResult:
    text_loss: float
    """Mean over the micro-batches (this process)."""
    image_loss: float
    grad_norm: float
    """Before clipping."""
    finite: bool
    """False when the update was skipped (a non-finite loss or gradient on some process)."""
    tokens: int
    """Positions processed by this process (rows x row length x micro-batches)."""


class BadSteps:
    """Counts non-finite steps; more than ``limit`` in a row raises ``TrainingStopped``."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.in_row, self.total = limit, 0, total

    def record(self, finite: bool, step: int, where: str = "") -> None:
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        D.print0(f"step {step}: non-finite loss or gradient, update skipped ({self.in_row} in a row)")
        if self.in_row > self.limit:
            raise TrainingStopped(
                f"{self.in_row} non-finite steps in a row (train.max_bad_steps={self.limit}); "
                f"the last good checkpoint is in {where or 'the run directory'}; lower train.lr or check the data"
            )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[MixedBatch],
    schedule: NoiseSchedule,
    diffusion: DiffusionConfig,
    *,
    lr: float,
    grad_clip: float,
    autocast: Any = None,
) -> StepResult:
    """One optimizer step over the micro-batches ``batches`` (their gradients averaged).

    ``model`` may be DDP-wrapped or FSDP2-sharded (and its blocks compiled in place). Under DDP
    gradients are all-reduced on the last micro-batch only. The update is skipped, on every process together, when
    any loss or the gradient norm is not finite. Gradients are cleared after the step."""
    batches = list(batches)
    for group in optimizer.param_groups:
        group["lr"] = lr
    text = image = 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        with D.no_sync(model, skip=i < len(batches) - 1), autocast or nullcontext():
            losses = training_loss(model, batch, schedule, diffusion)
            (losses.total / len(batches)).backward()
        text += losses.text.item() / len(batches)
        image += losses.image.item() / len(batches)
        tokens += batch.ids.numel()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = D.all_true(math.isfinite(text + image) and bool(torch.isfinite(grad_norm)))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(text, image, float(grad_norm), finite, tokens)
