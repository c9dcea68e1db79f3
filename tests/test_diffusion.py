"""Golden values for the schedules and correctness of noising, timestep sampling and sampler steps.

Expected values are computed here independently of ``transfusion.diffusion`` (Python floats and
``math``), never by calling the code under test for its own reference."""

import math

import pytest
import torch

from transfusion import diffusion as D
from transfusion.config import DiffusionConfig

T = 1000


def cosine_f(u: float, T: int = T, s: float = 0.008) -> float:
    return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2


def cosine_alpha_bar(t: int, T: int = T) -> float:
    """Closed form: prod_{i<=t} f(i+1)/f(i) telescopes to f(t + 1) / f(0) (no beta clipped before 999)."""
    return cosine_f(t + 1, T) / cosine_f(0, T)


def cosine_alpha_bar_clipped(t: int, T: int = T) -> float:
    """The cumulative product with each beta clipped at 0.999, in Python floats."""
    prod = 1.0
    for i in range(t + 1):
        prod *= 1 - min(1 - cosine_f(i + 1, T) / cosine_f(i, T), 0.999)
    return prod


def linear_alpha_bar(t: int, T: int = T) -> float:
    scale = 1000 / T
    lo, hi = 1e-4 * scale, 0.02 * scale
    prod = 1.0
    for i in range(t + 1):
        prod *= 1 - min(lo + (hi - lo) * i / (T - 1), 0.999)
    return prod


def posterior(x0: torch.Tensor, xt: torch.Tensor, ab: float, ab_prev: float) -> tuple[torch.Tensor, float]:
    """q(x_{t'} | x_t, x0) by Gaussian conditioning of the joint (x_{t'}, x_t) given x0:
    x_{t'} = sqrt(ab') x0 + sqrt(1 - ab') e1 and x_t = sqrt(ab / ab') x_{t'} + sqrt(1 - ab / ab') e2."""
    cov = math.sqrt(ab / ab_prev) * (1 - ab_prev)  # Cov(x_t', x_t)
    mean = math.sqrt(ab_prev) * x0 + cov / (1 - ab) * (xt - math.sqrt(ab) * x0)
    return mean, (1 - ab_prev) - cov**2 / (1 - ab)


# --- schedules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 500, 998, 999])
def test_cosine_alpha_bar_golden(t):
    ab = D.make_schedule("cosine", T).alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert ab[t].item() == pytest.approx(cosine_alpha_bar_clipped(t), rel=1e-9, abs=1e-15)
    if t < 999:  # only the very last beta hits the 0.999 clip
        assert ab[t].item() == pytest.approx(cosine_alpha_bar(t), rel=1e-9)


def test_cosine_known_points_and_shape():
    ab = D.make_schedule("cosine", T).alphas_cumprod
    # worked by hand: f(1)/f(0) = cos^2(0.0089286 pi/2) / cos^2(0.0079365 pi/2)
    assert ab[0].item() == pytest.approx(0.99997, abs=2e-5)
    # cos^2(0.50496 pi/2) / cos^2(0.00794 pi/2) = 0.49226 / 0.99984
    assert ab[500].item() == pytest.approx(0.4923, abs=2e-4)
    assert ab[999].item() < 1e-3 and ab[999].item() > 0
    assert (ab[1:] < ab[:-1]).all()
    betas = D.make_schedule("cosine", T).betas
    assert betas.max().item() == pytest.approx(0.999) and betas[:-1].max().item() < 0.999


@pytest.mark.parametrize("t", [0, 500, 999])
def test_linear_alpha_bar_golden(t):
    sched = D.make_schedule("linear", T)
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.02)
    assert sched.alphas_cumprod[t].item() == pytest.approx(linear_alpha_bar(t), rel=1e-9)


def test_linear_scaled_for_other_T_and_both_schedules_shaped():
    for kind in ("cosine", "linear"):
        for n in (50, 100, T):
            ab = D.make_schedule(kind, n).alphas_cumprod
            assert (ab[1:] < ab[:-1]).all() and ab[0].item() > 0.98 and ab[-1].item() < 1e-3
    ab = D.make_schedule("linear", 100).alphas_cumprod
    assert ab[-1].item() == pytest.approx(linear_alpha_bar(99, 100), rel=1e-9)
    cfg = DiffusionConfig(schedule="linear", num_train_timesteps=100, noise_limit=50, sample_steps=25)
    for sched in (D.make_schedule(cfg), D.NoiseSchedule.from_config(cfg)):
        assert sched.num_timesteps == 100 and torch.equal(sched.alphas_cumprod, ab)
    sched = D.make_schedule("cosine", T)
    assert sched.alpha_bar(-1) == 1.0 and sched.alpha_bar(500) == sched.alphas_cumprod[500].item()


# --- noising -------------------------------------------------------------------------------------
def test_add_noise_statistics():
    sched = D.make_schedule("cosine", T)
    g = torch.Generator().manual_seed(0)
    n = 20000
    for t in (10, 500, 900):
        ab = cosine_alpha_bar(t)
        tt = torch.full((n,), t)
        noise = torch.randn(n, 4, generator=g, dtype=torch.float64)
        x = D.add_noise(torch.zeros(n, 4, dtype=torch.float64), noise, tt, sched)
        assert x.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.02)
        x = D.add_noise(torch.full((n, 4), 2.0, dtype=torch.float64), noise, tt, sched)
        assert x.mean().item() == pytest.approx(2 * math.sqrt(ab), abs=0.02)


def test_add_noise_closed_form_broadcast_and_roundtrip():
    sched = D.make_schedule("cosine", T)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x0 = torch.randn(6, 8, 4, 4, dtype=torch.float64, generator=g)
    eps = torch.randn(6, 8, 4, 4, dtype=torch.float64, generator=g)
    xt = D.add_noise(x0, eps, t, sched)
    for i, ti in enumerate(t.tolist()):
        ab = cosine_alpha_bar_clipped(ti)
        torch.testing.assert_close(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])
    torch.testing.assert_close(D.predict_x0(xt, eps, t, sched), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(D.predict_eps(xt, x0, t, sched), eps, atol=1e-6, rtol=1e-6)
    # any trailing dims: (N, L) and (N,), and a scalar t
    torch.testing.assert_close(D.add_noise(x0.flatten(1), eps.flatten(1), t, sched), xt.flatten(1))
    torch.testing.assert_close(D.add_noise(x0[:, 0, 0, 0], eps[:, 0, 0, 0], t, sched), xt[:, 0, 0, 0])
    torch.testing.assert_close(D.add_noise(x0[3:4], eps[3:4], 500, sched), xt[3:4])
    # float32 inputs keep float32 and the float64 coefficients' digits (1 - ab_0 is about 3e-5)
    x32 = D.add_noise(x0.float(), eps.float(), t, sched)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32, xt.float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        D.add_noise(x0[:1], eps[:1], torch.tensor([-1]), sched)  # an unsampled timestep
    with pytest.raises(ValueError, match="timesteps"):
        D.add_noise(x0[:1], eps[:1], torch.tensor([T]), sched)


def test_training_target_both_objectives():
    sched = D.make_schedule("cosine", T)
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    noise, t = torch.randn_like(x0), torch.tensor([0, 500, 999])
    xt, target = D.training_target("ddpm", x0, noise, t, sched)
    torch.testing.assert_close(xt, D.add_noise(x0, noise, t, sched))
    assert target is noise
    xt, v = D.training_target("flow", x0, noise, t, sched)
    s = torch.tensor([1 / 1000, 501 / 1000, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(v, noise - x0)
    assert xt.dtype == torch.float64
    # the noise limit t <= 500 is s <= 0.501 under the flow mapping
    assert D.flow_sigma(500, T).item() == pytest.approx(0.501)
    xt32, _ = D.training_target("flow", x0.float(), noise.float(), t, sched)
    assert xt32.dtype == torch.float32


# --- training timesteps --------------------------------------------------------------------------
def test_sample_timesteps_range_limit_uniformity_determinism():
    n = 20000
    limited = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.3
    cfg = DiffusionConfig()
    t = D.sample_timesteps(n, cfg, torch.Generator().manual_seed(1), limited=limited)
    assert t.dtype == torch.long and t.shape == (n,)
    assert t.min() >= 0 and t.max() <= 999
    assert t[limited].max() <= 500 and t[limited].max() >= 495 and t[~limited].max() > 990
    # chi-square over 10 bins, 9 dof: p = 1e-4 at 33.7
    for values, width in ((t[~limited], 100), (t[limited], 50)):  # 0..999 and 0..500 (501 values)
        counts = torch.bincount(values // width, minlength=11)[:10].double()
        expected = len(values) * width / (1000 if width == 100 else 501)
        assert ((counts - expected) ** 2 / expected).sum().item() < 33.7
    again = D.sample_timesteps(n, cfg, torch.Generator().manual_seed(1), limited=limited)
    assert torch.equal(t, again)
    # the same through an explicit per-sample max, as the training loss passes it
    max_t = torch.where(limited, 500, 999)
    assert torch.equal(D.sample_timesteps(n, T, torch.Generator().manual_seed(1), max_t=max_t), t)
    sched = D.make_schedule("cosine", T)
    t2 = D.sample_timesteps(n, sched, torch.Generator().manual_seed(1), limited=limited, noise_limit=500)
    assert torch.equal(t2, t)
    assert D.sample_timesteps(1000, T, max_t=0).eq(0).all()
    assert D.sample_timesteps(0, T).shape == (0,)


def test_timestep_shift_follows_its_distribution_and_one_is_the_uniform_draw():
    """P(t / T >= x) under shift k is 1 - F(x) with F the inverse of u -> k u / (1 + (k - 1) u):
    F(x) = x / (k - (k - 1) x). Shift 1 draws bit for bit what the unshifted draw does; the noise
    limit still bounds the rows it limits."""
    n, k = 200_000, 3.0
    limited = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.3
    plain = D.sample_timesteps(n, DiffusionConfig(), torch.Generator().manual_seed(1), limited=limited)
    one = D.sample_timesteps(
        n, DiffusionConfig(timestep_shift=1.0), torch.Generator().manual_seed(1), limited=limited
    )
    assert torch.equal(one, plain)
    cfg = DiffusionConfig(timestep_shift=k)
    t = D.sample_timesteps(n, cfg, torch.Generator().manual_seed(1), limited=limited)
    assert t[limited].max() <= 500 and t.min() >= 0 and t.max() <= 999
    free = t[~limited].double()
    for x in (0.1, 0.3, 0.5, 0.7, 0.9):
        want = 1 - x / (k - (k - 1) * x)  # P(t >= x T), t integer: t >= x T <=> u' >= x
        assert abs((free >= x * T).double().mean().item() - want) < 0.006, x
    assert (free >= 0.7 * T).double().mean() > 0.55  # the config's docstring: 56% at t >= 700
    # the same shift through the keyword, with T as an int
    assert torch.equal(D.sample_timesteps(50, T, torch.Generator().manual_seed(2), shift=k),
                       D.sample_timesteps(50, cfg, torch.Generator().manual_seed(2)))  # fmt: skip
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        DiffusionConfig(timestep_shift=0.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        D.sample_timesteps(4, T, shift=-1.0)


def test_sample_timesteps_errors():
    with pytest.raises(ValueError, match="max_t"):
        D.sample_timesteps(4, T, max_t=T)
    with pytest.raises(ValueError, match="max_t"):
        D.sample_timesteps(4, T, max_t=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="noise_limit"):
        D.sample_timesteps(4, T, limited=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="limited"):
        D.sample_timesteps(4, DiffusionConfig(), limited=torch.ones(3, dtype=torch.bool))


# --- sampling timesteps --------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 50, 250, 1000])
def test_sampling_timesteps(steps):
    ts = D.sampling_timesteps(T, steps)
    assert len(ts) == steps and ts[0] == T - 1 and all(isinstance(x, int) for x in ts)
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[-1] == (0 if steps > 1 else T - 1)
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    if gaps:  # evenly spaced up to rounding
        assert max(gaps) - min(gaps) <= 1
    if steps == 1000:
        assert ts == list(range(999, -1, -1))


def test_sampling_timesteps_small_T_and_errors():
    assert D.sampling_timesteps(10, 4) == [9, 6, 3, 0]
    assert D.sampling_timesteps(10, 3) == [9, 5, 0]  # 4.5 rounds up
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="steps"):
            D.sampling_timesteps(T, bad)


# --- samplers ------------------------------------------------------------------------------------
def oracle_loop(name, steps, x0, schedule="cosine", seed=0, eta=0.0):
    """Run a sampler from pure noise with the model replaced by the exact prediction for a known x0."""
    sched = D.make_schedule(schedule, T)
    sampler = D.make_sampler(name, sched, steps, objective="flow" if name == "flow" else "ddpm", eta=eta)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    for i, t in enumerate(sampler.timesteps):
        if name == "flow":
            s = (t + 1) / T
            pred = (x - x0) / s  # noise - x0, with noise = (x - (1 - s) x0) / s
        else:
            ab = cosine_alpha_bar_clipped(t) if schedule == "cosine" else linear_alpha_bar(t)
            pred = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        x = sampler.step(pred, i, x, g)
    return x


@pytest.mark.parametrize("steps", [1, 50, 250])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_with_oracle_recovers_x0(steps, schedule):
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(oracle_loop("ddim", steps, x0, schedule), x0, atol=1e-4, rtol=1e-4)


def test_ddim_float32_oracle_and_determinism():
    x0 = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    out = oracle_loop("ddim", 50, x0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    sched = D.make_schedule("cosine", T)
    x, eps = torch.randn(2, 4), torch.randn(2, 4)
    a = D.ddim_step(eps, 500, 480, x, sched, generator=torch.Generator().manual_seed(0))
    b = D.ddim_step(eps, 500, 480, x, sched, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # eta = 0 draws no noise


def test_ddpm_with_oracle_ends_at_x0():
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for steps in (50, 250):
        torch.testing.assert_close(oracle_loop("ddpm", steps, x0), x0, atol=1e-4, rtol=1e-4)
    # the last step (t_prev = -1) adds no noise: the result does not depend on the generator
    sched = D.make_schedule("cosine", T)
    x, eps = torch.randn(2, 4), torch.randn(2, 4)
    a = D.ddpm_step(eps, 0, -1, x, sched, torch.Generator().manual_seed(0))
    assert torch.equal(a, D.ddpm_step(eps, 0, -1, x, sched, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("t,t_prev", [(400, 399), (400, 396), (999, 995), (5, 0)])
def test_ddpm_step_matches_posterior(t, t_prev):
    """Mean and variance of one ancestral step against q(x_{t'} | x_t, x0), including skipped steps."""
    sched = D.make_schedule("cosine", T)
    ab, ab_prev = cosine_alpha_bar_clipped(t), cosine_alpha_bar_clipped(t_prev)
    n = 20000
    xt = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x0 = torch.full_like(xt, 0.5)
    eps = (xt - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    out = D.ddpm_step(eps, t, t_prev, xt, sched, torch.Generator().manual_seed(0))
    mean, var = posterior(x0, xt, ab, ab_prev)
    resid = out - mean
    assert abs(resid.mean().item()) < 5 * math.sqrt(var / resid.numel())
    assert resid.var().item() == pytest.approx(var, rel=0.03)


def test_ddim_eta_one_is_ddpm():
    """DDIM with eta = 1 has the DDPM posterior's mean and variance: same noise, same result."""
    sched = D.make_schedule("cosine", T)
    x, eps = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    for t, t_prev in ((700, 696), (10, 9)):
        a = D.ddpm_step(eps, t, t_prev, x, sched, torch.Generator().manual_seed(7))
        b = D.ddim_step(eps, t, t_prev, x, sched, eta=1.0, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_flow_with_oracle_recovers_x0():
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for steps in (1, 50):
        torch.testing.assert_close(oracle_loop("flow", steps, x0), x0, atol=1e-6, rtol=1e-6)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(D.flow_step(v, 0.5, 0.25, x), x - 0.25 * v)
    torch.testing.assert_close(D.flow_add_noise(x, v, 0.25), 0.75 * x + 0.25 * v)
    torch.testing.assert_close(D.flow_target(x, v), v - x)


def test_sampler_dtypes_clip_and_indexing():
    sched = D.make_schedule("cosine", T)
    sampler = D.make_sampler("ddpm", sched, 10)
    assert len(sampler) == 10 and sampler.prev_timestep(9) == -1 and sampler.prev_timestep(0) == 888
    x = torch.randn(1, 8, 4, 4)
    pred = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)  # what a bf16-autocast model returns
    out = sampler.step(pred, 0, x, torch.Generator().manual_seed(0))
    # the step runs in the state's fp32: equal to the step on the prediction cast up, not rounded to bf16
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sampler.step(pred.float(), 0, x, torch.Generator().manual_seed(0)))
    # clipping the predicted x0: the last step returns it
    x0 = torch.full((1, 4), 3.0, dtype=torch.float64)
    ab = cosine_alpha_bar_clipped(0)
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.ones_like(x0)
    eps = torch.ones_like(x0)
    for name in ("ddpm", "ddim"):
        s = D.Sampler(name, sched, T, clip_x0=1.0)
        torch.testing.assert_close(s.step(eps, T - 1, xt), torch.ones_like(x0))
        torch.testing.assert_close(D.Sampler(name, sched, T).step(eps, T - 1, xt), x0)
    with pytest.raises(ValueError, match="step index"):
        sampler.step(x, 10, x)


def test_guidance():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert D.guided(c, u, 3.0).item() == 4.0 and D.guided(c, u, 1.0).item() == 2.0
    assert D.guided(c, u, 0.0).item() == 1.0


def test_errors():
    sched = D.make_schedule(DiffusionConfig())
    with pytest.raises(ValueError, match="unknown sampler"):
        D.Sampler("euler", sched, 10)
    with pytest.raises(ValueError, match="unknown sampler"):
        D.make_sampler("euler", sched, 10)
    with pytest.raises(ValueError, match="steps"):
        D.make_sampler("ddpm", sched, 2000)
    with pytest.raises(ValueError, match="steps"):
        D.make_sampler("ddim", sched, 0)
    with pytest.raises(ValueError, match="sampler 'flow'"):
        D.make_sampler("ddpm", sched, 10, objective="flow")
    with pytest.raises(ValueError, match="'ddpm' or 'ddim'"):
        D.make_sampler("flow", sched, 10, objective="ddpm")
    with pytest.raises(ValueError, match="objective"):
        D.make_sampler("ddpm", sched, 10, objective="v")
    with pytest.raises(ValueError, match="schedule"):
        D.make_schedule("sigmoid")
    with pytest.raises(ValueError, match="num_timesteps"):
        D.make_schedule("cosine", 0)
    with pytest.raises(ValueError, match="objective"):
        D.training_target("v", torch.zeros(1), torch.zeros(1), torch.tensor([0]), sched)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="t_prev"):
        D.ddpm_step(x, 10, 10, x, sched)
    with pytest.raises(ValueError, match="timestep"):
        D.ddim_step(x, T, 10, x, sched)
    with pytest.raises(ValueError, match="eta"):
        D.ddim_step(x, 10, 5, x, sched, eta=-1.0)
    with pytest.raises(ValueError, match="s_prev"):
        D.flow_step(x, 0.2, 0.5, x)
