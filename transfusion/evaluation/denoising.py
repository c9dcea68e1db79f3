"""The denoising loss on held-out images, by timestep band and by patch position.

Image quality read from samples depends on the sampler, the guidance weight and a judge; the loss the
model is trained on depends on none of them and varies little between runs. Every held-out pair
(caption first, then its image: the order of generation) is scored at the middle timestep of each of
``bands`` equal bands of t, with the same noise in every band, so the bands differ only in t. The error
is kept per patch in raster order (the model's own patches), the order in which causal attention
lets patches see each other: the first patch of an image sees nothing of its own image under causal
attention and all of it under bidirectional attention, so that is where the two should differ most.

``loss_by_t[b]`` is the mean over images and patches in band b; ``loss_by_patch[i]`` the mean over
images and bands at raster position i; ``image_val_loss`` the mean of both (every band weighs the
same, as training draws t uniformly); ``image_val_loss_early`` the mean over the first quarter of the
positions (the upper rows of the image).
"""

from __future__ import annotations

from typing import Any

import torch

from transfusion import diffusion
from transfusion.patching import patchify
from transfusion.sequence import Image, Sample, Specials, Text, pack, sample_length
from transfusion.vae import encode_images


@torch.no_grad()
def denoising_profile(
    pipe: Any, records: list, bands: int = 10, batch_size: int = 64, seed: int = 0, caption: bool = True
) -> dict[str, Any]:
    """The loss profile of ``pipe``'s model on ``records`` (held-out image-caption records): see the
    module docstring. With ``caption=False`` the images come without their captions (BOS BOI image:
    the unconditional twin that classifier-free guidance subtracts), so the two profiles' difference is
    what the caption is worth to the denoiser. Needs a model of continuous images (a VQ-code model
    has no denoising loss)."""
    model, cfg = pipe.model, pipe.config
    if model.cfg.image_tokens != "continuous":
        raise ValueError("the denoising loss needs a model of continuous images (this one reads VQ codes)")
    if not records:
        raise ValueError("denoising_profile needs at least one held-out record")
    schedule = diffusion.make_schedule(cfg.diffusion)
    T = schedule.num_timesteps
    mids = [int((b + 0.5) * T / bands) for b in range(bands)]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    specials = Specials.of(pipe.tokenizer)
    n, k = model.cfg.patches_per_image, model.cfg.patch_size
    by_band = torch.zeros(bands, n, dtype=torch.float64)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        latents = encode_images(pipe.vae, [r.image for r in chunk])
        texts = [pipe.tokenizer.encode(r.text) for r in chunk]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + start))
        for b, t in enumerate(mids):
            samples = [Sample([Text(ids), Image(lat, t=t)] if caption else [Image(lat, t=t)])
                       for ids, lat in zip(texts, latents)]  # fmt: skip
            longest = max(sample_length(s, n) for s in samples)  # rows as long as the longest pair
            batch = pack(samples, longest, specials, n, one_per_row=True)
            x_t, target = diffusion.training_target(
                cfg.diffusion.objective, batch.latents, noise, batch.timesteps, schedule
            )
            out = model(batch.replace(latents=x_t).to(device))
            err = (out.image_pred.float().cpu() - target.float()).pow(2)  # (N, C, H, W)
            by_band[b] += patchify(err, k).mean(-1).sum(0).double()  # summed over images, per patch
    model.train(was)
    by_band /= len(records)
    early = max(1, n // 4)
    return {
        "image_val_loss": float(by_band.mean()),
        "image_val_loss_early": float(by_band[:, :early].mean()),
        "loss_by_t": [round(float(v), 6) for v in by_band.mean(1)],
        "loss_by_patch": [round(float(v), 6) for v in by_band.mean(0)],
        "loss_t_mids": mids,
        "loss_images": len(records),
    }
