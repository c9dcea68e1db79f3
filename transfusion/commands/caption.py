"""`transfusion caption`: describe image files with a trained checkpoint: one caption per image, printed as ``path<TAB>caption``
(whitespace inside a caption collapsed to single spaces, so each image takes one line).

Images must have the size the model was trained at (its latent size times the VAE's downsampling):
any other size is an error naming the size expected. With ``--resize`` a larger image is instead
resized on its shorter side and centre-cropped, as the training data is (a note on stderr says so);
a smaller one is always refused rather than upscaled. Captions are greedy unless ``--temperature``
says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transfusion.checkpoint import load_for_inference
from transfusion.commands.generate import add_generation_options, generation_config, read_images_as_latents
from transfusion.commands.options import pick_device
from transfusion.generate import Decoder, caption


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_generation_options(p, images=False)
    p.add_argument(
        "--resize",
        action="store_true",
        help="resize and centre-crop larger images to the model's size (default: other sizes are an error)",
    )
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")


def run(args: argparse.Namespace) -> int:
    gen = generation_config(args, temperature=0.0)
    for name in args.images:
        if not Path(name).is_file():
            raise FileNotFoundError(f"no such image file: {name}")
    device = pick_device(args.device)
    loaded, vae = load_for_inference(args.checkpoint, device)
    latents = read_images_as_latents(args.images, loaded, vae, device, args.resize)
    decoder = Decoder(loaded.model, loaded.tokenizer, loaded.config.diffusion)
    texts = caption(decoder, latents, gen, seeds=[args.seed + i for i in range(len(latents))])
    for name, text in zip(args.images, texts):
        print(f"{name}\t{' '.join(text.split())}")  # one line per image, whatever the model wrote
    return 0
