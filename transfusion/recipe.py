"""The small-budget recipe the demo and the experiments share: one home, imported by both (the
demo's module docstring says why each choice was made, with the measurements behind it).

``demo_config`` is the model, data and optimisation the demo trains on shape scenes (a rectified-flow
model there, the paper's epsilon model on Fashion-MNIST; the experiments pin the paper's objective);
``GUIDANCE_MAX_T`` the guidance interval of its evaluation; ``READING_ORDER`` the order in which its
two-object captions name the objects; ``VAE_LR``, ``VAE_GRAD_CLIP``, ``POOL`` and
``TOKENIZER_VOCAB`` the autoencoder's learning rate and gradient cap, the pool of scenes encoded once,
and the BPE tokenizer's size.
"""

from __future__ import annotations

import sys

from transfusion.config import (
    Config,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    TrainConfig,
    VAEConfig,
    preset,
)


def note(message: str) -> None:
    """Progress lines of the demo and the experiments (stderr: their results go to stdout)."""
    print(message, file=sys.stderr)


GUIDANCE_MAX_T = 850
"""On shape scenes, guidance only at t <= 850. Guiding the noisiest steps drew blank images for single
objects with the earlier epsilon model (the blank share of 24 single-object prompts went 17% -> 50% from
guidance 1 to 3 on every step, 20% with t <= 700 on the same checkpoint; Kynkäänniemi et al. 2024 find
the same on ImageNet). On the flow model, chosen on prompts the evaluation does not use (eval seed 1,
three checkpoints): t <= 700 / 850 / 925 / every step gave colour attribution 0.67-0.80 / 0.73-0.87 /
0.77-0.87 / 0.77-0.87 and counting 0.93-0.97 / 0.93-1.00 / 0.90-0.97 / 0.77-1.00, blank images only at
925 (1% in one run); on
the evaluation's own prompts 700 -> 850 moved colour attribution 0.57-0.83 -> 0.67-0.90 (README).
Fashion-MNIST keeps guidance on every step: on one of its checkpoints the interval cut class accuracy
from 0.89 to 0.73 (garments fill the frame, there is no blank mean to fall into)."""
VAE_LR = 5e-3
"""The VAE's peak learning rate (warm-up, cosine decay); with base_channels 16 it reaches 35 dB in
1,200 steps on the shape scenes (32 width: 19 dB in the same time)."""
VAE_GRAD_CLIP = 1.0
"""The VAE's gradient-norm cap. Its gradients run at norm 0.1-0.5 once past the first 15 steps (4.8 at
the first), so the cap only bites early and on spikes; at lr 5e-3 one spike can undo hundreds of steps.
Seed 0 of the demo's VAE stage in two threads (where one thread gave 35.9 dB) met a spike at step 230
(norm 2.2; training PSNR 20.4 -> 15.3 dB) and ended at 29.4 dB; capped, 37.5 dB in one thread and in
two. Seeds 0 / 1 / 2 in one thread: 35.9 / 32.9 / 33.1 dB without the cap, 37.5 / 36.2 / 36.1 with it
(in two threads, capped: 37.5 / 36.1 / 36.2)."""
READING_ORDER = True
"""On shape scenes, every caption of two objects names the upper or left one first: relation captions
(``data.canonical_relations=1``: "a blue square above a red circle", never the same scene's "a red
circle below a blue square") and "and" captions alike (``data.pairs_in_reading_order``: "a blue square
and a red circle"). The order of the words then says where each object goes, and colours and shapes
bind to places by it: three seeds, against half the relation captions in reading order and "and"
captions in either order, colour attribution 0.67-0.90 -> 0.97, overall composition 0.82-0.85 ->
0.96-0.97, strict caption accuracy 0.89-0.94 -> 0.95-1.00. The model never reads "below" or "to the
right of", so prompts that use them are given to it in reading order (``data.shapes.reading_order``,
``generate`` / ``eval --relation-wording``): position 0.90-1.00 so, 0.40-0.43 as written. Relation
captions alone in reading order (``pairs_in_reading_order`` off) cost colour attribution instead
(0.40-0.73). README, "Which object goes where"."""
POOL = 20_000  # distinct training scenes of the shapes source, encoded once
TOKENIZER_VOCAB = 512


def demo_model() -> ModelConfig:
    """The demo's trunk: the small preset's width (256) with 3 layers, the U-Net patcher with 4x4 patches
    (4 per 8x8 latent) and 2D RoPE over patch rows and columns."""
    return preset("small", patcher="unet", n_layers=3, patch_size=4, unet_channels=32, rope_2d=True)


def demo_config(
    steps: int,
    seed: int,
    source: str = "shapes",
    tokenizer: str | None = None,
    latent_cache: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """The small preset's width (256) with 3 layers and the U-Net patcher, on 32x32 images through a 4x
    VAE (8x8x8 latents, 4x4 patches: 4 per image), image-first pairs 25% of the time, then
    ``overrides`` (``section.key=value``). Why these: see the module docstring."""
    from transfusion.tokenizer import load_tokenizer

    cfg = Config(
        model=demo_model(),
        diffusion=DiffusionConfig(
            objective="flow" if source == "shapes" else "ddpm", guidance_max_t=GUIDANCE_MAX_T if source == "shapes" else None
        ),
        vae=VAEConfig(image_size=32, downsample=4, latent_channels=8, base_channels=16),
        data=DataConfig(
            source=source, image_size=32, seed=seed, length=POOL if latent_cache else None, latent_cache=latent_cache,
            caption_first_prob=0.75, canonical_relations=1.0 if source == "shapes" and READING_ORDER else 0.0,
            pairs_in_reading_order=source == "shapes" and READING_ORDER,
        ),
        train=TrainConfig(
            steps=steps, batch_size=16, seq_len=128, lr=1e-3, min_lr=1e-4, warmup_steps=min(100, steps // 10 + 1),
            log_every=10, eval_every=100, ckpt_every=250, keep_last=2, seed=seed, tokenizer=tokenizer,
        ),
    )  # fmt: skip
    cfg = cfg.override(overrides or [])
    cfg.model.vocab_size = load_tokenizer(cfg.train.tokenizer).vocab_size
    return cfg
