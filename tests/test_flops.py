"""FLOP accounting: one count for every model, against a hand count and against PyTorch's own counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from transfusion.config import DiffusionConfig, tiny
from transfusion.diffusion import make_schedule
from transfusion.flops import batch_train_flops, patcher_forward_flops, train_flops
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, images_as_tokens, pack

from helpers import TOK, latent


def test_hand_count_linear_patcher():
    cfg = tiny()  # dim 64, 2 layers, 4 heads of 16, SwiGLU 192, vocabulary 261, 4x4x8 latents, patch 2
    assert (cfg.dim, cfg.n_layers, cfg.ffn_dim, cfg.vocab_size, cfg.patch_dim, cfg.patches_per_image) == (
        64, 2, 192, 261, 32, 4)  # fmt: skip
    n = 2 * (4 * 64 * 64 + 3 * 64 * 192) + 64 * 261  # q k v o + gate up down per layer, and the LM head
    assert n == 123_200
    per_position = 6 * n + 12 * 2 * 64 * 128  # rows of 128: attention against every key
    # the patcher per image: timestep MLP 256 -> 64 -> 32, then 4 patches 32 -> 64 in and 64 -> 32 out
    patcher = 2 * (256 * 64 + 64 * 32) + 2 * 4 * 32 * 64 + 2 * 4 * 64 * 32
    assert patcher_forward_flops(cfg) == patcher == 69_632
    assert train_flops(cfg, rows=3, row_len=128, images=5) == 3 * 128 * per_position + 3 * 5 * patcher


def test_hand_count_unet_patcher():
    cfg = tiny(patcher="unet", unet_channels=16)  # one down/up stage: 4x4 -> 2x2
    c, T, C, D, S = 16, 64, 8, 64, 4  # channels, timestep width (4c), latent channels, width, latent side
    conv = lambda cin, cout, k, side: 2 * cin * cout * k * k * side * side  # noqa: E731
    res = lambda cin, cout, side: conv(cin, cout, 3, side) + conv(cout, cout, 3, side) + 2 * T * cout + (  # noqa: E731
        conv(cin, cout, 1, side) if cin != cout else 0)  # fmt: skip
    expected = (
        2 * (256 * T + T * T)  # timestep MLP
        + conv(C, c, 3, S)  # conv_in
        + res(c, c, S) + conv(c, 2 * c, 3, S // 2)  # down block, strided conv
        + res(2 * c, 2 * c, S // 2)  # mid block
        + 2 * 4 * 2 * c * D + 2 * 4 * D * 2 * c  # to and from the 4 tokens
        + 2 * 2 * c * c * 2 * 2 * (S // 2) ** 2  # transposed conv 2x2, stride 2
        + res(2 * c, c, S)  # up block over the concatenated skip
        + conv(c, C, 3, S)  # conv_out
    )  # fmt: skip
    assert patcher_forward_flops(cfg) == expected


def test_discrete_images_count_their_codes_as_positions_and_vocabulary():
    cfg = tiny(image_tokens="discrete", codebook_size=16, patch_size=1, latent_channels=1)
    assert patcher_forward_flops(cfg) == 0
    n = 2 * (4 * 64 * 64 + 3 * 64 * 192) + 64 * (261 + 16)  # the LM head has a row per code too
    assert train_flops(cfg, rows=1, row_len=64, images=2) == 64 * (6 * n + 12 * 2 * 64 * 64)


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_close_to_pytorchs_count_of_a_real_training_step(patcher):
    """PyTorch's FlopCounterMode over forward and backward of a real batch: ours counts 3x forward,
    the real backward skips the input gradient of the first layers, so ours is a little higher. (Its
    CPU attention kernel goes uncounted by FlopCounterMode: the attention term is set apart.)"""
    torch.manual_seed(0)
    cfg = tiny(patcher=patcher, unet_channels=16)
    model = Transfusion(cfg)
    samples = [Sample([Text(TOK.encode("a red circle")), Image(latent(cfg))]) for _ in range(6)]
    batch = pack(samples, 64, Specials.of(TOK), cfg.patches_per_image)
    dc = DiffusionConfig()
    with FlopCounterMode(display=False) as counter:
        training_loss(model, batch, make_schedule(dc), dc).total.backward()
    rows, L = batch.ids.shape
    attention = rows * L * 12 * cfg.n_layers * cfg.dim * L
    ours, real = batch_train_flops(cfg, batch) - attention, counter.get_total_flops()
    assert real <= ours <= 1.05 * real


def test_chameleon_batch_counts_like_text():
    cfg = tiny(image_tokens="discrete", codebook_size=16, patch_size=1, latent_channels=1)
    s = images_as_tokens(Sample([Text(TOK.encode("a")), Image(torch.zeros(1, 4, 4))]), Specials.of(TOK), 261)
    batch = pack([s], 32, Specials.of(TOK), cfg.patches_per_image)
    assert batch_train_flops(cfg, batch) == train_flops(cfg, 1, 32, 0)
