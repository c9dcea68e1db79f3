"""benchmarks/binding_probe.py: the wrong captions are the right ones, and its per-scene denoising errors
are the training loss's (their mean is ``training_loss``'s image loss on the same noise)."""

from types import SimpleNamespace

import pytest
import torch

from transfusion import diffusion
from transfusion.config import Config, DiffusionConfig, tiny
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack, sample_length

from helpers import TOK, latent, load_benchmark


def untrained(objective: str, seed: int):
    """A tiny untrained model as the probe loads one (its image output layer made non-zero, so that its
    predictions depend on the input), and three latents."""
    torch.manual_seed(0)
    model_cfg = tiny()
    model = Transfusion(model_cfg).eval()
    with torch.no_grad():
        for p in model.patcher.parameters():  # the output layer starts at zero
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05)
    cfg = Config(model=model_cfg, diffusion=DiffusionConfig(objective=objective))
    gen = torch.Generator().manual_seed(seed)
    latents = torch.stack([latent(model_cfg, gen) for _ in range(3)])
    return SimpleNamespace(model=model, config=cfg, tokenizer=TOK), latents


def test_variants_flip_the_relation_and_swap_the_colours():
    probe = load_benchmark("binding_probe")
    spec = {
        "kind": "position",
        "objects": [{"shape": "circle", "color": "red", "size": None, "count": 1},
                    {"shape": "square", "color": "blue", "size": None, "count": 1}],
        "relation": "above",
    }  # fmt: skip
    assert probe.variants(spec) == {
        "true": "a red circle above a blue square",
        "flipped": "a red circle below a blue square",
        "swapped": "a blue circle above a red square",
    }


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_errors_average_to_the_training_loss(objective):
    probe = load_benchmark("binding_probe")
    loaded, latents = untrained(objective, seed=1)
    model, cfg, model_cfg = loaded.model, loaded.config, loaded.config.model
    captions = ["a red circle above a blue square", "a green triangle", "two purple squares"]
    errors = probe.errors(loaded, latents, captions, t=600, seed=40)
    assert errors.shape == (3,) and (errors > 0).all()
    samples = [Sample([Text(TOK.encode(c)), Image(z, t=600, seed=40 + i)], eos=False)
               for i, (z, c) in enumerate(zip(latents, captions))]  # fmt: skip
    n = model_cfg.patches_per_image
    batch = pack(samples, max(sample_length(s, n) for s in samples), Specials.of(TOK), n, one_per_row=True)
    with torch.no_grad():
        reference = training_loss(
            model, batch, diffusion.NoiseSchedule.from_config(cfg.diffusion), cfg.diffusion
        )
    assert errors.mean().item() == pytest.approx(reference.image.item(), rel=1e-5)
    # a different caption changes the error of that scene only
    other = probe.errors(loaded, latents, ["a red circle below a blue square", *captions[1:]], t=600, seed=40)
    assert other[0] != errors[0] and torch.allclose(other[1:], errors[1:])


def test_the_linear_readout_finds_a_label_that_is_in_the_features_and_only_then():
    probe = load_benchmark("binding_probe")
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(800) % 2 == 0
    noise = torch.randn(800, 64, generator=gen)
    present = noise + 0.8 * labels[:, None].float() * torch.randn(64, generator=gen)  # one direction holds it
    assert probe.linear_readout(present, labels) > 0.95
    assert abs(probe.linear_readout(noise, labels) - 0.5) < 0.1


def test_hidden_states_at_patches_are_the_models_own():
    """The patcher's vectors are ``embed``'s at the patch positions of the same noised batch, and the last
    block's, normed and decoded by the patcher, are the model's image prediction (a second path)."""
    probe = load_benchmark("binding_probe")
    loaded, latents = untrained("flow", seed=2)
    model, model_cfg = loaded.model, loaded.config.model
    out = probe.hidden_at_patches(loaded, latents, "a red circle", t=500, seed=9)
    assert list(out) == ["patches", *(f"block {k}" for k in range(model_cfg.n_layers))]
    n = model_cfg.patches_per_image
    batch, _ = probe.noised_batch(loaded, latents, ["a red circle"] * 3, t=500, seed=9)
    with torch.no_grad():
        x, ctx = model.embed(batch.ids, batch.patch_mask, batch.latents, batch.timesteps)
        assert torch.equal(out["patches"], x[batch.patch_mask])
        last = model.norm(out[f"block {model_cfg.n_layers - 1}"]).view(3, n, -1)
        assert torch.allclose(model.patcher.decode(last, ctx), model(batch).image_pred, atol=1e-6)
    rows = probe.where_rows(loaded, latents, [500], seed=9)
    assert {r["layer"] for r in rows} == set(out) and all(0.0 <= r["row"] <= 1.0 for r in rows)
