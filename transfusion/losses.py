"""The Transfusion objective: text cross-entropy + lambda * diffusion MSE (PAPER.md: lambda = 5).

Both parts are reported separately. The text loss is the mean over every position that has a
target (no loss on the prediction made at a BOI input, none on padding: ``pack`` marks them). The
diffusion loss is a mean per image, then a mean over images, so every image weighs the same
whatever its number of patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion import diffusion
from transfusion.config import DiffusionConfig
from transfusion.sequence import IGNORE, MixedBatch


@dataclass
class Losses:
    total: Tensor
    text: Tensor
    image: Tensor
    text_tokens: Tensor
    """Positions with a text target (0-d: counting them on the host would make a GPU wait)."""
    images: int


def text_nll(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(summed negative log-likelihood in nats, number of scored positions), both 0-d tensors, over
    the positions whose target is not IGNORE; logits (..., V), targets (...). No host sync: on a GPU
    nothing waits for the count."""
    targets = targets.to(logits.device)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll, (targets != IGNORE).sum()


def text_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE; 0 when there are none."""
    nll, n = text_nll(logits, targets)
    return nll / n.clamp(min=1)


def per_image_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each image over (C, H, W): (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def image_loss(pred: Tensor, target: Tensor, conditions: Tensor | None = None) -> Tensor:
    """Mean squared error per image (over C, H, W), then averaged over images; 0 without images.
    ``conditions`` (N,) marks inputs that carry no loss (``Image.condition``): the mean is over the
    others (0 when there are none), without a host sync."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    mse = per_image_mse(pred, target)
    if conditions is None:
        return mse.mean()
    scored = (~conditions.to(mse.device)).float()
    return (mse * scored).sum() / scored.sum().clamp(min=1)


def combine(text: Tensor, image: Tensor, loss_weight: float) -> Tensor:
    return text + loss_weight * image


def draw_noise(
    batch: MixedBatch, cfg: DiffusionConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Timesteps (N,) and noise (N, C, H, W) for the batch's images, on the CPU.

    An image with a seed draws both from its own generator, so they follow the sample wherever it is
    trained; the others draw from ``generator``. Fixed timesteps (t >= 0) are kept. Images placed
    before their caption draw t <= noise_limit (``diffusion.sample_timesteps(limited=...)``). What
    it reads of the batch comes from its host copy (``MixedBatch.on_host``): no wait for a GPU."""
    N, shape = batch.num_images, tuple(batch.latents.shape[1:])
    host = batch.on_host()
    limited = host.noise_limited
    seeds = host.noise_seeds if host.noise_seeds is not None else torch.full((N,), -1)
    t = diffusion.sample_timesteps(N, cfg, generator, limited=limited)
    noise = torch.randn((N, *shape), generator=generator)
    for i in (seeds >= 0).nonzero().flatten().tolist():
        g = torch.Generator().manual_seed(int(seeds[i]))
        t[i] = diffusion.sample_timesteps(1, cfg, g, limited=limited[i : i + 1])[0]
        noise[i] = torch.randn(shape, generator=g)
    fixed = host.timesteps
    return torch.where(fixed >= 0, fixed, t), noise


def noised(
    batch: MixedBatch,
    schedule: diffusion.NoiseSchedule,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> tuple[MixedBatch, Tensor]:
    """The batch with every image noised at its timestep (``draw_noise``), and the regression target
    the model's image output is trained towards (noise or velocity, per ``cfg.objective``)."""
    device = batch.latents.device
    t, noise = draw_noise(batch, cfg, generator)
    t, noise = t.to(device), noise.to(device=device, dtype=batch.latents.dtype)
    x_t, target = diffusion.training_target(cfg.objective, batch.latents, noise, t, schedule)
    if batch.conditions is not None:  # inputs stay clean (at t = 0, as decoding reads a prompt image)
        x_t = torch.where(batch.conditions.to(device)[:, None, None, None], batch.latents, x_t)
    return batch.replace(latents=x_t, timesteps=t), target


def training_loss(
    model: nn.Module,
    batch: MixedBatch,
    schedule: diffusion.NoiseSchedule,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> Losses:
    """Noise every image at a sampled timestep, run the model, return both losses.

    Images with a fixed ``t`` keep it; the others draw t uniformly, up to the noise limit for
    images placed before their caption. Condition images (an edit's input) stay clean, without a loss.
    """
    N = batch.num_images
    if N:
        batch, target = noised(batch, schedule, cfg, generator)
    out = model(batch)
    lt = text_loss(out.logits, batch.text_targets)
    count = (batch.text_targets != IGNORE).sum()
    li = image_loss(out.image_pred, target, batch.conditions) if N else out.image_pred.sum() * 0.0
    return Losses(total=combine(lt, li, cfg.loss_weight), text=lt, image=li, text_tokens=count, images=N)
