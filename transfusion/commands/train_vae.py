"""`transfusion train-vae`: train the image autoencoder and compute its latent scale.

Writes OUT/vae.safetensors + OUT/vae.json (the config with the data-derived scale and shift) and
OUT/metrics.json with the held-out reconstruction PSNR; ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse

from transfusion.commands.options import add_data_options, add_progress_option, out_dir
from transfusion.config import DataConfig, VAEConfig
from transfusion.training.vae import load_images, train_vae


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_autoencoder_arguments(p, "kl")


def run(args: argparse.Namespace) -> int:
    return run_autoencoder(args, "kl")


def add_autoencoder_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    """The options of ``train-vae`` (kind 'kl') and ``train-vq`` (kind 'vq'), which share everything
    but the regulariser."""
    p.add_argument("--out", required=True, help="directory for vae.safetensors, vae.json and metrics.json")
    add_data_options(p, sources=("shapes", "fashion_mnist", "folder", "jsonl", "webdataset"))
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--downsample", type=int, default=4, choices=[4, 8], help="spatial reduction (default 4)")
    if kind == "kl":
        p.add_argument(
            "--latent-channels", type=int, default=8, help="latent channels (default 8, as the paper)"
        )
        p.add_argument("--kl-weight", type=float, default=1e-6, help="beta in MSE + beta x KL (default 1e-6)")
    else:
        p.add_argument("--latent-channels", type=int, default=8, help="width of a code vector (default 8)")
        p.add_argument("--codebook-size", type=int, default=1024, help="codes in the codebook (default 1024)")
        p.add_argument(
            "--commitment", type=float, default=0.25, help="beta of the commitment loss (default 0.25)"
        )
    p.add_argument("--base-channels", type=int, default=32, help="width of the first conv stage (default 32)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate: warm-up, then cosine decay (default 2e-3)"
    )
    p.add_argument(
        "--grad-clip", type=float, default=1.0,
        help="cap on the gradient's global norm, 0 for none (default 1.0: only spikes reach it)",
    )  # fmt: skip
    p.add_argument("--train-images", type=int, default=4096, help="training images to draw from the source")
    p.add_argument("--val-images", type=int, default=256, help="held-out images for the PSNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ckpt-every", type=int, default=200, help="save the training state every N steps (default 200)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    add_progress_option(p)
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: skip it with a warning and count it)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DataConfig.val_fraction,
        help=f"share of a folder / jsonl / webdataset source held out for the PSNR (default {DataConfig.val_fraction})",
    )


def run_autoencoder(args: argparse.Namespace, kind: str) -> int:
    out = out_dir(args.out)
    data = DataConfig(
        source=args.data, path=args.data_path, image_size=args.image_size, strict=args.strict,
        val_fraction=args.val_fraction,
    )  # fmt: skip
    extra = (
        {"kl_weight": args.kl_weight}
        if kind == "kl"
        else {"codebook_size": args.codebook_size, "commitment": args.commitment}
    )
    cfg = VAEConfig(
        kind=kind, image_size=args.image_size, downsample=args.downsample, latent_channels=args.latent_channels,
        base_channels=args.base_channels, **extra,
    )  # fmt: skip
    train = load_images(data, "train", args.train_images)
    val = load_images(data, "val", args.val_images)
    result = train_vae(
        cfg, train, val, out, args.steps, args.batch_size, args.lr, args.seed,
        ckpt_every=args.ckpt_every, resume=args.resume, progress=not args.no_progress,
        grad_clip=args.grad_clip or None,
    )  # fmt: skip
    if kind == "kl":
        what = f"latent scale {result['scale']:.4f}"
    else:
        what = (f"codebook perplexity {result['codebook_perplexity']:.0f}, {result['codes_used']} codes used, "
                f"{result['dead_codes']} dead")  # fmt: skip
    print(f"wrote {out}: held-out PSNR {result['psnr_val']:.2f} dB, {what}")
    return 0
