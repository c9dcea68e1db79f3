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


def test_attention_weights_are_the_ones_the_model_uses_and_the_captioner_table_adds_up():
    """Weights recomputed from an attention module's inputs, applied to its values, give its output (a
    second path); the captioner's table covers every scene and every layer and head."""
    probe = load_benchmark("binding_probe")
    loaded, latents = untrained("flow", seed=3)
    model = loaded.model
    batch, _ = probe.noised_batch(loaded, latents, ["a red circle above a blue square"] * 3, t=300, seed=4)
    seen = []

    def check(m, args, out):
        w = probe.attention_weights(m, args)
        x = args[0]
        B, L, _ = x.shape
        v = m.wv(x).view(B, L, m.n_kv_heads, m.head_dim).transpose(1, 2)
        v = v.repeat_interleave(m.n_heads // m.n_kv_heads, dim=1)
        y = m.wo((w @ v).transpose(1, 2).reshape(B, L, -1))
        seen.append(torch.allclose(y, out[0], atol=1e-5) and torch.allclose(w.sum(-1), torch.ones(())))

    hooks = [b.attn.register_forward_hook(check) for b in model.layers]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    assert seen == [True] * len(model.layers)
    from transfusion.data.shapes import Scene, SceneObject, _spec_for

    scenes = [
        Scene([SceneObject("circle", "red", "small", 0.25, 0.25), SceneObject("square", "blue", "small", 0.25, 0.75)]),
        Scene([SceneObject("circle", "red", "small", 0.75, 0.25), SceneObject("square", "blue", "small", 0.25, 0.25)]),
        Scene([SceneObject("triangle", "cyan", "large", 0.25, 0.75), SceneObject("circle", "red", "small", 0.75, 0.75)]),
    ]  # fmt: skip
    assert [probe.cell_of(s.objects[0], 2) for s in scenes] == [0, 1, 2]
    reads = probe.captioner_rows(loaded, latents, scenes, [_spec_for(s, "position") for s in scenes])
    assert sum(n for _, n in reads["relation_word_right"].values()) == 3
    assert reads["relation_word_right"]["above / below"][1] == 1
    assert sum(reads["picked"].values()) == 3 and reads["picked"]["above"] + reads["picked"]["below"] == 1
    layers, heads = model.cfg.n_layers, model.cfg.n_heads
    assert len(reads["attention"]) == layers * heads
    for r in reads["attention"]:
        assert (
            min(r["named"], r["other"], r["empty"]) >= 0 and r["named"] + r["other"] + r["empty"] <= 1 + 1e-6
        )


def test_first_half_share_reads_where_a_colour_is_and_placement_covers_every_relation():
    from transfusion.data.shapes import Scene, SceneObject, render

    probe = load_benchmark("binding_probe")
    top = render(Scene([SceneObject("circle", "red", "large", 0.25, 0.25), SceneObject("square", "blue", "large", 0.25, 0.75)]))  # fmt: skip
    bottom = render(Scene([SceneObject("circle", "red", "large", 0.75, 0.75), SceneObject("square", "blue", "large", 0.75, 0.25)]))  # fmt: skip
    assert (
        probe.first_half_share([top], "red", "y") == 1.0
        and probe.first_half_share([bottom], "red", "y") == 0.0
    )
    assert probe.first_half_share([top, bottom], "red", "y") == 0.5  # the same mass in each half
    assert (
        probe.first_half_share([top], "red", "x") == 1.0
        and probe.first_half_share([bottom], "blue", "x") == 0.0
    )
    assert probe.first_half_share([top], "green", "y") == 0.5  # no such colour: no side

    class Identity(torch.nn.Module):  # a stand-in VAE: latents are 3-channel pixels in [-1, 1]
        def __init__(self):
            super().__init__()
            self.where = torch.nn.Parameter(torch.zeros(()))  # decode_latents reads the device from it

        def from_diffusion(self, z):
            return z[:, :3]

        def decode(self, x):
            return x

    loaded, _ = untrained("flow", seed=4)
    rows = probe.placement_rows(loaded, Identity(), [999, 500], seed=1, per_prompt=2)
    assert [r["t"] for r in rows] == [999, 500]
    assert all(
        0.0 <= r[k] <= 1.0 for r in rows for k in ("above", "below", "to the left of", "to the right of")
    )
