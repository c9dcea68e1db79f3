"""The image autoencoder: pixels (N, 3, S, S) in [-1, 1] <-> latents (N, C, S/f, S/f).

``KLVAE`` is a small convolutional KL-regularised autoencoder (the paper trains its own with 8 latent
channels). The transformer never sees raw latents: ``to_diffusion`` shifts and scales them to roughly
unit variance with ``scale``/``shift`` computed from data after training (``compute_latent_stats``)
and stored in the VAE's config. ``DiffusersVAE`` wraps a diffusers ``AutoencoderKL`` from a local
directory behind the same interface. ``transfusion.autoencoders.load_vae`` reads either.

Shape legend: N images, S image side, f downsampling factor, C latent channels, c feature channels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from transfusion.config import VAEConfig
from transfusion.io import atomic_write_text, save_tensors

WEIGHTS, CONFIG = "vae.safetensors", "vae.json"


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _widths(cfg: VAEConfig) -> list[int]:
    """Channels at each resolution: ``base_channels``, doubling (up to 4x) at each downsampling."""
    stages = {4: 2, 8: 3}[cfg.downsample]
    return [cfg.base_channels * min(2**i, 4) for i in range(stages + 1)]


def conv_encoder(cfg: VAEConfig, out_channels: int) -> nn.Sequential:
    """Pixels (N, 3, S, S) -> (N, out_channels, S/f, S/f): a residual block and a strided convolution
    per factor of two, then a residual block at the latent resolution. The KL-VAE and the VQ
    tokenizer share it, so both see the same image grid."""
    widths = _widths(cfg)
    enc: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
    for i in range(len(widths) - 1):
        enc += [ResBlock(widths[i], widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
    enc += [ResBlock(widths[-1], widths[-1]), nn.GroupNorm(8, widths[-1]), nn.SiLU()]
    enc += [nn.Conv2d(widths[-1], out_channels, 3, padding=1)]
    return nn.Sequential(*enc)


def conv_decoder(cfg: VAEConfig, in_channels: int) -> nn.Sequential:
    """The encoder's mirror: (N, in_channels, S/f, S/f) -> pixels (N, 3, S, S), roughly in [-1, 1]."""
    widths = _widths(cfg)
    dec: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[-1], 3, padding=1),
        ResBlock(widths[-1], widths[-1]),
    ]
    for i in reversed(range(len(widths) - 1)):
        dec += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
        ]
        dec += [ResBlock(widths[i], widths[i])]
    dec += [nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)]
    return nn.Sequential(*dec)


class KLVAE(nn.Module):
    """The KL-regularised autoencoder of continuous latents (Transfusion's images)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = conv_encoder(cfg, 2 * cfg.latent_channels)  # mean and log-variance
        self.decoder = conv_decoder(cfg, cfg.latent_channels)

    def encode_dist(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, 3, S, S) -> mean, logvar (N, C, S/f, S/f)."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        mean, logvar = self.encode_dist(images)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + (0.5 * logvar).exp() * noise

    def decode(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)  # (N, 3, S, S), roughly in [-1, 1]

    def reconstruct(self, images: Tensor) -> Tensor:
        """Pixels through the autoencoder (the latent mean, no sampling)."""
        return self.decode(self.encode(images))

    def to_diffusion(self, z: Tensor) -> Tensor:
        return (z - self.config.shift) * self.config.scale

    def from_diffusion(self, z: Tensor) -> Tensor:
        return z / self.config.scale + self.config.shift

    def loss(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(total, reconstruction MSE, KL per latent element); total = MSE + kl_weight * KL."""
        mean, logvar = self.encode_dist(images)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        recon = self.decode(mean + (0.5 * logvar).exp() * noise)
        mse = F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return mse + self.config.kl_weight * kl, mse, kl


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` from a local directory, with our interface. Its own
    ``scaling_factor``/``shift_factor`` give the diffusion scaling."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "loading a diffusers VAE needs: pip install 'transfusion[diffusers]'"
            ) from e
        self.inner = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        c = self.inner.config
        down = 2 ** (len(c.block_out_channels) - 1)
        if down not in (4, 8):
            raise ValueError(
                f"{path}: this AutoencoderKL downsamples by {down} ({len(c.block_out_channels)} blocks); "
                "supported factors are 4 and 8"
            )
        self.config = VAEConfig(
            image_size=int(c.sample_size) - int(c.sample_size) % down,
            in_channels=c.in_channels,
            latent_channels=c.latent_channels,
            downsample=down,
            scale=float(c.scaling_factor),
            shift=float(getattr(c, "shift_factor", None) or 0.0),
            path=str(path),
        )

    def encode(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        dist = self.inner.encode(images).latent_dist
        return dist.sample(generator) if sample else dist.mean

    def decode(self, latents: Tensor) -> Tensor:
        return self.inner.decode(latents).sample

    def to_diffusion(self, z: Tensor) -> Tensor:
        return (z - self.config.shift) * self.config.scale

    def from_diffusion(self, z: Tensor) -> Tensor:
        return z / self.config.scale + self.config.shift


Autoencoder = KLVAE | DiffusersVAE


@torch.no_grad()
def compute_latent_stats(vae: KLVAE, images: Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(scale, shift) so that (z - shift) * scale has zero mean and unit variance over ``images``."""
    zs = torch.cat([vae.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    shift = zs.mean().item()
    return 1.0 / max(zs.std().item(), 1e-6), shift


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, computed per image and averaged; images in [-1, 1] have
    data_range 2. PSNR = 10 log10(range^2 / MSE)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-12)  # (N,)
    return float((10 * torch.log10(data_range**2 / mse)).mean())


def pil_to_tensor(images: list[Image.Image]) -> Tensor:
    """PIL RGB images -> (N, 3, S, S) float in [-1, 1]."""
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0


def unit_range(pixels: Tensor) -> Tensor:
    """uint8 pixels (0..255) to floats in [-1, 1]; floats pass through."""
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels


def tensor_to_pil(images: Tensor) -> list[Image.Image]:
    arr = (
        ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(a) for a in arr]


def vae_hash(vae: nn.Module) -> str:
    """Content hash of the weights and the diffusion scaling: a latent cache is valid only for it."""
    h = hashlib.sha256()
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    h.update(f"{vae.config.scale:.10g}/{vae.config.shift:.10g}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(vae: Any, images: list[Image.Image] | Tensor, batch_size: int = 256) -> Tensor:
    """PIL images, pixels (N, 3, S, S) in [-1, 1], or uint8 pixels (N, S, S, 3) (what data workers
    send) -> latents scaled for diffusion, (N, C, h, w) float32 on the CPU; encoded ``batch_size`` at a
    time on the VAE's device."""
    pixels = pil_to_tensor(images) if isinstance(images, list) else images
    device = next(vae.parameters()).device
    if pixels.dtype == torch.uint8:  # channels last, 0..255: converted on the device, a quarter of the copy
        pixels = pixels.permute(0, 3, 1, 2)
    out = [
        vae.to_diffusion(vae.encode(unit_range(pixels[i : i + batch_size].to(device)))).float().cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor) -> list[Image.Image]:
    """Latents scaled for diffusion (N, C, h, w) -> PIL images, decoded on the VAE's device."""
    device = next(vae.parameters()).device
    return tensor_to_pil(vae.decode(vae.from_diffusion(latents.to(device))).cpu())


def save_vae(vae: nn.Module, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS, vae.state_dict())
    meta = {"config": dataclasses.asdict(vae.config), "hash": vae_hash(vae)}
    atomic_write_text(directory / CONFIG, json.dumps(meta, indent=2))
    return directory
