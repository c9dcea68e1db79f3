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
from dataclasses import dataclass, field
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


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, never on norms or biases. ``fused`` (by default
    wherever every parameter is fp32 on a CPU or CUDA device): one kernel per parameter instead of a
    dozen passes over it (on the CPU the update of a 10M-parameter model takes 8 ms instead of 25)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if fused is None:
        fused = bool(params) and all(
            p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params
        )
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


@dataclass
class StepResult:
    text_loss: float
    """Mean over the micro-batches (this process)."""
    image_loss: float
    grad_norm: float
    """Before clipping: the global norm, the same on every process (FSDP2 included)."""
    finite: bool
    """False when the update was skipped (a non-finite loss or gradient on some process)."""
    tokens: int
    """Positions processed by this process (rows x row length x micro-batches)."""
    bad_ranks: list[int] = field(default_factory=list)
    """The processes whose loss was not finite (empty when only the gradient norm was not)."""


class BadSteps:
    """Counts non-finite steps; more than ``limit`` in a row raises ``TrainingStopped``."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.in_row, self.total = limit, 0, total

    def record(self, finite: bool, step: int, where: str = "", bad_ranks: list[int] | None = None) -> None:
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        what = (
            f"non-finite loss on rank {', '.join(map(str, bad_ranks))}"
            if bad_ranks
            else "non-finite gradient"
        )
        D.print0(f"step {step}: {what}, update skipped on every rank ({self.in_row} in a row)")
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

    ``model`` may be DDP-wrapped or FSDP2-sharded (and its blocks compiled in place). Gradients leave
    the process on the last micro-batch only (``D.gradient_sync``). Every process runs the same
    collectives in the same order whatever its batches hold: a text-only micro-batch still gives every
    parameter a gradient (``Transfusion.idle_image_term``), the global gradient norm is made whole on
    every process, and one all-reduce of every process's loss flag decides the step, so the update is
    skipped everywhere together when any loss or the norm is not finite. The losses and the norm reach
    the host once, at the end (no ``.item()`` per micro-batch). Gradients are cleared after the step."""
    batches = list(batches)
    for group in optimizer.param_groups:
        group["lr"] = lr
    parts, tokens = [], 0
    for i, batch in enumerate(batches):
        with D.gradient_sync(model, sync=i == len(batches) - 1), autocast or nullcontext():
            losses = training_loss(model, batch, schedule, diffusion)
            (losses.total / len(batches)).backward()
        parts.append(torch.stack([losses.text.detach(), losses.image.detach()]).float())
        tokens += batch.ids.numel()
    grad_norm = D.clip_grad_norm(model.parameters(), grad_clip)
    stats = torch.cat([torch.stack(parts).mean(0), grad_norm.detach().float().reshape(1).to(parts[0].device)])
    text, image, norm = stats.tolist()  # the step's one wait for the device
    bad_ranks = D.ranks_where(not (math.isfinite(text) and math.isfinite(image)))
    finite = not bad_ranks and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(text, image, norm, finite, tokens, bad_ranks)
