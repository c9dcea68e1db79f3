"""Describe image files with a trained checkpoint: one caption per image, printed as ``path<TAB>caption``.

Images are converted to RGB, resized (shorter side) and centre-cropped to the model's image size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from transfusion.generate import Decoder, caption
from transfusion.generate_cli import (
    add_generation_options,
    generation_config,
    load_for_inference,
    pick_device,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_generation_options(p)
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")


def run(args: argparse.Namespace) -> int:
    from transfusion.data.sources import BadItem, read_image
    from transfusion.vae import pil_to_tensor

    device = pick_device(args.device)
    loaded, vae = load_for_inference(args.checkpoint, device)
    if vae is None:
        raise ValueError(f"{args.checkpoint} has no VAE, so it cannot read images")
    size = vae.config.image_size
    pictures = []
    for name in args.images:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        try:
            pictures.append(read_image(path, size))
        except BadItem as e:
            raise ValueError(str(e)) from None
    with torch.no_grad():
        latents = vae.to_diffusion(vae.encode(pil_to_tensor(pictures).to(device))).float()
    if args.temperature is None:
        args.temperature = 0.0
    gen = generation_config(args, loaded.config)
    decoder = Decoder(loaded.model, loaded.tokenizer, loaded.config.diffusion)
    texts = caption(decoder, list(latents), gen, seeds=[args.seed + i for i in range(len(pictures))])
    for name, text in zip(args.images, texts):
        print(f"{name}\t{text}")
    return 0
