"""Describe image files with a trained checkpoint: one caption per image, printed as ``path<TAB>caption``
(whitespace inside a caption collapsed to single spaces, so each image takes one line).

Images are converted to RGB, resized on their shorter side and centre-cropped to the size the model
was trained at (its latent size times the VAE's downsampling), as the training data is; a note on
stderr says so when a file had another size. An image smaller than that is refused rather than
upscaled. Captions are greedy unless ``--temperature`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from transfusion.generate import Decoder, caption
from transfusion.generate_cli import (
    add_generation_options,
    generation_config,
    load_for_inference,
    pick_device,
    vae_directory,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_generation_options(p, images=False)
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")


def run(args: argparse.Namespace) -> int:
    from PIL import Image as PILImage

    from transfusion.data.sources import BadItem, read_image
    from transfusion.vae import pil_to_tensor

    gen = generation_config(args, temperature=0.0)
    for name in args.images:
        if not Path(name).is_file():
            raise FileNotFoundError(f"no such image file: {name}")
    device = pick_device(args.device)
    loaded, vae = load_for_inference(args.checkpoint, device)
    if vae is None:
        missing = vae_directory(loaded)
        why = f" (its VAE directory {missing} is missing)" if missing else ""
        raise ValueError(f"{args.checkpoint} has no VAE{why}, so it cannot read images")
    size = loaded.config.model.latent_size * vae.config.downsample  # pixels the model's latents cover
    pictures = []
    for name in args.images:
        try:
            pictures.append(read_image(Path(name), size))
        except BadItem as e:
            raise ValueError(str(e)) from None
        with PILImage.open(name) as im:
            if im.size != (size, size):
                w, h = im.size
                print(
                    f"note: {name} is {w}x{h}; resized and centre-cropped to {size}x{size}", file=sys.stderr
                )
    with torch.no_grad():
        latents = vae.to_diffusion(vae.encode(pil_to_tensor(pictures).to(device))).float()
    decoder = Decoder(loaded.model, loaded.tokenizer, loaded.config.diffusion)
    texts = caption(decoder, list(latents), gen, seeds=[args.seed + i for i in range(len(pictures))])
    for name, text in zip(args.images, texts):
        print(f"{name}\t{' '.join(text.split())}")  # one line per image, whatever the model wrote
    return 0
