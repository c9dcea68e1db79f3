"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from transfusion.config import ModelConfig
from transfusion.sequence import Image, Sample, Text
from transfusion.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def latent(cfg: ModelConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)


def mixed_samples(cfg: ModelConfig, gen: torch.Generator | None = None) -> list[Sample]:
    """Four samples: two caption-first, one image-first (noise-limited), one with two images."""
    return [
        Sample([Text(TOK.encode("a red circle")), Image(latent(cfg, gen))]),
        Sample([Text(TOK.encode("two blue squares")), Image(latent(cfg, gen))]),
        Sample([Image(latent(cfg, gen), noise_limited=True), Text(TOK.encode("a green triangle"))]),
        Sample(
            [
                Text(TOK.encode("left:")),
                Image(latent(cfg, gen)),
                Text(TOK.encode(" right:")),
                Image(latent(cfg, gen)),
            ]
        ),
    ]
