"""Train an image autoencoder: the KL-VAE (reconstruction MSE + beta x KL, then its latent scale) or
the VQ tokenizer (MSE + codebook and commitment losses, dead codes restarted; ``vq.VQVAE``).

Writes ``OUT/vae.safetensors`` + ``OUT/vae.json`` (the config, with a KL-VAE's data-derived scale
and shift, and a content hash) and ``OUT/metrics.json``: the reconstruction PSNR on held-out images,
and for a VQ tokenizer its codebook use (perplexity, dead codes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transfusion.autoencoders import make_autoencoder
from transfusion.config import DataConfig, VAEConfig
from transfusion.io import atomic_directory, atomic_write_text, load_tensors, output_directory, save_tensors
from transfusion.training.step import warmup_cosine
from transfusion.vae import compute_latent_stats, pil_to_tensor, psnr, save_vae

WARMUP_SHARE = 0.05
"""Share of the steps spent warming the learning rate up (at least one step)."""


def load_images(data: DataConfig, split: str, count: int) -> torch.Tensor:
    """``count`` images of a source as (N, 3, S, S) in [-1, 1] (records without an image skipped)."""
    from transfusion.data.sources import iterate, make_source

    images = []
    for record in iterate(make_source(data, split)):
        if record is not None and record.image is not None:
            images.append(record.image)
        if len(images) == count:
            break
    if not images:
        raise ValueError(f"data source {data.source!r} yielded no images")
    return pil_to_tensor(images)


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
    grad_clip: float | None = None,
) -> dict[str, Any]:
    """Train, compute (scale, shift) from the training images, save, and report held-out PSNR.

    The learning rate warms up over 5% of the steps, then decays (cosine) to 5% of ``lr``. Every
    ``ckpt_every`` steps the training state (weights, optimizer, sampling generator, loss history) is
    written atomically to ``out_dir/train_state``; ``resume`` continues from it and gives the same
    result as an uninterrupted run. ``stop_after`` ends early, as an interruption would. ``grad_clip``
    caps the gradient's global norm (None: no cap); the history records the norm before the cap."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 (or None for no cap), got {grad_clip}")
    out = output_directory(out_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = make_autoencoder(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start, first, history = time.time(), 0, []
    if resume:
        first, history = _load_state(out / "train_state", vae, opt, gen)
    warmup = max(1, round(WARMUP_SHARE * steps))
    bar = tqdm(range(first, steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, warmup, lr, 0.05 * lr)
        idx = torch.randint(0, len(train_images), (batch_size,), generator=gen)
        loss, mse, kl = vae.loss(train_images[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip if grad_clip else float("inf"))
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            p = 10 * torch.log10(4.0 / mse.detach().clamp(min=1e-12)).item()
            bar.set_postfix(mse=f"{mse.item():.4f}", aux=f"{kl.item():.3f}", psnr=f"{p:.1f}")
            history.append({"step": step, "mse": mse.item(), "aux": kl.item(), "grad_norm": norm.item()})
        done = step + 1
        if done % ckpt_every == 0 or (stop_after is not None and done >= stop_after):
            _save_state(out / "train_state", vae, opt, gen, done, history)
        if stop_after is not None and done >= stop_after:
            return {"vae": vae, "stopped_at": done}
    return _finish(vae, train_images, val_images, out, steps, time.time() - start, history)


def _finish(
    vae: torch.nn.Module, train_images: torch.Tensor, val_images: torch.Tensor, out: Path, steps: int, seconds: float,
    history: list,
) -> dict[str, Any]:  # fmt: skip
    """A KL-VAE's latent scale and shift (or a VQ tokenizer's code use) from the training images,
    held-out PSNR, then the autoencoder and its metrics."""
    vae.eval()
    extra: dict[str, Any] = {}
    if vae.config.kind == "kl":
        scale, shift = compute_latent_stats(vae, train_images[:1024])
        vae.config.scale, vae.config.shift = scale, shift
        extra = {"scale": scale, "shift": shift}
    else:
        from transfusion.vq import code_usage

        extra = code_usage(vae, train_images)
    with torch.no_grad():
        recon = torch.cat([vae.reconstruct(val_images[i : i + 64]) for i in range(0, len(val_images), 64)])
    metrics = {
        "psnr_val": psnr(recon.clamp(-1, 1), val_images),
        "val_images": len(val_images),
        "steps": steps,
        "seconds": seconds,
        **extra,
        "first_mse": history[0]["mse"] if history else None,
        "last_mse": history[-1]["mse"] if history else None,
        "first_grad_norm": history[0].get("grad_norm") if history else None,
        "max_grad_norm": max((h.get("grad_norm", 0.0) for h in history), default=None),
    }
    save_vae(vae, out)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return {"vae": vae, **metrics}


def _save_state(
    state_dir: Path,
    vae: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    step: int,
    history: list,
) -> None:
    """The whole training state in a temporary directory renamed into place (no code on load)."""
    with atomic_directory(state_dir) as tmp:
        save_tensors(tmp / "vae.safetensors", vae.state_dict())
        state = {"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step}
        torch.save(state, tmp / "state.pt")
        (tmp / "history.json").write_text(json.dumps(history))


def _load_state(
    state_dir: Path, vae: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
) -> tuple[int, list]:
    if not (state_dir / "state.pt").is_file():
        raise ValueError(f"{state_dir.parent} holds no VAE training state to resume; drop --resume")
    vae.load_state_dict(load_tensors(state_dir / "vae.safetensors"))
    state = torch.load(state_dir / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return int(state["step"]), json.loads((state_dir / "history.json").read_text())
