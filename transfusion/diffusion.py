"""Diffusion maths, outside the network: schedules, noising, timestep sampling and sampler steps.

The model only predicts; this module noises and steps. Everything here is a pure function of its
arguments (plus a ``torch.Generator`` where noise is drawn), except the small ``NoiseSchedule`` and
``Sampler`` holders.

Shape legend
    N        images in the batch (one timestep each)
    C, H, W  latent channels, height, width; every function accepts any trailing dims ``(N, ...)``
    T        training timesteps (``DiffusionConfig.num_train_timesteps``, 1000 in the paper)
    S        sampling steps (``DiffusionConfig.sample_steps``, 250 in the paper)

Index convention (diffusers'): integer timesteps ``t = 0 .. T-1`` and

    alpha_bar[t] = prod_{i <= t} (1 - beta_i),    x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) eps,

so ``t = 0`` is already one noising step away from clean (alpha_bar[0] = 1 - beta_0, about 0.99997
for the cosine schedule) and ``t = T-1`` is almost pure noise. Samplers use ``t_prev = -1`` for "clean"
(alpha_bar = 1): the last step of every sampler lands there. The cosine schedule then reads
``alpha_bar[t] = f(t + 1) / f(0)`` in Nichol & Dhariwal's notation (their alpha_bar at step t + 1).

Objectives (``DiffusionConfig.objective``)
    'ddpm'  epsilon prediction on the variance-preserving chain above (the paper's).
    'flow'  rectified flow: ``x_s = (1 - s) x0 + s noise``, velocity target ``noise - x0``, with the
            integer timestep the model is conditioned on mapped to ``s = (t + 1) / T`` in (0, 1], so the
            noise limit t <= 500 means s <= 0.501 and sampling ends with a step from s = 1/T to s = 0.

Samplers (``Sampler``/``make_sampler``) take one model output and return the next sample: 'ddpm'
(ancestral, generalised to skipped timesteps), 'ddim' (deterministic for eta = 0) and 'flow' (Euler).
Their timesteps are S integers evenly spaced from T-1 down to 0 (diffusers' ``timestep_spacing=
"linspace"``), see ``sampling_timesteps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from transfusion.config import DiffusionConfig

SCHEDULES = ("cosine", "linear")
OBJECTIVES = ("ddpm", "flow")
SAMPLERS = ("ddpm", "ddim", "flow")

COSINE_S = 0.008
"""Offset s of the cosine schedule (Nichol & Dhariwal 2021, section 3.2): keeps beta_0 from being tiny."""
MAX_BETA = 0.999
"""Betas are clipped here (Nichol & Dhariwal 2021) so the last steps of the cosine schedule stay finite."""
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
"""DDPM's linear betas (Ho et al. 2020) for T = 1000; scaled by 1000 / T otherwise (improved-diffusion)."""


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """betas and alpha_bar over T training timesteps, float64 on the CPU (see the module docstring).

    ``alphas_cumprod[t] = prod_{i <= t} (1 - betas[i])``. Per-sample coefficients for other devices and
    dtypes are derived from float64 tables (so ``1 - alpha_bar`` near t = 0 keeps its digits) and
    cached per (device, dtype)."""

    betas: Tensor  # (T,) float64
    alphas_cumprod: Tensor  # (T,) float64
    kind: str = "custom"
    _tables: dict[tuple[str, torch.device, torch.dtype], Tensor] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.betas.dim() != 1 or self.betas.shape != self.alphas_cumprod.shape or len(self.betas) == 0:
            raise ValueError("betas and alphas_cumprod must be 1-D tensors of the same non-zero length")
        if not ((self.betas > 0) & (self.betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")

    @classmethod
    def from_betas(cls, betas: Tensor, kind: str = "custom") -> NoiseSchedule:
        """A schedule from its betas (T,); alpha_bar is their cumulative product of (1 - beta), in float64."""
        betas = betas.detach().to("cpu", torch.float64)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0), kind=kind)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        """``make_schedule(cfg.schedule, cfg.num_train_timesteps)``."""
        return make_schedule(cfg.schedule, cfg.num_train_timesteps)

    @property
    def num_timesteps(self) -> int:
        """T."""
        return int(self.betas.shape[0])

    def alpha_bar(self, t: int) -> float:
        """alpha_bar[t] as a Python float; ``t = -1`` means clean (1.0), the end of every sampler."""
        _check_timestep(t, self.num_timesteps, allow_clean=True)
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def coefficients(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar[t]), sqrt(1 - alpha_bar[t])), each shaped (N, 1, ..., 1) to broadcast over
        ``like`` (N, ...), on like's device, in like's dtype (float32 for non-float ``like``)."""
        return self._per_sample("sqrt_ab", t, like), self._per_sample("sqrt_1m_ab", t, like)

    def _per_sample(self, name: str, t: Tensor | int, like: Tensor) -> Tensor:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (name, like.device, dtype)
        table = self._tables.get(key)
        if table is None:
            ab = self.alphas_cumprod
            table64 = ab.sqrt() if name == "sqrt_ab" else (1 - ab).sqrt()
            table = table64.to(dtype).to(like.device)  # cast first: some devices have no float64
            self._tables[key] = table
        t = torch.as_tensor(t, dtype=torch.long)
        if t.device.type == "cpu" and t.numel():  # on an accelerator this check would synchronise
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(
                    f"timesteps must lie in 0..{self.num_timesteps - 1}, got {lo}..{hi} "
                    "(-1 marks an image whose timestep has not been sampled yet)"
                )
        return table[t.to(like.device)].view(-1, *([1] * (like.dim() - 1)))


def cosine_betas(num_timesteps: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> Tensor:
    """Nichol & Dhariwal (2021), eq. 17: ``f(u) = cos(((u / T + s) / (1 + s)) * pi / 2)^2`` and
    ``beta_t = min(1 - f(t + 1) / f(t), max_beta)``, s = 0.008, max_beta = 0.999; float64 (T,)."""
    T = num_timesteps
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * (math.pi / 2)) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def linear_betas(num_timesteps: int) -> Tensor:
    """DDPM (Ho et al. 2020): betas evenly spaced from 1e-4 to 0.02 for T = 1000. For other T both ends
    are scaled by 1000 / T (Nichol & Dhariwal's improved-diffusion), so alpha_bar[T-1] stays near 0;
    clipped at 0.999 for T < 20. float64 (T,)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(
        scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps, dtype=torch.float64
    )
    return betas.clamp(max=MAX_BETA)


def make_schedule(kind: str | DiffusionConfig = "cosine", num_timesteps: int = 1000) -> NoiseSchedule:
    """'cosine' (Nichol & Dhariwal 2021, the paper's) or 'linear' (DDPM) over ``num_timesteps``; or pass a
    ``DiffusionConfig`` to take both from it."""
    if isinstance(kind, DiffusionConfig):
        kind, num_timesteps = kind.schedule, kind.num_train_timesteps
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if kind == "cosine":
        return NoiseSchedule.from_betas(cosine_betas(num_timesteps), kind="cosine")
    if kind == "linear":
        return NoiseSchedule.from_betas(linear_betas(num_timesteps), kind="linear")
    raise ValueError(f"unknown noise schedule {kind!r}; use one of {SCHEDULES} (DiffusionConfig.schedule)")


def _check_timestep(t: int, num_timesteps: int, allow_clean: bool = False) -> None:
    lo = -1 if allow_clean else 0
    if not lo <= t < num_timesteps:
        raise ValueError(f"timestep {t} is outside {lo}..{num_timesteps - 1}")


# ---------------------------------------------------------------------------------------------
# Noising (epsilon objective)
# ---------------------------------------------------------------------------------------------
def add_noise(x0: Tensor, noise: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """q(x_t | x0) (DDPM eq. 4): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``; x0, noise (N, ...), t (N,)."""
    a, b = schedule.coefficients(t, x0)
    return a * x0 + b * noise


def predict_x0(x_t: Tensor, eps: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """Clean sample implied by an epsilon prediction: ``(x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``."""
    a, b = schedule.coefficients(t, x_t)
    return (x_t - b * eps) / a


def predict_eps(x_t: Tensor, x0: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """Noise implied by a clean sample: ``(x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)``."""
    a, b = schedule.coefficients(t, x_t)
    return (x_t - a * x0) / b


# ---------------------------------------------------------------------------------------------
# Noising (flow objective)
# ---------------------------------------------------------------------------------------------
def flow_sigma(t: Tensor | int, num_timesteps: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Integer timestep t in 0..T-1 -> flow noise level ``s = (t + 1) / T`` in (0, 1], on t's device."""
    return (torch.as_tensor(t).to(dtype) + 1) / num_timesteps


def flow_add_noise(x0: Tensor, noise: Tensor, s: Tensor | float) -> Tensor:
    """Rectified-flow interpolation ``(1 - s) x0 + s noise``; s a float or (N,) broadcast over (N, ...)."""
    dtype = x0.dtype if x0.is_floating_point() else torch.float32
    s = torch.as_tensor(s).to(dtype).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity ``d x_s / d s = noise - x0``, the flow model's regression target."""
    return noise - x0


def training_target(
    objective: str, x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor]:
    """(noisy input x_t, regression target) for one training step, both (N, ...).

    'ddpm': ``add_noise(x0, noise, t)`` and the noise (epsilon). 'flow': ``flow_add_noise`` at
    ``s = (t + 1) / T`` and the velocity ``noise - x0``. t is (N,) in 0..T-1 for both."""
    if objective == "ddpm":
        return add_noise(x0, noise, t, schedule), noise
    if objective == "flow":
        dtype = x0.dtype if x0.is_floating_point() else torch.float32
        s = flow_sigma(t, schedule.num_timesteps, dtype=dtype)
        return flow_add_noise(x0, noise, s), flow_target(x0, noise)
    raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES} (DiffusionConfig.objective)")


# ---------------------------------------------------------------------------------------------
# Training timesteps
# ---------------------------------------------------------------------------------------------
def sample_timesteps(
    n: int,
    timesteps: int | NoiseSchedule | DiffusionConfig,
    generator: torch.Generator | None = None,
    max_t: Tensor | int | None = None,
    *,
    limited: Tensor | None = None,
    noise_limit: int | None = None,
    shift: float | None = None,
) -> Tensor:
    """n timesteps, each uniform over the integers 0..max_t (inclusive); a LongTensor (n,) on the CPU.
    With ``shift`` (default: the config's ``timestep_shift`` when a ``DiffusionConfig`` is passed, else
    1) the uniform draw u becomes ``shift u / (1 + (shift - 1) u)`` first: above 1, more large t.

    ``timesteps`` gives T (an int, a schedule or a config). ``max_t`` (an int or a per-sample (n,)
    tensor) defaults to T - 1. The paper's noise limit: rows where the boolean (n,) ``limited`` is True
    (images placed before their caption) draw t <= ``noise_limit`` (default: the config's
    ``noise_limit`` when a ``DiffusionConfig`` is passed; PAPER.md: 500). Draws use ``generator``
    (a CPU generator), one float64 uniform per row, so results are reproducible per seed."""
    if isinstance(timesteps, DiffusionConfig):
        T = timesteps.num_train_timesteps
        noise_limit = timesteps.noise_limit if noise_limit is None else noise_limit
        shift = timesteps.timestep_shift if shift is None else shift
    elif isinstance(timesteps, NoiseSchedule):
        T = timesteps.num_timesteps
    else:
        T = int(timesteps)
    hi = torch.full((n,), T - 1, dtype=torch.long) if max_t is None else torch.as_tensor(max_t).long().cpu()
    if hi.dim() == 0:
        hi = hi.expand(n)
    if hi.shape != (n,):
        raise ValueError(f"max_t must be an int or a tensor of shape ({n},), got {tuple(hi.shape)}")
    if n and (int(hi.min()) < 0 or int(hi.max()) >= T):
        raise ValueError(f"max_t must lie in 0..{T - 1}")
    if limited is not None:
        if noise_limit is None:
            raise ValueError("limited rows need a noise_limit (or pass a DiffusionConfig as timesteps)")
        limited = torch.as_tensor(limited, dtype=torch.bool).cpu()
        if limited.shape != (n,):
            raise ValueError(f"limited must be a boolean tensor of shape ({n},), got {tuple(limited.shape)}")
        if noise_limit < 0:
            raise ValueError(f"noise_limit must be >= 0, got {noise_limit}")
        hi = torch.where(limited, hi.clamp(max=min(noise_limit, T - 1)), hi)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if shift is not None and shift != 1:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        u = shift * u / (1 + (shift - 1) * u)
    return torch.minimum((u * (hi + 1).double()).long(), hi)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``uncond + scale * (cond - uncond)``; scale 1 is
    the conditional prediction alone (PAPER.md: 3 in the ablations, 5 against Chameleon)."""
    return uncond + scale * (cond - uncond)


def sampling_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """S = ``num_steps`` integer timesteps, strictly descending, evenly spaced from T - 1 to 0.

    ``t_i = round((T - 1) (S - 1 - i) / (S - 1))`` (halves round up), diffusers'
    ``timestep_spacing="linspace"``: the first step starts at the noisiest timestep T - 1, the last is
    t = 0 (then the sampler jumps to clean, t_prev = -1). S = 1 gives ``[T - 1]``: one jump from pure
    noise to the predicted x0. S = T gives every timestep."""
    T, S = num_timesteps, num_steps
    if not isinstance(S, int) or not 1 <= S <= T:
        raise ValueError(
            f"sampling steps must be in 1..{T} (the training timesteps), got {S!r}; "
            "lower the number of steps (DiffusionConfig.sample_steps / --steps)"
        )
    if S == 1:
        return [T - 1]
    return [(2 * (T - 1) * (S - 1 - i) + (S - 1)) // (2 * (S - 1)) for i in range(S)]


def _work_dtype(x: Tensor) -> torch.dtype:
    """Steps run in at least float32 (bf16 model outputs are upcast); float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _randn(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=dtype, device=device).to(x.device)


def _x0_from_eps(eps: Tensor, x_t: Tensor, ab_t: float, dtype: torch.dtype, clip_x0: float | None) -> Tensor:
    x0 = (x_t.to(dtype) - math.sqrt(1 - ab_t) * eps.to(dtype)) / math.sqrt(ab_t)
    return x0.clamp(-clip_x0, clip_x0) if clip_x0 is not None else x0


def _check_pair(t: int, t_prev: int, schedule: NoiseSchedule) -> None:
    _check_timestep(t, schedule.num_timesteps)
    _check_timestep(t_prev, schedule.num_timesteps, allow_clean=True)
    if t_prev >= t:
        raise ValueError(f"a sampler step goes to a smaller timestep: t_prev={t_prev} >= t={t}")


def ddpm_step(
    eps: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """Ancestral step x_t -> x_{t_prev} from an epsilon prediction (DDPM, Ho et al. 2020, eq. 6-7),
    generalised to skipped timesteps as in diffusers' DDPMScheduler.

    With ab = alpha_bar[t], ab' = alpha_bar[t_prev] (1 for t_prev = -1) and beta = 1 - ab / ab':
    mean = sqrt(ab') beta / (1 - ab) * x0_hat + sqrt(ab / ab') (1 - ab') / (1 - ab) * x_t and
    variance = beta (1 - ab') / (1 - ab) (the posterior's, "fixed small"), where x0_hat is the x0
    implied by eps, clamped to [-clip_x0, clip_x0] if given (off by default: latents are unbounded).
    No noise is added on the step to t_prev = -1, which returns x0_hat. x_t, eps (N, ...)."""
    _check_pair(t, t_prev, schedule)
    ab, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    beta = 1 - ab / ab_prev
    dtype = _work_dtype(x_t)
    x0 = _x0_from_eps(eps, x_t, ab, dtype, clip_x0)
    if t_prev < 0:
        return x0.to(x_t.dtype)
    c_x0 = math.sqrt(ab_prev) * beta / (1 - ab)
    c_xt = math.sqrt(ab / ab_prev) * (1 - ab_prev) / (1 - ab)
    std = math.sqrt(beta * (1 - ab_prev) / (1 - ab))
    out = c_x0 * x0 + c_xt * x_t.to(dtype) + std * _randn(x_t, dtype, generator)
    return out.to(x_t.dtype)


def ddim_step(
    eps: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
) -> Tensor:
    """DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); deterministic for eta = 0.

    ``sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')``; eta = 1 is the DDPM posterior."""
    _check_pair(t, t_prev, schedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ab, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    dtype = _work_dtype(x_t)
    x0 = _x0_from_eps(eps, x_t, ab, dtype, clip_x0)
    if clip_x0 is not None:  # keep the direction term consistent with the clipped x0 (as diffusers)
        eps = (x_t.to(dtype) - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps.to(dtype)
    if sigma > 0:
        out = out + sigma * _randn(x_t, dtype, generator)
    return out.to(x_t.dtype)


def flow_step(v: Tensor, s: float, s_prev: float, x: Tensor) -> Tensor:
    """Euler step of dx/ds = v from noise level s down to s_prev: ``x + (s_prev - s) v``."""
    if not 0 <= s_prev < s <= 1:
        raise ValueError(f"a flow step needs 0 <= s_prev < s <= 1, got s={s}, s_prev={s_prev}")
    dtype = _work_dtype(x)
    return (x.to(dtype) + (s_prev - s) * v.to(dtype)).to(x.dtype)


class Sampler:
    """The timesteps the model is conditioned on, and one step at a time.

    ``for i, t in enumerate(sampler.timesteps): x = sampler.step(model(x, t), i, x, generator)``,
    starting from pure noise x ~ N(0, I); after the last step x is the clean sample. ``model_output``
    is epsilon for 'ddpm'/'ddim' and the velocity for 'flow' (evaluated at s = (t + 1) / T)."""

    def __init__(
        self,
        name: str,
        schedule: NoiseSchedule,
        num_steps: int,
        eta: float = 0.0,
        clip_x0: float | None = None,
    ) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; use one of {SAMPLERS} (DiffusionConfig.sampler)")
        self.name, self.schedule, self.eta, self.clip_x0 = name, schedule, eta, clip_x0
        self.timesteps: list[int] = sampling_timesteps(schedule.num_timesteps, num_steps)

    def __len__(self) -> int:
        return len(self.timesteps)

    def __repr__(self) -> str:
        return f"Sampler({self.name!r}, steps={len(self)}, T={self.schedule.num_timesteps})"

    def prev_timestep(self, i: int) -> int:
        """The timestep step i lands on: the next one in the list, or -1 (clean) after the last."""
        if not 0 <= i < len(self.timesteps):
            raise ValueError(f"step index {i} is outside 0..{len(self.timesteps) - 1}")
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def x0(self, model_output: Tensor, i: int, x: Tensor) -> Tensor:
        """The clean sample that step i's prediction points to (what a preview shows): from the
        noise prediction (clipped as the step clips it), or x - s v for flow."""
        t = self.timesteps[i]
        dtype = _work_dtype(x)
        if self.name == "flow":
            s = (t + 1) / self.schedule.num_timesteps
            return (x.to(dtype) - s * model_output.to(dtype)).to(x.dtype)
        return _x0_from_eps(model_output, x, self.schedule.alpha_bar(t), dtype, self.clip_x0).to(x.dtype)

    def step(
        self, model_output: Tensor, i: int, x: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """x at ``timesteps[i]`` -> x at ``prev_timestep(i)``, same shape and dtype as x."""
        t_prev = self.prev_timestep(i)  # validates i
        t = self.timesteps[i]
        if self.name == "ddpm":
            return ddpm_step(model_output, t, t_prev, x, self.schedule, generator, self.clip_x0)
        if self.name == "ddim":
            return ddim_step(model_output, t, t_prev, x, self.schedule, self.eta, generator, self.clip_x0)
        T = self.schedule.num_timesteps
        return flow_step(model_output, (t + 1) / T, (t_prev + 1) / T, x)


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    num_steps: int,
    objective: str = "ddpm",
    eta: float = 0.0,
    clip_x0: float | None = None,
) -> Sampler:
    """A ``Sampler`` checked against the model's training objective: 'ddpm'/'ddim' for epsilon models
    (objective 'ddpm'), 'flow' for velocity models (objective 'flow')."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {SAMPLERS} (DiffusionConfig.sampler)")
    if (objective == "flow") != (name == "flow"):
        fix = "use sampler 'flow'" if objective == "flow" else "use sampler 'ddpm' or 'ddim'"
        raise ValueError(f"sampler {name!r} does not fit a model trained with objective {objective!r}; {fix}")
    return Sampler(name, schedule, num_steps, eta=eta, clip_x0=clip_x0)


def guidance_scale(scale: float, t: int, max_t: int | None) -> float:
    """The guidance weight at timestep t: ``scale`` where guidance applies (t <= ``max_t``, or every t
    when ``max_t`` is None), 1 (the conditional prediction alone) elsewhere."""
    return scale if max_t is None or t <= max_t else 1.0


def default_sampler(cfg: DiffusionConfig) -> str:
    """The sampler a model trained with ``cfg`` uses unless told otherwise: 'flow' (Euler) for a
    velocity model, else ``cfg.sampler`` (the paper's: 'ddpm', ancestral)."""
    return "flow" if cfg.objective == "flow" else cfg.sampler


def sampler_for(
    cfg: DiffusionConfig, schedule: NoiseSchedule, name: str | None = None, steps: int | None = None
) -> Sampler:
    """The sampling policy, in one place: ``name`` (default ``default_sampler``) over ``steps``
    (default ``cfg.sample_steps``), checked against the training objective, with DDPM/DDIM clipping
    the predicted clean latent at ``cfg.sample_clip`` (flow needs none)."""
    name = name or default_sampler(cfg)
    clip = None if name == "flow" else cfg.sample_clip
    return make_sampler(name, schedule, steps or cfg.sample_steps, cfg.objective, clip_x0=clip)
