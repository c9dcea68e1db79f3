"""Train the image autoencoder: reconstruction (MSE) + beta x KL, then compute its latent scale.

Writes ``OUT/vae.safetensors`` + ``OUT/vae.json`` (config with the data-derived scale and shift, and
a content hash) and ``OUT/metrics.json`` with the reconstruction PSNR on held-out images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion.config import DataConfig, VAEConfig
from transfusion.vae import KLVAE, compute_latent_stats, pil_to_tensor, psnr, save_vae


def load_images(data: DataConfig, split: str, count: int) -> torch.Tensor:
    """``count`` images of a source as (N, 3, S, S) in [-1, 1] (records without an image skipped)."""
    from transfusion.data.sources import make_source

    source = make_source(data, split)
    images = []
    for record in _iterate(source):
        if record is not None and record.image is not None:
            images.append(record.image)
        if len(images) == count:
            break
    if not images:
        raise ValueError(f"data source {data.source!r} yielded no images")
    return pil_to_tensor(images)


def _iterate(source: Any):
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        for i in range(len(source)):
            yield source[i]
    else:
        yield from source


def train_vae(
    cfg: VAEConfig,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    out_dir: str | Path,
    steps: int = 800,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    ckpt_every: int = 200,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train, compute (scale, shift) from the training images, save, and report held-out PSNR.

    Every ``ckpt_every`` steps the training state (weights, optimizer, schedule, sampling generator,
    loss history) is written atomically to ``out_dir/train_state``; ``resume`` continues from it and
    gives the same result as an uninterrupted run. ``stop_after`` ends early, as an interruption would."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = KLVAE(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, first, history = time.time(), 0, []
    state_dir = out / "train_state"
    if resume:
        if not (state_dir / "state.pt").is_file():
            raise ValueError(f"{out} holds no VAE training state to resume; drop --resume")
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(state_dir / "vae.safetensors"))
        state = torch.load(state_dir / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        first, history = int(state["step"]), json.loads((state_dir / "history.json").read_text())
    bar = tqdm(range(first, steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(train_images), (batch_size,), generator=gen)
        loss, mse, kl = vae.loss(train_images[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            p = 10 * torch.log10(4.0 / mse.detach().clamp(min=1e-12)).item()
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}", psnr=f"{p:.1f}")
            history.append({"step": step, "mse": mse.item(), "kl": kl.item()})
        done = step + 1
        if done % ckpt_every == 0 or (stop_after is not None and done >= stop_after):
            _save_state(state_dir, vae, opt, sched, gen, done, history)
        if stop_after is not None and done >= stop_after:
            return {"vae": vae, "stopped_at": done}
    vae.eval()
    scale, shift = compute_latent_stats(vae, train_images[:1024])
    vae.config.scale, vae.config.shift = scale, shift
    with torch.no_grad():
        recon = torch.cat(
            [vae.decode(vae.encode(val_images[i : i + 64])) for i in range(0, len(val_images), 64)]
        )
    metrics = {
        "psnr_val": psnr(recon.clamp(-1, 1), val_images),
        "val_images": len(val_images),
        "steps": steps,
        "seconds": time.time() - start,
        "scale": scale,
        "shift": shift,
        "first_mse": history[0]["mse"],
        "last_mse": history[-1]["mse"],
    }
    save_vae(vae, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"vae": vae, **metrics}


def _save_state(
    state_dir: Path, vae: KLVAE, opt, sched, gen: torch.Generator, step: int, history: list
) -> None:
    """The whole training state in a temporary directory renamed into place (no code on load)."""
    import shutil

    from transfusion.checkpoint import save_tensors

    tmp = state_dir.with_name(f".{state_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "vae.safetensors", vae.state_dict())
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "step": step,
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "history.json").write_text(json.dumps(history))
    shutil.rmtree(state_dir, ignore_errors=True)
    tmp.rename(state_dir)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for vae.safetensors, vae.json and metrics.json")
    p.add_argument(
        "--data", default="shapes", help="data source: shapes (default), fashion_mnist, folder, jsonl"
    )
    p.add_argument("--data-path", default=None, help="path for folder / jsonl / fashion_mnist sources")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--downsample", type=int, default=4, choices=[4, 8], help="spatial reduction (default 4)")
    p.add_argument("--latent-channels", type=int, default=8, help="latent channels (default 8, as the paper)")
    p.add_argument("--base-channels", type=int, default=32, help="width of the first conv stage (default 32)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="beta in MSE + beta x KL (default 1e-6)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate, one-cycle schedule (default 2e-3)"
    )
    p.add_argument("--train-images", type=int, default=4096, help="training images to draw from the source")
    p.add_argument("--val-images", type=int, default=256, help="held-out images for the PSNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ckpt-every", type=int, default=200, help="save the training state every N steps (default 200)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
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


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    data = DataConfig(
        source=args.data, path=args.data_path, image_size=args.image_size, strict=args.strict,
        val_fraction=args.val_fraction,
    )  # fmt: skip
    cfg = VAEConfig(
        image_size=args.image_size,
        downsample=args.downsample,
        latent_channels=args.latent_channels,
        base_channels=args.base_channels,
        kl_weight=args.kl_weight,
    )
    train = load_images(data, "train", args.train_images)
    val = load_images(data, "val", args.val_images)
    result = train_vae(
        cfg, train, val, out, args.steps, args.batch_size, args.lr, args.seed,
        ckpt_every=args.ckpt_every, resume=args.resume,
    )  # fmt: skip
    print(f"wrote {out}: held-out PSNR {result['psnr_val']:.2f} dB, latent scale {result['scale']:.4f}")
    return 0
