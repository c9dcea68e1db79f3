"""`transfusion encode`: pre-encode a dataset through the VAE into latent shards, once, so that training
streams latents (``--data latents --data-path OUT``) without decoding a single image.

Each split (``--splits``, default train and val) becomes ``OUT/<split>/``: safetensors shards of latents
with the captions beside them (``transfusion.data.latents``). Under torchrun every rank encodes its own
shards on its own GPU (``torchrun --nproc_per_node=8 -m transfusion encode ...``), with
``--num-workers`` processes per rank decoding and resizing images; an interrupted run continues where
it stopped (finished shards are kept) when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transfusion import distributed as D
from transfusion.commands.options import add_data_options, add_progress_option, note, out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vae",
        required=True,
        help="the autoencoder: a train-vae / train-vq directory or a diffusers AutoencoderKL",
    )
    add_data_options(p, default=None, sources=("shapes", "fashion_mnist", "folder", "jsonl", "webdataset"))
    p.add_argument(
        "--out", required=True, help="directory for the latent shards (one sub-directory per split)"
    )
    p.add_argument(
        "--splits", default="train,val", help="splits to encode, comma-separated (default train,val)"
    )
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the VAE's)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N items of each split")
    p.add_argument("--shard-size", type=int, default=4096, help="items per shard file (default 4096)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward (default 64)")
    p.add_argument(
        "--num-workers", type=int, default=4, help="processes per rank decoding images (default 4; 0: none)"
    )
    p.add_argument(
        "--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
        help="stored latent dtype (default auto: float16 for a KL-VAE's latents, float32 for VQ codes)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (under torchrun: each rank's GPU)")
    p.add_argument(
        "--set",
        action="append",
        metavar="data.KEY=VALUE",
        help="any other data field, e.g. data.val_fraction=0.01",
    )
    add_progress_option(p)


def run(args: argparse.Namespace) -> int:
    from transfusion.autoencoders import load_vae
    from transfusion.config import Config
    from transfusion.data.latents import build_latents
    from transfusion.data.sources import make_source
    from transfusion.training import image_encoder
    from transfusion.vae import vae_hash

    out = out_dir(args.out)
    if not args.data:
        raise ValueError("give --data (and --data-path for a file source): the images to encode")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or any(s not in ("train", "val") for s in splits):
        raise ValueError(f"--splits {args.splits!r}: use train, val or train,val")
    if args.shard_size < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("--shard-size and --batch-size must be >= 1, --num-workers >= 0")
    vae = load_vae(args.vae)
    size = args.image_size or vae.config.image_size
    overrides = [f"data.source={args.data}", f"data.image_size={size}", *(args.set or [])]
    if args.data_path:
        overrides.append(f"data.path={json.dumps(args.data_path)}")
    if any(not o.startswith("data.") for o in args.set or []):
        raise ValueError("--set takes data fields only here (data.KEY=VALUE)")
    data = Config().override(overrides).data
    if size != vae.config.image_size:
        raise ValueError(
            f"--image-size {size} but the VAE encodes {vae.config.image_size}x{vae.config.image_size} images"
        )
    dtype = args.dtype if args.dtype != "auto" else ("float32" if vae.config.kind == "vq" else "float16")
    info = D.init(args.device)
    encode = image_encoder(vae, info.device)
    digest = vae_hash(vae)
    for split in splits:
        source = make_source(data, split)
        if not hasattr(source, "__len__"):
            raise ValueError(
                f"{data.path}: remote shards stream in order and cannot be shared out; copy them locally"
            )
        count = min(len(source), args.limit) if args.limit else len(source)
        if data.source == "shapes" and data.length is None and not args.limit:
            raise ValueError("the shapes source is endless: give --limit N or --set data.length=N")
        D.print0(f"{split}: {count:,} items of {source.describe()} on {info.world_size} process(es)")
        build_latents(source, encode, digest, out / split, count, dtype=dtype, shard_size=args.shard_size,
                      batch_size=args.batch_size, workers=args.num_workers, rank=info.rank, world=info.world_size,
                      replace=False, progress=info.is_main and not args.no_progress)  # fmt: skip
        index = json.loads((out / split / "index.json").read_text())
        D.print0(f"{split}: {index['count'] - index['skipped']:,} latents {tuple(index['shape'])} {dtype} in "
                 f"{index['shards']} shard(s) at {out / split} ({index['skipped']} unreadable item(s) skipped)")  # fmt: skip
    D.cleanup()
    if info.is_main:
        note(f"train on them: transfusion train --data latents --data-path {out} --vae {Path(args.vae)} ...")
    return 0
