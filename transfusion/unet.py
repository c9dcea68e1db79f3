"""The U-Net patcher: the paper's alternative to the linear image edges.

Down blocks turn a noisy latent (N, C, H, W) into one transformer vector per k x k patch; up blocks
turn the trunk's vectors back into a latent-shaped prediction, with skip connections from each down
block to the up block of the same resolution. The timestep conditions every residual block (its
embedding is added to the feature maps, as in the DDPM U-Net). Normalisation is a plain LayerNorm
over channels (PAPER.md: AdaLayerNorm replaced by plain LayerNorm). One down/up stage per factor of
two in k, so patch sizes 2, 4 and 8 give 1, 2 and 3 stages.

Shape legend: N images, C latent channels, H/W latent size, c feature channels, D width, n patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion.config import ModelConfig
from transfusion.layers import TimestepEmbedding


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of every pixel of a (N, c, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = ChannelLayerNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, c_out, H, W)
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetPatcher(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.patch_size not in (2, 4, 8):
            raise ValueError(f"the U-Net patcher needs patch_size 2, 4 or 8, got {cfg.patch_size}")
        self.C, self.size, self.k = cfg.latent_channels, cfg.latent_size, cfg.patch_size
        stages = int(math.log2(cfg.patch_size))
        c = cfg.unet_channels
        widths = [c * 2**i for i in range(stages + 1)]  # channels at each resolution
        t_dim = 4 * c
        self.t_embed = TimestepEmbedding(cfg.timestep_freq_dim, t_dim, t_dim)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(ResBlock(widths[i], widths[i], t_dim) for i in range(stages))
        self.downsamples = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(stages)
        )
        self.mid = ResBlock(widths[-1], widths[-1], t_dim)
        self.to_tokens = nn.Linear(widths[-1], cfg.dim)
        self.from_tokens = nn.Linear(cfg.dim, widths[-1])
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(stages))
        )
        self.up_blocks = nn.ModuleList(
            ResBlock(2 * widths[i], widths[i], t_dim) for i in reversed(range(stages))
        )
        self.norm_out = ChannelLayerNorm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.latent_channels, 3, padding=1)

    def encode(self, x: Tensor, t: Tensor) -> tuple[Tensor, tuple[Tensor, list[Tensor]]]:
        temb = self.t_embed(t)  # (N, t_dim)
        h = self.conv_in(x)  # (N, c, H, W)
        skips = []
        for block, down in zip(self.down_blocks, self.downsamples):
            h = block(h, temb)
            skips.append(h)
            h = down(h)  # (N, 2c, H/2, W/2)
        h = self.mid(h, temb)  # (N, c_last, H/k, W/k)
        tokens = self.to_tokens(h.flatten(2).transpose(1, 2))  # (N, n, D), raster order
        return tokens, (temb, skips)

    def decode(self, h: Tensor, ctx: tuple[Tensor, list[Tensor]]) -> Tensor:
        temb, skips = ctx
        N, n, _ = h.shape
        side = self.size // self.k
        x = (
            self.from_tokens(h.to(temb.dtype)).transpose(1, 2).reshape(N, -1, side, side)
        )  # (N, c_last, H/k, W/k)
        for up, block, skip in zip(self.upsamples, self.up_blocks, reversed(skips)):
            x = up(x)  # (N, c_i, 2h, 2w)
            x = block(torch.cat([x, skip], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(x)))  # (N, C, H, W)

    def reset_parameters(self) -> None:
        """Convolutions keep PyTorch's default (Kaiming-uniform) init; the model's init_weights
        has set every Linear to normal(0, 0.02), which suits the token projections too."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.reset_parameters()

    def zero_init_output(self) -> None:
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
