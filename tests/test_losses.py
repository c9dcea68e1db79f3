"""The objective: masked text cross-entropy, per-image diffusion MSE, lambda-weighted total."""

import torch
import torch.nn.functional as F

from transfusion.config import DiffusionConfig, tiny
from transfusion.diffusion import make_schedule
from transfusion.losses import draw_noise, image_loss, text_loss, training_loss
from transfusion.model import Transfusion
from transfusion.sequence import IGNORE, Image, Sample, Specials, Text, pack

from helpers import TOK, latent


def test_text_loss_ignores_masked_positions():
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, IGNORE, 3, IGNORE, 4], [IGNORE] * 5])
    keep = targets != IGNORE
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(text_loss(logits, targets), expected)
    assert text_loss(logits, torch.full((2, 5), IGNORE)).item() == 0.0


def test_every_image_weighs_the_same():
    pred, target = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    target[0] = 1.0  # image 0: MSE 1, image 1: MSE 0
    assert image_loss(pred, target).item() == 0.5
    assert image_loss(torch.zeros(0, 1, 2, 2), torch.zeros(0, 1, 2, 2)).item() == 0.0


def test_total_is_text_plus_lambda_image_and_noise_follows_the_sample():
    cfg, dcfg = tiny(), DiffusionConfig(loss_weight=5.0)
    s = Sample(
        [
            Text(TOK.encode("abc")),
            Image(latent(cfg), seed=123),
            Image(latent(cfg), noise_limited=True, seed=7),
        ]
    )
    batch = pack([s], 64, Specials.of(TOK), cfg.patches_per_image)
    losses = training_loss(Transfusion(cfg), batch, make_schedule(dcfg), dcfg)
    torch.testing.assert_close(losses.total, losses.text + 5.0 * losses.image)
    # BOS->a, a->b, b->c, c->BOI, EOI->BOI, EOI->EOS (none from BOI, none at patches)
    assert losses.images == 2 and losses.text_tokens == 6
    t1, n1 = draw_noise(batch, dcfg)
    other = pack(
        [Sample([Text([1])]), s], 64, Specials.of(TOK), cfg.patches_per_image
    )  # elsewhere in a batch
    t2, n2 = draw_noise(other, dcfg)
    assert torch.equal(t1, t2) and torch.equal(n1, n2) and t1[1] <= dcfg.noise_limit


def test_training_draws_noise_limited_timesteps_through_sample_timesteps():
    """The production path (``training_loss`` -> ``draw_noise``) gives image-first images exactly the
    timesteps ``sample_timesteps(limited=...)`` draws from their seeds: t <= noise_limit, spread over
    0..500; caption-first images range over all 1000."""
    from transfusion.diffusion import sample_timesteps

    cfg, dcfg = tiny(), DiffusionConfig()
    seeds = list(range(200))
    samples = [Sample([Image(latent(cfg), noise_limited=i % 2 == 0, seed=s)]) for i, s in enumerate(seeds)]
    batch = pack(samples, 64, Specials.of(TOK), cfg.patches_per_image)
    seen = {}

    def spy(model, b):
        seen["t"] = b.timesteps.clone()
        return Transfusion.forward(model, b)

    model = Transfusion(cfg)
    model.forward = lambda b: spy(model, b)  # the model sees the timesteps training drew
    training_loss(model, batch, make_schedule(dcfg), dcfg)
    t = seen["t"]
    for i, s in enumerate(seeds):
        limited = torch.tensor([i % 2 == 0])
        assert int(t[i]) == int(
            sample_timesteps(1, dcfg, torch.Generator().manual_seed(s), limited=limited)[0]
        )
    assert int(t[0::2].max()) <= dcfg.noise_limit < int(t[1::2].max())
    assert int(t[0::2].max()) > 0.8 * dcfg.noise_limit  # uniform up to the limit, not squeezed lower
