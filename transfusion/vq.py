"""The VQ image tokenizer of the Chameleon-style baseline: images as discrete codes.

The same convolutional encoder and decoder as the KL-VAE (``vae.conv_encoder``/``conv_decoder``, the
same downsampling, so both models see the same image grid), with a codebook in between: every latent
pixel is replaced by its nearest code (L2), the decoder reads the codes' vectors, and gradients pass
the quantiser straight through (van den Oord et al. 2017). Losses: reconstruction MSE + codebook
loss ||sg(z) - e||^2 + beta x commitment ||z - sg(e)||^2. Dead codes (unused over a running window)
are restarted at encoder outputs of the current batch, so the codebook stays in use.

The interface is the KL-VAE's, so data, training, generation and evaluation take either:
``encode(pixels)`` gives the code grid as a float (N, 1, h, w) tensor (what the transformer reads,
as tokens), ``to_diffusion`` is the identity, ``from_diffusion(codes)`` looks the codes up, and
``decode`` maps code vectors back to pixels.

Shape legend: N images, S image side, h/w code grid, D code vector width, K codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion.config import VAEConfig
from transfusion.vae import conv_decoder, conv_encoder

USAGE_DECAY = 0.95
"""Decay of the running code-usage counts that find dead codes."""
DEAD_BELOW = 0.03
"""A code whose running usage (expected uses per batch) falls below this is restarted."""


class VQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        D, K = cfg.latent_channels, cfg.codebook_size
        self.encoder = conv_encoder(cfg, D)
        self.decoder = conv_decoder(cfg, D)
        self.codebook = nn.Embedding(K, D)
        nn.init.uniform_(self.codebook.weight, -1.0 / K, 1.0 / K)
        self.register_buffer("usage", torch.ones(K))  # running uses per batch, for dead-code restarts

    # --- quantisation --------------------------------------------------------------------------------
    def nearest(self, z: Tensor) -> Tensor:
        """Code ids (N, h, w) of the nearest codebook vectors to z (N, D, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N h w, D)
        e = self.codebook.weight
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # (N h w, K)
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: Tensor) -> Tensor:
        """Code ids (N, h, w) -> their vectors (N, D, h, w)."""
        return self.codebook(codes.long()).permute(0, 3, 1, 2)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(straight-through quantised z, codes (N, h, w), codebook loss, commitment loss)."""
        codes = self.nearest(z)
        q = self.lookup(codes)
        codebook_loss = F.mse_loss(q, z.detach())
        commitment = F.mse_loss(z, q.detach())
        return z + (q - z).detach(), codes, codebook_loss, commitment

    # --- the autoencoder interface ---------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Pixels (N, 3, S, S) in [-1, 1] -> the code grid as floats (N, 1, h, w) (exact up to 2^24 codes)."""
        return self.nearest(self.encoder(images))[:, None].float()

    def decode(self, latents: Tensor) -> Tensor:
        """Code vectors (N, D, h, w) -> pixels (N, 3, S, S)."""
        return self.decoder(latents)

    def reconstruct(self, images: Tensor) -> Tensor:
        """Pixels through the tokenizer: encoded, quantised, decoded."""
        return self.decode(self.lookup(self.nearest(self.encoder(images))))

    def to_diffusion(self, z: Tensor) -> Tensor:
        return z  # the model reads the codes themselves

    def from_diffusion(self, codes: Tensor) -> Tensor:
        """Code grid (N, 1, h, w) (or (N, h, w)) -> code vectors (N, D, h, w), ready for ``decode``."""
        return self.lookup(codes.reshape(codes.shape[0], *codes.shape[-2:]).round())

    def loss(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(total, reconstruction MSE, codebook + beta x commitment); restarts dead codes when training."""
        z = self.encoder(images)
        z_q, codes, codebook_loss, commitment = self.quantize(z)
        mse = F.mse_loss(self.decoder(z_q), images)
        aux = codebook_loss + self.config.commitment * commitment
        if self.training:
            self._restart_dead(z.detach(), codes, generator)
        return mse + aux, mse, aux

    @torch.no_grad()
    def _restart_dead(self, z: Tensor, codes: Tensor, generator: torch.Generator | None) -> None:
        """Update the running usage; move codes used less than ``DEAD_BELOW`` times per batch (on a
        running average) onto encoder outputs of this batch, drawn at random."""
        K = self.config.codebook_size
        counts = torch.bincount(codes.flatten(), minlength=K).to(self.usage.dtype)
        self.usage.mul_(USAGE_DECAY).add_(counts, alpha=1 - USAGE_DECAY)
        dead = (self.usage < DEAD_BELOW).nonzero().flatten()
        if len(dead) == 0:
            return
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, flat.shape[0], (len(dead),), generator=generator).to(flat.device)
        self.codebook.weight[dead] = flat[pick]
        self.usage[dead] = 1.0


@torch.no_grad()
def code_usage(vq: VQVAE, images: Tensor, batch_size: int = 256) -> dict[str, float]:
    """How the codebook is used on ``images``: perplexity of the code distribution (exp of its
    entropy; K if every code were equally used), codes used, and dead codes (never used)."""
    K = vq.config.codebook_size
    counts = torch.zeros(K)
    for i in range(0, len(images), batch_size):
        codes = vq.encode(images[i : i + batch_size]).long().flatten().cpu()
        counts += torch.bincount(codes, minlength=K).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"codebook_perplexity": math.exp(entropy), "codes_used": used, "dead_codes": K - used}
