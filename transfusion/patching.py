"""Latents <-> transformer vectors: the image edges of the model.

A patcher maps noisy latents (N, C, H, W) and their timesteps (N,) to one D-vector per k x k patch,
(N, n, D) with n = (H/k) * (W/k) in raster order (left to right, top to bottom), and maps the
trunk's outputs back to a latent-shaped prediction. ``encode`` returns a context that ``decode``
receives (the U-Net's skip connections; nothing for the linear patcher).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from transfusion.config import ModelConfig
from transfusion.layers import TimestepEmbedding


def patchify(x: Tensor, k: int) -> Tensor:
    """(N, C, H, W) -> (N, n, C*k*k), patches in raster order, each patch flattened (C, k, k)."""
    N, C, H, W = x.shape
    x = x.view(N, C, H // k, k, W // k, k).permute(0, 2, 4, 1, 3, 5)  # (N, H/k, W/k, C, k, k)
    return x.reshape(N, (H // k) * (W // k), C * k * k)


def unpatchify(p: Tensor, k: int, C: int, H: int, W: int) -> Tensor:
    """Inverse of ``patchify``: (N, n, C*k*k) -> (N, C, H, W)."""
    N = p.shape[0]
    x = p.view(N, H // k, W // k, C, k, k).permute(0, 3, 1, 4, 2, 5)  # (N, C, H/k, k, W/k, k)
    return x.reshape(N, C, H, W)


class LinearPatcher(nn.Module):
    """The paper's linear edges: a timestep embedding is added to every flattened k x k patch
    vector, then one linear layer maps it to the width D; the output side is the transposed
    shape, a linear layer from D back to a patch (zero-initialised, so the untrained model
    predicts zero noise)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.C, self.size = cfg.patch_size, cfg.latent_channels, cfg.latent_size
        self.t_embed = TimestepEmbedding(cfg.timestep_freq_dim, cfg.dim, cfg.patch_dim)
        self.proj_in = nn.Linear(cfg.patch_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.patch_dim)

    def encode(self, x: Tensor, t: Tensor) -> tuple[Tensor, Any]:
        p = patchify(x, self.k)  # (N, n, P)
        p = p + self.t_embed(t)[:, None, :].to(p.dtype)  # timestep added to every patch vector
        return self.proj_in(p), None  # (N, n, D)

    def decode(self, h: Tensor, ctx: Any) -> Tensor:
        return unpatchify(self.proj_out(h), self.k, self.C, self.size, self.size)  # (N, C, H, W)

    def zero_init_output(self) -> None:
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)


def make_patcher(cfg: ModelConfig) -> nn.Module:
    if cfg.patcher == "linear":
        return LinearPatcher(cfg)
    from transfusion.unet import UNetPatcher

    return UNetPatcher(cfg)
