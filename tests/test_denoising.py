"""The denoising loss by timestep band and patch position (``evaluation.denoising``): equal to a
brute-force loop over images, bands and patches, for bidirectional and causal image attention; under
causal attention the first patch's loss does not depend on what the later patches hold."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from transfusion import diffusion
from transfusion.config import Config, DiffusionConfig, tiny
from transfusion.evaluation.denoising import denoising_profile
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack
from transfusion.vae import encode_images

from helpers import TOK, PixelVAE


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def pipe_for(attention: str, objective: str = "ddpm") -> SimpleNamespace:
    torch.manual_seed(0)
    model = Transfusion(tiny(latent_channels=3, image_attention=attention, vocab_size=TOK.vocab_size)).eval()
    with torch.no_grad():  # the output layer starts at zero: random weights make the errors differ per patch
        for p in model.patcher.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.2)
    config = Config(model=model.cfg, diffusion=DiffusionConfig(objective=objective))
    return SimpleNamespace(model=model, config=config, tokenizer=TOK, vae=PixelVAE(4))


def records(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    pictures = [
        PILImage.fromarray(torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]
    words = ["a red dress", "an ankle boot", "a bag"]
    return [SimpleNamespace(image=im, text=words[i % 3]) for i, im in enumerate(pictures)]  # fmt: skip


@pytest.mark.parametrize(
    "attention,objective", [("bidirectional", "ddpm"), ("causal", "ddpm"), ("bidirectional", "flow")]
)
def test_the_profile_equals_a_loop_over_images_bands_and_patches(attention, objective):
    pipe, recs, bands = pipe_for(attention, objective), records(3), 4
    got = denoising_profile(pipe, recs, bands=bands, batch_size=2, seed=5)  # two chunks: 2 + 1
    schedule = diffusion.make_schedule(pipe.config.diffusion)
    mids = [int((b + 0.5) * 1000 / bands) for b in range(bands)]
    assert got["loss_t_mids"] == mids
    lat = encode_images(pipe.vae, [r.image for r in recs])
    noise = torch.cat([torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(5)),
                       torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(7))])  # fmt: skip
    table = torch.zeros(bands, 3, 4, dtype=torch.float64)  # band, image, patch (raster order)
    for i, r in enumerate(recs):
        for b, t in enumerate(mids):
            tt = torch.tensor([t])
            x_t, target = diffusion.training_target(objective, lat[i : i + 1], noise[i : i + 1], tt, schedule)
            batch = pack([Sample([Text(TOK.encode(r.text)), Image(lat[i])])], 64, Specials.of(TOK), 4)
            with torch.no_grad():
                pred = pipe.model(batch.replace(latents=x_t, timesteps=tt)).image_pred
            err = (pred - target).pow(2)[0]
            for row in range(2):
                for col in range(2):
                    table[b, i, row * 2 + col] = err[:, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].mean()
    assert got["loss_by_t"] == pytest.approx(table.mean((1, 2)).tolist(), rel=1e-4)
    assert got["loss_by_patch"] == pytest.approx(table.mean((0, 1)).tolist(), rel=1e-4)
    assert got["image_val_loss"] == pytest.approx(float(table.mean()), rel=1e-4)
    assert got["image_val_loss_early"] == pytest.approx(
        float(table[:, :, 0].mean()), rel=1e-4
    )  # 4 patches: 1
    assert len(set(got["loss_by_patch"])) == 4  # random weights: every patch its own error


def test_under_causal_attention_the_first_patch_sees_nothing_of_the_later_ones():
    """Change the lower half of every image: the first patch's loss stays under causal attention and
    moves under bidirectional attention (the mechanism the attention finding is about)."""
    first, changed = records(3), records(3)
    for r in changed:
        pixels = torch.from_numpy(np.array(r.image))
        pixels[2:] = 255 - pixels[2:]
        r.image = PILImage.fromarray(pixels.numpy())
    for attention in ("causal", "bidirectional"):
        pipe = pipe_for(attention)
        a = denoising_profile(pipe, first, bands=2)["loss_by_patch"]
        b = denoising_profile(pipe, changed, bands=2)["loss_by_patch"]
        assert (a[0] == pytest.approx(b[0], rel=1e-5)) == (attention == "causal")
        assert a[3] != pytest.approx(b[3], rel=1e-3)  # the changed patches themselves differ either way


def test_without_captions_the_profile_is_the_unconditional_twins():
    """``caption=False`` scores BOS BOI image, the sequence guidance subtracts: equal to the profile of
    records whose caption is empty, and different from the captioned one."""
    pipe, recs = pipe_for("bidirectional"), records(3)
    empty = [SimpleNamespace(image=r.image, text="") for r in recs]
    uncond = denoising_profile(pipe, recs, bands=2, caption=False)
    assert uncond["loss_by_patch"] == pytest.approx(
        denoising_profile(pipe, empty, bands=2)["loss_by_patch"], rel=1e-6
    )
    assert uncond["image_val_loss"] != pytest.approx(
        denoising_profile(pipe, recs, bands=2)["image_val_loss"], rel=1e-4
    )


def test_a_model_of_vq_codes_has_no_denoising_loss():
    pipe = pipe_for("bidirectional")
    pipe.model.cfg.image_tokens = "discrete"
    with pytest.raises(ValueError, match="continuous"):
        denoising_profile(pipe, records(1))
