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

from transfusion.commands.generate import add_generation_options
from transfusion.commands.options import note, pick_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_generation_options(p, images=False)
    p.add_argument(
        "--resize",
        action="store_true",
        help="resize and centre-crop larger images to the model's size (default: other sizes are an error)",
    )
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")


def run(args: argparse.Namespace) -> int:
    from transfusion.pipeline import Pipeline

    for name in args.images:
        if not Path(name).is_file():
            raise FileNotFoundError(f"no such image file: {name}")
    pipe = Pipeline.from_pretrained(args.checkpoint, pick_device(args.device), adapters=args.adapter)
    notes: list[str] = []
    latents = pipe.encode(args.images, args.resize, notes)
    for line in notes:
        note(f"note: {line}")
    texts = pipe.caption(latents, max_new_tokens=args.max_new_tokens,
                         temperature=0.0 if args.temperature is None else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    for name, text in zip(args.images, texts):
        print(f"{name}\t{' '.join(text.split())}")  # one line per image, whatever the model wrote
    return 0
