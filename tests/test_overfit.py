"""A tiny model overfits one fixed batch of four mixed samples: both losses fall by >= 90%."""

import torch

from transfusion.config import DiffusionConfig, tiny
from transfusion.diffusion import make_schedule
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Specials, pack

from helpers import TOK, mixed_samples


def test_tiny_model_overfits_one_mixed_batch():
    torch.manual_seed(0)
    cfg = tiny()
    dcfg = DiffusionConfig()
    schedule = make_schedule(dcfg)
    batch = pack(mixed_samples(cfg), 48, Specials.of(TOK), cfg.patches_per_image)
    # the fixed batch: fixed timesteps and, through a re-seeded generator, fixed noise each step
    batch = batch.replace(timesteps=torch.tensor([100, 300, 450, 200, 600]))
    model = Transfusion(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    first = last = None
    for _ in range(300):
        losses = training_loss(model, batch, schedule, dcfg, torch.Generator().manual_seed(0))
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        if first is None:
            first = (losses.text.item(), losses.image.item())
        last = (losses.text.item(), losses.image.item())
    assert losses.images == 5 and losses.text_tokens > 40
    assert last[0] < 0.1 * first[0], (first, last)
    assert last[1] < 0.1 * first[1], (first, last)
