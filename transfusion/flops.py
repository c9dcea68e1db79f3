"""Training FLOPs, counted the same way for every model the project trains, so that runs compare at
equal compute (the paper's Figures 7-8 put Transfusion and Chameleon on one FLOPs axis).

Per packed position (every position of every row is computed, padding included): 6 x the matmul
parameters it goes through (the trunk's blocks and the LM head: forward 2N, backward 4N; PAPER.md
counts 6ND), plus attention: 12 x layers x (heads x head width) x row length (scores and values
against every key of the row, forward and backward; the dense mask computes them all, PaLM's
appendix B). Per image: 3 x the forward FLOPs of the patcher (linear layers, or the U-Net's
convolutions and projections, with its timestep MLP), counted once per config by running it on the
``meta`` device under ``torch.utils.flop_counter``. Embedding lookups, norms and elementwise work are
not counted. The VAE / VQ encoder runs outside the model (data preparation) and is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from transfusion.config import ModelConfig
from transfusion.sequence import MixedBatch


def matmul_params_per_position(cfg: ModelConfig) -> int:
    """Weights a position multiplies through: q/k/v/o, the SwiGLU's three matrices (and biases)
    per layer, and the LM head."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    if cfg.qkv_bias:
        attn += cfg.head_dim * (cfg.n_heads + 2 * cfg.kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp) + cfg.dim * cfg.total_vocab


def position_train_flops(cfg: ModelConfig, row_len: int) -> float:
    """Training FLOPs of one position in a row of ``row_len``: 6 N + attention."""
    return 6 * matmul_params_per_position(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * row_len


def patcher_forward_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of the patcher for one image (in and out, timestep embedding included); 0 for
    a model whose images are tokens."""
    if cfg.discrete:
        return 0.0
    return _patcher_forward_flops(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


@functools.lru_cache(maxsize=64)
def _patcher_forward_flops(key: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from transfusion.patching import make_patcher

    cfg = ModelConfig(**json.loads(key))
    with torch.device("meta"):
        patcher = make_patcher(cfg)
        x = torch.empty(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        tokens, ctx = patcher.encode(x, t)
        patcher.decode(tokens, ctx)
    return float(counter.get_total_flops())


def train_flops(cfg: ModelConfig, rows: int, row_len: int, images: int) -> float:
    """Training FLOPs of one micro-batch of ``rows`` x ``row_len`` positions holding ``images`` images."""
    return rows * row_len * position_train_flops(cfg, row_len) + 3 * images * patcher_forward_flops(cfg)


def batch_train_flops(cfg: ModelConfig, batch: MixedBatch) -> float:
    """``train_flops`` for a packed batch."""
    rows, row_len = batch.ids.shape
    return train_flops(cfg, rows, row_len, batch.num_images)
