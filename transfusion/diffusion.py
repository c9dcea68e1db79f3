"""Diffusion maths, outside the network: schedules, noising, timestep sampling and sampler steps.

The model only predicts; this module noises and steps. Shape legend: N images; x tensors are
(N, C, H, W) (any trailing dims broadcast); t is a LongTensor (N,).

Conventions (those of diffusers): timesteps t = 0 .. T-1 with ``alpha_bar[t] = prod_{i<=t} (1 - beta_i)``,
so t = 0 is almost clean and t = T-1 almost pure noise. The cosine schedule is Nichol & Dhariwal
(2021): ``alpha_bar(t) = f(t + 1) / f(0)``, ``f(u) = cos(((u / T + s) / (1 + s)) * pi / 2)^2``, s = 0.008,
betas clipped at 0.999 (PAPER.md: 1000 steps, cosine, epsilon target). Flow matching (an option)
uses ``x_s = (1 - s) x0 + s noise`` with ``s = (t + 1) / T`` and a velocity target ``noise - x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from transfusion.config import DiffusionConfig


@dataclass
class NoiseSchedule:
    betas: Tensor  # (T,) float64
    alphas_cumprod: Tensor  # (T,) float64

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        return make_schedule(cfg.schedule, cfg.num_train_timesteps)


def make_schedule(kind: str | DiffusionConfig = "cosine", num_timesteps: int = 1000) -> NoiseSchedule:
    """'cosine' (Nichol & Dhariwal 2021) or 'linear' (DDPM: betas 1e-4 .. 0.02), in float64."""
    if isinstance(kind, DiffusionConfig):
        kind, num_timesteps = kind.schedule, kind.num_train_timesteps
    T = num_timesteps
    if kind == "cosine":
        s = 0.008

        def f(u: float) -> float:
            return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {kind!r}; use 'cosine' or 'linear'")
    return NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0))


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped to broadcast over ``like`` (N, ...), in like's dtype and device."""
    v = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return v.view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    ab = _gather(schedule.alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def predict_x0(x_t: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    ab = _gather(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def predict_eps(x_t: Tensor, x0: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    ab = _gather(schedule.alphas_cumprod, t, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def sample_timesteps(
    n: int, num_timesteps: int, generator: torch.Generator | None = None, max_t: Tensor | int | None = None
) -> Tensor:
    """Uniform integers in [0, max_t] (inclusive; default T - 1), per sample when max_t is a tensor.

    The paper's noise limit: images placed before their caption get max_t = 500."""
    hi = torch.full((n,), num_timesteps - 1, dtype=torch.long) if max_t is None else torch.as_tensor(max_t)
    hi = hi.expand(n).long().cpu()
    if (hi < 0).any() or (hi >= num_timesteps).any():
        raise ValueError(f"max_t must lie in 0..{num_timesteps - 1}")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.minimum((u * (hi + 1).double()).long(), hi)


def flow_sigma(t: Tensor, num_timesteps: int) -> Tensor:
    """Integer timestep -> noise level s in (0, 1] for flow matching: s = (t + 1) / T."""
    return (t.double() + 1) / num_timesteps


def training_target(
    objective: str, x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor]:
    """(noisy input, regression target) for 'ddpm' (epsilon) or 'flow' (velocity noise - x0)."""
    if objective == "ddpm":
        return add_noise(x0, noise, t, schedule), noise
    if objective == "flow":
        s = flow_sigma(t, schedule.num_timesteps).to(x0.dtype).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise, noise - x0
    raise ValueError(f"unknown objective {objective!r}; use 'ddpm' or 'flow'")


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def sampling_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` timesteps, strictly descending from T - 1 to 0, evenly spaced ("trailing")."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    ts = [round(num_timesteps - 1 - i * (num_timesteps - 1) / (num_steps - 1)) for i in range(num_steps)]
    return ts


def ddpm_step(
    eps: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral step from t to t_prev (t_prev = -1: the clean end, no noise added), for skipped steps:
    beta_eff = 1 - ab_t / ab_prev, mean from the predicted x0, variance beta_eff (1 - ab_prev) / (1 - ab_t)."""
    ab_t = schedule.alphas_cumprod[t].item()
    ab_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    beta = 1 - ab_t / ab_prev
    x0 = (x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (
        math.sqrt(ab_t / ab_prev) * (1 - ab_prev) / (1 - ab_t)
    ) * x_t
    if t_prev < 0:
        return mean
    var = beta * (1 - ab_prev) / (1 - ab_t)
    z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
    return mean + math.sqrt(var) * z


def ddim_step(
    eps: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021); deterministic for eta = 0."""
    ab_t = schedule.alphas_cumprod[t].item()
    ab_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
    x0 = (x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
    if sigma > 0 and t_prev >= 0:
        out = out + sigma * torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
    return out


def flow_step(v: Tensor, s: float, s_prev: float, x: Tensor) -> Tensor:
    """Euler step of dx/ds = v from noise level s to s_prev."""
    return x + (s_prev - s) * v


class Sampler:
    """The timesteps to condition on, and one step at a time: ``x = sampler.step(pred, i, x, gen)``."""

    def __init__(self, name: str, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0):
        if name not in ("ddpm", "ddim", "flow"):
            raise ValueError(f"unknown sampler {name!r}; use 'ddpm', 'ddim' or 'flow'")
        self.name, self.schedule, self.eta = name, schedule, eta
        self.timesteps = sampling_timesteps(schedule.num_timesteps, num_steps)

    def step(
        self, model_output: Tensor, i: int, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        t = self.timesteps[i]
        t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        if self.name == "ddpm":
            return ddpm_step(model_output, t, t_prev, x, self.schedule, generator)
        if self.name == "ddim":
            return ddim_step(model_output, t, t_prev, x, self.schedule, self.eta, generator)
        T = self.schedule.num_timesteps
        s_prev = (t_prev + 1) / T if t_prev >= 0 else 0.0
        return flow_step(model_output, (t + 1) / T, s_prev, x)


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, objective: str = "ddpm") -> Sampler:
    """A sampler that fits the training objective: ddpm/ddim for 'ddpm' models, flow for 'flow' ones."""
    if (objective == "flow") != (name == "flow"):
        raise ValueError(
            f"sampler {name!r} does not fit a model trained with objective {objective!r}; "
            + ("use --sampler flow" if objective == "flow" else "use --sampler ddpm or ddim")
        )
    return Sampler(name, schedule, num_steps)
