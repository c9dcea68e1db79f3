"""The VQ tokenizer of the Chameleon baseline: nearest-code quantisation, straight-through gradients,
dead-code restarts, the autoencoder interface, training and saving."""

import json
import os
from pathlib import Path

import pytest
import torch

from transfusion import cli
from transfusion.autoencoders import load_vae, make_autoencoder
from transfusion.config import VAEConfig
from transfusion.vae import decode_latents, encode_images, save_vae
from transfusion.vq import VQVAE, code_usage


def vq_cfg(**kw):
    return VAEConfig(kind="vq", image_size=16, base_channels=8, latent_channels=4, codebook_size=32, **kw)


def test_quantise_picks_the_nearest_code_and_round_trips():
    torch.manual_seed(0)
    vq = VQVAE(vq_cfg())
    z = torch.randn(3, 4, 4, 4)
    codes = vq.nearest(z)
    e = vq.codebook.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.tensor([min(range(32), key=lambda k: float((v - e[k]).pow(2).sum())) for v in flat])  # noqa: B023
    assert torch.equal(codes.flatten(), brute)
    # codes -> vectors -> codes is the identity (quantise(dequantise(c)) = c)
    assert torch.equal(vq.nearest(vq.lookup(codes)), codes)
    assert torch.equal(vq.nearest(vq.from_diffusion(codes[:, None].float())), codes)


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    vq = VQVAE(vq_cfg())
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    z_q, codes, codebook_loss, commitment = vq.quantize(z)
    torch.testing.assert_close(z_q, vq.lookup(codes))  # forward: the codes' vectors
    (z_q * torch.arange(4.0)[None, :, None, None]).sum().backward()
    # backward: the identity, as if quantisation were not there
    torch.testing.assert_close(z.grad, torch.arange(4.0)[None, :, None, None].expand_as(z))
    codebook_loss.backward()  # the codebook loss moves the codes, not the encoder
    assert vq.codebook.weight.grad is not None and vq.codebook.weight.grad.abs().sum() > 0


def test_dead_codes_restart_on_encoder_outputs():
    torch.manual_seed(0)
    vq = VQVAE(vq_cfg()).train()
    vq.usage.fill_(1.0)
    vq.usage[5] = 0.0  # code 5 went unused for long
    with torch.no_grad():
        vq.codebook.weight[5] = 100.0  # far from everything: never picked
    z = torch.randn(2, 4, 4, 4)
    codes = vq.nearest(z)
    assert not (codes == 5).any()
    vq._restart_dead(z, codes, torch.Generator().manual_seed(0))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert any(torch.equal(vq.codebook.weight[5], v) for v in flat)  # now an encoder output
    assert vq.usage[5] == 1.0 and (vq.nearest(z) == 5).any()


def test_interface_encode_decode_and_save(tmp_path):
    torch.manual_seed(0)
    vq = make_autoencoder(vq_cfg())
    assert isinstance(vq, VQVAE)
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    codes = encode_images(vq, images)  # what the transformer reads: the code grid
    assert codes.shape == (5, 1, 4, 4) and torch.equal(codes, codes.round()) and codes.max() < 32
    pictures = decode_latents(vq, codes)
    assert len(pictures) == 5 and pictures[0].size == (16, 16)
    save_vae(vq, tmp_path / "vq")
    back = load_vae(tmp_path / "vq")
    assert isinstance(back, VQVAE) and back.config.kind == "vq"
    assert torch.equal(encode_images(back, images), codes)
    usage = code_usage(vq, images)
    assert 1 <= usage["codes_used"] <= 32 and usage["dead_codes"] == 32 - usage["codes_used"]
    assert 1.0 <= usage["codebook_perplexity"] <= usage["codes_used"] + 1e-6


def test_train_vq_learns_and_reports_its_codebook(tmp_path, capsys):
    out = tmp_path / "vq"
    args = ["train-vq", "--out", str(out), "--image-size", "16", "--base-channels", "8", "--steps", "60",
            "--codebook-size", "64", "--train-images", "128", "--val-images", "16", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["last_mse"] < 0.5 * metrics["first_mse"]  # it learns
    assert metrics["codes_used"] > 4 and metrics["dead_codes"] == 64 - metrics["codes_used"]
    assert "PSNR" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train-vq", "--help"])


def test_train_vq_into_an_unwritable_place_fails_before_training(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root writes through permissions; /proc takes no new directories from anyone
    target = locked / "vq" if os.geteuid() != 0 else Path("/proc/transfusion-vq")
    try:
        code = cli.main(["train-vq", "--out", str(target), "--steps", "100000", "--no-progress"])
        assert code == 2 and "cannot be written" in capsys.readouterr().err
        assert list(locked.iterdir()) == [] and not target.exists()
    finally:
        locked.chmod(0o700)
