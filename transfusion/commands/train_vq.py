"""`transfusion train-vq`: train the VQ image tokenizer of the Chameleon-style baseline.

The same convolutional encoder/decoder and downsampling as ``train-vae``, with a codebook (default
1024 codes) in between: straight-through gradients, codebook and commitment losses, dead codes
restarted. Writes OUT/vae.safetensors + OUT/vae.json (kind 'vq') and OUT/metrics.json with the
held-out PSNR and the codebook's use (perplexity, codes used, dead codes).
"""

from __future__ import annotations

import argparse

from transfusion.commands.train_vae import add_autoencoder_arguments, run_autoencoder


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_autoencoder_arguments(p, "vq")


def run(args: argparse.Namespace) -> int:
    return run_autoencoder(args, "vq")
