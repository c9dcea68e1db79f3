"""Golden values for the schedules and correctness of noising and sampler steps."""

import math

import pytest
import torch

from transfusion import diffusion as D
from transfusion.config import DiffusionConfig


def cosine_alpha_bar(t: int, T: int = 1000, s: float = 0.008) -> float:
    """Closed form, independent of the code: prod of (1 - beta) telescopes to f(t + 1) / f(0)."""

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    return f(t + 1) / f(0)


@pytest.mark.parametrize("t", [0, 500, 999])
def test_cosine_alpha_bar_golden(t):
    sched = D.make_schedule("cosine", 1000)
    expected = cosine_alpha_bar(t)
    if t < 999:  # at the very end the 0.999 beta clip changes the last factor
        assert sched.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert sched.alphas_cumprod[999].item() < 1e-3


def test_cosine_values_at_known_points():
    ab = D.make_schedule("cosine", 1000).alphas_cumprod
    assert ab[0].item() == pytest.approx(0.99997, abs=2e-5)
    # cos^2(0.50496 * pi / 2) / cos^2(0.00794 * pi / 2) = 0.49226 / 0.99984, worked by hand
    assert ab[500].item() == pytest.approx(0.4923, abs=2e-4)
    assert (ab[1:] < ab[:-1]).all()


@pytest.mark.parametrize("t", [0, 500, 999])
def test_linear_alpha_bar_golden(t):
    ab = D.make_schedule("linear", 1000).alphas_cumprod
    prod = 1.0
    for i in range(t + 1):
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert ab[t].item() == pytest.approx(prod, rel=1e-9)


def test_add_noise_statistics_and_roundtrip():
    sched = D.make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    for t in (10, 500, 900):
        ab = sched.alphas_cumprod[t].item()
        tt = torch.full((20000,), t)
        noise = torch.randn(20000, 4, generator=g, dtype=torch.float64)
        x = D.add_noise(torch.zeros(20000, 4, dtype=torch.float64), noise, tt, sched)
        assert x.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.02)
        x = D.add_noise(torch.full((20000, 4), 2.0, dtype=torch.float64), noise, tt, sched)
        assert x.mean().item() == pytest.approx(2 * math.sqrt(ab), abs=0.02)
    x0 = torch.randn(6, 8, 4, 4, dtype=torch.float64, generator=g)
    eps = torch.randn(6, 8, 4, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 998])
    xt = D.add_noise(x0, eps, t, sched)
    torch.testing.assert_close(D.predict_x0(xt, eps, t, sched), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(D.predict_eps(xt, x0, t, sched), eps, atol=1e-6, rtol=1e-6)


def test_sample_timesteps_range_limit_uniformity():
    g = torch.Generator().manual_seed(0)
    limited = torch.rand(20000, generator=g) < 0.3
    max_t = torch.where(limited, 500, 999)
    t = D.sample_timesteps(20000, 1000, torch.Generator().manual_seed(1), max_t=max_t)
    assert t.min() >= 0 and t.max() <= 999
    assert t[limited].max() <= 500 and t[~limited].max() > 900
    counts = torch.bincount(t[~limited] // 100, minlength=10).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.15
    again = D.sample_timesteps(20000, 1000, torch.Generator().manual_seed(1), max_t=max_t)
    assert torch.equal(t, again)


@pytest.mark.parametrize("steps", [1, 50, 250, 1000])
def test_sampling_timesteps(steps):
    ts = D.sampling_timesteps(1000, steps)
    assert len(ts) == steps and ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if steps > 1:
        assert ts[-1] == 0


def oracle_loop(name, steps, x0, seed=0):
    sched = D.make_schedule("cosine", 1000)
    sampler = D.Sampler(name, sched, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    for i, t in enumerate(sampler.timesteps):
        tt = torch.full((x.shape[0],), t)
        if name == "flow":
            s = (t + 1) / 1000
            pred = (x - (1 - s) * x0) / s - x0  # true velocity noise - x0 given x
        else:
            pred = D.predict_eps(x, x0, tt, sched)
        x = sampler.step(pred, i, x, g)
    return x


@pytest.mark.parametrize("steps", [50, 250])
def test_ddim_with_oracle_recovers_x0(steps):
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(oracle_loop("ddim", steps, x0), x0, atol=1e-4, rtol=1e-4)


def test_ddpm_with_oracle_ends_at_x0_and_matches_posterior():
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(oracle_loop("ddpm", 250, x0), x0, atol=1e-4, rtol=1e-4)
    # one step against the textbook posterior q(x_{t-1} | x_t, x0) for consecutive timesteps
    sched = D.make_schedule("cosine", 1000)
    t = 400
    beta = sched.betas[t].item()
    ab, ab_prev = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t - 1].item()
    xt = torch.randn(20000, 2, dtype=torch.float64)
    x0 = torch.full_like(xt, 0.5)
    eps = D.predict_eps(xt, x0, torch.full((20000,), t), sched)
    out = D.ddpm_step(eps, t, t - 1, xt, sched, torch.Generator().manual_seed(0))
    mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * xt
    var = (1 - ab_prev) / (1 - ab) * beta
    resid = out - mean
    assert resid.mean().abs().item() < 0.01 * math.sqrt(var) * 10
    assert resid.var().item() == pytest.approx(var, rel=0.03)


def test_flow_with_oracle_recovers_x0():
    x0 = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(oracle_loop("flow", 50, x0), x0, atol=1e-6, rtol=1e-6)
    noise, t = torch.randn_like(x0), torch.tensor([0, 500, 999])
    xt, v = D.training_target("flow", x0, noise, t, D.make_schedule("cosine", 1000))
    s = ((t + 1) / 1000).double().view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(v, noise - x0)


def test_guidance_and_errors():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert D.guided(c, u, 3.0).item() == 4.0 and D.guided(c, u, 1.0).item() == 2.0
    sched = D.make_schedule(DiffusionConfig())
    with pytest.raises(ValueError, match="unknown sampler"):
        D.Sampler("euler", sched, 10)
    with pytest.raises(ValueError, match="steps"):
        D.Sampler("ddpm", sched, 2000)
    with pytest.raises(ValueError, match="flow"):
        D.make_sampler("ddpm", sched, 10, objective="flow")
    with pytest.raises(ValueError, match="schedule"):
        D.make_schedule("sigmoid")
    with pytest.raises(ValueError, match="objective"):
        D.training_target("v", c, c, torch.tensor([0]), sched)
