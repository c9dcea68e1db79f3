"""Which autoencoder a directory or a config holds: the KL-VAE (``vae.py``), the VQ tokenizer
(``vq.py``, which shares the KL-VAE's convolutions) or a diffusers ``AutoencoderKL``. A module of its
own so that ``vae`` and ``vq`` do not import each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfusion.config import VAEConfig
from transfusion.io import load_tensors
from transfusion.vae import CONFIG, KLVAE, WEIGHTS, DiffusersVAE
from transfusion.vq import VQVAE


def make_autoencoder(cfg: VAEConfig) -> nn.Module:
    """A fresh autoencoder of ``cfg.kind``: the KL-VAE ('kl') or the VQ tokenizer ('vq', ``vq.VQVAE``)."""
    if cfg.kind == "vq":
        return VQVAE(cfg)
    return KLVAE(cfg)


def load_vae(directory: str | Path, device: str | torch.device = "cpu") -> Any:
    """Our autoencoder (vae.json + vae.safetensors: a KL-VAE, or a VQ tokenizer by its config's kind)
    or a diffusers AutoencoderKL directory (config.json)."""
    directory = Path(directory)
    if (directory / CONFIG).is_file():
        meta = json.loads((directory / CONFIG).read_text())
        cfg = VAEConfig(**{**meta["config"], "path": str(directory)})
        vae = make_autoencoder(cfg)
        vae.load_state_dict(load_tensors(directory / WEIGHTS))
        return vae.to(device).eval()
    hf = directory / "config.json"
    if hf.is_file() and json.loads(hf.read_text()).get("_class_name") == "AutoencoderKL":
        return DiffusersVAE(directory).to(device).eval()
    raise ValueError(
        f"{directory} holds no VAE: expected {CONFIG} (transfusion train-vae) or a diffusers AutoencoderKL"
    )
