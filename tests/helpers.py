"""Small builders shared by the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

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


class PixelVAE(torch.nn.Module):
    """A stand-in autoencoder whose latents are the pixels: what an evaluator generates is exactly the
    image it judges."""

    def __init__(self, image_size: int = 32) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"image_size": image_size})()

    def encode(self, x):
        return x

    def decode(self, z):
        return z

    def to_diffusion(self, z):
        return z

    def from_diffusion(self, z):
        return z


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module, e.g. ``load_benchmark("demo_spread")``."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
